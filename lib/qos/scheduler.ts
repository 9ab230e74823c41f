/**
 * The host-wide I/O scheduler: mClock (Gulati, Merchant, Varman, OSDI 2010) as dmClock refined
 * it, over one bounded device queue shared by every VM of the host.
 *
 * Each VM is a flow with a reservation R, a limit L (IOPS and/or bytes/s), a weight W and a
 * priority class. A flow's queued requests are served in FIFO order; only the head carries
 * tags, computed when it becomes the head (at time `now`):
 *
 *   R tag = max(R_next, arrival)        R_next = R tag + 1/r (per request; + bytes/r for bytes/s)
 *   L tag = max(L_next, now - burst')   L_next = L tag + 1/l (likewise); burst' = max(burst, 20 ms)
 *   P tag = max(P_next, V[class])       P_next = P tag + cost/W, cost = 1 + bytes/costUnit
 *
 * With both dimensions configured, the R tag is the earlier of the two (either unmet dimension
 * makes the reservation due) and the L tag the later (both limits hold). Whenever fewer than
 * `depth` requests are outstanding at the backends, the next request is chosen:
 *
 *   1. reservation phase: among heads with R <= now (and L <= now), the smallest R tag;
 *   2. weight phase: among heads with L <= now, the highest priority class, then the smallest
 *      P tag — strict priority between classes, shares by weight within a class (a low class
 *      gets only what high and normal leave, plus its reservation: give it one to bound its wait);
 *   3. nothing eligible: every queued head is over its limit; a timer wakes at the earliest L.
 *
 * Why these choices:
 * - Requests over the allocation wait in their flow's queue, they never fail. The queue is as
 *   long as the protocol edge lets it be (NBD: in-flight requests per connection; vhost: the
 *   virtqueue size), which is the backpressure.
 * - No banked credit: R tags restart at the request's arrival and L tags at `now - burst` when a
 *   flow was idle; P tags restart at the class's virtual time V (the largest P tag dispatched in
 *   the class: start-time fair queueing), which is mClock's tag adjustment on reactivation. A
 *   backlogged flow behind its reservation catches up on what its queued requests waited for
 *   (their arrival times are in the past), never on time it was idle.
 * - A reservation is a floor, not an extra: requests served by weight advance the R tags too,
 *   so a VM gets max(reservation, its weight share), capped by its limit.
 * - A request served in the reservation phase is not charged to the flow's P tag (mClock's
 *   adjustment): weights share what is left over after reservations.
 * - Limits use start tags: a request is eligible once the previous ones' cost is paid, so an
 *   isolated request is never delayed, and in any window of T seconds a flow gets at most
 *   l x (T + burst') + 2 requests (bytes likewise). A flow stalled by contention gathers at most
 *   `burst` seconds of credit; one stalled by the process (GC, CPU) gathers none.
 * - `depth` bounds what is outstanding host-wide, so that under saturation the order of
 *   dispatch — which this scheduler decides — is the share each VM gets.
 *
 * The cheap path: nothing queued anywhere and a free device slot — the request's tags are
 * computed and it runs at once, no queue entry, one extra promise reaction for its completion.
 *
 * Time and timers are injected (QosClock): the unit tests run it on a simulated clock over a
 * simulated device.
 */
import type { Logger } from '../log.js';
import { LatencyHistogram } from './histogram.js';
import { DEFAULT_HOST_QOS, QOS_PRIORITIES, type QosSettings } from './settings.js';

export interface QosClock {
  /** Monotonic time, seconds. */
  now(): number;
  setTimer(fn: () => void, delaySeconds: number): unknown;
  clearTimer(handle: unknown): void;
}

/** The process's clock; timers are unref'd (sockets keep the process alive, not the scheduler). */
export const realClock: QosClock = {
  now: () => performance.now() / 1000,
  setTimer: (fn, d) => {
    const t = setTimeout(fn, Math.max(0, Math.ceil(d * 1000)));
    t.unref();
    return t;
  },
  clearTimer: (h) => clearTimeout(h as NodeJS.Timeout),
};

/** What a request is, for the counters: a read, a write, or another operation (flush, trim, zeroes). */
export const OpKind = { Read: 0, Write: 1, Other: 2 } as const;
export type OpKind = (typeof OpKind)[keyof typeof OpKind];

export interface QosSchedulerOptions {
  depth?: number;
  costUnit?: number;
  adviseAfterSeconds?: number;
  clock?: QosClock;
  logger?: Logger;
  /** Called when a flow's reservation has gone unmet for adviseAfterSeconds while it had requests queued. */
  onMigrateAdvised?: (flow: QosFlow) => void;
}

interface Req {
  kind: OpKind;
  bytes: number;
  fn: () => Promise<unknown>;
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
  /** When it was queued (seconds). */
  queuedAt: number;
}

/** What `status()` says of a flow (a VM). */
export interface QosFlowStatus {
  settings: QosSettings;
  /** Completions per second and bytes per second over the last window (about one second). */
  iops: number;
  bps: number;
  /** Latency (queueing + service) percentiles over the last window, seconds. */
  latency: { p50: number; p90: number; p99: number };
  /** Requests waiting in the scheduler now; requests at the backends now. */
  queued: number;
  outstanding: number;
  /** Totals since the flow was created (completed requests). */
  reads: number;
  writes: number;
  others: number;
  bytesRead: number;
  bytesWritten: number;
  /** Requests dispatched in the reservation phase. */
  reservationDispatches: number;
  /** Total time requests spent queued here (waiting for a device slot, their limit or their turn). */
  throttledSeconds: number;
  /**
   * Cumulative latency sum (seconds) and count: a Prometheus summary's _sum and _count. Requests
   * of an unconstrained VM that ran on the cheap path are sampled (1 in 8): count is then about
   * 1/8 of the requests; the percentiles and the mean (sum / count) are those of the sample.
   */
  latencySum: number;
  latencyCount: number;
  /** The reservation has gone unmet while backlogged for adviseAfterSeconds (and has not recovered). */
  migrateAdvised: boolean;
  migrateAdvisedEvents: number;
  /** Seconds the reservation has been unmet while backlogged, in the current run of such seconds. */
  reservationShortSeconds: number;
}

export interface QosHostStatus {
  depth: number;
  outstanding: number;
  queued: number;
  costUnit: number;
  adviseAfterSeconds: number;
}

const RANK: Record<QosSettings['priority'], number> = { high: 0, normal: 1, low: 2 };

/**
 * The least burst a limit allows (seconds). Dispatch happens at event-loop granularity (a
 * completion, an arrival, a timer of >= 1 ms): a request eligible at t is often dispatched a
 * little later, and with no slack at all each late dispatch would be lost for good (a limit of
 * 2000/s measured at 1100/s under load). 20 ms of catch-up keeps the rate and exceeds a
 * one-second window by at most 2%.
 */
export const LIMIT_SLACK_SECONDS = 0.02;

/** On the unconstrained cheap path, the latency of one request in (mask + 1) is measured. */
export const LATENCY_SAMPLE_MASK = 7;

/** Numbers the hot path reads, derived once from the settings (0: dimension not configured). */
interface Rates {
  rIops: number;
  rBps: number;
  lIops: number;
  lBps: number;
  burst: number;
  /** 1 / weight. */
  invW: number;
  rank: number;
  constrained: boolean;
}

function ratesOf(s: QosSettings): Rates {
  return {
    rIops: s.reservation.iops ?? 0,
    rBps: s.reservation.bps ?? 0,
    lIops: s.limit.iops ?? 0,
    lBps: s.limit.bps ?? 0,
    burst: s.limit.burstSeconds,
    invW: 1 / s.weight,
    rank: RANK[s.priority],
    constrained: s.reservation.iops !== undefined || s.reservation.bps !== undefined || s.limit.iops !== undefined || s.limit.bps !== undefined,
  };
}

/** One VM's share of the host: its settings, queue, tags and counters. */
export class QosFlow {
  private rates: Rates;
  private s: QosSettings;
  /** FIFO of waiting requests: queue[qHead..] (compacted now and then). */
  queue: Req[] = [];
  qHead = 0;
  /** Index in the scheduler's active list, -1 when the queue is empty. */
  activeIndex = -1;
  removed = false;

  // Tags of the head request (valid while queued > 0, or transiently on the cheap path).
  hR = Infinity;
  hL = -Infinity;
  hP = 0;
  private hRi = 0;
  private hRb = 0;
  private hLi = 0;
  private hLb = 0;
  // Where the next request's tags start (start-tag chains).
  private nRi = -Infinity;
  private nRb = -Infinity;
  private nLi = -Infinity;
  private nLb = -Infinity;
  private nP = 0;

  // Counters.
  outstanding = 0;
  private reads = 0;
  private writes = 0;
  private others = 0;
  private bytesRead = 0;
  private bytesWritten = 0;
  private reservationDispatches = 0;
  private throttledSeconds = 0;
  /** Latencies of the current window (percentiles); the totals are two numbers. */
  private readonly window = new LatencyHistogram();
  private latencySum = 0;
  private latencyCount = 0;
  // Window (tick) state.
  private winOps = 0;
  private winBytes = 0;
  private lastIops = 0;
  private lastBps = 0;
  private lastLatency = { p50: 0, p90: 0, p99: 0 };
  private backlogSeconds = 0;
  private backlogSince = 0;
  private shortSince: number | undefined;
  private okSince: number | undefined;
  private advised = false;
  private advisedEvents = 0;

  constructor(
    readonly name: string,
    settings: QosSettings,
    private readonly sched: QosScheduler,
  ) {
    this.s = settings;
    this.rates = ratesOf(settings);
  }

  get settings(): QosSettings {
    return this.s;
  }

  get queued(): number {
    return this.queue.length - this.qHead;
  }

  /** Runs `fn` when the scheduler dispatches it; resolves or rejects with what `fn` does. */
  submit<T>(kind: OpKind, bytes: number, fn: () => Promise<T>): Promise<T> {
    return this.sched.submit(this, kind, bytes, fn);
  }

  /** New settings; they apply from the next dispatch (the head is tagged again at once). */
  update(settings: QosSettings): void {
    this.s = settings;
    this.rates = ratesOf(settings);
    // A removed dimension must not leave a stale chain behind for when it is set again.
    if (!this.rates.rIops) this.nRi = -Infinity;
    if (!this.rates.rBps) this.nRb = -Infinity;
    if (!this.rates.lIops) this.nLi = -Infinity;
    if (!this.rates.lBps) this.nLb = -Infinity;
    if (this.queued > 0) {
      const head = this.queue[this.qHead]!;
      this.tagHead(head.bytes, this.sched.clock.now(), head.queuedAt);
    }
    this.sched.kick();
  }

  /**
   * Computes the tags of a request about to be the head (see the file's header), which arrived
   * at `arrival` (<= now).
   */
  tagHead(bytes: number, now: number, arrival: number): void {
    const r = this.rates;
    let R = Infinity;
    if (r.rIops) R = this.hRi = Math.max(this.nRi, arrival);
    if (r.rBps) {
      this.hRb = Math.max(this.nRb, arrival);
      if (this.hRb < R) R = this.hRb;
    }
    let L = -Infinity;
    if (r.lIops || r.lBps) {
      const floor = now - (r.burst > LIMIT_SLACK_SECONDS ? r.burst : LIMIT_SLACK_SECONDS);
      if (r.lIops) L = this.hLi = Math.max(this.nLi, floor);
      if (r.lBps) {
        this.hLb = Math.max(this.nLb, floor);
        if (this.hLb > L) L = this.hLb;
      }
    }
    this.hR = R;
    this.hL = L;
    const v = this.sched.virtualTime[r.rank]!;
    this.hP = this.nP > v ? this.nP : v;
  }

  /** Advances the tag chains past the head, which is being dispatched. */
  charge(bytes: number, byReservation: boolean): void {
    const r = this.rates;
    if (r.rIops) this.nRi = this.hRi + 1 / r.rIops;
    if (r.rBps) this.nRb = this.hRb + bytes / r.rBps;
    if (r.lIops) this.nLi = this.hLi + 1 / r.lIops;
    if (r.lBps) this.nLb = this.hLb + bytes / r.lBps;
    if (byReservation) {
      this.reservationDispatches++;
    } else {
      this.nP = this.hP + (1 + bytes / this.sched.costUnit) * r.invW;
      const vt = this.sched.virtualTime;
      if (this.hP > vt[r.rank]!) vt[r.rank] = this.hP;
    }
  }

  get rank(): number {
    return this.rates.rank;
  }

  /** A reservation or a limit is set: tags need the clock. */
  get constrained(): boolean {
    return this.rates.constrained;
  }

  /** Counts cheap-path requests, to time one in LATENCY_SAMPLE_MASK + 1. */
  sampleTick = 0;

  /** A request finished (successfully or not) after `latency` seconds. */
  completed(kind: OpKind, bytes: number, latency: number): void {
    this.outstanding--;
    if (kind === OpKind.Read) {
      this.reads++;
      this.bytesRead += bytes;
    } else if (kind === OpKind.Write) {
      this.writes++;
      this.bytesWritten += bytes;
    } else this.others++;
    this.winOps++;
    this.winBytes += bytes;
    if (latency < 0) return; // not sampled
    this.latencySum += latency;
    this.latencyCount++;
    this.window.record(latency);
  }

  waited(seconds: number): void {
    this.throttledSeconds += seconds;
  }

  becameActive(now: number): void {
    this.backlogSince = now;
  }

  becameIdle(now: number): void {
    this.backlogSeconds += now - this.backlogSince;
  }

  /**
   * Closes a window of `dt` seconds ending at `now`: rates, percentiles, and the "migrate
   * advised" check (the reservation unmet by more than 5% in a window where the flow had
   * requests queued at least half of the time). Returns true when the advice was just raised.
   */
  closeWindow(now: number, dt: number, adviseAfter: number): boolean {
    if (this.activeIndex >= 0) {
      this.backlogSeconds += now - this.backlogSince;
      this.backlogSince = now;
    }
    this.lastIops = dt > 0 ? this.winOps / dt : 0;
    this.lastBps = dt > 0 ? this.winBytes / dt : 0;
    this.lastLatency = { p50: this.window.quantile(0.5), p90: this.window.quantile(0.9), p99: this.window.quantile(0.99) };
    const r = this.rates;
    const backlogged = dt > 0 && this.backlogSeconds >= dt / 2;
    const short = (r.rIops > 0 && this.winOps < 0.95 * r.rIops * dt) || (r.rBps > 0 && this.winBytes < 0.95 * r.rBps * dt);
    this.winOps = 0;
    this.winBytes = 0;
    this.backlogSeconds = 0;
    this.window.reset();
    let raised = false;
    if (backlogged && short) {
      this.okSince = undefined;
      this.shortSince ??= now - dt;
      if (!this.advised && now - this.shortSince >= adviseAfter - 1e-9) {
        this.advised = true;
        this.advisedEvents++;
        raised = true;
      }
    } else {
      this.shortSince = undefined;
      if (this.advised) {
        this.okSince ??= now - dt;
        if (now - this.okSince >= adviseAfter - 1e-9) {
          this.advised = false;
          this.okSince = undefined;
          this.sched.logger?.info({ vm: this.name }, 'qos: reservation met again, migrate advice withdrawn');
        }
      }
    }
    return raised;
  }

  status(now: number): QosFlowStatus {
    return {
      settings: this.s,
      iops: this.lastIops,
      bps: this.lastBps,
      latency: this.lastLatency,
      queued: this.queued,
      outstanding: this.outstanding,
      reads: this.reads,
      writes: this.writes,
      others: this.others,
      bytesRead: this.bytesRead,
      bytesWritten: this.bytesWritten,
      reservationDispatches: this.reservationDispatches,
      throttledSeconds: this.throttledSeconds + this.waitingNow(now),
      latencySum: this.latencySum,
      latencyCount: this.latencyCount,
      migrateAdvised: this.advised,
      migrateAdvisedEvents: this.advisedEvents,
      reservationShortSeconds: this.shortSince === undefined ? 0 : Math.max(0, now - this.shortSince),
    };
  }

  /** Time already spent by the requests still queued (so throttled time grows while they wait). */
  private waitingNow(now: number): number {
    let s = 0;
    for (let i = this.qHead; i < this.queue.length; i++) s += now - this.queue[i]!.queuedAt;
    return s;
  }
}

export class QosScheduler {
  readonly clock: QosClock;
  readonly costUnit: number;
  readonly adviseAfterSeconds: number;
  readonly logger: Logger | undefined;
  /** Per priority class: the largest P tag dispatched (start-time fair queueing's virtual time). */
  readonly virtualTime: number[] = QOS_PRIORITIES.map(() => 0);
  private depthLimit: number;
  private inflight = 0;
  private queuedTotal = 0;
  /** Flows with queued requests. */
  private readonly active: QosFlow[] = [];
  private readonly flows = new Set<QosFlow>();
  private timer: unknown;
  private timerAt = Infinity;
  private ticker: NodeJS.Timeout | undefined;
  private lastTick: number;
  private pumping = false;
  private readonly onMigrateAdvised: ((flow: QosFlow) => void) | undefined;

  constructor(opts: QosSchedulerOptions = {}) {
    this.clock = opts.clock ?? realClock;
    this.depthLimit = opts.depth ?? DEFAULT_HOST_QOS.depth;
    if (!Number.isSafeInteger(this.depthLimit) || this.depthLimit < 1) throw new RangeError('depth must be an integer >= 1');
    this.costUnit = opts.costUnit ?? DEFAULT_HOST_QOS.costUnit;
    this.adviseAfterSeconds = opts.adviseAfterSeconds ?? DEFAULT_HOST_QOS.adviseAfterSeconds;
    this.logger = opts.logger;
    this.onMigrateAdvised = opts.onMigrateAdvised;
    this.lastTick = this.clock.now();
  }

  get depth(): number {
    return this.depthLimit;
  }

  set depth(n: number) {
    if (!Number.isSafeInteger(n) || n < 1) throw new RangeError('depth must be an integer >= 1');
    this.depthLimit = n;
    this.kick();
  }

  get outstanding(): number {
    return this.inflight;
  }

  get queued(): number {
    return this.queuedTotal;
  }

  addFlow(name: string, settings: QosSettings): QosFlow {
    const f = new QosFlow(name, settings, this);
    this.flows.add(f);
    return f;
  }

  /** Forgets a flow (its disks are gone). Requests still queued are served first. */
  removeFlow(f: QosFlow): void {
    f.removed = true;
    this.flows.delete(f);
  }

  /** Runs the 1-second window (rates, percentiles, migrate advice) on the real clock. */
  start(): void {
    if (this.ticker) return;
    this.lastTick = this.clock.now();
    this.ticker = setInterval(() => this.tick(), 1000);
    this.ticker.unref();
  }

  close(): void {
    if (this.ticker) clearInterval(this.ticker);
    this.ticker = undefined;
    if (this.timer !== undefined) this.clock.clearTimer(this.timer);
    this.timer = undefined;
    this.timerAt = Infinity;
  }

  /** Closes the current window of every flow (the ticker calls it each second; tests call it). */
  tick(): void {
    const now = this.clock.now();
    const dt = now - this.lastTick;
    this.lastTick = now;
    for (const f of this.flows) {
      if (f.closeWindow(now, dt, this.adviseAfterSeconds)) {
        const st = f.status(now);
        this.logger?.warn(
          { vm: f.name, reservation: st.settings.reservation, iops: Math.round(st.iops), bps: Math.round(st.bps), queued: st.queued, unmetSeconds: Math.round(st.reservationShortSeconds) },
          'qos: migrate advised: the VM reservation has not been met on this host while it had requests queued',
        );
        this.onMigrateAdvised?.(f);
      }
    }
  }

  status(): QosHostStatus {
    return { depth: this.depthLimit, outstanding: this.inflight, queued: this.queuedTotal, costUnit: this.costUnit, adviseAfterSeconds: this.adviseAfterSeconds };
  }

  submit<T>(f: QosFlow, kind: OpKind, bytes: number, fn: () => Promise<T>): Promise<T> {
    if (this.queuedTotal === 0 && this.inflight < this.depthLimit && !f.constrained) {
      // The cheapest path: nobody waits, a slot is free, and the flow has no reservation or
      // limit, so its tags need no time (the P tag is virtual time). Reading the clock twice
      // was half of this layer's cost: latency is measured on 1 request in 8 here.
      f.tagHead(bytes, 0, 0);
      f.charge(bytes, false);
      return this.run(f, kind, bytes, fn, (++f.sampleTick & LATENCY_SAMPLE_MASK) === 0 ? this.clock.now() : -1);
    }
    const now = this.clock.now();
    if (this.queuedTotal === 0 && this.inflight < this.depthLimit) {
      // The cheap path: nobody waits, a slot is free; this request is the only candidate.
      f.tagHead(bytes, now, now);
      if (f.hL <= now) {
        f.charge(bytes, f.hR <= now);
        return this.run(f, kind, bytes, fn, now);
      }
    }
    return new Promise<T>((resolve, reject) => {
      const req: Req = { kind, bytes, fn, resolve: resolve as (v: unknown) => void, reject, queuedAt: now };
      f.queue.push(req);
      this.queuedTotal++;
      if (f.queued === 1) {
        f.tagHead(bytes, now, now);
        f.activeIndex = this.active.length;
        this.active.push(f);
        f.becameActive(now);
      }
      this.pump();
    });
  }

  /** Re-runs dispatch (settings or depth changed). */
  kick(): void {
    this.pump();
  }

  private run<T>(f: QosFlow, kind: OpKind, bytes: number, fn: () => Promise<T>, start: number): Promise<T> {
    this.inflight++;
    f.outstanding++;
    let p: Promise<T>;
    try {
      p = fn();
    } catch (e) {
      p = Promise.reject(e);
    }
    // The caller gets `p` itself (no extra promise hop on its path); the bookkeeping is a
    // reaction registered before the caller's, so the slot is free when the caller continues.
    // The promise `then` makes here settles either way: a rejection is the caller's to handle.
    const done = (): void => this.done(f, kind, bytes, start);
    p.then(done, done);
    return p;
  }

  private done(f: QosFlow, kind: OpKind, bytes: number, start: number): void {
    this.inflight--;
    f.completed(kind, bytes, start < 0 ? -1 : this.clock.now() - start);
    if (this.queuedTotal > 0) this.pump();
  }

  /** Dispatches while a slot is free and some head is eligible; else arms the limit timer. */
  private pump(): void {
    if (this.pumping) return;
    this.pumping = true;
    try {
      const active = this.active;
      while (this.inflight < this.depthLimit && active.length > 0) {
        const now = this.clock.now();
        let best: QosFlow | undefined;
        // 1. reservations due
        let bestR = Infinity;
        for (let i = 0; i < active.length; i++) {
          const f = active[i]!;
          if (f.hR <= now && f.hL <= now && f.hR < bestR) {
            best = f;
            bestR = f.hR;
          }
        }
        const byReservation = best !== undefined;
        if (!best) {
          // 2. by class, then weight (P tag), among flows under their limit
          let bestRank = Infinity;
          let bestP = Infinity;
          for (let i = 0; i < active.length; i++) {
            const f = active[i]!;
            if (f.hL > now) continue;
            const rank = f.rank;
            if (rank < bestRank || (rank === bestRank && f.hP < bestP)) {
              best = f;
              bestRank = rank;
              bestP = f.hP;
            }
          }
        }
        if (!best) {
          // 3. every head is over its limit: wake at the earliest L tag
          let at = Infinity;
          for (let i = 0; i < active.length; i++) if (active[i]!.hL < at) at = active[i]!.hL;
          this.arm(at, now);
          break;
        }
        this.dispatch(best, byReservation, now);
      }
    } finally {
      this.pumping = false;
    }
  }

  private dispatch(f: QosFlow, byReservation: boolean, now: number): void {
    const req = f.queue[f.qHead]!;
    f.queue[f.qHead] = undefined as unknown as Req;
    f.qHead++;
    this.queuedTotal--;
    f.charge(req.bytes, byReservation);
    f.waited(now - req.queuedAt);
    if (f.queued > 0) {
      const head = f.queue[f.qHead]!;
      f.tagHead(head.bytes, now, head.queuedAt);
      if (f.qHead >= 1024 && f.qHead * 2 >= f.queue.length) {
        f.queue = f.queue.slice(f.qHead);
        f.qHead = 0;
      }
    } else {
      f.queue.length = 0;
      f.qHead = 0;
      this.deactivate(f, now);
    }
    this.run(f, req.kind, req.bytes, req.fn, req.queuedAt).then(req.resolve, req.reject);
  }

  private deactivate(f: QosFlow, now: number): void {
    const i = f.activeIndex;
    const last = this.active.pop()!;
    if (last !== f) {
      this.active[i] = last;
      last.activeIndex = i;
    }
    f.activeIndex = -1;
    f.becameIdle(now);
  }

  private arm(at: number, now: number): void {
    if (this.timer !== undefined && this.timerAt <= at) return;
    if (this.timer !== undefined) this.clock.clearTimer(this.timer);
    this.timerAt = at;
    this.timer = this.clock.setTimer(() => {
      this.timer = undefined;
      this.timerAt = Infinity;
      this.pump();
    }, at - now);
  }
}
