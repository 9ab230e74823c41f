/**
 * A vhost-user front end for tests and benchmarks: it plays QEMU's part against any
 * vhost-user-blk back end (vstore's, or qemu-storage-daemon's export). It creates memfd "guest
 * memory", negotiates features, hands over the memory table and the rings' eventfds, then
 * submits virtio-blk requests on split virtqueues and collects completions from the used ring
 * when the call eventfd fires.
 *
 * Guest memory layout (guest-physical = offset in the memfd; the "front-end virtual" address
 * of each byte is UVA_BASE + offset, which is what the back end sees in SET_VRING_ADDR):
 *   [queue i rings: 64 KiB each] [request slots: header 16 B + status 1 B + data maxIo, per slot]
 */
import { native, type NativeAddon, type NativeFdWatcher } from '../../lib/native/index.js';
import { Channel, closeQuietly } from '../../lib/vhost/channel.js';
import {
  bit,
  decodeConfig,
  decodeU64,
  decodeVringState,
  encodeConfig,
  encodeInflight,
  encodeMemRegionMsg,
  encodeMemTable,
  encodeU64,
  encodeVringAddr,
  encodeVringState,
  F_PROTOCOL_FEATURES,
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  ProtocolFeature as PF,
  Req,
  requestName,
  type MemRegion,
  type Message,
} from '../../lib/vhost/protocol.js';
import { needEvent, ringSizes, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE } from '../../lib/vhost/virtqueue.js';
import { BlkType, decodeBlkConfig, type BlkConfig } from '../../lib/vhost/blk.js';
import { VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC } from '../../lib/vhost/backend.js';

export const UVA_BASE = 0x7f0000000000;
const RING_AREA = 64 * 1024;
const SLOT_HDR = 128; // request header (16) + status (1) at 0, an indirect table (up to 6 descs) at 32

export interface FrontendOptions {
  socket: string;
  queueSize?: number;
  numQueues?: number;
  /** Largest data payload of one request (slot size). Default 1 MiB. */
  maxIo?: number;
  /** Requests in flight per queue at most (slots). Default min(queueSize, 32). */
  depth?: number;
  /** Negotiate EVENT_IDX (default true) and use indirect descriptors (default false). */
  eventIdx?: boolean;
  indirect?: boolean;
  /** Hand the memory over with ADD_MEM_REG (CONFIGURE_MEM_SLOTS) instead of SET_MEM_TABLE. */
  memSlots?: boolean;
  /** Ask for REPLY_ACK on every message without its own reply (default true). */
  replyAck?: boolean;
  /** Milliseconds to wait for a reply. */
  timeoutMs?: number;
  /**
   * Negotiate INFLIGHT_SHMFD when offered (GET_INFLIGHT_FD at start, SET_INFLIGHT_FD after a
   * reconnect), and keep requests pending across a lost connection, as QEMU does with
   * `-chardev socket,reconnect=N`: call reconnect() and they complete on the new back end.
   */
  inflight?: boolean;
}

/** A descriptor as written, for tests of bad chains. */
export interface RawDesc {
  addr: bigint | number;
  len: number;
  flags: number;
  next?: number;
}

export interface Completion {
  /** Bytes the device said it wrote (used element len). */
  len: number;
}

interface Pending {
  resolve: (c: Completion) => void;
  reject: (e: Error) => void;
  /** Descriptors to free (direct chain), or none (indirect: just the head). */
  descs: number[];
  slot: number;
}

class DriverQueue {
  readonly desc: DataView;
  readonly avail16: Uint16Array;
  readonly used16: Uint16Array;
  readonly used32: Uint32Array;
  readonly freeDescs: number[];
  readonly freeSlots: number[];
  readonly pending = new Map<number, Pending>();
  availIdx = 0;
  lastUsed = 0;
  kickFd = -1;
  callFd = -1;
  watcher: NativeFdWatcher | null = null;
  waiters: (() => void)[] = [];
  kicks = 0;
  constructor(
    readonly index: number,
    readonly size: number,
    readonly base: number,
    mem: Buffer,
    depth: number,
  ) {
    const s = ringSizes(size);
    const d = mem.subarray(base, base + s.desc);
    this.desc = new DataView(d.buffer, d.byteOffset, d.length);
    const availOff = base + s.desc;
    this.avail16 = new Uint16Array(mem.buffer, mem.byteOffset + availOff, s.avail / 2);
    const usedOff = this.usedOffset;
    this.used16 = new Uint16Array(mem.buffer, mem.byteOffset + usedOff, s.used / 2);
    this.used32 = new Uint32Array(mem.buffer, mem.byteOffset + usedOff, (s.used - 2) / 4);
    this.freeDescs = Array.from({ length: size }, (_, i) => size - 1 - i);
    this.freeSlots = Array.from({ length: depth }, (_, i) => depth - 1 - i);
  }
  get availOffset(): number {
    return this.base + ringSizes(this.size).desc;
  }
  get usedOffset(): number {
    const s = ringSizes(this.size);
    return (this.base + s.desc + s.avail + 3) & ~3;
  }
}

export class VhostUserFrontend {
  readonly n: NativeAddon;
  readonly mem: Buffer;
  readonly memSize: number;
  features = 0n;
  protocolFeatures = 0n;
  backendQueues = 1;
  config!: BlkConfig;
  rawConfig!: Buffer;
  readonly queues: DriverQueue[] = [];
  readonly maxIo: number;
  readonly depth: number;
  closedError: Error | null = null;
  closed = false;

  private readonly opts: Required<FrontendOptions>;
  private memFd: number;
  private ch!: Channel;
  private inbox: Message[] = [];
  private inboxWaiter: (() => void) | null = null;
  private readonly slotBase: number;
  private readonly slotSize: number;
  private closeWaiters: (() => void)[] = [];
  /** The inflight area's fd (INFLIGHT_SHMFD), kept for a reconnect; -1 when not negotiated. */
  inflightFd = -1;
  private inflightMsg: Buffer | null = null;
  private shuttingDown = false;
  /** Connections made (1 + reconnects). */
  connections = 0;

  private constructor(o: FrontendOptions) {
    this.n = native();
    this.opts = {
      queueSize: 128,
      numQueues: 1,
      maxIo: 1024 * 1024,
      depth: Math.min(o.queueSize ?? 128, 32),
      eventIdx: true,
      indirect: false,
      memSlots: false,
      replyAck: true,
      timeoutMs: 10_000,
      inflight: false,
      ...o,
    };
    this.maxIo = this.opts.maxIo;
    this.depth = Math.min(this.opts.depth, this.opts.queueSize);
    this.slotSize = SLOT_HDR + this.maxIo;
    this.slotBase = RING_AREA * this.opts.numQueues;
    const need = this.slotBase + this.slotSize * this.depth * this.opts.numQueues;
    this.memSize = Math.ceil(need / (2 * 1024 * 1024)) * 2 * 1024 * 1024;
    this.memFd = this.n.memfdCreate('vstore-test-guest', this.memSize);
    const [ab] = this.n.mmapShared(this.memFd, 0, this.memSize, 2 ** 30);
    this.mem = Buffer.from(ab!);
    for (let i = 0; i < this.opts.numQueues; i++) {
      this.queues.push(new DriverQueue(i, this.opts.queueSize, i * RING_AREA, this.mem, this.depth));
    }
  }

  /** Connects to a vhost-user-blk socket and performs QEMU's start sequence. */
  static async connect(o: FrontendOptions): Promise<VhostUserFrontend> {
    const fe = new VhostUserFrontend(o);
    try {
      fe.open();
      await fe.negotiate();
      await fe.setupInflight();
      await fe.setupMemory();
      for (const q of fe.queues) await fe.startQueue(q);
    } catch (e) {
      fe.close();
      throw e;
    }
    return fe;
  }

  /** Connects only (no handshake): for tests that speak the protocol by hand. */
  static raw(o: FrontendOptions): VhostUserFrontend {
    const fe = new VhostUserFrontend(o);
    fe.open();
    return fe;
  }

  private open(): void {
    const fd = this.n.unixConnect(this.opts.socket);
    this.connections++;
    this.ch = new Channel(this.n, fd, {
      onMessage: (m) => {
        // Only the inflight area comes with an fd; whatever else a back end sends is closed.
        if (m.request !== Req.GET_INFLIGHT_FD) {
          for (const f of m.fds) closeQuietly(this.n, f);
          m.fds = [];
        }
        this.inbox.push(m);
        this.inboxWaiter?.();
      },
      onClose: (err) => this.onClosed(err),
    });
  }

  private onClosed(err?: Error): void {
    this.closed = true;
    this.closedError = err ?? new Error('vhost-user back end closed the connection');
    for (const q of this.queues) {
      q.watcher?.close();
      q.watcher = null;
      if (this.inflightFd >= 0 && !this.shuttingDown) continue; // kept for reconnect()
      for (const p of q.pending.values()) p.reject(this.closedError);
      q.pending.clear();
    }
    this.inboxWaiter?.();
    for (const w of this.closeWaiters.splice(0)) w();
  }

  /** Resolves when the back end has closed the connection (or we did). */
  whenClosed(): Promise<void> {
    if (this.closed) return Promise.resolve();
    return new Promise((r) => this.closeWaiters.push(r));
  }

  // ---- messages ---------------------------------------------------------------------------

  /** Sends a message as is (tests of bad input). */
  send(request: number, payload?: Uint8Array, fds?: number[], flags = 0): void {
    this.ch.send(request, flags, payload, fds, 5000);
  }

  /** Sends bytes as they are (a malformed header, say), with fds. */
  sendRaw(bytes: Uint8Array, fds?: number[], waitMs = 5000): void {
    this.n.sendMsg(this.ch.fd, bytes, fds, waitMs);
  }

  /** Stops (or resumes) reading the back end's messages: tests of a front end that does not read. */
  reading(on: boolean): void {
    if (on) this.ch.resume();
    else this.ch.pause();
  }

  /** The next message from the back end. */
  async receive(): Promise<Message> {
    const deadline = Date.now() + this.opts.timeoutMs;
    while (this.inbox.length === 0) {
      if (this.closed) throw this.closedError!;
      const left = deadline - Date.now();
      if (left <= 0) throw new Error('timed out waiting for a vhost-user reply');
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.inboxWaiter = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.inboxWaiter = null;
    }
    return this.inbox.shift()!;
  }

  /** Sends a request that has its own reply and returns the reply payload. */
  async get(request: number, payload?: Uint8Array): Promise<Buffer> {
    this.send(request, payload);
    const r = await this.receive();
    if (r.request !== request || !(r.flags & FLAG_REPLY)) {
      throw new Error(`expected a reply to ${requestName(request)}, got ${requestName(r.request)} flags 0x${r.flags.toString(16)}`);
    }
    return r.payload;
  }

  /** Sends a request without its own reply; with REPLY_ACK, waits for the ack and checks it. */
  async set(request: number, payload?: Uint8Array, fds?: number[]): Promise<void> {
    const ack = this.opts.replyAck && (this.protocolFeatures & bit(PF.REPLY_ACK)) !== 0n;
    this.send(request, payload, fds, ack ? FLAG_NEED_REPLY : 0);
    if (!ack) return;
    const r = await this.get0(request);
    const v = decodeU64(r);
    if (v !== 0n) throw new Error(`${requestName(request)} failed (ack ${v})`);
  }

  private async get0(request: number): Promise<Buffer> {
    const r = await this.receive();
    if (r.request !== request || !(r.flags & FLAG_REPLY)) throw new Error(`expected an ack of ${requestName(request)}, got ${requestName(r.request)}`);
    return r.payload;
  }

  private async negotiate(): Promise<void> {
    const offered = decodeU64(await this.get(Req.GET_FEATURES));
    if (!(offered & bit(F_PROTOCOL_FEATURES))) throw new Error('back end without protocol features');
    const pOffered = decodeU64(await this.get(Req.GET_PROTOCOL_FEATURES));
    let want = bit(PF.MQ) | bit(PF.CONFIG) | bit(PF.REPLY_ACK);
    if (this.opts.memSlots) want |= bit(PF.CONFIGURE_MEM_SLOTS);
    if (this.opts.inflight) want |= bit(PF.INFLIGHT_SHMFD);
    this.protocolFeatures = pOffered & want;
    if (!(this.protocolFeatures & bit(PF.CONFIG))) throw new Error('back end without the CONFIG protocol feature');
    await this.set(Req.SET_PROTOCOL_FEATURES, encodeU64(this.protocolFeatures));
    if (this.protocolFeatures & bit(PF.MQ)) {
      this.backendQueues = Number(decodeU64(await this.get(Req.GET_QUEUE_NUM)));
      if (this.backendQueues < this.opts.numQueues) throw new Error(`back end has ${this.backendQueues} queues`);
    }
    await this.set(Req.SET_OWNER);
    const cfg = decodeConfig(await this.get(Req.GET_CONFIG, encodeConfig({ offset: 0, flags: 0, data: Buffer.alloc(60) })));
    this.rawConfig = cfg.data;
    this.config = decodeBlkConfig(cfg.data);
    // Everything virtio-blk the back end offers, less the ring features we were told not to use.
    let f = offered;
    if (!this.opts.eventIdx) f &= ~bit(VIRTIO_RING_F_EVENT_IDX);
    if (!this.opts.indirect) f &= ~bit(VIRTIO_RING_F_INDIRECT_DESC);
    if (!(f & bit(VIRTIO_F_VERSION_1))) throw new Error('back end without VERSION_1');
    // Only bits below 64 that QEMU would ack: drop transport bits we do not implement.
    f &= ~(bit(34) | bit(33) | bit(26) | bit(24)); // RING_PACKED, IOMMU_PLATFORM, LOG_ALL, NOTIFY_ON_EMPTY
    this.features = f;
    await this.set(Req.SET_FEATURES, encodeU64(f));
  }

  /** GET_INFLIGHT_FD on the first start, SET_INFLIGHT_FD with the same area on every start. */
  private async setupInflight(): Promise<void> {
    if (!(this.protocolFeatures & bit(PF.INFLIGHT_SHMFD))) return;
    if (this.inflightFd < 0) {
      this.send(Req.GET_INFLIGHT_FD, encodeInflight({ mmapSize: 0n, mmapOffset: 0n, numQueues: this.queues.length, queueSize: this.opts.queueSize }));
      const r = await this.receive();
      if (r.request !== Req.GET_INFLIGHT_FD || r.fds.length !== 1) throw new Error('bad GET_INFLIGHT_FD reply');
      this.inflightFd = r.fds[0]!;
      this.inflightMsg = r.payload;
    }
    await this.set(Req.SET_INFLIGHT_FD, this.inflightMsg!, [this.inflightFd]);
  }

  /**
   * After the back end went away (crash, restart): connect again and restart every queue where
   * the guest's rings stand — base = used->idx, as QEMU does — handing back the inflight area,
   * so that the requests still pending here are resubmitted by the new back end.
   */
  async reconnect(): Promise<void> {
    if (!this.closed) this.ch.close();
    this.closed = false;
    this.closedError = null;
    this.inbox = [];
    this.open();
    await this.negotiate();
    await this.setupInflight();
    await this.setupMemory();
    for (const q of this.queues) {
      closeQuietly(this.n, q.kickFd);
      closeQuietly(this.n, q.callFd);
      await this.startQueue(q, Atomics.load(q.used16, 1));
      this.reap(q); // completions published before the old back end died
    }
  }

  get region(): MemRegion {
    return { guestAddr: 0n, size: BigInt(this.memSize), userAddr: BigInt(UVA_BASE), mmapOffset: 0n };
  }

  private async setupMemory(): Promise<void> {
    if (this.protocolFeatures & bit(PF.CONFIGURE_MEM_SLOTS)) {
      const slots = Number(decodeU64(await this.get(Req.GET_MAX_MEM_SLOTS)));
      if (slots < 1) throw new Error('no memory slots');
      await this.set(Req.ADD_MEM_REG, encodeMemRegionMsg(this.region), [this.memFd]);
    } else {
      await this.set(Req.SET_MEM_TABLE, encodeMemTable([this.region]), [this.memFd]);
    }
  }

  private async startQueue(q: DriverQueue, base = 0): Promise<void> {
    await this.set(Req.SET_VRING_NUM, encodeVringState({ index: q.index, num: q.size }));
    await this.set(Req.SET_VRING_BASE, encodeVringState({ index: q.index, num: base }));
    await this.set(
      Req.SET_VRING_ADDR,
      encodeVringAddr({
        index: q.index,
        flags: 0,
        desc: BigInt(UVA_BASE + q.base),
        avail: BigInt(UVA_BASE + q.availOffset),
        used: BigInt(UVA_BASE + q.usedOffset),
        log: 0n,
      }),
    );
    q.kickFd = this.n.eventfd();
    q.callFd = this.n.eventfd();
    await this.set(Req.SET_VRING_KICK, encodeU64(BigInt(q.index)), [q.kickFd]);
    await this.set(Req.SET_VRING_CALL, encodeU64(BigInt(q.index)), [q.callFd]);
    q.watcher = new this.n.FdWatcher(q.callFd, () => this.reap(q), { eventfd: true });
    q.watcher.start();
    await this.set(Req.SET_VRING_ENABLE, encodeVringState({ index: q.index, num: 1 }));
  }

  /** GET_VRING_BASE: stops queue `i` (after the back end drains it); returns the next avail index. */
  async stopQueue(i: number): Promise<number> {
    const s = decodeVringState(await this.get(Req.GET_VRING_BASE, encodeVringState({ index: i, num: 0 })));
    return s.num;
  }

  // ---- rings --------------------------------------------------------------------------------

  private get eventIdx(): boolean {
    return (this.features & bit(VIRTIO_RING_F_EVENT_IDX)) !== 0n;
  }

  private reap(q: DriverQueue): void {
    for (;;) {
      const usedIdx = Atomics.load(q.used16, 1);
      while (q.lastUsed !== usedIdx) {
        const at = 1 + 2 * (q.lastUsed & (q.size - 1));
        const id = q.used32[at]!;
        const len = q.used32[at + 1]!;
        q.lastUsed = (q.lastUsed + 1) & 0xffff;
        const p = q.pending.get(id);
        if (p === undefined) continue; // the device returned an id we do not have: ignored here, tests check counts
        q.pending.delete(id);
        q.freeDescs.push(...p.descs);
        if (p.slot >= 0) q.freeSlots.push(p.slot);
        p.resolve({ len });
      }
      if (this.eventIdx) Atomics.store(q.avail16, 2 + q.size, q.lastUsed);
      if (Atomics.load(q.used16, 1) === q.lastUsed) break;
    }
    for (const w of q.waiters.splice(0)) w();
  }

  private publish(q: DriverQueue, head: number): void {
    q.avail16[2 + (q.availIdx & (q.size - 1))] = head;
    const old = q.availIdx;
    q.availIdx = (q.availIdx + 1) & 0xffff;
    Atomics.store(q.avail16, 1, q.availIdx);
    let kick: boolean;
    if (this.eventIdx) kick = needEvent(Atomics.load(q.used16, 2 + 4 * q.size), q.availIdx, old);
    else kick = (Atomics.load(q.used16, 0) & 1) === 0;
    if (kick) {
      q.kicks++;
      this.n.eventfdWrite(q.kickFd);
    }
  }

  private writeDesc(view: DataView, i: number, d: RawDesc): void {
    const o = i * 16;
    view.setBigUint64(o, BigInt(d.addr), true);
    view.setUint32(o + 8, d.len >>> 0, true);
    view.setUint16(o + 12, d.flags, true);
    view.setUint16(o + 14, d.next ?? 0, true);
  }

  /** Waits for a free slot and enough descriptors on queue q; returns the slot (taken). */
  private async reserve(q: DriverQueue, descs: number): Promise<number> {
    while (q.freeSlots.length === 0 || q.freeDescs.length < descs) {
      if (this.closed) throw this.closedError!;
      await new Promise<void>((r) => q.waiters.push(r));
    }
    return q.freeSlots.pop()!;
  }

  /**
   * Submits a chain of buffers given as [guest address, length, device-writable] and resolves
   * with the used length. `slot` is freed on completion.
   */
  private submitChain(q: DriverQueue, bufs: [number, number, boolean][], slot: number): Promise<Completion> {
    return new Promise<Completion>((resolve, reject) => {
      if (this.closed) {
        reject(this.closedError!);
        return;
      }
      let head: number;
      let descs: number[];
      if (this.features & bit(VIRTIO_RING_F_INDIRECT_DESC) && this.opts.indirect) {
        // Indirect table in the slot header area (after the 16-byte header and status byte).
        const tableGpa = this.slotAddr(q, slot) + 32;
        const t = this.mem.subarray(tableGpa, tableGpa + 16 * bufs.length);
        const tv = new DataView(t.buffer, t.byteOffset, t.length);
        bufs.forEach(([a, l, w], i) =>
          this.writeDesc(tv, i, { addr: a, len: l, flags: (w ? VRING_DESC_F_WRITE : 0) | (i + 1 < bufs.length ? VRING_DESC_F_NEXT : 0), next: i + 1 }),
        );
        head = q.freeDescs.pop()!;
        descs = [head];
        this.writeDesc(q.desc, head, { addr: tableGpa, len: 16 * bufs.length, flags: VRING_DESC_F_INDIRECT });
      } else {
        descs = bufs.map(() => q.freeDescs.pop()!);
        bufs.forEach(([a, l, w], i) =>
          this.writeDesc(q.desc, descs[i]!, {
            addr: a,
            len: l,
            flags: (w ? VRING_DESC_F_WRITE : 0) | (i + 1 < bufs.length ? VRING_DESC_F_NEXT : 0),
            next: descs[i + 1] ?? 0,
          }),
        );
        head = descs[0]!;
      }
      q.pending.set(head, { resolve, reject, descs, slot });
      this.publish(q, head);
    });
  }

  /**
   * Submits descriptors written literally at indices 0..n-1 of the table (for bad-chain tests;
   * the queue must be otherwise idle), with `head` published. Resolves with the used length.
   */
  submitRaw(queue: number, descs: RawDesc[], head = 0): Promise<Completion> {
    const q = this.queues[queue]!;
    if (q.pending.size > 0) throw new Error('submitRaw needs an idle queue');
    descs.forEach((d, i) => this.writeDesc(q.desc, i, d));
    return new Promise<Completion>((resolve, reject) => {
      if (this.closed) {
        reject(this.closedError!);
        return;
      }
      q.pending.set(head, { resolve, reject, descs: [], slot: -1 });
      this.publish(q, head);
    });
  }

  /** Guest address of slot s of queue q: [header 16][status 1][pad][indirect table][data]. */
  slotAddr(q: DriverQueue, slot: number): number {
    return this.slotBase + (q.index * this.depth + slot) * this.slotSize;
  }

  /** A scratch slot's addresses, for raw tests: header, status, data. */
  scratch(queue = 0, slot = 0): { header: number; status: number; data: number } {
    const base = this.slotAddr(this.queues[queue]!, slot);
    return { header: base, status: base + 16, data: base + SLOT_HDR };
  }

  // ---- virtio-blk ----------------------------------------------------------------------------

  /**
   * One virtio-blk request. `data` (OUT, DISCARD, WRITE_ZEROES) is copied into the request's
   * slot; for IN and GET_ID, `readLen` bytes are made device-writable and returned.
   */
  async blk(type: number, sector: bigint | number, opts: { data?: Uint8Array; readLen?: number; queue?: number } = {}): Promise<{ status: number; data: Buffer; len: number }> {
    const q = this.queues[opts.queue ?? 0]!;
    const dlen = opts.data?.length ?? opts.readLen ?? 0;
    if (dlen > this.maxIo) throw new Error(`request of ${dlen} bytes > maxIo ${this.maxIo}`);
    const slot = await this.reserve(q, dlen > 0 ? 3 : 2);
    const base = this.slotAddr(q, slot);
    this.mem.writeUInt32LE(type, base);
    this.mem.writeUInt32LE(0, base + 4);
    this.mem.writeBigUInt64LE(BigInt(sector), base + 8);
    this.mem[base + 16] = 0xff;
    const dataAddr = base + SLOT_HDR;
    const bufs: [number, number, boolean][] = [[base, 16, false]];
    if (opts.data !== undefined && dlen > 0) {
      this.mem.set(opts.data, dataAddr);
      bufs.push([dataAddr, dlen, false]);
    } else if (dlen > 0) {
      bufs.push([dataAddr, dlen, true]);
    }
    bufs.push([base + 16, 1, true]);
    const c = await this.submitChain(q, bufs, slot);
    const status = this.mem[base + 16]!;
    const data = opts.data === undefined && dlen > 0 ? Buffer.from(this.mem.subarray(dataAddr, dataAddr + dlen)) : Buffer.alloc(0);
    return { status, data, len: c.len };
  }

  read(sector: bigint | number, len: number, queue?: number): Promise<{ status: number; data: Buffer; len: number }> {
    return this.blk(BlkType.IN, sector, { readLen: len, queue });
  }

  async write(sector: bigint | number, data: Uint8Array, queue?: number): Promise<number> {
    return (await this.blk(BlkType.OUT, sector, { data, queue })).status;
  }

  async flush(queue?: number): Promise<number> {
    return (await this.blk(BlkType.FLUSH, 0, { queue })).status;
  }

  async getId(): Promise<{ status: number; id: string }> {
    const r = await this.blk(BlkType.GET_ID, 0, { readLen: 20 });
    return { status: r.status, id: r.data.toString('utf8').split('\0')[0]! };
  }

  /** DISCARD or WRITE_ZEROES of [sector, sector + count) segments. */
  async zeroOrDiscard(type: number, segs: { sector: bigint | number; count: number; flags?: number }[], queue?: number): Promise<number> {
    const b = Buffer.alloc(16 * segs.length);
    segs.forEach((s, i) => {
      b.writeBigUInt64LE(BigInt(s.sector), i * 16);
      b.writeUInt32LE(s.count, i * 16 + 8);
      b.writeUInt32LE(s.flags ?? 0, i * 16 + 12);
    });
    return (await this.blk(type, 0, { data: b, queue })).status;
  }

  /** Sends a kick on queue i without publishing anything (tests). */
  kick(i = 0): void {
    this.n.eventfdWrite(this.queues[i]!.kickFd);
  }

  /** Queue internals for tests that corrupt rings. */
  queue(i = 0): DriverQueue {
    return this.queues[i]!;
  }

  close(): void {
    this.shuttingDown = true;
    if (this.ch !== undefined) {
      if (!this.closed) this.ch.close();
      else this.onClosed(this.closedError ?? undefined); // reject what a lost connection kept pending
    }
    closeQuietly(this.n, this.inflightFd);
    this.inflightFd = -1;
    for (const m of this.inbox.splice(0)) for (const f of m.fds) closeQuietly(this.n, f);
    for (const q of this.queues) {
      q.watcher?.close();
      q.watcher = null;
      closeQuietly(this.n, q.kickFd);
      closeQuietly(this.n, q.callFd);
      q.kickFd = q.callFd = -1;
    }
    closeQuietly(this.n, this.memFd);
    this.memFd = -1;
  }
}
