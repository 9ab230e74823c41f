/**
 * The cache's turn-complete paths on a real cache file (FileVolume: RWF_NOWAIT reads and inline
 * writes of the page cache) and whole-line fills: hits, plain misses with their fill, and
 * write-back writes into the open slot run without the line lock, so these tests check that
 * what they return is what the locked paths would have: against a model, with requests in
 * parallel, writes racing fills, and a fetch of a whole line overtaken by a write.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { CacheDevice } from '../../../../lib/block/cache/device.js';
import { CacheVolume, type CacheMode } from '../../../../lib/block/cache/volume.js';
import { FileVolume } from '../../../../lib/block/file.js';
import { VolumeLayer } from '../../../../lib/block/layer.js';
import { MemoryVolume } from '../../../../lib/block/memory.js';
import type { WriteOptions } from '../../../../lib/block/volume.js';

const SECTOR = 4096;
const LINE = 64 * 1024;
const MiB = 1024 * 1024;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** A backing volume that takes a while: reads see the data as it was when they were issued (as a remote would). */
class SlowBacking extends VolumeLayer {
  reads: Array<[number, number]> = [];
  constructor(
    inner: MemoryVolume,
    private readonly ms = 2,
    private readonly readMs = ms,
  ) {
    super(inner);
  }
  override async read(o: number, b: Buffer): Promise<void> {
    this.reads.push([o, b.length]);
    const snap = Buffer.alloc(b.length);
    await this.inner.read(o, snap);
    await sleep(this.readMs);
    snap.copy(b);
  }
  override async write(o: number, b: Buffer, opts?: WriteOptions): Promise<void> {
    const copy = Buffer.from(b);
    await sleep(this.ms);
    return this.inner.write(o, copy, opts);
  }
}

function sectorBuf(tag: number): Buffer {
  const b = Buffer.alloc(SECTOR, tag & 0xff);
  b.writeUInt32LE(tag, 0);
  return b;
}

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

async function setup(opts: { mode?: CacheMode; fillWholeLines?: boolean; size?: number; backingMs?: number; readMs?: number } = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'vstore-cache-fast-'));
  dirs.push(dir);
  const file = await FileVolume.open(join(dir, 'cache.img'), { create: { size: 16 * MiB } });
  const device = await CacheDevice.open(file, { lineSize: LINE });
  const mem = new MemoryVolume({ size: opts.size ?? 2 * MiB });
  const backing = new SlowBacking(mem, opts.backingMs ?? 2, opts.readMs ?? opts.backingMs ?? 2);
  const vol = await CacheVolume.open({
    device,
    backing,
    key: 'd',
    mode: opts.mode ?? 'write-back',
    sealAfterMs: 5,
    readaheadLines: 0,
    ...(opts.fillWholeLines ? { fillWholeLines: true } : {}),
  });
  return { file, device, mem, backing, vol };
}

describe('cache fast paths on a real cache file', () => {
  it('the cache file offers the turn-complete paths (else these tests would test the locked paths only)', async () => {
    const { file, vol } = await setup();
    await file.write(0, Buffer.alloc(SECTOR, 7));
    const b = Buffer.alloc(SECTOR);
    expect(file.readCachedSync(0, b)).toBe(true);
    expect(b[100]).toBe(7);
    expect(file.writeInlineSync(SECTOR, Buffer.alloc(SECTOR, 9))).toBe(true);
    await vol.close();
  });

  it('a second read of a filled sector does not reach the backing volume; write-back writes land without it', async () => {
    const { backing, mem, vol } = await setup();
    await mem.write(0, sectorBuf(5));
    const b = Buffer.alloc(SECTOR);
    await vol.read(0, b);
    expect(b.readUInt32LE(0)).toBe(5);
    const n = backing.reads.length;
    for (let i = 0; i < 10; i++) {
      await vol.read(0, b);
      expect(b.readUInt32LE(0)).toBe(5);
    }
    expect(backing.reads.length).toBe(n);
    const at = LINE + SECTOR; // a line the cache holds nothing of
    await vol.write(at, sectorBuf(6));
    await vol.write(at, sectorBuf(7)); // in place in the open slot (or a new one after a seal)
    await vol.read(at, b);
    expect(b.readUInt32LE(0)).toBe(7);
    expect(vol.stats().dirtyBytes).toBeGreaterThanOrEqual(SECTOR);
    expect(backing.reads.length).toBe(n);
    await vol.drain();
    await mem.read(at, b);
    expect(b.readUInt32LE(0)).toBe(7);
    await vol.close();
  });

  it('parallel reads, writes and flushes of distinct sectors read back as the model says (through seals and write-back)', async () => {
    const sectors = 256; // 16 lines
    const { mem, vol } = await setup({ size: sectors * SECTOR, backingMs: 1 });
    const model = new Array<number>(sectors).fill(0);
    let x = 12345;
    const rnd = (n: number): number => {
      x = (Math.imul(x, 1103515245) + 12345) >>> 0;
      return x % n;
    };
    let tag = 1;
    for (let batch = 0; batch < 150; batch++) {
      const used = new Set<number>();
      const ops: Array<Promise<void>> = [];
      const checks: Array<() => void> = [];
      for (let k = 0; k < 12; k++) {
        const s = rnd(sectors);
        if (used.has(s)) continue;
        used.add(s);
        if (rnd(3) === 0) {
          const t = tag++;
          model[s] = t;
          ops.push(vol.write(s * SECTOR, sectorBuf(t)));
        } else {
          const b = Buffer.alloc(SECTOR);
          const want = model[s]!;
          ops.push(vol.read(s * SECTOR, b));
          checks.push(() => expect(b.readUInt32LE(0), `batch ${batch} sector ${s}`).toBe(want));
        }
      }
      await Promise.all(ops);
      for (const c of checks) c();
      if (batch % 10 === 9) await vol.flush();
      if (batch % 37 === 0) await sleep(3); // let write-back and fills run between batches
    }
    await vol.drain();
    const all = Buffer.alloc(sectors * SECTOR);
    await mem.read(0, all);
    for (let s = 0; s < sectors; s++) expect(all.readUInt32LE(s * SECTOR), `backing sector ${s}`).toBe(model[s]);
    await vol.close();
  });

  it('the timer does not seal while write-back runs: a slow backing volume never has more than one sealed epoch waiting', async () => {
    // 16 lines written at random for 1.5 s by writers that never pause (so write-back runs in
    // its slow mode, one slot at a time); each backing write takes 60 ms, so an epoch takes
    // longer to write back than the timer's interval (250 ms). Sealing regardless piled up
    // epochs, each with a new slot for every line written again; now at most the epoch being
    // written back and the open one are not done (no guest FLUSH here, dirty bound not hit).
    const { vol } = await setup({ size: 16 * LINE, backingMs: 60 });
    let x = 777;
    const rnd = (n: number): number => {
      x = (Math.imul(x, 1103515245) + 12345) >>> 0;
      return x % n;
    };
    // 1.5 s, and on a loaded machine on until the timer sealed twice (at most 15 s).
    const until = Date.now() + 1500;
    const hardStop = Date.now() + 15_000;
    let tag = 1;
    let most = 0;
    await Promise.all(
      Array.from({ length: 4 }, async () => {
        while ((Date.now() < until || vol.stats().epoch <= 2) && Date.now() < hardStop) {
          await vol.write(rnd(16 * 16) * SECTOR, sectorBuf(tag++));
          const st = vol.stats();
          most = Math.max(most, st.epoch - st.epochDone);
        }
      }),
    );
    expect(vol.stats().epoch).toBeGreaterThan(2); // the timer did seal
    expect(most).toBeLessThanOrEqual(2);
    await vol.drain();
    await vol.close();
  });

  it('fillWholeLines: concurrent misses on one line make one backing read of the whole line; then every sector hits', async () => {
    const { backing, mem, vol } = await setup({ fillWholeLines: true });
    for (let s = 0; s < 32; s++) await mem.write(s * SECTOR, sectorBuf(100 + s));
    const bufs = Array.from({ length: 16 }, () => Buffer.alloc(SECTOR));
    await Promise.all(bufs.map((b, i) => vol.read(i * SECTOR, b)));
    bufs.forEach((b, i) => expect(b.readUInt32LE(0)).toBe(100 + i));
    expect(backing.reads).toEqual([[0, LINE]]);
    await Promise.all(bufs.map((b, i) => vol.read(i * SECTOR, b)));
    bufs.forEach((b, i) => expect(b.readUInt32LE(0)).toBe(100 + i));
    expect(backing.reads.length).toBe(1);
    expect(vol.stats().readHitBytes).toBe(16 * SECTOR);
    await vol.close();
  });

  it('fillWholeLines: a write-around write while the line is being fetched is what later reads return (the fetch is not joined, not filled)', async () => {
    const { mem, vol } = await setup({ fillWholeLines: true, mode: 'write-around', backingMs: 1, readMs: 40 });
    for (let s = 0; s < 16; s++) await mem.write(s * SECTOR, sectorBuf(200 + s));
    const first = Buffer.alloc(SECTOR);
    const fetching = vol.read(0, first); // starts the fetch of line 0 (sees sector 3 as 203)
    await sleep(1);
    await vol.write(3 * SECTOR, sectorBuf(999)); // completes on the backing volume before the fetch answers
    const b = Buffer.alloc(SECTOR);
    await vol.read(3 * SECTOR, b);
    expect(b.readUInt32LE(0)).toBe(999);
    await fetching;
    expect(first.readUInt32LE(0)).toBe(200);
    await sleep(50); // any fill has landed
    await vol.read(3 * SECTOR, b);
    expect(b.readUInt32LE(0)).toBe(999);
    await vol.close();
  });
});
