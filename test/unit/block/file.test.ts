import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { mkdtempSync, rmSync, statSync, writeFileSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { FileVolume } from '../../../lib/block/file.js';
import { native } from '../../../lib/native/index.js';
import type { Extent } from '../../../lib/block/volume.js';

const KiB = 1024;
const MiB = 1024 * KiB;

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(path.join(tmpdir(), 'vstore-file-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

let n = 0;
const fresh = (): string => path.join(dir, `img${n++}.raw`);

function allocatedBytes(p: string): number {
  return statSync(p).blocks * 512;
}

/** Checks that extents tile a prefix of the range and agree with the bytes in `content`. */
function checkExtents(ext: Extent[], offset: number, length: number, content: Buffer): void {
  expect(ext.length).toBeGreaterThan(0);
  let pos = offset;
  for (const e of ext) {
    expect(e.offset).toBe(pos);
    expect(e.length).toBeGreaterThan(0);
    expect(e.zero).toBe(e.hole);
    if (e.hole) expect(content.subarray(e.offset, e.offset + e.length).every((x) => x === 0)).toBe(true);
    pos += e.length;
  }
  expect(pos).toBeLessThanOrEqual(offset + length);
}

describe('FileVolume', () => {
  it('creates a sparse image of the asked size and keeps an existing one', async () => {
    const p = fresh();
    const v = await FileVolume.open(p, { create: { size: 64 * MiB } });
    expect(v.size).toBe(64 * MiB);
    expect(statSync(p).size).toBe(64 * MiB);
    expect(allocatedBytes(p)).toBe(0);
    expect(v.limits).toEqual({ minimum: 1, preferred: 4096, maximum: 32 * MiB });
    expect(v.caps).toMatchObject({ readOnly: false, flush: true, fua: true, trim: true, writeZeroes: true, fastZero: true, blockStatus: true, multiConn: true });
    await v.close();
    const again = await FileVolume.open(p, { create: { size: 1 * MiB } });
    expect(again.size).toBe(64 * MiB);
    await again.close();
  });

  it('reports ENOENT for a missing file without create', async () => {
    await expect(FileVolume.open(path.join(dir, 'nope.raw'))).rejects.toMatchObject({ name: 'VolumeError', code: 'ENOENT' });
  });

  it('refuses directories', async () => {
    await expect(FileVolume.open(dir)).rejects.toMatchObject({ code: 'EISDIR' });
    await expect(FileVolume.open(dir, { readOnly: true })).rejects.toMatchObject({ code: 'EINVAL' });
  });

  it('reads back writes, in the file itself', async () => {
    const p = fresh();
    const v = await FileVolume.open(p, { create: { size: 4 * MiB } });
    const data = Buffer.alloc(300 * KiB);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
    await v.write(12345, data);
    const back = Buffer.alloc(data.length);
    await v.read(12345, back);
    expect(back.equals(data)).toBe(true);
    // small read, served from the page cache on the event loop
    const small = Buffer.alloc(4096);
    await v.read(12345, small);
    expect(small.equals(data.subarray(0, 4096))).toBe(true);
    await v.flush();
    await v.close();
    expect(readFileSync(p).subarray(12345, 12345 + data.length).equals(data)).toBe(true);
  });

  it('FUA writes call fdatasync', async () => {
    const p = fresh();
    // the thread-pool engine fdatasyncs through the FileHandle (the ring's is tested below)
    const v = await FileVolume.open(p, { create: { size: 1 * MiB }, engine: 'threadpool' });
    const fh = (v as unknown as { fh: { datasync(): Promise<void> } }).fh;
    const spy = vi.spyOn(fh, 'datasync');
    await v.write(0, Buffer.alloc(4096, 1));
    expect(spy).not.toHaveBeenCalled();
    await v.write(0, Buffer.alloc(4096, 2), { fua: true });
    expect(spy).toHaveBeenCalledTimes(1);
    await v.writeZeroes(0, 4096, { fua: true });
    await v.trim(0, 4096, { fua: true });
    await v.flush();
    expect(spy).toHaveBeenCalledTimes(4);
    await v.close();
  });

  it('blockStatus reports holes and data as written, capped to the range', async () => {
    const p = fresh();
    const size = 16 * MiB;
    const v = await FileVolume.open(p, { create: { size } });
    const model = Buffer.alloc(size);
    const put = async (off: number, len: number, byte: number): Promise<void> => {
      const b = Buffer.alloc(len, byte);
      await v.write(off, b);
      b.copy(model, off);
    };
    await put(1 * MiB, 64 * KiB, 0xaa);
    await put(5 * MiB + 4096, 8192, 0xbb);
    await put(size - 4096, 4096, 0xcc);
    const ext = await v.blockStatus(0, size);
    checkExtents(ext, 0, size, model);
    expect(ext.reduce((a, e) => a + e.length, 0)).toBe(size);
    const data = ext.filter((e) => !e.hole);
    // Filesystems allocate in blocks (4 KiB on ext4): the data extents hold what we wrote.
    expect(data.map((e) => [e.offset, e.length])).toEqual([
      [1 * MiB, 64 * KiB],
      [5 * MiB + 4096, 8192],
      [size - 4096, 4096],
    ]);
    // a window starting inside a hole and ending inside data
    const win = await v.blockStatus(1 * MiB - 1000, 2000);
    expect(win).toEqual([
      { offset: 1 * MiB - 1000, length: 1000, hole: true, zero: true },
      { offset: 1 * MiB, length: 1000, hole: false, zero: false },
    ]);
    await v.close();
  });

  it('trim punches a hole that reads as zeroes', async () => {
    const p = fresh();
    const v = await FileVolume.open(p, { create: { size: 4 * MiB } });
    await v.write(0, Buffer.alloc(1 * MiB, 0x55));
    const before = allocatedBytes(p);
    await v.trim(256 * KiB, 512 * KiB);
    expect(allocatedBytes(p)).toBe(before - 512 * KiB);
    const b = Buffer.alloc(1 * MiB);
    await v.read(0, b);
    expect(b.subarray(0, 256 * KiB).every((x) => x === 0x55)).toBe(true);
    expect(b.subarray(256 * KiB, 768 * KiB).every((x) => x === 0)).toBe(true);
    expect(b.subarray(768 * KiB).every((x) => x === 0x55)).toBe(true);
    const ext = await v.blockStatus(0, 1 * MiB);
    expect(ext.map((e) => [e.offset, e.length, e.hole])).toEqual([
      [0, 256 * KiB, false],
      [256 * KiB, 512 * KiB, true],
      [768 * KiB, 256 * KiB, false],
    ]);
    await v.close();
  });

  it('writeZeroes keeps allocation, and with mayTrim punches', async () => {
    const p = fresh();
    const v = await FileVolume.open(p, { create: { size: 4 * MiB } });
    await v.write(0, Buffer.alloc(1 * MiB, 0x77));
    const full = allocatedBytes(p);
    await v.writeZeroes(0, 512 * KiB, { fastZero: true });
    expect(allocatedBytes(p)).toBe(full);
    await v.writeZeroes(512 * KiB, 512 * KiB, { mayTrim: true });
    expect(allocatedBytes(p)).toBe(full - 512 * KiB);
    const b = Buffer.alloc(1 * MiB, 1);
    await v.read(0, b);
    expect(b.every((x) => x === 0)).toBe(true);
    // unaligned ranges work too
    await v.write(0, Buffer.alloc(10000, 9));
    await v.writeZeroes(3, 9990);
    await v.read(0, b.subarray(0, 10000));
    expect([...b.subarray(0, 10000)].filter((x) => x !== 0)).toEqual(Array(10).fill(9)); // [0,3) and [9993,10000)
    await v.close();
  });

  it('without the addon: trim is a no-op, zeroes are written, everything is data', async () => {
    const p = fresh();
    const v = await FileVolume.open(p, { create: { size: 2 * MiB }, native: null });
    expect(v.caps).toMatchObject({ trim: false, writeZeroes: false, fastZero: false, blockStatus: false });
    await v.write(0, Buffer.alloc(8192, 3));
    await v.trim(0, 4096);
    await v.writeZeroes(4096, 4096);
    await expect(v.writeZeroes(0, 4096, { fastZero: true })).rejects.toMatchObject({ code: 'ENOTSUP' });
    const b = Buffer.alloc(8192);
    await v.read(0, b);
    expect(b.subarray(0, 4096).every((x) => x === 3)).toBe(true);
    expect(b.subarray(4096).every((x) => x === 0)).toBe(true);
    expect(await v.blockStatus(100, 1000)).toEqual([{ offset: 100, length: 1000, hole: false, zero: false }]);
    await v.close();
  });

  it('falls back to writing zeroes when the filesystem cannot zero a range', async () => {
    const p = fresh();
    const real = native();
    const addon = { ...real, zeroRange: () => Promise.reject(Object.assign(new Error('ENOTSUP'), { code: 'ENOTSUP' })) };
    const v = await FileVolume.open(p, { create: { size: 1 * MiB }, native: addon });
    await v.write(0, Buffer.alloc(8192, 3));
    await expect(v.writeZeroes(0, 4096, { fastZero: true })).rejects.toMatchObject({ code: 'ENOTSUP' });
    expect(v.caps.fastZero).toBe(false);
    await v.writeZeroes(0, 4096);
    const b = Buffer.alloc(8192);
    await v.read(0, b);
    expect(b.subarray(0, 4096).every((x) => x === 0)).toBe(true);
    expect(b.subarray(4096).every((x) => x === 3)).toBe(true);
    await v.close();
  });

  it('passes a real ENOSPC through, on the event-loop and the thread-pool write paths', async () => {
    // A 256 KiB tmpfs fills for real (root, as the suite runs); the volume is larger than it.
    const mnt = mkdtempSync(path.join(tmpdir(), 'vstore-enospc-'));
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=256k', 'tmpfs', mnt]);
    try {
      const v = await FileVolume.open(path.join(mnt, 'img'), { create: { size: 4 * MiB }, engine: 'threadpool' });
      // Small writes (inline) until the filesystem is full.
      let err: unknown;
      for (let off = 0; off < 4 * MiB && !err; off += 4096) {
        await v.write(off, Buffer.alloc(4096, 7)).catch((e: unknown) => (err = e));
      }
      expect(err).toMatchObject({ name: 'VolumeError', code: 'ENOSPC' });
      // A large write (thread pool) fails the same way.
      await expect(v.write(2 * MiB, Buffer.alloc(MiB, 8))).rejects.toMatchObject({ name: 'VolumeError', code: 'ENOSPC' });
      // What was written before the filesystem filled reads back.
      const b = Buffer.alloc(4096);
      await v.read(0, b);
      expect(b.every((x) => x === 7)).toBe(true);
      const fh = (v as unknown as { fh: { datasync(): Promise<void> } }).fh;
      vi.spyOn(fh, 'datasync').mockRejectedValueOnce(Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' }));
      await expect(v.flush()).rejects.toMatchObject({ name: 'VolumeError', code: 'EIO' });
      await v.close();
    } finally {
      execFileSync('umount', [mnt]);
      rmSync(mnt, { recursive: true, force: true });
    }
  });

  it('read-only volumes refuse writes with EROFS', async () => {
    const p = fresh();
    writeFileSync(p, Buffer.alloc(4096, 1));
    const v = await FileVolume.open(p, { readOnly: true });
    expect(v.caps).toMatchObject({ readOnly: true, trim: false, writeZeroes: false });
    await expect(v.write(0, Buffer.alloc(1))).rejects.toMatchObject({ code: 'EROFS' });
    await expect(v.trim(0, 1)).rejects.toMatchObject({ code: 'EROFS' });
    await expect(v.writeZeroes(0, 1)).rejects.toMatchObject({ code: 'EROFS' });
    const b = Buffer.alloc(10);
    await v.read(4090, b.subarray(0, 6));
    expect(b.subarray(0, 6).every((x) => x === 1)).toBe(true);
    await v.close();
  });

  it('caps blockStatus at a bounded number of extents', async () => {
    const p = fresh();
    const v = await FileVolume.open(p, { create: { size: 2100 * 8192 } });
    for (let i = 0; i < 2100; i++) await v.write(i * 8192, Buffer.alloc(4096, 1));
    const ext = await v.blockStatus(0, v.size);
    expect(ext.length).toBe(1024);
    expect(ext[0]!.offset).toBe(0);
    const covered = ext.reduce((a, e) => a + e.length, 0);
    expect(covered).toBe(512 * 8192);
    await v.close();
  });

  it('direct mode: minimum 512, aligned and unaligned requests both work', async () => {
    const p = fresh();
    let v: FileVolume;
    try {
      v = await FileVolume.open(p, { create: { size: 1 * MiB }, direct: true });
    } catch (e) {
      // a filesystem without O_DIRECT (old tmpfs)
      expect((e as { code: string }).code).toBe('EINVAL');
      return;
    }
    expect(v.limits.minimum).toBe(512);
    await v.write(4096, Buffer.alloc(4096, 5));
    await v.write(100, Buffer.from('unaligned'));
    const b = Buffer.alloc(8192);
    await v.read(0, b);
    expect(b.subarray(100, 109).toString()).toBe('unaligned');
    expect(b.subarray(4096).every((x) => x === 5)).toBe(true);
    await v.close();
  });
});

describe('FileVolume inline writes', () => {
  it('writes small buffers on the event loop, and backs off to the thread pool after a stall', async () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'vstore-inline-'));
    try {
      const v = await FileVolume.open(path.join(dir, 'img'), { create: { size: 1 << 20 } });
      // Pretend the first inline write took 5 ms: a stall.
      let now = 1000;
      const spy = vi.spyOn(performance, 'now').mockImplementation(() => (now += 2.5));
      await v.write(0, Buffer.alloc(4096, 1));
      expect(v.inlineStalls).toBe(1);
      // Within the back-off window the next writes are not timed inline (no new stall counted,
      // even though the clock still jumps), yet they land.
      await v.write(4096, Buffer.alloc(4096, 2));
      await v.write(8192, Buffer.alloc(4096, 3));
      expect(v.inlineStalls).toBe(1);
      // After the window, inline writes are tried again (and this one stalls again).
      now += 2000;
      await v.write(12288, Buffer.alloc(4096, 4));
      expect(v.inlineStalls).toBe(2);
      spy.mockRestore();
      const b = Buffer.alloc(16384);
      await v.read(0, b);
      for (let i = 0; i < 4; i++) expect(b.subarray(i * 4096, (i + 1) * 4096).every((x) => x === i + 1)).toBe(true);
      await v.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('FileVolume engine uring', () => {
  const open = (p: string, extra: Parameters<typeof FileVolume.open>[1] = {}): Promise<FileVolume> =>
    FileVolume.open(p, { create: { size: 4 * MiB }, engine: 'uring', ...extra });

  it('uses the ring for misses, large reads, non-inline writes and fdatasync', async () => {
    const p = fresh();
    const v = await open(p, { inlineWrites: false });
    expect(v.engine).toBe('uring');
    const ring = (v as unknown as { ring: { read: unknown; write: unknown; fsync: unknown } }).ring;
    const reads = vi.spyOn(ring as { read: () => void }, 'read');
    const writes = vi.spyOn(ring as { write: () => void }, 'write');
    const syncs = vi.spyOn(ring as { fsync: () => void }, 'fsync');
    const data = Buffer.alloc(3 * MiB + 77);
    for (let i = 0; i < data.length; i++) data[i] = (i * 13) & 0xff;
    await v.write(1001, data, { fua: true });
    expect(writes).toHaveBeenCalled();
    expect(syncs).toHaveBeenCalledTimes(1);
    const back = Buffer.alloc(data.length);
    await v.read(1001, back);
    expect(reads).toHaveBeenCalled();
    expect(back.equals(data)).toBe(true);
    await v.flush();
    expect(syncs).toHaveBeenCalledTimes(2);
    await v.close();
    expect(readFileSync(p).subarray(1001, 1001 + data.length).equals(data)).toBe(true);
  });

  it('behaves like a buffer under random concurrent non-overlapping requests', async () => {
    const p = fresh();
    const v = await open(p, { inlineWrites: false });
    const model = Buffer.alloc(v.size);
    let seed = 42;
    const rnd = (n: number): number => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) % n);
    for (let round = 0; round < 20; round++) {
      // 32 requests on disjoint 128 KiB slots, at random offsets and lengths inside them
      const slots = Array.from({ length: 32 }, (_, i) => i).sort(() => rnd(3) - 1);
      await Promise.all(
        slots.map(async (s) => {
          const off = s * 128 * KiB + rnd(64 * KiB);
          const len = 1 + rnd(64 * KiB);
          if (rnd(2) === 0) {
            const b = Buffer.alloc(len, 1 + rnd(255));
            b.copy(model, off);
            await v.write(off, b);
          } else {
            const b = Buffer.alloc(len);
            await v.read(off, b);
            expect(b.equals(model.subarray(off, off + len))).toBe(true);
          }
        }),
      );
    }
    await v.close();
    expect(readFileSync(p).equals(model)).toBe(true);
  });

  it('close waits for requests in flight', async () => {
    const p = fresh();
    const v = await open(p, { inlineWrites: false });
    const writes = Array.from({ length: 16 }, (_, i) => v.write(i * 256 * KiB, Buffer.alloc(256 * KiB, i + 1)).then(() => true, () => false));
    await v.close();
    const done = await Promise.all(writes);
    const file = readFileSync(p);
    done.forEach((ok, i) => {
      if (ok) expect(file.subarray(i * 256 * KiB, (i + 1) * 256 * KiB).every((x) => x === i + 1)).toBe(true);
    });
  });

  it('direct mode through the ring: aligned and unaligned requests', async () => {
    const p = fresh();
    let v: FileVolume;
    try {
      v = await open(p, { direct: true });
    } catch (e) {
      expect((e as { code: string }).code).toBe('EINVAL');
      return;
    }
    await v.write(4096, Buffer.alloc(4096, 5));
    await v.write(100, Buffer.from('unaligned'));
    const b = Buffer.alloc(8192);
    await v.read(0, b);
    expect(b.subarray(100, 109).toString()).toBe('unaligned');
    expect(b.subarray(4096).every((x) => x === 5)).toBe(true);
    await v.close();
  });

  it('falls back to the thread pool, with a debug log, where io_uring is unavailable', async () => {
    const real = native();
    const debug = vi.fn();
    // an addon without Uring (not rebuilt), and one whose ring cannot be set up (seccomp, old kernel)
    const noRing = { ...real, Uring: undefined };
    const enosys = {
      ...real,
      Uring: function () {
        throw Object.assign(new Error('ENOSYS: Function not implemented, io_uring_setup'), { code: 'ENOSYS' });
      } as unknown as typeof real.Uring,
    };
    for (const addon of [noRing, enosys]) {
      const v = await open(fresh(), { native: addon, logger: { debug } });
      expect(v.engine).toBe('threadpool');
      await v.write(0, Buffer.alloc(128 * KiB, 3));
      const b = Buffer.alloc(128 * KiB);
      await v.read(0, b);
      expect(b.every((x) => x === 3)).toBe(true);
      await v.flush();
      await v.close();
    }
    expect(debug).toHaveBeenCalledTimes(2);
    const tp = await open(fresh(), { engine: 'threadpool' });
    expect(tp.engine).toBe('threadpool');
    await tp.close();
  });

  it('passes a real ENOSPC through the ring', async () => {
    const mnt = mkdtempSync(path.join(tmpdir(), 'vstore-enospc-'));
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=256k', 'tmpfs', mnt]);
    try {
      const v = await FileVolume.open(path.join(mnt, 'img'), { create: { size: 4 * MiB }, engine: 'uring', inlineWrites: false });
      await expect(v.write(0, Buffer.alloc(MiB, 8))).rejects.toMatchObject({ name: 'VolumeError', code: 'ENOSPC' });
      await v.close();
    } finally {
      execFileSync('umount', [mnt]);
      rmSync(mnt, { recursive: true, force: true });
    }
  });
});
