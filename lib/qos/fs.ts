/**
 * QosFileTree: a VM share's entry into the host-wide scheduler, as QosVolume is a disk's. Each
 * FileTree call is submitted to the VM's flow and runs on the tree below when dispatched, so a
 * VM's disks and shares draw on one allocation (reservation, limit, weight, priority) and the
 * VM's QoS status and metrics count both.
 *
 * Cost: READ by the bytes asked for (the reply may be shorter at end of file: the cost is
 * decided before dispatch), WRITE by its payload, COPY_FILE_RANGE by its length (counted as a
 * write: the bytes land in the destination); every other call is one request without bytes
 * (lookup, getattr, create, readdir, fsync, ... — metadata work, as flush and trim on a disk).
 *
 * What holds no device slot while it waits (a slot is held from dispatch to completion, and
 * `qos.depth` slots are shared by every VM of the host):
 * - SETLKW (setlk with `wait`) can wait for another session's unlock forever. Held in a slot, a
 *   few such waits would stall the whole host (not only this VM); and the unlock it waits for
 *   may itself be queued behind them. So a waiting lock is *admitted* through the flow — an
 *   empty request that pays one request of the VM's allocation and leaves its slot at once —
 *   and then waits on the tree outside the scheduler. The lock call proper is small (a lock
 *   table in memory, or one RPC to a storage node), so running it outside the depth bound is
 *   the lesser cost. An INTERRUPT aborts the wait below as before (EINTR); one arriving while
 *   the lock waits for admission is seen by the tree right after (its signal is aborted).
 * - forget (synchronous, and the kernel's bookkeeping must never be delayed), endSession and
 *   close (the end of a session or of the share: a limit must not hold them back) pass through.
 *
 * `flow` may be unset and set later: a share taken over from another daemon process is served
 * before the registry has the VM's flow (lib/daemon/daemon.ts binds it when the VM is added);
 * without a flow every call passes straight through.
 */
import { FileTreeLayer } from '../fs/layer.js';
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
} from '../fs/tree.js';
import { OpKind, type QosFlow } from './scheduler.js';

const admitted = (): Promise<void> => Promise.resolve();

export class QosFileTree extends FileTreeLayer {
  constructor(
    inner: FileTree,
    /** The VM's flow; undefined: not bound yet, calls pass through. */
    public flow?: QosFlow,
  ) {
    super(inner);
  }

  /** One request without bytes. */
  private small<T>(fn: () => Promise<T>): Promise<T> {
    return this.sized(OpKind.Other, 0, fn);
  }

  private sized<T>(kind: OpKind, bytes: number, fn: () => Promise<T>): Promise<T> {
    const f = this.flow;
    return f ? f.submit(kind, bytes, fn) : fn();
  }

  // Data: cost by bytes.
  override read(ctx: FsContext, nodeId: number, fh: number, offset: number, size: number): Promise<Buffer> {
    return this.sized(OpKind.Read, size, () => this.inner.read(ctx, nodeId, fh, offset, size));
  }
  override write(ctx: FsContext, nodeId: number, fh: number, offset: number, data: Buffer): Promise<number> {
    return this.sized(OpKind.Write, data.length, () => this.inner.write(ctx, nodeId, fh, offset, data));
  }
  override copyFileRange(
    ctx: FsContext,
    from: { nodeId: number; fh: number; offset: number },
    to: { nodeId: number; fh: number; offset: number },
    length: number,
    flags: number,
  ): Promise<number> {
    return this.sized(OpKind.Write, length, () => this.inner.copyFileRange(ctx, from, to, length, flags));
  }

  // Locks: a waiting one is admitted, then waits outside the scheduler (see the header).
  override async setlk(
    ctx: FsContext,
    nodeId: number,
    fh: number,
    owner: bigint,
    lock: FileLock,
    opts: { wait: boolean; flock: boolean; signal?: AbortSignal },
  ): Promise<void> {
    if (!opts.wait) return this.small(() => this.inner.setlk(ctx, nodeId, fh, owner, lock, opts));
    const f = this.flow;
    if (f) await f.submit(OpKind.Other, 0, admitted);
    return this.inner.setlk(ctx, nodeId, fh, owner, lock, opts);
  }
  override getlk(ctx: FsContext, nodeId: number, fh: number, owner: bigint, lock: FileLock): Promise<FileLock> {
    return this.small(() => this.inner.getlk(ctx, nodeId, fh, owner, lock));
  }

  // Not scheduled (see the header): inherited pass-through of forget, endSession, close.

  // Everything else: one small request each.
  override lookup(ctx: FsContext, parent: number, name: Buffer): Promise<Entry> {
    return this.small(() => this.inner.lookup(ctx, parent, name));
  }
  override getattr(ctx: FsContext, nodeId: number, fh?: number): Promise<{ attr: Attr; attrTtlMs?: number }> {
    return this.small(() => this.inner.getattr(ctx, nodeId, fh));
  }
  override setattr(ctx: FsContext, nodeId: number, changes: SetAttr, fh?: number): Promise<{ attr: Attr; attrTtlMs?: number }> {
    return this.small(() => this.inner.setattr(ctx, nodeId, changes, fh));
  }
  override readlink(ctx: FsContext, nodeId: number): Promise<Buffer> {
    return this.small(() => this.inner.readlink(ctx, nodeId));
  }
  override mknod(ctx: FsContext, parent: number, name: Buffer, mode: number, rdev: number): Promise<Entry> {
    return this.small(() => this.inner.mknod(ctx, parent, name, mode, rdev));
  }
  override mkdir(ctx: FsContext, parent: number, name: Buffer, mode: number): Promise<Entry> {
    return this.small(() => this.inner.mkdir(ctx, parent, name, mode));
  }
  override symlink(ctx: FsContext, parent: number, name: Buffer, target: Buffer): Promise<Entry> {
    return this.small(() => this.inner.symlink(ctx, parent, name, target));
  }
  override unlink(ctx: FsContext, parent: number, name: Buffer): Promise<void> {
    return this.small(() => this.inner.unlink(ctx, parent, name));
  }
  override rmdir(ctx: FsContext, parent: number, name: Buffer): Promise<void> {
    return this.small(() => this.inner.rmdir(ctx, parent, name));
  }
  override rename(ctx: FsContext, parent: number, name: Buffer, newParent: number, newName: Buffer, flags: number): Promise<void> {
    return this.small(() => this.inner.rename(ctx, parent, name, newParent, newName, flags));
  }
  override link(ctx: FsContext, nodeId: number, newParent: number, newName: Buffer): Promise<Entry> {
    return this.small(() => this.inner.link(ctx, nodeId, newParent, newName));
  }
  override open(ctx: FsContext, nodeId: number, flags: number): Promise<OpenResult> {
    return this.small(() => this.inner.open(ctx, nodeId, flags));
  }
  override create(ctx: FsContext, parent: number, name: Buffer, mode: number, flags: number): Promise<CreateResult> {
    return this.small(() => this.inner.create(ctx, parent, name, mode, flags));
  }
  override flush(ctx: FsContext, nodeId: number, fh: number, lockOwner: bigint): Promise<void> {
    return this.small(() => this.inner.flush(ctx, nodeId, fh, lockOwner));
  }
  override release(ctx: FsContext, nodeId: number, fh: number, lockOwner?: bigint): Promise<void> {
    return this.small(() => this.inner.release(ctx, nodeId, fh, lockOwner));
  }
  override fsync(ctx: FsContext, nodeId: number, fh: number, datasync: boolean): Promise<void> {
    return this.small(() => this.inner.fsync(ctx, nodeId, fh, datasync));
  }
  override opendir(ctx: FsContext, nodeId: number, flags: number): Promise<OpenResult> {
    return this.small(() => this.inner.opendir(ctx, nodeId, flags));
  }
  override readdir(ctx: FsContext, nodeId: number, fh: number, offset: number, maxEntries: number): Promise<DirEntry[]> {
    return this.small(() => this.inner.readdir(ctx, nodeId, fh, offset, maxEntries));
  }
  override readdirplus(ctx: FsContext, nodeId: number, fh: number, offset: number, maxEntries: number): Promise<DirEntryPlus[]> {
    return this.small(() => this.inner.readdirplus(ctx, nodeId, fh, offset, maxEntries));
  }
  override releasedir(ctx: FsContext, nodeId: number, fh: number): Promise<void> {
    return this.small(() => this.inner.releasedir(ctx, nodeId, fh));
  }
  override fsyncdir(ctx: FsContext, nodeId: number, fh: number, datasync: boolean): Promise<void> {
    return this.small(() => this.inner.fsyncdir(ctx, nodeId, fh, datasync));
  }
  override statfs(ctx: FsContext, nodeId: number): Promise<StatFs> {
    return this.small(() => this.inner.statfs(ctx, nodeId));
  }
  override setxattr(ctx: FsContext, nodeId: number, name: Buffer, value: Buffer, flags: number): Promise<void> {
    return this.small(() => this.inner.setxattr(ctx, nodeId, name, value, flags));
  }
  override getxattr(ctx: FsContext, nodeId: number, name: Buffer): Promise<Buffer> {
    return this.small(() => this.inner.getxattr(ctx, nodeId, name));
  }
  override listxattr(ctx: FsContext, nodeId: number): Promise<Buffer> {
    return this.small(() => this.inner.listxattr(ctx, nodeId));
  }
  override removexattr(ctx: FsContext, nodeId: number, name: Buffer): Promise<void> {
    return this.small(() => this.inner.removexattr(ctx, nodeId, name));
  }
  override access(ctx: FsContext, nodeId: number, mask: number): Promise<void> {
    return this.small(() => this.inner.access(ctx, nodeId, mask));
  }
  override fallocate(ctx: FsContext, nodeId: number, fh: number, mode: number, offset: number, length: number): Promise<void> {
    return this.small(() => this.inner.fallocate(ctx, nodeId, fh, mode, offset, length));
  }
  override lseek(ctx: FsContext, nodeId: number, fh: number, offset: number, whence: number): Promise<number> {
    return this.small(() => this.inner.lseek(ctx, nodeId, fh, offset, whence));
  }
  override syncfs(ctx: FsContext): Promise<void> {
    return this.small(() => this.inner.syncfs(ctx));
  }
}
