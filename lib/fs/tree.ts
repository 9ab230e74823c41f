/**
 * The file data plane's one interface: the FUSE operation set on node ids and handles.
 * A share is a stack of FileTrees, as a disk is a stack of Volumes: the FUSE engine
 * (lib/fuse/engine.ts) turns wire messages into these calls for virtiofs and the host mount;
 * `LocalFileTree` (lib/fs/local.ts) serves a directory confined to its root, on a storage node
 * or in a test; the node's directory RPC (lib/node/dirs.ts) exposes a FileTree to host daemons,
 * where `RemoteFileTree` (lib/fs/remote.ts) speaks it and a cache layer sits in front.
 *
 * Contract:
 * - Names are bytes (`Buffer`): Linux names need not be UTF-8. The edge (the FUSE codec) has
 *   checked that a name is 1..255 bytes with no '/' and no NUL and is not "." or ".." where the
 *   operation creates or removes it; a tree still refuses such names (EINVAL) as defence in depth.
 * - Node ids and handles come from the tree: `ROOT_ID` is the root, every other id was returned
 *   by `lookup` (or an operation that counts as one: mknod, mkdir, symlink, link, create,
 *   readdirplus entries). A tree answers an id or handle it did not hand out, or has forgotten,
 *   with EBADF (handles) or ENOENT/ESTALE (ids), never with another object.
 * - Errors are `FsError` (lib/fs/errors.ts) carrying a Linux errno; the engine sends its
 *   negative value.
 * - Every call carries the requesting `FsContext`; a tree applies its credential policy
 *   (ownership of new files, permission checks, uid/gid mapping, read-only) from it.
 * - Times are seconds + nanoseconds since the epoch.
 */

/** The root directory's node id (FUSE_ROOT_ID). */
export const ROOT_ID = 1;

export interface Timespec {
  sec: number;
  nsec: number;
}

/** struct fuse_attr without the padding. */
export interface Attr {
  ino: number;
  size: number;
  /** 512-byte blocks allocated. */
  blocks: number;
  atime: Timespec;
  mtime: Timespec;
  ctime: Timespec;
  /** File type and permission bits (S_IFMT | 07777). */
  mode: number;
  nlink: number;
  uid: number;
  gid: number;
  rdev: number;
  blksize: number;
}

/** An answer that names a node: the engine's fuse_entry_out. */
export interface Entry {
  nodeId: number;
  generation: number;
  attr: Attr;
  /** How long the guest may cache the name -> node binding and the attributes (the engine has defaults). */
  entryTtlMs?: number;
  attrTtlMs?: number;
}

/** Who asks (fuse_in_header's uid, gid, pid) and the session it came from. */
export interface FsContext {
  uid: number;
  gid: number;
  pid: number;
  /** The umask of the calling process when the kernel sends it (create/mkdir/mknod with DONT_MASK unset). */
  umask?: number;
  /** Identifies the client (one virtiofs connection, one host mount, one remote host): locks are per session. */
  session: string;
}

/** fuse_setattr_in's valid fields; absent fields do not change. `'now'` is UTIME_NOW. */
export interface SetAttr {
  mode?: number;
  uid?: number;
  gid?: number;
  size?: number;
  atime?: Timespec | 'now';
  mtime?: Timespec | 'now';
  ctime?: Timespec;
  /** FATTR_KILL_SUIDGID: clear setuid/setgid as a write by an unprivileged process would. */
  killSuidGid?: boolean;
}

export interface OpenResult {
  fh: number;
  /** FOPEN_DIRECT_IO: bypass the guest page cache for this file. */
  directIo?: boolean;
  /** FOPEN_KEEP_CACHE: the guest may keep cached data from an earlier open. */
  keepCache?: boolean;
}

export interface CreateResult {
  entry: Entry;
  open: OpenResult;
}

/** One directory entry; `offset` is the cookie that continues the listing after this entry. */
export interface DirEntry {
  name: Buffer;
  ino: number;
  /** DT_* type (the S_IFMT bits >> 12). */
  type: number;
  offset: number;
}

/** A readdirplus entry: looked up (counts as a lookup of `entry.nodeId`) unless it is "." or "..". */
export interface DirEntryPlus extends DirEntry {
  entry?: Entry;
}

/** struct fuse_kstatfs without the padding. */
export interface StatFs {
  blocks: number;
  bfree: number;
  bavail: number;
  files: number;
  ffree: number;
  bsize: number;
  namelen: number;
  frsize: number;
}

/** A POSIX record lock (fuse_file_lock); `end` is inclusive, `Number.MAX_SAFE_INTEGER` means to EOF. */
export interface FileLock {
  start: number;
  end: number;
  /** F_RDLCK 0, F_WRLCK 1, F_UNLCK 2. */
  type: number;
  pid: number;
}

export const F_RDLCK = 0;
export const F_WRLCK = 1;
export const F_UNLCK = 2;

/** RENAME_NOREPLACE / RENAME_EXCHANGE (renameat2 flags). */
export const RENAME_NOREPLACE = 1;
export const RENAME_EXCHANGE = 2;

export interface FileTree {
  /** Node ids of entries returned by lookup-like calls are counted; forget subtracts `nlookup`. */
  lookup(ctx: FsContext, parent: number, name: Buffer): Promise<Entry>;
  forget(nodeId: number, nlookup: number): void;
  getattr(ctx: FsContext, nodeId: number, fh?: number): Promise<{ attr: Attr; attrTtlMs?: number }>;
  setattr(ctx: FsContext, nodeId: number, changes: SetAttr, fh?: number): Promise<{ attr: Attr; attrTtlMs?: number }>;
  readlink(ctx: FsContext, nodeId: number): Promise<Buffer>;
  mknod(ctx: FsContext, parent: number, name: Buffer, mode: number, rdev: number): Promise<Entry>;
  mkdir(ctx: FsContext, parent: number, name: Buffer, mode: number): Promise<Entry>;
  symlink(ctx: FsContext, parent: number, name: Buffer, target: Buffer): Promise<Entry>;
  unlink(ctx: FsContext, parent: number, name: Buffer): Promise<void>;
  rmdir(ctx: FsContext, parent: number, name: Buffer): Promise<void>;
  /** `flags`: 0, RENAME_NOREPLACE or RENAME_EXCHANGE. */
  rename(ctx: FsContext, parent: number, name: Buffer, newParent: number, newName: Buffer, flags: number): Promise<void>;
  link(ctx: FsContext, nodeId: number, newParent: number, newName: Buffer): Promise<Entry>;
  /** `flags`: the open(2) flags (O_ACCMODE, O_APPEND, O_TRUNC, ...). */
  open(ctx: FsContext, nodeId: number, flags: number): Promise<OpenResult>;
  create(ctx: FsContext, parent: number, name: Buffer, mode: number, flags: number): Promise<CreateResult>;
  /** Up to `size` bytes at `offset` (fewer at end of file). */
  read(ctx: FsContext, nodeId: number, fh: number, offset: number, size: number): Promise<Buffer>;
  /** Writes `data` at `offset` (at the end of file when the handle was opened O_APPEND); bytes written. */
  write(ctx: FsContext, nodeId: number, fh: number, offset: number, data: Buffer): Promise<number>;
  /** close(2) of one file descriptor of the handle: releases the POSIX locks of `lockOwner`. */
  flush(ctx: FsContext, nodeId: number, fh: number, lockOwner: bigint): Promise<void>;
  /** The last reference to the handle is gone; `lockOwner` (when set) also drops its flock. */
  release(ctx: FsContext, nodeId: number, fh: number, lockOwner?: bigint): Promise<void>;
  fsync(ctx: FsContext, nodeId: number, fh: number, datasync: boolean): Promise<void>;
  opendir(ctx: FsContext, nodeId: number, flags: number): Promise<OpenResult>;
  /** Entries after cookie `offset` (0: from the start), at most `maxEntries` of them. */
  readdir(ctx: FsContext, nodeId: number, fh: number, offset: number, maxEntries: number): Promise<DirEntry[]>;
  readdirplus(ctx: FsContext, nodeId: number, fh: number, offset: number, maxEntries: number): Promise<DirEntryPlus[]>;
  releasedir(ctx: FsContext, nodeId: number, fh: number): Promise<void>;
  fsyncdir(ctx: FsContext, nodeId: number, fh: number, datasync: boolean): Promise<void>;
  statfs(ctx: FsContext, nodeId: number): Promise<StatFs>;
  /** `flags`: XATTR_CREATE 1, XATTR_REPLACE 2. */
  setxattr(ctx: FsContext, nodeId: number, name: Buffer, value: Buffer, flags: number): Promise<void>;
  getxattr(ctx: FsContext, nodeId: number, name: Buffer): Promise<Buffer>;
  /** NUL-separated names, as listxattr(2) returns them. */
  listxattr(ctx: FsContext, nodeId: number): Promise<Buffer>;
  removexattr(ctx: FsContext, nodeId: number, name: Buffer): Promise<void>;
  /** `mask`: F_OK 0 or R_OK 4 | W_OK 2 | X_OK 1. */
  access(ctx: FsContext, nodeId: number, mask: number): Promise<void>;
  /** `mode`: fallocate(2) mode bits (0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE). */
  fallocate(ctx: FsContext, nodeId: number, fh: number, mode: number, offset: number, length: number): Promise<void>;
  /** SEEK_DATA 3 / SEEK_HOLE 4 (and SEEK_SET/CUR/END); the resulting offset. */
  lseek(ctx: FsContext, nodeId: number, fh: number, offset: number, whence: number): Promise<number>;
  copyFileRange(
    ctx: FsContext,
    from: { nodeId: number; fh: number; offset: number },
    to: { nodeId: number; fh: number; offset: number },
    length: number,
    flags: number,
  ): Promise<number>;
  syncfs(ctx: FsContext): Promise<void>;
  /** The first lock that would conflict with `lock` held by `owner`, or a lock of type F_UNLCK. */
  getlk(ctx: FsContext, nodeId: number, fh: number, owner: bigint, lock: FileLock): Promise<FileLock>;
  /**
   * Takes or releases a POSIX record lock (`flock`: a BSD flock on the whole file instead).
   * `wait` (SETLKW): resolves when granted; `signal` aborts the wait with EINTR (FUSE_INTERRUPT).
   * Without `wait` a conflict fails with EAGAIN.
   */
  setlk(
    ctx: FsContext,
    nodeId: number,
    fh: number,
    owner: bigint,
    lock: FileLock,
    opts: { wait: boolean; flock: boolean; signal?: AbortSignal },
  ): Promise<void>;
  /** The session ended (DESTROY, device reset, client gone): drop its handles, locks and lookups. */
  endSession(session: string): Promise<void>;
  /** Releases everything (the share is removed or the daemon stops). */
  close(): Promise<void>;
}
