/**
 * Model check of CacheVolume over a MemoryVolume (the backing volume) against a per-sector model,
 * with random crashes of the cache device: at a crash, every unflushed write to the device may be
 * lost or torn (crash-model.ts), the old instance is killed (its backing volume refuses it from
 * then on, as after kill -9), and a new instance replays the device.
 *
 * The contract checked: every sector reads back, after any number of crashes, as its value at
 * the last completed FLUSH (or FUA write of it), or as a value written to it after that; while
 * running, reads return the last write; after a final drain the backing volume holds exactly what
 * the volume reads.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { CacheDevice } from '../../../../lib/block/cache/device.js';
import { CACHE_MODES, CacheVolume, type CacheMode } from '../../../../lib/block/cache/volume.js';
import { VolumeError } from '../../../../lib/block/errors.js';
import { VolumeLayer } from '../../../../lib/block/layer.js';
import { MemoryVolume } from '../../../../lib/block/memory.js';
import type { WriteOptions } from '../../../../lib/block/volume.js';
import { CrashableVolume } from './crash-model.js';

const SECTOR = 4096;
const SECTORS = 96; // 6 lines of 16 KiB
const SIZE = SECTORS * SECTOR;

/** The backing volume of one incarnation: killed with it. */
class Killable extends VolumeLayer {
  dead = false;
  private gate(): void {
    if (this.dead) throw new VolumeError('ESHUTDOWN', 'killed');
  }
  override async write(o: number, b: Buffer, opts?: WriteOptions): Promise<void> {
    this.gate();
    return this.inner.write(o, b, opts);
  }
  override async read(o: number, b: Buffer): Promise<void> {
    this.gate();
    return this.inner.read(o, b);
  }
  override async flush(): Promise<void> {
    this.gate();
    return this.inner.flush();
  }
  override async close(): Promise<void> {}
}

type Op =
  | { k: 'write'; sector: number; count: number; fua: boolean }
  | { k: 'read'; sector: number; count: number }
  | { k: 'flush' }
  | { k: 'crash'; seed: number }
  | { k: 'mode'; mode: CacheMode }
  | { k: 'pause' };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 8, arbitrary: fc.record({ k: fc.constant('write' as const), sector: fc.nat(SECTORS - 1), count: fc.integer({ min: 1, max: 9 }), fua: fc.boolean() }) },
  { weight: 4, arbitrary: fc.record({ k: fc.constant('read' as const), sector: fc.nat(SECTORS - 1), count: fc.integer({ min: 1, max: 12 }) }) },
  { weight: 3, arbitrary: fc.record({ k: fc.constant('flush' as const) }) },
  { weight: 2, arbitrary: fc.record({ k: fc.constant('crash' as const), seed: fc.nat() }) },
  { weight: 1, arbitrary: fc.record({ k: fc.constant('mode' as const), mode: fc.constantFrom(...CACHE_MODES) }) },
  { weight: 1, arbitrary: fc.record({ k: fc.constant('pause' as const) }) },
);

function sectorBuf(tag: number): Buffer {
  const b = Buffer.alloc(SECTOR);
  b.writeUInt32LE(tag, 0);
  b.writeUInt32LE((tag ^ 0xdeadbeef) >>> 0, SECTOR - 4);
  return b;
}
const tagOf = (b: Buffer, at: number): number => b.readUInt32LE(at);

function lcg(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    return x / 2 ** 32;
  };
}

async function runOps(ops: Op[]): Promise<void> {
  const backing = new MemoryVolume({ size: SIZE });
  let dev = CrashableVolume.create(2 * 1024 * 1024);
  let mode: CacheMode = 'write-back';
  const open = async (): Promise<{ vol: CacheVolume; kill: Killable }> => {
    const kill = new Killable(backing);
    const device = await CacheDevice.open(dev, { lineSize: 16 * 1024 });
    const vol = await CacheVolume.open({ device, backing: kill, key: 'd', mode, maxDirtyBytes: 64 * 1024, sealAfterMs: 5 });
    return { vol, kill };
  };
  let { vol, kill } = await open();
  // model: per sector the durable value and the values written since
  const durable = new Array<number>(SECTORS).fill(0);
  const since: Array<Set<number>> = Array.from({ length: SECTORS }, () => new Set());
  const latest = new Array<number>(SECTORS).fill(0);
  let tag = 1;
  for (const op of ops) {
    if (op.k === 'write') {
      const n = Math.min(op.count, SECTORS - op.sector);
      const buf = Buffer.alloc(n * SECTOR);
      const tags: number[] = [];
      for (let i = 0; i < n; i++) {
        tags.push(tag);
        sectorBuf(tag++).copy(buf, i * SECTOR);
      }
      await vol.write(op.sector * SECTOR, buf, { fua: op.fua });
      tags.forEach((t, i) => {
        const s = op.sector + i;
        latest[s] = t;
        if (op.fua) {
          durable[s] = t;
          since[s]!.clear();
        } else since[s]!.add(t);
      });
    } else if (op.k === 'read') {
      const n = Math.min(op.count, SECTORS - op.sector);
      const buf = Buffer.alloc(n * SECTOR);
      await vol.read(op.sector * SECTOR, buf);
      for (let i = 0; i < n; i++) expect(tagOf(buf, i * SECTOR), `sector ${op.sector + i}`).toBe(latest[op.sector + i]);
    } else if (op.k === 'flush') {
      await vol.flush();
      for (let s = 0; s < SECTORS; s++) {
        durable[s] = latest[s]!;
        since[s]!.clear();
      }
    } else if (op.k === 'mode') {
      await vol.setMode(op.mode);
      mode = op.mode;
    } else if (op.k === 'pause') {
      await new Promise((r) => setTimeout(r, 8));
    } else {
      kill.dead = true;
      dev = await dev.crash(lcg(op.seed));
      ({ vol, kill } = await open());
      const all = Buffer.alloc(SIZE);
      await vol.read(0, all);
      for (let s = 0; s < SECTORS; s++) {
        const got = tagOf(all, s * SECTOR);
        const ok = got === durable[s] || since[s]!.has(got);
        expect(ok, `sector ${s} after crash: got ${got}, durable ${durable[s]}, since ${[...since[s]!]}`).toBe(true);
        durable[s] = got;
        latest[s] = got;
        since[s]!.clear();
      }
    }
  }
  await vol.drain();
  const viaCache = Buffer.alloc(SIZE);
  await vol.read(0, viaCache);
  const onBacking = Buffer.alloc(SIZE);
  await backing.read(0, onBacking);
  for (let s = 0; s < SECTORS; s++) expect(tagOf(onBacking, s * SECTOR), `backing sector ${s}`).toBe(tagOf(viaCache, s * SECTOR));
  await vol.close();
}

describe('CacheVolume crash model', () => {
  it('every write acknowledged before the last completed flush survives random crashes', async () => {
    await fc.assert(
      // A run that does not end in 8 s is a hang (a normal run takes milliseconds): it fails
      // and is shrunk like any other failure.
      fc.asyncProperty(fc.array(opArb, { minLength: 5, maxLength: 60 }), (ops) =>
        Promise.race([runOps(ops), new Promise<never>((_, reject) => setTimeout(() => reject(new Error("hung")), 8_000).unref())]),
      ),
      { numRuns: 100 },
    );
  }, 600_000);

  it('regressions', async () => {
    await runOps([{"k":"crash","seed":0},{"k":"write","sector":0,"count":1,"fua":true},{"k":"write","sector":0,"count":2,"fua":false},{"k":"write","sector":8,"count":4,"fua":false},{"k":"write","sector":2,"count":6,"fua":false},{"k":"write","sector":0,"count":1,"fua":false},{"k":"crash","seed":0},{"k":"crash","seed":0}]);
    await runOps([{"k":"write","sector":0,"count":1,"fua":false},{"k":"flush"},{"k":"crash","seed":0},{"k":"write","sector":0,"count":5,"fua":false},{"k":"read","sector":0,"count":1},{"k":"read","sector":0,"count":1},{"k":"read","sector":0,"count":1},{"k":"read","sector":0,"count":1},{"k":"crash","seed":0},{"k":"read","sector":0,"count":1},{"k":"crash","seed":0}]);
    await runOps([{"k":"mode","mode":"write-around"},{"k":"crash","seed":0},{"k":"write","sector":0,"count":1,"fua":true},{"k":"write","sector":0,"count":2,"fua":false},{"k":"crash","seed":0},{"k":"read","sector":0,"count":1},{"k":"read","sector":0,"count":1},{"k":"read","sector":0,"count":1},{"k":"read","sector":0,"count":1}]);
  });
});
