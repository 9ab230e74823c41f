/**
 * Property test of ReplicatedVolume: random interleavings of concurrent writes, trims, zeroes,
 * flushes and reads with replicas going down and up, failing writes, resyncs and rebuilds onto
 * replacements. The volume is used as the front ends use it (OrderedVolume above), so each read
 * must return the model of the writes issued before it; at the end, with every replica back and
 * resynced, every replica must equal that model byte for byte.
 *
 * Replaying: PROP_SEED=<seed> PROP_PATH=<path> (from a failure report) PROP_RUNS=1; PROP_DEBUG=1
 * stops at the first failure without shrinking; PROP_LOG=1 logs the layer at debug level.
 */
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import path from 'node:path';
import { DirtyRegionLog } from '../../../lib/block/drl.js';
import { FaultyVolume } from '../../../lib/block/faulty.js';
import { OrderedVolume } from '../../../lib/block/ordering.js';
import { ReplicatedVolume, type ReplicaState } from '../../../lib/block/replicated.js';
import { createLogger, silentLogger } from '../../../lib/log.js';
import { patterned, tempDir } from '../../helpers/index.js';

const RS = 4096;
const REGIONS = 24;
const SIZE = REGIONS * RS;
const dir = tempDir('vstore-replprop-');
let files = 0;

type Cmd =
  | { kind: 'write'; offset: number; length: number; seed: number; fua: boolean }
  | { kind: 'trim'; offset: number; length: number }
  | { kind: 'zero'; offset: number; length: number; mayTrim: boolean }
  | { kind: 'read'; offset: number; length: number }
  | { kind: 'flush' }
  | { kind: 'down'; replica: number; applyInFlight: boolean }
  | { kind: 'up'; replica: number }
  | { kind: 'failWrite'; replica: number }
  | { kind: 'wait'; ms: number }
  | { kind: 'settle' };

const range = fc
  .tuple(fc.nat({ max: SIZE - 1 }), fc.integer({ min: 1, max: 3 * RS }))
  .map(([offset, l]) => ({ offset, length: Math.min(l, SIZE - offset) }));
const replica = fc.nat({ max: 2 });

const cmd: fc.Arbitrary<Cmd> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ r: range, seed: fc.nat(), fua: fc.boolean() }).map(({ r, seed, fua }) => ({ kind: 'write' as const, ...r, seed, fua })) },
  { weight: 1, arbitrary: range.map((r) => ({ kind: 'trim' as const, ...r })) },
  { weight: 1, arbitrary: fc.record({ r: range, mayTrim: fc.boolean() }).map(({ r, mayTrim }) => ({ kind: 'zero' as const, ...r, mayTrim })) },
  { weight: 4, arbitrary: range.map((r) => ({ kind: 'read' as const, ...r })) },
  { weight: 1, arbitrary: fc.constant({ kind: 'flush' as const }) },
  { weight: 2, arbitrary: fc.record({ i: replica, a: fc.boolean() }).map(({ i, a }) => ({ kind: 'down' as const, replica: i, applyInFlight: a })) },
  { weight: 2, arbitrary: replica.map((i) => ({ kind: 'up' as const, replica: i })) },
  { weight: 1, arbitrary: replica.map((i) => ({ kind: 'failWrite' as const, replica: i })) },
  { weight: 2, arbitrary: fc.integer({ min: 0, max: 6 }).map((ms) => ({ kind: 'wait' as const, ms })) },
  { weight: 1, arbitrary: fc.constant({ kind: 'settle' as const }) },
);

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function until(cond: () => boolean, what: () => string, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`not reached in time: ${what()}`);
    await sleep(2);
  }
}

async function runScenario(n: number, rebuild: boolean, delays: number[], cmds: Cmd[]): Promise<void> {
  const ids = ['a', 'b', 'c'].slice(0, n);
  const mk = (id: string, i: number): FaultyVolume => {
    const v = new FaultyVolume({ id, size: SIZE, chunkSize: RS });
    v.delay(delays[i % delays.length]!);
    return v;
  };
  const drl = await DirtyRegionLog.open(path.join(dir, `drl${files++}`), { size: SIZE, regionSize: RS, replicaIds: ids });
  const persisted: Record<string, ReplicaState>[] = [];
  let made = 0;
  const rv = new ReplicatedVolume({
    name: 'prop',
    replicas: ids.map(mk),
    drl,
    persistStates: async (s) => {
      persisted.push({ ...s });
    },
    replaceReplica: rebuild ? async (failed) => mk(`${failed}-r${++made}`, made) : undefined,
    rebuildAfterMs: 15,
    waitMs: 10_000,
    resyncRetryMs: 3,
    resyncConcurrency: 2,
    logger: process.env.PROP_LOG ? createLogger({ level: 'debug' }) : silentLogger(),
  });
  const vol = new OrderedVolume(rv);
  const model = Buffer.alloc(SIZE);
  const pending: Promise<void>[] = [];
  const errors: unknown[] = [];
  const track = (p: Promise<void>, what: string): void => {
    pending.push(p.catch((e) => void errors.push(`${what}: ${(e as Error).message}`)));
  };
  const reps = (): FaultyVolume[] => rv.replicas as FaultyVolume[];
  const settle = async (): Promise<void> => {
    if (!rv.status().some((s) => s.state === 'in-sync' && s.up)) {
      for (const r of reps()) if (rv.status().find((s) => s.id === r.id)?.state === 'in-sync') r.comeUp();
    }
    const all = Promise.all(pending.splice(0));
    let timer: NodeJS.Timeout | undefined;
    const hung = new Promise<never>((_, rej) => {
      timer = setTimeout(() => rej(new Error(`requests hung: ${JSON.stringify(rv.status())} held=${reps().map((r) => `${r.id}:${r.pending}/${r.up}`)}`)), 8000);
    });
    try {
      await Promise.race([all, hung]);
    } finally {
      clearTimeout(timer);
    }
  };

  try {
    for (const c of cmds) {
      switch (c.kind) {
        case 'write': {
          const b = patterned(c.length, c.seed);
          b.copy(model, c.offset);
          track(vol.write(c.offset, b, { fua: c.fua }), 'write');
          break;
        }
        case 'trim':
          model.fill(0, c.offset, c.offset + c.length);
          track(vol.trim(c.offset, c.length), 'trim');
          break;
        case 'zero':
          model.fill(0, c.offset, c.offset + c.length);
          track(vol.writeZeroes(c.offset, c.length, { mayTrim: c.mayTrim }), 'zero');
          break;
        case 'read': {
          const expected = Buffer.from(model.subarray(c.offset, c.offset + c.length));
          const buf = Buffer.alloc(c.length, 0xfe);
          track(
            vol.read(c.offset, buf).then(() => {
              if (!buf.equals(expected)) throw new Error(`read ${c.offset}+${c.length} returned data other than the acknowledged writes`);
            }),
            'read',
          );
          break;
        }
        case 'flush':
          track(vol.flush(), 'flush');
          break;
        case 'down':
          reps()[c.replica % reps().length]!.goDown({ applyInFlight: c.applyInFlight });
          break;
        case 'up':
          reps()[c.replica % reps().length]!.comeUp();
          break;
        case 'failWrite':
          reps()[c.replica % reps().length]!.failNext('write', 'EIO');
          break;
        case 'wait':
          await sleep(c.ms);
          break;
        case 'settle':
          await settle();
          break;
      }
    }
    // Everything back: every request completes, every replica resyncs.
    for (const r of reps()) r.comeUp();
    await settle();
    expect(errors).toEqual([]);
    await until(
      () => rv.status().every((s) => s.state === 'in-sync' && s.resync === null),
      () => JSON.stringify(rv.status()),
    );
    for (const r of reps()) {
      const got = await r.contents();
      if (!got.equals(model)) {
        let i = 0;
        while (got[i] === model[i]) i++;
        throw new Error(`replica ${r.id} differs from the model at byte ${i} (region ${Math.floor(i / RS)})`);
      }
      expect(drl.count(r.id)).toBe(0);
    }
    const back = Buffer.alloc(SIZE);
    await vol.read(0, back);
    expect(back.equals(model)).toBe(true);
    // What was persisted last (nothing: no state ever changed) is the final state.
    const initial = Object.fromEntries(ids.map((id) => [id, 'in-sync']));
    await until(
      () => Object.values(persisted.at(-1) ?? initial).every((s) => s === 'in-sync'),
      () => JSON.stringify(persisted.at(-1)),
    );
    expect(Object.keys(persisted.at(-1) ?? initial).sort()).toEqual(reps().map((r) => r.id).sort());
  } finally {
    for (const r of reps()) r.comeUp();
    await rv.close();
  }
}

export { runScenario };

describe('ReplicatedVolume (property)', () => {
  it('every replica ends equal to the acknowledged writes; reads always see them', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 2, max: 3 }),
        fc.boolean(),
        fc.array(fc.integer({ min: 0, max: 2 }), { minLength: 1, maxLength: 3 }),
        fc.array(cmd, { minLength: 5, maxLength: 60 }),
        async (n, rebuild, delays, cmds) => runScenario(n, rebuild, delays, cmds),
      ),
      { numRuns: Number(process.env.PROP_RUNS ?? 200), endOnFailure: process.env.PROP_DEBUG === "1", ...(process.env.PROP_SEED ? { seed: Number(process.env.PROP_SEED), path: process.env.PROP_PATH } : {}) },
    );
  });
});
