/**
 * MemoryFileTree: a FileTree held in memory, for the unit tests of the layers above (the FUSE
 * engine, the directory RPC, caches) as MemoryVolume is for the block stack. Small, but with
 * the same contract and errors as LocalFileTree: node ids (= inode numbers, never reused) are
 * valid for the session that looked them up, handles for the session that opened them; names
 * are bytes; locks go through a LockManager; `readOnly` refuses every mutation with EROFS.
 *
 * Directory cookies are per-directory insertion sequence numbers ("." is 1, ".." 2), so a
 * listing continued after creates and deletes neither skips nor repeats a surviving entry.
 * Files are dense (SEEK_DATA finds data everywhere below the size; holes read as zeros).
 */
import { FsError, toFsError } from './errors.js';
import { LockManager } from './locks.js';
import { checkAccess, checkCount, checkName } from './local.js';
import {
  F_RDLCK,
  F_UNLCK,
  F_WRLCK,
  RENAME_EXCHANGE,
  RENAME_NOREPLACE,
  ROOT_ID,
  type Attr,
  type CreateResult,
  type DirEntry,
  type DirEntryPlus,
  type Entry,
  type FileLock,
  type FileTree,
  type FsContext,
  type OpenResult,
  type SetAttr,
  type StatFs,
  type Timespec,
} from './tree.js';

const S_IFMT = 0o170000;
const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;
const S_IFBLK = 0o060000;
const S_IFIFO = 0o010000;
const S_IFSOCK = 0o140000;
const O_ACCMODE = 3;
const O_TRUNC = 0o1000;
const O_APPEND = 0o2000;
const O_EXCL = 0o200;
const FALLOC_FL_KEEP_SIZE = 1;
const FALLOC_FL_PUNCH_HOLE = 2;
const FALLOC_FL_ZERO_RANGE = 0x10;
/** Cap on a file's size, so a test's stray setattr cannot exhaust memory. */
const MAX_FILE = 1 << 30;

interface DirEnt {
  name: Buffer;
  ino: number;
  seq: number;
}

interface MemInode {
  ino: number;
  mode: number;
  uid: number;
  gid: number;
  rdev: number;
  atime: Timespec;
  mtime: Timespec;
  ctime: Timespec;
  /** Names pointing here (directories: their entry in the parent). */
  links: number;
  data: Buffer;
  size: number;
  target?: Buffer;
  entries?: Map<string, DirEnt>;
  nextSeq: number;
  parent: number;
  xattrs: Map<string, Buffer>;
  lookups: Map<string, number>;
  openCount: number;
}

interface MemHandle {
  session: string;
  nodeId: number;
  kind: 'file' | 'dir';
  readable: boolean;
  writable: boolean;
  append: boolean;
}

export interface MemoryFileTreeOptions {
  readOnly?: boolean;
  /** mknod of devices (default false: EPERM). */
  allowDevices?: boolean;
  locks?: LockManager;
}

function now(): Timespec {
  const ms = Date.now();
  return { sec: Math.floor(ms / 1000), nsec: (ms % 1000) * 1e6 };
}

const key = (name: Buffer): string => name.toString('latin1');

export class MemoryFileTree implements FileTree {
  private readonly inodes = new Map<number, MemInode>();
  private readonly handles = new Map<number, MemHandle>();
  private nextIno = ROOT_ID + 1;
  private nextFh = 1;
  private closed = false;
  readonly locks: LockManager;

  constructor(private readonly opts: MemoryFileTreeOptions = {}) {
    this.locks = opts.locks ?? new LockManager();
    const root = this.newInode(S_IFDIR | 0o755, 0, 0);
    this.inodes.delete(root.ino);
    root.ino = ROOT_ID;
    root.parent = ROOT_ID;
    root.links = 1;
    this.inodes.set(ROOT_ID, root);
    this.nextIno = ROOT_ID + 1;
  }

  get stats(): { nodes: number; handles: number } {
    return { nodes: this.inodes.size, handles: this.handles.size };
  }

  // ---- internals ----

  private newInode(mode: number, uid: number, gid: number): MemInode {
    const t = now();
    const n: MemInode = {
      ino: this.nextIno++, mode, uid, gid, rdev: 0, atime: t, mtime: t, ctime: t, links: 0,
      data: Buffer.alloc(0), size: 0, nextSeq: 3, parent: 0, xattrs: new Map(), lookups: new Map(), openCount: 0,
    };
    if ((mode & S_IFMT) === S_IFDIR) n.entries = new Map();
    this.inodes.set(n.ino, n);
    return n;
  }

  private attr(n: MemInode): Attr {
    let nlink = n.links;
    if (n.entries) {
      nlink = 2;
      for (const e of n.entries.values()) if (this.inodes.get(e.ino)?.entries) nlink++;
    }
    const size = n.target ? n.target.length : n.entries ? 4096 : n.size;
    return {
      ino: n.ino, size, blocks: Math.ceil(size / 512), atime: { ...n.atime }, mtime: { ...n.mtime }, ctime: { ...n.ctime },
      mode: n.mode, nlink, uid: n.uid, gid: n.gid, rdev: n.rdev, blksize: 4096,
    };
  }

  private live(): void {
    if (this.closed) throw new FsError('ENOTCONN', 'tree closed');
  }

  private node(ctx: FsContext, id: number): MemInode {
    this.live();
    const n = this.inodes.get(id);
    if (!n || (id !== ROOT_ID && !n.lookups.has(ctx.session))) throw new FsError('ENOENT', `unknown node id ${id}`);
    return n;
  }

  private dir(ctx: FsContext, id: number): MemInode {
    const d = this.node(ctx, id);
    if (!d.entries) throw new FsError('ENOTDIR', 'not a directory');
    return d;
  }

  private handle(ctx: FsContext, nodeId: number, fh: number, kind: 'file' | 'dir'): MemHandle {
    this.live();
    const h = this.handles.get(fh);
    if (!h || h.session !== ctx.session || h.nodeId !== nodeId || h.kind !== kind) throw new FsError('EBADF', `unknown handle ${fh}`);
    return h;
  }

  private writable(): void {
    if (this.opts.readOnly) throw new FsError('EROFS', 'read-only share');
  }

  private counted(session: string, n: MemInode): Entry {
    if (n.ino !== ROOT_ID) n.lookups.set(session, (n.lookups.get(session) ?? 0) + 1);
    return { nodeId: n.ino, generation: 0, attr: this.attr(n) };
  }

  /** Frees an inode nobody can reach any more (no name, no lookup, no open handle). */
  private reap(n: MemInode): void {
    if (n.ino !== ROOT_ID && n.links === 0 && n.lookups.size === 0 && n.openCount === 0) this.inodes.delete(n.ino);
  }

  private touch(n: MemInode, data = true): void {
    const t = now();
    n.ctime = t;
    if (data) n.mtime = t;
  }

  private addEntry(d: MemInode, name: Buffer, n: MemInode): void {
    d.entries!.set(key(name), { name: Buffer.from(name), ino: n.ino, seq: d.nextSeq++ });
    n.links++;
    if (n.entries) n.parent = d.ino;
    this.touch(d);
  }

  private removeEntry(d: MemInode, name: Buffer): MemInode {
    const e = d.entries!.get(key(name))!;
    d.entries!.delete(key(name));
    const n = this.inodes.get(e.ino)!;
    n.links--;
    this.touch(d);
    n.ctime = now();
    return n;
  }

  private child(d: MemInode, name: Buffer): MemInode | undefined {
    const e = d.entries!.get(key(name));
    return e ? this.inodes.get(e.ino) : undefined;
  }

  private async run<T>(fn: () => T | Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      throw toFsError(e);
    }
  }

  private make(ctx: FsContext, parent: number, name: Buffer, mode: number, fill?: (n: MemInode) => void): Entry {
    this.writable();
    const d = this.dir(ctx, parent);
    checkName(name, false);
    if (d.entries!.has(key(name))) throw new FsError('EEXIST', 'name exists');
    const perms = (mode & 0o7777) & ~(ctx.umask ?? 0);
    const n = this.newInode((mode & S_IFMT) | perms, ctx.uid, ctx.gid);
    fill?.(n);
    this.addEntry(d, name, n);
    return this.counted(ctx.session, n);
  }

  private resize(n: MemInode, size: number): void {
    if (size > MAX_FILE) throw new FsError('EFBIG', 'file too large for a memory tree');
    if (size > n.data.length) {
      const grown = Buffer.alloc(Math.min(MAX_FILE, Math.max(size, n.data.length * 2)));
      n.data.copy(grown, 0, 0, n.size);
      n.data = grown;
    } else if (size < n.size) {
      n.data.fill(0, size, n.size);
    }
    n.size = size;
  }

  // ---- FileTree ----

  lookup(ctx: FsContext, parent: number, name: Buffer): Promise<Entry> {
    return this.run(() => {
      const d = this.dir(ctx, parent);
      checkName(name, true);
      if (name.equals(Buffer.from('.'))) return this.counted(ctx.session, d);
      if (name.equals(Buffer.from('..'))) return this.counted(ctx.session, this.inodes.get(d.parent)!);
      const n = this.child(d, name);
      if (!n) throw new FsError('ENOENT', 'no such entry');
      return this.counted(ctx.session, n);
    });
  }

  forget(nodeId: number, nlookup: number, session?: string): void {
    const n = this.inodes.get(nodeId);
    if (!n || nodeId === ROOT_ID || !(nlookup > 0)) return;
    let left = nlookup;
    for (const s of session !== undefined ? [session] : [...n.lookups.keys()]) {
      const c = n.lookups.get(s);
      if (c === undefined) continue;
      const take = Math.min(c, left);
      left -= take;
      if (c === take) n.lookups.delete(s);
      else n.lookups.set(s, c - take);
      if (left === 0) break;
    }
    this.reap(n);
  }

  getattr(ctx: FsContext, nodeId: number, fh?: number): Promise<{ attr: Attr }> {
    return this.run(() => {
      if (fh !== undefined) this.handle(ctx, nodeId, fh, this.handles.get(fh)?.kind ?? 'file');
      const n = fh !== undefined ? this.inodes.get(nodeId)! : this.node(ctx, nodeId);
      return { attr: this.attr(n) };
    });
  }

  setattr(ctx: FsContext, nodeId: number, changes: SetAttr, fh?: number): Promise<{ attr: Attr }> {
    return this.run(() => {
      const n = this.node(ctx, nodeId);
      this.writable();
      const h = fh !== undefined ? this.handle(ctx, nodeId, fh, 'file') : undefined;
      const type = n.mode & S_IFMT;
      if (changes.uid !== undefined) n.uid = changes.uid;
      if (changes.gid !== undefined) n.gid = changes.gid;
      if (changes.mode !== undefined) n.mode = (n.mode & S_IFMT) | (changes.mode & 0o7777);
      if (changes.size !== undefined) {
        checkCount(changes.size, 'size');
        if (type === S_IFDIR) throw new FsError('EISDIR', 'truncate of a directory');
        if (type !== S_IFREG) throw new FsError('EINVAL', 'truncate of a special file');
        if (h && !h.writable) throw new FsError('EBADF', 'handle not open for writing');
        this.resize(n, changes.size);
        n.mtime = now();
      }
      const t = (v: Timespec | 'now'): Timespec => (v === 'now' ? now() : { ...v });
      if (changes.atime !== undefined) n.atime = t(changes.atime);
      if (changes.mtime !== undefined) n.mtime = t(changes.mtime);
      if (changes.killSuidGid && changes.mode === undefined && type === S_IFREG) {
        n.mode &= ~(0o4000 | (n.mode & 0o010 ? 0o2000 : 0));
      }
      n.ctime = now();
      return { attr: this.attr(n) };
    });
  }

  readlink(ctx: FsContext, nodeId: number): Promise<Buffer> {
    return this.run(() => {
      const n = this.node(ctx, nodeId);
      if (!n.target) throw new FsError('EINVAL', 'not a symlink');
      return Buffer.from(n.target);
    });
  }

  mknod(ctx: FsContext, parent: number, name: Buffer, mode: number, rdev: number): Promise<Entry> {
    return this.run(() => {
      const type = mode & S_IFMT || S_IFREG;
      if ((type === S_IFCHR || type === S_IFBLK) && !this.opts.allowDevices) throw new FsError('EPERM', 'device nodes are not allowed');
      if (![S_IFREG, S_IFIFO, S_IFSOCK, S_IFCHR, S_IFBLK].includes(type)) throw new FsError('EINVAL', 'mknod of this type');
      return this.make(ctx, parent, name, type | (mode & 0o7777), (n) => {
        n.rdev = type === S_IFCHR || type === S_IFBLK ? rdev : 0;
      });
    });
  }

  mkdir(ctx: FsContext, parent: number, name: Buffer, mode: number): Promise<Entry> {
    return this.run(() => this.make(ctx, parent, name, S_IFDIR | (mode & 0o1777)));
  }

  symlink(ctx: FsContext, parent: number, name: Buffer, target: Buffer): Promise<Entry> {
    return this.run(() => {
      if (target.length === 0 || target.length >= 4096 || target.includes(0)) throw new FsError('EINVAL', 'bad symlink target');
      return this.make(ctx, parent, name, S_IFLNK, (n) => {
        n.mode = S_IFLNK | 0o777; // a symlink's mode ignores the umask
        n.target = Buffer.from(target);
      });
    });
  }

  unlink(ctx: FsContext, parent: number, name: Buffer): Promise<void> {
    return this.run(() => this.removeName(ctx, parent, name, false));
  }

  rmdir(ctx: FsContext, parent: number, name: Buffer): Promise<void> {
    return this.run(() => this.removeName(ctx, parent, name, true));
  }

  private removeName(ctx: FsContext, parent: number, name: Buffer, dir: boolean): void {
    const d = this.dir(ctx, parent);
    this.writable();
    checkName(name, false);
    const n = this.child(d, name);
    if (!n) throw new FsError('ENOENT', 'no such entry');
    if (!dir && n.entries) throw new FsError('EISDIR', 'unlink of a directory');
    if (dir && !n.entries) throw new FsError('ENOTDIR', 'not a directory');
    if (dir && n.entries!.size > 0) throw new FsError('ENOTEMPTY', 'directory not empty');
    this.reap(this.removeEntry(d, name));
  }

  /** Is `a` the directory `b` or one of its ancestors? */
  private isAncestor(a: MemInode, b: MemInode): boolean {
    for (let cur = b; ; cur = this.inodes.get(cur.parent)!) {
      if (cur.ino === a.ino) return true;
      if (cur.ino === ROOT_ID) return false;
    }
  }

  rename(ctx: FsContext, parent: number, name: Buffer, newParent: number, newName: Buffer, flags: number): Promise<void> {
    return this.run(() => {
      const from = this.dir(ctx, parent);
      const to = this.dir(ctx, newParent);
      this.writable();
      checkName(name, false);
      checkName(newName, false);
      if (flags !== 0 && flags !== RENAME_NOREPLACE && flags !== RENAME_EXCHANGE) throw new FsError('EINVAL', 'bad rename flags');
      const src = this.child(from, name);
      if (!src) throw new FsError('ENOENT', 'no such entry');
      const dst = this.child(to, newName);
      if (src === dst && flags !== RENAME_EXCHANGE) return;
      if (flags === RENAME_EXCHANGE) {
        if (!dst) throw new FsError('ENOENT', 'no such entry');
        if ((src.entries && this.isAncestor(src, to)) || (dst.entries && this.isAncestor(dst, from))) throw new FsError('EINVAL', 'would move a directory into itself');
        this.removeEntry(from, name);
        this.removeEntry(to, newName);
        this.addEntry(from, name, dst);
        this.addEntry(to, newName, src);
        return;
      }
      if (dst && flags === RENAME_NOREPLACE) throw new FsError('EEXIST', 'target exists');
      if (src.entries && this.isAncestor(src, to)) throw new FsError('EINVAL', 'would move a directory into itself');
      if (dst) {
        if (src.entries && !dst.entries) throw new FsError('ENOTDIR', 'target is not a directory');
        if (!src.entries && dst.entries) throw new FsError('EISDIR', 'target is a directory');
        if (dst.entries && dst.entries.size > 0) throw new FsError('ENOTEMPTY', 'target directory not empty');
        this.reap(this.removeEntry(to, newName));
      }
      this.removeEntry(from, name);
      this.addEntry(to, newName, src);
    });
  }

  link(ctx: FsContext, nodeId: number, newParent: number, newName: Buffer): Promise<Entry> {
    return this.run(() => {
      const n = this.node(ctx, nodeId);
      const d = this.dir(ctx, newParent);
      this.writable();
      checkName(newName, false);
      if (n.entries) throw new FsError('EPERM', 'hard link of a directory');
      if (d.entries!.has(key(newName))) throw new FsError('EEXIST', 'name exists');
      this.addEntry(d, newName, n);
      n.ctime = now();
      return this.counted(ctx.session, n);
    });
  }

  private openHandle(ctx: FsContext, n: MemInode, flags: number, kind: 'file' | 'dir'): OpenResult {
    const acc = flags & O_ACCMODE;
    const fh = this.nextFh++;
    this.handles.set(fh, { session: ctx.session, nodeId: n.ino, kind, readable: acc !== 1, writable: acc !== 0, append: !!(flags & O_APPEND) });
    n.openCount++;
    return { fh };
  }

  open(ctx: FsContext, nodeId: number, flags: number): Promise<OpenResult> {
    return this.run(() => {
      const n = this.node(ctx, nodeId);
      const acc = flags & O_ACCMODE;
      if (acc === O_ACCMODE) throw new FsError('EINVAL', 'bad access mode');
      if (acc !== 0 || flags & O_TRUNC) this.writable();
      const type = n.mode & S_IFMT;
      if (type === S_IFDIR) throw new FsError('EISDIR', 'open of a directory');
      if (type === S_IFLNK) throw new FsError('ELOOP', 'open of a symlink');
      if (type !== S_IFREG) throw new FsError('ENXIO', 'open of a special file');
      if (flags & O_TRUNC && acc !== 0) {
        this.resize(n, 0);
        this.touch(n);
      }
      return this.openHandle(ctx, n, flags, 'file');
    });
  }

  create(ctx: FsContext, parent: number, name: Buffer, mode: number, flags: number): Promise<CreateResult> {
    return this.run(() => {
      const d = this.dir(ctx, parent);
      this.writable();
      checkName(name, false);
      if ((flags & O_ACCMODE) === O_ACCMODE) throw new FsError('EINVAL', 'bad access mode');
      const existing = this.child(d, name);
      if (existing) {
        if (flags & O_EXCL) throw new FsError('EEXIST', 'name exists');
        const t = existing.mode & S_IFMT;
        if (t !== S_IFREG) throw new FsError(t === S_IFDIR ? 'EISDIR' : t === S_IFLNK ? 'ELOOP' : 'ENXIO', 'not a regular file');
        if (flags & O_TRUNC) this.resize(existing, 0);
        const entry = this.counted(ctx.session, existing);
        return { entry, open: this.openHandle(ctx, existing, flags, 'file') };
      }
      const entry = this.make(ctx, parent, name, S_IFREG | (mode & 0o7777));
      return { entry, open: this.openHandle(ctx, this.inodes.get(entry.nodeId)!, flags, 'file') };
    });
  }

  read(ctx: FsContext, nodeId: number, fh: number, offset: number, size: number): Promise<Buffer> {
    return this.run(() => {
      const h = this.handle(ctx, nodeId, fh, 'file');
      checkCount(offset, 'offset');
      checkCount(size, 'size');
      if (!h.readable) throw new FsError('EBADF', 'handle not open for reading');
      const n = this.inodes.get(nodeId)!;
      if (offset >= n.size) return Buffer.alloc(0);
      // A copy: the caller may keep the buffer while the file changes.
      return Buffer.from(n.data.subarray(offset, Math.min(n.size, offset + size)));
    });
  }

  write(ctx: FsContext, nodeId: number, fh: number, offset: number, data: Buffer): Promise<number> {
    return this.run(() => {
      const h = this.handle(ctx, nodeId, fh, 'file');
      this.writable();
      checkCount(offset, 'offset');
      if (!h.writable) throw new FsError('EBADF', 'handle not open for writing');
      const n = this.inodes.get(nodeId)!;
      const at = h.append ? n.size : offset;
      if (at + data.length > n.size) this.resize(n, at + data.length);
      data.copy(n.data, at);
      this.touch(n);
      return data.length;
    });
  }

  flush(ctx: FsContext, nodeId: number, fh: number, lockOwner: bigint): Promise<void> {
    return this.run(() => {
      this.handle(ctx, nodeId, fh, 'file');
      this.locks.releaseOwner(String(nodeId), ctx.session, lockOwner);
    });
  }

  private closeHandle(fh: number, h: MemHandle): void {
    this.handles.delete(fh);
    if (h.kind === 'file') this.locks.releaseHandle(String(h.nodeId), h.session, fh);
    const n = this.inodes.get(h.nodeId);
    if (n) {
      n.openCount--;
      this.reap(n);
    }
  }

  release(ctx: FsContext, nodeId: number, fh: number, _lockOwner?: bigint): Promise<void> {
    return this.run(() => this.closeHandle(fh, this.handle(ctx, nodeId, fh, 'file')));
  }

  fsync(ctx: FsContext, nodeId: number, fh: number, _datasync: boolean): Promise<void> {
    return this.run(() => void this.handle(ctx, nodeId, fh, 'file'));
  }

  opendir(ctx: FsContext, nodeId: number, _flags: number): Promise<OpenResult> {
    return this.run(() => this.openHandle(ctx, this.dir(ctx, nodeId), 0, 'dir'));
  }

  private list(ctx: FsContext, nodeId: number, fh: number, offset: number, max: number): { d: MemInode; ents: DirEntry[] } {
    this.handle(ctx, nodeId, fh, 'dir');
    checkCount(offset, 'offset');
    checkCount(max, 'entry count');
    const d = this.inodes.get(nodeId)!;
    const all: DirEntry[] = [
      { name: Buffer.from('.'), ino: d.ino, type: 4, offset: 1 },
      { name: Buffer.from('..'), ino: d.parent, type: 4, offset: 2 },
    ];
    const ents: DirEntry[] = [];
    for (const e of all) if (e.offset > offset && ents.length < max) ents.push(e);
    // Map iteration follows insertion, and seq grows with insertion: entries come in seq order.
    for (const e of d.entries?.values() ?? []) {
      if (ents.length >= max) break;
      if (e.seq <= offset) continue;
      const c = this.inodes.get(e.ino)!;
      ents.push({ name: Buffer.from(e.name), ino: e.ino, type: (c.mode & S_IFMT) >> 12, offset: e.seq });
    }
    return { d, ents };
  }

  readdir(ctx: FsContext, nodeId: number, fh: number, offset: number, maxEntries: number): Promise<DirEntry[]> {
    return this.run(() => this.list(ctx, nodeId, fh, offset, maxEntries).ents);
  }

  readdirplus(ctx: FsContext, nodeId: number, fh: number, offset: number, maxEntries: number): Promise<DirEntryPlus[]> {
    return this.run(() => {
      const { d, ents } = this.list(ctx, nodeId, fh, offset, maxEntries);
      return ents.map((e): DirEntryPlus => {
        if (e.offset <= 2) return e;
        return { ...e, entry: this.counted(ctx.session, this.child(d, e.name)!) };
      });
    });
  }

  releasedir(ctx: FsContext, nodeId: number, fh: number): Promise<void> {
    return this.run(() => this.closeHandle(fh, this.handle(ctx, nodeId, fh, 'dir')));
  }

  fsyncdir(ctx: FsContext, nodeId: number, fh: number, _datasync: boolean): Promise<void> {
    return this.run(() => void this.handle(ctx, nodeId, fh, 'dir'));
  }

  statfs(ctx: FsContext, nodeId: number): Promise<StatFs> {
    return this.run(() => {
      this.node(ctx, nodeId);
      let used = 0;
      for (const n of this.inodes.values()) used += Math.ceil(n.size / 4096);
      const blocks = MAX_FILE / 4096;
      return { blocks, bfree: blocks - used, bavail: blocks - used, files: 1 << 20, ffree: (1 << 20) - this.inodes.size, bsize: 4096, namelen: 255, frsize: 4096 };
    });
  }

  setxattr(ctx: FsContext, nodeId: number, name: Buffer, value: Buffer, flags: number): Promise<void> {
    return this.run(() => {
      const n = this.node(ctx, nodeId);
      this.writable();
      checkXattrName(name);
      if (flags & ~3) throw new FsError('EINVAL', 'bad xattr flags');
      if (value.length > 65536) throw new FsError('E2BIG', 'xattr value too large');
      const has = n.xattrs.has(key(name));
      if (flags & 1 && has) throw new FsError('EEXIST', 'xattr exists');
      if (flags & 2 && !has) throw new FsError('ENODATA', 'no such xattr');
      n.xattrs.set(key(name), Buffer.from(value));
      n.ctime = now();
    });
  }

  getxattr(ctx: FsContext, nodeId: number, name: Buffer): Promise<Buffer> {
    return this.run(() => {
      const n = this.node(ctx, nodeId);
      checkXattrName(name);
      const v = n.xattrs.get(key(name));
      if (!v) throw new FsError('ENODATA', 'no such xattr');
      return Buffer.from(v);
    });
  }

  listxattr(ctx: FsContext, nodeId: number): Promise<Buffer> {
    return this.run(() => {
      const n = this.node(ctx, nodeId);
      return Buffer.concat([...n.xattrs.keys()].map((k) => Buffer.from(k + '\0', 'latin1')));
    });
  }

  removexattr(ctx: FsContext, nodeId: number, name: Buffer): Promise<void> {
    return this.run(() => {
      const n = this.node(ctx, nodeId);
      this.writable();
      checkXattrName(name);
      if (!n.xattrs.delete(key(name))) throw new FsError('ENODATA', 'no such xattr');
      n.ctime = now();
    });
  }

  access(ctx: FsContext, nodeId: number, mask: number): Promise<void> {
    return this.run(() => checkAccess(ctx, this.attr(this.node(ctx, nodeId)), mask, !!this.opts.readOnly));
  }

  fallocate(ctx: FsContext, nodeId: number, fh: number, mode: number, offset: number, length: number): Promise<void> {
    return this.run(() => {
      const h = this.handle(ctx, nodeId, fh, 'file');
      this.writable();
      checkCount(offset, 'offset');
      checkCount(length, 'length');
      if (!h.writable) throw new FsError('EBADF', 'handle not open for writing');
      if (mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) throw new FsError('EOPNOTSUPP', 'fallocate mode');
      if (mode & FALLOC_FL_PUNCH_HOLE && !(mode & FALLOC_FL_KEEP_SIZE)) throw new FsError('EINVAL', 'punch hole without keep size');
      const n = this.inodes.get(nodeId)!;
      const end = offset + length;
      if (mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) n.data.fill(0, Math.min(offset, n.size), Math.min(end, n.size));
      if (!(mode & FALLOC_FL_KEEP_SIZE) && end > n.size) this.resize(n, end);
      this.touch(n);
    });
  }

  lseek(ctx: FsContext, nodeId: number, fh: number, offset: number, whence: number): Promise<number> {
    return this.run(() => {
      this.handle(ctx, nodeId, fh, 'file');
      const n = this.inodes.get(nodeId)!;
      checkCount(offset, 'offset');
      if (whence === 3) {
        if (offset >= n.size) throw new FsError('ENXIO', 'no data past the end');
        return offset;
      }
      if (whence === 4) {
        if (offset >= n.size) throw new FsError('ENXIO', 'past the end');
        return n.size;
      }
      if (whence === 0) return offset;
      if (whence === 2) return n.size + offset;
      throw new FsError('EINVAL', 'bad whence');
    });
  }

  async copyFileRange(
    ctx: FsContext,
    from: { nodeId: number; fh: number; offset: number },
    to: { nodeId: number; fh: number; offset: number },
    length: number,
    flags: number,
  ): Promise<number> {
    return this.run(async () => {
      const src = this.handle(ctx, from.nodeId, from.fh, 'file');
      const dst = this.handle(ctx, to.nodeId, to.fh, 'file');
      this.writable();
      if (flags !== 0) throw new FsError('EINVAL', 'copy_file_range flags');
      if (!src.readable || !dst.writable) throw new FsError('EBADF', 'handle mode');
      const data = await this.read(ctx, from.nodeId, from.fh, from.offset, length);
      const n = this.inodes.get(to.nodeId)!;
      if (to.offset + data.length > n.size) this.resize(n, to.offset + data.length);
      data.copy(n.data, to.offset);
      this.touch(n);
      return data.length;
    });
  }

  async syncfs(_ctx: FsContext): Promise<void> {
    this.live();
  }

  getlk(ctx: FsContext, nodeId: number, fh: number, owner: bigint, lock: FileLock): Promise<FileLock> {
    return this.run(() => {
      this.handle(ctx, nodeId, fh, 'file');
      return this.locks.getlk(String(nodeId), { session: ctx.session, owner, pid: lock.pid }, lock);
    });
  }

  setlk(
    ctx: FsContext,
    nodeId: number,
    fh: number,
    owner: bigint,
    lock: FileLock,
    opts: { wait: boolean; flock: boolean; signal?: AbortSignal },
  ): Promise<void> {
    return this.run(() => {
      const h = this.handle(ctx, nodeId, fh, 'file');
      if (opts.flock) return this.locks.flock(String(nodeId), ctx.session, fh, lock.type, opts);
      if ((lock.type === F_RDLCK && !h.readable) || (lock.type === F_WRLCK && !h.writable)) throw new FsError('EBADF', 'lock type does not match the open mode');
      if (lock.type !== F_RDLCK && lock.type !== F_WRLCK && lock.type !== F_UNLCK) throw new FsError('EINVAL', 'bad lock type');
      return this.locks.setlk(String(nodeId), { session: ctx.session, owner, pid: lock.pid }, lock, opts);
    });
  }

  async endSession(session: string): Promise<void> {
    for (const [fh, h] of [...this.handles]) if (h.session === session) this.closeHandle(fh, h);
    for (const n of [...this.inodes.values()]) if (n.lookups.delete(session)) this.reap(n);
    this.locks.endSession(session);
  }

  async close(): Promise<void> {
    this.closed = true;
    this.handles.clear();
    this.locks.clear();
  }
}

function checkXattrName(name: Buffer): void {
  if (name.length === 0 || name.length > 255 || name.includes(0)) throw new FsError(name.length > 255 ? 'ERANGE' : 'EINVAL', 'bad xattr name');
}
