/**
 * One path to a storage node (an NBD address, and the local source address it is reached from)
 * and its state machine. Shared by every volume that reaches the node: the health of a network
 * path is a property of the path, not of one volume's connection.
 *
 *              request ok / probe ok
 *        ┌──────────────────────────────┐
 *        ▼     transport error          │    errorsToDown consecutive errors,
 *       up ───────────────────────► failing ──────────────────────────────► down
 *        ▲  (connection lost, from up or failing, goes straight to down)      │
 *        └────────────────────────────────────────────────────────────────────┘
 *           healthy again (connect or probe ok), not held down by damping,
 *           and the failback policy allows it (immediate / delayed / manual)
 *
 * Inputs are events (requests, connections, probes) and `tick()` with the clock; no timers here
 * (NodePaths runs them), so the machine is tested with a fake clock.
 */
import { LatencyHistogram } from '../qos/histogram.js';
import type { Clock, PathPolicy } from './policy.js';

export type PathState = 'up' | 'failing' | 'down';

/** What `vstore status` and the metrics show of a path. */
export interface PathStatus {
  id: string;
  node: string;
  address: string;
  source?: string;
  state: PathState;
  /** Why it is not up (last error, or what holds it down). */
  reason?: string;
  /** Down but healthy: held by damping until this time (ms since the epoch), or waiting for failback. */
  heldUntil?: number;
  awaitingFailback?: boolean;
  inflight: number;
  /** EWMA of request service time (ms). */
  serviceTimeMs: number;
  /**
   * Percentiles of service time (ms) of the requests that succeeded in the last closed window
   * (PATH_LATENCY_WINDOW_MS, as the VMs' QoS percentiles); 0 when that window had none.
   */
  latencyMs: { p50: number; p90: number; p99: number };
  /** Cumulative sum (ms) and count of the service times measured (a Prometheus summary's _sum and _count). */
  latencySumMs: number;
  latencyCount: number;
  reads: number;
  writes: number;
  others: number;
  bytesRead: number;
  bytesWritten: number;
  errors: number;
  /** Requests that failed here and were retried on another path. */
  failovers: number;
  /** Times the path went down. */
  downs: number;
  /** VMs whose home (affinity) path this is. */
  vms: string[];
}

/** Weight of the newest sample in the service-time EWMA. */
const EWMA_ALPHA = 0.2;
/** Service time assumed for a path that has served nothing yet (ms): a fresh path is tried early. */
const INITIAL_SERVICE_MS = 0.5;

export type RequestKind = 'read' | 'write' | 'other';

/**
 * Window of the service-time percentiles (ms): the same ~1 s as the VMs' QoS percentiles, so
 * a VM's P99 in `vstore status` can be set beside its path's. Windows are closed lazily (on the
 * next request or status after they end): no timer per path.
 */
export const PATH_LATENCY_WINDOW_MS = 1000;

const NO_LATENCY = { p50: 0, p90: 0, p99: 0 };

export class Path {
  state: PathState = 'down';
  reason: string | undefined = 'not connected yet';
  inflight = 0;
  serviceTimeMs = INITIAL_SERVICE_MS;
  reads = 0;
  writes = 0;
  others = 0;
  bytesRead = 0;
  bytesWritten = 0;
  errors = 0;
  failovers = 0;
  downs = 0;
  /** Consecutive transport errors since the last success. */
  private consecutive = 0;
  /** Healthy (a connection or probe succeeded) without a failure since this time; null: not healthy. */
  private healthySince: number | null = null;
  /** Damping: flaps counted in the current window, time of the last failure, hold-down end. */
  private flaps = 0;
  private lastDownAt = -Infinity;
  private holdUntil = 0;
  /** Has been up at least once: the first bring-up is not a failback. */
  private everUp = false;
  /** manual failback: an operator allowed this path back. */
  private failbackAllowed = false;
  /** VMs homed here (affinity), maintained by NodePaths. */
  readonly homes = new Set<string>();
  /** Service times of the current window; the percentiles of the last closed one; totals. */
  private readonly window = new LatencyHistogram();
  private windowStart: number;
  private lastLatency = NO_LATENCY;
  private latencySumMs = 0;
  private latencyCount = 0;

  constructor(
    readonly id: string,
    readonly node: string,
    readonly address: string,
    readonly source: string | undefined,
    private readonly policy: PathPolicy,
    private readonly clock: Clock,
    /** Called on every state change (NodePaths logs and emits). */
    private readonly onChange: (p: Path, from: PathState) => void = () => {},
  ) {
    this.windowStart = clock.now();
  }

  // ------------------------------------------------------------------ requests

  /** A request is sent on this path. */
  begin(): void {
    this.inflight++;
  }

  /** A request on this path succeeded after `ms`. */
  succeeded(ms: number, kind: RequestKind, bytes: number): void {
    this.inflight = Math.max(0, this.inflight - 1);
    const t = Math.max(0, ms);
    this.serviceTimeMs += EWMA_ALPHA * (t - this.serviceTimeMs);
    this.rollWindow(this.clock.now());
    this.window.record(t / 1000);
    this.latencySumMs += t;
    this.latencyCount++;
    if (kind === 'read') {
      this.reads++;
      this.bytesRead += bytes;
    } else if (kind === 'write') {
      this.writes++;
      this.bytesWritten += bytes;
    } else this.others++;
    this.consecutive = 0;
    if (this.state === 'failing') this.set('up', undefined);
  }

  /**
   * A request on this path failed. `transport`: the path is to blame (connection broken, timed
   * out); otherwise the node answered with an error, which says nothing about the path.
   */
  failed(transport: boolean, reason: string): void {
    this.inflight = Math.max(0, this.inflight - 1);
    this.errors++;
    if (transport) this.transportError(reason);
  }

  // ------------------------------------------------------------------ connections and probes

  /** A connection or probe over this path failed, or a request timed out. */
  transportError(reason: string): void {
    this.healthySince = null;
    this.consecutive++;
    if (this.state === 'up') this.set('failing', reason);
    if (this.state === 'failing' && this.consecutive >= this.policy.errorsToDown) this.goDown(reason);
    else if (this.state === 'down') this.reason = reason;
  }

  /** An established connection over this path broke: the path is down at once. */
  connectionLost(reason: string): void {
    this.healthySince = null;
    this.consecutive++;
    if (this.state !== 'down') this.goDown(reason);
    else this.reason = reason;
  }

  /** A connection was established or a probe succeeded over this path. */
  healthy(): void {
    if (this.healthySince === null) this.healthySince = this.clock.now();
    if (this.state === 'failing') {
      // A probe succeeding does not clear request errors: only a request that succeeds does.
      return;
    }
    this.tick();
  }

  /** Re-evaluates time-based transitions (hold-down end, delayed failback). */
  tick(): void {
    if (this.state !== 'down' || this.healthySince === null) return;
    const now = this.clock.now();
    if (now < this.holdUntil) return;
    if (this.everUp) {
      const fb = this.policy.failback;
      if (fb.mode === 'delayed' && now - this.healthySince < fb.ms) return;
      if (fb.mode === 'manual' && !this.failbackAllowed) return;
    }
    this.failbackAllowed = false;
    this.consecutive = 0;
    this.everUp = true;
    this.set('up', undefined);
  }

  /** manual failback: allow this path back once it is healthy (and not held down). */
  allowFailback(): void {
    this.failbackAllowed = true;
    this.tick();
  }

  /** Down, but healthy and only held back by damping or the failback policy: a last resort. */
  get standby(): boolean {
    return this.state === 'down' && this.healthySince !== null;
  }

  /** When the next time-based transition may happen (for NodePaths' timer), or null. */
  nextDue(): number | null {
    if (this.state !== 'down' || this.healthySince === null) return null;
    let due = this.holdUntil;
    const fb = this.policy.failback;
    if (this.everUp && fb.mode === 'delayed') due = Math.max(due, this.healthySince + fb.ms);
    if (this.everUp && fb.mode === 'manual' && !this.failbackAllowed) return null;
    return due;
  }

  status(): PathStatus {
    const now = this.clock.now();
    this.rollWindow(now);
    const s: PathStatus = {
      id: this.id,
      node: this.node,
      address: this.address,
      ...(this.source !== undefined ? { source: this.source } : {}),
      state: this.state,
      ...(this.reason !== undefined && this.state !== 'up' ? { reason: this.reason } : {}),
      inflight: this.inflight,
      serviceTimeMs: Math.round(this.serviceTimeMs * 1000) / 1000,
      latencyMs: this.lastLatency,
      latencySumMs: this.latencySumMs,
      latencyCount: this.latencyCount,
      reads: this.reads,
      writes: this.writes,
      others: this.others,
      bytesRead: this.bytesRead,
      bytesWritten: this.bytesWritten,
      errors: this.errors,
      failovers: this.failovers,
      downs: this.downs,
      vms: [...this.homes],
    };
    if (this.state === 'down' && this.holdUntil > now) s.heldUntil = this.holdUntil;
    if (this.standby && this.holdUntil <= now && this.policy.failback.mode !== 'immediate') s.awaitingFailback = true;
    return s;
  }

  // ------------------------------------------------------------------ internals

  /** Closes the percentile window if it has ended (an empty window after it: no percentiles). */
  private rollWindow(now: number): void {
    const age = now - this.windowStart;
    if (age < PATH_LATENCY_WINDOW_MS) return;
    const w = this.window;
    // Bucket bounds are seconds; status is in ms (to the µs).
    const ms = (q: number): number => Math.round(w.quantile(q) * 1e6) / 1000;
    this.lastLatency = age < 2 * PATH_LATENCY_WINDOW_MS && w.count > 0 ? { p50: ms(0.5), p90: ms(0.9), p99: ms(0.99) } : NO_LATENCY;
    w.reset();
    this.windowStart = now - (age % PATH_LATENCY_WINDOW_MS);
  }

  private goDown(reason: string): void {
    const now = this.clock.now();
    const d = this.policy.damping;
    this.flaps = now - this.lastDownAt < d.flapWindowMs ? this.flaps + 1 : 1;
    this.lastDownAt = now;
    // The first failure in a window is not a flap; each further one holds the path down longer.
    this.holdUntil = this.flaps > 1 ? now + Math.min(d.maxHoldMs, d.holdMs * 2 ** (this.flaps - 2)) : 0;
    this.downs++;
    this.set('down', reason);
  }

  private set(state: PathState, reason: string | undefined): void {
    const from = this.state;
    this.state = state;
    this.reason = reason;
    if (from !== state) this.onChange(this, from);
  }
}
