/** Test data: deterministic pseudo-random buffers, sparse images with known extents, checksums. */
import { createHash } from 'node:crypto';
import { closeSync, openSync, readFileSync, writeSync, ftruncateSync } from 'node:fs';

/** Deterministic bytes (xorshift32), different for each seed; never all-zero blocks. */
export function patterned(length: number, seed: number): Buffer {
  const buf = Buffer.alloc(length);
  let x = (seed * 2654435761) >>> 0 || 0x9e3779b9;
  let i = 0;
  for (; i + 4 <= length; i += 4) {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    buf.writeUInt32LE(x, i);
  }
  for (; i < length; i++) buf[i] = (seed + i) & 0xff | 1;
  return buf;
}

export interface DataRegion {
  offset: number;
  length: number;
  seed: number;
}

/** Creates a sparse file of `size` bytes with patterned data at `regions`; holes elsewhere. */
export function sparseImage(file: string, size: number, regions: DataRegion[] = []): void {
  const fd = openSync(file, 'w');
  try {
    ftruncateSync(fd, size);
    for (const r of regions) writeSync(fd, patterned(r.length, r.seed), 0, r.length, r.offset);
  } finally {
    closeSync(fd);
  }
}

/** The expected contents of such an image, as one buffer. */
export function expectedImage(size: number, regions: DataRegion[]): Buffer {
  const buf = Buffer.alloc(size);
  for (const r of regions) patterned(r.length, r.seed).copy(buf, r.offset);
  return buf;
}

export function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

export function sha256File(file: string): string {
  return sha256(readFileSync(file));
}

export const KiB = 1024;
export const MiB = 1024 * KiB;
