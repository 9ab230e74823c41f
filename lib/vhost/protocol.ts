/**
 * The vhost-user wire format (QEMU docs/interop/vhost-user.rst): a 12-byte header — request,
 * flags, payload size, all u32 little-endian — then the payload; file descriptors travel as
 * SCM_RIGHTS ancillary data with the header. Pure functions of bytes: no sockets, no fds
 * opened or closed here. Every decoder checks the payload size and throws ProtocolError, which
 * the transport answers by closing that one connection.
 */

export const HEADER_SIZE = 12;
/** Largest payload accepted (the largest real one, a memory table of 8 regions, is 264 bytes). */
export const MAX_PAYLOAD = 4096;
/** Version 1 in bits 0-1 of flags. */
export const VERSION = 0x1;
export const VERSION_MASK = 0x3;
export const FLAG_REPLY = 0x4;
export const FLAG_NEED_REPLY = 0x8;

/** Front-end -> back-end requests. */
export const Req = {
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_OWNER: 3,
  RESET_OWNER: 4,
  SET_MEM_TABLE: 5,
  SET_LOG_BASE: 6,
  SET_LOG_FD: 7,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  SET_VRING_KICK: 12,
  SET_VRING_CALL: 13,
  SET_VRING_ERR: 14,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  GET_QUEUE_NUM: 17,
  SET_VRING_ENABLE: 18,
  SEND_RARP: 19,
  NET_SET_MTU: 20,
  SET_BACKEND_REQ_FD: 21,
  IOTLB_MSG: 22,
  SET_VRING_ENDIAN: 23,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  CREATE_CRYPTO_SESSION: 26,
  CLOSE_CRYPTO_SESSION: 27,
  POSTCOPY_ADVISE: 28,
  POSTCOPY_LISTEN: 29,
  POSTCOPY_END: 30,
  GET_INFLIGHT_FD: 31,
  SET_INFLIGHT_FD: 32,
  GPU_SET_SOCKET: 33,
  RESET_DEVICE: 34,
  VRING_KICK: 35,
  GET_MAX_MEM_SLOTS: 36,
  ADD_MEM_REG: 37,
  REM_MEM_REG: 38,
  SET_STATUS: 39,
  GET_STATUS: 40,
} as const;

export function requestName(r: number): string {
  for (const [k, v] of Object.entries(Req)) if (v === r) return k;
  return `UNKNOWN(${r})`;
}

/** Bit numbers of VHOST_USER_PROTOCOL_F_*. */
export const ProtocolFeature = {
  MQ: 0,
  LOG_SHMFD: 1,
  RARP: 2,
  REPLY_ACK: 3,
  NET_MTU: 4,
  BACKEND_REQ: 5,
  CROSS_ENDIAN: 6,
  CRYPTO_SESSION: 7,
  PAGEFAULT: 8,
  CONFIG: 9,
  BACKEND_SEND_FD: 10,
  HOST_NOTIFIER: 11,
  INFLIGHT_SHMFD: 12,
  RESET_DEVICE: 13,
  INBAND_NOTIFICATIONS: 14,
  CONFIGURE_MEM_SLOTS: 15,
  STATUS: 16,
} as const;

/** Bit 30 of the virtio feature word: the back end speaks GET/SET_PROTOCOL_FEATURES. */
export const F_PROTOCOL_FEATURES = 30;
/** SET_VRING_KICK/CALL/ERR payload: bits 0-7 queue index, bit 8 "no fd" (polling). */
export const VRING_IDX_MASK = 0xff;
export const VRING_NOFD_MASK = 0x100;
/** Regions in one SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS). */
export const MAX_TABLE_REGIONS = 8;
/** The VhostUserConfig payload is at most 256 bytes. */
export const MAX_CONFIG_SIZE = 256;

export function bit(n: number): bigint {
  return 1n << BigInt(n);
}

export class ProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ProtocolError';
  }
}

export interface Header {
  request: number;
  flags: number;
  size: number;
}

export interface Message extends Header {
  payload: Buffer;
  /** Fds received with the message; the receiver owns them (closes what it does not keep). */
  fds: number[];
}

export function decodeHeader(b: Uint8Array): Header {
  if (b.length < HEADER_SIZE) throw new ProtocolError(`short header (${b.length} bytes)`);
  const v = new DataView(b.buffer, b.byteOffset, HEADER_SIZE);
  const h = { request: v.getUint32(0, true), flags: v.getUint32(4, true), size: v.getUint32(8, true) };
  if ((h.flags & VERSION_MASK) !== VERSION) throw new ProtocolError(`bad version in flags 0x${h.flags.toString(16)}`);
  if (h.size > MAX_PAYLOAD) throw new ProtocolError(`payload of ${h.size} bytes exceeds ${MAX_PAYLOAD}`);
  return h;
}

/** Header + payload in one buffer, ready to send. */
export function encodeMessage(request: number, flags: number, payload: Uint8Array = new Uint8Array(0)): Buffer {
  if (payload.length > MAX_PAYLOAD) throw new ProtocolError(`payload of ${payload.length} bytes exceeds ${MAX_PAYLOAD}`);
  const b = Buffer.alloc(HEADER_SIZE + payload.length);
  b.writeUInt32LE(request >>> 0, 0);
  b.writeUInt32LE(((flags & ~VERSION_MASK) | VERSION) >>> 0, 4);
  b.writeUInt32LE(payload.length, 8);
  b.set(payload, HEADER_SIZE);
  return b;
}

function need(p: Uint8Array, size: number, what: string, exact = true): void {
  if (exact ? p.length !== size : p.length < size) {
    throw new ProtocolError(`${what}: payload of ${p.length} bytes, expected ${exact ? '' : 'at least '}${size}`);
  }
}

function view(p: Uint8Array): DataView {
  return new DataView(p.buffer, p.byteOffset, p.byteLength);
}

export function decodeU64(p: Uint8Array, what = 'u64'): bigint {
  need(p, 8, what);
  return view(p).getBigUint64(0, true);
}

export function encodeU64(v: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt.asUintN(64, v));
  return b;
}

export interface VringState {
  index: number;
  num: number;
}

export function decodeVringState(p: Uint8Array): VringState {
  need(p, 8, 'vring state');
  const v = view(p);
  return { index: v.getUint32(0, true), num: v.getUint32(4, true) };
}

export function encodeVringState(s: VringState): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32LE(s.index >>> 0, 0);
  b.writeUInt32LE(s.num >>> 0, 4);
  return b;
}

/** VHOST_VRING_F_LOG in VringAddr.flags. */
export const VRING_F_LOG = 0x1;

export interface VringAddr {
  index: number;
  flags: number;
  /** Front-end virtual addresses (QEMU's, translated through the memory table's userAddr). */
  desc: bigint;
  used: bigint;
  avail: bigint;
  log: bigint;
}

export function decodeVringAddr(p: Uint8Array): VringAddr {
  need(p, 40, 'vring address');
  const v = view(p);
  return {
    index: v.getUint32(0, true),
    flags: v.getUint32(4, true),
    desc: v.getBigUint64(8, true),
    used: v.getBigUint64(16, true),
    avail: v.getBigUint64(24, true),
    log: v.getBigUint64(32, true),
  };
}

export function encodeVringAddr(a: VringAddr): Buffer {
  const b = Buffer.alloc(40);
  b.writeUInt32LE(a.index >>> 0, 0);
  b.writeUInt32LE(a.flags >>> 0, 4);
  b.writeBigUInt64LE(BigInt.asUintN(64, a.desc), 8);
  b.writeBigUInt64LE(BigInt.asUintN(64, a.used), 16);
  b.writeBigUInt64LE(BigInt.asUintN(64, a.avail), 24);
  b.writeBigUInt64LE(BigInt.asUintN(64, a.log), 32);
  return b;
}

export interface MemRegion {
  guestAddr: bigint;
  size: bigint;
  userAddr: bigint;
  mmapOffset: bigint;
}

const REGION_SIZE = 32;

function decodeRegion(v: DataView, at: number): MemRegion {
  return {
    guestAddr: v.getBigUint64(at, true),
    size: v.getBigUint64(at + 8, true),
    userAddr: v.getBigUint64(at + 16, true),
    mmapOffset: v.getBigUint64(at + 24, true),
  };
}

function encodeRegion(b: Buffer, at: number, r: MemRegion): void {
  b.writeBigUInt64LE(BigInt.asUintN(64, r.guestAddr), at);
  b.writeBigUInt64LE(BigInt.asUintN(64, r.size), at + 8);
  b.writeBigUInt64LE(BigInt.asUintN(64, r.userAddr), at + 16);
  b.writeBigUInt64LE(BigInt.asUintN(64, r.mmapOffset), at + 24);
}

/** SET_MEM_TABLE: u32 nregions, u32 padding, then nregions regions (one fd each, in order). */
export function decodeMemTable(p: Uint8Array): MemRegion[] {
  need(p, 8, 'memory table', false);
  const v = view(p);
  const n = v.getUint32(0, true);
  if (n > MAX_TABLE_REGIONS) throw new ProtocolError(`memory table of ${n} regions (max ${MAX_TABLE_REGIONS})`);
  // QEMU sends exactly 8 + 32n bytes; older front ends send the whole 8-region array.
  if (p.length !== 8 + n * REGION_SIZE && p.length !== 8 + MAX_TABLE_REGIONS * REGION_SIZE) {
    throw new ProtocolError(`memory table of ${n} regions in ${p.length} bytes`);
  }
  const out: MemRegion[] = [];
  for (let i = 0; i < n; i++) out.push(decodeRegion(v, 8 + i * REGION_SIZE));
  return out;
}

export function encodeMemTable(regions: MemRegion[]): Buffer {
  if (regions.length > MAX_TABLE_REGIONS) throw new ProtocolError(`too many regions (${regions.length})`);
  const b = Buffer.alloc(8 + regions.length * REGION_SIZE);
  b.writeUInt32LE(regions.length, 0);
  regions.forEach((r, i) => encodeRegion(b, 8 + i * REGION_SIZE, r));
  return b;
}

/** ADD_MEM_REG / REM_MEM_REG: u64 padding, then one region. */
export function decodeMemRegionMsg(p: Uint8Array): MemRegion {
  need(p, 8 + REGION_SIZE, 'memory region');
  return decodeRegion(view(p), 8);
}

export function encodeMemRegionMsg(r: MemRegion): Buffer {
  const b = Buffer.alloc(8 + REGION_SIZE);
  encodeRegion(b, 8, r);
  return b;
}

export interface ConfigMsg {
  offset: number;
  /** VHOST_SET_CONFIG_TYPE_FRONTEND (0) or _MIGRATION (1). */
  flags: number;
  data: Buffer;
}

/** GET_CONFIG / SET_CONFIG: u32 offset, u32 size, u32 flags, then `size` bytes (<= 256). */
export function decodeConfig(p: Uint8Array): ConfigMsg {
  need(p, 12, 'config', false);
  const v = view(p);
  const offset = v.getUint32(0, true);
  const size = v.getUint32(4, true);
  const flags = v.getUint32(8, true);
  if (size > MAX_CONFIG_SIZE) throw new ProtocolError(`config size ${size} > ${MAX_CONFIG_SIZE}`);
  if (p.length !== 12 + size) throw new ProtocolError(`config of ${size} bytes in a ${p.length}-byte payload`);
  if (offset > MAX_CONFIG_SIZE || offset + size > MAX_CONFIG_SIZE) throw new ProtocolError(`config range ${offset}+${size}`);
  return { offset, flags, data: Buffer.from(p.subarray(12, 12 + size)) };
}

export function encodeConfig(c: ConfigMsg): Buffer {
  if (c.data.length > MAX_CONFIG_SIZE) throw new ProtocolError(`config size ${c.data.length}`);
  const b = Buffer.alloc(12 + c.data.length);
  b.writeUInt32LE(c.offset >>> 0, 0);
  b.writeUInt32LE(c.data.length, 4);
  b.writeUInt32LE(c.flags >>> 0, 8);
  b.set(c.data, 12);
  return b;
}

export interface Inflight {
  mmapSize: bigint;
  mmapOffset: bigint;
  numQueues: number;
  queueSize: number;
}

/** GET/SET_INFLIGHT_FD: u64 mmap_size, u64 mmap_offset, u16 num_queues, u16 queue_size (+ padding to 24). */
export function decodeInflight(p: Uint8Array): Inflight {
  if (p.length !== 20 && p.length !== 24) throw new ProtocolError(`inflight: payload of ${p.length} bytes, expected 24`);
  const v = view(p);
  return {
    mmapSize: v.getBigUint64(0, true),
    mmapOffset: v.getBigUint64(8, true),
    numQueues: v.getUint16(16, true),
    queueSize: v.getUint16(18, true),
  };
}

export function encodeInflight(i: Inflight): Buffer {
  const b = Buffer.alloc(24);
  b.writeBigUInt64LE(BigInt.asUintN(64, i.mmapSize), 0);
  b.writeBigUInt64LE(BigInt.asUintN(64, i.mmapOffset), 8);
  b.writeUInt16LE(i.numQueues & 0xffff, 16);
  b.writeUInt16LE(i.queueSize & 0xffff, 18);
  return b;
}

/**
 * Assembles messages from a byte stream read in exact pieces: first the 12-byte header (fds
 * arrive with it), then exactly `size` payload bytes. `want()` says how many bytes to read
 * next, so a message's fds are never confused with the next one's (the kernel attaches them
 * to the first byte of the sender's sendmsg).
 */
export class MessageReader {
  private readonly header = Buffer.alloc(HEADER_SIZE);
  private hdr: Header | null = null;
  private payload: Buffer = Buffer.alloc(0);
  private got = 0;
  private fds: number[] = [];

  /** Where the next read goes: a window of the current header or payload buffer. */
  want(): Buffer {
    return this.hdr === null ? this.header.subarray(this.got) : this.payload.subarray(this.got);
  }

  /** Records `n` bytes read into want() and the fds that came with them; returns a message when complete. */
  advance(n: number, fds: number[]): Message | null {
    this.fds.push(...fds);
    this.got += n;
    if (this.hdr === null) {
      if (this.got < HEADER_SIZE) return null;
      this.hdr = decodeHeader(this.header);
      this.payload = Buffer.alloc(this.hdr.size);
      this.got = 0;
      if (this.hdr.size > 0) return null;
    } else if (this.got < this.payload.length) {
      return null;
    }
    const msg: Message = { ...this.hdr, payload: this.payload, fds: this.fds };
    this.hdr = null;
    this.got = 0;
    this.fds = [];
    this.payload = Buffer.alloc(0);
    return msg;
  }

  /** Bytes or fds of an incomplete message have been received. */
  get midMessage(): boolean {
    return this.hdr !== null || this.got > 0 || this.fds.length > 0;
  }

  /** Fds received for a message not yet complete (to close them when the connection dies). */
  takePendingFds(): number[] {
    const f = this.fds;
    this.fds = [];
    return f;
  }
}
