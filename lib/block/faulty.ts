/**
 * A fault-injecting replica over a MemoryVolume, for unit tests of the replicated layer (and
 * later chaos tests). It behaves as lib/block/remote.ts promises a RemoteVolume behaves:
 *   - while down (`goDown()`), new requests fail at once with ESHUTDOWN; requests in flight
 *     (held by the gate or a delay) fail with EIO; `comeUp()` emits 'up';
 *   - `failNext(op, code, count)` fails the next `count` requests of `op` (or of any op);
 *   - `failWritesAfter(n)` lets n more write-like requests through, then fails every one with EIO
 *     (a disk that broke) until `failWritesAfter(null)`;
 *   - `delay(ms)` holds every request that long; `hold()` / `release()` is a gate that holds
 *     requests until released (or until goDown fails them).
 * Counters tell tests what reached the memory below (bytes written, reads served).
 */
import { EventEmitter } from 'node:events';
import { VolumeError, type ErrnoCode } from './errors.js';
import { MemoryVolume, type MemoryOp, type MemoryVolumeOptions } from './memory.js';
import type { ReplicaVolume } from './replicated.js';
import type { BlockLimits, Extent, VolumeCapabilities, WriteOptions, ZeroOptions } from './volume.js';

export type FaultOp = MemoryOp | 'any';

export interface FaultyVolumeOptions extends MemoryVolumeOptions {
  id: string;
  /** Starts down (default up). */
  down?: boolean;
  /** Wrap this memory instead of a new one (a replica "restarted" with its data). */
  inner?: MemoryVolume;
}

export interface FaultyCounters {
  /** Requests that reached the memory below, by op. */
  ops: Record<MemoryOp, number>;
  /** Payload bytes written with write(). */
  bytesWritten: number;
  /** Bytes read. */
  bytesRead: number;
  /** Bytes zeroed or trimmed. */
  bytesZeroed: number;
  /** Requests failed by injection or by being down. */
  failed: number;
}

const WRITE_LIKE: ReadonlySet<MemoryOp> = new Set(['write', 'trim', 'writeZeroes']);

interface Held {
  resolve: () => void;
  reject: (e: unknown) => void;
  /** Runs, but its reply is lost (fails with EIO after it took effect). */
  lost: boolean;
}

export class FaultyVolume extends EventEmitter implements ReplicaVolume {
  readonly id: string;
  readonly inner: MemoryVolume;
  readonly counters: FaultyCounters = {
    ops: { read: 0, write: 0, flush: 0, trim: 0, writeZeroes: 0, prefetch: 0, blockStatus: 0 },
    bytesWritten: 0,
    bytesRead: 0,
    bytesZeroed: 0,
    failed: 0,
  };
  /** Requests in progress here. */
  pending = 0;

  private isUp: boolean;
  private failures: { op: FaultOp; code: ErrnoCode; count: number }[] = [];
  private writesLeft: number | null = null;
  private delayMs = 0;
  private gate: ReadonlySet<MemoryOp> | null = null;
  private readonly held = new Set<Held>();
  private closedHere = false;

  constructor(opts: FaultyVolumeOptions) {
    super();
    this.id = opts.id;
    this.isUp = !opts.down;
    this.inner = opts.inner ?? new MemoryVolume(opts);
  }

  get size(): number {
    return this.inner.size;
  }
  get limits(): BlockLimits {
    return this.inner.limits;
  }
  get caps(): VolumeCapabilities {
    return this.inner.caps;
  }
  get up(): boolean {
    return this.isUp;
  }

  // ---- controls ----

  /**
   * Becomes unreachable: requests in flight fail with EIO (with `applyInFlight`, after taking
   * effect: the reply was lost, not the request), new ones with ESHUTDOWN; emits 'down'.
   */
  goDown(opts: { applyInFlight?: boolean } = {}): void {
    if (!this.isUp) return;
    this.isUp = false;
    for (const h of [...this.held]) {
      if (opts.applyInFlight) {
        h.lost = true;
        h.resolve();
      } else {
        h.reject(new VolumeError('EIO', `replica ${this.id}: connection lost`));
      }
    }
    this.held.clear();
    this.emit('down');
  }

  /** Reachable again; emits 'up'. */
  comeUp(): void {
    if (this.isUp) return;
    this.isUp = true;
    this.emit('up');
  }

  /** The next `count` requests of `op` ('any': of any kind) fail with `code`. */
  failNext(op: FaultOp, code: ErrnoCode = 'EIO', count = 1): void {
    this.failures.push({ op, code, count });
  }

  /** After `n` more write-like requests, every write/trim/writeZeroes fails with EIO; null heals. */
  failWritesAfter(n: number | null): void {
    this.writesLeft = n;
  }

  /** Every request waits `ms` before it runs. */
  delay(ms: number): void {
    this.delayMs = ms;
  }

  /** Holds new requests (of `ops`, default all) until release() or goDown(). */
  hold(ops?: MemoryOp[]): void {
    this.gate = new Set(ops ?? ['read', 'write', 'flush', 'trim', 'writeZeroes', 'prefetch', 'blockStatus']);
  }

  release(): void {
    this.gate = null;
    for (const h of [...this.held]) h.resolve();
    this.held.clear();
  }

  /** Requests currently held by the gate. */
  get heldCount(): number {
    return this.held.size;
  }

  /** The whole contents, read from the memory below without faults or counting. */
  async contents(): Promise<Buffer> {
    const b = Buffer.alloc(this.size);
    await this.inner.read(0, b);
    return b;
  }

  // ---- Volume ----

  async read(offset: number, buf: Buffer): Promise<void> {
    const t = await this.enter('read');
    try {
      await this.inner.read(offset, buf);
      this.counters.ops.read++;
      this.counters.bytesRead += buf.length;
    } finally {
      this.pending--;
    }
    this.lostReply(t);
  }

  async write(offset: number, buf: Buffer, opts?: WriteOptions): Promise<void> {
    const t = await this.enter('write');
    try {
      await this.inner.write(offset, buf, opts);
      this.counters.ops.write++;
      this.counters.bytesWritten += buf.length;
    } finally {
      this.pending--;
    }
    this.lostReply(t);
  }

  async flush(): Promise<void> {
    const t = await this.enter('flush');
    try {
      await this.inner.flush();
      this.counters.ops.flush++;
    } finally {
      this.pending--;
    }
    this.lostReply(t);
  }

  async trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    const t = await this.enter('trim');
    try {
      await this.inner.trim(offset, length, opts);
      this.counters.ops.trim++;
      this.counters.bytesZeroed += length;
    } finally {
      this.pending--;
    }
    this.lostReply(t);
  }

  async writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    const t = await this.enter('writeZeroes');
    try {
      await this.inner.writeZeroes(offset, length, opts);
      this.counters.ops.writeZeroes++;
      this.counters.bytesZeroed += length;
    } finally {
      this.pending--;
    }
    this.lostReply(t);
  }

  async prefetch(offset: number, length: number): Promise<void> {
    const t = await this.enter('prefetch');
    try {
      await this.inner.prefetch(offset, length);
      this.counters.ops.prefetch++;
    } finally {
      this.pending--;
    }
    this.lostReply(t);
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const t = await this.enter('blockStatus');
    try {
      const r = await this.inner.blockStatus(offset, length);
      this.counters.ops.blockStatus++;
      this.lostReply(t);
      return r;
    } finally {
      this.pending--;
    }
  }

  async close(): Promise<void> {
    this.closedHere = true;
    for (const h of [...this.held]) h.reject(new VolumeError('ESHUTDOWN', `replica ${this.id}: closed`));
    this.held.clear();
    this.removeAllListeners();
    // The memory stays readable through contents() for tests that inspect a closed replica.
  }

  /** Whether close() was called. */
  get closed(): boolean {
    return this.closedHere;
  }

  private lostReply(t: { lost: boolean }): void {
    if (t.lost) throw this.fail(new VolumeError('EIO', `replica ${this.id}: connection lost (request done, reply lost)`));
  }

  /** Checks faults and waits for delay/gate; on return `pending` has been incremented. */
  private async enter(op: MemoryOp): Promise<{ lost: boolean }> {
    const token = { lost: false };
    if (this.closedHere) throw this.fail(new VolumeError('ESHUTDOWN', `replica ${this.id}: closed`));
    if (!this.isUp) throw this.fail(new VolumeError('ESHUTDOWN', `replica ${this.id} is down`));
    this.pending++;
    try {
      const f = this.failures.find((x) => x.op === op || x.op === 'any');
      if (f) {
        if (--f.count <= 0) this.failures.splice(this.failures.indexOf(f), 1);
        throw new VolumeError(f.code, `replica ${this.id}: injected ${op} failure`);
      }
      if (WRITE_LIKE.has(op) && this.writesLeft !== null) {
        if (this.writesLeft <= 0) throw new VolumeError('EIO', `replica ${this.id}: writes failing`);
        this.writesLeft--;
      }
      const gated = this.gate?.has(op) ?? false;
      if (this.delayMs > 0 || gated) {
        await new Promise<void>((resolve, reject) => {
          const h: Held = { resolve: () => {
            token.lost = h.lost;
            resolve();
          }, reject, lost: false };
          this.held.add(h);
          if (!gated) {
            setTimeout(() => {
              if (!this.held.delete(h)) return;
              resolve();
            }, this.delayMs);
          }
        });
        if (!this.isUp && !token.lost) throw new VolumeError('EIO', `replica ${this.id}: connection lost`);
      }
    } catch (e) {
      this.pending--;
      throw this.fail(e as VolumeError);
    }
    return token;
  }

  private fail(e: VolumeError): VolumeError {
    this.counters.failed++;
    return e;
  }
}
