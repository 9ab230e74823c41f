/**
 * A simulated clock and device for the QoS scheduler: time moves only when the simulation says
 * so, a request takes a fixed service time (plus bytes / bandwidth), and clients are closed
 * loops keeping N requests outstanding. Every dispatch and completion is recorded with its time.
 */
import { OpKind, QosScheduler, type QosClock, type QosFlow, type QosSchedulerOptions } from '../../../lib/qos/scheduler.js';
import type { QosSettings } from '../../../lib/qos/settings.js';

interface Ev {
  at: number;
  seq: number;
  fn: () => void;
  cancelled: boolean;
}

/** Binary min-heap on (at, seq). */
class Heap {
  private a: Ev[] = [];
  get size(): number {
    return this.a.length;
  }
  peek(): Ev | undefined {
    return this.a[0];
  }
  push(e: Ev): void {
    const a = this.a;
    a.push(e);
    let i = a.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (less(a[p]!, a[i]!)) break;
      [a[p], a[i]] = [a[i]!, a[p]!];
      i = p;
    }
  }
  pop(): Ev | undefined {
    const a = this.a;
    const top = a[0];
    const last = a.pop();
    if (a.length && last) {
      a[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < a.length && less(a[l]!, a[m]!)) m = l;
        if (r < a.length && less(a[r]!, a[m]!)) m = r;
        if (m === i) break;
        [a[m], a[i]] = [a[i]!, a[m]!];
        i = m;
      }
    }
    return top;
  }
}
const less = (x: Ev, y: Ev): boolean => x.at < y.at || (x.at === y.at && x.seq < y.seq);

const settle = (): Promise<void> => new Promise((r) => setImmediate(r));

export class SimClock implements QosClock {
  t = 0;
  /** Every timer fires this much late (an event loop busy elsewhere). */
  lateness = 0;
  private seq = 0;
  private readonly heap = new Heap();
  now(): number {
    return this.t;
  }
  setTimer(fn: () => void, delaySeconds: number): Ev {
    const e: Ev = { at: this.t + Math.max(0, delaySeconds) + this.lateness, seq: this.seq++, fn, cancelled: false };
    this.heap.push(e);
    return e;
  }
  clearTimer(h: unknown): void {
    (h as Ev).cancelled = true;
  }
  /** Runs every event up to time `end` (promise reactions settle between instants). */
  async runUntil(end: number): Promise<void> {
    await settle();
    for (;;) {
      const top = this.heap.peek();
      if (!top || top.at > end) break;
      const at = top.at;
      this.t = at;
      // everything due at this instant, then let the promise reactions run
      while (this.heap.peek() && this.heap.peek()!.at === at) {
        const e = this.heap.pop()!;
        if (!e.cancelled) e.fn();
      }
      await settle();
    }
    this.t = end;
    await settle();
  }
}

export interface SimVm {
  flow: QosFlow;
  /** Completion times (seconds). */
  done: number[];
  /** Dispatch (service start) times. */
  started: number[];
  /** Keep N outstanding until stopped. */
  stop(): void;
  /** Starts (again) with this queue depth and request size. */
  start(qd?: number): void;
  errors: number;
}

export interface Sim {
  clock: SimClock;
  sched: QosScheduler;
  /** Requests in service at the device now (checked against depth). */
  inService(): number;
  maxInService(): number;
  vm(name: string, settings: Partial<QosSettings>, opts?: { qd?: number; bytes?: number; autostart?: boolean }): SimVm;
  run(seconds: number): Promise<void>;
}

export function settingsOf(p: Partial<QosSettings>): QosSettings {
  return {
    reservation: p.reservation ?? {},
    limit: { burstSeconds: 0, ...(p.limit ?? {}) },
    weight: p.weight ?? 1,
    priority: p.priority ?? 'normal',
  };
}

/**
 * A device with `depth` slots taken by the scheduler, each request served in
 * `serviceSeconds + bytes / bandwidth`.
 */
export function makeSim(o: { depth: number; serviceSeconds: number; bandwidth?: number } & Omit<QosSchedulerOptions, 'clock' | 'depth'>): Sim {
  const clock = new SimClock();
  const sched = new QosScheduler({ ...o, clock });
  let busy = 0;
  let maxBusy = 0;
  const service = (bytes: number, started: number[]): Promise<void> => {
    busy++;
    maxBusy = Math.max(maxBusy, busy);
    started.push(clock.now());
    return new Promise((resolve) => {
      clock.setTimer(
        () => {
          busy--;
          resolve();
        },
        o.serviceSeconds + (o.bandwidth ? bytes / o.bandwidth : 0),
      );
    });
  };
  return {
    clock,
    sched,
    inService: () => busy,
    maxInService: () => maxBusy,
    vm(name, settings, opts = {}) {
      const flow = sched.addFlow(name, settingsOf(settings));
      const bytes = opts.bytes ?? 4096;
      let running = false;
      let outstanding = 0;
      let want = opts.qd ?? 8;
      const v: SimVm = {
        flow,
        done: [],
        started: [],
        errors: 0,
        stop: () => {
          running = false;
        },
        start: (qd) => {
          if (qd !== undefined) want = qd;
          running = true;
          while (outstanding < want) issue();
        },
      };
      const issue = (): void => {
        outstanding++;
        flow.submit(OpKind.Read, bytes, () => service(bytes, v.started)).then(
          () => {
            outstanding--;
            v.done.push(clock.now());
            if (running && outstanding < want) issue();
          },
          () => {
            outstanding--;
            v.errors++;
          },
        );
      };
      if (opts.autostart !== false) v.start();
      return v;
    },
    run: (seconds) => clock.runUntil(clock.t + seconds),
  };
}

/** Number of times in [from, to). */
export function countIn(times: number[], from: number, to: number): number {
  let n = 0;
  for (const t of times) if (t >= from && t < to) n++;
  return n;
}

/** The most times found in any window of `width` seconds (sliding over every time). */
export function maxInWindow(times: number[], width: number): number {
  const s = [...times].sort((a, b) => a - b);
  let best = 0;
  let j = 0;
  for (let i = 0; i < s.length; i++) {
    while (s[i]! - s[j]! >= width) j++;
    best = Math.max(best, i - j + 1);
  }
  return best;
}
