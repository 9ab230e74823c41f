import { describe, expect, it } from 'vitest';
import { MemoryVolume } from '../../../lib/block/memory.js';
import { VolumeError } from '../../../lib/block/errors.js';
import type { Extent } from '../../../lib/block/volume.js';

const KiB = 1024;

function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = (i * 31 + seed) & 0xff || 1;
  return b;
}

async function readAll(v: MemoryVolume, off: number, len: number): Promise<Buffer> {
  const b = Buffer.alloc(len, 0xee);
  await v.read(off, b);
  return b;
}

/** The extents must tile [offset, offset + covered) contiguously. */
function checkTiling(ext: Extent[], offset: number, length: number): void {
  expect(ext.length).toBeGreaterThan(0);
  let pos = offset;
  for (const e of ext) {
    expect(e.offset).toBe(pos);
    expect(e.length).toBeGreaterThan(0);
    pos += e.length;
  }
  expect(pos).toBeLessThanOrEqual(offset + length);
}

describe('MemoryVolume', () => {
  it('reads zeroes when fresh and reports one hole', async () => {
    const v = new MemoryVolume({ size: 1024 * KiB });
    expect((await readAll(v, 1000, 5000)).every((x) => x === 0)).toBe(true);
    expect(await v.blockStatus(0, v.size)).toEqual([{ offset: 0, length: v.size, hole: true, zero: true }]);
    expect(v.allocatedBytes).toBe(0);
  });

  it('reads back what was written across chunk boundaries', async () => {
    const v = new MemoryVolume({ size: 1024 * KiB, chunkSize: 4 * KiB });
    const data = pattern(10 * KiB + 7, 3);
    await v.write(3 * KiB + 5, data);
    expect((await readAll(v, 3 * KiB + 5, data.length)).equals(data)).toBe(true);
    const around = await readAll(v, 3 * KiB, data.length + 100);
    expect(around.subarray(0, 5).every((x) => x === 0)).toBe(true);
    expect(around.subarray(5, 5 + data.length).equals(data)).toBe(true);
  });

  it('reports data and holes at chunk granularity, capped to the range', async () => {
    const v = new MemoryVolume({ size: 64 * KiB, chunkSize: 4 * KiB });
    await v.write(8 * KiB + 1, Buffer.from('x'));
    await v.write(20 * KiB, Buffer.alloc(8 * KiB, 1));
    const ext = await v.blockStatus(0, v.size);
    expect(ext).toEqual([
      { offset: 0, length: 8 * KiB, hole: true, zero: true },
      { offset: 8 * KiB, length: 4 * KiB, hole: false, zero: false },
      { offset: 12 * KiB, length: 8 * KiB, hole: true, zero: true },
      { offset: 20 * KiB, length: 8 * KiB, hole: false, zero: false },
      { offset: 28 * KiB, length: 36 * KiB, hole: true, zero: true },
    ]);
    const part = await v.blockStatus(9 * KiB, 12 * KiB);
    checkTiling(part, 9 * KiB, 12 * KiB);
    expect(part).toEqual([
      { offset: 9 * KiB, length: 3 * KiB, hole: false, zero: false },
      { offset: 12 * KiB, length: 8 * KiB, hole: true, zero: true },
      { offset: 20 * KiB, length: 1 * KiB, hole: false, zero: false },
    ]);
  });

  it('trim frees whole chunks and zeroes partial ones', async () => {
    const v = new MemoryVolume({ size: 64 * KiB, chunkSize: 4 * KiB });
    await v.write(0, Buffer.alloc(16 * KiB, 0xab));
    await v.trim(2 * KiB, 12 * KiB);
    expect(v.allocatedBytes).toBe(8 * KiB);
    const b = await readAll(v, 0, 16 * KiB);
    expect(b.subarray(0, 2 * KiB).every((x) => x === 0xab)).toBe(true);
    expect(b.subarray(2 * KiB, 14 * KiB).every((x) => x === 0)).toBe(true);
    expect(b.subarray(14 * KiB).every((x) => x === 0xab)).toBe(true);
  });

  it('writeZeroes allocates unless mayTrim', async () => {
    const v = new MemoryVolume({ size: 64 * KiB, chunkSize: 4 * KiB });
    await v.writeZeroes(0, 8 * KiB);
    expect(v.allocatedBytes).toBe(8 * KiB);
    expect((await v.blockStatus(0, 8 * KiB))[0]!.hole).toBe(false);
    await v.writeZeroes(0, 8 * KiB, { mayTrim: true, fastZero: true });
    expect(v.allocatedBytes).toBe(0);
  });

  it('counts flushes and FUA writes', async () => {
    const v = new MemoryVolume({ size: 4096 });
    await v.write(0, Buffer.alloc(512), { fua: true });
    await v.write(0, Buffer.alloc(512));
    await v.flush();
    expect(v.stats).toMatchObject({ writes: 2, fuaWrites: 1, flushes: 1 });
  });

  it('refuses writes when read-only with EROFS', async () => {
    const v = new MemoryVolume({ size: 4096, readOnly: true });
    expect(v.caps.readOnly).toBe(true);
    expect(v.caps.trim).toBe(false);
    await expect(v.write(0, Buffer.alloc(1))).rejects.toMatchObject({ code: 'EROFS' });
    await expect(v.trim(0, 1)).rejects.toBeInstanceOf(VolumeError);
    await v.read(0, Buffer.alloc(10));
  });

  it('injects faults through the hook as VolumeErrors', async () => {
    const v = new MemoryVolume({
      size: 4096,
      hook: (op) => {
        if (op === 'flush') throw new VolumeError('EIO', 'injected');
        if (op === 'trim') throw new Error('bug');
      },
    });
    await expect(v.flush()).rejects.toMatchObject({ code: 'EIO' });
    await expect(v.trim(0, 1)).rejects.toMatchObject({ code: 'EIO' });
    await v.write(0, Buffer.alloc(1));
  });

  it('fails with ESHUTDOWN after close', async () => {
    const v = new MemoryVolume({ size: 4096 });
    await v.close();
    await expect(v.read(0, Buffer.alloc(1))).rejects.toMatchObject({ code: 'ESHUTDOWN' });
  });

  it('validates its options', () => {
    expect(() => new MemoryVolume({ size: 1000, limits: { minimum: 512 } })).toThrow(/multiple of 512/);
    expect(() => new MemoryVolume({ size: 4096, chunkSize: 3000 })).toThrow(/power of two/);
  });

  it('handles a sparse terabyte without walking it', async () => {
    const v = new MemoryVolume({ size: 2 ** 40 });
    await v.write(2 ** 39, Buffer.from('hello'));
    const ext = await v.blockStatus(0, v.size);
    expect(ext.map((e) => e.hole)).toEqual([true, false, true]);
    const b = Buffer.alloc(5);
    await v.read(2 ** 39, b);
    expect(b.toString()).toBe('hello');
  });
});
