/**
 * ReplicatedVolume over FaultyVolumes (MemoryVolume below): every rule of the layer, as a user of
 * the volume would check it (data read back, what each replica holds, what was persisted when).
 */
import { describe, expect, it } from 'vitest';
import path from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { DirtyRegionLog } from '../../../lib/block/drl.js';
import { FaultyVolume } from '../../../lib/block/faulty.js';
import { ReplicatedVolume, type ReplicaState, type ReplicaVolume, type ReplicatedVolumeOptions } from '../../../lib/block/replicated.js';
import type { VolumeCapabilities } from '../../../lib/block/volume.js';
import { silentLogger } from '../../../lib/log.js';
import { KiB, patterned, tempDir } from '../../helpers/index.js';

const RS = 64 * KiB; // DRL region size (= the MemoryVolume chunk size)
const SIZE = 16 * RS;
const dir = tempDir('vstore-repl-');
let files = 0;

type States = Record<string, ReplicaState>;

interface Setup {
  vol: ReplicatedVolume;
  reps: Record<string, FaultyVolume>;
  drl: DirtyRegionLog;
  drlFile: string;
  persisted: States[];
}

async function setup(
  o: Partial<Omit<ReplicatedVolumeOptions, 'replicas' | 'drl'>> & { ids?: string[]; replicas?: FaultyVolume[]; drlFile?: string } = {},
): Promise<Setup> {
  const replicas = o.replicas ?? (o.ids ?? ['a', 'b']).map((id) => new FaultyVolume({ id, size: SIZE }));
  const drlFile = o.drlFile ?? path.join(dir, `drl${files++}`);
  const drl = await DirtyRegionLog.open(drlFile, { size: SIZE, regionSize: RS, replicaIds: replicas.map((r) => r.id) });
  const persisted: States[] = [];
  const vol = new ReplicatedVolume({
    name: 'vm1/disk0',
    logger: silentLogger(),
    waitMs: 2000,
    resyncRetryMs: 60_000,
    ...o,
    replicas,
    drl,
    persistStates:
      o.persistStates ??
      (async (s) => {
        persisted.push({ ...s });
      }),
  });
  return { vol, reps: Object.fromEntries(replicas.map((r) => [r.id, r])), drl, drlFile, persisted };
}

async function until(cond: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('condition not reached in time');
    await new Promise((r) => setTimeout(r, 2));
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const stateOf = (vol: ReplicatedVolume, id: string): ReplicaState | undefined => vol.status().find((s) => s.id === id)?.state;

/** Settles to 'pending' when the promise has not settled within `ms`. */
async function settledWithin<T>(p: Promise<T>, ms: number): Promise<'pending' | 'resolved' | 'rejected'> {
  return Promise.race([p.then(() => 'resolved' as const, () => 'rejected' as const), sleep(ms).then(() => 'pending' as const)]);
}

async function expectIdentical(...vols: FaultyVolume[]): Promise<Buffer> {
  const first = await vols[0]!.contents();
  for (const v of vols.slice(1)) expect((await v.contents()).equals(first), `replica ${v.id} differs`).toBe(true);
  return first;
}

describe('ReplicatedVolume: writes and degraded mode', () => {
  it('writes reach every replica; reads return them; caps are the intersection', async () => {
    class NoMultiConn extends FaultyVolume {
      override get caps(): VolumeCapabilities {
        return { ...super.caps, multiConn: false };
      }
    }
    const a = new FaultyVolume({ id: 'a', size: SIZE, limits: { maximum: 1024 * KiB } });
    const b = new NoMultiConn({ id: 'b', size: SIZE, limits: { preferred: 8192 } });
    const { vol } = await setup({ replicas: [a, b] });
    expect(vol.size).toBe(SIZE);
    expect(vol.limits).toEqual({ minimum: 1, preferred: 8192, maximum: 1024 * KiB });
    expect(vol.caps.multiConn).toBe(false);
    expect(vol.caps.fua).toBe(true);
    const data = patterned(3 * RS + 77, 1);
    await vol.write(RS - 5, data, { fua: true });
    await vol.writeZeroes(2 * RS, 100);
    await vol.trim(8 * RS, RS);
    await vol.flush();
    expect(a.inner.stats.fuaWrites).toBe(1);
    expect(b.inner.stats.fuaWrites).toBe(1);
    expect(a.counters.ops.flush).toBe(1);
    expect(b.counters.ops.flush).toBe(1);
    const expected = Buffer.alloc(SIZE);
    data.copy(expected, RS - 5);
    expected.fill(0, 2 * RS, 2 * RS + 100);
    const back = Buffer.alloc(SIZE);
    await vol.read(0, back);
    expect(back.equals(expected)).toBe(true);
    expect((await expectIdentical(a, b)).equals(expected)).toBe(true);
    await vol.close();
    expect(a.closed && b.closed).toBe(true);
    await expect(vol.read(0, Buffer.alloc(1))).rejects.toMatchObject({ code: 'ESHUTDOWN' });
  });

  it('a replica that fails a write: the write is acknowledged after the DRL mark and persistStates', async () => {
    const order: string[] = [];
    let drl!: DirtyRegionLog;
    const s = await setup({
      persistStates: async (st) => {
        order.push(`persist b=${st.b} marked=${drl.isMarked('b', 5 * RS, 10)}`);
      },
    });
    drl = s.drl;
    const { vol, reps } = s;
    reps.b!.failNext('write', 'EIO');
    await vol.write(5 * RS, Buffer.alloc(10, 1));
    order.push('ack');
    expect(order).toEqual(['persist b=out-of-sync marked=true', 'ack']);
    expect(stateOf(vol, 'b')).toBe('out-of-sync');
    expect(s.drl.dirtyRegions('b')).toEqual([5]);
    // While b is out, every write marks its regions for b before it is acknowledged.
    await vol.write(9 * RS + RS - 1, Buffer.alloc(2, 2));
    expect(s.drl.dirtyRegions('b')).toEqual([5, 9, 10]);
    expect(reps.b!.counters.ops.write).toBe(0); // it took nothing
    await vol.close();
  });

  it('a persistStates that hangs holds the write that demoted a replica, and every later write', async () => {
    let release!: () => void;
    let calls = 0;
    const { vol, reps } = await setup({
      persistStates: () => {
        calls++;
        return new Promise<void>((r) => (release = r));
      },
    });
    reps.b!.failNext('write', 'EIO');
    const w1 = vol.write(0, Buffer.alloc(10, 1));
    await until(() => calls === 1);
    const w2 = vol.write(3 * RS, Buffer.alloc(10, 2)); // a later write, b gets nothing
    expect(await settledWithin(w1, 50)).toBe('pending');
    expect(await settledWithin(w2, 1)).toBe('pending');
    release();
    await Promise.all([w1, w2]);
    await vol.close();
  });

  it('a persistStates that fails fails the write with EIO; a later write persists again', async () => {
    let fail = true;
    const { vol, reps } = await setup({
      persistStates: async () => {
        if (fail) throw new Error('resolver down');
      },
    });
    reps.b!.failNext('write', 'EIO');
    await expect(vol.write(0, Buffer.alloc(10, 1))).rejects.toMatchObject({ code: 'EIO' });
    await expect(vol.write(RS, Buffer.alloc(10, 1))).rejects.toMatchObject({ code: 'EIO' });
    fail = false;
    await vol.write(2 * RS, Buffer.alloc(10, 1));
    await vol.close();
  });

  it('the last in-sync replica is never demoted: its failed write is retried', async () => {
    const { vol, reps, drl } = await setup();
    reps.b!.goDown();
    await until(() => stateOf(vol, 'b') === 'out-of-sync');
    reps.a!.failNext('write', 'EIO', 2);
    await vol.write(4 * RS, patterned(100, 3));
    expect(stateOf(vol, 'a')).toBe('in-sync');
    expect(drl.dirtyRegions('b')).toEqual([4]);
    const back = Buffer.alloc(100);
    await vol.read(4 * RS, back);
    expect(back.equals(patterned(100, 3))).toBe(true);
    // A final error (not a lost replica) is not retried.
    reps.a!.failNext('write', 'ENOSPC');
    await expect(vol.write(0, Buffer.alloc(1))).rejects.toMatchObject({ code: 'ENOSPC' });
    await vol.close();
  });

  it('a failed flush demotes the replica and marks the regions it had not flushed (not the FUA ones)', async () => {
    const { vol, reps, drl } = await setup();
    await vol.write(1 * RS, Buffer.alloc(10, 1));
    await vol.flush();
    await vol.write(3 * RS, Buffer.alloc(10, 1));
    await vol.write(6 * RS, Buffer.alloc(10, 1), { fua: true });
    reps.b!.failNext('flush', 'EIO');
    await vol.flush();
    expect(stateOf(vol, 'b')).toBe('out-of-sync');
    expect(drl.dirtyRegions('b')).toEqual([3]);
    await vol.close();
  });

  it('a replica that goes down is out of sync, with its unflushed regions marked', async () => {
    const { vol, reps, drl, persisted } = await setup();
    await vol.write(2 * RS, Buffer.alloc(10, 1));
    await vol.flush();
    await vol.write(4 * RS, Buffer.alloc(10, 1));
    reps.b!.goDown();
    await until(() => persisted.some((s) => s.b === 'out-of-sync'));
    expect(drl.dirtyRegions('b')).toEqual([4]);
    expect(vol.status().find((s) => s.id === 'b')).toMatchObject({ state: 'out-of-sync', up: false, dirtyBytes: RS, resync: null });
    await vol.close();
  });

  it('fast zero: refused when a replica cannot; refused by all in-sync replicas -> ENOTSUP, data unchanged', async () => {
    const { vol, reps } = await setup();
    await vol.write(0, Buffer.alloc(100, 9));
    reps.a!.failNext('writeZeroes', 'ENOTSUP');
    reps.b!.failNext('writeZeroes', 'ENOTSUP');
    await expect(vol.writeZeroes(0, 50, { fastZero: true })).rejects.toMatchObject({ code: 'ENOTSUP' });
    expect(stateOf(vol, 'b')).toBe('in-sync');
    // Refused by one: the other zeroes slowly, so the replicas agree.
    reps.b!.failNext('writeZeroes', 'ENOTSUP');
    await vol.writeZeroes(0, 50, { fastZero: true });
    expect(stateOf(vol, 'b')).toBe('in-sync');
    const buf = await expectIdentical(reps.a!, reps.b!);
    expect(buf.subarray(0, 50).every((x) => x === 0)).toBe(true);
    expect(buf[50]).toBe(9);
    await vol.close();
  });
});

describe('ReplicatedVolume: reads', () => {
  it('reads never come from an out-of-sync replica, even when it is the only one up', async () => {
    const { vol, reps } = await setup();
    reps.b!.failNext('write', 'EIO');
    await vol.write(0, Buffer.alloc(RS, 7));
    expect(stateOf(vol, 'b')).toBe('out-of-sync');
    const reads0 = reps.b!.counters.ops.read;
    for (let i = 0; i < 20; i++) {
      const buf = Buffer.alloc(RS);
      await vol.read(0, buf);
      expect(buf.every((x) => x === 7)).toBe(true);
    }
    expect(reps.b!.counters.ops.read).toBe(reads0);
    reps.a!.goDown();
    const buf = Buffer.alloc(RS);
    const r = vol.read(0, buf);
    expect(await settledWithin(r, 60)).toBe('pending'); // b is up, but out of sync
    expect(reps.b!.counters.ops.read).toBe(reads0);
    reps.a!.comeUp();
    await r;
    expect(buf.every((x) => x === 7)).toBe(true);
    await vol.close();
  });

  it('a read that fails on one replica is served by another; both failing is an error', async () => {
    const { vol, reps } = await setup();
    await vol.write(0, Buffer.alloc(10, 3));
    reps.a!.failNext('read', 'EIO');
    reps.b!.failNext('read', 'EIO');
    const buf = Buffer.alloc(10);
    await expect(vol.read(0, buf)).rejects.toMatchObject({ code: 'EIO' });
    reps.a!.failNext('read', 'EIO');
    await vol.read(0, buf);
    expect(buf.every((x) => x === 3)).toBe(true);
    // Reads go to the replica with the fewest requests in progress.
    reps.a!.hold(['read']);
    const held = vol.read(0, Buffer.alloc(1));
    await until(() => reps.a!.heldCount === 1);
    const before = reps.b!.counters.ops.read;
    await vol.read(0, Buffer.alloc(1));
    expect(reps.b!.counters.ops.read).toBe(before + 1);
    reps.a!.release();
    await held;
    await vol.close();
  });
});

describe('ReplicatedVolume: no replica reachable', () => {
  it('requests wait for an in-sync replica and succeed when it comes back within waitMs', async () => {
    const { vol, reps } = await setup({ waitMs: 3000 });
    reps.a!.goDown(); // a out of sync (b still in sync)
    reps.b!.goDown(); // b is the last in-sync replica: it stays in sync
    await until(() => stateOf(vol, 'a') === 'out-of-sync');
    expect(stateOf(vol, 'b')).toBe('in-sync');
    const w = vol.write(RS, Buffer.alloc(10, 5));
    const buf = Buffer.alloc(10);
    const r = vol.read(0, buf);
    reps.a!.comeUp(); // out of sync, and no source to resync from: serves nothing
    expect(await settledWithin(w, 60)).toBe('pending');
    expect(await settledWithin(r, 1)).toBe('pending');
    reps.b!.comeUp();
    await Promise.all([w, r]);
    await until(() => stateOf(vol, 'a') === 'in-sync');
    await expectIdentical(reps.a!, reps.b!);
    await vol.close();
  });

  it('fails with EIO after waitMs; beyond maxWaiting at once; ESHUTDOWN on close', async () => {
    const { vol, reps } = await setup({ waitMs: 150, maxWaiting: 2 });
    reps.a!.goDown();
    reps.b!.goDown();
    const t0 = Date.now();
    await expect(vol.read(0, Buffer.alloc(1))).rejects.toMatchObject({ code: 'EIO' });
    expect(Date.now() - t0).toBeGreaterThanOrEqual(140);
    await expect(vol.write(0, Buffer.alloc(1))).rejects.toMatchObject({ code: 'EIO' });
    const w1 = vol.read(0, Buffer.alloc(1));
    const w2 = vol.flush();
    await expect(vol.read(0, Buffer.alloc(1))).rejects.toMatchObject({ code: 'EIO' }); // third waiter
    const closing = vol.close();
    await expect(w1).rejects.toMatchObject({ code: 'ESHUTDOWN' });
    await expect(w2).rejects.toMatchObject({ code: 'ESHUTDOWN' });
    await closing;
  });
});

describe('ReplicatedVolume: resync', () => {
  it('copies exactly the dirty regions from an in-sync replica and ends byte-identical', async () => {
    const { vol, reps, drl, persisted } = await setup();
    await vol.write(0, patterned(SIZE, 1));
    await vol.flush(); // (unflushed regions of a replica that goes down are dirty too)
    reps.b!.goDown();
    await vol.write(RS + 10, patterned(100, 2)); // region 1
    await vol.write(5 * RS, patterned(RS, 3)); // region 5
    await vol.write(10 * RS - 10, patterned(20, 4)); // regions 9 and 10
    await vol.trim(13 * RS, RS); // region 13 (a hole on a afterwards)
    expect(drl.dirtyRegions('b')).toEqual([1, 5, 9, 10, 13]);
    const written = reps.b!.counters.bytesWritten;
    const zeroed = reps.b!.counters.bytesZeroed;
    reps.b!.comeUp();
    await until(() => stateOf(vol, 'b') === 'in-sync');
    expect(reps.b!.counters.bytesWritten - written).toBe(4 * RS);
    expect(reps.b!.counters.bytesZeroed - zeroed).toBe(RS);
    expect(drl.count('b')).toBe(0);
    await until(() => persisted.at(-1)?.b === 'in-sync');
    await expectIdentical(reps.a!, reps.b!);
    await vol.close();
  });

  it('reports progress and state, and logs start, every 10% and the end', async () => {
    const lines: { msg: string }[] = [];
    const sink = new Writable({
      write(chunk, _enc, cb) {
        for (const l of String(chunk).split('\n')) if (l) lines.push(JSON.parse(l));
        cb();
      },
    });
    const { vol, reps } = await setup({ logger: pino({ level: 'info' }, sink), resyncConcurrency: 1 });
    const states: string[] = [];
    const progress: number[] = [];
    vol.on('state', (e: { id: string; state: string }) => states.push(`${e.id}:${e.state}`));
    vol.on('progress', (s: { resync: { doneBytes: number } | null }) => progress.push(s.resync?.doneBytes ?? -1));
    reps.b!.goDown();
    for (let k = 0; k < 10; k++) await vol.write(k * RS, Buffer.alloc(10, k + 1));
    reps.b!.hold(['flush']);
    reps.b!.comeUp();
    await until(() => vol.status()[1]!.resync !== null);
    expect(vol.status()[1]).toMatchObject({ id: 'b', state: 'out-of-sync', up: true, dirtyBytes: 10 * RS, resync: { doneBytes: 0, totalBytes: 10 * RS } });
    reps.b!.release();
    await until(() => stateOf(vol, 'b') === 'in-sync');
    expect(states).toEqual(['b:out-of-sync', 'b:in-sync']);
    expect(progress.slice(0, 10)).toEqual(Array.from({ length: 10 }, (_, i) => (i + 1) * RS));
    const msgs = lines.map((l) => l.msg).filter((m) => m.startsWith('resync'));
    expect(msgs).toEqual(['resync started', ...[1, 2, 3, 4, 5, 6, 7, 8, 9].map((d) => `resync ${d * 10}%`), 'resync finished; replica in sync']);
    await vol.close();
  });

  it('a guest write to a region under copy waits for the copy, then reaches both replicas', async () => {
    const { vol, reps } = await setup();
    reps.b!.goDown();
    await vol.write(5 * RS, Buffer.alloc(RS, 1));
    reps.a!.hold(['blockStatus']); // the copy of region 5 stalls after taking the region
    reps.b!.comeUp();
    await until(() => reps.a!.heldCount === 1);
    const w = vol.write(5 * RS + 100, Buffer.alloc(10, 2));
    expect(await settledWithin(w, 40)).toBe('pending');
    expect((await reps.a!.contents())[5 * RS + 100]).toBe(1); // not issued yet
    // A write to another region is not held, and goes to the resyncing replica as well.
    const bBytes = reps.b!.counters.bytesWritten;
    await vol.write(12 * RS, Buffer.alloc(10, 3));
    expect(reps.b!.counters.bytesWritten - bBytes).toBe(10);
    reps.a!.release();
    await w;
    await until(() => stateOf(vol, 'b') === 'in-sync');
    const data = await expectIdentical(reps.a!, reps.b!);
    expect(data[5 * RS + 100]).toBe(2);
    expect(data[5 * RS + 99]).toBe(1);
    await vol.close();
  });

  it('a copy waits for a guest write in flight to its region (and copies its data)', async () => {
    const { vol, reps } = await setup();
    reps.b!.goDown();
    await vol.write(5 * RS, Buffer.alloc(RS, 1));
    reps.a!.hold(['write']);
    const w = vol.write(5 * RS, Buffer.alloc(10, 2)); // b is out: marked, sent to a only
    await until(() => reps.a!.heldCount === 1);
    const bBytes = reps.b!.counters.bytesWritten;
    reps.b!.comeUp();
    await sleep(40);
    expect(reps.b!.counters.bytesWritten).toBe(bBytes); // the copy waits for the write
    reps.a!.release();
    await w;
    await until(() => stateOf(vol, 'b') === 'in-sync');
    const data = await expectIdentical(reps.a!, reps.b!);
    expect(data[5 * RS]).toBe(2);
    await vol.close();
  });

  it('a resync interrupted by the replica going down again resumes with what is left', async () => {
    const { vol, reps, drl } = await setup({ resyncConcurrency: 1 });
    reps.b!.goDown();
    for (let k = 0; k < 8; k++) await vol.write(k * RS, Buffer.alloc(100, k + 1));
    reps.b!.failWritesAfter(3);
    reps.b!.comeUp();
    await until(() => drl.count('b') <= 5 && vol.status()[1]!.resync === null);
    expect(stateOf(vol, 'b')).toBe('out-of-sync');
    reps.b!.goDown();
    reps.b!.failWritesAfter(null);
    const left = drl.count('b');
    expect(left).toBeGreaterThan(0);
    expect(left).toBeLessThan(8);
    const before = reps.b!.counters.bytesWritten;
    reps.b!.comeUp();
    await until(() => stateOf(vol, 'b') === 'in-sync');
    expect(reps.b!.counters.bytesWritten - before).toBe(left * RS);
    await expectIdentical(reps.a!, reps.b!);
    await vol.close();
  });

  it('the DRL survives a restart: a new volume over the same log resyncs only the dirty regions', async () => {
    const s1 = await setup();
    await s1.vol.write(0, patterned(SIZE, 9));
    await s1.vol.flush();
    s1.reps.b!.goDown();
    await s1.vol.write(3 * RS, patterned(RS, 10));
    await s1.vol.write(4 * RS + 5, patterned(7, 11));
    await s1.vol.close();
    const states = s1.persisted.at(-1)!;
    expect(states).toEqual({ a: 'in-sync', b: 'out-of-sync' });

    const a = new FaultyVolume({ id: 'a', size: SIZE, inner: s1.reps.a!.inner });
    const b = new FaultyVolume({ id: 'b', size: SIZE, inner: s1.reps.b!.inner });
    const s2 = await setup({ replicas: [a, b], states, drlFile: s1.drlFile });
    expect(s2.drl.dirtyRegions('b')).toEqual([3, 4]);
    await until(() => stateOf(s2.vol, 'b') === 'in-sync');
    expect(b.counters.bytesWritten).toBe(2 * RS);
    await expectIdentical(a, b);
    await s2.vol.close();
  });

  it('a replica recorded in sync but with dirty bits (crash before persistStates) is resynced', async () => {
    const a = new FaultyVolume({ id: 'a', size: SIZE });
    const b = new FaultyVolume({ id: 'b', size: SIZE });
    await a.write(2 * RS, Buffer.alloc(10, 4)); // b missed it
    const drlFile = path.join(dir, `drl${files++}`);
    const pre = await DirtyRegionLog.open(drlFile, { size: SIZE, regionSize: RS, replicaIds: ['a', 'b'] });
    await pre.mark('b', 2 * RS, 10);
    await pre.close();
    const s = await setup({ replicas: [a, b], drlFile });
    await until(() => s.persisted.some((x) => x.b === 'out-of-sync'));
    await until(() => stateOf(s.vol, 'b') === 'in-sync');
    await expectIdentical(a, b);
    await s.vol.close();
  });
});

describe('ReplicatedVolume: rebuild', () => {
  it('a replica down for rebuildAfterMs is replaced; the new one is filled skipping holes', async () => {
    const made: FaultyVolume[] = [];
    const { vol, reps, drl, persisted } = await setup({
      rebuildAfterMs: 50,
      replaceReplica: async (failed) => {
        expect(failed).toBe('b');
        const c = new FaultyVolume({ id: 'c', size: SIZE });
        made.push(c);
        return c;
      },
    });
    await vol.write(2 * RS, patterned(RS, 1));
    await vol.write(7 * RS + 100, patterned(300, 2));
    await vol.writeZeroes(9 * RS, RS, { mayTrim: true }); // a hole again: skipped too
    reps.b!.goDown();
    await until(() => made.length === 1 && stateOf(vol, 'c') === 'in-sync');
    const c = made[0]!;
    expect(vol.status().map((s) => s.id)).toEqual(['a', 'c']);
    expect(c.counters.bytesWritten).toBe(2 * RS); // regions 2 and 7 only
    expect(c.counters.bytesZeroed).toBe(0);
    expect(reps.b!.closed).toBe(true);
    expect(drl.replicaIds).toEqual(['a', 'c']);
    expect(persisted).toContainEqual({ a: 'in-sync', c: 'rebuilding' });
    await until(() => JSON.stringify(persisted.at(-1)) === JSON.stringify({ a: 'in-sync', c: 'in-sync' }));
    await expectIdentical(reps.a!, c);
    const buf = Buffer.alloc(300);
    await vol.read(7 * RS + 100, buf);
    expect(buf.equals(patterned(300, 2))).toBe(true);
    await vol.close();
  });

  it('writes during a rebuild reach the new replica; a written region is zeroed, not skipped, when it becomes a hole', async () => {
    const made: FaultyVolume[] = [];
    const { vol, reps } = await setup({
      rebuildAfterMs: 30,
      replaceReplica: async () => {
        const c = new FaultyVolume({ id: 'c', size: SIZE });
        c.hold(['flush']); // hold the fill after its first region
        made.push(c);
        return c;
      },
    });
    await vol.write(1 * RS, patterned(RS, 1));
    reps.b!.goDown();
    await until(() => made.length === 1 && made[0]!.heldCount > 0);
    const c = made[0]!;
    await vol.write(6 * RS, patterned(RS, 5)); // reaches c directly
    expect((await c.contents()).subarray(6 * RS, 7 * RS).equals(patterned(RS, 5))).toBe(true);
    c.failNext('trim', 'EIO'); // c keeps the data, a has a hole there now
    await vol.trim(6 * RS, RS);
    expect((await c.contents())[6 * RS]).not.toBe(0);
    c.release();
    await until(() => stateOf(vol, 'c') === 'in-sync');
    await expectIdentical(reps.a!, c);
    await vol.close();
  });
});

describe('ReplicatedVolume: rebuild races', () => {
  it('an old replica that comes back while its replacement is being made does not clear the new slot', async () => {
    let give!: (v: ReplicaVolume) => void;
    const c = new FaultyVolume({ id: 'c', size: SIZE });
    const { vol, reps, drl } = await setup({
      rebuildAfterMs: 20,
      replaceReplica: () => new Promise<ReplicaVolume>((r) => (give = r)),
    });
    for (let k = 0; k < 6; k++) await vol.write(k * RS, patterned(RS, k + 1));
    await vol.flush();
    reps.b!.goDown();
    await vol.write(0, Buffer.alloc(10, 9));
    await until(() => give !== undefined);
    reps.b!.comeUp(); // back while the replacement is on its way: not resynced any more
    await sleep(30);
    expect(vol.status()[1]).toMatchObject({ id: 'b', resync: null });
    give(c);
    await until(() => stateOf(vol, 'c') === 'in-sync');
    expect(drl.replicaIds).toEqual(['a', 'c']);
    expect(c.counters.bytesWritten).toBe(6 * RS);
    await expectIdentical(reps.a!, c);
    await vol.close();
  });

  it('a replica down from the start is demoted by the first write and replaced after rebuildAfterMs', async () => {
    const a = new FaultyVolume({ id: 'a', size: SIZE });
    const b = new FaultyVolume({ id: 'b', size: SIZE, down: true });
    const c = new FaultyVolume({ id: 'c', size: SIZE });
    const { vol } = await setup({ replicas: [a, b], rebuildAfterMs: 20, replaceReplica: async () => c });
    await sleep(40); // b is in sync on record: not replaced
    expect(vol.status().map((s) => s.id)).toEqual(['a', 'b']);
    await vol.write(3 * RS, patterned(100, 1)); // b fails it (ESHUTDOWN): out of sync
    expect(stateOf(vol, 'b')).toBe('out-of-sync');
    await until(() => stateOf(vol, 'c') === 'in-sync');
    expect(vol.status().map((s) => s.id)).toEqual(['a', 'c']);
    await expectIdentical(a, c);
    await vol.close();
  });

  it('a failed replaceReplica is tried again later; a replica back meanwhile is resynced instead', async () => {
    let calls = 0;
    const { vol, reps } = await setup({
      rebuildAfterMs: 20,
      replaceReplica: async () => {
        calls++;
        throw new Error('no node with space');
      },
    });
    reps.b!.goDown();
    await vol.write(RS, Buffer.alloc(10, 9));
    await until(() => calls >= 2);
    reps.b!.comeUp();
    await until(() => stateOf(vol, 'b') === 'in-sync');
    const n = calls;
    await sleep(50);
    expect(calls).toBe(n);
    await expectIdentical(reps.a!, reps.b!);
    await vol.close();
  });
});

// Type-level: FaultyVolume is a ReplicaVolume.
const _check: ReplicaVolume = new FaultyVolume({ id: 'x', size: 512 });
void _check;
