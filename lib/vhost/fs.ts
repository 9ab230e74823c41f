/**
 * The virtio-fs device (virtio spec 5.11) on the vhost-user transport: QEMU's
 * `-device vhost-user-fs-pci,chardev=...,tag=TAG` connects to it. Queue 0 is the hiprio queue
 * (FORGET, BATCH_FORGET, INTERRUPT: no reply), queues 1..N the request queues. Every chain is one
 * FUSE request: its device-readable buffers hold fuse_in_header and the arguments, its
 * device-writable buffers receive fuse_out_header and the answer.
 *
 * The device only moves bytes between the ring and a FUSE engine (lib/fuse/engine.ts): it knows
 * nothing of the operations. QEMU owns the config space (the tag is a QEMU device property), so
 * no CONFIG protocol feature is offered.
 *
 * Copies (decisions, not accidents): a request spread over several readable buffers (the guest
 * driver puts the header, the arguments and each page of WRITE data in separate scatter-gather
 * entries) is gathered into one Buffer for the codec; a reply is scattered into the writable
 * buffers. Both are copies of guest memory; a zero-copy WRITE/READ path would hand the engine the
 * data segments by reference.
 */
import type { Logger } from '../log.js';
import { VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, type VhostUserDevice } from './backend.js';
import { bit } from './protocol.js';
import type { Element } from './virtqueue.js';

/** fuse_out_header: len u32, error i32, unique u64. */
const OUT_HEADER = 16;
/** fuse_in_header: len, opcode, unique(8), nodeid(8), uid, gid, pid, total_extlen+padding. */
const IN_HEADER = 40;
/** Largest request the device gathers (1 MiB of WRITE data and the headers). */
const MAX_REQUEST = (1 << 20) + 4096;
/** Request queues offered when the caller does not say (QEMU's default num-request-queues is 1). */
const DEFAULT_REQUEST_QUEUES = 1;

/** What the device needs of the FUSE engine: one request in, the reply's buffers out. */
export interface FuseRequestHandler {
  /** The whole request message; resolves with the reply (header included) or null when none is due. */
  handle(msg: Buffer): Promise<Buffer[] | null>;
  /** The front end went away or reset the device: end the FUSE session. */
  reset(): void;
}

export interface VirtioFsOptions {
  handler: FuseRequestHandler;
  logger: Logger;
  /** Request queues (QEMU's vhost-user-fs-pci `num-request-queues`); the hiprio queue comes on top. */
  requestQueues?: number;
}

export class VirtioFsDevice implements VhostUserDevice {
  readonly features = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_INDIRECT_DESC) | bit(VIRTIO_RING_F_EVENT_IDX);
  readonly protocolFeatures = 0n;
  readonly numQueues: number;
  /** Requests answered, replies too large for their buffers, chains dropped as unusable. */
  readonly stats = { requests: 0, oversized: 0, dropped: 0 };
  private readonly handler: FuseRequestHandler;
  private readonly log: Logger;

  constructor(o: VirtioFsOptions) {
    const n = o.requestQueues ?? DEFAULT_REQUEST_QUEUES;
    if (!Number.isInteger(n) || n < 1 || n > 63) throw new Error(`virtio-fs: bad request queue count ${n}`);
    this.numQueues = 1 + n;
    this.handler = o.handler;
    this.log = o.logger;
  }

  getConfig(_offset: number, size: number): Buffer {
    return Buffer.alloc(size);
  }

  setConfig(): void {
    throw new Error('virtio-fs config space is read-only');
  }

  setFeatures(): void {}

  reset(): void {
    this.handler.reset();
  }

  async handle(_queue: number, el: Element): Promise<number> {
    if (el.error || el.readableLen < IN_HEADER || el.readableLen > MAX_REQUEST) {
      // Not a request we can parse: nothing to answer it with but silence (the chain is returned
      // empty). The guest driver sees a reply of length 0 and fails that one request.
      this.stats.dropped++;
      this.log.warn({ error: el.error, length: el.readableLen }, 'virtio-fs: unusable request chain dropped');
      return 0;
    }
    const msg = el.readable.length === 1 ? el.readable[0]! : Buffer.concat(el.readable, el.readableLen);
    const reply = await this.handler.handle(msg);
    this.stats.requests++;
    if (!reply) return 0;
    return this.scatter(reply, el, msg);
  }

  /** Copies the reply into the writable buffers; a reply that does not fit becomes an error reply. */
  private scatter(reply: Buffer[], el: Element, msg: Buffer): number {
    let total = 0;
    for (const b of reply) total += b.length;
    if (total > el.writableLen) {
      this.stats.oversized++;
      if (el.writableLen < OUT_HEADER) return 0;
      // ERANGE, as a too-small buffer for xattrs gets: the request's unique is echoed back.
      const err = Buffer.alloc(OUT_HEADER);
      err.writeUInt32LE(OUT_HEADER, 0);
      err.writeInt32LE(-34, 4);
      msg.copy(err, 8, 8, 16);
      reply = [err];
      total = OUT_HEADER;
    }
    let seg = 0;
    let segOff = 0;
    for (const b of reply) {
      let off = 0;
      while (off < b.length) {
        const dst = el.writable[seg]!;
        const n = b.copy(dst, segOff, off);
        off += n;
        segOff += n;
        if (segOff === dst.length) {
          seg++;
          segOff = 0;
        }
      }
    }
    return total;
  }
}
