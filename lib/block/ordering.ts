/**
 * Range ordering: requests that conflict run in arrival order, everything else runs at once.
 *
 * A protocol front end (NBD, vhost-user-blk) may complete requests out of order, but the
 * storage below must still see a coherent history: a read issued after an overlapping write
 * must return the written data, two overlapping writes must land in issue order, and a write
 * must not overtake an earlier overlapping read (which would then return the new data).
 *
 *   - read / prefetch / blockStatus wait for every earlier unfinished overlapping write, trim
 *     or writeZeroes;
 *   - write / trim / writeZeroes wait for every earlier unfinished overlapping operation;
 *   - flush waits for every earlier unfinished write-like operation (any range), so that the
 *     writes a client saw complete before it sent the flush are covered;
 *   - nothing else waits: non-overlapping requests run concurrently.
 *
 * The server wraps each export's volume in ONE OrderedVolume shared by all its connections, so
 * the ordering (and therefore a flush covering every connection's writes) holds across them.
 *
 * Cost when nothing conflicts: one scan over the in-flight set (bounded by the server's
 * in-flight limit) and one small object per request; no promise is created for waiting.
 */
import { toVolumeError } from './errors.js';
import { VolumeLayer } from './layer.js';
import type { Extent, Volume, WriteOptions, ZeroOptions } from './volume.js';

/** How an operation orders against others. */
export type OrderKind = 'read' | 'write' | 'flush';

interface Op {
  start: number;
  end: number;
  kind: OrderKind;
  /** Index in the active array (for O(1) removal). */
  index: number;
  /** Later operations waiting for this one. */
  waiters: Op[] | null;
  /** Earlier operations this one still waits for. */
  blockers: number;
  run: (() => void) | null;
}

function conflicts(earlier: Op, later: Op): boolean {
  if (later.kind === 'flush') return earlier.kind === 'write';
  if (earlier.kind === 'flush') return false;
  if (earlier.kind === 'read' && later.kind === 'read') return false;
  return earlier.start < later.end && later.start < earlier.end;
}

export class OrderedVolume extends VolumeLayer {
  /** Unfinished operations (running or waiting); all of them arrived before any new one. */
  private readonly active: Op[] = [];

  constructor(inner: Volume) {
    super(inner);
  }

  /** Operations currently running or waiting here. */
  get pending(): number {
    return this.active.length;
  }

  /** The volume below (for callers that run several inner calls under one `run`). */
  get below(): Volume {
    return this.inner;
  }

  /**
   * Runs `fn` once no earlier conflicting operation is unfinished, holding the range [offset,
   * offset+length) with ordering `kind` until the returned promise settles. Several inner calls
   * made inside one `fn` are ordered as a single operation (the NBD server's sparse read uses
   * this: blockStatus then the data reads, with no write slipping in between).
   */
  run<T>(kind: OrderKind, offset: number, length: number, fn: (inner: Volume) => Promise<T>): Promise<T> {
    const op: Op = { start: offset, end: offset + length, kind, index: this.active.length, waiters: null, blockers: 0, run: null };
    const active = this.active;
    for (let i = 0; i < active.length; i++) {
      const e = active[i]!;
      if (conflicts(e, op)) {
        (e.waiters ??= []).push(op);
        op.blockers++;
      }
    }
    active.push(op);
    if (op.blockers === 0) return this.start(op, fn);
    return new Promise<T>((resolve, reject) => {
      op.run = () => {
        this.start(op, fn).then(resolve, reject);
      };
    });
  }

  private start<T>(op: Op, fn: (inner: Volume) => Promise<T>): Promise<T> {
    let p: Promise<T>;
    try {
      p = fn(this.inner);
    } catch (e) {
      this.finish(op);
      return Promise.reject(toVolumeError(e));
    }
    return p.then(
      (v) => {
        this.finish(op);
        return v;
      },
      (e: unknown) => {
        this.finish(op);
        throw e;
      },
    );
  }

  private finish(op: Op): void {
    const active = this.active;
    const last = active.pop()!;
    if (last !== op) {
      active[op.index] = last;
      last.index = op.index;
    }
    const waiters = op.waiters;
    if (waiters) {
      op.waiters = null;
      for (const w of waiters) {
        if (--w.blockers === 0 && w.run) {
          const run = w.run;
          w.run = null;
          run();
        }
      }
    }
  }

  override read(offset: number, buf: Buffer): Promise<void> {
    return this.run('read', offset, buf.length, (v) => v.read(offset, buf));
  }
  override write(offset: number, buf: Buffer, opts?: WriteOptions): Promise<void> {
    return this.run('write', offset, buf.length, (v) => v.write(offset, buf, opts));
  }
  override flush(): Promise<void> {
    return this.run('flush', 0, 0, (v) => v.flush());
  }
  override trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    return this.run('write', offset, length, (v) => v.trim(offset, length, opts));
  }
  override writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    return this.run('write', offset, length, (v) => v.writeZeroes(offset, length, opts));
  }
  override prefetch(offset: number, length: number): Promise<void> {
    return this.run('read', offset, length, (v) => v.prefetch(offset, length));
  }
  override blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.run('read', offset, length, (v) => v.blockStatus(offset, length));
  }
}
