/**
 * LocalFileTree: a host directory served as a FileTree, confined to its root — the passthrough
 * filesystem of a storage node (and of tests), in the manner of virtiofsd's passthrough/mod.rs.
 *
 * Confinement (the share's security boundary):
 * - The tree holds an O_PATH|O_NOFOLLOW fd per node it has handed out (the inode table, keyed by
 *   (st_dev, st_ino)); every access is one path component relative to such an fd, resolved by
 *   openat2 with RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS (native/src/fs.cc).
 *   No path string is ever built from names, so `..`, symlinks (absolute or relative), a symlink
 *   swapped in between a check and a use, and /proc magic links cannot lead outside: a lookup of
 *   a symlink yields the symlink itself, a lookup beneath it fails ENOTDIR, opening it ELOOP.
 * - Names are checked again here (1..255 bytes, no '/', no NUL; "." and ".." never created or
 *   removed); "." is the node itself, ".." its parent, and ".." of the root is the root. The
 *   parent of any other directory is accepted only if walking up from it reaches the root.
 * - Operations on a node itself (open, chmod, utimens, truncate, xattrs, link) go through
 *   "/proc/self/fd/N" of the node's own fd, built from the fd number; open refuses symlinks.
 * - Node ids and handles are small integers of our own, never reused in a tree's life, and valid
 *   only for the session that obtained them: a forged or forgotten id answers ENOENT, a handle
 *   that was never handed out, was released, or belongs to another session answers EBADF.
 * - An fd is closed only when no call is using it (pins), so a forget or release racing an
 *   in-flight call can never let the fd number be reused for another file under that call.
 *
 * Credentials: the daemon runs as root. New files, directories, symlinks and nodes are created
 * by root and then chowned to the caller (ctx.uid/ctx.gid mapped to host ids; the gid is left as
 * the kernel chose when the parent is setgid) and chmodded to the requested mode (after the
 * caller's umask; the daemon's own umask is undone). Another client of the same share swapping
 * the new name in that instant would get its own file chowned — both own the share, and
 * confinement is unaffected. The guest kernel checks permissions itself (virtiofs mounts with
 * default_permissions), so the tree does not re-check mode bits, except in `access` (which a
 * kernel without default_permissions sends) and for lock types against the handle's open mode.
 *
 * uid/gid maps translate both ways: ids written to disk are host ids, attributes returned are
 * guest ids. With a map, an id outside every range becomes `overflowId` (65534, "nobody", as in
 * user namespaces); without one, ids pass unchanged.
 *
 * Locks are kept by a LockManager (lib/fs/locks.ts) per tree, between all sessions of the tree,
 * keyed by inode: they are not taken on the host (see locks.ts for why).
 */
import fs from 'node:fs';
import { promisify } from 'node:util';
import { FS_STAT, native, type NativeAddon } from '../native/index.js';
import { FsError, toFsError } from './errors.js';
import { LockManager } from './locks.js';
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
} from './tree.js';

/** One range of a uid or gid map: guest ids [guest, guest+count) are host ids [host, host+count). */
export interface IdMapRange {
  guest: number;
  host: number;
  count: number;
}

export interface LocalFileTreeOptions {
  /** Every mutation (and every open for writing) fails with EROFS. */
  readOnly?: boolean;
  uidMap?: IdMapRange[];
  gidMap?: IdMapRange[];
  /** The id an unmapped id becomes when a map is given (default 65534). */
  overflowId?: number;
  /** mknod of character and block devices (default false: EPERM). */
  allowDevices?: boolean;
  /** Share a lock table with other trees (default: one per tree). */
  locks?: LockManager;
}

// Linux constants (x86-64 / generic).
const O_ACCMODE = 0o3;
const O_RDONLY = 0;
const O_WRONLY = 0o1;
const O_RDWR = 0o2;
const O_CREAT = 0o100;
const O_EXCL = 0o200;
const O_TRUNC = 0o1000;
const O_APPEND = 0o2000;
const O_NOCTTY = 0o400;
const O_NONBLOCK = 0o4000;
const O_DSYNC = 0o10000;
const O_DIRECTORY = 0o200000;
const O_NOATIME = 0o1000000;
const O_PATH = 0o10000000;
const O_SYNC = 0o4010000;
/** Open flags passed on to the host; O_DIRECT is dropped (guest buffers are not aligned). */
const OPEN_FLAGS_KEPT = O_ACCMODE | O_APPEND | O_TRUNC | O_NONBLOCK | O_DSYNC | O_SYNC | O_NOATIME;
const AT_REMOVEDIR = 0x200;
const UTIME_NOW = (1 << 30) - 1;
const UTIME_OMIT = (1 << 30) - 2;

/** The daemon's own ids: what a new entry gets from the kernel before any chown. */
const OWN_UID = process.geteuid?.() ?? 0;
const OWN_GID = process.getegid?.() ?? 0;
const S_IFMT = 0o170000;
const S_IFSOCK = 0o140000;
const S_IFLNK = 0o120000;
const S_IFREG = 0o100000;
const S_IFBLK = 0o060000;
const S_IFDIR = 0o040000;
const S_IFCHR = 0o020000;
const S_IFIFO = 0o010000;
const S_ISUID = 0o4000;
const S_ISGID = 0o2000;
const S_IXGRP = 0o010;

/** Cookies of directory listings: d_off below 2^52 is its own cookie, larger ones (ext4's 63-bit hashes) are mapped per handle. */
const DIRECT_COOKIE_LIMIT = 2 ** 52;
/** linux_dirent64: d_ino u64, d_off s64, d_reclen u16, d_type u8, d_name. */
const DIRENT_HEADER = 19;
const DIRENT_MAX = 280;

const closeAsync = promisify(fs.close);
const openAsync = promisify(fs.open);
const readAsync = promisify(fs.read);
const writeAsync = promisify(fs.write);
const fsyncAsync = promisify(fs.fsync);
const fdatasyncAsync = promisify(fs.fdatasync);
const ftruncateAsync = promisify(fs.ftruncate);

interface Inode {
  id: number;
  generation: number;
  fd: number;
  /** "devhi:devlo:inohi:inolo": the inode table key and the lock manager's file key. */
  key: string;
  /** S_IFMT bits. */
  type: number;
  /** Lookup counts per session (the root has none and is never dropped). */
  lookups: Map<string, number>;
  /** Calls using `fd` right now; the fd is closed when dropped and pins reach 0. */
  pins: number;
  dropped: boolean;
}

interface DirState {
  /** Mapped cookies: cookie - DIRECT_COOKIE_LIMIT indexes `offs`. */
  offs: bigint[];
  index: Map<bigint, number>;
  /** Listing calls on one handle share its fd's position: one at a time. */
  tail: Promise<unknown>;
}

interface Handle {
  fh: number;
  session: string;
  nodeId: number;
  /** The inode key (locks). */
  key: string;
  fd: number;
  kind: 'file' | 'dir';
  readable: boolean;
  writable: boolean;
  pins: number;
  released: boolean;
  dir?: DirState;
}

/** A parsed linux_dirent64 record. */
export interface RawDirent {
  ino: number;
  off: bigint;
  type: number;
  name: Buffer;
}

/** Parses getdents64 output (pure; `name` views `buf`). Stops at a truncated record. */
export function parseDirents(buf: Buffer): RawDirent[] {
  const out: RawDirent[] = [];
  let p = 0;
  while (p + DIRENT_HEADER <= buf.length) {
    const reclen = buf.readUInt16LE(p + 16);
    if (reclen < DIRENT_HEADER || p + reclen > buf.length) break;
    const nameEnd = buf.indexOf(0, p + DIRENT_HEADER);
    const end = nameEnd < 0 || nameEnd > p + reclen ? p + reclen : nameEnd;
    out.push({
      ino: Number(buf.readBigUInt64LE(p)),
      off: buf.readBigInt64LE(p + 8),
      type: buf[p + 18]!,
      name: buf.subarray(p + DIRENT_HEADER, end),
    });
    p += reclen;
  }
  return out;
}

function isDot(name: Buffer): boolean {
  return name.length === 1 && name[0] === 0x2e;
}
function isDotDot(name: Buffer): boolean {
  return name.length === 2 && name[0] === 0x2e && name[1] === 0x2e;
}

/** Defence in depth behind the FUSE codec: one component of 1..255 bytes without '/' or NUL (shared with MemoryFileTree). */
export function checkName(name: Buffer, allowDots: boolean): void {
  if (!Buffer.isBuffer(name) || name.length === 0 || name.length > 255) throw new FsError(name?.length > 255 ? 'ENAMETOOLONG' : 'EINVAL', 'bad name');
  if (name.includes(0x2f) || name.includes(0)) throw new FsError('EINVAL', "name contains '/' or NUL");
  if (!allowDots && (isDot(name) || isDotDot(name))) throw new FsError('EINVAL', 'name is . or ..');
}

export function checkCount(n: number, what: string): void {
  if (!Number.isSafeInteger(n) || n < 0) throw new FsError('EINVAL', `bad ${what}`);
}

function statKey(st: Float64Array): string {
  return `${st[FS_STAT.devHi]}:${st[FS_STAT.devLo]}:${st[FS_STAT.inoHi]}:${st[FS_STAT.inoLo]}`;
}

/** Guest -> host (`toHost`) or host -> guest id through a map; outside every range: `overflow`; no map: unchanged. */
export function mapId(id: number, map: IdMapRange[] | undefined, toHost: boolean, overflow: number): number {
  if (!map || map.length === 0) return id;
  for (const r of map) {
    const from = toHost ? r.guest : r.host;
    const to = toHost ? r.host : r.guest;
    if (id >= from && id < from + r.count) return to + (id - from);
  }
  return overflow;
}

/**
 * ACCESS for a kernel that sends it (one without default_permissions): owner, group (primary gid
 * only: a request carries no supplementary groups) or other bits of the guest's view of `attr`;
 * root may read and write anything and execute what has an execute bit or is a directory. W_OK
 * on a read-only share is EROFS except for special files (their writes do not reach the share).
 */
export function checkAccess(ctx: FsContext, attr: Attr, mask: number, readOnly: boolean): void {
  if (!Number.isInteger(mask) || mask & ~7) throw new FsError('EINVAL', 'bad access mask');
  const type = attr.mode & S_IFMT;
  const special = type === S_IFCHR || type === S_IFBLK || type === S_IFIFO || type === S_IFSOCK;
  if (mask & 2 && readOnly && !special) throw new FsError('EROFS', 'read-only share');
  if (mask === 0) return;
  if (ctx.uid === 0) {
    if (mask & 1 && type !== S_IFDIR && (attr.mode & 0o111) === 0) throw new FsError('EACCES', 'not executable');
    return;
  }
  const bits = ctx.uid === attr.uid ? (attr.mode >> 6) & 7 : ctx.gid === attr.gid ? (attr.mode >> 3) & 7 : attr.mode & 7;
  if ((bits & mask) !== mask) throw new FsError('EACCES', 'permission denied');
}

export class LocalFileTree implements FileTree {
  private readonly n: NativeAddon;
  private readonly nodes = new Map<number, Inode>();
  private readonly byKey = new Map<string, Inode>();
  private readonly handles = new Map<number, Handle>();
  private nextId = ROOT_ID + 1;
  private nextFh = 1;
  private nextGeneration = 1;
  private closed = false;
  readonly locks: LockManager;
  readonly readOnly: boolean;

  private constructor(
    /** The directory served (as given; resolved once, when opened). */
    readonly rootPath: string,
    private readonly root: Inode,
    /** An O_RDONLY fd of the root directory (syncfs does not take O_PATH fds). */
    private readonly rootDirFd: number,
    private readonly opts: LocalFileTreeOptions,
  ) {
    this.n = native();
    this.locks = opts.locks ?? new LockManager();
    this.readOnly = !!opts.readOnly;
    this.nodes.set(ROOT_ID, root);
    this.byKey.set(root.key, root);
  }

  /** Opens `rootPath` (which must be a directory; symlinks in the path itself are followed, it is the operator's). */
  static async open(rootPath: string, opts: LocalFileTreeOptions = {}): Promise<LocalFileTree> {
    for (const m of [opts.uidMap, opts.gidMap]) {
      for (const r of m ?? []) {
        for (const v of [r.guest, r.host, r.count]) {
          if (!Number.isSafeInteger(v) || v < 0 || v > 0xffffffff) throw new FsError('EINVAL', 'bad id map range');
        }
      }
    }
    const n = native();
    const fd = await openAsync(rootPath, O_PATH | O_DIRECTORY);
    try {
      const st = await n.fsStat(fd);
      if ((st[FS_STAT.mode]! & S_IFMT) !== S_IFDIR) throw new FsError('ENOTDIR', `${rootPath} is not a directory`);
      const dirFd = await n.fsReopen(fd, O_RDONLY | O_DIRECTORY);
      const root: Inode = { id: ROOT_ID, generation: 0, fd, key: statKey(st), type: S_IFDIR, lookups: new Map(), pins: 0, dropped: false };
      return new LocalFileTree(rootPath, root, dirFd, opts);
    } catch (e) {
      await closeAsync(fd).catch(() => {});
      throw toFsError(e);
    }
  }

  /** Live node count (the root included) and open handles: tests check that nothing leaks. */
  get stats(): { nodes: number; handles: number } {
    return { nodes: this.nodes.size, handles: this.handles.size };
  }

  // ---- ids, credentials ----

  private hostUid(id: number): number {
    return mapId(id, this.opts.uidMap, true, this.opts.overflowId ?? 65534);
  }
  private hostGid(id: number): number {
    return mapId(id, this.opts.gidMap, true, this.opts.overflowId ?? 65534);
  }

  private attr(st: Float64Array): Attr {
    const o = this.opts.overflowId ?? 65534;
    return {
      ino: st[FS_STAT.inoHi]! * 2 ** 32 + st[FS_STAT.inoLo]!,
      size: st[FS_STAT.size]!,
      blocks: st[FS_STAT.blocks]!,
      atime: { sec: st[FS_STAT.atime]!, nsec: st[FS_STAT.atimeNs]! },
      mtime: { sec: st[FS_STAT.mtime]!, nsec: st[FS_STAT.mtimeNs]! },
      ctime: { sec: st[FS_STAT.ctime]!, nsec: st[FS_STAT.ctimeNs]! },
      mode: st[FS_STAT.mode]!,
      nlink: st[FS_STAT.nlink]!,
      uid: mapId(st[FS_STAT.uid]!, this.opts.uidMap, false, o),
      gid: mapId(st[FS_STAT.gid]!, this.opts.gidMap, false, o),
      rdev: st[FS_STAT.rdev]!,
      blksize: st[FS_STAT.blksize]!,
    };
  }

  private writable(): void {
    if (this.readOnly) throw new FsError('EROFS', 'read-only share');
  }

  // ---- the inode table ----

  private live(): void {
    if (this.closed) throw new FsError('ENOTCONN', 'tree closed');
  }

  /** The node `id` as seen by `session` (ENOENT unless the session holds a lookup of it), pinned. */
  private pin(ctx: FsContext, id: number): Inode {
    this.live();
    const node = this.nodes.get(id);
    if (!node || (id !== ROOT_ID && !node.lookups.has(ctx.session))) throw new FsError('ENOENT', `unknown node id ${id}`);
    node.pins++;
    return node;
  }

  private unpin(node: Inode): void {
    node.pins--;
    if (node.dropped && node.pins === 0) void closeAsync(node.fd).catch(() => {});
  }

  private async withNode<T>(ctx: FsContext, id: number, fn: (node: Inode) => Promise<T>): Promise<T> {
    let node: Inode | undefined;
    try {
      node = this.pin(ctx, id);
      return await fn(node);
    } catch (e) {
      throw toFsError(e);
    } finally {
      if (node) this.unpin(node);
    }
  }

  private async withNodes<T>(ctx: FsContext, a: number, b: number, fn: (x: Inode, y: Inode) => Promise<T>): Promise<T> {
    return this.withNode(ctx, a, (x) => this.withNode(ctx, b, (y) => fn(x, y)));
  }

  /**
   * Adopts a freshly opened O_PATH fd (and its stat) as a lookup by `session`: the existing node
   * of that inode gains a count (and the new fd is closed), or a new node is made.
   */
  private adopt(session: string, st: Float64Array): Entry {
    const fd = st[FS_STAT.value]!;
    const key = statKey(st);
    let node = this.byKey.get(key);
    if (node) {
      void closeAsync(fd).catch(() => {});
    } else {
      node = {
        id: this.nextId++,
        generation: this.nextGeneration++,
        fd,
        key,
        type: st[FS_STAT.mode]! & S_IFMT,
        lookups: new Map(),
        pins: 0,
        dropped: false,
      };
      this.nodes.set(node.id, node);
      this.byKey.set(key, node);
    }
    if (node.id !== ROOT_ID) node.lookups.set(session, (node.lookups.get(session) ?? 0) + 1);
    return { nodeId: node.id, generation: node.generation, attr: this.attr(st) };
  }

  private drop(node: Inode): void {
    if (node.id === ROOT_ID || node.dropped) return;
    this.nodes.delete(node.id);
    if (this.byKey.get(node.key) === node) this.byKey.delete(node.key);
    node.dropped = true;
    if (node.pins === 0) void closeAsync(node.fd).catch(() => {});
  }

  /** One component beneath `dir`, as an O_PATH fd + stat; "." and ".." resolved as described above. */
  private async openChild(dir: Inode, name: Buffer): Promise<Float64Array> {
    if (dir.type !== S_IFDIR) throw new FsError('ENOTDIR', 'not a directory');
    if (isDotDot(name)) return this.openParent(dir);
    return this.n.fsOpenat(dir.fd, name, O_PATH, 0, true);
  }

  /** The parent of a directory, only if it lies under the root (".." of the root is the root). */
  private async openParent(dir: Inode): Promise<Float64Array> {
    const dotdot = Buffer.from('..');
    if (dir.key === this.root.key) return this.n.fsOpenat(this.root.fd, Buffer.from('.'), O_PATH, 0, true);
    const parent = await this.n.fsOpenat(dir.fd, dotdot, O_PATH, 0, true, true);
    // Walk up from the parent until the root (inside) or the top of the host tree (outside):
    // a directory moved out of the share on the host must not lead the guest out with it.
    let cur = parent[FS_STAT.value]!;
    let key = statKey(parent);
    const opened: number[] = [];
    try {
      for (let depth = 0; depth < 4096; depth++) {
        if (key === this.root.key) return parent;
        const up = await this.n.fsOpenat(cur, dotdot, O_PATH, 0, true, true);
        opened.push(up[FS_STAT.value]!);
        const upKey = statKey(up);
        if (upKey === key) break; // "/" is its own parent
        cur = up[FS_STAT.value]!;
        key = upKey;
      }
    } finally {
      for (const fd of opened) void closeAsync(fd).catch(() => {});
    }
    void closeAsync(parent[FS_STAT.value]!).catch(() => {});
    throw new FsError('ENOENT', 'parent is outside the share');
  }

  // ---- handles ----

  private pinHandle(ctx: FsContext, nodeId: number, fh: number, kind: 'file' | 'dir'): Handle {
    this.live();
    const h = this.handles.get(fh);
    if (!h || h.released || h.session !== ctx.session || h.kind !== kind || h.nodeId !== nodeId) {
      throw new FsError('EBADF', `unknown handle ${fh}`);
    }
    h.pins++;
    return h;
  }

  private unpinHandle(h: Handle): void {
    h.pins--;
    if (h.released && h.pins === 0) void closeAsync(h.fd).catch(() => {});
  }

  private async withHandle<T>(ctx: FsContext, nodeId: number, fh: number, kind: 'file' | 'dir', fn: (h: Handle) => Promise<T>): Promise<T> {
    let h: Handle | undefined;
    try {
      h = this.pinHandle(ctx, nodeId, fh, kind);
      return await fn(h);
    } catch (e) {
      throw toFsError(e);
    } finally {
      if (h) this.unpinHandle(h);
    }
  }

  private newHandle(session: string, node: Inode, fd: number, kind: 'file' | 'dir', flags: number): OpenResult {
    const acc = flags & O_ACCMODE;
    const h: Handle = {
      fh: this.nextFh++,
      session,
      nodeId: node.id,
      key: node.key,
      fd,
      kind,
      readable: acc === O_RDONLY || acc === O_RDWR,
      writable: acc === O_WRONLY || acc === O_RDWR,
      pins: 0,
      released: false,
      dir: kind === 'dir' ? { offs: [], index: new Map(), tail: Promise.resolve() } : undefined,
    };
    this.handles.set(h.fh, h);
    return { fh: h.fh };
  }

  private dropHandle(h: Handle): void {
    if (h.released) return;
    h.released = true;
    this.handles.delete(h.fh);
    if (h.kind === 'file') this.locks.releaseHandle(h.key, h.session, h.fh);
    if (h.pins === 0) void closeAsync(h.fd).catch(() => {});
  }

  // ---- creation helpers ----

  /** Gives a node just created by root to the caller: owner, then the exact mode (undoing the daemon's umask). */
  /**
   * Gives a new entry the caller's ownership and the exact mode asked for; resolves with a stat
   * of it taken after every change. Fast path (a file created by a caller whose ids map to the
   * daemon's own): the chown would change nothing — in a setgid directory the kernel already gave
   * the parent's group, and otherwise the entry is already ours — so only the mode is checked
   * (the process umask may have narrowed it). One stat instead of stat, chown, stat: creates are
   * a third of a small-file workload's round trips to the thread pool.
   */
  private async finishCreate(ctx: FsContext, parent: Inode, fd: number, type: number, perms: number): Promise<Float64Array | undefined> {
    if (this.hostUid(ctx.uid) === OWN_UID && this.hostGid(ctx.gid) === OWN_GID) {
      if (type === S_IFLNK) return undefined;
      const st = await this.n.fsStat(fd);
      // A directory keeps the S_ISGID the kernel gave it from a setgid parent.
      const want = perms | (type === S_IFDIR ? st[FS_STAT.mode]! & S_ISGID : 0);
      if ((st[FS_STAT.mode]! & 0o7777) === want) return st;
      await this.n.fsChmod(fd, want);
      return undefined;
    }
    const pst = await this.n.fsStat(parent.fd);
    const parentSetgid = (pst[FS_STAT.mode]! & S_ISGID) !== 0;
    await this.n.fsChown(fd, this.hostUid(ctx.uid), parentSetgid ? -1 : this.hostGid(ctx.gid));
    if (type === S_IFLNK) return;
    // A directory in a setgid directory inherits S_ISGID (the kernel set it); chown may have
    // cleared set-id bits of a file, so the mode is written after it.
    const want = perms | (type === S_IFDIR && parentSetgid ? S_ISGID : 0);
    const st = await this.n.fsStat(fd);
    if ((st[FS_STAT.mode]! & 0o7777) !== want) await this.n.fsChmod(fd, want);
    return undefined;
  }

  private perms(ctx: FsContext, mode: number): number {
    return mode & 0o7777 & ~(ctx.umask ?? 0);
  }

  /** Creates one entry with `make`, then looks it up, gives it to the caller and returns its entry. */
  private async createEntry(ctx: FsContext, parentId: number, name: Buffer, type: number, perms: number, make: (dirFd: number) => Promise<unknown>): Promise<Entry> {
    return this.withNode(ctx, parentId, async (parent) => {
      this.writable();
      checkName(name, false);
      if (parent.type !== S_IFDIR) throw new FsError('ENOTDIR', 'parent is not a directory');
      await make(parent.fd);
      const st = await this.n.fsOpenat(parent.fd, name, O_PATH, 0, true);
      try {
        const fresh = (await this.finishCreate(ctx, parent, st[FS_STAT.value]!, type, perms)) ?? (await this.n.fsStat(st[FS_STAT.value]!));
        fresh[FS_STAT.value] = st[FS_STAT.value]!;
        return this.adopt(ctx.session, fresh);
      } catch (e) {
        void closeAsync(st[FS_STAT.value]!).catch(() => {});
        throw e;
      }
    });
  }

  // ---- FileTree ----

  lookup(ctx: FsContext, parent: number, name: Buffer): Promise<Entry> {
    return this.withNode(ctx, parent, async (dir) => {
      checkName(name, true);
      return this.adopt(ctx.session, await this.openChild(dir, name));
    });
  }

  /**
   * Subtracts `nlookup` from the node's count for `session` (an additive parameter: without it,
   * from whichever sessions hold counts); at zero for every session the node and its fd go.
   */
  forget(nodeId: number, nlookup: number, session?: string): void {
    const node = this.nodes.get(nodeId);
    if (!node || nodeId === ROOT_ID || !(nlookup > 0)) return;
    let left = nlookup;
    const sessions = session !== undefined ? [session] : [...node.lookups.keys()];
    for (const s of sessions) {
      const c = node.lookups.get(s);
      if (c === undefined) continue;
      const take = Math.min(c, left);
      left -= take;
      if (c - take === 0) node.lookups.delete(s);
      else node.lookups.set(s, c - take);
      if (left === 0) break;
    }
    if (node.lookups.size === 0) this.drop(node);
  }

  getattr(ctx: FsContext, nodeId: number, fh?: number): Promise<{ attr: Attr }> {
    if (fh !== undefined) {
      return this.withHandle(ctx, nodeId, fh, this.handles.get(fh)?.kind ?? 'file', async (h) => ({ attr: this.attr(await this.n.fsStat(h.fd)) }));
    }
    return this.withNode(ctx, nodeId, async (node) => ({ attr: this.attr(await this.n.fsStat(node.fd)) }));
  }

  setattr(ctx: FsContext, nodeId: number, changes: SetAttr, fh?: number): Promise<{ attr: Attr }> {
    return this.withNode(ctx, nodeId, async (node) => {
      this.writable();
      let h: Handle | undefined;
      if (fh !== undefined) h = this.pinHandle(ctx, nodeId, fh, 'file');
      try {
        // Owner before mode: a chown clears set-id bits the same request may be setting.
        if (changes.uid !== undefined || changes.gid !== undefined) {
          await this.n.fsChown(
            node.fd,
            changes.uid !== undefined ? this.hostUid(changes.uid) : -1,
            changes.gid !== undefined ? this.hostGid(changes.gid) : -1,
          );
        }
        if (changes.mode !== undefined) {
          if (node.type === S_IFLNK) throw new FsError('EOPNOTSUPP', 'chmod of a symlink');
          await this.n.fsChmod(node.fd, changes.mode & 0o7777);
        }
        if (changes.size !== undefined) {
          checkCount(changes.size, 'size');
          if (node.type === S_IFDIR) throw new FsError('EISDIR', 'truncate of a directory');
          if (node.type !== S_IFREG) throw new FsError('EINVAL', 'truncate of a special file');
          if (h) {
            if (!h.writable) throw new FsError('EBADF', 'handle not open for writing');
            await ftruncateAsync(h.fd, changes.size);
          } else {
            await this.n.fsTruncate(node.fd, changes.size);
          }
        }
        if (changes.atime !== undefined || changes.mtime !== undefined) {
          const t = (v: SetAttr['atime']): [number, number] => (v === undefined ? [0, UTIME_OMIT] : v === 'now' ? [0, UTIME_NOW] : [v.sec, v.nsec]);
          const [as, ans] = t(changes.atime);
          const [ms, mns] = t(changes.mtime);
          if (node.type === S_IFLNK) throw new FsError('EOPNOTSUPP', 'times of a symlink');
          await this.n.fsUtimens(node.fd, as, ans, ms, mns);
        }
        if (changes.killSuidGid && changes.mode === undefined && node.type === S_IFREG) {
          // As the kernel does for an unprivileged write: setuid always, setgid only with group-exec.
          const mode = (await this.n.fsStat(node.fd))[FS_STAT.mode]!;
          const kill = S_ISUID | (mode & S_IXGRP ? S_ISGID : 0);
          if (mode & kill) await this.n.fsChmod(node.fd, mode & 0o7777 & ~kill);
        }
        return { attr: this.attr(await this.n.fsStat(h ? h.fd : node.fd)) };
      } finally {
        if (h) this.unpinHandle(h);
      }
    });
  }

  readlink(ctx: FsContext, nodeId: number): Promise<Buffer> {
    return this.withNode(ctx, nodeId, async (node) => {
      if (node.type !== S_IFLNK) throw new FsError('EINVAL', 'not a symlink');
      return this.n.fsReadlink(node.fd);
    });
  }

  mknod(ctx: FsContext, parent: number, name: Buffer, mode: number, rdev: number): Promise<Entry> {
    const type = mode & S_IFMT || S_IFREG;
    if (type === S_IFCHR || type === S_IFBLK) {
      if (!this.opts.allowDevices) return Promise.reject(new FsError('EPERM', 'device nodes are not allowed on this share'));
    } else if (type !== S_IFREG && type !== S_IFIFO && type !== S_IFSOCK) {
      return Promise.reject(new FsError('EINVAL', 'mknod of this type'));
    }
    const perms = this.perms(ctx, mode);
    return this.createEntry(ctx, parent, name, type, perms, (dfd) => this.n.fsMknodat(dfd, name, type | perms, type === S_IFCHR || type === S_IFBLK ? rdev : 0));
  }

  mkdir(ctx: FsContext, parent: number, name: Buffer, mode: number): Promise<Entry> {
    const perms = this.perms(ctx, mode) & 0o1777;
    return this.createEntry(ctx, parent, name, S_IFDIR, perms, (dfd) => this.n.fsMkdirat(dfd, name, perms));
  }

  symlink(ctx: FsContext, parent: number, name: Buffer, target: Buffer): Promise<Entry> {
    if (!Buffer.isBuffer(target) || target.length === 0 || target.length >= 4096 || target.includes(0)) {
      return Promise.reject(new FsError(target?.length >= 4096 ? 'ENAMETOOLONG' : 'EINVAL', 'bad symlink target'));
    }
    // The target is stored as text only: it is never resolved by the tree.
    return this.createEntry(ctx, parent, name, S_IFLNK, 0o777, (dfd) => this.n.fsSymlinkat(target, dfd, name));
  }

  unlink(ctx: FsContext, parent: number, name: Buffer): Promise<void> {
    return this.withNode(ctx, parent, async (dir) => {
      this.writable();
      checkName(name, false);
      await this.n.fsUnlinkat(dir.fd, name, 0);
    });
  }

  rmdir(ctx: FsContext, parent: number, name: Buffer): Promise<void> {
    return this.withNode(ctx, parent, async (dir) => {
      this.writable();
      checkName(name, false);
      await this.n.fsUnlinkat(dir.fd, name, AT_REMOVEDIR);
    });
  }

  rename(ctx: FsContext, parent: number, name: Buffer, newParent: number, newName: Buffer, flags: number): Promise<void> {
    return this.withNodes(ctx, parent, newParent, async (from, to) => {
      this.writable();
      checkName(name, false);
      checkName(newName, false);
      if (flags !== 0 && flags !== RENAME_NOREPLACE && flags !== RENAME_EXCHANGE) throw new FsError('EINVAL', 'bad rename flags');
      await this.n.fsRenameat2(from.fd, name, to.fd, newName, flags);
    });
  }

  link(ctx: FsContext, nodeId: number, newParent: number, newName: Buffer): Promise<Entry> {
    return this.withNodes(ctx, nodeId, newParent, async (node, dir) => {
      this.writable();
      checkName(newName, false);
      if (node.type === S_IFDIR) throw new FsError('EPERM', 'hard link of a directory');
      await this.n.fsLinkat(node.fd, dir.fd, newName);
      return this.adopt(ctx.session, await this.n.fsOpenat(dir.fd, newName, O_PATH, 0, true));
    });
  }

  open(ctx: FsContext, nodeId: number, flags: number): Promise<OpenResult> {
    return this.withNode(ctx, nodeId, async (node) => {
      const acc = flags & O_ACCMODE;
      if (acc === O_ACCMODE) throw new FsError('EINVAL', 'bad access mode');
      if (acc !== O_RDONLY || flags & O_TRUNC) this.writable();
      if (node.type === S_IFDIR) throw new FsError('EISDIR', 'open of a directory (use opendir)');
      if (node.type === S_IFLNK) throw new FsError('ELOOP', 'open of a symlink');
      // FIFOs, sockets and devices are opened by the guest kernel itself, never through FUSE;
      // opening them here could block a pool thread (a FIFO without writer) or reach a host device.
      if (node.type !== S_IFREG) throw new FsError('ENXIO', 'open of a special file');
      const fd = await this.n.fsReopen(node.fd, flags & OPEN_FLAGS_KEPT);
      return this.newHandle(ctx.session, node, fd, 'file', flags);
    });
  }

  create(ctx: FsContext, parent: number, name: Buffer, mode: number, flags: number): Promise<CreateResult> {
    return this.withNode(ctx, parent, async (dir) => {
      this.writable();
      checkName(name, false);
      if (dir.type !== S_IFDIR) throw new FsError('ENOTDIR', 'parent is not a directory');
      if ((flags & O_ACCMODE) === O_ACCMODE) throw new FsError('EINVAL', 'bad access mode');
      const perms = this.perms(ctx, mode);
      const kept = flags & OPEN_FLAGS_KEPT;
      let fd: number;
      let created = true;
      try {
        fd = await this.n.fsOpenat(dir.fd, name, kept | O_CREAT | O_EXCL, perms);
      } catch (e) {
        if ((e as { code?: string }).code !== 'EEXIST' || flags & O_EXCL) throw e;
        // Someone made it first and the caller did not ask for O_EXCL: open what is there, if
        // it is a regular file. O_NONBLOCK|O_NOCTTY: a FIFO swapped in after the check must not
        // block a pool thread (nor a tty become ours); the type is checked again below.
        const probe = await this.n.fsOpenat(dir.fd, name, O_PATH, 0, true);
        void closeAsync(probe[FS_STAT.value]!).catch(() => {});
        const t = probe[FS_STAT.mode]! & S_IFMT;
        if (t !== S_IFREG) throw new FsError(t === S_IFDIR ? 'EISDIR' : t === S_IFLNK ? 'ELOOP' : 'ENXIO', 'not a regular file');
        fd = await this.n.fsOpenat(dir.fd, name, kept | O_NONBLOCK | O_NOCTTY, 0);
        created = false;
      }
      try {
        // The node is taken from the open file itself, not from the name again: the name may
        // already point elsewhere.
        const pathFd = await this.n.fsReopen(fd, O_PATH);
        let st: Float64Array;
        try {
          st = (created ? await this.finishCreate(ctx, dir, fd, S_IFREG, perms) : undefined) ?? (await this.n.fsStat(pathFd));
          if ((st[FS_STAT.mode]! & S_IFMT) !== S_IFREG) throw new FsError('EISDIR', 'not a regular file');
        } catch (e) {
          void closeAsync(pathFd).catch(() => {});
          throw e;
        }
        st[FS_STAT.value] = pathFd;
        const entry = this.adopt(ctx.session, st);
        const node = this.nodes.get(entry.nodeId)!;
        return { entry, open: this.newHandle(ctx.session, node, fd, 'file', flags) };
      } catch (e) {
        void closeAsync(fd).catch(() => {});
        throw e;
      }
    });
  }

  read(ctx: FsContext, nodeId: number, fh: number, offset: number, size: number): Promise<Buffer> {
    return this.withHandle(ctx, nodeId, fh, 'file', async (h) => {
      checkCount(offset, 'offset');
      checkCount(size, 'size');
      if (!h.readable) throw new FsError('EBADF', 'handle not open for reading');
      if (size > 64 * 1024 * 1024) throw new FsError('EINVAL', 'read too large');
      const buf = Buffer.allocUnsafe(size);
      let done = 0;
      while (done < size) {
        const { bytesRead } = await readAsync(h.fd, buf, done, size - done, offset + done);
        if (bytesRead === 0) break;
        done += bytesRead;
      }
      return buf.subarray(0, done);
    });
  }

  write(ctx: FsContext, nodeId: number, fh: number, offset: number, data: Buffer): Promise<number> {
    return this.withHandle(ctx, nodeId, fh, 'file', async (h) => {
      this.writable();
      checkCount(offset, 'offset');
      if (!h.writable) throw new FsError('EBADF', 'handle not open for writing');
      // With O_APPEND the kernel appends whatever offset pwrite is given.
      let done = 0;
      while (done < data.length) {
        const { bytesWritten } = await writeAsync(h.fd, data, done, data.length - done, offset + done);
        if (bytesWritten === 0) break;
        done += bytesWritten;
      }
      return done;
    });
  }

  flush(ctx: FsContext, nodeId: number, fh: number, lockOwner: bigint): Promise<void> {
    return this.withHandle(ctx, nodeId, fh, 'file', async (h) => {
      this.locks.releaseOwner(h.key, ctx.session, lockOwner);
    });
  }

  release(ctx: FsContext, nodeId: number, fh: number, _lockOwner?: bigint): Promise<void> {
    return this.withHandle(ctx, nodeId, fh, 'file', async (h) => {
      // The handle's flock goes with it whatever the owner: flocks belong to the open file.
      this.dropHandle(h);
    });
  }

  fsync(ctx: FsContext, nodeId: number, fh: number, datasync: boolean): Promise<void> {
    return this.withHandle(ctx, nodeId, fh, 'file', async (h) => {
      await (datasync ? fdatasyncAsync(h.fd) : fsyncAsync(h.fd));
    });
  }

  opendir(ctx: FsContext, nodeId: number, _flags: number): Promise<OpenResult> {
    return this.withNode(ctx, nodeId, async (node) => {
      if (node.type !== S_IFDIR) throw new FsError('ENOTDIR', 'not a directory');
      const fd = await this.n.fsReopen(node.fd, O_RDONLY | O_DIRECTORY);
      return this.newHandle(ctx.session, node, fd, 'dir', O_RDONLY);
    });
  }

  /** The real d_off behind a cookie of this handle. */
  private cookieToOff(d: DirState, cookie: number): bigint {
    checkCount(cookie, 'directory offset');
    if (cookie < DIRECT_COOKIE_LIMIT) return BigInt(cookie);
    const off = d.offs[cookie - DIRECT_COOKIE_LIMIT];
    if (off === undefined) throw new FsError('EINVAL', 'unknown directory offset');
    return off;
  }

  private offToCookie(d: DirState, off: bigint): number {
    if (off >= 0n && off < BigInt(DIRECT_COOKIE_LIMIT)) return Number(off);
    let i = d.index.get(off);
    if (i === undefined) {
      i = d.offs.length;
      d.offs.push(off);
      d.index.set(off, i);
    }
    return DIRECT_COOKIE_LIMIT + i;
  }

  /** Raw entries after `cookie`, at most `max`, one listing call of the handle at a time. */
  private listDir(h: Handle, cookie: number, max: number): Promise<{ raw: RawDirent; cookie: number }[]> {
    const d = h.dir!;
    const run = async () => {
      const out: { raw: RawDirent; cookie: number }[] = [];
      let pos = this.cookieToOff(d, cookie);
      while (out.length < max) {
        const want = Math.min(Math.max((max - out.length) * DIRENT_MAX, 4096), 65536);
        const buf = await this.n.fsGetdents(h.fd, pos, want);
        const ents = parseDirents(buf);
        if (ents.length === 0) break;
        for (const e of ents) {
          if (out.length >= max) break;
          out.push({ raw: e, cookie: this.offToCookie(d, e.off) });
          pos = e.off;
        }
      }
      return out;
    };
    const p = d.tail.then(run, run);
    d.tail = p.catch(() => {});
    return p;
  }

  readdir(ctx: FsContext, nodeId: number, fh: number, offset: number, maxEntries: number): Promise<DirEntry[]> {
    return this.withHandle(ctx, nodeId, fh, 'dir', async (h) => {
      checkCount(maxEntries, 'entry count');
      const list = await this.listDir(h, offset, maxEntries);
      return list.map(({ raw, cookie }) => ({ name: Buffer.from(raw.name), ino: raw.ino, type: raw.type, offset: cookie }));
    });
  }

  readdirplus(ctx: FsContext, nodeId: number, fh: number, offset: number, maxEntries: number): Promise<DirEntryPlus[]> {
    return this.withHandle(ctx, nodeId, fh, 'dir', (h) =>
      this.withNode(ctx, nodeId, async (dir) => {
        checkCount(maxEntries, 'entry count');
        const list = await this.listDir(h, offset, maxEntries);
        const out: DirEntryPlus[] = [];
        for (const { raw, cookie } of list) {
          const name = Buffer.from(raw.name);
          const e: DirEntryPlus = { name, ino: raw.ino, type: raw.type, offset: cookie };
          if (!isDot(name) && !isDotDot(name)) {
            try {
              e.entry = this.adopt(ctx.session, await this.n.fsOpenat(dir.fd, name, O_PATH, 0, true));
            } catch {
              // Removed since it was listed: the entry goes without attributes (nodeid 0).
            }
          }
          out.push(e);
        }
        return out;
      }),
    );
  }

  releasedir(ctx: FsContext, nodeId: number, fh: number): Promise<void> {
    return this.withHandle(ctx, nodeId, fh, 'dir', async (h) => this.dropHandle(h));
  }

  fsyncdir(ctx: FsContext, nodeId: number, fh: number, datasync: boolean): Promise<void> {
    return this.withHandle(ctx, nodeId, fh, 'dir', async (h) => {
      await (datasync ? fdatasyncAsync(h.fd) : fsyncAsync(h.fd));
    });
  }

  statfs(ctx: FsContext, nodeId: number): Promise<StatFs> {
    return this.withNode(ctx, nodeId, async (node) => {
      const s = await this.n.fsStatfs(node.fd);
      return { blocks: s[0]!, bfree: s[1]!, bavail: s[2]!, files: s[3]!, ffree: s[4]!, bsize: s[5]!, namelen: s[6]!, frsize: s[7]! };
    });
  }

  setxattr(ctx: FsContext, nodeId: number, name: Buffer, value: Buffer, flags: number): Promise<void> {
    return this.withNode(ctx, nodeId, async (node) => {
      this.writable();
      if (flags & ~3) throw new FsError('EINVAL', 'bad xattr flags');
      await this.n.fsSetxattr(node.fd, name, value, flags);
    });
  }

  getxattr(ctx: FsContext, nodeId: number, name: Buffer): Promise<Buffer> {
    return this.withNode(ctx, nodeId, (node) => this.n.fsGetxattr(node.fd, name));
  }

  listxattr(ctx: FsContext, nodeId: number): Promise<Buffer> {
    return this.withNode(ctx, nodeId, (node) => this.n.fsListxattr(node.fd));
  }

  removexattr(ctx: FsContext, nodeId: number, name: Buffer): Promise<void> {
    return this.withNode(ctx, nodeId, async (node) => {
      this.writable();
      await this.n.fsRemovexattr(node.fd, name);
    });
  }

  /** See `checkAccess`: the one place the tree checks mode bits. */
  access(ctx: FsContext, nodeId: number, mask: number): Promise<void> {
    return this.withNode(ctx, nodeId, async (node) => checkAccess(ctx, this.attr(await this.n.fsStat(node.fd)), mask, this.readOnly));
  }

  fallocate(ctx: FsContext, nodeId: number, fh: number, mode: number, offset: number, length: number): Promise<void> {
    return this.withHandle(ctx, nodeId, fh, 'file', async (h) => {
      this.writable();
      checkCount(offset, 'offset');
      checkCount(length, 'length');
      if (!h.writable) throw new FsError('EBADF', 'handle not open for writing');
      await this.n.fsFallocate(h.fd, mode, offset, length);
    });
  }

  lseek(ctx: FsContext, nodeId: number, fh: number, offset: number, whence: number): Promise<number> {
    return this.withHandle(ctx, nodeId, fh, 'file', async (h) => {
      if (!Number.isSafeInteger(offset) || whence < 0 || whence > 4) throw new FsError('EINVAL', 'bad lseek');
      return this.n.fsLseek(h.fd, offset, whence);
    });
  }

  copyFileRange(
    ctx: FsContext,
    from: { nodeId: number; fh: number; offset: number },
    to: { nodeId: number; fh: number; offset: number },
    length: number,
    flags: number,
  ): Promise<number> {
    return this.withHandle(ctx, from.nodeId, from.fh, 'file', (src) =>
      this.withHandle(ctx, to.nodeId, to.fh, 'file', async (dst) => {
        this.writable();
        checkCount(from.offset, 'offset');
        checkCount(to.offset, 'offset');
        checkCount(length, 'length');
        if (flags !== 0) throw new FsError('EINVAL', 'copy_file_range flags');
        if (!src.readable || !dst.writable) throw new FsError('EBADF', 'handle mode');
        return this.n.fsCopyFileRange(src.fd, from.offset, dst.fd, to.offset, length, 0);
      }),
    );
  }

  async syncfs(_ctx: FsContext): Promise<void> {
    this.live();
    try {
      await this.n.fsSyncfs(this.rootDirFd);
    } catch (e) {
      throw toFsError(e);
    }
  }

  getlk(ctx: FsContext, nodeId: number, fh: number, owner: bigint, lock: FileLock): Promise<FileLock> {
    return this.withHandle(ctx, nodeId, fh, 'file', async (h) => this.locks.getlk(h.key, { session: ctx.session, owner, pid: lock.pid }, lock));
  }

  setlk(
    ctx: FsContext,
    nodeId: number,
    fh: number,
    owner: bigint,
    lock: FileLock,
    opts: { wait: boolean; flock: boolean; signal?: AbortSignal },
  ): Promise<void> {
    return this.withHandle(ctx, nodeId, fh, 'file', async (h) => {
      if (opts.flock) return this.locks.flock(h.key, ctx.session, h.fh, lock.type, { wait: opts.wait, signal: opts.signal });
      // fcntl(2): a read lock needs a handle open for reading, a write lock one open for writing.
      if ((lock.type === F_RDLCK && !h.readable) || (lock.type === F_WRLCK && !h.writable)) throw new FsError('EBADF', 'lock type does not match the open mode');
      if (lock.type !== F_RDLCK && lock.type !== F_WRLCK && lock.type !== F_UNLCK) throw new FsError('EINVAL', 'bad lock type');
      return this.locks.setlk(h.key, { session: ctx.session, owner, pid: lock.pid }, lock, { wait: opts.wait, signal: opts.signal });
    });
  }

  async endSession(session: string): Promise<void> {
    for (const h of [...this.handles.values()]) if (h.session === session) this.dropHandle(h);
    for (const node of [...this.nodes.values()]) {
      if (node.lookups.delete(session) && node.lookups.size === 0) this.drop(node);
    }
    this.locks.endSession(session);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const h of [...this.handles.values()]) this.dropHandle(h);
    for (const node of [...this.nodes.values()]) this.drop(node);
    if (this.root.pins === 0) await closeAsync(this.root.fd).catch(() => {});
    else this.root.dropped = true;
    await closeAsync(this.rootDirFd).catch(() => {});
    this.locks.clear();
  }
}
