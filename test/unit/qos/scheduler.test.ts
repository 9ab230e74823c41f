/**
 * The mClock scheduler on a simulated clock and device: shares by weight, reservations,
 * limits and bursts, no banked credit, priority classes, runtime changes, migrate advice.
 * Capacity here is depth / service time (4 slots x 1 ms = 4000 requests/s).
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { LIMIT_SLACK_SECONDS, OpKind, QosScheduler } from '../../../lib/qos/scheduler.js';
import { countIn, makeSim, maxInWindow, settingsOf, SimClock } from './sim.js';

const DEV = { depth: 4, serviceSeconds: 0.001 };
/** The most a limit may give in one second: limit x (1 s + the 20 ms slack) + 2. */
const most = (limit: number, burst = 0): number => Math.floor(limit * (1 + Math.max(burst, LIMIT_SLACK_SECONDS))) + 2;

describe('QosScheduler (simulated device)', () => {
  it('shares a saturated device by weight 1:2:4, exactly', async () => {
    const sim = makeSim(DEV);
    const a = sim.vm('a', { weight: 1 }, { qd: 16 });
    const b = sim.vm('b', { weight: 2 }, { qd: 16 });
    const c = sim.vm('c', { weight: 4 }, { qd: 16 });
    await sim.run(3);
    const n = [a, b, c].map((v) => countIn(v.done, 1, 3));
    const total = n[0]! + n[1]! + n[2]!;
    expect(total).toBeGreaterThan(7900); // the device stays busy: 4000/s
    expect(n[0]! / total).toBeCloseTo(1 / 7, 2);
    expect(n[1]! / total).toBeCloseTo(2 / 7, 2);
    expect(n[2]! / total).toBeCloseTo(4 / 7, 2);
    expect(sim.maxInService()).toBe(4); // never more than depth at the device
  });

  it('weights count bytes: a VM of 64 KiB requests and one of 4 KiB requests at equal weight get equal cost', async () => {
    const sim = makeSim({ ...DEV, costUnit: 64 * 1024 });
    const big = sim.vm('big', {}, { qd: 16, bytes: 64 * 1024 });
    const small = sim.vm('small', {}, { qd: 16, bytes: 4096 });
    await sim.run(2);
    const nb = countIn(big.done, 1, 2);
    const ns = countIn(small.done, 1, 2);
    // cost 2 vs 1.0625: the small VM gets ~1.88x the requests
    expect(ns / nb).toBeCloseTo(2 / (1 + 4096 / 65536), 1);
  });

  it('meets a reservation that weight alone would not give', async () => {
    const sim = makeSim(DEV);
    const a = sim.vm('a', { reservation: { iops: 1000 }, weight: 1 }, { qd: 16 });
    const b = sim.vm('b', { weight: 10 }, { qd: 16 });
    await sim.run(3);
    const na = countIn(a.done, 1, 3) / 2;
    const nb = countIn(b.done, 1, 3) / 2;
    expect(na).toBeGreaterThanOrEqual(990);
    // a floor, not an extra: max(reservation, weight share = 4000/11); b gets the rest
    expect(na).toBeLessThan(1050);
    expect(na + nb).toBeGreaterThan(3950);
    expect(a.flow.status(sim.clock.now()).reservationDispatches).toBeGreaterThan(1000);
  });

  it('without the reservation the same VM gets only its weight (the case above can fail)', async () => {
    const sim = makeSim(DEV);
    const a = sim.vm('a', { weight: 1 }, { qd: 16 });
    sim.vm('b', { weight: 10 }, { qd: 16 });
    await sim.run(2);
    expect(countIn(a.done, 1, 2)).toBeLessThan(400);
  });

  it('a limit holds on an idle host: no one-second window over the limit (+ slack)', async () => {
    const sim = makeSim(DEV);
    const a = sim.vm('a', { limit: { iops: 500 } }, { qd: 32 });
    await sim.run(4);
    expect(maxInWindow(a.started, 1)).toBeLessThanOrEqual(most(500));
    expect(countIn(a.done, 1, 4)).toBeGreaterThanOrEqual(1495); // and it gets its limit
  });

  it('a limit keeps its rate when dispatch is coarser than its period (timers 3 ms late, period 0.5 ms)', async () => {
    const sim = makeSim({ depth: 64, serviceSeconds: 0.0001 });
    sim.clock.lateness = 0.003; // without the 20 ms slack: ~650/s
    const a = sim.vm('a', { limit: { iops: 2000 } }, { qd: 16 });
    await sim.run(3);
    expect(countIn(a.done, 1, 3) / 2).toBeGreaterThan(1900);
    expect(maxInWindow(a.started, 1)).toBeLessThanOrEqual(most(2000));
  });

  it('a bytes/s limit holds with large requests', async () => {
    const sim = makeSim(DEV);
    const a = sim.vm('a', { limit: { bps: 4 * 1024 * 1024 } }, { qd: 8, bytes: 256 * 1024 });
    await sim.run(4);
    // 16 requests of 256 KiB per second
    expect(maxInWindow(a.started, 1)).toBeLessThanOrEqual(most(16));
    expect(countIn(a.done, 1, 4)).toBeGreaterThanOrEqual(47);
  });

  it('a limited VM leaves the rest of the device to others (work conserving)', async () => {
    const sim = makeSim(DEV);
    const a = sim.vm('a', { limit: { iops: 500 }, weight: 100 }, { qd: 16 });
    const b = sim.vm('b', { weight: 1 }, { qd: 16 });
    await sim.run(3);
    expect(countIn(a.done, 1, 3) / 2).toBeLessThanOrEqual(most(500));
    expect(countIn(b.done, 1, 3) / 2).toBeGreaterThan(3400);
  });

  it('a burst is bounded: after an idle time, at most burstSeconds x limit ahead, then the limit', async () => {
    const sim = makeSim(DEV);
    const a = sim.vm('a', { limit: { iops: 500, burstSeconds: 2 } }, { qd: 32, autostart: false });
    await sim.run(10); // idle: the bucket fills, but only to 2 s worth
    a.start();
    await sim.run(5);
    const t0 = 10;
    const first = countIn(a.started, t0, t0 + 1);
    expect(first).toBeGreaterThan(1000); // the burst was used (device could do 4000)
    expect(first).toBeLessThanOrEqual(most(500, 2)); // and bounded: 1 s of limit + 2 s of burst
    expect(maxInWindow(a.started.filter((t) => t >= t0 + 3), 1)).toBeLessThanOrEqual(most(500)); // then the limit
  });

  it('an idle VM banks no credit: when it returns it gets its share, not a catch-up', async () => {
    const sim = makeSim(DEV);
    const a = sim.vm('a', { weight: 1 }, { qd: 16 });
    const b = sim.vm('b', { weight: 1 }, { qd: 16, autostart: false });
    await sim.run(5); // a alone for 5 s
    b.start();
    await sim.run(2);
    // right after b returns: equal shares in its first 100 ms, not all of the device for b
    const na = countIn(a.done, 5.01, 5.11);
    const nb = countIn(b.done, 5.01, 5.11);
    expect(nb / (na + nb)).toBeGreaterThan(0.45);
    expect(nb / (na + nb)).toBeLessThan(0.55);
  });

  it('an idle VM banks no reservation either', async () => {
    const sim = makeSim(DEV);
    const a = sim.vm('a', { reservation: { iops: 1000 } }, { qd: 16, autostart: false });
    sim.vm('b', { weight: 1 }, { qd: 16 });
    await sim.run(5);
    a.start();
    await sim.run(1);
    // it gets its reservation rate (plus its share of the rest), not 5 s of missed reservation at once
    expect(countIn(a.done, 5, 5.2)).toBeLessThan(0.2 * (1000 + 1500) + 20);
  });

  it('priority classes: strict order for spare capacity, reservations still served in a lower class', async () => {
    const sim = makeSim(DEV);
    const hi = sim.vm('hi', { priority: 'high', weight: 1 }, { qd: 16 });
    const no = sim.vm('no', { priority: 'normal', weight: 100 }, { qd: 16 });
    const lo = sim.vm('lo', { priority: 'low', reservation: { iops: 400 } }, { qd: 16 });
    await sim.run(3);
    const n = (v: typeof hi) => countIn(v.done, 1, 3) / 2;
    expect(n(no)).toBeLessThan(10); // normal gets nothing while high is backlogged
    expect(n(lo)).toBeGreaterThanOrEqual(395); // low gets its reservation
    expect(n(lo)).toBeLessThan(410);
    expect(n(hi)).toBeGreaterThan(3550);
    // high limited: normal gets what it leaves
    hi.flow.update(settingsOf({ priority: 'high', limit: { iops: 1000 } }));
    await sim.run(2);
    expect(countIn(no.done, 4, 5)).toBeGreaterThan(2500);
  });

  it('a runtime change applies from the next dispatch', async () => {
    const sim = makeSim(DEV);
    const a = sim.vm('a', { limit: { iops: 500 } }, { qd: 16 });
    await sim.run(2);
    a.flow.update(settingsOf({ limit: { iops: 2000 } }));
    await sim.run(2);
    a.flow.update(settingsOf({}));
    await sim.run(1);
    expect(countIn(a.done, 1, 2)).toBeLessThanOrEqual(most(500));
    expect(countIn(a.done, 3, 4)).toBeGreaterThan(1990);
    expect(countIn(a.done, 3, 4)).toBeLessThanOrEqual(most(2000));
    expect(countIn(a.done, 4.1, 5)).toBeGreaterThan(0.9 * 3900);
  });

  it('raises "migrate advised" when a reservation is unmet for adviseAfterSeconds while backlogged, and withdraws it', async () => {
    const advised: string[] = [];
    const sim = makeSim({ ...DEV, adviseAfterSeconds: 3, onMigrateAdvised: (f) => advised.push(f.name) });
    // 2 x 3000 reserved on a 4000/s device: neither can be met
    const a = sim.vm('a', { reservation: { iops: 3000 } }, { qd: 16 });
    const b = sim.vm('b', { reservation: { iops: 3000 } }, { qd: 16 });
    const c = sim.vm('c', { reservation: { iops: 10 } }, { qd: 16 }); // met: never advised
    for (let i = 0; i < 5; i++) {
      await sim.run(1);
      sim.sched.tick();
    }
    expect(advised.sort()).toEqual(['a', 'b']);
    expect(a.flow.status(sim.clock.now()).migrateAdvised).toBe(true);
    expect(c.flow.status(sim.clock.now()).migrateAdvised).toBe(false);
    // b goes away: a's reservation is met again, the advice is withdrawn after 3 s
    b.stop();
    for (let i = 0; i < 5; i++) {
      await sim.run(1);
      sim.sched.tick();
    }
    expect(a.flow.status(sim.clock.now()).migrateAdvised).toBe(false);
    expect(a.flow.status(sim.clock.now()).migrateAdvisedEvents).toBe(1);
  });

  it('no advice for a VM that is below its reservation only because it asks for less', async () => {
    const advised: string[] = [];
    const sim = makeSim({ ...DEV, adviseAfterSeconds: 2, onMigrateAdvised: (f) => advised.push(f.name) });
    sim.vm('a', { reservation: { iops: 3000 } }, { qd: 1 }); // QD1 at 1 ms: 1000/s at most, anywhere
    sim.vm('b', { weight: 1 }, { qd: 2 }); // the device is not saturated: a never waits long
    for (let i = 0; i < 4; i++) {
      await sim.run(1);
      sim.sched.tick();
    }
    expect(advised).toEqual([]);
  });

  it('reports rates, percentiles, queue and throttled time', async () => {
    const sim = makeSim(DEV);
    const a = sim.vm('a', { limit: { iops: 100 } }, { qd: 8 });
    await sim.run(1);
    sim.sched.tick();
    await sim.run(1);
    sim.sched.tick();
    const st = a.flow.status(sim.clock.now());
    expect(st.iops).toBeGreaterThan(95);
    expect(st.iops).toBeLessThan(105);
    expect(st.bps).toBeCloseTo(st.iops * 4096, -3);
    expect(st.queued).toBeGreaterThan(0);
    expect(st.throttledSeconds).toBeGreaterThan(5); // ~8 requests always waiting
    expect(st.latency.p50).toBeGreaterThan(0.05); // each waits ~80 ms
    expect(st.latency.p99).toBeGreaterThanOrEqual(st.latency.p50);
    expect(sim.sched.status()).toMatchObject({ depth: 4, queued: st.queued });
  });

  it('failures reach the caller; the slot is given back', async () => {
    const clock = new SimClock();
    const sched = new QosScheduler({ depth: 1, clock });
    const f = sched.addFlow('a', settingsOf({}));
    const bad = f.submit(OpKind.Write, 10, () => Promise.reject(new Error('EIO')));
    const thrown = f.submit(OpKind.Write, 10, () => {
      throw new Error('sync');
    });
    const good = f.submit(OpKind.Read, 10, () => Promise.resolve(7));
    await expect(bad).rejects.toThrow('EIO');
    await expect(thrown).rejects.toThrow('sync');
    await expect(good).resolves.toBe(7);
    expect(sched.outstanding).toBe(0);
    expect(sched.queued).toBe(0);
  });

  it('property: never more than depth outstanding, every request completes, limits hold per window', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 6 }),
        fc.array(
          fc.record({
            weight: fc.integer({ min: 1, max: 8 }),
            limit: fc.option(fc.integer({ min: 50, max: 3000 }), { nil: undefined }),
            reservation: fc.option(fc.integer({ min: 10, max: 500 }), { nil: undefined }),
            priority: fc.constantFrom('high' as const, 'normal' as const, 'low' as const),
            qd: fc.integer({ min: 1, max: 12 }),
          }),
          { minLength: 1, maxLength: 4 },
        ),
        async (depth, vms) => {
          const sim = makeSim({ depth, serviceSeconds: 0.002 });
          const vs = vms.map((v, i) =>
            sim.vm(
              `v${i}`,
              {
                weight: v.weight,
                priority: v.priority,
                ...(v.limit ? { limit: { iops: v.limit, burstSeconds: 0 } } : {}),
                ...(v.reservation && (!v.limit || v.reservation <= v.limit) ? { reservation: { iops: v.reservation } } : {}),
              },
              { qd: v.qd },
            ),
          );
          await sim.run(1.5);
          for (const v of vs) v.stop();
          await sim.run(5);
          expect(sim.maxInService()).toBeLessThanOrEqual(depth);
          expect(sim.sched.queued).toBe(0);
          expect(sim.sched.outstanding).toBe(0);
          vms.forEach((v, i) => {
            expect(vs[i]!.done.length).toBe(vs[i]!.started.length);
            if (v.limit) expect(maxInWindow(vs[i]!.started, 1)).toBeLessThanOrEqual(most(v.limit));
          });
        },
      ),
      { numRuns: 25 },
    );
  }, 60_000);
});
