/**
 * The C++ addon (native/), loaded once. It does only what JavaScript cannot: here, SEEK_DATA /
 * SEEK_HOLE and fallocate for sparse files, and the size of block devices. Built by
 * `scripts/setup.sh` (node-gyp, from source).
 */
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

export interface NativeAddon {
  /** lseek(fd, offset, SEEK_DATA): next data offset at or after `offset`, or -1 when there is none (ENXIO). */
  seekData(fd: number, offset: number): number;
  /** lseek(fd, offset, SEEK_HOLE): next hole offset at or after `offset` (the file size counts as a hole), or -1 (ENXIO). */
  seekHole(fd: number, offset: number): number;
  /** fallocate(fd, FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE, offset, length) on the thread pool. */
  punchHole(fd: number, offset: number, length: number): Promise<void>;
  /** fallocate(fd, FALLOC_FL_ZERO_RANGE|FALLOC_FL_KEEP_SIZE, offset, length) on the thread pool. */
  zeroRange(fd: number, offset: number, length: number): Promise<void>;
  /**
   * preadv2(RWF_NOWAIT) into `buf` on the calling thread: bytes read when the page cache could
   * serve it without blocking, -1 when it would block (then read through the thread pool).
   */
  readNowait(fd: number, buf: Uint8Array, offset: number): number;
  /** pwritev2(RWF_NOWAIT): bytes written, or -1 when it would block or the filesystem cannot (ext4 buffered writes). */
  writeNowait(fd: number, buf: Uint8Array, offset: number): number;
  /**
   * setsockopt SO_SNDBUF/SO_RCVBUF (0 leaves one as it is); the kernel caps them at
   * net.core.wmem_max/rmem_max. Returns the send buffer size granted.
   */
  setSocketBuffers(fd: number, sendBytes: number, receiveBytes: number): number;
  /** Size in bytes of a block device (BLKGETSIZE64). */
  blockDeviceSize(fd: number): number;

  // vhost-user plumbing (native/src/vhost.cc); policy lives in lib/vhost/.
  /** A non-blocking listening unix stream socket bound to `path`. */
  unixListen(path: string, backlog?: number): number;
  /** A connected unix stream socket, non-blocking once connected. */
  unixConnect(path: string): number;
  /** accept4 on a listening socket: a non-blocking fd, or -1 when none is pending. */
  unixAccept(fd: number): number;
  /**
   * recvmsg into `buf`: bytes read (0 at end of stream) or -1 when nothing is ready. Fds that
   * came with them (SCM_RIGHTS, close-on-exec) are pushed onto `fdsOut`; the caller owns them.
   */
  recvMsg(fd: number, buf: Uint8Array, fdsOut: number[]): number;
  /**
   * Sends all of `buf`, with `fds` (SCM_RIGHTS) attached to its first byte. When the socket is
   * full it waits up to `waitMs` (default 0) for room, then throws EAGAIN.
   */
  sendMsg(fd: number, buf: Uint8Array, fds?: number[], waitMs?: number): number;
  /** SO_PEERCRED of a connected unix socket: [pid, uid, gid] of the peer (short-circuit reads check the uid). */
  peerCred?(fd: number): [number, number, number];
  /** A non-blocking, close-on-exec eventfd. */
  eventfd(): number;
  /** Reads (and resets) an eventfd counter: 0 when it was already 0. */
  eventfdRead(fd: number): number;
  /** Adds `value` (default 1) to an eventfd counter. */
  eventfdWrite(fd: number, value?: number): void;
  /** memfd_create + ftruncate: shared memory of `size` bytes. */
  memfdCreate(name: string, size: number): number;
  /** st_size of an fd. */
  fdSize(fd: number): number;
  closeFd(fd: number): void;
  /**
   * Maps [offset, offset + size) of `fd` MAP_SHARED, returned as ArrayBuffers of at most
   * `chunkSize` bytes each, in order, without a copy; unmapped when all are garbage-collected.
   */
  mmapShared(fd: number, offset: number, size: number, chunkSize: number, readOnly?: boolean): ArrayBuffer[];
  /**
   * Watches an fd in the event loop (uv_poll): `callback(status, events)` on readiness (events:
   * 1 readable, 2 writable, 4 disconnect; status < 0 is a libuv error). With `{eventfd: true}`
   * the watcher drains the eventfd counter itself and calls back only when it was non-zero.
   * close() stops watching for good; the fd stays open.
   */
  FdWatcher: new (fd: number, callback: (status: number, events: number) => void, opts?: { eventfd?: boolean }) => NativeFdWatcher;

  // io_uring engine (native/src/uring.cc, liburing); the promise layer is UringEngine in lib/block/file.ts.
  /**
   * An io_uring of `entries` submission slots (throws a system error, e.g. ENOSYS or EPERM, where
   * io_uring is unavailable). Requests queued in one event-loop turn are submitted together just
   * before the loop blocks; completions come back in batches: `onComplete(pairs, count)` with
   * pairs[2i] the request id and pairs[2i+1] its result (bytes, or a negative errno). `pairs` is
   * reused by the next batch.
   */
  Uring?: new (entries: number, onComplete: (pairs: Int32Array, count: number) => void) => NativeUring;
  /** The Node-style Error (code, errno, syscall) for a positive errno, as every addon error. */
  uringError?(errno: number, syscall: string): Error;

  // The host FUSE mount (native/src/fuse.cc); /dev/fuse itself is read and written from JS.
  /** mount(2): `data` is the fuse option string (fd=N,rootmode=...,user_id=...,group_id=...). */
  fuseMount(source: string, target: string, fstype: string, flags: number, data: string): void;
  /** umount2(2) on the thread pool; `flags` MNT_FORCE 1, MNT_DETACH 2. */
  fuseUnmount(target: string, flags: number): Promise<void>;
  /** socketpair(AF_UNIX, SOCK_STREAM|SOCK_CLOEXEC): [ours, theirs] (theirs: fusermount3's _FUSE_COMMFD). */
  fuseSocketPair(): [number, number];
  /** Sets O_NONBLOCK on an fd. */
  fuseSetNonBlocking(fd: number): void;

  // The *at calls of LocalFileTree (native/src/fs.cc), all on the thread pool. Names are
  // Buffers of one path component (NUL or empty: EINVAL); fds are the tree's own.
  /**
   * openat2(dirfd, name, flags|O_NOFOLLOW|O_CLOEXEC, mode) with RESOLVE_BENEATH|NO_MAGICLINKS|
   * NO_SYMLINKS: the fd, or with `wantStat` a stat array (FS_STAT layout) whose [0] is the fd.
   */
  fsOpenat(dirfd: number, name: Buffer, flags: number, mode: number, wantStat?: false): Promise<number>;
  /** `dotdot` (name must be ".."): resolves without RESOLVE_BENEATH; the caller checks the result. */
  fsOpenat(dirfd: number, name: Buffer, flags: number, mode: number, wantStat: true, dotdot?: boolean): Promise<Float64Array>;
  /** fstatat(fd, "", AT_EMPTY_PATH|AT_SYMLINK_NOFOLLOW) as a stat array (FS_STAT layout). */
  fsStat(fd: number): Promise<Float64Array>;
  /** open("/proc/self/fd/FD", flags): an open file of an O_PATH fd's node; a symlink fails ELOOP. */
  fsReopen(fd: number, flags: number): Promise<number>;
  fsMkdirat(dirfd: number, name: Buffer, mode: number): Promise<number>;
  fsMknodat(dirfd: number, name: Buffer, mode: number, rdev: number): Promise<number>;
  fsSymlinkat(target: Buffer, dirfd: number, name: Buffer): Promise<number>;
  /** `flags`: 0 or AT_REMOVEDIR (0x200). */
  fsUnlinkat(dirfd: number, name: Buffer, flags: number): Promise<number>;
  fsRenameat2(olddirfd: number, oldname: Buffer, newdirfd: number, newname: Buffer, flags: number): Promise<number>;
  /** A new name `newname` in `newdirfd` for the node an O_PATH fd holds. */
  fsLinkat(fd: number, newdirfd: number, newname: Buffer): Promise<number>;
  fsReadlink(fd: number): Promise<Buffer>;
  /** fchownat(fd, "", uid, gid, AT_EMPTY_PATH|AT_SYMLINK_NOFOLLOW); -1 leaves one unchanged. */
  fsChown(fd: number, uid: number, gid: number): Promise<number>;
  fsChmod(fd: number, mode: number): Promise<number>;
  /** utimensat of an O_PATH fd's node; nsec may be UTIME_NOW (2^30-1) or UTIME_OMIT (2^30-2). */
  fsUtimens(fd: number, atimeSec: number, atimeNsec: number, mtimeSec: number, mtimeNsec: number): Promise<number>;
  fsTruncate(fd: number, size: number): Promise<number>;
  fsGetxattr(fd: number, name: Buffer): Promise<Buffer>;
  fsListxattr(fd: number): Promise<Buffer>;
  fsSetxattr(fd: number, name: Buffer, value: Buffer, flags: number): Promise<number>;
  fsRemovexattr(fd: number, name: Buffer): Promise<number>;
  /** lseek(fd, cookie) then getdents64: raw linux_dirent64 records (at most `size` bytes). */
  fsGetdents(fd: number, cookie: bigint, size: number): Promise<Buffer>;
  fsFallocate(fd: number, mode: number, offset: number, length: number): Promise<number>;
  /** lseek(fd, offset, whence): the new offset (ENXIO past the last data / hole). */
  fsLseek(fd: number, offset: number, whence: number): Promise<number>;
  fsCopyFileRange(fdIn: number, offIn: number, fdOut: number, offOut: number, length: number, flags: number): Promise<number>;
  fsSyncfs(fd: number): Promise<number>;
  /** fstatfs: [blocks, bfree, bavail, files, ffree, bsize, namelen, frsize]. */
  fsStatfs(fd: number): Promise<Float64Array>;
}

/**
 * Indices into the stat arrays of fsOpenat/fsStat: dev and ino come in 32-bit halves so that an
 * inode key stays exact past 2^53.
 */
export const FS_STAT = {
  value: 0, devHi: 1, devLo: 2, inoHi: 3, inoLo: 4, mode: 5, nlink: 6, uid: 7, gid: 8, rdev: 9,
  size: 10, blksize: 11, blocks: 12, atime: 13, atimeNs: 14, mtime: 15, mtimeNs: 16, ctime: 17, ctimeNs: 18,
} as const;

/**
 * An io_uring. read/write/fsync only queue (ids are the caller's, integers < 2^31); the buffer
 * must stay referenced by the caller until its id completes.
 */
export interface NativeUring {
  read(fd: number, buf: Uint8Array, offset: number, id: number): void;
  write(fd: number, buf: Uint8Array, offset: number, id: number): void;
  fsync(fd: number, datasync: boolean, id: number): void;
  /** Submits what is queued now (otherwise done once per event-loop turn). Returns the count submitted. */
  submit(): number;
  /** Asks the kernel to cancel everything in flight (they complete with -ECANCELED, or normally). */
  cancelAll(): void;
  /** Blocks until nothing is in flight (not delivering those completions), then frees the ring. */
  close(): void;
  readonly inFlight: number;
}

export interface NativeFdWatcher {
  start(writable?: boolean): void;
  stop(): void;
  close(): void;
}

function load(): NativeAddon {
  const here = path.dirname(fileURLToPath(import.meta.url));
  // dist/lib/native -> repository root, and lib/native when run from sources (vitest).
  const candidates = [
    path.resolve(here, '../../../native/build/Release/vstore_native.node'),
    path.resolve(here, '../../native/build/Release/vstore_native.node'),
  ];
  const found = candidates.find((p) => existsSync(p));
  if (!found) {
    throw new Error('the native addon is not built: run `bash scripts/setup.sh` (node-gyp build of native/)');
  }
  return createRequire(import.meta.url)(found) as NativeAddon;
}

let addon: NativeAddon | undefined;
export function native(): NativeAddon {
  addon ??= load();
  return addon;
}
