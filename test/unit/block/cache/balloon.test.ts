/**
 * The balloon scheduler's pure core (fake clock, fake counters) and its driver over fake disks
 * that record the order of calls.
 */
import fc from 'fast-check';
import { describe, expect, it, vi } from 'vitest';
import { parseConfig } from '../../../../lib/config/schema.js';
import { CacheDevice } from '../../../../lib/block/cache/device.js';
import { MemoryVolume } from '../../../../lib/block/memory.js';
import { CacheHost } from '../../../../lib/block/cache/host.js';
import { silentLogger } from '../../../../lib/log.js';
import { tempDir } from '../../../helpers/tmp.js';
import path from 'node:path';
import { BalloonCore, BalloonScheduler, waterFill, type BalloonDiskEntry, type BalloonDiskHandle, type BalloonPlan, type BalloonSettings, type BalloonVmInput, type VmCachePolicy } from '../../../../lib/block/cache/balloon.js';

const LINE = 64 * 1024;
const MiB = 1024 * 1024;

/** A simulated VM: cumulative counters that a tick advances by `rate` bytes (misses while it wants more than it holds). */
interface SimVm {
  vm: string;
  policy: VmCachePolicy;
  /** Bytes read per tick (0: idle). */
  load: number;
  hit: number;
  miss: number;
  used: number;
}

function inputs(vms: SimVm[]): BalloonVmInput[] {
  return vms.map((v) => ({ vm: v.vm, policy: v.policy, disks: [{ id: `${v.vm}/d0`, readHitBytes: v.hit, readMissBytes: v.miss, writtenBytes: 0, usedBytes: v.used }] }));
}

/** Runs `ticks` steps of the core over the simulated VMs; used follows the allotment. */
function run(core: BalloonCore, vms: SimVm[], capacity: number, ticks: number, from: number, interval: number, each?: (p: BalloonPlan, t: number) => void): BalloonPlan {
  let plan!: BalloonPlan;
  for (let t = 0; t < ticks; t++) {
    for (const v of vms) {
      // Working sets bigger than the cache: half of what a busy VM reads misses.
      v.hit += v.load / 2;
      v.miss += v.load / 2;
    }
    const inp = inputs(vms);
    plan = core.plan(from + t * interval, capacity, inp);
    core.commit(plan);
    for (const v of vms) {
      const a = plan.vms.find((p) => p.vm === v.vm)!.allotmentBytes;
      // A busy VM fills its allotment; any VM's used drops to its allotment (eviction).
      v.used = v.load > 0 ? Math.floor(a / LINE) * LINE : Math.min(v.used, Math.floor(a / LINE) * LINE);
    }
    each?.(plan, t);
  }
  return plan;
}

const settings = (over: Partial<BalloonSettings> = {}): BalloonSettings => ({ enabled: true, intervalMs: 1000, rateBytesPerSec: 16 * MiB, idleTax: 0.5, ...over });
const sim = (vm: string, shares: number, load: number, extra: Partial<VmCachePolicy> = {}): SimVm => ({ vm, policy: { shares, ...extra }, load, hit: 0, miss: 0, used: 0 });

describe('waterFill', () => {
  it('weighted shares with floors and caps, whole units, sum exactly the total when caps allow', () => {
    expect(waterFill(700, [{ weight: 1, lo: 0, hi: 1e9 }, { weight: 2, lo: 0, hi: 1e9 }, { weight: 4, lo: 0, hi: 1e9 }])).toEqual([100, 200, 400]);
    expect(waterFill(700, [{ weight: 1, lo: 300, hi: 1e9 }, { weight: 2, lo: 0, hi: 1e9 }, { weight: 4, lo: 0, hi: 100 }])).toEqual([300, 300, 100]);
    expect(waterFill(100, [{ weight: 1, lo: 0, hi: 10 }, { weight: 1, lo: 0, hi: 20 }])).toEqual([10, 20]); // all capped
    expect(waterFill(100, [{ weight: 1, lo: 80, hi: 1e9 }, { weight: 1, lo: 80, hi: 1e9 }])).toEqual([50, 50]); // floors scaled
    const r = waterFill(10, [{ weight: 1, lo: 0, hi: 1e9 }, { weight: 1, lo: 0, hi: 1e9 }, { weight: 1, lo: 0, hi: 1e9 }]);
    expect(r.reduce((a, b) => a + b, 0)).toBe(10);
    expect(Math.max(...r) - Math.min(...r)).toBeLessThanOrEqual(1);
  });
});

describe('BalloonCore', () => {
  const capacity = 1000 * LINE;

  it('three busy VMs with shares 1:2:4 converge to 1/7, 2/7, 4/7 of the device (within a line)', () => {
    const core = new BalloonCore(settings(), LINE);
    const vms = [sim('a', 1, 100 * MiB), sim('b', 2, 100 * MiB), sim('c', 4, 100 * MiB)];
    const plan = run(core, vms, capacity, 60, 0, 1000);
    for (const [i, f] of [1 / 7, 2 / 7, 4 / 7].entries()) {
      expect(Math.abs(plan.vms[i]!.targetBytes - f * capacity)).toBeLessThanOrEqual(LINE);
      expect(plan.vms[i]!.allotmentBytes).toBe(plan.vms[i]!.targetBytes);
      expect(plan.vms[i]!.activeFraction).toBe(1);
    }
    expect(plan.vms.reduce((n, v) => n + v.targetBytes, 0)).toBeLessThanOrEqual(capacity);
  });

  it('moves an allotment by at most rate * elapsed per tick, also when the timer is late', () => {
    const s = settings({ rateBytesPerSec: 8 * MiB, intervalMs: 500 });
    const core = new BalloonCore(s, LINE);
    const vms = [sim('a', 1, 100 * MiB), sim('b', 2, 100 * MiB), sim('c', 4, 100 * MiB)];
    const prev = new Map<string, number>();
    let now = 0;
    let moved = false;
    for (let t = 0; t < 80; t++) {
      const dt = t % 7 === 3 ? 5000 : 500; // a stalled timer: elapsed is capped at 4 intervals
      now += dt;
      for (const v of vms) {
        v.hit += v.load / 2;
        v.miss += v.load / 2;
      }
      if (t === 40) vms[2]!.load = 0; // c goes idle: the movement is bounded the other way too
      const inp = inputs(vms);
      const p = core.plan(now, capacity, inp);
      core.commit(p);
      const bound = (s.rateBytesPerSec * Math.min(dt, 4 * s.intervalMs)) / 1000;
      for (const v of p.vms) {
        const before = prev.get(v.vm);
        if (before !== undefined) {
          expect(Math.abs(v.allotmentBytes - before)).toBeLessThanOrEqual(bound);
          if (Math.abs(v.allotmentBytes - before) > 0) moved = true;
        }
        prev.set(v.vm, v.allotmentBytes);
        const sv = vms.find((x) => x.vm === v.vm)!;
        sv.used = sv.load > 0 ? v.allotmentBytes : Math.min(sv.used, v.allotmentBytes);
      }
    }
    expect(moved).toBe(true);
  });

  it('respects min and max', () => {
    const core = new BalloonCore(settings({ rateBytesPerSec: 1024 * MiB }), LINE);
    // c would get 4/7 but may hold at most 100 lines; a idle but guaranteed 300 lines
    const vms = [sim('a', 1, 0, { minBytes: 300 * LINE }), sim('b', 2, 100 * MiB), sim('c', 4, 100 * MiB, { maxBytes: 100 * LINE })];
    const plan = run(core, vms, capacity, 30, 0, 1000);
    const [a, b, c] = plan.vms;
    expect(a!.targetBytes).toBeGreaterThanOrEqual(300 * LINE);
    expect(c!.targetBytes).toBeLessThanOrEqual(100 * LINE);
    expect(c!.targetBytes).toBe(100 * LINE); // busy: it gets its max
    expect(b!.targetBytes).toBe(capacity - a!.targetBytes - c!.targetBytes); // the rest
    expect(a!.allotmentBytes).toBeGreaterThanOrEqual(300 * LINE);
  });

  it('a VM going idle drifts down (idle tax) and its space goes to the busy ones', () => {
    const core = new BalloonCore(settings({ rateBytesPerSec: 2 * MiB }), LINE);
    const vms = [sim('a', 1, 100 * MiB), sim('b', 2, 100 * MiB), sim('c', 4, 100 * MiB)];
    const busy = run(core, vms, capacity, 40, 0, 1000);
    vms[2]!.load = 0;
    const series: number[] = [];
    const idle = run(core, vms, capacity, 40, 40_000, 1000, (p) => series.push(p.vms[2]!.allotmentBytes));
    const [a0, b0, c0] = busy.vms;
    const [a1, b1, c1] = idle.vms;
    expect(c1!.activeFraction).toBe(0);
    // idle: c's effective shares are 4 / k = 2 (tax 0.5): a, b, c = 1:2:2
    expect(Math.abs(c1!.targetBytes - capacity * (2 / 5))).toBeLessThanOrEqual(LINE);
    expect(c1!.allotmentBytes).toBeLessThan(c0!.allotmentBytes);
    expect(a1!.allotmentBytes).toBeGreaterThan(a0!.allotmentBytes);
    expect(b1!.allotmentBytes).toBeGreaterThan(b0!.allotmentBytes);
    // a drift, not a jump: non-increasing, several ticks
    for (let i = 1; i < series.length; i++) expect(series[i]!).toBeLessThanOrEqual(series[i - 1]!);
    expect(new Set(series).size).toBeGreaterThan(2);
    // the idle tax 0.99: an idle VM keeps next to nothing
    const heavy = new BalloonCore(settings({ idleTax: 0.99 }), LINE);
    const vms2 = [sim('a', 1, 100 * MiB), sim('c', 4, 0)];
    const p = run(heavy, vms2, capacity, 60, 0, 1000);
    expect(p.vms[1]!.targetBytes).toBeLessThan(capacity * 0.05);
  });

  it('a VM whose reads all hit is capped near what it holds when others want space; alone it gets the device', () => {
    const core = new BalloonCore(settings({ rateBytesPerSec: 1024 * MiB }), LINE);
    const fits = { vm: 'fits', policy: { shares: 4 }, hit: 0, used: 50 * LINE };
    const miss = { vm: 'miss', policy: { shares: 1 }, hit: 0, miss: 0 };
    let p!: BalloonPlan;
    for (let t = 0; t < 20; t++) {
      fits.hit += 100 * MiB; // busy, all hits
      miss.miss += 100 * MiB;
      const inp: BalloonVmInput[] = [
        { vm: 'fits', policy: fits.policy, disks: [{ id: 'fits/d', readHitBytes: fits.hit, readMissBytes: 0, writtenBytes: 0, usedBytes: fits.used }] },
        { vm: 'miss', policy: miss.policy, disks: [{ id: 'miss/d', readHitBytes: 0, readMissBytes: miss.miss, writtenBytes: 0, usedBytes: 0 }] },
      ];
      p = core.plan(t * 1000, capacity, inp);
      core.commit(p);
    }
    expect(p.vms[0]!.benefitCapped).toBe(true);
    expect(p.vms[0]!.targetBytes).toBe((50 + 7) * LINE); // used + max(4, used/8) lines
    expect(p.vms[1]!.targetBytes).toBe(capacity - p.vms[0]!.targetBytes);
    const alone = new BalloonCore(settings({ rateBytesPerSec: 1024 * MiB }), LINE);
    const inp: BalloonVmInput[] = [{ vm: 'fits', policy: { shares: 1 }, disks: [{ id: 'x', readHitBytes: 0, readMissBytes: 0, writtenBytes: 0, usedBytes: 0 }] }];
    expect(alone.plan(0, capacity, inp).vms[0]!.targetBytes).toBe(capacity);
  });

  it('sum of targets and of allotments never exceeds the capacity; moves never exceed the rate; min/max kept when feasible (property)', () => {
    const vmArb = fc.record({
      shares: fc.integer({ min: 1, max: 100 }),
      min: fc.option(fc.integer({ min: 0, max: 400 }), { nil: undefined }),
      max: fc.option(fc.integer({ min: 0, max: 1200 }), { nil: undefined }),
      disks: fc.integer({ min: 1, max: 3 }),
    });
    // The device's capacity is fixed for a run (a device does not shrink).
    const tickArb = fc.record({
      dt: fc.integer({ min: 0, max: 10_000 }),
      loads: fc.array(fc.record({ hit: fc.nat(200 * MiB), miss: fc.nat(200 * MiB), write: fc.nat(50 * MiB), used: fc.nat(3000) }), { minLength: 6, maxLength: 6 }),
      present: fc.array(fc.boolean(), { minLength: 6, maxLength: 6 }),
    });
    fc.assert(
      fc.property(fc.array(vmArb, { minLength: 1, maxLength: 6 }), fc.array(tickArb, { minLength: 1, maxLength: 25 }), fc.integer({ min: 1, max: 512 }), fc.double({ min: 0, max: 1, noNaN: true }), fc.integer({ min: 0, max: 2000 }), (vmsSpec, ticks, rateMiB, tax, capLines) => {
        const s = settings({ rateBytesPerSec: rateMiB * MiB, idleTax: tax, intervalMs: 1000 });
        const core = new BalloonCore(s, LINE);
        const counters = vmsSpec.map(() => ({ hit: 0, miss: 0, write: 0 }));
        let now = 0;
        let prev = new Map<string, number>();
        for (const t of ticks) {
          now += t.dt;
          const cap = capLines * LINE;
          const inp: BalloonVmInput[] = [];
          vmsSpec.forEach((spec, i) => {
            if (!t.present[i]) return;
            const c = counters[i]!;
            const l = t.loads[i]!;
            c.hit += l.hit;
            c.miss += l.miss;
            c.write += l.write;
            const policy: VmCachePolicy = { shares: spec.shares, ...(spec.min !== undefined ? { minBytes: spec.min * LINE } : {}), ...(spec.max !== undefined ? { maxBytes: spec.max * LINE } : {}) };
            inp.push({ vm: `vm${i}`, policy, disks: Array.from({ length: spec.disks }, (_, d) => ({ id: `vm${i}/d${d}`, readHitBytes: c.hit, readMissBytes: c.miss, writtenBytes: c.write, usedBytes: Math.floor(l.used / spec.disks) * LINE })) });
          });
          const p = core.plan(now, cap, inp);
          core.commit(p);
          const sumT = p.vms.reduce((n, v) => n + v.targetBytes, 0);
          const sumA = p.vms.reduce((n, v) => n + v.allotmentBytes, 0);
          if (sumT > cap || sumA > cap) return false;
          for (const v of p.vms) {
            if (v.targetBytes % LINE !== 0 || v.allotmentBytes < 0) return false;
            const diskSum = [...v.disks.values()].reduce((n, b) => n + b, 0);
            if (diskSum > Math.max(v.allotmentBytes, v.disks.size * LINE)) return false;
            // min/max: when all minimums fit, each target is within its VM's [min, max]
            const sumMin = p.vms.reduce((n, x) => n + Math.max(x.disks.size * LINE, Math.ceil((x.minBytes ?? 0) / LINE) * LINE), 0);
            if (sumMin <= cap) {
              const lo = Math.max(v.disks.size * LINE, Math.ceil((v.minBytes ?? 0) / LINE) * LINE);
              if (v.targetBytes < lo) return false;
              if (v.maxBytes !== undefined && v.targetBytes > Math.max(lo, Math.floor(v.maxBytes / LINE) * LINE)) return false;
            }
            // the rate
            const before = prev.get(v.vm);
            if (before !== undefined && Math.abs(v.allotmentBytes - before) > (s.rateBytesPerSec * Math.min(t.dt, 4000)) / 1000) return false;
          }
          prev = new Map(p.vms.map((v) => [v.vm, v.allotmentBytes]));
        }
        return true;
      }),
      { numRuns: 300 },
    );
  });
});

/** A fake cached disk: records the calls, with dirty data a drain writes back. */
class FakeDisk implements BalloonDiskHandle {
  used = 0;
  dirty = 0;
  hit = 0;
  miss = 0;
  allotment: number | undefined;
  drainMs = 0;
  constructor(
    readonly name: string,
    readonly log: string[],
  ) {}
  stats() {
    return { readHitBytes: this.hit, readMissBytes: this.miss, writtenBytes: 0, usedBytes: this.used, dirtyBytes: this.dirty };
  }
  async drain(): Promise<void> {
    this.log.push(`${this.name} drain`);
    await new Promise((r) => setTimeout(r, this.drainMs));
    this.dirty = 0;
    this.log.push(`${this.name} drained`);
  }
  setAllotment(bytes: number | undefined): void {
    // the allocator's rule: a shrink evicts clean lines only
    if (bytes !== undefined && bytes < this.used) {
      this.log.push(`${this.name} shrink ${bytes / LINE}${this.dirty ? ' DIRTY' : ''}`);
      this.used = Math.max(bytes, this.dirty);
    } else this.log.push(`${this.name} allot ${bytes === undefined ? 'none' : bytes / LINE}`);
    this.allotment = bytes;
  }
}

describe('BalloonScheduler (driver)', () => {
  function setup(drainMs: number) {
    const log: string[] = [];
    const disks = { a: new FakeDisk('a', log), c: new FakeDisk('c', log), f: new FakeDisk('f', log) };
    disks.c.drainMs = drainMs;
    const policies: Record<string, VmCachePolicy> = { a: { shares: 1 }, c: { shares: 4 } };
    const entries: BalloonDiskEntry[] = [
      { vm: 'a', disk: 'd', volume: disks.a },
      { vm: 'c', disk: 'd', volume: disks.c },
      { vm: 'f', disk: 'd', volume: disks.f, fixedBytes: 100 * LINE }, // a fixed allotment: left alone
    ];
    const logged: Array<Record<string, unknown>> = [];
    const logger = { info: (o: Record<string, unknown>) => logged.push(o), warn: () => {}, debug: () => {} };
    const sched = new BalloonScheduler({ capacityBytes: () => 600 * LINE, disks: () => entries, policy: (vm) => policies[vm] ?? { shares: 1 } }, settings({ rateBytesPerSec: 1024 * MiB, intervalMs: 100 }), LINE, logger as never, 50);
    return { log, disks, sched, logged };
  }

  it('writes back the dirty lines of a VM before lowering its allotment below what it holds', async () => {
    const { log, disks, sched, logged } = setup(0);
    let now = 0;
    const busy = (d: FakeDisk) => {
      d.miss += 100 * MiB;
      d.used = Math.max(d.used, d.allotment ?? 0);
    };
    for (let i = 0; i < 5; i++) {
      busy(disks.a);
      busy(disks.c);
      await sched.tick((now += 100));
    }
    // 500 lines shared 1:4 (the fixed disk's 100 taken off)
    expect(sched.status().capacityBytes).toBe(500 * LINE);
    expect(disks.a.allotment).toBe(100 * LINE);
    expect(disks.c.allotment).toBe(400 * LINE);
    expect(disks.f.allotment).toBeUndefined();
    // c goes idle with dirty data: its shrink waits for the write-back
    disks.c.dirty = 50 * LINE;
    log.length = 0;
    for (let i = 0; i < 12; i++) {
      busy(disks.a);
      await sched.tick((now += 100));
    }
    const shrink = log.findIndex((l) => l.startsWith('c shrink'));
    expect(shrink).toBeGreaterThan(0);
    expect(log.indexOf('c drained')).toBeGreaterThanOrEqual(0);
    expect(log.indexOf('c drained')).toBeLessThan(shrink);
    expect(log.some((l) => l.endsWith('DIRTY'))).toBe(false);
    expect(disks.c.allotment!).toBeLessThan(400 * LINE);
    expect(disks.a.allotment!).toBeGreaterThan(100 * LINE);
    // a structured line when targets move, not one per tick (17 ticks)
    expect(logged.length).toBeGreaterThan(0);
    expect(logged.length).toBeLessThan(10);
    // moves under max(a line, 1% of the device) are not logged: the first line stays near 1:4
    expect(Math.abs((logged[0]!.targets as Record<string, { targetBytes: number }>).c!.targetBytes - 400 * LINE)).toBeLessThanOrEqual(5 * LINE);
    expect(logged[0]).toMatchObject({ capacityBytes: 500 * LINE });
  });

  it('while the write-back runs, the VM keeps its allotment and nobody grows into it', async () => {
    const { log, disks, sched } = setup(400);
    let now = 0;
    for (let i = 0; i < 5; i++) {
      disks.a.miss += 100 * MiB;
      disks.c.miss += 100 * MiB;
      disks.a.used = disks.a.allotment ?? 0;
      disks.c.used = disks.c.allotment ?? 0;
      await sched.tick((now += 100));
    }
    // c goes idle with dirty data; the first tick that shrinks it starts the write-back
    disks.c.dirty = 10 * LINE;
    log.length = 0;
    const before = { a: disks.a.allotment!, c: disks.c.allotment! };
    let plan!: BalloonPlan;
    for (let i = 0; i < 12 && !log.includes('c drain'); i++) {
      disks.a.miss += 100 * MiB;
      plan = await sched.tick((now += 100)); // waits 50 ms, the drain takes 400
    }
    expect(log).toContain('c drain');
    const c = plan.vms.find((v) => v.vm === 'c')!;
    expect(c.targetBytes).toBeLessThan(before.c);
    expect(c.allotmentBytes).toBe(before.c); // held
    expect(disks.c.allotment).toBe(before.c);
    expect(disks.a.allotment).toBe(before.a); // nobody grew into it
    expect(sched.status().vms.find((v) => v.vm === 'c')!.draining).toBe(true);
    await new Promise((r) => setTimeout(r, 450));
    disks.a.miss += 100 * MiB;
    await sched.tick((now += 100));
    expect(disks.c.allotment!).toBeLessThan(before.c);
    expect(disks.a.allotment!).toBeGreaterThan(before.a);
    expect(log.indexOf('c drained')).toBeLessThan(log.findIndex((l) => l.startsWith('c shrink')));
  });
});

describe('config: vms[].cache and cache.balloon', () => {
  const base = (vm: Record<string, unknown>, balloon?: Record<string, unknown>) => ({
    runDir: '/tmp/r',
    cache: { device: '/tmp/c.img', ...(balloon ? { balloon } : {}) },
    vms: [{ name: 'v', disks: [{ name: 'd', file: '/tmp/d.img' }], ...vm }],
  });
  it('resolves shares, min, max and the scheduler settings with defaults', () => {
    const c = parseConfig(base({ cache: { shares: 4, min: '1G', max: '8G' } }, { interval: 500, rate: '32M', idleTax: 0.75 }), '/');
    expect(c.vms[0]!.cache).toEqual({ shares: 4, minBytes: 1 << 30, maxBytes: 8 * 2 ** 30 });
    expect(c.cache!.balloon).toEqual({ enabled: true, intervalMs: 500, rateBytesPerSec: 32 << 20, idleTax: 0.75 });
    const d = parseConfig(base({}), '/');
    expect(d.vms[0]!.cache).toBeUndefined();
    expect(d.cache!.balloon).toEqual({ enabled: true, intervalMs: 1000, rateBytesPerSec: 64 << 20, idleTax: 0.5 });
  });
  it('refuses min over max, a tax over 1, and a VM cache share without a cache device', () => {
    expect(() => parseConfig(base({ cache: { min: '2G', max: '1G' } }), '/')).toThrow(/vms\[0\]\.cache\.min: must not exceed max/);
    expect(() => parseConfig(base({}, { idleTax: 1.5 }), '/')).toThrow(/cache\.balloon\.idleTax: must be <= 1/);
    expect(() => parseConfig({ runDir: '/tmp/r', vms: [{ name: 'v', cache: { shares: 2 } }] }, '/')).toThrow(/vms\[0\]\.cache: needs a cache device/);
  });
});

describe('the allocator under concurrent fills (what ballooning leans on)', () => {
  it('a full device asked for many slots at once evicts a batch for all of them, not one batch per caller', async () => {
    const dev = await CacheDevice.open(new MemoryVolume({ size: 16 * MiB }), { lineSize: LINE, evictBatch: 8 });
    const a = await dev.attach('a', 64 * MiB);
    const b = await dev.attach('b', 64 * MiB);
    // a fills the device with clean lines; its evict() releases its oldest slots
    const held: number[] = [];
    for (let line = 0; line < dev.slots; line++) held.push((await dev.allocate(a, line, 0))!);
    await dev.commit();
    a.evict = (want) => {
      let n = 0;
      while (n < want && held.length) {
        dev.release(a, held.shift()!);
        n++;
      }
      return n;
    };
    b.allotment = 64;
    // 40 fills of b at once (the daemon allows 64 per disk)
    const got = await Promise.all(Array.from({ length: 40 }, (_, i) => dev.allocate(b, i, 0)));
    const placed = got.filter((s) => s !== null).length;
    expect(placed).toBeGreaterThan(0);
    // one batch per commit round, not 40 x 8 = 320 slots (every slot of a 16 MiB device of 64K lines is ~250)
    expect(dev.slots - a.used).toBeLessThanOrEqual(placed + 3 * 8);
    expect(a.used).toBeGreaterThan(dev.slots / 2);
  });
});

describe('CacheHost with the balloon over real write-back disks', () => {
  it('an idle VM with dirty data is written back, then shrunk; the busy VM grows; nothing is lost; a fixed disk keeps its allotment', async () => {
    const dir = tempDir('vstore-balloon-host-');
    // the timer never fires (an hour): the test steps the scheduler with its own clock
    const host = await CacheHost.open({ device: path.join(dir, 'cache.img'), size: 16 * MiB, lineSize: LINE, ramBytes: 0, balloon: { enabled: true, intervalMs: 3_600_000, rateBytesPerSec: 4 * MiB * 1000, idleTax: 0.75 } }, silentLogger());
    const backs = { a: new MemoryVolume({ size: 64 * MiB }), c: new MemoryVolume({ size: 64 * MiB }), f: new MemoryVolume({ size: 64 * MiB }) };
    const a = await host.openDisk('a', 'd0', 'a', backs.a, { mode: 'write-through' }, undefined, { shares: 1 });
    const c = await host.openDisk('c', 'd0', 'c', backs.c, { mode: 'write-back' }, undefined, { shares: 4 });
    const f = await host.openDisk('f', 'd0', 'f', backs.f, { allotmentBytes: 2 * MiB });
    const sched = host.balloon!;
    let now = 0;
    const buf = Buffer.alloc(LINE);
    let ra = 0;
    const readSome = async (v: typeof a, n: number) => {
      for (let i = 0; i < n; i++) await v.read(((ra++ * 7919) % 1024) * LINE, buf);
    };
    // both busy: a reads, c writes (dirty, write-back) and reads
    for (let t = 0; t < 12; t++) {
      await readSome(a, 40);
      for (let i = 0; i < 8; i++) await c.write(((t * 8 + i) % 64) * LINE, patternOf(t * 8 + i));
      await readSome(c, 40);
      await sched.tick((now += 1000));
    }
    const busy = sched.status();
    const cBusy = busy.vms.find((v) => v.vm === 'c')!;
    const aBusy = busy.vms.find((v) => v.vm === 'a')!;
    expect(busy.vms.map((v) => v.vm).sort()).toEqual(['a', 'c']); // f: fixed, not ballooned
    expect(busy.capacityBytes).toBe(host.device.slots * LINE - 2 * MiB);
    expect(cBusy.targetBytes).toBeGreaterThan(aBusy.targetBytes * 3);
    expect(c.stats().dirtyBytes).toBeGreaterThan(0);
    // c goes idle: the first shrink below what it holds drains it first
    const order: string[] = [];
    const drain = c.drain.bind(c);
    const setAllotment = c.setAllotment.bind(c);
    vi.spyOn(c, 'drain').mockImplementation(async () => {
      order.push(`drain dirty=${c.stats().dirtyBytes > 0}`);
      await drain();
    });
    vi.spyOn(c, 'setAllotment').mockImplementation((b) => {
      const st = c.stats();
      if (b !== undefined && b < st.usedBytes) order.push(`shrink dirty=${st.dirtyBytes > 0}`);
      setAllotment(b);
    });
    for (let t = 0; t < 15; t++) {
      await readSome(a, 60);
      await sched.tick((now += 1000));
    }
    const idle = sched.status();
    const cIdle = idle.vms.find((v) => v.vm === 'c')!;
    expect(cIdle.allotmentBytes).toBeLessThan(cBusy.allotmentBytes);
    expect(idle.vms.find((v) => v.vm === 'a')!.allotmentBytes).toBeGreaterThan(aBusy.allotmentBytes);
    // (background write-back may have cleaned it first on a slow run: then no drain was needed)
    expect(order[0] === 'drain dirty=true' || order[0] === 'shrink dirty=false').toBe(true);
    expect(order).toContain('shrink dirty=false');
    expect(order).not.toContain('shrink dirty=true');
    expect(c.stats().dirtyBytes).toBe(0);
    expect(c.stats().usedBytes).toBeLessThanOrEqual(cIdle.allotmentBytes);
    expect(f.stats().allotmentBytes).toBe(2 * MiB);
    // every write reached the backing volume and reads back through the cache
    const got = Buffer.alloc(LINE);
    for (let i = 0; i < 64; i++) {
      const want = patternOf(Math.max(...Array.from({ length: 12 * 8 }, (_, k) => (k % 64 === i ? k : -1))));
      await backs.c.read(i * LINE, got);
      expect(got.equals(want), `line ${i} on the backing volume`).toBe(true);
      await c.read(i * LINE, got);
      expect(got.equals(want), `line ${i} through the cache`).toBe(true);
    }
    await a.close();
    await c.close();
    await f.close();
    await host.close();
  });
});

function patternOf(n: number): Buffer {
  return Buffer.alloc(LINE, (n % 250) + 1);
}

describe('a VM share changed at runtime (PUT /v1/cache/balloon/VM, vstore cache shares)', () => {
  it('the scheduler moves the VM toward its new target; bad requests are refused with the reason', async () => {
    const { handleCacheRequest } = await import('../../../../lib/block/cache/control.js');
    const dir = tempDir('vstore-balloon-put-');
    const host = await CacheHost.open({ device: path.join(dir, 'cache.img'), size: 16 * MiB, lineSize: LINE, ramBytes: 0, balloon: { enabled: true, intervalMs: 3_600_000, rateBytesPerSec: 64 * MiB * 1000, idleTax: 0.5 } }, silentLogger());
    const a = await host.openDisk('a', 'd0', 'a', new MemoryVolume({ size: 64 * MiB }), { mode: 'write-through' }, undefined, { shares: 1 });
    const b = await host.openDisk('b', 'd0', 'b', new MemoryVolume({ size: 64 * MiB }), { mode: 'write-through' }, undefined, { shares: 1 });
    const put = (vm: string, body: unknown) =>
      handleCacheRequest('PUT', ['cache', 'balloon', vm], async () => body, { cacheOf: () => { throw new Error('unused'); } }, host);
    const sched = host.balloon!;
    let now = 0;
    const buf = Buffer.alloc(LINE);
    let n = 0;
    const busy = async (ticks: number): Promise<void> => {
      for (let t = 0; t < ticks; t++) {
        for (let i = 0; i < 60; i++) {
          await a.read(((n * 7919) % 1024) * LINE, buf);
          await b.read(((n++ * 104729) % 1024) * LINE, buf);
        }
        await sched.tick((now += 1000));
      }
    };
    const target = (vm: string): number => sched.status().vms.find((v) => v.vm === vm)!.targetBytes;
    await busy(6);
    expect(Math.abs(target('a') - target('b'))).toBeLessThanOrEqual(2 * LINE); // 1:1
    const r = await put('b', { shares: 3 });
    expect(r?.status).toBe(200);
    await busy(6);
    const ratio = target('b') / target('a');
    expect(ratio).toBeGreaterThan(2.5);
    expect(ratio).toBeLessThan(3.5);
    expect(sched.status().vms.find((v) => v.vm === 'b')!.shares).toBe(3);
    // refusals
    expect(await put('nope', { shares: 1 })).toMatchObject({ status: 404, body: { error: 'VM nope has no cached disk' } });
    expect(await put('a', { shares: 0 })).toMatchObject({ status: 400 });
    expect(await put('a', { shares: 'x' })).toMatchObject({ status: 400 });
    expect(await put('a', { shares: 1, min: 8 * MiB, max: MiB })).toMatchObject({ status: 400, body: { error: 'min: must not be over max' } });
    expect(await handleCacheRequest('GET', ['cache', 'balloon', 'a'], async () => null, { cacheOf: () => { throw new Error('unused'); } }, host)).toMatchObject({ status: 405 });
    await a.close();
    await b.close();
    await host.close();
  });
});
