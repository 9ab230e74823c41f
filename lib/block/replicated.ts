/**
 * ReplicatedVolume: one Volume over N replica Volumes (RAID-1 across storage nodes, as md's
 * raid1 with a write-intent bitmap, or DRBD's activity log + bitmap).
 *
 * Rules (the invariants every path keeps):
 *   I1  every acknowledged write is on every in-sync replica;
 *   I2  for every replica that is not in sync, every acknowledged write it may lack is marked in
 *       its dirty-region log (DRL) bitmap, durably, before the write is acknowledged;
 *   I3  a replica's demotion (in-sync -> out-of-sync) is persisted with persistStates() after its
 *       DRL marks are durable and before the write that caused it, or any later write, is
 *       acknowledged;
 *   I4  only in-sync replicas serve reads and act as resync sources; the last in-sync replica is
 *       never demoted (a write it fails is retried instead: it holds the only complete copy).
 *
 * Writes (write, trim, writeZeroes) go to every in-sync replica and to every replica being
 * resynced or rebuilt; replicas that get nothing (out of sync and not being resynced) have the
 * write's regions marked in their bitmap BEFORE the write is issued (write intent), so a resync
 * that starts meanwhile sees the region. A write is acknowledged when every target settled and
 * at least one target that is (still) in sync succeeded; targets that failed are demoted (I3) with
 * their regions marked. When no in-sync target succeeded, the write is retried (writes are
 * idempotent) until an in-sync replica takes it or `waitMs` runs out (then EIO).
 *
 * A replica whose node is on this host may take writes and flushes on a local descriptor
 * (RemoteVolume's short-circuit writes): for this layer they are the replica's write and flush
 * like any other, with the same outcomes (a local failure, or a lease that ended, is a failed
 * write), and setState turns them off before anything sees a replica leave in-sync.
 *
 * Flush goes to the same targets. Writes a replica completed but has not flushed could still be
 * lost if that replica crashes, so each replica keeps the set of regions written since its last
 * successful flush; when it fails a flush or goes 'down', those regions are marked too.
 *
 * Resync (a replica comes back 'up', or a demoted replica is still up after `resyncRetryMs`):
 * each dirty region is copied from an in-sync replica under a per-region lock, then the target is
 * flushed, and only then the bit is cleared. The lock: a copy first blocks new guest writes to
 * its region, then waits for the guest writes already in flight there (including their DRL
 * marking and retries); guest writes that arrive during the copy wait for it. So a copy never
 * reads data that a guest write is about to replace and then writes the stale data over it.
 * Guest writes to other regions run concurrently and also go to the resyncing replica. When its
 * bitmap is empty the replica is in sync again (persisted).
 *
 * A replica demoted while it stays up (it failed a write or a flush) is resynced after
 * `resyncRetryMs`; a resync that fails (source or target error) is retried the same way; a replica
 * that went down is resynced as soon as it is 'up' again and an in-sync replica is reachable.
 *
 * Rebuild: a replica that is not in sync and down for `rebuildAfterMs` is replaced through
 * `replaceReplica()`: its DRL slot is set all dirty, then renamed to the new replica's id, the new
 * replica ('rebuilding') takes the old one's place and is filled like a resync, except that
 * regions the source reports as holes/zeroes are skipped while the new replica has not been
 * written there (it starts empty). An in-sync replica is never replaced (with the others out of
 * sync it holds the only complete copy). Once replaceReplica() was called, the old replica is not
 * resynced even if it comes back: its DRL slot is about to belong to the new one.
 *
 * No in-sync replica up: reads, writes and flushes wait (at most `maxWaiting` of them, beyond
 * that they fail at once with EIO; the front ends above bound their own in-flight requests, so
 * the limit is a safety net, not the flow control) up to `waitMs` for one, then fail with EIO.
 *
 * Ordering: overlapping requests must be ordered by the caller (OrderedVolume above, as the NBD
 * and vhost front ends do); two concurrent overlapping writes could land in different orders on
 * different replicas otherwise.
 *
 * Known limit: a host crash while writes are in flight can leave those (never acknowledged)
 * writes on some in-sync replicas and not others; reads of such a range may then differ by
 * replica until it is written again. A write-intent log for in-sync replicas would close this.
 */
import { EventEmitter } from 'node:events';
import type { Logger } from '../log.js';
import type { ReplicaState } from '../resolver/types.js';
import type { DirtyRegionLog } from './drl.js';
import { VolumeError, toVolumeError } from './errors.js';
import type { BlockLimits, Extent, Volume, VolumeCapabilities, WriteOptions, ZeroOptions } from './volume.js';

export type { ReplicaState } from '../resolver/types.js';

/** A replica as the replicated layer sees it (RemoteVolume implements it; FaultyVolume in tests). */
export interface ReplicaVolume extends Volume {
  /** e.g. the storage node id. */
  readonly id: string;
  /** Reachable now. */
  readonly up: boolean;
  on(event: 'up' | 'down', cb: () => void): unknown;
  off(event: 'up' | 'down', cb: () => void): unknown;
  /**
   * Optional (RemoteVolume's short-circuit reads): fills buf now, without a promise, from a local
   * descriptor of the replica's file when the page cache holds the range; false when it cannot.
   */
  readLocal?(offset: number, buf: Buffer): boolean;
  /** Optional: the replica is in sync (true) or not (false: local reads must stop at once). */
  setShortCircuit?(allowed: boolean): void;
  /** Optional: short-circuit state for status and metrics. */
  shortCircuitStatus?(): { active: boolean; reads: number; grants: number; writes?: number; writable?: boolean } | undefined;
}

export interface ReplicatedVolumeOptions {
  name: string;
  /** Same size; the volume's size is theirs. */
  replicas: ReplicaVolume[];
  /** From the resolver record; default in-sync. */
  states?: Record<string, ReplicaState>;
  drl: DirtyRegionLog;
  /** Persist replica states (resolver record + local state). Awaited before any write is acknowledged that a replica missed. */
  persistStates(states: Record<string, ReplicaState>): Promise<void>;
  /** Optional: find and create a replacement replica for one gone for good; returns it (empty, same size). */
  replaceReplica?(failed: string): Promise<ReplicaVolume>;
  /** A replica (not in sync) down this long is replaced (default 10 min). */
  rebuildAfterMs?: number;
  /** With no in-sync replica reachable, I/O waits this long, then fails EIO (default 60 s). */
  waitMs?: number;
  /** Requests waiting for a replica at most (default 1024); more fail at once with EIO. */
  maxWaiting?: number;
  /** Regions copied at once by one resync (default 4). */
  resyncConcurrency?: number;
  /** A replica that failed while staying up (or whose resync failed) is resynced again after this (default 5 s). */
  resyncRetryMs?: number;
  logger: Logger;
}

export interface ResyncProgress {
  doneBytes: number;
  totalBytes: number;
  /** ms since the epoch. */
  startedAt: number;
}

export interface ReplicaStatus {
  id: string;
  state: ReplicaState;
  up: boolean;
  /** Bytes marked dirty in the DRL. */
  dirtyBytes: number;
  /** Present while a resync or rebuild copies. */
  resync: ResyncProgress | null;
  /** Short-circuit local reads of this replica (when it can have them). */
  shortCircuit?: { active: boolean; reads: number; grants: number; writes?: number; writable?: boolean };
}

/** Emitted as 'state' when a replica changes state, is added or dropped. */
export interface ReplicaStateEvent {
  id: string;
  state: ReplicaState | 'removed';
}

interface Sync extends ResyncProgress {
  aborted: boolean;
  /** Asked to start again while it was stopping: the next one starts when it has ended. */
  restart: boolean;
  lastDecile: number;
  task: Promise<void>;
}

interface Rep {
  vol: ReplicaVolume;
  id: string;
  state: ReplicaState;
  pending: number;
  /** Regions written (not FUA) since the last successful flush. */
  unflushed: Set<number>;
  sync: Sync | null;
  /** Rebuilding replicas: regions written since it was added (null: unknown, treat all as written). */
  touched: Set<number> | null;
  removed: boolean;
  /** 'down' events seen (a request that failed across one may succeed when it is back). */
  downs: number;
  rebuildTimer: NodeJS.Timeout | null;
  retryTimer: NodeJS.Timeout | null;
  replacing: boolean;
  onUp: () => void;
  onDown: () => void;
}

interface Waiter {
  resolve: () => void;
  reject: (e: unknown) => void;
  timer: NodeJS.Timeout;
}

interface InFlight {
  start: number;
  end: number;
  waiters: (() => void)[] | null;
}

type Outcome = { rep: Rep; ok: true } | { rep: Rep; ok: false; err: VolumeError };

function noop(): void {}

function shortCircuitOf(v: ReplicaVolume): { shortCircuit?: ReplicaStatus['shortCircuit'] } {
  const s = v.shortCircuitStatus?.();
  return s ? { shortCircuit: s } : {};
}

/** Errors worth retrying on another attempt (the replica may come back); others are final. */
const TRANSIENT = new Set(['EIO', 'ESHUTDOWN', 'ETIMEDOUT', 'EAGAIN']);

export class ReplicatedVolume extends EventEmitter implements Volume {
  readonly name: string;
  readonly size: number;
  readonly limits: BlockLimits;
  readonly caps: VolumeCapabilities;

  private reps: Rep[];
  private readonly drl: DirtyRegionLog;
  private readonly log: Logger;
  private readonly regionSize: number;
  private readonly waitMs: number;
  private readonly maxWaiting: number;
  private readonly rebuildAfterMs: number;
  private readonly resyncConcurrency: number;
  private readonly resyncRetryMs: number;
  private readonly persistFn: (s: Record<string, ReplicaState>) => Promise<void>;
  private readonly replaceFn: ((failed: string) => Promise<ReplicaVolume>) | undefined;

  private readonly waiters = new Set<Waiter>();
  private readonly inflight = new Set<InFlight>();
  /** Region index -> the copy holding it (released when the promise resolves). */
  private readonly copying = new Map<number, Promise<void>>();
  /** State generations: bumped on every change; acks wait until `needGen` is durable. */
  private gen = 0;
  private needGen = 0;
  private durableGen = 0;
  private persisting: Promise<void> | null = null;
  /** DRL marks a demotion depends on; persisted states wait for them. */
  private readonly demotionMarks = new Set<Promise<void>>();
  private closed = false;

  constructor(opts: ReplicatedVolumeOptions) {
    super();
    if (opts.replicas.length === 0) throw new VolumeError('EINVAL', `${opts.name}: no replicas`);
    const ids = opts.replicas.map((r) => r.id);
    if (new Set(ids).size !== ids.length) throw new VolumeError('EINVAL', `${opts.name}: duplicate replica ids`);
    const size = opts.replicas[0]!.size;
    for (const r of opts.replicas) {
      if (r.size !== size) throw new VolumeError('EINVAL', `${opts.name}: replica ${r.id} has size ${r.size}, not ${size}`);
      if (!opts.drl.has(r.id)) throw new VolumeError('EINVAL', `${opts.name}: replica ${r.id} has no slot in the dirty-region log`);
    }
    if (opts.drl.size !== size) throw new VolumeError('EINVAL', `${opts.name}: dirty-region log is for size ${opts.drl.size}, not ${size}`);
    this.name = opts.name;
    this.size = size;
    this.drl = opts.drl;
    this.regionSize = opts.drl.regionSize;
    this.log = opts.logger.child({ volume: opts.name });
    this.waitMs = opts.waitMs ?? 60_000;
    this.maxWaiting = opts.maxWaiting ?? 1024;
    this.rebuildAfterMs = opts.rebuildAfterMs ?? 10 * 60_000;
    this.resyncConcurrency = Math.max(1, opts.resyncConcurrency ?? 4);
    this.resyncRetryMs = opts.resyncRetryMs ?? 5000;
    this.persistFn = opts.persistStates;
    this.replaceFn = opts.replaceReplica;

    const vols = opts.replicas;
    this.limits = Object.freeze({
      minimum: Math.max(...vols.map((v) => v.limits.minimum)),
      preferred: Math.max(...vols.map((v) => v.limits.preferred)),
      maximum: Math.min(...vols.map((v) => v.limits.maximum)),
    });
    const all = (k: keyof VolumeCapabilities): boolean => vols.every((v) => v.caps[k]);
    this.caps = Object.freeze({
      readOnly: vols.some((v) => v.caps.readOnly),
      flush: all('flush'),
      fua: all('fua'),
      trim: all('trim'),
      writeZeroes: all('writeZeroes'),
      fastZero: all('fastZero'),
      blockStatus: all('blockStatus'),
      prefetch: all('prefetch'),
      multiConn: all('multiConn'),
    });

    this.reps = vols.map((v) => this.makeRep(v, opts.states?.[v.id] ?? 'in-sync'));

    // An in-sync replica with dirty bits missed a write whose demotion never became durable (a
    // crash between the DRL mark and persistStates): demote it, unless that leaves none in sync,
    // in which case the one with the fewest bits stays (what it missed was never acknowledged).
    const suspect = this.reps.filter((r) => r.state === 'in-sync' && this.drl.count(r.id) > 0);
    if (suspect.length > 0) {
      const clean = this.reps.some((r) => r.state === 'in-sync' && this.drl.count(r.id) === 0);
      const keep = clean ? null : suspect.reduce((a, b) => (this.drl.count(a.id) <= this.drl.count(b.id) ? a : b));
      for (const r of suspect) {
        if (r === keep) {
          this.log.warn({ replica: r.id }, 'in-sync replica has dirty regions but no other replica is in sync; keeping it');
          for (const k of this.drl.dirtyRegions(r.id)) this.drl.clear(r.id, k);
          continue;
        }
        this.log.warn({ replica: r.id, dirtyBytes: this.drl.dirtyBytes(r.id) }, 'replica recorded in sync has dirty regions; out of sync');
        r.state = 'out-of-sync';
        this.needGen = ++this.gen;
      }
      this.persistInBackground();
    }
    if (!this.reps.some((r) => r.state === 'in-sync')) {
      this.log.error('no replica is in sync: the volume cannot serve I/O until one is');
    }
    for (const r of this.reps) if (!r.vol.up) this.armRebuild(r);
    for (const r of this.reps) r.vol.setShortCircuit?.(r.state === 'in-sync');
    queueMicrotask(() => this.kickResyncs());
  }

  // ---- Volume ----

  read(offset: number, buf: Buffer): Promise<void> {
    // Fast path: the least-busy in-sync replica can fill buf now from its local file (short-
    // circuit read from the page cache): no promise chain, no NBD round trip. Only in-sync
    // replicas are picked (I4), and a replica leaving in-sync drops its descriptor (setState).
    const r = this.closed ? null : this.pickSource();
    if (r === null) return this.fromOne((v) => v.read(offset, buf)).then(noop);
    if (r.vol.readLocal !== undefined && r.vol.readLocal(offset, buf)) return Promise.resolve();
    // One attempt on the picked replica without fromOne's async frames; on an error, fromOne's
    // loop (other replicas, waiting for one) takes over.
    r.pending++;
    const downs = r.downs;
    return r.vol.read(offset, buf).then(
      () => void r.pending--,
      (e: unknown) => {
        r.pending--;
        const err = toVolumeError(e);
        this.log.warn({ replica: r.id, err: err.message }, 'read failed on a replica; trying another');
        // As fromOne's own loop: a replica that failed without going down is not tried again.
        const wentDown = r.downs !== downs || !r.vol.up;
        return this.fromOne((v) => v.read(offset, buf), wentDown ? undefined : r, err).then(noop);
      },
    );
  }

  write(offset: number, buf: Buffer, opts?: WriteOptions): Promise<void> {
    return this.writeLike(offset, buf.length, (v) => v.write(offset, buf, opts), opts?.fua ?? false);
  }

  trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    return this.writeLike(offset, length, (v) => v.trim(offset, length, opts), opts?.fua ?? false);
  }

  async writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    if (opts?.fastZero && !this.caps.fastZero) throw new VolumeError('ENOTSUP', 'fast zero is not supported by every replica');
    return this.writeLike(offset, length, (v) => v.writeZeroes(offset, length, opts), opts?.fua ?? false, opts?.fastZero
      ? (v) => v.writeZeroes(offset, length, { ...opts, fastZero: false })
      : undefined);
  }

  async flush(): Promise<void> {
    this.checkOpen();
    const deadline = Date.now() + this.waitMs;
    for (let attempt = 0; ; attempt++) {
      await this.waitForSource(deadline);
      const targets = this.targets();
      const snaps = new Map<Rep, Set<number>>();
      for (const r of targets) {
        snaps.set(r, r.unflushed);
        r.unflushed = new Set();
      }
      const outcomes = await Promise.all(targets.map((r) => this.call(r, (v) => v.flush())));
      const okInSync = outcomes.some((o) => o.ok && o.rep.state === 'in-sync' && !o.rep.removed);
      if (okInSync) {
        const marks: Promise<void>[] = [];
        for (const o of outcomes) {
          if (o.ok) continue;
          for (const k of snaps.get(o.rep)!) o.rep.unflushed.add(k);
          marks.push(this.demote(o.rep, null, o.err));
        }
        await this.settleAck(marks);
        return;
      }
      // No in-sync replica flushed: nothing durable is known; keep the sets and try again.
      for (const o of outcomes) for (const k of snaps.get(o.rep)!) o.rep.unflushed.add(k);
      const err = outcomes.find((o) => !o.ok && o.rep.state === 'in-sync') as { err: VolumeError } | undefined;
      await this.retryPause(deadline, attempt, err?.err);
    }
  }

  async prefetch(offset: number, length: number): Promise<void> {
    if (!this.caps.prefetch) return;
    const r = this.pickSource();
    if (r) await r.vol.prefetch(offset, length).catch(() => {});
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.fromOne((v) => v.blockStatus(offset, length));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const w of [...this.waiters]) {
      clearTimeout(w.timer);
      w.reject(new VolumeError('ESHUTDOWN', `${this.name}: closed`));
    }
    this.waiters.clear();
    const tasks: Promise<void>[] = [];
    for (const r of this.reps) {
      this.detach(r);
      if (r.sync) {
        r.sync.aborted = true;
        tasks.push(r.sync.task);
      }
    }
    await Promise.allSettled(tasks);
    if (this.persisting) await this.persisting.catch(() => {});
    await Promise.allSettled(this.reps.map((r) => r.vol.close()));
    await this.drl.close();
  }

  // ---- status ----

  status(): ReplicaStatus[] {
    return this.reps.map((r) => this.statusOf(r));
  }

  /** The replicas as they are now (a rebuild replaces one). */
  get replicas(): ReplicaVolume[] {
    return this.reps.map((r) => r.vol);
  }

  /** Replica states as persistStates receives them. */
  states(): Record<string, ReplicaState> {
    const s: Record<string, ReplicaState> = {};
    for (const r of this.reps) s[r.id] = r.state;
    return s;
  }

  private statusOf(r: Rep): ReplicaStatus {
    return {
      id: r.id,
      state: r.state,
      up: r.vol.up,
      dirtyBytes: this.drl.has(r.id) ? this.drl.dirtyBytes(r.id) : 0,
      resync: r.sync ? { doneBytes: r.sync.doneBytes, totalBytes: r.sync.totalBytes, startedAt: r.sync.startedAt } : null,
      ...shortCircuitOf(r.vol),
    };
  }

  // ---- reads ----

  /** Runs `fn` on one in-sync replica, trying the others on error; waits when none is up. */
  private async fromOne<T>(fn: (v: ReplicaVolume) => Promise<T>, failed?: Rep, lastErr?: VolumeError): Promise<T> {
    this.checkOpen();
    const deadline = Date.now() + this.waitMs;
    const tried = new Set<Rep>();
    if (failed) tried.add(failed);
    let last: VolumeError | undefined = lastErr;
    for (;;) {
      const r = this.pickSource(tried);
      if (!r) {
        if (last && this.pickSource()) throw last; // every reachable in-sync replica failed
        await this.waitForSource(deadline, last);
        tried.clear();
        continue;
      }
      tried.add(r);
      const downs = r.downs;
      const o = await this.call(r, fn);
      if (o.ok) return o.value;
      last = o.err;
      // Failed because it went down: it may serve again once back (until the deadline).
      if ((r.downs !== downs || !r.vol.up) && Date.now() < deadline) tried.delete(r);
      this.log.warn({ replica: r.id, err: o.err.message }, 'read failed on a replica; trying another');
    }
  }

  /** The in-sync, reachable replica with the fewest requests in progress. */
  private pickSource(exclude?: Set<Rep>): Rep | null {
    let best: Rep | null = null;
    for (const r of this.reps) {
      if (r.state !== 'in-sync' || r.removed || !r.vol.up || exclude?.has(r)) continue;
      if (!best || r.pending < best.pending) best = r;
    }
    return best;
  }

  // ---- writes ----

  /** Replicas a write or flush goes to: in sync, or being resynced/rebuilt now. */
  private targets(): Rep[] {
    return this.reps.filter((r) => !r.removed && (r.state === 'in-sync' || (r.sync !== null && !r.sync.aborted)));
  }

  private async writeLike(
    offset: number,
    length: number,
    fn: (v: ReplicaVolume) => Promise<void>,
    fua: boolean,
    slowZero?: (v: ReplicaVolume) => Promise<void>,
  ): Promise<void> {
    this.checkOpen();
    if (this.caps.readOnly) throw new VolumeError('EROFS', `${this.name} is read-only`);
    // Wait while a copy holds any region of the range; the last check and the registration
    // below happen in the same turn, so a copy starting later sees this write.
    for (let held = this.copyHolding(offset, length); held; held = this.copyHolding(offset, length)) await held;
    const me: InFlight = { start: offset, end: offset + length, waiters: null };
    this.inflight.add(me);
    try {
      const deadline = Date.now() + this.waitMs;
      const first = Math.floor(offset / this.regionSize);
      const last = Math.floor((offset + Math.max(length, 1) - 1) / this.regionSize);
      for (let attempt = 0; ; attempt++) {
        await this.waitForSource(deadline);
        const targets = this.targets();
        // Write intent for replicas that get nothing: marked before the write is issued.
        const intents: Promise<void>[] = [];
        for (const r of this.reps) {
          if (!r.removed && !targets.includes(r)) intents.push(this.mark(r, offset, length));
        }
        if (intents.length) await this.awaitMarks(intents);
        let outcomes = await Promise.all(
          targets.map((r) => this.call(r, async (v) => {
            if (r.state === 'rebuilding' && r.touched) for (let k = first; k <= last; k++) r.touched.add(k);
            await fn(v);
          })),
        );
        if (slowZero) {
          // Fast zero refused: by all in-sync replicas -> refuse (nothing changed); by some ->
          // the others zero slowly, so that the replicas agree.
          const refused = outcomes.filter((o) => !o.ok && o.err.code === 'ENOTSUP');
          if (refused.length) {
            const inSyncOk = outcomes.some((o) => o.ok && o.rep.state === 'in-sync');
            if (!inSyncOk && outcomes.every((o) => o.ok || o.err.code === 'ENOTSUP' || o.rep.state !== 'in-sync')) {
              const marks = outcomes.filter((o) => o.ok && o.rep.state !== 'in-sync').map((o) => this.mark(o.rep, offset, length));
              await this.awaitMarks(marks);
              throw new VolumeError('ENOTSUP', 'fast zero refused by the replicas');
            }
            const redo = await Promise.all(refused.map((o) => this.call(o.rep, slowZero)));
            outcomes = outcomes.map((o) => redo.find((x) => x.rep === o.rep) ?? o);
          }
        }
        // Decide synchronously against the states as they are now.
        const okInSync = outcomes.some((o) => o.ok && o.rep.state === 'in-sync' && !o.rep.removed);
        if (okInSync) {
          const marks: Promise<void>[] = [];
          for (const o of outcomes) {
            if (o.ok) {
              if (!fua && o.rep.vol.caps.flush) for (let k = first; k <= last; k++) o.rep.unflushed.add(k);
            } else {
              marks.push(this.demote(o.rep, { offset, length }, o.err));
            }
          }
          await this.settleAck(marks);
          return;
        }
        // No in-sync replica took it: the replicas that did are marked (their copy now differs),
        // then the write is tried again, or fails.
        const marks = outcomes.filter((o) => o.rep.state !== 'in-sync').map((o) => this.mark(o.rep, offset, length));
        await this.awaitMarks(marks);
        const failed = outcomes.filter((o): o is Extract<Outcome, { ok: false }> => !o.ok && o.rep.state === 'in-sync');
        const final = failed.find((o) => !TRANSIENT.has(o.err.code));
        if (final) throw final.err;
        await this.retryPause(deadline, attempt, failed[0]?.err);
      }
    } finally {
      this.inflight.delete(me);
      if (me.waiters) for (const w of me.waiters) w();
    }
  }

  /** Waits for the DRL marks, then for the durable record of every demotion so far (I2, I3). */
  private async settleAck(marks: Promise<void>[]): Promise<void> {
    if (marks.length) await this.awaitMarks(marks);
    if (this.durableGen < this.needGen) await this.ensurePersisted(this.needGen);
  }

  private async awaitMarks(marks: Promise<void>[]): Promise<void> {
    try {
      await Promise.all(marks);
    } catch (e) {
      this.log.error({ err: (e as Error).message }, 'dirty-region log update failed');
      throw new VolumeError('EIO', `${this.name}: dirty-region log update failed`, { cause: e });
    }
  }

  /** Marks a range (or only the unflushed regions, when range is null) for a replica. */
  private mark(r: Rep, offset: number, length: number): Promise<void> {
    if (r.removed || !this.drl.has(r.id)) return Promise.resolve();
    return this.drl.mark(r.id, offset, length);
  }

  /**
   * A replica failed a write/flush or went down: its unflushed regions (and `range`) are marked;
   * an in-sync one becomes out-of-sync unless it is the last in-sync replica (I4).
   */
  private demote(r: Rep, range: { offset: number; length: number } | null, err?: VolumeError): Promise<void> {
    if (r.removed || !this.drl.has(r.id)) return Promise.resolve();
    const marks: Promise<void>[] = [];
    if (range) marks.push(this.drl.mark(r.id, range.offset, range.length));
    if (r.state === 'in-sync') {
      const others = this.reps.some((x) => x !== r && !x.removed && x.state === 'in-sync');
      if (!others) {
        // Cannot happen from a write (acks need another in-sync success) but can from 'down'.
        return Promise.all(marks).then(() => {});
      }
      for (const k of r.unflushed) marks.push(this.drl.markRegion(r.id, k));
      r.unflushed.clear();
      this.setState(r, 'out-of-sync');
      this.needGen = this.gen;
      this.log.warn({ replica: r.id, err: err?.message }, 'replica out of sync; volume degraded');
    } else if (r.sync) {
      for (const k of r.unflushed) marks.push(this.drl.markRegion(r.id, k));
      r.unflushed.clear();
    }
    const all = Promise.all(marks).then(() => {});
    this.demotionMarks.add(all);
    const drop = (): void => void this.demotionMarks.delete(all);
    all.then(drop, drop);
    if (r.state !== 'in-sync' && r.vol.up && !r.sync) this.armRetry(r);
    if (r.state !== 'in-sync' && !r.vol.up) this.armRebuild(r);
    return all;
  }

  private setState(r: Rep, state: ReplicaState): void {
    r.state = state;
    // Before anything else sees the new state: an out-of-sync replica's file lacks writes.
    r.vol.setShortCircuit?.(state === 'in-sync');
    this.gen++;
    this.emit('state', { id: r.id, state } satisfies ReplicaStateEvent);
  }

  /**
   * Persists the states until generation `gen` is durable. A caller waits for an attempt already
   * running; when that fails it makes one attempt of its own, and throws EIO if that fails too.
   */
  private async ensurePersisted(gen: number): Promise<void> {
    let tried = false;
    while (this.durableGen < gen) {
      if (this.persisting) {
        await this.persisting.catch(() => {});
        continue;
      }
      if (tried) throw new VolumeError('EIO', `${this.name}: replica states could not be persisted`);
      tried = true;
      this.persisting = this.persistOnce();
      await this.persisting.catch(() => {});
    }
  }

  private async persistOnce(): Promise<void> {
    try {
      // Marks first (I3): a persisted out-of-sync state always has its regions in the DRL.
      while (this.demotionMarks.size) await Promise.allSettled([...this.demotionMarks]);
      const g = this.gen;
      await this.persistFn(this.states());
      this.durableGen = Math.max(this.durableGen, g);
    } catch (e) {
      this.log.error({ err: (e as Error).message }, 'persisting replica states failed');
      throw e;
    } finally {
      this.persisting = null;
    }
  }

  /** Persists the current states without anyone waiting (promotions, replacements); failures are logged. */
  private persistInBackground(): void {
    if (this.gen > this.durableGen) this.ensurePersisted(this.gen).catch(() => {});
  }

  private async retryPause(deadline: number, attempt: number, err?: VolumeError): Promise<void> {
    const left = deadline - Date.now();
    if (left <= 0 || this.closed) {
      throw new VolumeError('EIO', `${this.name}: no in-sync replica could take the request${err ? ` (${err.message})` : ''}`, { cause: err });
    }
    await sleep(Math.min(left, 10 * 2 ** Math.min(attempt, 6)));
  }

  /** Calls one replica, counting its pending requests; the result as an Outcome (never throws). */
  private async call<T>(r: Rep, fn: (v: ReplicaVolume) => Promise<T>): Promise<{ rep: Rep; ok: true; value: T } | { rep: Rep; ok: false; err: VolumeError }> {
    r.pending++;
    try {
      return { rep: r, ok: true, value: await fn(r.vol) };
    } catch (e) {
      return { rep: r, ok: false, err: toVolumeError(e) };
    } finally {
      r.pending--;
    }
  }

  // ---- waiting for a replica ----

  private checkOpen(): void {
    if (this.closed) throw new VolumeError('ESHUTDOWN', `${this.name}: closed`);
  }

  /** Resolves when an in-sync replica is up; EIO at the deadline. */
  private waitForSource(deadline: number, cause?: VolumeError): Promise<void> {
    if (this.closed) return Promise.reject(new VolumeError('ESHUTDOWN', `${this.name}: closed`));
    if (this.pickSource()) return Promise.resolve();
    const left = deadline - Date.now();
    const eio = (): VolumeError => new VolumeError('EIO', `${this.name}: no in-sync replica reachable${cause ? ` (${cause.message})` : ''}`, { cause });
    if (left <= 0) return Promise.reject(eio());
    if (this.waiters.size >= this.maxWaiting) {
      return Promise.reject(new VolumeError('EIO', `${this.name}: no in-sync replica reachable and ${this.maxWaiting} requests already waiting`));
    }
    return new Promise<void>((resolve, reject) => {
      const w: Waiter = {
        resolve,
        reject,
        timer: setTimeout(() => {
          this.waiters.delete(w);
          reject(eio());
        }, left),
      };
      this.waiters.add(w);
    });
  }

  private wake(): void {
    if (!this.pickSource()) return;
    for (const w of [...this.waiters]) {
      clearTimeout(w.timer);
      w.resolve();
    }
    this.waiters.clear();
  }

  // ---- replica events ----

  private makeRep(vol: ReplicaVolume, state: ReplicaState): Rep {
    const r: Rep = {
      vol,
      id: vol.id,
      state,
      pending: 0,
      unflushed: new Set(),
      sync: null,
      touched: state === 'rebuilding' ? null : new Set(), // rebuilding from a record: unknown
      removed: false,
      downs: 0,
      rebuildTimer: null,
      retryTimer: null,
      replacing: false,
      onUp: () => this.onUp(r),
      onDown: () => this.onDown(r),
    };
    vol.on('up', r.onUp);
    vol.on('down', r.onDown);
    vol.setShortCircuit?.(state === 'in-sync');
    return r;
  }

  private detach(r: Rep): void {
    r.vol.off('up', r.onUp);
    r.vol.off('down', r.onDown);
    if (r.rebuildTimer) clearTimeout(r.rebuildTimer);
    if (r.retryTimer) clearTimeout(r.retryTimer);
    r.rebuildTimer = r.retryTimer = null;
  }

  private onUp(r: Rep): void {
    if (this.closed || r.removed) return;
    this.log.info({ replica: r.id, state: r.state }, 'replica up');
    if (r.rebuildTimer) clearTimeout(r.rebuildTimer);
    r.rebuildTimer = null;
    this.wake();
    this.kickResyncs();
  }

  private onDown(r: Rep): void {
    if (this.closed || r.removed) return;
    r.downs++;
    this.log.warn({ replica: r.id, state: r.state }, 'replica down');
    if (r.sync) r.sync.aborted = true;
    if (r.state === 'in-sync' || r.sync) {
      void this.demote(r, null).catch((e) => this.log.error({ replica: r.id, err: (e as Error).message }, 'marking a down replica failed'));
      this.persistInBackground();
    }
    this.armRebuild(r);
  }

  private armRetry(r: Rep): void {
    if (r.retryTimer || this.closed) return;
    r.retryTimer = setTimeout(() => {
      r.retryTimer = null;
      this.kickResyncs();
    }, this.resyncRetryMs);
  }

  private armRebuild(r: Rep): void {
    if (!this.replaceFn || r.rebuildTimer || this.closed) return;
    r.rebuildTimer = setTimeout(() => {
      r.rebuildTimer = null;
      void this.rebuild(r);
    }, this.rebuildAfterMs);
  }

  // ---- resync ----

  /** Starts a resync for every reachable replica that is not in sync, when a source is up. */
  private kickResyncs(): void {
    if (this.closed || !this.pickSource()) return;
    for (const r of this.reps) {
      // A replica being replaced is not resynced: its DRL slot is about to change hands.
      if (r.removed || r.replacing || r.state === 'in-sync' || !r.vol.up) continue;
      if (r.sync) {
        if (r.sync.aborted) r.sync.restart = true;
        continue;
      }
      this.startResync(r);
    }
  }

  private startResync(r: Rep): void {
    if (r.retryTimer) clearTimeout(r.retryTimer);
    r.retryTimer = null;
    const total = this.drl.dirtyBytes(r.id);
    const sync: Sync = { doneBytes: 0, totalBytes: total, startedAt: Date.now(), aborted: false, restart: false, lastDecile: 0, task: Promise.resolve() };
    r.sync = sync;
    const kind = r.state === 'rebuilding' ? 'rebuild' : 'resync';
    this.log.info({ replica: r.id, totalBytes: total }, `${kind} started`);
    sync.task = this.runResync(r, sync, kind).finally(() => {
      if (r.sync !== sync) return;
      r.sync = null;
      if (sync.restart) this.kickResyncs();
    });
  }

  private async runResync(r: Rep, sync: Sync, kind: string): Promise<void> {
    try {
      for (;;) {
        if (sync.aborted || this.closed || r.removed) throw new VolumeError('ESHUTDOWN', `${kind} stopped`);
        const regions = this.drl.dirtyRegions(r.id);
        if (regions.length === 0) {
          // Empty bitmap with every write since the start also sent to it: in sync (decided
          // synchronously with the check, so no write can slip between).
          this.setState(r, 'in-sync');
          r.touched = new Set();
          this.emit('progress', this.statusOf(r));
          this.log.info({ replica: r.id, copiedBytes: sync.doneBytes, ms: Date.now() - sync.startedAt }, `${kind} finished; replica in sync`);
          this.persistInBackground();
          this.wake();
          this.kickResyncs(); // it may be the source others were waiting for
          return;
        }
        let next = 0;
        const worker = async (): Promise<void> => {
          while (next < regions.length) {
            if (sync.aborted || this.closed || r.removed) throw new VolumeError('ESHUTDOWN', `${kind} stopped`);
            await this.copyRegion(r, regions[next++]!, sync);
          }
        };
        // On the first failure the other workers stop after their current region; the pass
        // ends only when all have (no copy outlives its resync).
        const results = await Promise.allSettled(
          Array.from({ length: Math.min(this.resyncConcurrency, regions.length) }, () =>
            worker().catch((e: unknown) => {
              sync.aborted = true;
              throw e;
            }),
          ),
        );
        const failed = results.find((x): x is PromiseRejectedResult => x.status === 'rejected');
        if (failed) throw failed.reason;
      }
    } catch (e) {
      // Writes it took during the resync and has not flushed were not marked: mark them now,
      // since it is no longer a write target and could still lose them.
      for (const k of r.unflushed) void this.drl.markRegion(r.id, k).catch(() => {});
      r.unflushed.clear();
      if (this.closed) return;
      this.log.warn({ replica: r.id, err: (e as Error).message, doneBytes: sync.doneBytes }, `${kind} interrupted`);
      if (r.vol.up && !r.removed) this.armRetry(r);
    }
  }

  /** Copies one dirty region from an in-sync replica to `r` under the region lock. */
  private async copyRegion(r: Rep, k: number, sync: Sync): Promise<void> {
    const release = await this.lockRegion(k);
    try {
      if (!this.drl.isDirty(r.id, k)) return;
      const src = this.pickSource();
      if (!src) throw new VolumeError('EIO', 'no in-sync replica to copy from');
      const start = k * this.regionSize;
      const end = Math.min(this.size, start + this.regionSize);
      const fresh = r.state === 'rebuilding' && r.touched !== null && !r.touched.has(k);
      const maxIo = Math.min(this.limits.maximum, this.regionSize);
      let pos = start;
      while (pos < end) {
        let extents: Extent[];
        if (src.vol.caps.blockStatus) {
          const o = await this.call(src, (v) => v.blockStatus(pos, end - pos));
          if (!o.ok) throw o.err;
          extents = o.value.length ? o.value : [{ offset: pos, length: end - pos, hole: false, zero: false }];
        } else {
          extents = [{ offset: pos, length: end - pos, hole: false, zero: false }];
        }
        for (const e of extents) {
          const eEnd = Math.min(end, e.offset + e.length);
          if (e.zero) {
            // A fresh replica already reads zeroes there: skip. Otherwise zero it.
            if (!fresh) await this.must(r, (v) => v.writeZeroes(e.offset, eEnd - e.offset, { mayTrim: e.hole }));
          } else {
            for (let o = e.offset; o < eEnd; o += maxIo) {
              const n = Math.min(maxIo, eEnd - o);
              const buf = Buffer.allocUnsafe(n);
              const rd = await this.call(src, (v) => v.read(o, buf));
              if (!rd.ok) throw rd.err;
              await this.must(r, (v) => v.write(o, buf));
            }
          }
          pos = eEnd;
        }
      }
      await this.must(r, (v) => v.flush());
      if (sync.aborted || r.removed) throw new VolumeError('ESHUTDOWN', 'resync stopped');
      this.drl.clear(r.id, k);
      sync.doneBytes += end - start;
      sync.totalBytes = Math.max(sync.totalBytes, sync.doneBytes + this.drl.dirtyBytes(r.id));
      this.emit('progress', this.statusOf(r));
      const decile = sync.totalBytes ? Math.floor((sync.doneBytes / sync.totalBytes) * 10) : 10;
      if (decile > sync.lastDecile && decile < 10) {
        sync.lastDecile = decile;
        this.log.info({ replica: r.id, doneBytes: sync.doneBytes, totalBytes: sync.totalBytes }, `resync ${decile * 10}%`);
      }
    } finally {
      release();
    }
  }

  private async must(r: Rep, fn: (v: ReplicaVolume) => Promise<void>): Promise<void> {
    const o = await this.call(r, fn);
    if (!o.ok) throw o.err;
  }

  /** Takes region k for a copy: blocks new guest writes there, then waits for those in flight. */
  private async lockRegion(k: number): Promise<() => void> {
    while (this.copying.has(k)) await this.copying.get(k);
    let release!: () => void;
    const held = new Promise<void>((res) => (release = res));
    this.copying.set(k, held);
    const start = k * this.regionSize;
    const end = start + this.regionSize;
    const busy = [...this.inflight].filter((w) => w.start < end && start < Math.max(w.end, w.start + 1));
    await Promise.all(busy.map((w) => new Promise<void>((res) => (w.waiters ??= []).push(res))));
    return () => {
      this.copying.delete(k);
      release();
    };
  }

  /** Guest write side of the region lock: the copy holding a region of the range, if any. */
  private copyHolding(offset: number, length: number): Promise<void> | undefined {
    if (this.copying.size === 0) return undefined;
    const first = Math.floor(offset / this.regionSize);
    const last = Math.floor((offset + Math.max(length, 1) - 1) / this.regionSize);
    for (let k = first; k <= last; k++) {
      const held = this.copying.get(k);
      if (held) return held;
    }
    return undefined;
  }

  // ---- rebuild ----

  private async rebuild(old: Rep): Promise<void> {
    if (!this.replaceFn || this.closed || old.removed || old.replacing) return;
    if (old.vol.up || old.state === 'in-sync') return;
    old.replacing = true;
    let fresh: ReplicaVolume;
    try {
      this.log.warn({ replica: old.id, downMs: this.rebuildAfterMs }, 'replica down too long; replacing it');
      fresh = await this.replaceFn(old.id);
    } catch (e) {
      old.replacing = false;
      this.log.error({ replica: old.id, err: (e as Error).message }, 'no replacement replica; will try again');
      if (!old.vol.up) this.armRebuild(old);
      this.kickResyncs();
      return;
    }
    try {
      if (this.closed) throw new VolumeError('ESHUTDOWN', 'closed');
      if (fresh.size !== this.size) throw new VolumeError('EINVAL', `replacement ${fresh.id} has size ${fresh.size}, not ${this.size}`);
      if (this.reps.some((x) => x.id === fresh.id)) throw new VolumeError('EEXIST', `replacement ${fresh.id} is already a replica`);
      // A resync of the old replica still stopping must not clear bits of the slot any more.
      if (old.sync) {
        old.sync.aborted = true;
        await old.sync.task;
      }
      // All dirty first, then the new id: a crash between leaves the slot all dirty.
      await this.drl.setAll(old.id);
      await this.drl.rename(old.id, fresh.id);
    } catch (e) {
      old.replacing = false;
      this.log.error({ replica: old.id, err: (e as Error).message }, 'replacing the replica failed; will try again');
      await fresh.close().catch(() => {});
      if (!this.closed && !old.vol.up) this.armRebuild(old);
      this.kickResyncs();
      return;
    }
    old.removed = true;
    this.detach(old);
    const rep = this.makeRep(fresh, 'rebuilding');
    rep.touched = new Set();
    this.reps = this.reps.map((x) => (x === old ? rep : x));
    this.gen++;
    this.emit('state', { id: old.id, state: 'removed' } satisfies ReplicaStateEvent);
    this.emit('state', { id: rep.id, state: 'rebuilding' } satisfies ReplicaStateEvent);
    this.log.info({ old: old.id, replica: rep.id }, 'replacement replica added; rebuilding');
    this.persistInBackground();
    void old.vol.close().catch(() => {});
    if (!fresh.up) this.armRebuild(rep);
    this.kickResyncs();
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((res) => setTimeout(res, ms));
}
