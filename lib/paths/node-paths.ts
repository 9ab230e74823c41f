/**
 * The paths of one storage node (one per NBD address × local source address), shared by every
 * volume the daemon has on that node, and PathTable, the daemon's set of them.
 *
 * NodePaths owns the health checks of paths that are not up (each probed every
 * `healthIntervalMs` with a fresh connect, see probe.ts; paths that are up are checked by their
 * own traffic and by the volumes' keepalive reads on their connections, which a fresh connect
 * could not replace: a blackholed path may still accept connections) and the timers of time-based transitions (end of a damping hold-down, delayed failback), and
 * gives VMs their home path (affinity): a new VM gets the path with the fewest VMs, so VMs
 * spread over the paths, and keeps it for as long as the disk is open.
 *
 * Control plane and per-request bookkeeping only: the volumes' connections live in RemoteVolume.
 */
import { EventEmitter } from 'node:events';
import type { Logger } from '../log.js';
import { Path, type PathState, type PathStatus } from './path.js';
import { realClock, type Clock, type PathPolicy } from './policy.js';
import { probeNbdGreeting, type Prober } from './probe.js';
import { selectPath, type Cursor, type SelectOptions } from './select.js';

export interface NodePathsOptions {
  node: string;
  /** NBD addresses of the node (NodeRecord.nbd), one path each per source. */
  addresses: string[];
  policy: PathPolicy;
  logger: Logger;
  clock?: Clock;
  prober?: Prober;
}

/** Emitted as 'change' when a path's state changes. */
export interface PathChangeEvent {
  path: PathStatus;
  from: PathState;
}

export class NodePaths extends EventEmitter {
  readonly node: string;
  readonly paths: readonly Path[];
  readonly policy: PathPolicy;
  private readonly clock: Clock;
  private readonly prober: Prober;
  private readonly log: Logger;
  private probeTimer: unknown = null;
  private dueTimer: unknown = null;
  private dueAt = Infinity;
  private probing = false;
  private users = 0;
  private stopped = false;

  constructor(o: NodePathsOptions) {
    super();
    this.node = o.node;
    this.policy = o.policy;
    this.clock = o.clock ?? realClock;
    this.prober = o.prober ?? probeNbdGreeting;
    this.log = o.logger.child({ node: o.node });
    // Unix sockets have no source address: one path per socket.
    const paths: Path[] = [];
    for (const address of o.addresses) {
      const unix = address.startsWith('unix:') || address.startsWith('/') || address.startsWith('nbd+unix:');
      const sources = unix || o.policy.sources.length === 0 ? [undefined] : o.policy.sources;
      for (const source of sources) {
        const id = source ? `${address}@${source}` : address;
        paths.push(new Path(id, o.node, address, source, o.policy, this.clock, (p, from) => this.changed(p, from)));
      }
    }
    this.paths = paths;
  }

  /** Picks a path among `usable` (those the caller has a ready connection on). */
  select(usable: readonly Path[], cursor: Cursor, opts: SelectOptions = {}): Path | undefined {
    return selectPath(usable, this.policy.selector, cursor, opts);
  }

  /** The home path for a VM: the one with the fewest VMs homed (ties: the first). */
  assignHome(vm: string): Path {
    for (const p of this.paths) if (p.homes.has(vm)) return p;
    let best = this.paths[0]!;
    for (const p of this.paths) if (p.homes.size < best.homes.size) best = p;
    best.homes.add(vm);
    return best;
  }

  releaseHome(vm: string): void {
    for (const p of this.paths) p.homes.delete(vm);
  }

  /** manual failback: every healthy path that waits for it comes back. */
  failback(): void {
    for (const p of this.paths) p.allowFailback();
  }

  status(): PathStatus[] {
    return this.paths.map((p) => p.status());
  }

  /** A volume starts using these paths (probing runs while at least one does). */
  acquire(): void {
    this.users++;
    this.stopped = false;
    if (this.probeTimer === null) this.scheduleProbe();
  }

  /** A volume stops using them; the last one stops the timers. */
  release(): void {
    this.users = Math.max(0, this.users - 1);
    if (this.users > 0) return;
    this.stopped = true;
    if (this.probeTimer !== null) this.clock.clearTimeout(this.probeTimer);
    if (this.dueTimer !== null) this.clock.clearTimeout(this.dueTimer);
    this.probeTimer = this.dueTimer = null;
    this.dueAt = Infinity;
  }

  get inUse(): boolean {
    return this.users > 0;
  }

  /** Probes every path that is not up, once (also what the timer runs). */
  async probeAll(): Promise<void> {
    if (this.probing) return;
    this.probing = true;
    try {
      await Promise.all(
        this.paths.filter((p) => p.state !== 'up').map((p) =>
          this.prober(p.address, p.source, this.policy.probeTimeoutMs).then(
            () => {
              p.healthy();
              // Volumes reconnect to it now rather than at the end of their backoff.
              this.emit('healthy', p);
            },
            (e: unknown) => p.transportError(`probe: ${(e as Error).message}`),
          ),
        ),
      );
    } finally {
      this.probing = false;
    }
    this.armDue();
  }

  /** Re-evaluates time-based transitions now (tests with a fake clock call it after advancing). */
  tick(): void {
    for (const p of this.paths) p.tick();
    this.armDue();
  }

  private scheduleProbe(): void {
    if (this.stopped || !(this.policy.healthIntervalMs > 0)) return;
    this.probeTimer = this.clock.setTimeout(() => {
      this.probeTimer = null;
      void this.probeAll().finally(() => this.scheduleProbe());
    }, this.policy.healthIntervalMs);
  }

  /** One timer for the earliest hold-down end or delayed failback. */
  private armDue(): void {
    if (this.stopped) return;
    let due = Infinity;
    for (const p of this.paths) {
      const d = p.nextDue();
      if (d !== null) due = Math.min(due, d);
    }
    if (due === Infinity || due >= this.dueAt) return;
    if (this.dueTimer !== null) this.clock.clearTimeout(this.dueTimer);
    this.dueAt = due;
    this.dueTimer = this.clock.setTimeout(() => {
      this.dueTimer = null;
      this.dueAt = Infinity;
      this.tick();
    }, Math.max(0, due - this.clock.now()));
  }

  private changed(p: Path, from: PathState): void {
    const s = p.status();
    if (s.state === 'up') this.log.info({ path: p.id, from }, 'path up');
    else this.log.warn({ path: p.id, from, state: s.state, reason: s.reason, heldUntil: s.heldUntil }, `path ${s.state}`);
    this.emit('change', { path: s, from } satisfies PathChangeEvent);
    // A path that went down may come back on a timer (damping / delayed failback).
    queueMicrotask(() => this.armDue());
  }
}

/** The daemon's paths, one NodePaths per node (keyed by node id and its addresses). */
export class PathTable {
  private readonly nodes = new Map<string, NodePaths>();

  constructor(
    readonly policy: PathPolicy,
    private readonly logger: Logger,
    private readonly clock: Clock = realClock,
    private readonly prober: Prober = probeNbdGreeting,
  ) {}

  /** The NodePaths of a node (created on first use; a node whose addresses changed gets a new one). */
  forNode(node: string, addresses: string[]): NodePaths {
    const key = `${node}\0${addresses.join('\0')}`;
    let n = this.nodes.get(key);
    if (!n) {
      n = new NodePaths({ node, addresses, policy: this.policy, logger: this.logger, clock: this.clock, prober: this.prober });
      this.nodes.set(key, n);
    }
    return n;
  }

  status(): PathStatus[] {
    return [...this.nodes.values()].filter((n) => n.inUse).flatMap((n) => n.status());
  }

  failback(node?: string): void {
    for (const n of this.nodes.values()) if (node === undefined || n.node === node) n.failback();
  }
}
