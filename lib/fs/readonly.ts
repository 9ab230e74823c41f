/**
 * `ReadOnlyFileTree`: every mutation answers EROFS before it reaches the tree below, as a
 * read-only mount would: setattr, the creating and removing calls, rename, link, write, xattr
 * changes, fallocate, copy_file_range, an open for writing or with O_TRUNC, and access(W_OK).
 * Reads, listings, fsync and locks pass (a lock changes no data). Used on the host for a share
 * configured `readOnly` and on the node for a session attached read-only, so either side alone
 * keeps the data unchanged.
 */
import { constants } from 'node:fs';
import { FsError } from './errors.js';
import { FileTreeLayer } from './layer.js';
import type { Attr, CreateResult, Entry, FsContext, OpenResult, SetAttr } from './tree.js';

const W_OK = 2;
/** Not in @types/node's fs.constants. */
const O_ACCMODE = 3;

function erofs(what: string): never {
  throw new FsError('EROFS', `${what}: read-only share`);
}

export class ReadOnlyFileTree extends FileTreeLayer {
  override setattr(_ctx: FsContext, _n: number, _c: SetAttr): Promise<{ attr: Attr; attrTtlMs?: number }> {
    return Promise.reject(new FsError('EROFS', 'setattr: read-only share'));
  }
  override async mknod(): Promise<Entry> {
    return erofs('mknod');
  }
  override async mkdir(): Promise<Entry> {
    return erofs('mkdir');
  }
  override async symlink(): Promise<Entry> {
    return erofs('symlink');
  }
  override async unlink(): Promise<void> {
    return erofs('unlink');
  }
  override async rmdir(): Promise<void> {
    return erofs('rmdir');
  }
  override async rename(): Promise<void> {
    return erofs('rename');
  }
  override async link(): Promise<Entry> {
    return erofs('link');
  }
  override async create(): Promise<CreateResult> {
    return erofs('create');
  }
  override async write(): Promise<number> {
    return erofs('write');
  }
  override async setxattr(): Promise<void> {
    return erofs('setxattr');
  }
  override async removexattr(): Promise<void> {
    return erofs('removexattr');
  }
  override async fallocate(): Promise<void> {
    return erofs('fallocate');
  }
  override async copyFileRange(): Promise<number> {
    return erofs('copy_file_range');
  }
  override open(ctx: FsContext, nodeId: number, flags: number): Promise<OpenResult> {
    if ((flags & O_ACCMODE) !== constants.O_RDONLY || flags & constants.O_TRUNC) return Promise.reject(new FsError('EROFS', 'open for writing: read-only share'));
    return super.open(ctx, nodeId, flags);
  }
  override access(ctx: FsContext, nodeId: number, mask: number): Promise<void> {
    if (mask & W_OK) return Promise.reject(new FsError('EROFS', 'access(W_OK): read-only share'));
    return super.access(ctx, nodeId, mask);
  }
}
