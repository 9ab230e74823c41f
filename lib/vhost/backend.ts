/**
 * The vhost-user back end: one connection from a front end (QEMU, or the test driver), the
 * handshake and ring messages of docs/interop/vhost-user.rst, guest memory, and the virtqueues'
 * kick/call eventfds. Device-agnostic: a VhostUserDevice (virtio-blk, later virtio-fs) supplies
 * features, config space and a handler per request; this file moves frames and ring entries.
 *
 * Failure model: anything malformed from the front end (a bad message size, a missing fd, a
 * corrupt ring, an unmappable region) closes this connection and resets the device; the
 * process and every other connection carry on. Requests in flight when a ring stops or the
 * connection ends complete into views that stay mapped (unmapped on GC), and their used
 * entries are dropped if the ring they came from is gone.
 */
import type { Logger } from '../log.js';
import { native, type NativeAddon, type NativeFdWatcher } from '../native/index.js';
import { Channel, closeQuietly } from './channel.js';
import { CHUNK_SIZE, GuestMemory, MemoryError, type Region } from './memory.js';
import {
  bit,
  decodeConfig,
  decodeInflight,
  decodeMemRegionMsg,
  decodeMemTable,
  decodeU64,
  decodeVringAddr,
  decodeVringState,
  encodeConfig,
  encodeInflight,
  encodeU64,
  encodeVringState,
  F_PROTOCOL_FEATURES,
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  ProtocolError,
  ProtocolFeature as PF,
  Req,
  requestName,
  VRING_IDX_MASK,
  VRING_NOFD_MASK,
  type MemRegion,
  type Message,
  type VringAddr,
} from './protocol.js';
import { MAX_QUEUE_SIZE, ringSizes, RingError, SplitRing, type Element } from './virtqueue.js';
import { inflightBytes, inflightQueueBytes, InflightQueue } from './inflight.js';

/** Virtio feature bits common to every device. */
export const VIRTIO_F_NOTIFY_ON_EMPTY = 24;
export const VIRTIO_RING_F_INDIRECT_DESC = 28;
export const VIRTIO_RING_F_EVENT_IDX = 29;
export const VIRTIO_F_VERSION_1 = 32;

/** Requests that may come with fds. */
const CARRIES_FDS: ReadonlySet<number> = new Set<number>([
  Req.SET_MEM_TABLE, Req.ADD_MEM_REG, Req.REM_MEM_REG, Req.SET_VRING_KICK, Req.SET_VRING_CALL,
  Req.SET_VRING_ERR, Req.SET_LOG_BASE, Req.SET_LOG_FD, Req.SET_INFLIGHT_FD, Req.SET_BACKEND_REQ_FD,
]);

/** Messages received and not yet handled, at most (then the socket is not read). */
const MAX_QUEUED = 32;

/** Memory slots offered with CONFIGURE_MEM_SLOTS (libvhost-user offers 32 too). */
export const MAX_MEM_SLOTS = 32;

/** What a device plugs into the transport. */
export interface VhostUserDevice {
  /** Virtio feature bits offered (device, ring and VERSION_1); the transport adds F_PROTOCOL_FEATURES. */
  readonly features: bigint;
  /** Protocol features the device supports beyond the transport's own (e.g. CONFIG). */
  readonly protocolFeatures: bigint;
  readonly numQueues: number;
  /** Bytes [offset, offset + size) of the device's config space (zero-padded past its end). */
  getConfig(offset: number, size: number): Buffer;
  /** A write to config space from the front end; throw to refuse it. */
  setConfig(offset: number, data: Buffer): void;
  /** The features the front end acknowledged (SET_FEATURES). */
  setFeatures(features: bigint): void;
  /**
   * One request popped from queue `queue`: resolves with the number of bytes written into
   * `el.writable`. Should not reject: a rejection is a device bug, logged, and the request is
   * returned with 0 bytes written.
   */
  handle(queue: number, el: Element): Promise<number> | number;
  /** The front end went away or reset the device: forget per-connection state. */
  reset(): void;
}

/** The protocol features the transport itself implements. */
export const TRANSPORT_PROTOCOL_FEATURES =
  bit(PF.MQ) | bit(PF.REPLY_ACK) | bit(PF.CONFIGURE_MEM_SLOTS) | bit(PF.RESET_DEVICE) | bit(PF.INFLIGHT_SHMFD);

/** Largest integer address accepted from the front end (addresses are kept as JS numbers). */
function toNum(v: bigint, what: string): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError(`${what} 0x${v.toString(16)} too large`);
  return Number(v);
}

/** Per-queue state across the messages that configure it. */
class Queue {
  size = 0;
  addr: VringAddr | null = null;
  base = 0;
  kickFd = -1;
  callFd = -1;
  errFd = -1;
  enabled = false;
  /** Set between SET_VRING_KICK and GET_VRING_BASE. */
  ring: SplitRing | null = null;
  kickWatcher: NativeFdWatcher | null = null;
  inflight = 0;
  /** The queue's part of the inflight area (INFLIGHT_SHMFD), while the ring runs. */
  track: InflightQueue | null = null;
  /** Heads recovered from the inflight area, to run before new available entries. */
  resubmit: number[] = [];
  /** Used entries pushed since the last notification check. */
  dirty = false;
  drained: (() => void) | null = null;
  constructor(readonly index: number) {}
}

export interface BackendOptions {
  logger: Logger;
  /** Called once when the connection has ended and the device has been reset. */
  onClose?: (err?: Error) => void;
  native?: NativeAddon;
}

export class VhostUserBackend {
  private readonly n: NativeAddon;
  private readonly log: Logger;
  private readonly dev: VhostUserDevice;
  private readonly ch: Channel;
  private readonly queues: Queue[];
  private mem = new GuestMemory();
  /** The inflight area (GET/SET_INFLIGHT_FD): one part per queue of `queueSize` entries. */
  private inflightArea: { chunks: Uint8Array[]; numQueues: number; queueSize: number } | null = null;
  private features = 0n;
  private protocolFeatures = 0n;
  private chain: Promise<void> = Promise.resolve();
  private queued = 0;
  private notifyScheduled = false;
  private closed = false;
  private readonly onClosed?: (err?: Error) => void;

  constructor(fd: number, device: VhostUserDevice, opts: BackendOptions) {
    this.n = opts.native ?? native();
    this.log = opts.logger;
    this.dev = device;
    this.onClosed = opts.onClose;
    if (!Number.isInteger(device.numQueues) || device.numQueues < 1 || device.numQueues > 256) {
      throw new Error(`bad queue count ${device.numQueues}`);
    }
    this.queues = Array.from({ length: device.numQueues }, (_, i) => new Queue(i));
    this.ch = new Channel(this.n, fd, {
      onMessage: (m) => this.enqueue(m),
      onClose: (err) => this.teardown(err),
    });
  }

  get offeredFeatures(): bigint {
    return this.dev.features | bit(F_PROTOCOL_FEATURES);
  }

  get offeredProtocolFeatures(): bigint {
    return TRANSPORT_PROTOCOL_FEATURES | this.dev.protocolFeatures;
  }

  /** Closes the connection (the device is reset; in-flight requests finish into the void). */
  close(err?: Error): void {
    this.ch.close(err);
  }

  // ---- messages ---------------------------------------------------------------------------

  /**
   * Messages are handled one at a time, in order (some wait for a ring to drain). At most
   * MAX_QUEUED wait: beyond that the socket is not read until they are handled.
   */
  private enqueue(m: Message): void {
    if (++this.queued >= MAX_QUEUED) this.ch.pause();
    this.chain = this.chain.then(async () => {
      if (--this.queued < MAX_QUEUED) this.ch.resume();
      if (this.closed) {
        for (const f of m.fds) closeQuietly(this.n, f);
        return;
      }
      try {
        await this.handle(m);
      } catch (e) {
        const err = e instanceof Error ? e : new Error(String(e));
        this.log.error({ err, request: requestName(m.request) }, 'vhost-user: closing the connection');
        this.ch.close(err);
      } finally {
        // Fds a handler did not take (it failed first, or the request carries none) are closed here.
        for (const f of this.take(m)) closeQuietly(this.n, f);
      }
    });
  }

  private reply(m: Message, payload: Uint8Array, fds?: number[]): void {
    this.ch.send(m.request, FLAG_REPLY, payload, fds);
  }

  private ack(m: Message, ok: boolean): void {
    if ((m.flags & FLAG_NEED_REPLY) && (this.protocolFeatures & bit(PF.REPLY_ACK))) {
      this.reply(m, encodeU64(ok ? 0n : 1n));
    }
  }

  /** Hands a message's fds to the caller, who then owns them (closes or keeps each one). */
  private take(m: Message): number[] {
    const f = m.fds;
    m.fds = [];
    return f;
  }

  /** Checks the fd count; a mismatch fails the message (its fds are closed after it). */
  private fdCount(m: Message, want: number): void {
    if (m.fds.length !== want) throw new ProtocolError(`${requestName(m.request)} with ${m.fds.length} fds, expected ${want}`);
  }

  private queue(index: number): Queue {
    const q = this.queues[index];
    if (q === undefined) throw new ProtocolError(`queue ${index} out of range (${this.queues.length} queues)`);
    return q;
  }

  private async handle(m: Message): Promise<void> {
    this.log.debug({ request: requestName(m.request), size: m.size, fds: m.fds.length }, 'vhost-user message');
    // Requests that carry fds take them; any other request must carry none.
    if (!CARRIES_FDS.has(m.request)) this.fdCount(m, 0);
    const p = m.payload;
    switch (m.request) {
      case Req.GET_FEATURES:
        this.reply(m, encodeU64(this.offeredFeatures));
        return;
      case Req.SET_FEATURES: {
        const f = decodeU64(p);
        if (f & ~this.offeredFeatures) throw new ProtocolError(`features 0x${f.toString(16)} not offered`);
        this.features = f;
        this.dev.setFeatures(f & ~bit(F_PROTOCOL_FEATURES));
        // Without protocol features, rings start enabled (vhost-user.rst, "Ring states").
        if (!(f & bit(F_PROTOCOL_FEATURES))) for (const q of this.queues) q.enabled = true;
        this.ack(m, true);
        return;
      }
      case Req.GET_PROTOCOL_FEATURES:
        this.reply(m, encodeU64(this.offeredProtocolFeatures));
        return;
      case Req.SET_PROTOCOL_FEATURES: {
        const f = decodeU64(p);
        if (f & ~this.offeredProtocolFeatures) throw new ProtocolError(`protocol features 0x${f.toString(16)} not offered`);
        this.protocolFeatures = f;
        this.ack(m, true);
        return;
      }
      case Req.SET_OWNER:
        this.ack(m, true);
        return;
      case Req.RESET_OWNER:
      case Req.RESET_DEVICE:
        await this.resetRings();
        if (m.request === Req.RESET_OWNER) this.features = 0n;
        this.ack(m, true);
        return;
      case Req.GET_QUEUE_NUM:
        this.reply(m, encodeU64(BigInt(this.queues.length)));
        return;
      case Req.GET_MAX_MEM_SLOTS:
        this.reply(m, encodeU64(BigInt(MAX_MEM_SLOTS)));
        return;
      case Req.SET_MEM_TABLE:
        this.setMemTable(m);
        this.ack(m, true);
        return;
      case Req.ADD_MEM_REG: {
        this.fdCount(m, 1);
        const r: MemRegion = decodeMemRegionMsg(p);
        if (this.mem.count >= MAX_MEM_SLOTS) throw new ProtocolError(`more than ${MAX_MEM_SLOTS} memory regions`);
        this.mem.add(this.mapRegion(r, this.take(m)[0]!));
        this.remapRings();
        this.ack(m, true);
        return;
      }
      case Req.REM_MEM_REG: {
        // QEMU sends the region's fd along; it is not needed to find the region.
        if (m.fds.length > 1) throw new ProtocolError('REM_MEM_REG with more than one fd');
        const r = decodeMemRegionMsg(p);
        const ok = this.mem.remove(toNum(r.guestAddr, 'guest address'), toNum(r.size, 'region size')) !== null;
        if (!ok) this.log.warn({ gpa: r.guestAddr.toString(16) }, 'vhost-user: REM_MEM_REG of an unknown region');
        this.remapRings();
        this.ack(m, ok);
        return;
      }
      case Req.SET_LOG_BASE:
      case Req.SET_LOG_FD:
        // Dirty logging (live migration) is not offered (no LOG_SHMFD, no VHOST_F_LOG_ALL).
        this.log.warn('vhost-user: refusing dirty-page logging (not offered)');
        this.ack(m, false);
        return;
      case Req.SET_VRING_NUM: {
        const s = decodeVringState(p);
        const q = this.queue(s.index);
        if (s.num < 1 || s.num > MAX_QUEUE_SIZE || (s.num & (s.num - 1)) !== 0) {
          throw new ProtocolError(`queue size ${s.num}`);
        }
        if (q.ring !== null) throw new ProtocolError(`SET_VRING_NUM on running queue ${s.index}`);
        q.size = s.num;
        this.ack(m, true);
        return;
      }
      case Req.SET_VRING_ADDR: {
        const a = decodeVringAddr(p);
        const q = this.queue(a.index);
        q.addr = a;
        if (q.ring !== null) {
          const { lastAvail, usedIdx } = q.ring;
          q.ring = this.buildRing(q, lastAvail, usedIdx);
        }
        this.ack(m, true);
        return;
      }
      case Req.SET_VRING_BASE: {
        const s = decodeVringState(p);
        const q = this.queue(s.index);
        if (s.num > 0xffff) throw new ProtocolError(`vring base ${s.num} (packed rings are not offered)`);
        if (q.ring !== null) throw new ProtocolError(`SET_VRING_BASE on running queue ${s.index}`);
        q.base = s.num;
        this.ack(m, true);
        return;
      }
      case Req.GET_VRING_BASE: {
        const s = decodeVringState(p);
        const q = this.queue(s.index);
        const base = await this.stopQueue(q);
        this.reply(m, encodeVringState({ index: s.index, num: base }));
        return;
      }
      case Req.SET_VRING_KICK:
      case Req.SET_VRING_CALL:
      case Req.SET_VRING_ERR: {
        const v = Number(decodeU64(p) & 0xffffn);
        const nofd = (v & VRING_NOFD_MASK) !== 0;
        this.fdCount(m, nofd ? 0 : 1);
        if (v & ~(VRING_IDX_MASK | VRING_NOFD_MASK)) throw new ProtocolError(`bad vring fd payload 0x${v.toString(16)}`);
        const q = this.queue(v & VRING_IDX_MASK);
        if (m.request === Req.SET_VRING_KICK && nofd) throw new ProtocolError('polling rings (SET_VRING_KICK without an fd) are not supported');
        const fd = nofd ? -1 : this.take(m)[0]!;
        if (m.request === Req.SET_VRING_CALL) {
          closeQuietly(this.n, q.callFd);
          q.callFd = fd;
        } else if (m.request === Req.SET_VRING_ERR) {
          closeQuietly(this.n, q.errFd);
          q.errFd = fd;
        } else {
          this.startQueue(q, fd);
        }
        this.ack(m, true);
        return;
      }
      case Req.SET_VRING_ENABLE: {
        const s = decodeVringState(p);
        const q = this.queue(s.index);
        if (s.num > 1) throw new ProtocolError(`SET_VRING_ENABLE ${s.num}`);
        q.enabled = s.num === 1;
        if (q.enabled && q.ring !== null) this.process(q);
        this.ack(m, true);
        return;
      }
      case Req.GET_INFLIGHT_FD: {
        const req = decodeInflight(p);
        this.checkInflightGeometry(req.numQueues, req.queueSize);
        const size = inflightBytes(req.numQueues, req.queueSize);
        const fd = this.n.memfdCreate('vstore-inflight', size);
        try {
          this.inflightArea = { chunks: this.mapInflight(fd, size, req.queueSize), numQueues: req.numQueues, queueSize: req.queueSize };
          this.reply(m, encodeInflight({ mmapSize: BigInt(size), mmapOffset: 0n, numQueues: req.numQueues, queueSize: req.queueSize }), [fd]);
        } finally {
          closeQuietly(this.n, fd);
        }
        return;
      }
      case Req.SET_INFLIGHT_FD: {
        this.fdCount(m, 1);
        const req = decodeInflight(p);
        const fd = this.take(m)[0]!;
        try {
          this.checkInflightGeometry(req.numQueues, req.queueSize);
          const size = inflightBytes(req.numQueues, req.queueSize);
          if (req.mmapSize < BigInt(size)) throw new ProtocolError(`inflight area of ${req.mmapSize} bytes, need ${size}`);
          const off = toNum(req.mmapOffset, 'inflight offset');
          if (off + size > this.n.fdSize(fd)) throw new ProtocolError('inflight area past the end of its file');
          this.inflightArea = { chunks: this.mapInflight(fd, size, req.queueSize, off), numQueues: req.numQueues, queueSize: req.queueSize };
        } finally {
          closeQuietly(this.n, fd);
        }
        this.ack(m, true);
        return;
      }
      case Req.GET_CONFIG: {
        const c = decodeConfig(p);
        const data = Buffer.alloc(c.data.length);
        this.dev.getConfig(c.offset, c.data.length).copy(data);
        this.reply(m, encodeConfig({ offset: c.offset, flags: c.flags, data }));
        return;
      }
      case Req.SET_CONFIG: {
        const c = decodeConfig(p);
        let ok = true;
        try {
          this.dev.setConfig(c.offset, c.data);
        } catch (e) {
          ok = false;
          this.log.warn({ err: e }, 'vhost-user: SET_CONFIG refused');
        }
        this.ack(m, ok);
        return;
      }
      default:
        throw new ProtocolError(`unsupported request ${requestName(m.request)}`);
    }
  }

  // ---- memory -------------------------------------------------------------------------------

  private mapRegion(r: MemRegion, fd: number): Region {
    try {
      const size = toNum(r.size, 'region size');
      const guestAddr = toNum(r.guestAddr, 'guest address');
      const userAddr = toNum(r.userAddr, 'user address');
      const off = toNum(r.mmapOffset, 'mmap offset');
      if (size === 0) throw new ProtocolError('empty memory region');
      // Touching a mapping past the end of its file raises SIGBUS, which would kill the process:
      // the region must lie within the file as it is now. (A front end that shrinks the file
      // later can still do that; QEMU seals its memfds against shrinking.)
      const fileSize = this.n.fdSize(fd);
      if (off + size > fileSize) {
        throw new ProtocolError(`memory region ${off}+${size} past the end of its file (${fileSize} bytes)`);
      }
      const ab = this.n.mmapShared(fd, off, size, CHUNK_SIZE);
      return { guestAddr, userAddr, size, chunks: ab.map((b) => new Uint8Array(b)) };
    } finally {
      closeQuietly(this.n, fd);
    }
  }

  private setMemTable(m: Message): void {
    const table = decodeMemTable(m.payload);
    if (table.length !== m.fds.length) throw new ProtocolError(`memory table of ${table.length} regions with ${m.fds.length} fds`);
    const mem = new GuestMemory();
    const fds = this.take(m);
    try {
      for (let i = 0; i < table.length; i++) mem.add(this.mapRegion(table[i]!, fds[i]!));
    } catch (e) {
      // mapRegion closed the fds it was given; close the rest.
      for (let j = mem.count + 1; j < fds.length; j++) closeQuietly(this.n, fds[j]!);
      throw e instanceof MemoryError ? new ProtocolError(e.message) : e;
    }
    this.mem = mem;
    this.remapRings();
  }

  private checkInflightGeometry(numQueues: number, queueSize: number): void {
    if (numQueues < 1 || numQueues > this.queues.length) throw new ProtocolError(`inflight area for ${numQueues} queues`);
    if (queueSize < 1 || queueSize > MAX_QUEUE_SIZE || (queueSize & (queueSize - 1)) !== 0) {
      throw new ProtocolError(`inflight area for queues of ${queueSize}`);
    }
  }

  /** Maps the inflight area: one view per queue. */
  private mapInflight(fd: number, size: number, queueSize: number, off = 0): Uint8Array[] {
    const [ab] = this.n.mmapShared(fd, off, size, CHUNK_SIZE);
    const all = new Uint8Array(ab!);
    const per = inflightQueueBytes(queueSize);
    return Array.from({ length: size / per }, (_, i) => all.subarray(i * per, (i + 1) * per));
  }

  // ---- rings --------------------------------------------------------------------------------

  private buildRing(q: Queue, lastAvail: number, usedIdx?: number): SplitRing {
    if (q.size === 0 || q.addr === null) throw new ProtocolError(`queue ${q.index} started before its size and addresses`);
    const sz = ringSizes(q.size);
    const desc = this.mem.userView(toNum(q.addr.desc, 'desc address'), sz.desc);
    const avail = this.mem.userView(toNum(q.addr.avail, 'avail address'), sz.avail);
    const used = this.mem.userView(toNum(q.addr.used, 'used address'), sz.used);
    if (desc === null || avail === null || used === null) throw new ProtocolError(`queue ${q.index}: ring outside guest memory`);
    return new SplitRing(this.mem, {
      size: q.size,
      desc,
      avail,
      used,
      eventIdx: (this.features & bit(VIRTIO_RING_F_EVENT_IDX)) !== 0n,
      lastAvail,
      usedIdx,
    });
  }

  /** New memory: rings are rebuilt over it (their indices carry over). */
  private remapRings(): void {
    for (const q of this.queues) {
      if (q.ring === null) continue;
      const { lastAvail, usedIdx } = q.ring;
      q.ring = this.buildRing(q, lastAvail, usedIdx);
    }
  }

  private startQueue(q: Queue, kickFd: number): void {
    this.stopWatching(q);
    closeQuietly(this.n, q.kickFd);
    q.kickFd = kickFd;
    if (q.ring === null) {
      try {
        q.ring = this.buildRing(q, q.base);
      } catch (e) {
        throw e instanceof RingError ? new ProtocolError(e.message) : e;
      }
      this.recoverInflight(q, q.ring);
    }
    q.kickWatcher = new this.n.FdWatcher(kickFd, (status) => {
      if (status < 0) this.ringFailed(q, new Error(`kick fd error (libuv status ${status})`));
      else this.process(q);
    }, { eventfd: true });
    q.kickWatcher.start();
    this.process(q);
  }

  /**
   * With an inflight area, the area (not SET_VRING_BASE) says where the ring stands: chains
   * popped by a previous back end and never completed are run again, first.
   */
  private recoverInflight(q: Queue, ring: SplitRing): void {
    q.track = null;
    q.resubmit = [];
    const area = this.inflightArea;
    if (area === null) return;
    const chunk = area.chunks[q.index];
    if (chunk === undefined || area.queueSize !== q.size) {
      this.log.warn({ queue: q.index, size: q.size, inflightSize: area.queueSize }, 'vhost-user: inflight area does not fit the queue; not tracking it');
      return;
    }
    const track = new InflightQueue(chunk, q.size);
    const rec = track.recover(ring.usedIdx, this.features);
    if (!rec.fresh && rec.lastAvail !== ring.lastAvail) {
      this.log.info({ queue: q.index, base: ring.lastAvail, recovered: rec.lastAvail, resubmit: rec.resubmit.length }, 'vhost-user: resuming from the inflight area');
    }
    if (!rec.fresh) ring.lastAvail = rec.lastAvail;
    q.track = track;
    q.resubmit = rec.resubmit;
  }

  private stopWatching(q: Queue): void {
    q.kickWatcher?.close();
    q.kickWatcher = null;
  }

  /** GET_VRING_BASE: stop the ring, let its requests complete, return the next avail index. */
  private async stopQueue(q: Queue): Promise<number> {
    this.stopWatching(q);
    const ring = q.ring;
    if (ring !== null && q.inflight > 0) {
      await new Promise<void>((resolve) => {
        q.drained = resolve;
      });
    }
    this.flushNotify();
    const base = ring?.lastAvail ?? q.base;
    q.ring = null;
    q.track = null;
    q.resubmit = [];
    q.base = base;
    closeQuietly(this.n, q.kickFd);
    q.kickFd = -1;
    closeQuietly(this.n, q.callFd);
    q.callFd = -1;
    return base;
  }

  private async resetRings(): Promise<void> {
    for (const q of this.queues) {
      await this.stopQueue(q);
      q.base = 0;
      q.size = 0;
      q.addr = null;
      q.enabled = !(this.features & bit(F_PROTOCOL_FEATURES));
    }
    this.dev.reset();
  }

  /** Drains the available ring of a started, enabled queue. */
  private process(q: Queue): void {
    const ring = q.ring;
    if (ring === null || !q.enabled || this.closed) return;
    try {
      // Recovered requests first, in their original order (they are already marked inflight).
      for (const head of q.resubmit.splice(0)) this.dispatch(q, ring.chain(head), true);
      ring.disableNotify();
      for (;;) {
        let el: Element | null;
        while ((el = ring.pop()) !== null) this.dispatch(q, el);
        if (!ring.enableNotify()) break;
      }
    } catch (e) {
      this.ringFailed(q, e instanceof Error ? e : new Error(String(e)));
    }
  }

  private dispatch(q: Queue, el: Element, resubmitted = false): void {
    q.inflight++;
    if (!resubmitted) q.track?.get(el.head);
    let r: Promise<number> | number;
    try {
      r = this.dev.handle(q.index, el);
    } catch (e) {
      this.log.error({ err: e, queue: q.index }, 'vhost-user: device handler threw');
      r = 0;
    }
    if (typeof r === 'number') {
      this.complete(q, el.head, r);
    } else {
      r.then(
        (len) => this.complete(q, el.head, len),
        (e: unknown) => {
          this.log.error({ err: e, queue: q.index }, 'vhost-user: device handler rejected');
          this.complete(q, el.head, 0);
        },
      );
    }
  }

  private complete(q: Queue, head: number, len: number): void {
    q.inflight--;
    // A ring rebuilt over new memory is the same ring (q.ring carries its indices); after a stop
    // (q.ring null: GET_VRING_BASE waits for in-flight requests, so only a teardown) or on a
    // closed connection the entry is dropped.
    const cur = q.ring;
    if (cur !== null && !this.closed) {
      const t = q.track;
      t?.prePut(head);
      cur.push(head, len);
      t?.postPut(head, cur.usedIdx);
      q.dirty = true;
      this.scheduleNotify();
    }
    if (q.inflight === 0 && q.drained !== null) {
      const d = q.drained;
      q.drained = null;
      // Push the used entries' notification before GET_VRING_BASE answers.
      if (cur !== null && !this.closed) {
        this.flushNotify();
      }
      d();
    }
  }

  private scheduleNotify(): void {
    if (this.notifyScheduled) return;
    this.notifyScheduled = true;
    setImmediate(() => {
      this.notifyScheduled = false;
      this.flushNotify();
    });
  }

  /** One call-fd signal per queue for all the entries pushed since the last one (if the driver wants it). */
  private flushNotify(): void {
    if (this.closed) return;
    for (const q of this.queues) {
      if (!q.dirty || q.ring === null) continue;
      q.dirty = false;
      try {
        if (q.ring.needNotify() && q.callFd >= 0) this.n.eventfdWrite(q.callFd);
      } catch (e) {
        this.ringFailed(q, e instanceof Error ? e : new Error(String(e)));
      }
    }
  }

  private ringFailed(q: Queue, err: Error): void {
    this.log.error({ err, queue: q.index }, 'vhost-user: virtqueue failed, closing the connection');
    if (q.errFd >= 0) {
      try {
        this.n.eventfdWrite(q.errFd);
      } catch {
        /* the front end is gone anyway */
      }
    }
    this.ch.close(err);
  }

  private teardown(err?: Error): void {
    if (this.closed) return;
    this.closed = true;
    for (const q of this.queues) {
      this.stopWatching(q);
      q.ring = null;
      q.track = null;
      for (const f of [q.kickFd, q.callFd, q.errFd]) closeQuietly(this.n, f);
      q.kickFd = q.callFd = q.errFd = -1;
      const d = q.drained;
      q.drained = null;
      d?.();
    }
    this.mem = new GuestMemory();
    this.inflightArea = null;
    try {
      this.dev.reset();
    } catch (e) {
      this.log.error({ err: e }, 'vhost-user: device reset failed');
    }
    if (err) this.log.warn({ err }, 'vhost-user: connection closed');
    else this.log.debug('vhost-user: connection closed');
    this.onClosed?.(err);
  }
}
