/**
 * The inflight area (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): shared memory the back end
 * allocates (GET_INFLIGHT_FD), the front end keeps, and hands back to a restarted back end
 * (SET_INFLIGHT_FD), so that requests popped but not completed when the back end died are
 * resubmitted instead of lost. The layout is the back end's own business (QEMU treats it as
 * opaque); this is libvhost-user's split-ring scheme, per queue:
 *
 *   header (16 bytes): u64 features, u16 version, u16 desc_num, u16 last_batch_head, u16 used_idx
 *   desc[desc_num] (16 bytes each): u8 inflight, u8 pad[5], u16 next, u64 counter
 *
 * Protocol: when a chain is popped, desc[head] = {inflight: 1, counter: n++}. To complete it:
 * last_batch_head = head; write the used element and used->idx; then desc[head].inflight = 0
 * and used_idx = used->idx. A crash between the two shows as used_idx != used->idx: the
 * request at last_batch_head was completed. On restart, every popped chain is either counted
 * in used->idx or still flagged, so the next avail index is used->idx + flagged, and flagged
 * chains are resubmitted in submission (counter) order. Pure over a Buffer.
 */

export const INFLIGHT_VERSION = 1;
const HEADER = 16;
const DESC_STATE = 16;
const ALIGN = 64;

/** Bytes of one queue's area. */
export function inflightQueueBytes(queueSize: number): number {
  return Math.ceil((HEADER + DESC_STATE * queueSize) / ALIGN) * ALIGN;
}

export function inflightBytes(numQueues: number, queueSize: number): number {
  return numQueues * inflightQueueBytes(queueSize);
}

export interface Recovery {
  /** Next available index to pop. */
  lastAvail: number;
  /** Heads to resubmit first, oldest first. */
  resubmit: number[];
  /** The area was blank (first start): nothing was recovered. */
  fresh: boolean;
}

export class InflightQueue {
  private readonly v: DataView;
  private counter = 0;

  /** `area` is this queue's part of the inflight memory (inflightQueueBytes(size) bytes). */
  constructor(
    area: Uint8Array,
    readonly size: number,
  ) {
    if (area.length < inflightQueueBytes(size)) throw new Error('inflight area too small');
    this.v = new DataView(area.buffer, area.byteOffset, inflightQueueBytes(size));
  }

  get version(): number {
    return this.v.getUint16(8, true);
  }

  isInflight(head: number): boolean {
    return this.v.getUint8(HEADER + head * DESC_STATE) === 1;
  }

  /**
   * Reads the area at ring start. `usedIdx` is the used ring's index as found in guest memory.
   * A blank area (or one for another queue size) is initialised and nothing is recovered.
   */
  recover(usedIdx: number, features = 0n): Recovery {
    const v = this.v;
    if (v.getUint16(8, true) !== INFLIGHT_VERSION || v.getUint16(10, true) !== this.size) {
      new Uint8Array(v.buffer, v.byteOffset, v.byteLength).fill(0);
      v.setBigUint64(0, features, true);
      v.setUint16(8, INFLIGHT_VERSION, true);
      v.setUint16(10, this.size, true);
      v.setUint16(14, usedIdx, true);
      this.counter = 0;
      return { lastAvail: usedIdx, resubmit: [], fresh: true };
    }
    if (v.getUint16(14, true) !== usedIdx) {
      // Died after publishing used->idx, before clearing the flag: that request completed.
      const last = v.getUint16(12, true);
      if (last < this.size) v.setUint8(HEADER + last * DESC_STATE, 0);
      v.setUint16(14, usedIdx, true);
    }
    const flagged: { head: number; counter: number }[] = [];
    for (let i = 0; i < this.size; i++) {
      const o = HEADER + i * DESC_STATE;
      const f = v.getUint8(o);
      if (f === 1) flagged.push({ head: i, counter: v.getUint32(o + 8, true) + v.getUint32(o + 12, true) * 0x100000000 });
      else if (f !== 0) v.setUint8(o, 0); // garbage: not a request
    }
    flagged.sort((a, b) => a.counter - b.counter);
    this.counter = flagged.length ? flagged[flagged.length - 1]!.counter + 1 : 0;
    return { lastAvail: (usedIdx + flagged.length) & 0xffff, resubmit: flagged.map((f) => f.head), fresh: false };
  }

  /** A chain was popped. */
  get(head: number): void {
    const o = HEADER + head * DESC_STATE;
    const c = this.counter++;
    this.v.setUint32(o + 8, c >>> 0, true);
    this.v.setUint32(o + 12, Math.floor(c / 0x100000000), true);
    this.v.setUint8(o, 1);
  }

  /** Before writing the used element of `head`. */
  prePut(head: number): void {
    this.v.setUint16(12, head, true);
  }

  /** After publishing used->idx = usedIdx for `head`. */
  postPut(head: number, usedIdx: number): void {
    this.v.setUint8(HEADER + head * DESC_STATE, 0);
    this.v.setUint16(14, usedIdx, true);
  }
}
