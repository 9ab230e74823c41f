import { describe, expect, it } from 'vitest';
import { CacheDevice } from '../../../../lib/block/cache/device.js';
import { CacheVolume, createRamTier, type CacheMode } from '../../../../lib/block/cache/volume.js';
import { MemoryVolume } from '../../../../lib/block/memory.js';
import { CrashableVolume } from './crash-model.js';

const MiB = 1024 * 1024;

function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = (seed * 31 + i * 7 + (i >> 9)) & 0xff;
  return b;
}

async function setup(opts: { mode?: CacheMode; devSize?: number; size?: number; maxDirtyBytes?: number; ram?: boolean } = {}) {
  const dev = CrashableVolume.create(opts.devSize ?? 8 * MiB);
  const device = await CacheDevice.open(dev, { lineSize: 64 * 1024 });
  const backing = new MemoryVolume({ size: opts.size ?? 4 * MiB });
  const vol = await CacheVolume.open({
    device,
    backing,
    key: 'vm/disk0',
    mode: opts.mode ?? 'write-back',
    ...(opts.maxDirtyBytes ? { maxDirtyBytes: opts.maxDirtyBytes } : {}),
    ...(opts.ram ? { ram: createRamTier(MiB) } : {}),
    sealAfterMs: 50,
  });
  return { dev, device, backing, vol };
}

describe('CacheVolume', () => {
  it('write-back: writes stay on the cache until written back; reads see them; drain reaches the backing volume', async () => {
    const { backing, vol } = await setup();
    const data = pattern(12288, 1);
    await vol.write(4096 * 3, data);
    const back = Buffer.alloc(12288);
    await vol.read(4096 * 3, back);
    expect(back.equals(data)).toBe(true);
    expect(backing.stats.writes).toBe(0);
    expect(vol.stats().dirtyBytes).toBe(12288);
    await vol.drain();
    expect(vol.stats().dirtyBytes).toBe(0);
    const onBacking = Buffer.alloc(12288);
    await backing.read(4096 * 3, onBacking);
    expect(onBacking.equals(data)).toBe(true);
    expect(backing.stats.flushes).toBeGreaterThan(0);
    await vol.close();
  });

  it('a 4 KiB write into a cold line reads nothing from the backing volume; unaligned writes merge', async () => {
    const { backing, vol } = await setup();
    await backing.write(0, pattern(65536, 9));
    const before = backing.stats.reads;
    await vol.write(8192, pattern(4096, 2));
    expect(backing.stats.reads).toBe(before);
    await vol.write(100, Buffer.from('hello')); // partial sector: read-modify-write of sector 0 only
    const b = Buffer.alloc(65536);
    await vol.read(0, b);
    const want = pattern(65536, 9);
    pattern(4096, 2).copy(want, 8192);
    Buffer.from('hello').copy(want, 100);
    expect(b.equals(want)).toBe(true);
    await vol.close();
  });

  it('cache-on-read: the second read of a range is a hit and does not reach the backing volume', async () => {
    const { backing, vol } = await setup({ mode: 'write-through' });
    await backing.write(0, pattern(MiB, 3));
    const b = Buffer.alloc(65536);
    await vol.read(65536, b);
    for (let i = 0; i < 50 && vol.stats().readHitBytes === 0; i++) {
      await new Promise((r) => setTimeout(r, 5));
      const before = backing.stats.reads;
      await vol.read(65536, b);
      if (backing.stats.reads === before) break;
    }
    const reads = backing.stats.reads;
    await vol.read(65536, b);
    expect(backing.stats.reads).toBe(reads);
    expect(b.equals(pattern(MiB, 3).subarray(65536, 131072))).toBe(true);
    expect(vol.stats().hitRatio).toBeGreaterThan(0);
    await vol.close();
  });

  it('write-through and write-around keep the backing volume current and never serve stale data', async () => {
    for (const mode of ['write-through', 'write-around', 'pass-through'] as const) {
      const { backing, vol } = await setup({ mode });
      const b = Buffer.alloc(8192);
      await vol.read(0, b); // cache zeroes
      await new Promise((r) => setTimeout(r, 10));
      await vol.write(0, pattern(8192, 4));
      const onBacking = Buffer.alloc(8192);
      await backing.read(0, onBacking);
      expect(onBacking.equals(pattern(8192, 4)), mode).toBe(true);
      await vol.read(0, b);
      expect(b.equals(pattern(8192, 4)), mode).toBe(true);
      await vol.close();
    }
  });

  it('switching from write-back drains dirty data first', async () => {
    const { backing, vol } = await setup();
    await vol.write(0, pattern(65536 * 3, 5));
    await vol.setMode('write-through');
    expect(vol.stats().dirtyBytes).toBe(0);
    const b = Buffer.alloc(65536 * 3);
    await backing.read(0, b);
    expect(b.equals(pattern(65536 * 3, 5))).toBe(true);
    await vol.close();
  });

  it('a flushed write survives a crash and is written back after reopen; unflushed ones may be lost', async () => {
    const { dev, vol } = await setup();
    await vol.write(0, pattern(65536, 6));
    await vol.flush();
    await vol.write(65536, pattern(65536, 7)); // not flushed
    const crashed = await dev.crash(() => 0.1); // unflushed writes all lost
    const device2 = await CacheDevice.open(crashed);
    const backing2 = new MemoryVolume({ size: 4 * MiB });
    const vol2 = await CacheVolume.open({ device: device2, backing: backing2, key: 'vm/disk0' });
    expect(vol2.stats().dirtyBytes).toBe(65536);
    const b = Buffer.alloc(65536);
    await vol2.read(0, b);
    expect(b.equals(pattern(65536, 6))).toBe(true);
    await vol2.drain();
    await backing2.read(0, b);
    expect(b.equals(pattern(65536, 6))).toBe(true);
    await vol2.close();
  });

  it('write-back never puts a later epoch on the backing volume before an earlier one is complete', async () => {
    const { backing, vol } = await setup();
    // epoch 1: A at 0; flush; epoch 2: B at 0 (overwrites) and C at 64K; flush.
    const seen: string[] = [];
    const orig = backing.write.bind(backing);
    backing.write = async (o, b, opts) => {
      seen.push(`${o}:${b[0]}`);
      return orig(o, b, opts);
    };
    const origFlush = backing.flush.bind(backing);
    backing.flush = async () => {
      seen.push('F');
      return origFlush();
    };
    await vol.write(0, Buffer.alloc(4096, 1));
    await vol.flush();
    await vol.write(0, Buffer.alloc(4096, 2));
    await vol.write(65536, Buffer.alloc(4096, 3));
    await vol.flush();
    await vol.drain();
    expect(seen.slice(0, 2)).toEqual(['0:1', 'F']);
    expect(seen.slice(2, 4).sort()).toEqual(['0:2', '65536:3']);
    expect(seen[4]).toBe('F');
    await vol.close();
  });

  it('bounded dirty data: writers wait for write-back instead of growing it', async () => {
    const { vol } = await setup({ maxDirtyBytes: 256 * 1024 });
    let maxSeen = 0;
    for (let i = 0; i < 40; i++) {
      await vol.write((i % 30) * 65536, pattern(65536, i));
      maxSeen = Math.max(maxSeen, vol.stats().dirtyBytes);
    }
    expect(maxSeen).toBeLessThanOrEqual(256 * 1024 + 65536);
    await vol.drain();
    await vol.close();
  });

  it('fills the device: clean lines are evicted, data stays correct', async () => {
    const { backing, vol } = await setup({ devSize: 2 * MiB, size: 8 * MiB, mode: 'write-back', maxDirtyBytes: 256 * 1024 });
    for (let i = 0; i < 128; i++) await vol.write(i * 65536, pattern(65536, i));
    await vol.drain();
    expect(vol.stats().evictions).toBeGreaterThan(0);
    for (let i = 0; i < 128; i += 7) {
      const b = Buffer.alloc(65536);
      await vol.read(i * 65536, b);
      expect(b.equals(pattern(65536, i)), `line ${i}`).toBe(true);
      await backing.read(i * 65536, b);
      expect(b.equals(pattern(65536, i)), `backing line ${i}`).toBe(true);
    }
    await vol.close();
  });

  it('the RAM tier serves hot lines', async () => {
    const { vol } = await setup({ ram: true });
    await vol.write(0, pattern(65536, 8));
    const b = Buffer.alloc(65536);
    await vol.read(0, b);
    await vol.read(0, b);
    expect(vol.stats().ramHitBytes).toBe(65536);
    expect(b.equals(pattern(65536, 8))).toBe(true);
    await vol.write(0, Buffer.alloc(4096, 9)); // drops the RAM copy
    await vol.read(0, b);
    expect(b[0]).toBe(9);
    await vol.close();
  });

  it('prefetch warms lines; trims drop them and reach the backing volume after dirty data', async () => {
    const { backing, vol } = await setup();
    await backing.write(0, pattern(MiB, 11));
    await vol.warm(0, MiB);
    const reads = backing.stats.reads;
    const b = Buffer.alloc(MiB);
    await vol.read(0, b);
    expect(backing.stats.reads).toBe(reads);
    expect(b.equals(pattern(MiB, 11))).toBe(true);
    await vol.write(0, Buffer.alloc(4096, 1));
    await vol.trim(0, 65536);
    await vol.read(0, b.subarray(0, 65536));
    expect(b.subarray(0, 65536).equals(Buffer.alloc(65536))).toBe(true);
    await vol.close();
  });

  it('a failing cache device degrades the disk to pass-through; dirty data is written back, nothing acknowledged is lost', async () => {
    const { dev, backing, vol } = await setup();
    await vol.write(0, pattern(65536 * 2, 12));
    await vol.flush();
    dev.fail();
    await vol.write(65536 * 4, pattern(65536, 13)); // lands on the backing volume
    expect(vol.stats().degraded).toBe(true);
    expect(vol.stats().mode).toBe('pass-through');
    const b = Buffer.alloc(65536 * 5);
    await backing.read(0, b);
    expect(b.subarray(0, 65536 * 2).equals(pattern(65536 * 2, 12))).toBe(true);
    expect(b.subarray(65536 * 4).equals(pattern(65536, 13))).toBe(true);
    await vol.read(0, b);
    expect(b.subarray(0, 65536 * 2).equals(pattern(65536 * 2, 12))).toBe(true);
    await vol.flush();
    await vol.close();
  });

  it('two disks share the device; an allotment bounds one of them', async () => {
    const dev = CrashableVolume.create(8 * MiB);
    const device = await CacheDevice.open(dev, { lineSize: 64 * 1024 });
    const a = await CacheVolume.open({ device, backing: new MemoryVolume({ size: 4 * MiB }), key: 'a', allotmentBytes: 512 * 1024 });
    const b = await CacheVolume.open({ device, backing: new MemoryVolume({ size: 4 * MiB }), key: 'b' });
    for (let i = 0; i < 32; i++) await a.write(i * 65536, pattern(65536, i));
    await a.drain();
    expect(a.stats().usedBytes).toBeLessThanOrEqual(512 * 1024);
    for (let i = 0; i < 16; i++) await b.write(i * 65536, pattern(65536, i + 100));
    const buf = Buffer.alloc(65536);
    await a.read(31 * 65536, buf);
    expect(buf.equals(pattern(65536, 31))).toBe(true);
    await b.read(15 * 65536, buf);
    expect(buf.equals(pattern(65536, 115))).toBe(true);
    await a.close();
    await b.close();
  });
});
