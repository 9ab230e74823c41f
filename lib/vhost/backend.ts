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
  /** Start quiesced (a back end built from a handoff: `start()` once the old process let go). */
  frozen?: boolean;
}

/**
 * A connection's state as plain data, for a live handoff to another process
 * (lib/daemon/handoff.ts): what the front end's messages set up, so that a back end built from
 * it carries on as if it had received them. Fds are indices into the array sent beside it.
 * Bigints (feature words, ring addresses) travel as decimal strings.
 */
export interface BackendState {
  version: 1;
  /** The connection itself. */
  conn: number;
  features: string;
  protocolFeatures: string;
  regions: Array<{ guestAddr: number; size: number; userAddr: number; mmapOffset: number; fd: number }>;
  inflight: { fd: number; offset: number; size: number; numQueues: number; queueSize: number } | null;
  queues: Array<{
    size: number;
    addr: { flags: number; desc: string; used: string; avail: string; log: string } | null;
    base: number;
    enabled: boolean;
    /** The ring runs (kick received, no GET_VRING_BASE since): where it stands. */
    ring: { lastAvail: number; usedIdx: number } | null;
    kick: number;
    call: number;
    err: number;
  }>;
}

/** A quiesce that could not finish (a request still in flight, a half-read message). */
export class QuiesceError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'QuiesceError';
  }
}

export class VhostUserBackend {
  private readonly n: NativeAddon;
  private readonly log: Logger;
  private readonly dev: VhostUserDevice;
  private readonly ch: Channel;
  private readonly queues: Queue[];
  private mem = new GuestMemory();
  /** Each mapped region's fd and mmap offset: kept open for a live handoff (exportState). */
  private readonly regionFds = new Map<Region, { fd: number; offset: number }>();
  /** The inflight area (GET/SET_INFLIGHT_FD): one part per queue of `queueSize` entries; its fd kept for a handoff. */
  private inflightArea: { chunks: Uint8Array[]; numQueues: number; queueSize: number; fd: number; offset: number; size: number } | null = null;
  /**
   * Quiesced for a handoff (or built from one and not started yet): no message is read, no ring
   * entry is popped; requests already in flight complete and are pushed.
   */
  private frozen = false;
  /** Handed over: the connection lives on in another process; ending it here resets nothing. */
  private detached = false;
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
    if (opts.frozen) {
      // Synchronously after the Channel started watching: no read can have happened.
      this.frozen = true;
      this.ch.pause();
    }
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

  // ---- live handoff (lib/daemon/handoff.ts) ------------------------------------------------

  /**
   * Handoff, step 1: stop reading messages and popping ring entries; the messages already read
   * are handled and the requests in flight complete (used entries pushed, the driver notified).
   * Resolves when nothing is in flight. Throws QuiesceError, resumed, when that takes longer
   * than `timeoutMs` (a request waiting for a lock, say) or a message was read only in part.
   * What the guest queues meanwhile waits in the rings and the socket for whoever resumes.
   */
  async quiesce(timeoutMs = 10_000): Promise<void> {
    if (this.closed) throw new QuiesceError('the connection is closed');
    this.frozen = true;
    this.ch.pause();
    for (const q of this.queues) this.stopWatching(q);
    const deadline = Date.now() + timeoutMs;
    try {
      for (;;) {
        const chain = this.chain;
        await beforeDeadline(chain, deadline, 'a vhost-user message is still being handled');
        if (chain === this.chain) break;
      }
      if (this.midMessage()) throw new QuiesceError('a vhost-user message was read only in part');
      await beforeDeadline(Promise.all(this.queues.map((q) => this.drainQueue(q))), deadline, 'requests still in flight (waiting for a lock?)');
      this.flushNotify();
      if (this.closed) throw new QuiesceError('the connection closed while quiescing');
    } catch (e) {
      this.resume();
      throw e;
    }
  }

  /**
   * The Channel's reader holds a message's first bytes only if the front end sent a message in
   * parts; QEMU sends each in one sendmsg, so this is a safety check. (Channel keeps its reader
   * private; this reads its `midMessage` without reaching into anything else.)
   */
  private midMessage(): boolean {
    return (this.ch as unknown as { reader?: { midMessage?: boolean } }).reader?.midMessage === true;
  }

  private drainQueue(q: Queue): Promise<void> {
    if (q.inflight === 0) return Promise.resolve();
    return new Promise<void>((resolve) => {
      q.drained = resolve;
    });
  }

  /** Undoes quiesce() (a handoff that failed), or starts a back end built by restore(). */
  resume(): void {
    if (!this.frozen) return;
    this.frozen = false;
    if (this.closed) return;
    if (this.queued < MAX_QUEUED) this.ch.resume();
    for (const q of this.queues) if (q.ring !== null && q.kickWatcher === null) this.watchKick(q);
    // As a kick would: entries the guest made available meanwhile are popped now.
    for (const q of this.queues) this.process(q);
  }

  /** A back end built by restore() starts serving (the old process has let go). */
  start(): void {
    this.resume();
  }

  /** Handoff, step 2 (after quiesce): the state and the fds it names, still owned by this back end. */
  exportState(): { state: BackendState; fds: number[] } {
    if (!this.frozen || this.closed) throw new Error('exportState needs a quiesced, open connection');
    if (this.queues.some((q) => q.inflight > 0)) throw new Error('exportState with requests in flight');
    const fds: number[] = [];
    const idx = (f: number): number => (f < 0 ? -1 : fds.push(f) - 1);
    const a = this.inflightArea;
    const state: BackendState = {
      version: 1,
      conn: idx(this.ch.fd),
      features: this.features.toString(),
      protocolFeatures: this.protocolFeatures.toString(),
      regions: this.mem.list().map((r) => {
        const f = this.regionFds.get(r)!;
        return { guestAddr: r.guestAddr, size: r.size, userAddr: r.userAddr, mmapOffset: f.offset, fd: idx(f.fd) };
      }),
      inflight: a ? { fd: idx(a.fd), offset: a.offset, size: a.size, numQueues: a.numQueues, queueSize: a.queueSize } : null,
      queues: this.queues.map((q) => ({
        size: q.size,
        addr: q.addr ? { flags: q.addr.flags, desc: q.addr.desc.toString(), used: q.addr.used.toString(), avail: q.addr.avail.toString(), log: q.addr.log.toString() } : null,
        base: q.base,
        enabled: q.enabled,
        ring: q.ring ? { lastAvail: q.ring.lastAvail, usedIdx: q.ring.usedIdx } : null,
        kick: idx(q.kickFd),
        call: idx(q.callFd),
        err: idx(q.errFd),
      })),
    };
    return { state, fds };
  }

  /**
   * Handoff, last step (the new process has the connection): closes this process's copies of
   * the fds without a word to the front end and without resetting the device.
   */
  detach(): void {
    this.detached = true;
    this.ch.close();
  }

  /**
   * A back end from a handed-over state, quiesced until start(). Takes every fd of `fds`: on
   * failure they are closed (the old process still holds its own copies, so it can resume).
   */
  static restore(state: BackendState, fds: number[], device: VhostUserDevice, opts: BackendOptions): VhostUserBackend {
    const n = opts.native ?? native();
    const used = new Set<number>();
    const fd = (i: number): number => {
      if (i < 0) return -1;
      const f = fds[i];
      if (f === undefined || used.has(i)) throw new Error(`handoff state: fd #${i} missing or used twice`);
      used.add(i);
      return f;
    };
    let b: VhostUserBackend | undefined;
    try {
      if (state?.version !== 1) throw new Error('unknown vhost-user state version');
      if (state.queues.length !== device.numQueues) throw new Error(`handoff state of ${state.queues.length} queues for a device of ${device.numQueues}`);
      b = new VhostUserBackend(fd(state.conn), device, { ...opts, frozen: true });
      b.load(state, fd);
    } catch (e) {
      if (b) {
        b.detached = true;
        b.ch.close();
      }
      fds.forEach((f, i) => {
        if (!used.has(i)) closeQuietly(n, f);
      });
      throw e;
    }
    fds.forEach((f, i) => {
      if (!used.has(i)) closeQuietly(n, f);
    });
    return b;
  }

  /** restore()'s body: the messages' effects, replayed from the state. */
  private load(state: BackendState, fd: (i: number) => number): void {
    this.features = BigInt(state.features);
    this.protocolFeatures = BigInt(state.protocolFeatures);
    this.dev.setFeatures(this.features & ~bit(F_PROTOCOL_FEATURES));
    for (const r of state.regions) {
      const region = this.mapRegion({ guestAddr: BigInt(r.guestAddr), size: BigInt(r.size), userAddr: BigInt(r.userAddr), mmapOffset: BigInt(r.mmapOffset) }, fd(r.fd));
      try {
        this.mem.add(region);
      } catch (e) {
        this.releaseRegion(region);
        throw e;
      }
    }
    const a = state.inflight;
    if (a) {
      const f = fd(a.fd);
      try {
        this.setInflight({ chunks: this.mapInflight(f, a.size, a.queueSize, a.offset), numQueues: a.numQueues, queueSize: a.queueSize, fd: f, offset: a.offset, size: a.size });
      } catch (e) {
        closeQuietly(this.n, f);
        throw e;
      }
    }
    state.queues.forEach((s, i) => {
      const q = this.queue(i);
      q.size = s.size;
      q.addr = s.addr ? { index: i, flags: s.addr.flags, desc: BigInt(s.addr.desc), used: BigInt(s.addr.used), avail: BigInt(s.addr.avail), log: BigInt(s.addr.log) } : null;
      q.base = s.base;
      q.enabled = s.enabled;
      q.kickFd = fd(s.kick);
      q.callFd = fd(s.call);
      q.errFd = fd(s.err);
      if (s.ring) {
        q.ring = this.buildRing(q, s.ring.lastAvail, s.ring.usedIdx);
        // Nothing was in flight at the export: this only takes up the area's bookkeeping.
        this.recoverInflight(q, q.ring);
      }
    });
  }

  // ---- messages ---------------------------------------------------------------------------

  /**
   * Messages are handled one at a time, in order (some wait for a ring to drain). At most
   * MAX_QUEUED wait: beyond that the socket is not read until they are handled.
   */
  private enqueue(m: Message): void {
    if (++this.queued >= MAX_QUEUED) this.ch.pause();
    this.chain = this.chain.then(async () => {
      if (--this.queued < MAX_QUEUED && !this.frozen) this.ch.resume();
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
        const gone = this.mem.remove(toNum(r.guestAddr, 'guest address'), toNum(r.size, 'region size'));
        if (gone) this.releaseRegion(gone);
        const ok = gone !== null;
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
          this.setInflight({ chunks: this.mapInflight(fd, size, req.queueSize), numQueues: req.numQueues, queueSize: req.queueSize, fd, offset: 0, size });
        } catch (e) {
          closeQuietly(this.n, fd);
          throw e;
        }
        this.reply(m, encodeInflight({ mmapSize: BigInt(size), mmapOffset: 0n, numQueues: req.numQueues, queueSize: req.queueSize }), [fd]);
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
          this.setInflight({ chunks: this.mapInflight(fd, size, req.queueSize, off), numQueues: req.numQueues, queueSize: req.queueSize, fd, offset: off, size });
        } catch (e) {
          closeQuietly(this.n, fd);
          throw e;
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

  /** Maps a region; its fd is kept (regionFds) on success and closed on failure. */
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
      const region: Region = { guestAddr, userAddr, size, chunks: ab.map((b) => new Uint8Array(b)) };
      this.regionFds.set(region, { fd, offset: off });
      return region;
    } catch (e) {
      closeQuietly(this.n, fd);
      throw e;
    }
  }

  /** A region left guest memory: its fd goes (the mapping goes with the last view, on GC). */
  private releaseRegion(r: Region): void {
    const f = this.regionFds.get(r);
    this.regionFds.delete(r);
    if (f) closeQuietly(this.n, f.fd);
  }

  private setInflight(a: NonNullable<VhostUserBackend['inflightArea']>): void {
    if (this.inflightArea) closeQuietly(this.n, this.inflightArea.fd);
    this.inflightArea = a;
  }

  private setMemTable(m: Message): void {
    const table = decodeMemTable(m.payload);
    if (table.length !== m.fds.length) throw new ProtocolError(`memory table of ${table.length} regions with ${m.fds.length} fds`);
    const mem = new GuestMemory();
    const fds = this.take(m);
    try {
      for (let i = 0; i < table.length; i++) mem.add(this.mapRegion(table[i]!, fds[i]!));
    } catch (e) {
      // mapRegion closed the fd it failed on; close the rest, and those of the regions mapped.
      for (let j = mem.count + 1; j < fds.length; j++) closeQuietly(this.n, fds[j]!);
      for (const r of mem.list()) this.releaseRegion(r);
      throw e instanceof MemoryError ? new ProtocolError(e.message) : e;
    }
    for (const r of this.mem.list()) this.releaseRegion(r);
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
    this.watchKick(q);
    this.process(q);
  }

  /** Pops on every kick (not while frozen: the handoff's start() or resume() watches then). */
  private watchKick(q: Queue): void {
    if (this.frozen || q.kickFd < 0) return;
    q.kickWatcher = new this.n.FdWatcher(q.kickFd, (status) => {
      if (status < 0) this.ringFailed(q, new Error(`kick fd error (libuv status ${status})`));
      else this.process(q);
    }, { eventfd: true });
    q.kickWatcher.start();
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
    if (ring === null || !q.enabled || this.closed || this.frozen) return;
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
    for (const r of this.mem.list()) this.releaseRegion(r);
    this.mem = new GuestMemory();
    if (this.inflightArea) closeQuietly(this.n, this.inflightArea.fd);
    this.inflightArea = null;
    if (this.detached) {
      // The device goes on in the process this connection was handed to: nothing is reset.
      this.log.info('vhost-user: connection handed over');
      this.onClosed?.();
      return;
    }
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

/** `p`, or a QuiesceError once `deadline` (ms since the epoch) has passed. */
function beforeDeadline<T>(p: Promise<T>, deadline: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new QuiesceError(what)), Math.max(0, deadline - Date.now()));
  });
  return Promise.race([p, late]).finally(() => clearTimeout(timer));
}
