/**
 * One NBD client connection: the fixed-newstyle handshake, then the transmission phase.
 *
 * The socket is only a byte pipe: bytes go into a ChunkQueue, frames are parsed with the pure
 * codec, requests go to the export's OrderedVolume, and replies are written as they complete
 * (out of order). Backpressure: at `maxInflight` requests in flight, or when the client does
 * not read its replies, the socket is paused until requests complete / the socket drains.
 *
 * Hot path (READ): one Buffer per request holds the reply header followed by the data, the
 * volume reads straight into the data part, and one socket.write sends both.
 *
 * Receive path (WRITE): in transmission on a plain (not TLS) socket, the socket reads into one
 * buffer of this connection (READ_BUFFER, net's `onread` user buffer: no allocation per read;
 * the stream default is a fresh 64 KiB buffer per read, which with a copy of every write payload
 * kept the daemon's garbage collector at ~43 % of its time under 1 MiB writes), and each write's
 * payload is copied from it, as it arrives, into one buffer of the payload's size: the only copy.
 * Bytes still queued when a read has been handled (a partial header, requests held back while
 * paused) are copied out before the buffer is read into again. The handshake, and TLS, use the
 * stream's 'data' events as before.
 */
import { Socket, type SocketConstructorOpts } from 'node:net';
import * as tls from 'node:tls';
import { toVolumeError, type VolumeError } from '../block/errors.js';
import type { Volume } from '../block/volume.js';
import type { Logger } from '../log.js';
import * as codec from './codec.js';
import * as C from './constants.js';
import { native } from '../native/index.js';
import type { BufferPool } from './bufpool.js';
import { ChunkQueue } from './chunks.js';
import type { ServedExport } from './export.js';

// ------------------------------------------------------------------------------------ context

/**
 * Enlarges the kernel buffers of a client socket through the addon. Node exposes no
 * setsockopt; the descriptor is read from the socket's handle (an internal but long-stable
 * field). Best effort: without the addon or the fd, the kernel defaults stay.
 */
function setSocketBuffers(socket: Socket, bytes: number, log: Logger): void {
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) return;
  try {
    native().setSocketBuffers(fd, bytes, bytes);
  } catch (e) {
    log.debug({ err: (e as Error).message }, 'nbd: socket buffers left at the kernel default');
  }
}

export interface TlsSetup {
  context: tls.SecureContext;
  requireClientCert: boolean;
  mode: 'on' | 'require';
}

/** What a connection needs from its server (injected; no globals). */
export interface ConnectionHost {
  readonly logger: Logger;
  readonly tls: TlsSetup | undefined;
  readonly maxInflight: number;
  readonly handshakeTimeoutMs: number;
  readonly maxPayload: number;
  readonly sparseReadThreshold: number;
  readonly socketBufferBytes: number;
  /** Large read-reply buffers, reused once written. */
  readonly buffers: BufferPool;
  readonly shuttingDown: boolean;
  lookupExport(name: string): ServedExport | undefined;
  listExports(): ServedExport[];
  /** The connection entered transmission on `exp`. */
  attached(conn: Connection, exp: ServedExport): void;
  closed(conn: Connection): void;
}

/** Option data longer than this is not read into memory. */
export const MAX_OPTION_DATA = 64 * 1024;
/** Oversized option data up to this is read and discarded (NBD_REP_ERR_TOO_BIG); beyond, disconnect. */
export const MAX_OPTION_DISCARD = 16 * 1024 * 1024;
/** Unread replies queued on the socket above which the connection stops reading requests. */
const WRITE_HIGH_WATER = 64 * 1024 * 1024;
/**
 * Payload bytes (read buffers, write payloads) held by one connection's requests in flight
 * above which it stops reading new requests: 128 reads of 32 MiB must not pin 4 GiB.
 */
const INFLIGHT_BYTES_BUDGET = 64 * 1024 * 1024;
/** Context id of base:allocation when selected. */
export const BASE_ALLOCATION_ID = 1;
/** Most extents sent in one block-status reply. */
const MAX_DESCRIPTORS = 1 << 16;

type Phase = 'greeting' | 'options' | 'tls' | 'transmission' | 'disconnecting' | 'closed';

/** Bytes one socket read of a connection in transmission can bring (its user buffer). */
export const READ_BUFFER = 256 * 1024;

interface UserBufferHooks {
  kBuffer: symbol;
  kBufferCb: symbol;
  kBufferGen: symbol;
}
let hooks: UserBufferHooks | null | undefined;
/**
 * The properties through which net.Socket reads into a user buffer (its `onread` option, which
 * net.Server does not offer for accepted sockets), found on a socket made with that option; null
 * when this Node does not have them (the connection then keeps 'data' events).
 */
function userBufferHooks(): UserBufferHooks | null {
  if (hooks !== undefined) return hooks;
  hooks = null;
  try {
    const probe = new Socket({ onread: { buffer: Buffer.alloc(1), callback: () => true } } as SocketConstructorOpts);
    const by = new Map(Object.getOwnPropertySymbols(probe).map((k) => [k.description, k]));
    probe.destroy();
    const kBuffer = by.get('kBuffer');
    const kBufferCb = by.get('kBufferCb');
    const kBufferGen = by.get('kBufferGen');
    if (kBuffer && kBufferCb && kBufferGen) hooks = { kBuffer, kBufferCb, kBufferGen };
  } catch {
    /* no onread in this Node */
  }
  return hooks;
}

// ------------------------------------------------------------------------------------ Connection

export class Connection {
  readonly remote: string;
  private socket: Socket;
  private readonly log: Logger;
  private readonly q = new ChunkQueue();
  private phase: Phase = 'greeting';
  private timer: NodeJS.Timeout | null = null;

  // negotiated state
  private noZeroes = false;
  private tlsActive = false;
  private structured = false;
  /** Export name of the last successful SET_META_CONTEXT that selected base:allocation, or null. */
  private metaExport: string | null = null;
  /** The client requested NBD_INFO_BLOCK_SIZE with NBD_OPT_GO: it promised to honour the constraints. */
  private blockSizeAgreed = false;

  // transmission state
  exp: ServedExport | null = null;
  private flags = 0;
  inflight = 0;
  private paused = false;
  private draining = false;
  private pendingWrite: codec.RequestHeader | null = null;
  /** Reading into the user buffer (see the header): write payloads are copied as they arrive. */
  private userBuffer = false;
  /** The pending write's payload being filled (user-buffer mode), and how much is in. */
  private payload: Buffer | null = null;
  private payloadFill = 0;
  private pendingWriteError = 0;
  private discard = 0;
  private discardOption: { option: number } | null = null;
  private processing = false;
  private idleWaiters: Array<() => void> = [];
  private closeWaiters: Array<() => void> = [];

  constructor(
    socket: Socket,
    private readonly host: ConnectionHost,
    private readonly isTcp: boolean,
  ) {
    this.socket = socket;
    this.remote = isTcp ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix';
    this.log = host.logger.child({ client: this.remote });
    if (isTcp) socket.setNoDelay(true);
    if (host.socketBufferBytes > 0) setSocketBuffers(socket, host.socketBufferBytes, this.log);
    this.attach(socket);
    socket.on('close', this.onClose);
    this.timer = setTimeout(() => {
      if (this.phase !== 'transmission' && this.phase !== 'closed' && this.phase !== 'disconnecting') {
        this.log.warn({ timeoutMs: host.handshakeTimeoutMs }, 'nbd: handshake timed out');
        this.destroy();
      }
    }, host.handshakeTimeoutMs);
    this.timer.unref();
    this.log.debug('nbd: client connected');
    this.send(codec.encodeServerGreeting(C.NBD_FLAG_FIXED_NEWSTYLE | C.NBD_FLAG_NO_ZEROES));
  }

  get inTransmission(): boolean {
    return this.phase === 'transmission';
  }

  private attach(s: Socket): void {
    s.on('data', this.onData);
    s.on('error', this.onError);
    s.on('drain', this.onDrain);
  }

  private readonly onData = (chunk: Buffer): void => {
    this.q.push(chunk);
    this.process();
  };

  /** A read into the user buffer: handled now; what stays queued is copied out of it. */
  private readonly onRead = (n: number, buf: Buffer): boolean => {
    if (this.phase !== 'transmission') return true; // after DISC: nothing is a request any more
    const q = this.q;
    q.push(buf.subarray(0, n));
    this.process();
    // At most a partial header, or whole requests held back while paused: small, and rare.
    if (q.length > 0) q.push(q.takeAll());
    return !this.paused;
  };

  /**
   * Switches a plain socket to reading into one buffer of this connection (transmission only:
   * the handshake and TLS keep 'data' events). Does nothing when the socket or Node lacks it.
   */
  private useUserBuffer(): void {
    if (this.userBuffer || this.tlsActive || this.socket instanceof tls.TLSSocket) return;
    const h = userBufferHooks();
    const s = this.socket as unknown as Record<symbol, unknown> & { _handle?: { useUserBuffer?: (b: Buffer) => void } };
    if (!h || typeof s._handle?.useUserBuffer !== 'function') return;
    const buf = Buffer.allocUnsafeSlow(READ_BUFFER);
    s[h.kBuffer] = buf;
    s[h.kBufferCb] = this.onRead;
    s[h.kBufferGen] = null;
    s._handle.useUserBuffer(buf);
    this.socket.removeListener('data', this.onData);
    this.userBuffer = true;
  }

  /** Reading into the user buffer now (tests). */
  get readsIntoUserBuffer(): boolean {
    return this.userBuffer;
  }

  private readonly onError = (err: Error): void => {
    this.log.debug({ err: err.message }, 'nbd: socket error');
  };

  private readonly onDrain = (): void => {
    if (this.paused) this.maybeResume();
  };

  private readonly onClose = (): void => {
    if (this.phase === 'closed') return;
    this.phase = 'closed';
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.pendingWrite = null;
    this.payload = null;
    this.log.debug({ export: this.exp?.name, inflight: this.inflight }, 'nbd: client disconnected');
    this.host.closed(this);
    const w = this.closeWaiters;
    this.closeWaiters = [];
    for (const f of w) f();
  };

  /** Hard disconnect. */
  destroy(): void {
    this.socket.destroy();
    // A TLS socket destroys the raw one below it; 'close' fires on the one we listen to.
  }

  private protocolError(reason: string, extra?: Record<string, unknown>): void {
    this.log.warn({ ...extra, reason, phase: this.phase }, 'nbd: protocol error, disconnecting client');
    this.destroy();
  }

  /** Queues `b` on the socket; with `pooled`, `b` goes back to the buffer pool once written. */
  private send(b: Buffer, pooled = false): void {
    const s = this.socket;
    if (s.destroyed || !s.writable) {
      if (pooled) this.host.buffers.put(b);
      return;
    }
    // Replies completing in the same event-loop turn (many reads finishing together at high
    // queue depth) leave in one writev: cork on the first, uncork after the poll phase.
    if (!this.corked && this.phase === 'transmission') {
      this.corked = true;
      s.cork();
      setImmediate(this.uncork);
    }
    if (pooled) {
      // Written (or failed) when the callback runs: the kernel holds no reference to it then.
      const pool = this.host.buffers;
      s.write(b, () => pool.put(b));
    } else s.write(b);
  }

  private corked = false;
  private readonly uncork = (): void => {
    this.corked = false;
    this.socket.uncork();
  };

  // ------------------------------------------------------------------ control from the server

  /**
   * Stops serving: requests received from now on get ESHUTDOWN; resolves when none of this
   * connection's requests is in flight. Handshaking connections are dropped at once.
   */
  drain(): Promise<void> {
    if (this.phase !== 'transmission' && this.phase !== 'disconnecting') {
      this.destroy();
      return Promise.resolve();
    }
    this.draining = true;
    return this.whenIdle();
  }

  /** Ends the connection (TLS close_notify / FIN), destroying it if the client lingers. */
  terminate(): Promise<void> {
    if (this.phase === 'closed') return Promise.resolve();
    const p = new Promise<void>((resolve) => this.closeWaiters.push(resolve));
    this.socket.end();
    setTimeout(() => this.destroy(), 1000).unref();
    return p;
  }

  private whenIdle(): Promise<void> {
    if (this.inflight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  // ------------------------------------------------------------------ input loop

  private process(): void {
    if (this.processing) return;
    this.processing = true;
    try {
      for (;;) {
        const phase = this.phase;
        if (phase === 'transmission') {
          if (!this.stepTransmission()) break;
        } else if (phase === 'options') {
          if (!this.stepOption()) break;
        } else if (phase === 'greeting') {
          if (!this.stepGreeting()) break;
        } else break;
      }
    } finally {
      this.processing = false;
    }
  }

  private stepGreeting(): boolean {
    if (!this.q.peek(4)) return false;
    const flags = this.q.pb.readUInt32BE(this.q.po);
    this.q.skip(4);
    if ((flags & ~C.NBD_FLAG_C_KNOWN) !== 0) {
      this.protocolError('unknown client flags', { clientFlags: flags });
      return false;
    }
    if ((flags & C.NBD_FLAG_C_FIXED_NEWSTYLE) === 0) {
      this.protocolError('client does not speak fixed newstyle', { clientFlags: flags });
      return false;
    }
    this.noZeroes = (flags & C.NBD_FLAG_C_NO_ZEROES) !== 0;
    this.phase = 'options';
    return true;
  }

  // ------------------------------------------------------------------ options

  private stepOption(): boolean {
    const q = this.q;
    if (this.discardOption) {
      this.discard -= q.skipUpTo(this.discard);
      if (this.discard > 0) return false;
      const { option } = this.discardOption;
      this.discardOption = null;
      this.optError(option, C.NBD_REP_ERR_TOO_BIG, 'option data too long');
      return true;
    }
    if (!q.peek(C.OPTION_HEADER_SIZE)) return false;
    const h = codec.parseOptionHeader(q.pb, q.po);
    if (h.kind !== 'ok') {
      this.protocolError(h.kind === 'error' ? h.reason : 'short option header');
      return false;
    }
    const { option, length } = h.value;
    if (length > MAX_OPTION_DATA) {
      q.skip(C.OPTION_HEADER_SIZE);
      if (option === C.NBD_OPT_EXPORT_NAME || length > MAX_OPTION_DISCARD) {
        // EXPORT_NAME cannot carry an error; a huge payload is not worth draining.
        this.log.warn({ option: C.optionName(option), length }, 'nbd: oversized option, disconnecting');
        if (option !== C.NBD_OPT_EXPORT_NAME) this.optError(option, C.NBD_REP_ERR_TOO_BIG, 'option data too long');
        this.closeAfterWrite();
        return false;
      }
      this.log.warn({ option: C.optionName(option), length }, 'nbd: oversized option, discarding');
      this.discard = length;
      this.discardOption = { option };
      return true;
    }
    if (q.length < C.OPTION_HEADER_SIZE + length) return false;
    q.skip(C.OPTION_HEADER_SIZE);
    const data = q.take(length)!;
    return this.handleOption(option, data);
  }

  private optReply(option: number, type: number, data?: Uint8Array): void {
    this.send(codec.encodeOptionReply(option, type, data));
  }

  private optError(option: number, type: number, message: string): void {
    this.log.debug({ option: C.optionName(option), reply: type - C.NBD_REP_FLAG_ERROR, message }, 'nbd: option refused');
    this.send(codec.encodeOptionError(option, type, message));
  }

  private closeAfterWrite(): void {
    this.phase = 'disconnecting';
    this.socket.end();
    setTimeout(() => this.destroy(), 1000).unref();
  }

  /** Handles one complete option; false stops the input loop (phase changed to something async). */
  private handleOption(option: number, data: Buffer): boolean {
    const tlsCfg = this.isTcp ? this.host.tls : undefined;
    const tlsRequired = tlsCfg?.mode === 'require' && !this.tlsActive;

    if (option === C.NBD_OPT_ABORT) {
      this.optReply(option, C.NBD_REP_ACK);
      this.log.debug('nbd: client aborted negotiation');
      this.closeAfterWrite();
      return false;
    }
    if (option === C.NBD_OPT_EXPORT_NAME) {
      if (tlsRequired) {
        this.protocolError('NBD_OPT_EXPORT_NAME before STARTTLS on a TLS-only server');
        return false;
      }
      const r = codec.parseExportNameData(data);
      const exp = r.kind === 'ok' ? this.usableExport(r.value) : undefined;
      if (!exp) {
        // This option cannot carry an error: the spec says terminate.
        this.protocolError('NBD_OPT_EXPORT_NAME for an unknown export', { export: r.kind === 'ok' ? r.value : '<invalid>' });
        return false;
      }
      this.blockSizeAgreed = false;
      this.send(codec.encodeExportNameReply(exp.size, exp.transmissionFlags(this.structured), this.noZeroes));
      this.enterTransmission(exp, r.kind === 'ok' ? r.value : '');
      return true;
    }
    if (this.host.shuttingDown) {
      this.optError(option, C.NBD_REP_ERR_SHUTDOWN, 'server is shutting down');
      return true;
    }
    if (option === C.NBD_OPT_STARTTLS) {
      if (data.length !== 0) this.optError(option, C.NBD_REP_ERR_INVALID, 'STARTTLS takes no data');
      else if (!tlsCfg) this.optError(option, C.NBD_REP_ERR_POLICY, 'TLS is not offered on this listener');
      else if (this.tlsActive) this.optError(option, C.NBD_REP_ERR_INVALID, 'TLS is already active');
      else {
        this.startTls(tlsCfg);
        return false;
      }
      return true;
    }
    if (tlsRequired) {
      this.optError(option, C.NBD_REP_ERR_TLS_REQD, 'TLS is required: send NBD_OPT_STARTTLS first');
      return true;
    }
    switch (option) {
      case C.NBD_OPT_LIST:
        if (data.length !== 0) {
          this.optError(option, C.NBD_REP_ERR_INVALID, 'LIST takes no data');
          return true;
        }
        for (const e of this.host.listExports()) {
          if (!e.closing) this.optReply(option, C.NBD_REP_SERVER, codec.encodeRepServer(e.name, e.description));
        }
        this.optReply(option, C.NBD_REP_ACK);
        return true;
      case C.NBD_OPT_INFO:
      case C.NBD_OPT_GO:
        return this.handleInfoGo(option, data);
      case C.NBD_OPT_STRUCTURED_REPLY:
        if (data.length !== 0) this.optError(option, C.NBD_REP_ERR_INVALID, 'STRUCTURED_REPLY takes no data');
        else {
          this.structured = true;
          this.optReply(option, C.NBD_REP_ACK);
        }
        return true;
      case C.NBD_OPT_LIST_META_CONTEXT:
      case C.NBD_OPT_SET_META_CONTEXT:
        this.handleMetaContext(option, data);
        return true;
      default:
        this.optError(option, C.NBD_REP_ERR_UNSUP, `option ${option} is not supported`);
        return true;
    }
  }

  private usableExport(name: string): ServedExport | undefined {
    const e = this.host.lookupExport(name);
    return e && !e.closing ? e : undefined;
  }

  private handleInfoGo(option: number, data: Buffer): boolean {
    const r = codec.parseInfoRequest(data);
    if (r.kind !== 'ok') {
      this.optError(option, C.NBD_REP_ERR_INVALID, r.kind === 'error' ? r.reason : 'malformed');
      return true;
    }
    const { name, infos } = r.value;
    const exp = this.usableExport(name);
    if (!exp) {
      this.optError(option, C.NBD_REP_ERR_UNKNOWN, `no export named '${name}'`);
      return true;
    }
    const flags = exp.transmissionFlags(this.structured);
    this.optReply(option, C.NBD_REP_INFO, codec.encodeInfoExport(exp.size, flags));
    this.optReply(option, C.NBD_REP_INFO, codec.encodeInfoString(C.NBD_INFO_NAME, exp.name));
    if (exp.description !== '') this.optReply(option, C.NBD_REP_INFO, codec.encodeInfoString(C.NBD_INFO_DESCRIPTION, exp.description));
    const l = exp.limits;
    this.optReply(option, C.NBD_REP_INFO, codec.encodeInfoBlockSize(l.minimum, l.preferred, l.maximum));
    this.optReply(option, C.NBD_REP_ACK);
    if (option === C.NBD_OPT_GO) {
      this.blockSizeAgreed = infos.includes(C.NBD_INFO_BLOCK_SIZE);
      this.enterTransmission(exp, name);
    }
    return true;
  }

  private handleMetaContext(option: number, data: Buffer): void {
    const set = option === C.NBD_OPT_SET_META_CONTEXT;
    // SET replaces the selection even when it fails.
    if (set) this.metaExport = null;
    if (!this.structured) {
      this.optError(option, C.NBD_REP_ERR_INVALID, 'negotiate NBD_OPT_STRUCTURED_REPLY first');
      return;
    }
    const r = codec.parseMetaContextRequest(data);
    if (r.kind !== 'ok') {
      this.optError(option, C.NBD_REP_ERR_INVALID, r.kind === 'error' ? r.reason : 'malformed');
      return;
    }
    const { name, queries } = r.value;
    if (!this.usableExport(name)) {
      this.optError(option, C.NBD_REP_ERR_UNKNOWN, `no export named '${name}'`);
      return;
    }
    let match = !set && queries.length === 0;
    for (const q of queries) {
      const colon = q.indexOf(':');
      if (colon <= 0) {
        this.optError(option, C.NBD_REP_ERR_INVALID, `query '${q}' lacks a namespace`);
        return;
      }
      if (q === C.BASE_ALLOCATION) match = true;
      else if (q === 'base:' && !set) match = true; // wildcard only for LIST
      // Unknown namespaces and unknown base: leaves are ignored, as the spec requires.
    }
    if (match) {
      this.optReply(option, C.NBD_REP_META_CONTEXT, codec.encodeRepMetaContext(set ? BASE_ALLOCATION_ID : 0, C.BASE_ALLOCATION));
      if (set) this.metaExport = name;
    }
    this.optReply(option, C.NBD_REP_ACK);
  }

  private startTls(cfg: TlsSetup): void {
    this.phase = 'tls';
    const raw = this.socket;
    raw.removeListener('data', this.onData);
    raw.pause();
    // The client must wait for our ACK before its ClientHello; anything it sent early is handed
    // back to the socket, and TLSSocket reads what the raw socket buffered.
    if (this.q.length > 0) raw.unshift(this.q.takeAll());
    raw.write(codec.encodeOptionReply(C.NBD_OPT_STARTTLS, C.NBD_REP_ACK), (err) => {
      if (err || this.phase !== 'tls') return;
      raw.removeListener('error', this.onError);
      raw.removeListener('drain', this.onDrain);
      raw.on('error', () => {}); // errors surface on the TLS socket
      const t = new tls.TLSSocket(raw, {
        isServer: true,
        secureContext: cfg.context,
        requestCert: cfg.requireClientCert,
        rejectUnauthorized: cfg.requireClientCert,
      });
      this.socket = t;
      t.on('error', (e: Error) => {
        this.log.warn({ err: e.message }, 'nbd: TLS error, disconnecting client');
        this.destroy();
      });
      t.on('close', this.onClose);
      t.once('secure', () => {
        if (this.phase !== 'tls') return;
        // STARTTLS resets every negotiated state.
        this.structured = false;
        this.metaExport = null;
        this.tlsActive = true;
        this.phase = 'options';
        this.log.debug({ protocol: t.getProtocol() }, 'nbd: TLS established');
        t.on('data', this.onData);
        t.on('drain', this.onDrain);
        this.process();
      });
    });
  }

  private enterTransmission(exp: ServedExport, name: string): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.exp = exp;
    this.flags = exp.transmissionFlags(this.structured);
    if (this.metaExport !== name) this.metaExport = null;
    this.phase = 'transmission';
    this.useUserBuffer();
    this.host.attached(this, exp);
    this.log.info(
      { export: exp.name, structured: this.structured, tls: this.tlsActive, flags: this.flags },
      'nbd: client entered transmission',
    );
  }

  // ------------------------------------------------------------------ transmission

  /** One step of the request loop; false when it must wait for bytes (or stop). */
  private stepTransmission(): boolean {
    const q = this.q;
    if (this.discard > 0) {
      this.discard -= q.skipUpTo(this.discard);
      if (this.discard > 0) return false;
      const r = this.pendingWrite;
      if (r) {
        this.pendingWrite = null;
        this.replyError(r, this.pendingWriteError, 'invalid write request');
      }
      return true;
    }
    const pw = this.pendingWrite;
    if (pw) {
      let payload: Buffer | null;
      if (this.userBuffer) {
        // Straight into a buffer of its own: the queued bytes are views of the read buffer.
        payload = this.payload ??= pw.length >= 64 * 1024 ? Buffer.allocUnsafeSlow(pw.length) : Buffer.allocUnsafe(pw.length);
        this.payloadFill += q.drainInto(payload, this.payloadFill, pw.length - this.payloadFill);
        if (this.payloadFill < pw.length) return false;
        this.payload = null;
        this.payloadFill = 0;
      } else {
        payload = q.take(pw.length);
        if (!payload) return false;
      }
      this.pendingWrite = null;
      this.doWrite(pw, payload);
      return true;
    }
    if (this.mustPause()) {
      this.paused = true;
      this.socket.pause();
      return false;
    }
    if (!q.peek(C.REQUEST_HEADER_SIZE)) return false;
    const b = q.pb;
    const o = q.po;
    if (b.readUInt32BE(o) !== C.REQUEST_MAGIC) {
      this.protocolError('bad request magic', { magic: b.readUInt32BE(o) });
      return false;
    }
    const r: codec.RequestHeader = {
      flags: b.readUInt16BE(o + 4),
      type: b.readUInt16BE(o + 6),
      handleHi: b.readUInt32BE(o + 8),
      handleLo: b.readUInt32BE(o + 12),
      offset: codec.readU64(b, o + 16),
      length: b.readUInt32BE(o + 24),
    };
    q.skip(C.REQUEST_HEADER_SIZE);
    return this.handleRequest(r);
  }

  private maybeResume(): void {
    if (!this.paused || this.phase !== 'transmission') return;
    if (this.mustPause()) return;
    this.paused = false;
    this.socket.resume();
    this.process();
  }

  private mustPause(): boolean {
    return (
      this.inflight >= this.host.maxInflight ||
      this.inflightBytes >= INFLIGHT_BYTES_BUDGET ||
      this.socket.writableLength > WRITE_HIGH_WATER
    );
  }

  private inflightBytes = 0;

  private begin(bytes = 0): void {
    this.inflight++;
    this.inflightBytes += bytes;
    this.exp!.begin();
  }

  private end(bytes = 0): void {
    this.inflight--;
    this.inflightBytes -= bytes;
    this.exp!.end();
    if (this.inflight === 0) {
      if (this.idleWaiters.length > 0) {
        const w = this.idleWaiters;
        this.idleWaiters = [];
        for (const f of w) f();
      }
      if (this.phase === 'disconnecting' && this.socket.writable) this.finishDisconnect();
    }
    if (this.paused) this.maybeResume();
  }

  private finishDisconnect(): void {
    this.socket.end();
    setTimeout(() => this.destroy(), 1000).unref();
  }

  /** Validation of a request's range; 0 when valid, else the NBD error. */
  private checkRange(r: codec.RequestHeader, pastEnd: number, maxLen: boolean): number {
    const exp = this.exp!;
    if (maxLen && r.length > exp.limits.maximum) return C.NBD_EINVAL;
    if (r.offset + r.length > exp.size) return pastEnd;
    if (this.blockSizeAgreed) {
      const m = exp.limits.minimum;
      if (m > 1 && (r.offset % m !== 0 || r.length % m !== 0)) return C.NBD_EINVAL;
    }
    return 0;
  }

  private handleRequest(r: codec.RequestHeader): boolean {
    const exp = this.exp!;
    const type = r.type;
    const flags = r.flags;
    const tf = this.flags;
    if (type === C.NBD_CMD_DISC) {
      this.phase = 'disconnecting';
      // Stream mode: paused (its EOF still arrives). A user-buffer socket keeps reading (bytes
      // after DISC are dropped in onRead) so that the client's FIN is seen and the socket closes.
      if (!this.userBuffer) this.socket.pause();
      this.log.debug({ inflight: this.inflight }, 'nbd: client sent DISC');
      if (this.inflight === 0) this.finishDisconnect();
      return false;
    }
    if (type === C.NBD_CMD_WRITE && r.length > this.host.maxPayload) {
      this.protocolError('write payload larger than the hard cap', { length: r.length, cap: this.host.maxPayload });
      return false;
    }
    if (this.draining || exp.closing) {
      if (type === C.NBD_CMD_WRITE) return this.rejectWrite(r, C.NBD_ESHUTDOWN);
      return this.reject(r, C.NBD_ESHUTDOWN, 'server is shutting down');
    }
    // A read-only export refuses every write-like command first, whatever its flags.
    if (exp.readOnly && (type === C.NBD_CMD_WRITE || type === C.NBD_CMD_TRIM || type === C.NBD_CMD_WRITE_ZEROES)) {
      if (type === C.NBD_CMD_WRITE) return this.rejectWrite(r, C.NBD_EPERM);
      return this.reject(r, C.NBD_EPERM, 'export is read-only');
    }
    // FUA is valid on every command once advertised; never when not.
    if ((flags & C.NBD_CMD_FLAG_FUA) !== 0 && (tf & C.NBD_FLAG_SEND_FUA) === 0) {
      if (type === C.NBD_CMD_WRITE) return this.rejectWrite(r, C.NBD_EINVAL);
      return this.reject(r, C.NBD_EINVAL, 'FUA not negotiated');
    }
    let err = 0;
    switch (type) {
      case C.NBD_CMD_READ: {
        if ((flags & ~(C.NBD_CMD_FLAG_FUA | C.NBD_CMD_FLAG_DF)) !== 0) return this.reject(r, C.NBD_EINVAL, 'invalid flags for READ');
        if ((flags & C.NBD_CMD_FLAG_DF) !== 0 && !this.structured) return this.reject(r, C.NBD_EINVAL, 'DF without structured replies');
        err = this.checkRange(r, C.NBD_EINVAL, true);
        if (err) return this.reject(r, err, 'read out of range or too large');
        this.doRead(r);
        return true;
      }
      case C.NBD_CMD_WRITE: {
        if ((flags & ~C.NBD_CMD_FLAG_FUA) !== 0) err = C.NBD_EINVAL;
        else if (exp.readOnly) err = C.NBD_EPERM;
        else err = this.checkRange(r, C.NBD_ENOSPC, true);
        if (err) return this.rejectWrite(r, err);
        this.pendingWrite = r;
        return true;
      }
      case C.NBD_CMD_FLUSH: {
        if ((flags & ~C.NBD_CMD_FLAG_FUA) !== 0) return this.reject(r, C.NBD_EINVAL, 'invalid flags for FLUSH');
        if ((tf & C.NBD_FLAG_SEND_FLUSH) === 0) return this.reject(r, C.NBD_EINVAL, 'FLUSH not negotiated');
        if (r.offset !== 0 || r.length !== 0) return this.reject(r, C.NBD_EINVAL, 'FLUSH offset and length must be 0');
        this.run(r, exp.volume.flush());
        return true;
      }
      case C.NBD_CMD_TRIM: {
        if ((flags & ~C.NBD_CMD_FLAG_FUA) !== 0) return this.reject(r, C.NBD_EINVAL, 'invalid flags for TRIM');
        if (exp.readOnly) return this.reject(r, C.NBD_EPERM, 'export is read-only');
        if ((tf & C.NBD_FLAG_SEND_TRIM) === 0) return this.reject(r, C.NBD_EINVAL, 'TRIM not negotiated');
        err = this.checkRange(r, C.NBD_EINVAL, false);
        if (err) return this.reject(r, err, 'trim out of range');
        if (r.length === 0) return this.ok(r);
        const fua = (flags & C.NBD_CMD_FLAG_FUA) !== 0;
        this.run(r, this.withFua(exp, 'trim', r.offset, r.length, fua, (v) => v.trim(r.offset, r.length, { fua })));
        return true;
      }
      case C.NBD_CMD_CACHE: {
        if ((flags & ~C.NBD_CMD_FLAG_FUA) !== 0) return this.reject(r, C.NBD_EINVAL, 'invalid flags for CACHE');
        err = this.checkRange(r, C.NBD_EINVAL, true);
        if (err) return this.reject(r, err, 'cache out of range or too large');
        if (r.length === 0 || !exp.volume.caps.prefetch) return this.ok(r);
        this.run(r, exp.volume.prefetch(r.offset, r.length));
        return true;
      }
      case C.NBD_CMD_WRITE_ZEROES: {
        const known = C.NBD_CMD_FLAG_FUA | C.NBD_CMD_FLAG_NO_HOLE | C.NBD_CMD_FLAG_FAST_ZERO;
        if ((flags & ~known) !== 0) return this.reject(r, C.NBD_EINVAL, 'invalid flags for WRITE_ZEROES');
        const fast = (flags & C.NBD_CMD_FLAG_FAST_ZERO) !== 0;
        if (exp.readOnly) return this.reject(r, C.NBD_EPERM, 'export is read-only');
        if (fast && (tf & C.NBD_FLAG_SEND_FAST_ZERO) === 0) return this.reject(r, C.NBD_EINVAL, 'FAST_ZERO not negotiated');
        err = this.checkRange(r, C.NBD_ENOSPC, !fast);
        if (err) return this.reject(r, err, 'write zeroes out of range or too large');
        if (r.length === 0) return this.ok(r);
        const fua = (flags & C.NBD_CMD_FLAG_FUA) !== 0;
        const opts = { fua, fastZero: fast, mayTrim: (flags & C.NBD_CMD_FLAG_NO_HOLE) === 0 };
        this.run(r, this.withFua(exp, 'zero', r.offset, r.length, fua, (v) => v.writeZeroes(r.offset, r.length, opts)));
        return true;
      }
      case C.NBD_CMD_BLOCK_STATUS: {
        if (!this.structured || this.metaExport === null) return this.reject(r, C.NBD_EINVAL, 'no metadata context negotiated');
        if ((flags & ~(C.NBD_CMD_FLAG_FUA | C.NBD_CMD_FLAG_REQ_ONE)) !== 0) return this.reject(r, C.NBD_EINVAL, 'invalid flags for BLOCK_STATUS');
        if (r.length === 0) return this.reject(r, C.NBD_EINVAL, 'BLOCK_STATUS of length 0');
        err = this.checkRange(r, C.NBD_EINVAL, false);
        if (err) return this.reject(r, err, 'block status out of range');
        this.doBlockStatus(r);
        return true;
      }
      default:
        return this.reject(r, C.NBD_EINVAL, `unknown command ${type}`);
    }
  }

  /**
   * A write-like call with FUA: passed down when the volume honours FUA, else emulated by a
   * flush right after it inside the same ordered operation.
   */
  private withFua(
    exp: ServedExport, _what: string, offset: number, length: number, fua: boolean, fn: (v: Volume) => Promise<void>,
  ): Promise<void> {
    const caps = exp.volume.caps;
    if (!fua || caps.fua || !caps.flush) return exp.volume.run('write', offset, length, fn);
    return exp.volume.run('write', offset, length, async (v) => {
      await fn(v);
      await v.flush();
    });
  }

  private doWrite(r: codec.RequestHeader, payload: Buffer): void {
    const exp = this.exp!;
    if (this.draining || exp.closing) {
      this.replyError(r, C.NBD_ESHUTDOWN, 'server is shutting down');
      return;
    }
    if (r.length === 0) {
      this.ok(r);
      return;
    }
    const fua = (r.flags & C.NBD_CMD_FLAG_FUA) !== 0;
    this.begin(r.length);
    this.withFua(exp, 'write', r.offset, r.length, fua, (v) => v.write(r.offset, payload, { fua })).then(
      () => {
        exp.counters.writes++;
        exp.counters.bytesWritten += r.length;
        this.send(codec.encodeSimpleReply(0, r.handleHi, r.handleLo));
        this.end(r.length);
      },
      (e: unknown) => {
        this.replyVolumeError(r, e);
        this.end(r.length);
      },
    );
  }

  private doRead(r: codec.RequestHeader): void {
    const exp = this.exp!;
    const len = r.length;
    if (len === 0) {
      this.ok(r);
      return;
    }
    const structured = this.structured;
    const df = (r.flags & C.NBD_CMD_FLAG_DF) !== 0;
    const th = this.host.sparseReadThreshold;
    if (structured && !df && len >= th && exp.volume.caps.blockStatus) {
      this.doSparseRead(r);
      return;
    }
    // Reply header and data in one buffer: the volume fills the data part, one write sends all.
    const prefix = structured ? C.OFFSET_DATA_PREFIX : C.SIMPLE_REPLY_SIZE;
    const buf = this.host.buffers.get(prefix + len);
    this.begin(r.length);
    exp.volume.read(r.offset, buf.subarray(prefix)).then(
      () => {
        if (structured) codec.writeOffsetDataPrefix(buf, 0, C.NBD_REPLY_FLAG_DONE, r.handleHi, r.handleLo, r.offset, len);
        else codec.writeSimpleReply(buf, 0, 0, r.handleHi, r.handleLo);
        exp.counters.reads++;
        exp.counters.bytesRead += len;
        this.send(buf, true);
        this.end(r.length);
      },
      (e: unknown) => {
        // Not pooled again: a layer below may have failed while still writing into it.
        this.replyVolumeError(r, e, r.offset);
        this.end(r.length);
      },
    );
  }

  /** Structured read that sends zero extents as OFFSET_HOLE chunks and reads only the data. */
  private doSparseRead(r: codec.RequestHeader): void {
    const exp = this.exp!;
    const start = r.offset;
    const end = r.offset + r.length;
    this.begin(r.length);
    exp.volume
      .run('read', start, r.length, async (v) => {
        const segs: Array<{ offset: number; length: number; zero: boolean }> = [];
        let pos = start;
        while (pos < end) {
          const extents = await v.blockStatus(pos, end - pos);
          let progressed = false;
          for (const e of extents) {
            if (e.offset !== pos || !(e.length > 0)) break;
            const len = Math.min(e.length, end - pos);
            const last = segs[segs.length - 1];
            if (last && last.zero === e.zero) last.length += len;
            else segs.push({ offset: pos, length: len, zero: e.zero });
            pos += len;
            progressed = true;
            if (pos >= end) break;
          }
          if (!progressed) {
            // Nothing usable: the rest is data.
            const last = segs[segs.length - 1];
            if (last && !last.zero) last.length += end - pos;
            else segs.push({ offset: pos, length: end - pos, zero: false });
            pos = end;
          }
        }
        const data = segs.filter((s) => !s.zero);
        const pool = this.host.buffers;
        const bufs = data.map((s) => pool.get(C.OFFSET_DATA_PREFIX + s.length));
        // On failure the buffers are not pooled again: a sibling read may still be filling one.
        await Promise.all(data.map((s, i) => v.read(s.offset, bufs[i]!.subarray(C.OFFSET_DATA_PREFIX))));
        return { segs, bufs };
      })
      .then(
        ({ segs, bufs }) => {
          const s = this.socket;
          const writable = !s.destroyed && s.writable;
          if (writable) s.cork();
          let di = 0;
          for (let i = 0; i < segs.length; i++) {
            const seg = segs[i]!;
            const fl = i === segs.length - 1 ? C.NBD_REPLY_FLAG_DONE : 0;
            if (seg.zero) this.send(codec.encodeOffsetHole(fl, r.handleHi, r.handleLo, seg.offset, seg.length));
            else {
              const b = bufs[di++]!;
              codec.writeOffsetDataPrefix(b, 0, fl, r.handleHi, r.handleLo, seg.offset, seg.length);
              this.send(b, true);
            }
          }
          if (writable) s.uncork();
          exp.counters.reads++;
          exp.counters.bytesRead += r.length;
          this.end(r.length);
        },
        (e: unknown) => {
          this.replyVolumeError(r, e, r.offset);
          this.end(r.length);
        },
      );
  }

  private doBlockStatus(r: codec.RequestHeader): void {
    const exp = this.exp!;
    const vol = exp.volume;
    const reqOne = (r.flags & C.NBD_CMD_FLAG_REQ_ONE) !== 0;
    this.begin();
    const p = vol.caps.blockStatus ? vol.blockStatus(r.offset, r.length) : Promise.resolve([]);
    p.then(
      (extents) => {
        const descs: codec.StatusDescriptor[] = [];
        let pos = r.offset;
        const end = r.offset + r.length;
        for (const e of extents) {
          if (e.offset !== pos || !(e.length > 0) || pos >= end) break;
          const len = Math.min(e.length, end - pos);
          const fl = (e.hole ? C.NBD_STATE_HOLE : 0) | (e.zero ? C.NBD_STATE_ZERO : 0);
          const last = descs[descs.length - 1];
          if (last && last.flags === fl) last.length += len;
          else {
            if (descs.length >= MAX_DESCRIPTORS) break;
            descs.push({ length: len, flags: fl });
          }
          pos += len;
        }
        // Nothing usable (or a volume without block status): all of it is data, status 0.
        if (descs.length === 0) descs.push({ length: r.length, flags: 0 });
        if (reqOne) descs.length = 1;
        this.send(codec.encodeBlockStatusChunk(C.NBD_REPLY_FLAG_DONE, r.handleHi, r.handleLo, BASE_ALLOCATION_ID, descs));
        this.end();
      },
      (e: unknown) => {
        this.replyVolumeError(r, e, r.offset);
        this.end();
      },
    );
  }

  /** Runs a volume call whose success reply is a bare acknowledgement. */
  private run(r: codec.RequestHeader, p: Promise<void>): void {
    this.begin();
    p.then(
      () => {
        this.send(codec.encodeSimpleReply(0, r.handleHi, r.handleLo));
        this.end();
      },
      (e: unknown) => {
        this.replyVolumeError(r, e, r.length > 0 ? r.offset : undefined);
        this.end();
      },
    );
  }

  private ok(r: codec.RequestHeader): boolean {
    if (this.structured && r.type === C.NBD_CMD_READ) this.send(codec.encodeNoneChunk(r.handleHi, r.handleLo));
    else this.send(codec.encodeSimpleReply(0, r.handleHi, r.handleLo));
    return true;
  }

  /** A WRITE that fails validation: its payload is consumed (to stay in sync), then answered. */
  private rejectWrite(r: codec.RequestHeader, err: number): boolean {
    if (r.length === 0) return this.reject(r, err, 'invalid write request');
    this.pendingWrite = r;
    this.pendingWriteError = err;
    this.discard = r.length;
    return true;
  }

  private reject(r: codec.RequestHeader, err: number, message: string): boolean {
    this.replyError(r, err, message);
    return true;
  }

  private replyError(r: codec.RequestHeader, err: number, message: string, offset?: number): void {
    const exp = this.exp;
    if (exp) exp.counters.errors++;
    this.log.debug({ cmd: C.commandName(r.type), offset: r.offset, length: r.length, flags: r.flags, err, message }, 'nbd: request failed');
    if (this.structured) {
      const withOffset = offset !== undefined && ERROR_OFFSET_COMMANDS.has(r.type);
      this.send(codec.encodeErrorChunk(C.NBD_REPLY_FLAG_DONE, r.handleHi, r.handleLo, err, message, withOffset ? offset : undefined));
    } else this.send(codec.encodeSimpleReply(err, r.handleHi, r.handleLo));
  }

  private replyVolumeError(r: codec.RequestHeader, e: unknown, offset?: number): void {
    const ve = toVolumeError(e);
    this.replyError(r, nbdErrno(ve, r.type, r.flags), ve.message, offset);
  }
}

const ERROR_OFFSET_COMMANDS = new Set([
  C.NBD_CMD_READ, C.NBD_CMD_WRITE, C.NBD_CMD_TRIM, C.NBD_CMD_CACHE, C.NBD_CMD_WRITE_ZEROES, C.NBD_CMD_BLOCK_STATUS,
]);

/**
 * The NBD error for a volume error. The wire allows EPERM, EIO, ENOMEM, EINVAL, ENOSPC,
 * EOVERFLOW, ENOTSUP and ESHUTDOWN; the spec reserves ENOTSUP for a FAST_ZERO write-zeroes and
 * EOVERFLOW for READ, so elsewhere those become EINVAL. Anything unknown is EIO.
 */
export function nbdErrno(e: VolumeError, cmd: number, flags: number): number {
  switch (e.code) {
    case 'EPERM':
    case 'EROFS':
    case 'EACCES':
      return C.NBD_EPERM;
    case 'EIO':
      return C.NBD_EIO;
    case 'ENOMEM':
      return C.NBD_ENOMEM;
    case 'EINVAL':
      return C.NBD_EINVAL;
    case 'ENOSPC':
    case 'EFBIG':
      return C.NBD_ENOSPC;
    case 'EOVERFLOW':
      return cmd === C.NBD_CMD_READ ? C.NBD_EOVERFLOW : C.NBD_EINVAL;
    case 'ENOTSUP':
      return cmd === C.NBD_CMD_WRITE_ZEROES && (flags & C.NBD_CMD_FLAG_FAST_ZERO) !== 0 ? C.NBD_ENOTSUP : C.NBD_EINVAL;
    case 'ESHUTDOWN':
      return C.NBD_ESHUTDOWN;
    default:
      return C.NBD_EIO;
  }
}
