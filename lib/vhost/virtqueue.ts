/**
 * The back end's side of a split virtqueue (virtio 1.2 §2.7) over mapped guest memory: pops
 * descriptor chains from the available ring as lists of guest-memory views, pushes used
 * elements, and decides when the driver must be notified (EVENT_IDX or the NO_INTERRUPT flag).
 *
 * Why in TypeScript and not C++: the ring lives in memory that is already mapped and exposed
 * as ArrayBuffers, so walking a chain is a handful of DataView loads — about the cost of one
 * JS->C++ crossing, which a native walker would pay anyway to hand the views over. The views
 * themselves must be JS objects either way. Keeping the walker here keeps it fuzzable with
 * fast-check over plain Buffers, and the native side to syscalls. Memory ordering: the idx
 * fields are read and written with Atomics (sequentially consistent: a full barrier on x86),
 * which gives the acquire on avail->idx, the release on used->idx and the store-load fence
 * the EVENT_IDX protocol needs between publishing used->idx and reading used_event.
 * Host byte order is little-endian (x86-64, aarch64), as virtio 1.x rings are.
 *
 * Two kinds of bad input:
 * - RingError: the ring itself is corrupt (head or next out of range, a loop, a nested or
 *   malformed indirect table, the avail index running ahead by more than the queue size). The
 *   queue cannot continue; the transport closes the device's connection.
 * - Element.error: one request's buffers are bad (outside guest memory, a device-readable
 *   descriptor after a device-writable one). The device answers that request with an error.
 */
import type { GuestMemory } from './memory.js';

export const VRING_DESC_F_NEXT = 1;
export const VRING_DESC_F_WRITE = 2;
export const VRING_DESC_F_INDIRECT = 4;
export const VRING_AVAIL_F_NO_INTERRUPT = 1;
export const VRING_USED_F_NO_NOTIFY = 1;
export const MAX_QUEUE_SIZE = 32768;
export const DESC_SIZE = 16;

export class RingError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'RingError';
  }
}

export interface Element {
  /** Head descriptor index: the id to push back. */
  head: number;
  /** Device-readable buffers (driver -> device), in chain order. */
  readable: Buffer[];
  /** Device-writable buffers (device -> driver), in chain order. */
  writable: Buffer[];
  readableLen: number;
  writableLen: number;
  /**
   * The last non-empty device-writable buffer is mapped, so the last byte of `writable` is the
   * chain's last device-writable byte (where virtio-blk puts its status).
   */
  writableMapped: boolean;
  /** Set when a buffer of this chain is unusable; the device should fail the request. */
  error?: string;
}

/** Bytes of the three parts of a split ring of `size` entries (with the event-idx words). */
export function ringSizes(size: number): { desc: number; avail: number; used: number } {
  return { desc: DESC_SIZE * size, avail: 6 + 2 * size, used: 6 + 8 * size };
}

/** vring_need_event: has new_idx moved past event_idx since old_idx? (all u16) */
export function needEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}

export interface SplitRingOptions {
  size: number;
  /** Views of the descriptor table, the available ring and the used ring (see ringSizes). */
  desc: Buffer;
  avail: Buffer;
  used: Buffer;
  eventIdx: boolean;
  /** Next available index to process (SET_VRING_BASE). */
  lastAvail?: number;
  /** Used index to continue from; defaults to the ring's current used->idx. */
  usedIdx?: number;
}

export class SplitRing {
  readonly size: number;
  readonly eventIdx: boolean;
  /** Next avail ring index to process (u16, wraps). */
  lastAvail: number;
  /** Next used ring index to write (u16, wraps). */
  usedIdx: number;

  private readonly mem: GuestMemory;
  private readonly desc: DataView;
  private readonly avail16: Uint16Array;
  private readonly used16: Uint16Array;
  private readonly used32: Uint32Array;
  private signalledUsed = 0;
  private signalledValid = false;

  constructor(mem: GuestMemory, o: SplitRingOptions) {
    const { size } = o;
    if (!Number.isInteger(size) || size < 1 || size > MAX_QUEUE_SIZE || (size & (size - 1)) !== 0) {
      throw new RingError(`bad queue size ${size}`);
    }
    const need = ringSizes(size);
    if (o.desc.length < need.desc || o.avail.length < need.avail || o.used.length < need.used) {
      throw new RingError('ring views too small');
    }
    if (o.avail.byteOffset % 2 !== 0 || o.used.byteOffset % 4 !== 0) throw new RingError('misaligned ring');
    this.mem = mem;
    this.size = size;
    this.eventIdx = o.eventIdx;
    this.desc = new DataView(o.desc.buffer, o.desc.byteOffset, need.desc);
    this.avail16 = new Uint16Array(o.avail.buffer, o.avail.byteOffset, need.avail / 2);
    this.used16 = new Uint16Array(o.used.buffer, o.used.byteOffset, need.used / 2);
    this.used32 = new Uint32Array(o.used.buffer, o.used.byteOffset, (need.used - 2) / 4);
    this.lastAvail = (o.lastAvail ?? 0) & 0xffff;
    this.usedIdx = o.usedIdx === undefined ? Atomics.load(this.used16, 1) : o.usedIdx & 0xffff;
  }

  /** Entries the driver has made available and we have not popped. Throws when corrupt. */
  pending(): number {
    const n = (Atomics.load(this.avail16, 1) - this.lastAvail) & 0xffff;
    if (n > this.size) throw new RingError(`avail index moved ${n} entries ahead (queue size ${this.size})`);
    return n;
  }

  /** The next available chain, or null when the ring is empty. */
  pop(): Element | null {
    if (this.pending() === 0) return null;
    const head = this.avail16[2 + (this.lastAvail & (this.size - 1))]!;
    this.lastAvail = (this.lastAvail + 1) & 0xffff;
    return this.walk(head);
  }

  /** The chain at `head` (resubmission of an inflight request after a restart). */
  chain(head: number): Element {
    return this.walk(head);
  }

  private walk(head: number): Element {
    if (head >= this.size) throw new RingError(`head ${head} >= queue size ${this.size}`);
    const el: Element = { head, readable: [], writable: [], readableLen: 0, writableLen: 0, writableMapped: true };
    let sawWrite = false;
    let table = this.desc;
    let max = this.size;
    let i = head;
    let count = 0;
    let indirect = false;
    for (;;) {
      const o = i * DESC_SIZE;
      const lo = table.getUint32(o, true);
      const hi = table.getUint32(o + 4, true);
      const len = table.getUint32(o + 8, true);
      const flags = table.getUint16(o + 12, true);
      const next = table.getUint16(o + 14, true);
      if (++count > max) throw new RingError(`descriptor chain from ${head} longer than ${max} (a loop?)`);
      if (flags & VRING_DESC_F_INDIRECT) {
        if (indirect) throw new RingError('indirect descriptor inside an indirect table');
        if (flags & VRING_DESC_F_NEXT) throw new RingError('indirect descriptor with NEXT');
        if (count !== 1) throw new RingError('indirect descriptor not at the head of its chain');
        if (len === 0 || len % DESC_SIZE !== 0 || len / DESC_SIZE > MAX_QUEUE_SIZE) {
          throw new RingError(`indirect table of ${len} bytes`);
        }
        const t = hi < 0x200000 ? this.mem.guestView(hi * 0x100000000 + lo, len) : null;
        if (t === null) throw new RingError('indirect table outside guest memory');
        table = new DataView(t.buffer, t.byteOffset, t.length);
        max = len / DESC_SIZE;
        i = 0;
        count = 0;
        indirect = true;
        continue;
      }
      const addr = hi * 0x100000000 + lo;
      if (flags & VRING_DESC_F_WRITE) {
        sawWrite = true;
        el.writableLen += len;
        if (len > 0) {
          // Later writable buffers are still mapped: the status byte of a block request lives in
          // the last one, and can carry the error of an earlier one.
          el.writableMapped = hi < 0x200000 && this.mem.guestViews(addr, len, el.writable);
          if (!el.writableMapped) el.error ??= `device-writable buffer 0x${addr.toString(16)}+${len} outside guest memory`;
        }
      } else if (sawWrite) {
        el.error ??= 'device-readable descriptor after a device-writable one';
      } else {
        el.readableLen += len;
        if (el.error === undefined && (hi >= 0x200000 || !this.mem.guestViews(addr, len, el.readable))) {
          el.error = `device-readable buffer 0x${addr.toString(16)}+${len} outside guest memory`;
        }
      }
      if (!(flags & VRING_DESC_F_NEXT)) break;
      if (next >= max) throw new RingError(`next ${next} >= ${max}`);
      i = next;
    }
    return el;
  }

  /** Returns a chain to the driver: `len` bytes were written to its device-writable buffers. */
  push(head: number, len: number): void {
    const at = 1 + 2 * (this.usedIdx & (this.size - 1));
    this.used32[at] = head;
    this.used32[at + 1] = len;
    this.usedIdx = (this.usedIdx + 1) & 0xffff;
    Atomics.store(this.used16, 1, this.usedIdx);
  }

  /** Must the driver be notified of what was pushed since the last notification? */
  needNotify(): boolean {
    const newIdx = this.usedIdx;
    if (this.eventIdx) {
      const usedEvent = Atomics.load(this.avail16, 2 + this.size);
      const old = this.signalledUsed;
      const valid = this.signalledValid;
      this.signalledUsed = newIdx;
      this.signalledValid = true;
      return !valid || needEvent(usedEvent, newIdx, old);
    }
    return (Atomics.load(this.avail16, 0) & VRING_AVAIL_F_NO_INTERRUPT) === 0;
  }

  /** While draining the ring: ask the driver not to kick (without EVENT_IDX; with it, avail_event does this). */
  disableNotify(): void {
    if (!this.eventIdx) Atomics.store(this.used16, 0, Atomics.load(this.used16, 0) | VRING_USED_F_NO_NOTIFY);
  }

  /**
   * Before going idle: ask for a kick at the next available entry, then look again (the driver
   * may have added one before it could see the request). Returns true when more work is pending.
   */
  enableNotify(): boolean {
    if (this.eventIdx) Atomics.store(this.used16, 2 + 4 * this.size, this.lastAvail);
    else Atomics.store(this.used16, 0, Atomics.load(this.used16, 0) & ~VRING_USED_F_NO_NOTIFY);
    return this.pending() > 0;
  }
}
