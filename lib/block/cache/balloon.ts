/**
 * The balloon-style capacity scheduler of the cache device (issue 7, item 2): every interval it
 * moves each VM's allotment (the most cache space its disks may hold) toward a target computed
 * from the VM's shares and its measured benefit, never faster than `rate`, and writes a VM's dirty
 * lines back before it lowers that VM's allotment below what it holds.
 *
 * Two parts: a pure core (`BalloonCore`: counters in, allotments out, a clock passed in, so the
 * unit tests drive it with fake clocks and inputs) and a thin driver (`BalloonScheduler`: a timer,
 * the disks' stats, drain before shrink, setAllotment, a log line when targets move).
 *
 * ## The formula
 * Per VM i, over the activity window (the last `windowTicks` intervals):
 *   A_i  = bytes read + written through its disks, U_i = bytes it holds, a_i = its allotment now,
 *   f_i  = min(1, A_i / max(a_i, one line))  the active fraction of its allotment (0 with no I/O),
 *   k    = 1 / (1 - idleTax)                 the cost of an idle byte (idleTax capped at 0.99),
 *   w_i  = S_i / (f_i + k (1 - f_i))         its effective shares.
 * This is the idle tax of VMware ESX (C. A. Waldspurger, "Memory Resource Management in VMware
 * ESX Server", OSDI 2002, section 5.2): there memory is reclaimed from the VM with the lowest
 * shares-per-page ratio rho = S / (P (f + k (1 - f))); at equilibrium every VM has the same rho,
 * so P_i is proportional to w_i. An all-active VM keeps its shares (f = 1: w = S); an idle one
 * counts as S / k (with the default tax 0.5: half its shares).
 *
 * Benefit: a VM whose reads all hit in the window (no read misses) would gain nothing from more
 * space, so its target is capped at what it holds plus a little slack (max(4 lines, U/8)); a VM
 * with misses is not capped (its misses would benefit). The cap only decides contention: space
 * the capped VMs leave over is shared again by weight without it (an uncontended device is all
 * allotted, up to each VM's max). With C the device's capacity minus
 * the fixed allotments (a disk with an explicit `cache.allotment` is left alone), the targets are
 * the weighted max-min fair shares ("water filling"): T_i = clamp(lambda w_i, lo_i, hi_i) with
 * lambda chosen so that sum T_i = C (or every VM at hi_i), lo_i = max(min_i, a line per disk),
 * hi_i = min(max_i, benefit cap). Targets are whole lines and their sum never exceeds C (when the
 * minimums alone exceed C they are scaled down).
 *
 * Movement: a VM's allotment moves toward its target by at most rate * elapsed (elapsed capped
 * at 4 intervals, so a stalled timer does not make a jump). Shrinks first; grows only take the
 * space not allotted after the shrinks (shared in proportion to what each asks when short), so the
 * sum of allotments never exceeds C. A disk starts (registered or after a restart) at what it
 * holds. A shrink below what the VM holds while it has dirty data first writes that data back
 * (CacheVolume.drain); until that finishes the VM keeps its allotment (and others do not grow
 * into it), so eviction can free clean lines when it lands.
 *
 * Inside a VM, its allotment is split over its disks: one line each, then the rest half equally
 * and half by each disk's activity in the window (equally when the VM had none).
 */
import type { Logger } from 'pino';

/** A VM's share of the cache (config `vms[].cache`). */
export interface VmCachePolicy {
  /** Relative share (default 1). */
  shares: number;
  minBytes?: number;
  maxBytes?: number;
}

export const DEFAULT_VM_CACHE_POLICY: VmCachePolicy = { shares: 1 };

/** The scheduler's settings (config `cache.balloon`). */
export interface BalloonSettings {
  enabled: boolean;
  intervalMs: number;
  /** Bytes per second a VM's allotment may move. */
  rateBytesPerSec: number;
  /** 0..1: how much less an idle byte counts (VMware's memory idle tax; default 0.5). */
  idleTax: number;
}

export const DEFAULT_BALLOON: BalloonSettings = { enabled: true, intervalMs: 1000, rateBytesPerSec: 64 * 1024 * 1024, idleTax: 0.5 };

/** Intervals the activity and benefit measures look back over. */
export const WINDOW_TICKS = 10;

/** One ballooned disk as the core sees it: cumulative counters, what it holds now. */
export interface BalloonDiskInput {
  /** `VM/DISK` plus an identity: counters of a reopened disk start again. */
  id: string;
  readHitBytes: number;
  readMissBytes: number;
  writtenBytes: number;
  usedBytes: number;
}

export interface BalloonVmInput {
  vm: string;
  policy: VmCachePolicy;
  disks: BalloonDiskInput[];
}

/** What the scheduler says of a VM (in a plan, and in the status). */
export interface BalloonVmFigures {
  vm: string;
  shares: number;
  minBytes?: number;
  maxBytes?: number;
  /** Effective shares (after the idle tax). */
  weight: number;
  activeFraction: number;
  /** Read hits / (hits + misses) in the last interval (0 without reads). */
  hitRatio: number;
  /** Bytes read + written per second over the window. */
  activityBytesPerSec: number;
  targetBytes: number;
  /** The allotment (after this tick, in a plan). */
  allotmentBytes: number;
  usedBytes: number;
}

export interface BalloonVmPlan extends BalloonVmFigures {
  /** No read misses in the window: capped at what it holds plus slack. */
  benefitCapped: boolean;
  /** The allotment before this tick. */
  fromBytes: number;
  /** Per disk (id -> bytes), the split of `allotmentBytes`. */
  disks: Map<string, number>;
}

/** A disk's counters at the last committed tick and its activity window. */
interface DiskState {
  last: { readHitBytes: number; readMissBytes: number; writtenBytes: number };
  /** Per tick: [activity, misses], newest last, at most WINDOW_TICKS. */
  window: Array<[number, number]>;
}

export interface BalloonPlan {
  now: number;
  capacityBytes: number;
  /** Allotments may move by this much this tick. */
  maxStepBytes: number;
  vms: BalloonVmPlan[];
  /** The disks' state once the plan is committed. */
  readonly diskStates: ReadonlyMap<string, DiskState>;
}

/** Growth of a cumulative counter since `old` (a counter that went back: a reopened disk, counting from 0). */
function delta(cur: number, old: number | undefined): number {
  return old === undefined ? 0 : cur >= old ? cur - old : cur;
}

interface VmState {
  allotment: number;
}

/** Weighted max-min fair shares of `total` (integers) with floors and caps. */
export function waterFill(total: number, items: Array<{ weight: number; lo: number; hi: number }>): number[] {
  const n = items.length;
  if (n === 0) return [];
  let lo = items.map((it) => Math.max(0, Math.floor(it.lo)));
  const hi = items.map((it, i) => Math.max(lo[i]!, Math.floor(it.hi)));
  const sumLo = lo.reduce((a, b) => a + b, 0);
  if (sumLo >= total) {
    // The minimums alone do not fit: scale them down (floors keep the sum <= total).
    if (sumLo > total) lo = lo.map((x) => Math.floor((x * total) / sumLo));
    return lo;
  }
  const at = (lambda: number): number[] => items.map((it, i) => Math.min(hi[i]!, Math.max(lo[i]!, lambda * it.weight)));
  const sum = (xs: number[]): number => xs.reduce((a, b) => a + b, 0);
  if (sum(hi) <= total) return hi;
  // sum(at(lambda)) is non-decreasing in lambda: bisect for sum = total.
  let a = 0;
  let b = 1;
  while (sum(at(b)) < total) b *= 2;
  for (let k = 0; k < 100; k++) {
    const m = (a + b) / 2;
    if (sum(at(m)) < total) a = m;
    else b = m;
  }
  const exact = at(a);
  const out = exact.map((x) => Math.floor(x));
  // Hand out the lines lost to rounding, largest remainder first, never over a cap.
  let left = total - sum(out);
  const order = exact.map((x, i) => [x - Math.floor(x), i] as const).sort((p, q) => q[0] - p[0]);
  for (const [, i] of order) {
    if (left <= 0) break;
    if (out[i]! < hi[i]!) {
      out[i]!++;
      left--;
    }
  }
  return out;
}

/** The pure scheduler: counters and a clock in, targets and allotments out. */
export class BalloonCore {
  private readonly disks = new Map<string, DiskState>();
  private readonly vms = new Map<string, VmState>();
  private lastNow: number | undefined;

  constructor(
    private readonly settings: BalloonSettings,
    readonly lineSize: number,
  ) {}

  /** The allotment the core holds for a VM (undefined before its first commit). */
  allotmentOf(vm: string): number | undefined {
    return this.vms.get(vm)?.allotment;
  }

  /**
   * Plans one tick without changing state. `hold`: VMs whose allotment may not shrink this tick
   * (their dirty data is still being written back): they keep it and nobody grows into it.
   */
  plan(now: number, capacityBytes: number, inputs: BalloonVmInput[], hold: ReadonlySet<string> = new Set()): BalloonPlan {
    const line = this.lineSize;
    const s = this.settings;
    const capLines = Math.max(0, Math.floor(capacityBytes / line));
    const elapsed = this.lastNow === undefined ? s.intervalMs : Math.min(Math.max(0, now - this.lastNow), 4 * s.intervalMs);
    const maxStep = Math.floor((s.rateBytesPerSec * elapsed) / 1000);
    const k = 1 / (1 - Math.min(0.99, Math.max(0, s.idleTax)));
    const windowMs = WINDOW_TICKS * s.intervalMs;

    // A VM seen for the first time starts at what it holds, within what no other VM is allotted.
    let unallotted = capLines * line - inputs.reduce((n, v) => n + (this.vms.get(v.vm)?.allotment ?? 0), 0);
    const diskStates = new Map<string, DiskState>();
    const measured = inputs.map((v) => {
      let activity = 0;
      let misses = 0;
      let tickHits = 0;
      let tickMisses = 0;
      let used = 0;
      const diskActivity = new Map<string, number>();
      for (const d of v.disks) {
        const st = this.disks.get(d.id);
        const prev = st?.last;
        const h = delta(d.readHitBytes, prev?.readHitBytes);
        const m = delta(d.readMissBytes, prev?.readMissBytes);
        const w = delta(d.writtenBytes, prev?.writtenBytes);
        const win = [...(st?.window ?? []), [h + m + w, m] as [number, number]].slice(-WINDOW_TICKS);
        diskStates.set(d.id, { last: { readHitBytes: d.readHitBytes, readMissBytes: d.readMissBytes, writtenBytes: d.writtenBytes }, window: win });
        const a = win.reduce((x, [y]) => x + y, 0);
        diskActivity.set(d.id, a);
        activity += a;
        misses += win.reduce((x, [, y]) => x + y, 0);
        tickHits += h;
        tickMisses += m;
        used += d.usedBytes;
      }
      let current = this.vms.get(v.vm)?.allotment;
      if (current === undefined) {
        current = Math.max(0, Math.min(Math.ceil(used / line) * line, Math.floor(unallotted / line) * line));
        unallotted -= current;
      }
      const active = activity === 0 ? 0 : Math.min(1, activity / Math.max(current, line));
      const weight = v.policy.shares / (active + k * (1 - active));
      const benefitCapped = misses === 0;
      const usedLines = Math.ceil(used / line);
      const lo = Math.max(v.disks.length, Math.ceil((v.policy.minBytes ?? 0) / line));
      const max = Math.max(lo, v.policy.maxBytes !== undefined ? Math.floor(v.policy.maxBytes / line) : capLines);
      const hi = benefitCapped ? Math.min(max, usedLines + Math.max(4, Math.ceil(usedLines / 8))) : max;
      return { v, activity, tickHits, tickMisses, used, current, active, weight, benefitCapped, lo, hi: Math.max(lo, hi), max, diskActivity };
    });

    // Benefit caps only decide contention: what they leave over is shared again without them.
    const first = waterFill(
      capLines,
      measured.map((x) => ({ weight: x.weight, lo: x.lo, hi: x.hi })),
    );
    const left = capLines - first.reduce((a, b) => a + b, 0);
    const extra =
      left > 0
        ? waterFill(
            left,
            measured.map((x, i) => ({ weight: x.weight, lo: 0, hi: Math.max(0, x.max - first[i]!) })),
          )
        : measured.map(() => 0);
    const targets = first.map((l, i) => (l + extra[i]!) * line);

    // Shrinks first (unless held), then grows into what is left.
    const next = measured.map((x, i) => {
      const t = targets[i]!;
      if (x.current > t && !hold.has(x.v.vm)) return Math.max(t, x.current - maxStep);
      return x.current;
    });
    let free = capLines * line - next.reduce((a, b) => a + b, 0);
    const want = measured.map((x, i) => (targets[i]! > x.current ? Math.min(targets[i]!, x.current + maxStep) - x.current : 0));
    const wantSum = want.reduce((a, b) => a + b, 0);
    if (wantSum > 0 && free > 0) {
      const f = Math.min(1, free / wantSum);
      measured.forEach((_, i) => {
        const g = Math.min(Math.floor(want[i]! * f), free);
        next[i]! += g;
        free -= g;
      });
    }

    const vms = measured.map((x, i): BalloonVmPlan => {
      const alloc = next[i]!;
      const n = x.v.disks.length;
      const lines = Math.floor(alloc / line);
      const spare = Math.max(0, lines - n);
      const disks = new Map<string, number>();
      for (const d of x.v.disks) {
        const share = x.activity > 0 ? 0.5 / n + (0.5 * x.diskActivity.get(d.id)!) / x.activity : 1 / n;
        disks.set(d.id, (Math.min(1, lines) + Math.floor(spare * share)) * line);
      }
      const reads = x.tickHits + x.tickMisses;
      return {
        vm: x.v.vm,
        shares: x.v.policy.shares,
        ...(x.v.policy.minBytes !== undefined ? { minBytes: x.v.policy.minBytes } : {}),
        ...(x.v.policy.maxBytes !== undefined ? { maxBytes: x.v.policy.maxBytes } : {}),
        weight: x.weight,
        activeFraction: x.active,
        hitRatio: reads ? x.tickHits / reads : 0,
        activityBytesPerSec: (x.activity * 1000) / windowMs,
        benefitCapped: x.benefitCapped,
        usedBytes: x.used,
        targetBytes: targets[i]!,
        fromBytes: x.current,
        allotmentBytes: alloc,
        disks,
      };
    });
    return { now, capacityBytes: capLines * line, maxStepBytes: maxStep, vms, diskStates };
  }

  /** Makes a plan (as applied) the state: allotments, counters, activity windows. */
  commit(plan: BalloonPlan): void {
    this.lastNow = plan.now;
    this.disks.clear();
    for (const [id, st] of plan.diskStates) this.disks.set(id, st);
    const seenVms = new Set(plan.vms.map((v) => v.vm));
    for (const v of plan.vms) this.vms.set(v.vm, { allotment: v.allotmentBytes });
    for (const vm of [...this.vms.keys()]) if (!seenVms.has(vm)) this.vms.delete(vm);
  }
}

// ------------------------------------------------------------------------------ driver

/** What the driver needs of a cached disk (CacheVolume has it; tests give fakes). */
export interface BalloonDiskHandle {
  stats(): { readHitBytes: number; readMissBytes: number; writtenBytes?: number; usedBytes: number; dirtyBytes: number };
  /** Writes back every dirty byte. */
  drain(): Promise<void>;
  setAllotment(bytes: number | undefined): void;
}

export interface BalloonDiskEntry {
  vm: string;
  disk: string;
  /** A fixed allotment (config `cache.allotment`): not ballooned; its bytes are taken off the device. */
  fixedBytes?: number;
  volume: BalloonDiskHandle;
}

export interface BalloonSource {
  capacityBytes(): number;
  disks(): BalloonDiskEntry[];
  policy(vm: string): VmCachePolicy;
}

/** GET /v1/cache/balloon, and `cache.balloon` of the daemon's status. */
export interface BalloonStatus {
  enabled: boolean;
  intervalMs: number;
  rateBytesPerSec: number;
  idleTax: number;
  /** Device capacity minus fixed allotments: what the VMs share. */
  capacityBytes: number;
  /** Clock (ms since the epoch) of the last step: between two steps an allotment moves at most rate * their distance. */
  updatedAt?: number;
  vms: BalloonVmStatus[];
}

export interface BalloonVmStatus extends BalloonVmFigures {
  /** Shrinking is waiting for the VM's dirty data to be written back. */
  draining?: boolean;
  disks: Array<{ disk: string; allotmentBytes: number; usedBytes: number }>;
}

export class BalloonScheduler {
  private readonly core: BalloonCore;
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | null = null;
  private stopped = false;
  private last: BalloonPlan | undefined;
  private lastEntries: BalloonDiskEntry[] = [];
  /** Targets as last logged, to log only moves of more than a line or so. */
  private readonly logged = new Map<string, number>();
  /** Write-backs started before a shrink, per disk handle. */
  private readonly drains = new Map<BalloonDiskHandle, Promise<void>>();
  private readonly ids = new WeakMap<BalloonDiskHandle, number>();
  private nextId = 1;

  constructor(
    private readonly source: BalloonSource,
    readonly settings: BalloonSettings,
    lineSize: number,
    private readonly logger?: Pick<Logger, 'info' | 'warn' | 'debug'>,
    /** Milliseconds a tick waits for a write-back before it keeps the allotment for the next tick. */
    private readonly drainWaitMs = Math.min(settings.intervalMs / 2, 500),
  ) {
    this.core = new BalloonCore(settings, lineSize);
  }

  start(): void {
    if (this.timer || this.stopped) return;
    const loop = (): void => {
      this.timer = setTimeout(() => {
        const run = this.tick().then(
          () => {},
          (e: unknown) => this.logger?.warn({ err: (e as Error).message }, 'cache balloon: tick failed'),
        );
        this.running = run;
        void run.finally(() => {
          this.running = null;
          if (!this.stopped) loop();
        });
      }, this.settings.intervalMs);
      this.timer.unref();
    };
    loop();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    await this.running;
  }

  private idOf(e: BalloonDiskEntry): string {
    let n = this.ids.get(e.volume);
    if (n === undefined) this.ids.set(e.volume, (n = this.nextId++));
    return `${e.vm}/${e.disk}#${n}`;
  }

  /** One scheduling step (the timer calls it; tests call it with their own clock). */
  async tick(now = Date.now()): Promise<BalloonPlan> {
    const all = this.source.disks();
    const fixed = all.reduce((n, e) => n + (e.fixedBytes ?? 0), 0);
    const capacity = Math.max(0, this.source.capacityBytes() - fixed);
    const entries = all.filter((e) => e.fixedBytes === undefined);
    const byVm = new Map<string, BalloonDiskEntry[]>();
    for (const e of entries) {
      let l = byVm.get(e.vm);
      if (!l) byVm.set(e.vm, (l = []));
      l.push(e);
    }
    const handles = new Map<string, BalloonDiskEntry>();
    const inputs: BalloonVmInput[] = [...byVm].map(([vm, es]) => ({
      vm,
      policy: this.source.policy(vm),
      disks: es.map((e) => {
        const st = e.volume.stats();
        const id = this.idOf(e);
        handles.set(id, e);
        return { id, readHitBytes: st.readHitBytes, readMissBytes: st.readMissBytes, writtenBytes: st.writtenBytes ?? 0, usedBytes: st.usedBytes };
      }),
    }));
    let plan = this.core.plan(now, capacity, inputs);

    // Shrinks below what a VM holds while it has dirty data: write that back first.
    const hold = new Set<string>();
    const waits: Array<Promise<void>> = [];
    for (const v of plan.vms) {
      if (v.allotmentBytes >= v.fromBytes) continue;
      for (const [id, bytes] of v.disks) {
        const e = handles.get(id)!;
        const st = e.volume.stats();
        if (st.dirtyBytes === 0 || bytes >= st.usedBytes) continue;
        let d = this.drains.get(e.volume);
        if (!d) {
          d = e.volume.drain().then(
            () => {
              this.drains.delete(e.volume);
            },
            (err: unknown) => {
              this.drains.delete(e.volume);
              this.logger?.warn({ vm: e.vm, disk: e.disk, err: (err as Error).message }, 'cache balloon: write-back before a shrink failed');
            },
          );
          this.drains.set(e.volume, d);
        }
        const done = d;
        waits.push(
          Promise.race([done.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), this.drainWaitMs).unref())]).then((ok) => {
            // Written back (new writes may have come since: the allocator keeps dirty lines, and
            // the dirty bound is half the allotment): shrink now. Still running: keep it a tick.
            if (!ok) hold.add(v.vm);
          }),
        );
      }
    }
    if (waits.length) {
      await Promise.all(waits);
      if (hold.size) plan = this.core.plan(now, capacity, inputs, hold);
    }
    if (this.stopped) return plan;
    // One synchronous pass: no allocation runs between these calls, so the order does not matter.
    for (const v of plan.vms) for (const [id, bytes] of v.disks) handles.get(id)!.volume.setAllotment(bytes);
    this.core.commit(plan);
    this.last = plan;
    this.lastEntries = entries;
    this.logMoves(plan, hold);
    return plan;
  }

  private logMoves(plan: BalloonPlan, hold: ReadonlySet<string>): void {
    const threshold = Math.max(this.core.lineSize, plan.capacityBytes / 100);
    const moved = plan.vms.filter((v) => Math.abs(v.targetBytes - (this.logged.get(v.vm) ?? 0)) > threshold);
    for (const vm of [...this.logged.keys()]) if (!plan.vms.some((v) => v.vm === vm)) this.logged.delete(vm);
    if (moved.length === 0) return;
    for (const v of moved) this.logged.set(v.vm, v.targetBytes);
    this.logger?.info(
      {
        capacityBytes: plan.capacityBytes,
        targets: Object.fromEntries(plan.vms.map((v) => [v.vm, { targetBytes: v.targetBytes, allotmentBytes: v.allotmentBytes, usedBytes: v.usedBytes, weight: Number(v.weight.toFixed(3)), activeFraction: Number(v.activeFraction.toFixed(3)), hitRatio: Number(v.hitRatio.toFixed(3)), ...(hold.has(v.vm) ? { draining: true } : {}) }])),
      },
      'cache balloon: targets changed',
    );
  }

  status(): BalloonStatus {
    const s = this.settings;
    const plan = this.last;
    const names = new Map(this.lastEntries.map((e) => [this.idOf(e), e]));
    return {
      enabled: s.enabled,
      intervalMs: s.intervalMs,
      rateBytesPerSec: s.rateBytesPerSec,
      idleTax: s.idleTax,
      capacityBytes: plan?.capacityBytes ?? 0,
      ...(plan ? { updatedAt: plan.now } : {}),
      vms: (plan?.vms ?? []).map((v): BalloonVmStatus => {
        const disks = [...v.disks].map(([id, bytes]) => ({ e: names.get(id), id, bytes }));
        const usedOf = (e: BalloonDiskEntry | undefined): number => e?.volume.stats().usedBytes ?? 0;
        const { benefitCapped: _c, fromBytes: _f, disks: _d, ...figures } = v;
        return {
          ...figures,
          usedBytes: disks.reduce((n, d) => n + usedOf(d.e), 0),
          ...(disks.some((d) => d.e && this.drains.has(d.e.volume)) ? { draining: true } : {}),
          disks: disks.map((d) => ({ disk: d.e?.disk ?? d.id, allotmentBytes: d.bytes, usedBytes: usedOf(d.e) })),
        };
      }),
    };
  }
}
