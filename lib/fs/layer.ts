/**
 * `FileTreeLayer`: the forwarding base of FileTree layers (as VolumeLayer is for volumes and an
 * nbdkit filter for a plugin). Every call goes to `inner` unchanged; a layer overrides what it
 * changes. Two hooks cover the layers that translate identities (lib/fs/idmap.ts): `mapCtx` on
 * the way down and `mapAttr` on every attribute on the way up; both are the identity here.
 */
import type {
  Attr,
  CreateResult,
  DirEntry,
  DirEntryPlus,
  Entry,
  FileLock,
  FileTree,
  FsContext,
  OpenResult,
  SetAttr,
  StatFs,
} from './tree.js';

/** FileTree.forget with the optional session some trees take (LocalFileTree). */
export type SessionForget = (nodeId: number, nlookup: number, session?: string) => void;

export class FileTreeLayer implements FileTree {
  constructor(protected readonly inner: FileTree) {}

  /** The caller as the inner tree sees it. */
  protected mapCtx(ctx: FsContext): FsContext {
    return ctx;
  }

  /** An attribute as the caller sees it (changed in place or replaced). */
  protected mapAttr(attr: Attr): Attr {
    return attr;
  }

  protected mapEntry(e: Entry): Entry {
    const attr = this.mapAttr(e.attr);
    return attr === e.attr ? e : { ...e, attr };
  }

  async lookup(ctx: FsContext, parent: number, name: Buffer): Promise<Entry> {
    return this.mapEntry(await this.inner.lookup(this.mapCtx(ctx), parent, name));
  }
  /** `session`: LocalFileTree's additive parameter (whose count to subtract), passed through. */
  forget(nodeId: number, nlookup: number, session?: string): void {
    (this.inner.forget as SessionForget).call(this.inner, nodeId, nlookup, session);
  }
  async getattr(ctx: FsContext, nodeId: number, fh?: number): Promise<{ attr: Attr; attrTtlMs?: number }> {
    const r = await this.inner.getattr(this.mapCtx(ctx), nodeId, fh);
    return { ...r, attr: this.mapAttr(r.attr) };
  }
  async setattr(ctx: FsContext, nodeId: number, changes: SetAttr, fh?: number): Promise<{ attr: Attr; attrTtlMs?: number }> {
    const r = await this.inner.setattr(this.mapCtx(ctx), nodeId, changes, fh);
    return { ...r, attr: this.mapAttr(r.attr) };
  }
  readlink(ctx: FsContext, nodeId: number): Promise<Buffer> {
    return this.inner.readlink(this.mapCtx(ctx), nodeId);
  }
  async mknod(ctx: FsContext, parent: number, name: Buffer, mode: number, rdev: number): Promise<Entry> {
    return this.mapEntry(await this.inner.mknod(this.mapCtx(ctx), parent, name, mode, rdev));
  }
  async mkdir(ctx: FsContext, parent: number, name: Buffer, mode: number): Promise<Entry> {
    return this.mapEntry(await this.inner.mkdir(this.mapCtx(ctx), parent, name, mode));
  }
  async symlink(ctx: FsContext, parent: number, name: Buffer, target: Buffer): Promise<Entry> {
    return this.mapEntry(await this.inner.symlink(this.mapCtx(ctx), parent, name, target));
  }
  unlink(ctx: FsContext, parent: number, name: Buffer): Promise<void> {
    return this.inner.unlink(this.mapCtx(ctx), parent, name);
  }
  rmdir(ctx: FsContext, parent: number, name: Buffer): Promise<void> {
    return this.inner.rmdir(this.mapCtx(ctx), parent, name);
  }
  rename(ctx: FsContext, parent: number, name: Buffer, newParent: number, newName: Buffer, flags: number): Promise<void> {
    return this.inner.rename(this.mapCtx(ctx), parent, name, newParent, newName, flags);
  }
  async link(ctx: FsContext, nodeId: number, newParent: number, newName: Buffer): Promise<Entry> {
    return this.mapEntry(await this.inner.link(this.mapCtx(ctx), nodeId, newParent, newName));
  }
  open(ctx: FsContext, nodeId: number, flags: number): Promise<OpenResult> {
    return this.inner.open(this.mapCtx(ctx), nodeId, flags);
  }
  async create(ctx: FsContext, parent: number, name: Buffer, mode: number, flags: number): Promise<CreateResult> {
    const r = await this.inner.create(this.mapCtx(ctx), parent, name, mode, flags);
    return { ...r, entry: this.mapEntry(r.entry) };
  }
  read(ctx: FsContext, nodeId: number, fh: number, offset: number, size: number): Promise<Buffer> {
    return this.inner.read(this.mapCtx(ctx), nodeId, fh, offset, size);
  }
  write(ctx: FsContext, nodeId: number, fh: number, offset: number, data: Buffer): Promise<number> {
    return this.inner.write(this.mapCtx(ctx), nodeId, fh, offset, data);
  }
  flush(ctx: FsContext, nodeId: number, fh: number, lockOwner: bigint): Promise<void> {
    return this.inner.flush(this.mapCtx(ctx), nodeId, fh, lockOwner);
  }
  release(ctx: FsContext, nodeId: number, fh: number, lockOwner?: bigint): Promise<void> {
    return this.inner.release(this.mapCtx(ctx), nodeId, fh, lockOwner);
  }
  fsync(ctx: FsContext, nodeId: number, fh: number, datasync: boolean): Promise<void> {
    return this.inner.fsync(this.mapCtx(ctx), nodeId, fh, datasync);
  }
  opendir(ctx: FsContext, nodeId: number, flags: number): Promise<OpenResult> {
    return this.inner.opendir(this.mapCtx(ctx), nodeId, flags);
  }
  readdir(ctx: FsContext, nodeId: number, fh: number, offset: number, maxEntries: number): Promise<DirEntry[]> {
    return this.inner.readdir(this.mapCtx(ctx), nodeId, fh, offset, maxEntries);
  }
  async readdirplus(ctx: FsContext, nodeId: number, fh: number, offset: number, maxEntries: number): Promise<DirEntryPlus[]> {
    const list = await this.inner.readdirplus(this.mapCtx(ctx), nodeId, fh, offset, maxEntries);
    return list.map((d) => (d.entry ? { ...d, entry: this.mapEntry(d.entry) } : d));
  }
  releasedir(ctx: FsContext, nodeId: number, fh: number): Promise<void> {
    return this.inner.releasedir(this.mapCtx(ctx), nodeId, fh);
  }
  fsyncdir(ctx: FsContext, nodeId: number, fh: number, datasync: boolean): Promise<void> {
    return this.inner.fsyncdir(this.mapCtx(ctx), nodeId, fh, datasync);
  }
  statfs(ctx: FsContext, nodeId: number): Promise<StatFs> {
    return this.inner.statfs(this.mapCtx(ctx), nodeId);
  }
  setxattr(ctx: FsContext, nodeId: number, name: Buffer, value: Buffer, flags: number): Promise<void> {
    return this.inner.setxattr(this.mapCtx(ctx), nodeId, name, value, flags);
  }
  getxattr(ctx: FsContext, nodeId: number, name: Buffer): Promise<Buffer> {
    return this.inner.getxattr(this.mapCtx(ctx), nodeId, name);
  }
  listxattr(ctx: FsContext, nodeId: number): Promise<Buffer> {
    return this.inner.listxattr(this.mapCtx(ctx), nodeId);
  }
  removexattr(ctx: FsContext, nodeId: number, name: Buffer): Promise<void> {
    return this.inner.removexattr(this.mapCtx(ctx), nodeId, name);
  }
  access(ctx: FsContext, nodeId: number, mask: number): Promise<void> {
    return this.inner.access(this.mapCtx(ctx), nodeId, mask);
  }
  fallocate(ctx: FsContext, nodeId: number, fh: number, mode: number, offset: number, length: number): Promise<void> {
    return this.inner.fallocate(this.mapCtx(ctx), nodeId, fh, mode, offset, length);
  }
  lseek(ctx: FsContext, nodeId: number, fh: number, offset: number, whence: number): Promise<number> {
    return this.inner.lseek(this.mapCtx(ctx), nodeId, fh, offset, whence);
  }
  copyFileRange(
    ctx: FsContext,
    from: { nodeId: number; fh: number; offset: number },
    to: { nodeId: number; fh: number; offset: number },
    length: number,
    flags: number,
  ): Promise<number> {
    return this.inner.copyFileRange(this.mapCtx(ctx), from, to, length, flags);
  }
  syncfs(ctx: FsContext): Promise<void> {
    return this.inner.syncfs(this.mapCtx(ctx));
  }
  getlk(ctx: FsContext, nodeId: number, fh: number, owner: bigint, lock: FileLock): Promise<FileLock> {
    return this.inner.getlk(this.mapCtx(ctx), nodeId, fh, owner, lock);
  }
  setlk(
    ctx: FsContext,
    nodeId: number,
    fh: number,
    owner: bigint,
    lock: FileLock,
    opts: { wait: boolean; flock: boolean; signal?: AbortSignal },
  ): Promise<void> {
    return this.inner.setlk(this.mapCtx(ctx), nodeId, fh, owner, lock, opts);
  }
  endSession(session: string): Promise<void> {
    return this.inner.endSession(session);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}
