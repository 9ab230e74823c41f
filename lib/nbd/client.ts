/**
 * The NBD client: one connection to an NBD server (vstore's own, qemu-nbd, nbdkit, any server of
 * the fixed-newstyle protocol). It shares the server's codec and constants.
 *
 * Handshake: fixed newstyle (client flags FIXED_NEWSTYLE|NO_ZEROES), NBD_OPT_STRUCTURED_REPLY,
 * NBD_OPT_SET_META_CONTEXT base:allocation, NBD_OPT_GO asking for NBD_INFO_BLOCK_SIZE
 * (NBD_OPT_EXPORT_NAME when the server does not know GO).
 *
 * Transmission: many requests in flight (bounded; callers queue beyond, and that queue is bounded
 * too), replies matched by handle, read data written straight into the caller's buffer.
 * Everything the server sends is validated before it is used: an unknown handle, a reply of the
 * wrong kind for its command, a chunk outside its request, an oversized length, a bad magic, a
 * request left unanswered past its timeout — each declares the connection broken: the socket is
 * destroyed and every pending request fails with EIO. Bytes of a chunk reach the caller's buffer
 * only after the chunk's offset and length were checked against the request, and a read
 * resolves only when chunks covered every byte exactly once.
 *
 * Costs per request on the data path (the daemon's proxy hop, bench/RESULTS-replicated.md):
 * replies are read into one preallocated buffer per connection (net.Socket `onread`), payloads
 * copied from it straight into the caller's buffer, and only the few bytes of a reply header
 * that straddles two reads copied out before the buffer is reused; request headers of one
 * event-loop turn are written side by side into one buffer and the turn's headers and write
 * payloads leave in one writev.
 */
import { EventEmitter } from 'node:events';
import * as net from 'node:net';
import { VolumeError, type ErrnoCode } from '../block/errors.js';
import type { Extent } from '../block/volume.js';
import type { Logger } from '../log.js';
import { formatAddress, parseAddress, type SocketAddress } from '../net/address.js';
import * as codec from './codec.js';
import { ChunkQueue } from './chunks.js';
import * as C from './constants.js';

// ------------------------------------------------------------------------------------ addresses

export interface NbdTarget {
  address: SocketAddress;
  /** Export named by an `nbd://` / `nbd+unix://` URI (undefined for a plain address or a URI without a path). */
  export?: string;
}

/** IANA port of NBD. */
export const NBD_DEFAULT_PORT = 10809;

/**
 * Parses where an NBD server is: `nbd://HOST[:PORT][/EXPORT]`, `nbd+unix:///EXPORT?socket=PATH`,
 * or a lib/net address (`unix:/path`, `/path`, `HOST:PORT`, `tcp://HOST:PORT`) without export.
 * TLS URIs (`nbds://`, `nbds+unix://`) are refused: TLS is not implemented by this client.
 */
export function parseNbdUri(s: string): NbdTarget {
  const scheme = /^([a-z0-9+.-]+):\/\//i.exec(s)?.[1]?.toLowerCase();
  if (scheme === undefined || scheme === 'tcp' || scheme === 'unix') return { address: parseAddress(s, 'nbd address') };
  if (scheme === 'nbds' || scheme === 'nbds+unix' || scheme === 'nbds+tcp') {
    throw new Error(`nbd address "${s}": TLS (nbds) is not supported by this client`);
  }
  if (scheme !== 'nbd' && scheme !== 'nbd+unix' && scheme !== 'nbd+tcp') {
    throw new Error(`nbd address "${s}": unknown scheme ${scheme}:// (expected nbd:// or nbd+unix://)`);
  }
  let u: URL;
  try {
    u = new URL(s);
  } catch {
    throw new Error(`nbd address "${s}": not a valid URI`);
  }
  let exp: string | undefined;
  if (u.pathname !== '' && u.pathname !== '/') {
    try {
      exp = decodeURIComponent(u.pathname.slice(1));
    } catch {
      throw new Error(`nbd address "${s}": bad percent-encoding in the export name`);
    }
  } else if (u.pathname === '/') exp = '';
  if (scheme === 'nbd+unix') {
    const sock = u.searchParams.get('socket');
    if (!sock) throw new Error(`nbd address "${s}": nbd+unix:// needs ?socket=PATH`);
    if (u.host !== '') throw new Error(`nbd address "${s}": nbd+unix:// takes no host`);
    return { address: { unix: sock }, export: exp };
  }
  if (u.searchParams.has('socket')) throw new Error(`nbd address "${s}": ?socket= belongs to nbd+unix://`);
  const host = u.hostname.replace(/^\[(.*)\]$/, '$1');
  if (host === '') throw new Error(`nbd address "${s}": no host`);
  const port = u.port === '' ? NBD_DEFAULT_PORT : Number(u.port);
  return { address: { host, port }, export: exp };
}

// ------------------------------------------------------------------------------------ errors

/** The VolumeError for an NBD error value (unknown values are EIO, as the spec asks). */
export function volumeErrorFromNbd(err: number, message?: string): VolumeError {
  let code: ErrnoCode;
  switch (err) {
    case C.NBD_EPERM: code = 'EPERM'; break;
    case C.NBD_EIO: code = 'EIO'; break;
    case C.NBD_ENOMEM: code = 'ENOMEM'; break;
    case C.NBD_EINVAL: code = 'EINVAL'; break;
    case C.NBD_ENOSPC: code = 'ENOSPC'; break;
    case C.NBD_EOVERFLOW: code = 'EOVERFLOW'; break;
    case C.NBD_ENOTSUP: code = 'ENOTSUP'; break;
    case C.NBD_ESHUTDOWN: code = 'ESHUTDOWN'; break;
    default: code = 'EIO';
  }
  return new VolumeError(code, `nbd server: ${message ? message : `error ${err}`}`);
}

// ------------------------------------------------------------------------------------ types

export interface NbdClientOptions {
  /** lib/net address or nbd URI (see parseNbdUri). */
  address: string | SocketAddress;
  /** Export name; default: the URI's, else '' (the default export). */
  export?: string;
  logger: Logger;
  /** Connect + handshake must finish within this (ms). Default 5000. */
  connectTimeoutMs?: number;
  /** A request unanswered this long (ms) breaks the connection. Default 30000. */
  timeoutMs?: number;
  /** Requests on the wire at once; more wait in a queue. Default 64. */
  maxInflight?: number;
  /** Requests waiting for a wire slot; beyond, a request fails at once with EAGAIN. Default 4096. */
  maxQueued?: number;
  /** Ask for structured replies (default true; false exercises simple replies). */
  structuredReplies?: boolean;
  /** Ask for the base:allocation meta context (default true; needs structured replies). */
  blockStatus?: boolean;
  /** TCP only: the local address to bind (multipath over several source addresses / NICs). */
  localAddress?: string;
}

/** What the handshake established. */
export interface NbdExportInfo {
  export: string;
  size: number;
  /** Transmission flags (0 when the server did not set NBD_FLAG_HAS_FLAGS). */
  flags: number;
  structured: boolean;
  /** Context id of base:allocation, or null when not negotiated. */
  baseAllocationId: number | null;
  /** NBD_INFO_BLOCK_SIZE as the server sent it, or null. */
  blockSize: { minimum: number; preferred: number; maximum: number } | null;
  /** 'go' or 'export-name' (the server did not know NBD_OPT_GO). */
  via: 'go' | 'export-name';
}

export interface WriteZeroesFlags {
  fua?: boolean;
  /** Send NBD_CMD_FLAG_NO_HOLE: the range must stay allocated. */
  noHole?: boolean;
  fastZero?: boolean;
}

interface Interval {
  start: number;
  end: number;
}

interface Req {
  handle: number;
  type: number;
  flags: number;
  offset: number;
  length: number;
  /** READ: the caller's buffer; WRITE: the payload. */
  buf: Buffer | null;
  sentAt: number;
  resolve: (v: unknown) => void;
  reject: (e: VolumeError) => void;
  // structured reply state
  error: VolumeError | null;
  covered: Interval[];
  coveredBytes: number;
  extents: Extent[] | null;
}

/** The buffer replies are read into (one per connection; reused by every read of the socket). */
const READ_BUFFER = 256 * 1024;
/** Request headers written into one buffer before another is allocated (headers of many turns share it). */
const HEADER_BATCH = 256 * C.REQUEST_HEADER_SIZE;

/** Longest option reply the client reads (INFO strings are <= 4 KiB). */
const MAX_OPTION_REPLY = 64 * 1024;
/** Longest non-data structured chunk: error chunks are <= 6 + 4096 + 8; block status 2^20 extents. */
const MAX_ERROR_CHUNK = 6 + C.MAX_STRING_LENGTH + 8;
const MAX_STATUS_CHUNK = 4 + 8 * (1 << 20);
const TWO32 = 4294967296;

type Phase = 'handshake' | 'ready' | 'closing' | 'closed';

/** Reply parser state. */
type RxState =
  | { s: 'header' }
  /** Simple READ reply: data of `req` follows. */
  | { s: 'simple-data'; req: Req; pos: number }
  /** A structured chunk's whole payload must be buffered, then handled. */
  | { s: 'chunk'; req: Req; flags: number; type: number; length: number }
  /** OFFSET_DATA: the 8-byte offset follows. */
  | { s: 'data-offset'; req: Req; flags: number; length: number }
  /** OFFSET_DATA: `left` data bytes go to req.buf at `pos`. */
  | { s: 'data'; req: Req; flags: number; pos: number; left: number };

// ------------------------------------------------------------------------------------ connection

/**
 * One connection to one export. Events: 'close' (reason: string, error: boolean) once, when the
 * connection ends for any reason (close(), the server, a protocol error, a timeout).
 */
export class NbdClientConnection extends EventEmitter {
  readonly info: NbdExportInfo;
  readonly address: string;
  private readonly socket: net.Socket;
  private readonly log: Logger;
  private readonly q: ChunkQueue;
  private phase: Phase = 'ready';
  private rx: RxState = { s: 'header' };
  private readonly inflight = new Map<number, Req>();
  private readonly waiting: Array<() => void> = [];
  private nextHandle = 1;
  private readonly maxInflight: number;
  private readonly maxQueued: number;
  private readonly timeoutMs: number;
  private sweepTimer: NodeJS.Timeout | null = null;
  /** A flush of this turn's requests is scheduled (setImmediate). */
  private flushQueued = false;
  /** Headers are appended at hdrPos; [runStart, hdrPos) is not yet in `out`. Bytes before hdrPos are never rewritten (the socket may still hold them). */
  private hdr: Buffer = Buffer.allocUnsafeSlow(HEADER_BATCH);
  private hdrPos = 0;
  private runStart = 0;
  /** This turn's header runs and write payloads, in wire order. */
  private out: Buffer[] = [];
  private closeReason: string | null = null;
  private closedP: Promise<void>;
  private idleWaiters: Array<() => void> = [];

  private constructor(
    socket: net.Socket, q: ChunkQueue, info: NbdExportInfo, address: string, log: Logger,
    o: { timeoutMs: number; maxInflight: number; maxQueued: number }, reads: ReadSink,
  ) {
    super();
    this.socket = socket;
    this.q = q;
    this.info = info;
    this.address = address;
    this.log = log;
    this.timeoutMs = o.timeoutMs;
    this.maxInflight = o.maxInflight;
    this.maxQueued = o.maxQueued;
    this.closedP = new Promise((resolve) => socket.once('close', () => resolve()));
    reads.sink = this.onRead;
    socket.on('close', this.onClose);
    socket.on('error', this.onError);
  }

  /** Connects, negotiates, and resolves once in transmission; rejects with a VolumeError. */
  static async connect(opts: NbdClientOptions): Promise<NbdClientConnection> {
    let target: NbdTarget;
    try {
      target = typeof opts.address === 'string' ? parseNbdUri(opts.address) : { address: opts.address };
    } catch (e) {
      throw new VolumeError('EINVAL', (e as Error).message);
    }
    const exportName = opts.export ?? target.export ?? '';
    const addr = formatAddress(target.address);
    const log = opts.logger.child({ nbd: addr, export: exportName });
    const timeoutMs = opts.timeoutMs ?? 30_000;
    const maxInflight = opts.maxInflight ?? 64;
    const maxQueued = opts.maxQueued ?? 4096;
    if (!(timeoutMs > 0)) throw new VolumeError('EINVAL', 'timeoutMs must be > 0');
    if (!Number.isSafeInteger(maxInflight) || maxInflight < 1) throw new VolumeError('EINVAL', 'maxInflight must be >= 1');
    if (!Number.isSafeInteger(maxQueued) || maxQueued < 0) throw new VolumeError('EINVAL', 'maxQueued must be >= 0');
    const hs = new Handshake(target.address, addr, exportName, opts, log);
    const { socket, q, info } = await hs.run(opts.connectTimeoutMs ?? 5000);
    const conn = new NbdClientConnection(socket, q, info, addr, log, { timeoutMs, maxInflight, maxQueued }, hs.reads);
    log.debug({ size: info.size, flags: info.flags, structured: info.structured, via: info.via }, 'nbd client: connected');
    // Bytes the server sent after the handshake without being asked are replies to nothing.
    if (q.length > 0) conn.processReplies();
    return conn;
  }

  get size(): number {
    return this.info.size;
  }
  get flags(): number {
    return this.info.flags;
  }
  /** In transmission and accepting requests. */
  get ready(): boolean {
    return this.phase === 'ready';
  }
  get closed(): boolean {
    return this.phase === 'closed';
  }
  /** Requests in flight plus queued. */
  get pending(): number {
    return this.inflight.size + this.waiting.length;
  }
  /** Why the connection ended (null while open). */
  get reason(): string | null {
    return this.closeReason;
  }

  has(flag: number): boolean {
    return (this.info.flags & flag) !== 0;
  }

  // ------------------------------------------------------------------ commands

  /** Fills buf with [offset, offset + buf.length). */
  read(offset: number, buf: Buffer): Promise<void> {
    return this.request(C.NBD_CMD_READ, 0, offset, buf.length, buf) as Promise<void>;
  }

  write(offset: number, buf: Buffer, opts: { fua?: boolean } = {}): Promise<void> {
    return this.request(C.NBD_CMD_WRITE, opts.fua ? C.NBD_CMD_FLAG_FUA : 0, offset, buf.length, buf) as Promise<void>;
  }

  flush(): Promise<void> {
    return this.request(C.NBD_CMD_FLUSH, 0, 0, 0, null) as Promise<void>;
  }

  trim(offset: number, length: number, opts: { fua?: boolean } = {}): Promise<void> {
    return this.request(C.NBD_CMD_TRIM, opts.fua ? C.NBD_CMD_FLAG_FUA : 0, offset, length, null) as Promise<void>;
  }

  writeZeroes(offset: number, length: number, opts: WriteZeroesFlags = {}): Promise<void> {
    const f = (opts.fua ? C.NBD_CMD_FLAG_FUA : 0) | (opts.noHole ? C.NBD_CMD_FLAG_NO_HOLE : 0) | (opts.fastZero ? C.NBD_CMD_FLAG_FAST_ZERO : 0);
    return this.request(C.NBD_CMD_WRITE_ZEROES, f, offset, length, null) as Promise<void>;
  }

  cache(offset: number, length: number): Promise<void> {
    return this.request(C.NBD_CMD_CACHE, 0, offset, length, null) as Promise<void>;
  }

  /**
   * base:allocation of a prefix of [offset, offset + length): contiguous extents from offset,
   * clipped to the range. Fails with ENOTSUP when the context was not negotiated.
   */
  blockStatus(offset: number, length: number, opts: { reqOne?: boolean } = {}): Promise<Extent[]> {
    if (this.info.baseAllocationId === null) return Promise.reject(new VolumeError('ENOTSUP', 'base:allocation not negotiated'));
    return this.request(C.NBD_CMD_BLOCK_STATUS, opts.reqOne ? C.NBD_CMD_FLAG_REQ_ONE : 0, offset, length, null) as Promise<Extent[]>;
  }

  /**
   * Graceful end: queued requests fail with ESHUTDOWN, requests in flight are answered (or time
   * out), then NBD_CMD_DISC and FIN. Resolves when the socket is closed.
   */
  async close(): Promise<void> {
    if (this.phase === 'ready') {
      this.phase = 'closing';
      const w = this.waiting.splice(0);
      for (const f of w) f();
      if (this.inflight.size > 0) await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
      if (this.phase === 'closing') {
        this.closeReason = 'closed by the client';
        const s = this.socket;
        if (s.writable) s.write(codec.encodeRequest({ type: C.NBD_CMD_DISC, handleHi: 0, handleLo: 0, offset: 0, length: 0 }));
        s.end();
        const t = setTimeout(() => s.destroy(), 1000);
        t.unref();
        await this.closedP;
        clearTimeout(t);
      }
    }
    await this.closedP;
  }

  /** Hard end: every pending request fails with EIO (or ESHUTDOWN for a deliberate destroy). */
  destroy(reason = 'destroyed by the client'): void {
    this.fail(reason, false);
  }

  // ------------------------------------------------------------------ sending

  private request(type: number, flags: number, offset: number, length: number, buf: Buffer | null): Promise<unknown> {
    if (this.phase !== 'ready') {
      return Promise.reject(new VolumeError('ESHUTDOWN', `nbd connection to ${this.address} is ${this.closeReason ?? 'closing'}`));
    }
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0 || length >= TWO32) {
      return Promise.reject(new VolumeError('EINVAL', `bad range ${offset}+${length}`));
    }
    if (offset + length > this.info.size) {
      return Promise.reject(new VolumeError(type === C.NBD_CMD_WRITE || type === C.NBD_CMD_WRITE_ZEROES ? 'ENOSPC' : 'EINVAL',
        `range ${offset}+${length} past the end (${this.info.size})`));
    }
    if (this.inflight.size < this.maxInflight && this.waiting.length === 0) return this.send(type, flags, offset, length, buf);
    if (this.waiting.length >= this.maxQueued) {
      return Promise.reject(new VolumeError('EAGAIN', `nbd connection to ${this.address}: ${this.waiting.length} requests queued`));
    }
    return new Promise((resolve, reject) => {
      this.waiting.push(() => {
        if (this.phase !== 'ready') {
          reject(new VolumeError(this.phase === 'closed' && this.closeReason !== null && this.brokenByError ? 'EIO' : 'ESHUTDOWN',
            `nbd connection to ${this.address} is ${this.closeReason ?? 'closing'}`));
          return;
        }
        this.send(type, flags, offset, length, buf).then(resolve, reject);
      });
    });
  }

  private brokenByError = false;

  private send(type: number, flags: number, offset: number, length: number, buf: Buffer | null): Promise<unknown> {
    let handle = this.nextHandle;
    while (this.inflight.has(handle)) handle = (handle + 1) % TWO32;
    this.nextHandle = (handle + 1) % TWO32;
    return new Promise((resolve, reject) => {
      const req: Req = {
        handle, type, flags, offset, length, buf, sentAt: Date.now(), resolve, reject,
        error: null, covered: [], coveredBytes: 0, extents: null,
      };
      this.inflight.set(handle, req);
      // The header goes into the shared header buffer (no allocation per request).
      let h = this.hdr;
      let p = this.hdrPos;
      if (p + C.REQUEST_HEADER_SIZE > h.length) {
        this.closeRun();
        h = this.hdr = Buffer.allocUnsafeSlow(HEADER_BATCH);
        p = this.hdrPos = this.runStart = 0;
      }
      h.writeUInt32BE(C.REQUEST_MAGIC, p);
      h.writeUInt16BE(flags & 0xffff, p + 4);
      h.writeUInt16BE(type & 0xffff, p + 6);
      h.writeUInt32BE(0, p + 8);
      h.writeUInt32BE(handle, p + 12);
      h.writeUInt32BE(Math.floor(offset / TWO32), p + 16);
      h.writeUInt32BE(offset >>> 0, p + 20);
      h.writeUInt32BE(length, p + 24);
      this.hdrPos = p + C.REQUEST_HEADER_SIZE;
      if (type === C.NBD_CMD_WRITE && length > 0) {
        this.closeRun();
        this.out.push(buf!);
      }
      if (!this.flushQueued) {
        // Requests sent during this turn of the event loop leave in one writev, after every
        // socket that was readable in this turn has been handled (setImmediate runs after the
        // poll phase): a proxy (the daemon) turns N guest requests read from several sockets
        // into one syscall per node connection instead of one each. Measured in
        // bench/RESULTS-replicated.md.
        this.flushQueued = true;
        setImmediate(this.flushOut);
      }
      if (!this.sweepTimer) this.startSweep();
    });
  }

  /** Moves the headers written since the last run into `out` (one slice of the header buffer). */
  private closeRun(): void {
    if (this.hdrPos > this.runStart) {
      this.out.push(this.hdr.subarray(this.runStart, this.hdrPos));
      this.runStart = this.hdrPos;
    }
  }

  private readonly flushOut = (): void => {
    this.flushQueued = false;
    this.closeRun();
    const o = this.out;
    if (o.length === 0) return;
    this.out = [];
    if (this.phase === 'closed') return;
    const s = this.socket;
    if (o.length === 1) {
      s.write(o[0]!);
      return;
    }
    s.cork();
    for (const b of o) s.write(b);
    s.uncork();
  };

  private startSweep(): void {
    const period = Math.max(10, Math.min(1000, Math.floor(this.timeoutMs / 4)));
    this.sweepTimer = setInterval(this.sweep, period);
    this.sweepTimer.unref();
  }

  private readonly sweep = (): void => {
    // Map order is insertion order: the first entry is the oldest request in flight.
    const first = this.inflight.values().next();
    if (first.done) {
      if (this.sweepTimer) clearInterval(this.sweepTimer);
      this.sweepTimer = null;
      return;
    }
    const age = Date.now() - first.value.sentAt;
    if (age >= this.timeoutMs) {
      this.fail(`request ${C.commandName(first.value.type)} ${first.value.offset}+${first.value.length} unanswered after ${age} ms (timeout ${this.timeoutMs} ms)`, true);
    }
  };

  private complete(req: Req, error: VolumeError | null, value?: unknown): void {
    this.inflight.delete(req.handle);
    if (error) req.reject(error);
    else req.resolve(value);
    this.pump();
  }

  private pump(): void {
    while (this.waiting.length > 0 && this.inflight.size < this.maxInflight) this.waiting.shift()!();
    if (this.inflight.size === 0 && this.idleWaiters.length > 0) {
      const w = this.idleWaiters.splice(0);
      for (const f of w) f();
    }
  }

  // ------------------------------------------------------------------ ending

  /**
   * Bytes read into the connection's read buffer (a view of it, valid only during this call):
   * parsed at once — payloads are copied straight into the callers' buffers — and whatever is
   * left (a reply header or chunk cut by the read) is copied out before the buffer is reused.
   */
  private readonly onRead = (b: Buffer): void => {
    if (this.phase === 'closed') return;
    const q = this.q;
    q.push(b);
    this.processReplies();
    if (q.length > 0) q.push(q.takeAll()); // a copy: the read buffer is overwritten by the next read
  };

  private readonly onError = (e: Error): void => {
    this.log.debug({ err: e.message }, 'nbd client: socket error');
    if (this.phase !== 'closed') this.fail(`socket error: ${e.message}`, true);
  };

  private readonly onClose = (): void => {
    if (this.phase === 'closed') return;
    const graceful = this.phase === 'closing' && this.inflight.size === 0;
    this.fail(graceful ? (this.closeReason ?? 'closed') : 'the server closed the connection', !graceful);
  };

  /** Ends the connection: every pending request fails (EIO when `error`), 'close' is emitted once. */
  private fail(reason: string, error: boolean): void {
    if (this.phase === 'closed') return;
    this.phase = 'closed';
    this.brokenByError = error;
    this.closeReason = reason;
    if (error) this.log.warn({ reason, inflight: this.inflight.size, queued: this.waiting.length }, 'nbd client: connection broken');
    else this.log.debug({ reason }, 'nbd client: connection closed');
    if (this.sweepTimer) clearInterval(this.sweepTimer);
    this.sweepTimer = null;
    this.socket.destroy();
    const code: ErrnoCode = error ? 'EIO' : 'ESHUTDOWN';
    const reqs = [...this.inflight.values()];
    this.inflight.clear();
    for (const r of reqs) r.reject(new VolumeError(code, `nbd ${C.commandName(r.type)} to ${this.address}: ${reason}`));
    const w = this.waiting.splice(0);
    for (const f of w) f();
    const iw = this.idleWaiters.splice(0);
    for (const f of iw) f();
    this.emit('close', reason, error);
  }

  private protocolError(reason: string): void {
    this.fail(`protocol error: ${reason}`, true);
  }

  // ------------------------------------------------------------------ replies

  /** Parses and dispatches every complete reply (or chunk) in the queue. */
  private processReplies(): void {
    const q = this.q;
    while (this.phase !== 'closed') {
      const st = this.rx;
      switch (st.s) {
        case 'header': {
          if (!q.peek(4)) return;
          const magic = q.pb.readUInt32BE(q.po);
          if (magic === C.SIMPLE_REPLY_MAGIC) {
            if (!q.peek(C.SIMPLE_REPLY_SIZE)) return;
            const { pb: h, po } = q;
            const error = h.readUInt32BE(po + 4);
            const hi = h.readUInt32BE(po + 8);
            const lo = h.readUInt32BE(po + 12);
            q.skip(C.SIMPLE_REPLY_SIZE);
            this.onSimpleReply(error, hi, lo);
          } else if (magic === C.STRUCTURED_REPLY_MAGIC) {
            if (!q.peek(C.STRUCTURED_REPLY_HEADER_SIZE)) return;
            const { pb: h, po } = q;
            const flags = h.readUInt16BE(po + 4);
            const type = h.readUInt16BE(po + 6);
            const hi = h.readUInt32BE(po + 8);
            const lo = h.readUInt32BE(po + 12);
            const length = h.readUInt32BE(po + 16);
            q.skip(C.STRUCTURED_REPLY_HEADER_SIZE);
            this.onChunkHeader(flags, type, hi, lo, length);
          } else {
            this.protocolError(`bad reply magic 0x${magic.toString(16)}`);
            return;
          }
          break;
        }
        case 'simple-data': {
          const req = st.req;
          st.pos += q.drainInto(req.buf!, st.pos, req.length - st.pos);
          if (st.pos < req.length) return;
          this.rx = { s: 'header' };
          this.complete(req, null);
          break;
        }
        case 'data-offset': {
          if (!q.peek(8)) return;
          const off = codec.readU64(q.pb, q.po);
          q.skip(8);
          const req = st.req;
          const dataLen = st.length - 8;
          const why = this.claim(req, off, dataLen);
          if (why) {
            this.protocolError(`OFFSET_DATA ${off}+${dataLen}: ${why}`);
            return;
          }
          this.rx = { s: 'data', req, flags: st.flags, pos: off - req.offset, left: dataLen };
          break;
        }
        case 'data': {
          const n = q.drainInto(st.req.buf!, st.pos, st.left);
          st.pos += n;
          st.left -= n;
          if (st.left > 0) return;
          this.rx = { s: 'header' };
          this.chunkDone(st.req, st.flags);
          break;
        }
        case 'chunk': {
          const p = q.take(st.length);
          if (!p) return;
          this.rx = { s: 'header' };
          this.onChunkPayload(st.req, st.flags, st.type, p);
          break;
        }
      }
    }
  }

  private lookup(hi: number, lo: number, what: string): Req | null {
    const req = hi === 0 ? this.inflight.get(lo) : undefined;
    if (!req) {
      this.protocolError(`${what} for unknown handle 0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')}`);
      return null;
    }
    return req;
  }

  private onSimpleReply(error: number, hi: number, lo: number): void {
    const req = this.lookup(hi, lo, 'simple reply');
    if (!req) return;
    if (error !== 0) {
      this.complete(req, volumeErrorFromNbd(error, `${C.commandName(req.type)} ${req.offset}+${req.length} failed (error ${error})`));
      return;
    }
    if (req.type === C.NBD_CMD_READ) {
      if (this.info.structured) {
        this.protocolError('successful simple reply to READ although structured replies were negotiated');
        return;
      }
      if (req.length === 0) {
        this.complete(req, null);
        return;
      }
      this.rx = { s: 'simple-data', req, pos: 0 };
      return;
    }
    if (req.type === C.NBD_CMD_BLOCK_STATUS) {
      this.protocolError('successful simple reply to BLOCK_STATUS');
      return;
    }
    this.complete(req, null);
  }

  private onChunkHeader(flags: number, type: number, hi: number, lo: number, length: number): void {
    if (!this.info.structured) {
      this.protocolError('structured reply chunk although structured replies were not negotiated');
      return;
    }
    const req = this.lookup(hi, lo, `chunk type ${type}`);
    if (!req) return;
    const cmd = C.commandName(req.type);
    switch (type) {
      case C.NBD_REPLY_TYPE_OFFSET_DATA:
        if (req.type !== C.NBD_CMD_READ) return this.protocolError(`OFFSET_DATA chunk for ${cmd}`);
        if (length < 9 || length - 8 > req.length) return this.protocolError(`OFFSET_DATA chunk length ${length} for a read of ${req.length}`);
        this.rx = { s: 'data-offset', req, flags, length };
        return;
      case C.NBD_REPLY_TYPE_OFFSET_HOLE:
        if (req.type !== C.NBD_CMD_READ) return this.protocolError(`OFFSET_HOLE chunk for ${cmd}`);
        if (length !== 12) return this.protocolError(`OFFSET_HOLE chunk length ${length} (must be 12)`);
        break;
      case C.NBD_REPLY_TYPE_BLOCK_STATUS:
        if (req.type !== C.NBD_CMD_BLOCK_STATUS) return this.protocolError(`BLOCK_STATUS chunk for ${cmd}`);
        if (length < 12 || (length - 4) % 8 !== 0 || length > MAX_STATUS_CHUNK) return this.protocolError(`BLOCK_STATUS chunk length ${length}`);
        break;
      case C.NBD_REPLY_TYPE_NONE:
        if (length !== 0) return this.protocolError(`NONE chunk with length ${length}`);
        if ((flags & C.NBD_REPLY_FLAG_DONE) === 0) return this.protocolError('NONE chunk without DONE');
        break;
      default:
        if ((type & C.NBD_REPLY_TYPE_FLAG_ERROR) === 0) return this.protocolError(`unknown chunk type ${type} for ${cmd}`);
        if (length < 6 || length > MAX_ERROR_CHUNK) return this.protocolError(`error chunk length ${length}`);
    }
    this.rx = { s: 'chunk', req, flags, type, length };
  }

  /**
   * Checks that [off, off + len) lies inside the request and overlaps no earlier chunk, and
   * records it; returns why not, or null.
   */
  private claim(req: Req, off: number, len: number): string | null {
    if (off < req.offset || off + len > req.offset + req.length) return `outside the request ${req.offset}+${req.length}`;
    const start = off;
    const end = off + len;
    const iv = req.covered;
    // Binary search: first interval whose end > start.
    let lo = 0;
    let hi = iv.length;
    while (lo < hi) {
      const m = (lo + hi) >>> 1;
      if (iv[m]!.end <= start) lo = m + 1;
      else hi = m;
    }
    if (lo < iv.length && iv[lo]!.start < end) return 'overlaps an earlier chunk';
    // Insert, merging with touching neighbours (in-order replies keep the list at one entry).
    const prev = lo > 0 ? iv[lo - 1]! : null;
    const next = lo < iv.length ? iv[lo]! : null;
    if (prev && prev.end === start && next && next.start === end) {
      prev.end = next.end;
      iv.splice(lo, 1);
    } else if (prev && prev.end === start) prev.end = end;
    else if (next && next.start === end) next.start = start;
    else iv.splice(lo, 0, { start, end });
    req.coveredBytes += len;
    return null;
  }

  private onChunkPayload(req: Req, flags: number, type: number, p: Buffer): void {
    switch (type) {
      case C.NBD_REPLY_TYPE_OFFSET_HOLE: {
        const off = codec.readU64(p, 0);
        const len = p.readUInt32BE(8);
        if (len === 0) return this.protocolError('OFFSET_HOLE of length 0');
        const why = this.claim(req, off, len);
        if (why) return this.protocolError(`OFFSET_HOLE ${off}+${len}: ${why}`);
        req.buf!.fill(0, off - req.offset, off - req.offset + len);
        break;
      }
      case C.NBD_REPLY_TYPE_BLOCK_STATUS: {
        if (req.extents) return this.protocolError('second BLOCK_STATUS chunk for one request');
        const id = p.readUInt32BE(0);
        if (id !== this.info.baseAllocationId) return this.protocolError(`BLOCK_STATUS chunk for unknown context ${id}`);
        const extents: Extent[] = [];
        const end = req.offset + req.length;
        let pos = req.offset;
        for (let i = 4; i < p.length; i += 8) {
          const len = p.readUInt32BE(i);
          const st = p.readUInt32BE(i + 4);
          if (len === 0) return this.protocolError('BLOCK_STATUS extent of length 0');
          if (pos >= end) return this.protocolError('BLOCK_STATUS extents past the end of the request');
          if ((req.flags & C.NBD_CMD_FLAG_REQ_ONE) !== 0 && extents.length > 0) return this.protocolError('several extents despite REQ_ONE');
          const hole = (st & C.NBD_STATE_HOLE) !== 0;
          const zero = (st & C.NBD_STATE_ZERO) !== 0;
          // A hole that does not read as zeroes (backing file below) is reported as data:
          // a Volume never reports hole without zero.
          const e: Extent = { offset: pos, length: Math.min(len, end - pos), hole: hole && zero, zero };
          const last = extents[extents.length - 1];
          if (last && last.hole === e.hole && last.zero === e.zero) last.length += e.length;
          else extents.push(e);
          pos += e.length;
        }
        req.extents = extents;
        break;
      }
      case C.NBD_REPLY_TYPE_NONE:
        break;
      default: {
        // Error chunks (known or not): u32 error, u16 message length, message, [u64 offset].
        const err = p.readUInt32BE(0);
        const mlen = p.readUInt16BE(4);
        const extra = type === C.NBD_REPLY_TYPE_ERROR_OFFSET ? 8 : 0;
        if (type === C.NBD_REPLY_TYPE_ERROR || type === C.NBD_REPLY_TYPE_ERROR_OFFSET) {
          if (p.length !== 6 + mlen + extra) return this.protocolError(`error chunk length ${p.length} does not match its message length ${mlen}`);
        } else if (6 + mlen > p.length) return this.protocolError('error chunk message longer than the chunk');
        if (err === 0) return this.protocolError('error chunk with error value 0');
        const msg = codec.decodeString(p.subarray(6, 6 + mlen)) ?? '';
        if (extra) {
          const off = codec.readU64(p, 6 + mlen);
          if (off < req.offset || off >= req.offset + Math.max(req.length, 1)) {
            return this.protocolError(`ERROR_OFFSET at ${off} outside the request ${req.offset}+${req.length}`);
          }
        }
        if (!req.error) req.error = volumeErrorFromNbd(err, msg || `${C.commandName(req.type)} ${req.offset}+${req.length} failed (error ${err})`);
      }
    }
    this.chunkDone(req, flags);
  }

  private chunkDone(req: Req, flags: number): void {
    if ((flags & C.NBD_REPLY_FLAG_DONE) === 0) return;
    if (req.error) return this.complete(req, req.error);
    if (req.type === C.NBD_CMD_READ) {
      if (req.coveredBytes !== req.length) {
        this.protocolError(`read ${req.offset}+${req.length} done with ${req.coveredBytes} bytes covered`);
        return;
      }
      return this.complete(req, null);
    }
    if (req.type === C.NBD_CMD_BLOCK_STATUS) {
      if (!req.extents) return this.protocolError('BLOCK_STATUS done without a status chunk');
      return this.complete(req, null, req.extents);
    }
    this.complete(req, null);
  }
}

// ------------------------------------------------------------------------------------ handshake

/**
 * Where the bytes read into a connection's read buffer go: the handshake's queue (copied: the
 * handshake is short), then the connection's parser.
 */
interface ReadSink {
  sink: (view: Buffer) => void;
}

/** The negotiation phase, as a sequence of awaited reads over one socket. */
class Handshake {
  private socket: net.Socket | null = null;
  readonly reads: ReadSink = {
    sink: (b: Buffer) => {
      this.q.push(Buffer.from(b));
      this.wake();
    },
  };
  private readonly q = new ChunkQueue();
  private waiter: (() => void) | null = null;
  private failure: VolumeError | null = null;

  constructor(
    private readonly target: SocketAddress,
    private readonly addr: string,
    private readonly exportName: string,
    private readonly opts: NbdClientOptions,
    private readonly log: Logger,
  ) {}

  async run(timeoutMs: number): Promise<{ socket: net.Socket; q: ChunkQueue; info: NbdExportInfo }> {
    const timer = setTimeout(() => this.abort(new VolumeError('ETIMEDOUT', `nbd ${this.addr}: connect and handshake did not finish in ${timeoutMs} ms`)), timeoutMs);
    try {
      await this.connect();
      const info = await this.negotiate();
      const s = this.socket!;
      s.removeAllListeners('error');
      s.removeAllListeners('close');
      return { socket: s, q: this.q, info };
    } catch (e) {
      this.socket?.destroy();
      if (e instanceof VolumeError) throw e;
      throw new VolumeError('EIO', `nbd ${this.addr}: ${(e as Error).message}`, { cause: e });
    } finally {
      clearTimeout(timer);
    }
  }

  private abort(e: VolumeError): void {
    if (!this.failure) this.failure = e;
    this.socket?.destroy();
    this.wake();
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  private connect(): Promise<void> {
    return new Promise((resolve, reject) => {
      const t = this.target;
      const la = this.opts.localAddress;
      // Replies are read into one buffer per connection (onread): no allocation per read.
      const reads = this.reads;
      const onread = { buffer: Buffer.allocUnsafeSlow(READ_BUFFER), callback: (n: number, b: Buffer): boolean => {
        if (n > 0) reads.sink(b.subarray(0, n));
        return true;
      } };
      const s = 'unix' in t ? net.connect({ path: t.unix, onread }) : net.connect({ host: t.host, port: t.port, onread, ...(la ? { localAddress: la } : {}) });
      this.socket = s;
      if (!('unix' in t)) s.setNoDelay(true);
      const onErr = (e: NodeJS.ErrnoException): void => {
        reject(new VolumeError('EIO', `nbd ${this.addr}: cannot connect: ${e.code ?? e.message}`, { cause: e }));
      };
      s.once('error', onErr);
      s.once('connect', () => {
        s.removeListener('error', onErr);
        s.on('error', (e: Error) => this.abort(new VolumeError('EIO', `nbd ${this.addr}: socket error during handshake: ${e.message}`)));
        s.on('close', () => this.abort(new VolumeError('EIO', `nbd ${this.addr}: the server closed the connection during the handshake`)));
        resolve();
      });
      // A timeout abort before 'connect' destroys the socket: reject then too.
      s.once('close', () => reject(this.failure ?? new VolumeError('EIO', `nbd ${this.addr}: connection closed`)));
    });
  }

  /** Waits until n bytes are buffered. */
  private async need(n: number): Promise<void> {
    while (this.q.length < n) {
      if (this.failure) throw this.failure;
      await new Promise<void>((resolve) => (this.waiter = resolve));
    }
    if (this.failure) throw this.failure;
  }

  private async take(n: number): Promise<Buffer> {
    await this.need(n);
    // A copy: the view take() may return is of a socket chunk the queue lets go of.
    return Buffer.from(this.q.take(n)!);
  }

  private bad(reason: string): VolumeError {
    return new VolumeError('EIO', `nbd ${this.addr}: handshake: ${reason}`);
  }

  private sendOption(option: number, data?: Uint8Array): void {
    this.socket!.write(codec.encodeOption(option, data));
  }

  /** Reads one option reply to `option`. */
  private async optionReply(option: number): Promise<codec.OptionReply> {
    const h = await this.take(C.OPTION_REPLY_HEADER_SIZE);
    const r = codec.parseOptionReply(h, 0, MAX_OPTION_REPLY);
    if (r.kind === 'error') throw this.bad(r.reason);
    const len = h.readUInt32BE(16);
    const data = len > 0 ? await this.take(len) : Buffer.alloc(0);
    const opt = h.readUInt32BE(8);
    if (opt !== option) throw this.bad(`reply to option ${C.optionName(opt)} while waiting for ${C.optionName(option)}`);
    return { option: opt, type: h.readUInt32BE(12), data };
  }

  private optErrorText(rep: codec.OptionReply): string {
    const msg = codec.decodeString(rep.data) ?? '';
    const names: Record<number, string> = {
      [C.NBD_REP_ERR_UNSUP]: 'unsupported', [C.NBD_REP_ERR_POLICY]: 'refused by policy', [C.NBD_REP_ERR_INVALID]: 'invalid',
      [C.NBD_REP_ERR_PLATFORM]: 'unsupported on this platform', [C.NBD_REP_ERR_TLS_REQD]: 'TLS required',
      [C.NBD_REP_ERR_UNKNOWN]: 'unknown export', [C.NBD_REP_ERR_SHUTDOWN]: 'server shutting down',
      [C.NBD_REP_ERR_BLOCK_SIZE_REQD]: 'block size required', [C.NBD_REP_ERR_TOO_BIG]: 'too big',
    };
    const name = names[rep.type] ?? `error 0x${rep.type.toString(16)}`;
    return msg ? `${name} (${msg})` : name;
  }

  private async negotiate(): Promise<NbdExportInfo> {
    const g = codec.parseServerGreeting(await this.take(C.SERVER_GREETING_SIZE));
    if (g.kind !== 'ok') throw this.bad(g.kind === 'error' ? g.reason : 'short greeting');
    const hflags = g.value.handshakeFlags;
    if ((hflags & C.NBD_FLAG_FIXED_NEWSTYLE) === 0) throw this.bad('the server does not speak fixed newstyle');
    const noZeroes = (hflags & C.NBD_FLAG_NO_ZEROES) !== 0;
    this.socket!.write(codec.encodeClientFlags(C.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? C.NBD_FLAG_C_NO_ZEROES : 0)));

    // Structured replies.
    let structured = false;
    if (this.opts.structuredReplies ?? true) {
      this.sendOption(C.NBD_OPT_STRUCTURED_REPLY);
      const r = await this.optionReply(C.NBD_OPT_STRUCTURED_REPLY);
      if (r.type === C.NBD_REP_ACK) structured = true;
      else if (!codec.isOptionError(r.type)) throw this.bad(`unexpected reply ${r.type} to STRUCTURED_REPLY`);
    }

    // base:allocation.
    let baseAllocationId: number | null = null;
    if (structured && (this.opts.blockStatus ?? true)) {
      this.sendOption(C.NBD_OPT_SET_META_CONTEXT, codec.encodeMetaContextRequest(this.exportName, [C.BASE_ALLOCATION]));
      for (;;) {
        const r = await this.optionReply(C.NBD_OPT_SET_META_CONTEXT);
        if (r.type === C.NBD_REP_ACK) break;
        if (codec.isOptionError(r.type)) {
          if (r.type === C.NBD_REP_ERR_UNKNOWN) throw new VolumeError('ENOENT', `nbd ${this.addr}: export '${this.exportName}': ${this.optErrorText(r)}`);
          baseAllocationId = null;
          break;
        }
        if (r.type !== C.NBD_REP_META_CONTEXT) throw this.bad(`unexpected reply ${r.type} to SET_META_CONTEXT`);
        const m = codec.parseRepMetaContext(r.data);
        if (m.kind !== 'ok') throw this.bad(m.kind === 'error' ? m.reason : 'bad META_CONTEXT reply');
        if (m.value.name !== C.BASE_ALLOCATION) throw this.bad(`the server selected context '${m.value.name}' that was not asked for`);
        if (baseAllocationId !== null) throw this.bad('base:allocation selected twice');
        baseAllocationId = m.value.id;
      }
    }

    // GO (EXPORT_NAME when unknown).
    this.sendOption(C.NBD_OPT_GO, codec.encodeInfoRequest(this.exportName, [C.NBD_INFO_BLOCK_SIZE]));
    let size: number | null = null;
    let flags = 0;
    let blockSize: NbdExportInfo['blockSize'] = null;
    let via: NbdExportInfo['via'] = 'go';
    for (;;) {
      const r = await this.optionReply(C.NBD_OPT_GO);
      if (r.type === C.NBD_REP_ACK) break;
      if (codec.isOptionError(r.type)) {
        if (r.type === C.NBD_REP_ERR_UNSUP) {
          via = 'export-name';
          this.sendOption(C.NBD_OPT_EXPORT_NAME, Buffer.from(this.exportName, 'utf8'));
          const reply = await this.take(10 + (noZeroes ? 0 : C.EXPORT_NAME_PADDING));
          const p = codec.parseExportNameReply(reply, 0, noZeroes);
          if (p.kind !== 'ok') throw this.bad('short EXPORT_NAME reply');
          size = p.value.size;
          flags = p.value.flags;
          // Some servers send a reply to the NBD_INFO size under GO only; nothing else here.
          break;
        }
        const text = `export '${this.exportName}': ${this.optErrorText(r)}`;
        if (r.type === C.NBD_REP_ERR_UNKNOWN) throw new VolumeError('ENOENT', `nbd ${this.addr}: ${text}`);
        if (r.type === C.NBD_REP_ERR_TLS_REQD) throw new VolumeError('ENOTSUP', `nbd ${this.addr}: ${text}; TLS is not supported by this client`);
        if (r.type === C.NBD_REP_ERR_SHUTDOWN) throw new VolumeError('ESHUTDOWN', `nbd ${this.addr}: ${text}`);
        throw new VolumeError('EIO', `nbd ${this.addr}: ${text}`);
      }
      if (r.type !== C.NBD_REP_INFO) throw this.bad(`unexpected reply ${r.type} to GO`);
      const info = codec.parseInfo(r.data);
      if (info.kind !== 'ok') throw this.bad(info.kind === 'error' ? info.reason : 'bad INFO');
      const v = info.value;
      if (v.type === C.NBD_INFO_EXPORT) {
        size = v.size;
        flags = v.flags;
      } else if (v.type === C.NBD_INFO_BLOCK_SIZE) {
        blockSize = { minimum: v.minimum, preferred: v.preferred, maximum: v.maximum };
      }
    }
    if (size === null) throw this.bad('GO acknowledged without NBD_INFO_EXPORT');
    if (!Number.isSafeInteger(size) || size < 0) throw this.bad(`export size ${size} is not a usable number (>= 2^53)`);
    if ((flags & C.NBD_FLAG_HAS_FLAGS) === 0) flags = 0;
    if (blockSize) {
      const { minimum, preferred, maximum } = blockSize;
      const pow2 = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;
      if (!pow2(minimum) || minimum > 65536) throw this.bad(`block size minimum ${minimum} is not a power of two <= 64 KiB`);
      if (!pow2(preferred) || preferred < minimum) throw this.bad(`block size preferred ${preferred} invalid (minimum ${minimum})`);
      if (maximum !== 0xffffffff && (maximum < minimum || maximum % minimum !== 0)) {
        throw this.bad(`block size maximum ${maximum} invalid (minimum ${minimum})`);
      }
    }
    if (!structured) baseAllocationId = null;
    this.log.debug({ size, flags, blockSize, structured, baseAllocationId, via }, 'nbd client: handshake done');
    return { export: this.exportName, size, flags, structured, baseAllocationId, blockSize, via };
  }
}
