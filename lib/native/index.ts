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
  /** Size in bytes of a block device (BLKGETSIZE64). */
  blockDeviceSize(fd: number): number;
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
