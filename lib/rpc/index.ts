/**
 * Framed msgpack RPC between vstore processes (storage node control, the resolver service, later
 * the directory service). Control plane only: never on the per-request data path of a disk.
 *
 * Wire: every frame is a u32 big-endian length followed by that many bytes of msgpack.
 *   request   {i: id, m: method, p: params}
 *   response  {i: id, r: result}  or  {i: id, e: {code, message}}
 * Ids are chosen by the caller; replies may come in any order. A frame over `maxFrame` bytes or
 * one that does not decode to a request closes the connection (a protocol error, not an answer).
 */
import { EventEmitter } from 'node:events';
import * as net from 'node:net';
import { rm } from 'node:fs/promises';
import { Packr } from 'msgpackr';
import type { Logger } from '../log.js';
import { formatAddress, parseAddress, prepareSocket, type SocketAddress } from '../net/address.js';

const packr = new Packr({ useRecords: false, moreTypes: false, int64AsType: 'number' });
export const DEFAULT_MAX_FRAME = 16 * 1024 * 1024;

/** An error answered by the other side (or a local transport failure: code ECONNRESET, ETIMEDOUT, ...). */
export class RpcError extends Error {
  constructor(
    readonly code: string,
    message: string,
    /** The call never got an answer (connect failed, connection lost, timeout): not the other side's error. */
    readonly transport = false,
  ) {
    super(message);
    this.name = 'RpcError';
  }
}

export interface RpcContext {
  /** Address of the caller, for logs. */
  peer: string;
  /**
   * The connection the call came on (unique in this server's lifetime): services that keep state
   * per connection (the node's directory sessions) key it by this and drop it in `onDisconnect`.
   */
  conn: number;
}

export type RpcHandler = (params: any, ctx: RpcContext) => unknown;
export type RpcHandlers = Record<string, RpcHandler>;

function encodeFrame(obj: unknown): Buffer {
  const body = packr.pack(obj);
  const out = Buffer.allocUnsafe(4 + body.length);
  out.writeUInt32BE(body.length, 0);
  body.copy(out, 4);
  return out;
}

/** Splits a byte stream into frames; calls `onFrame` for each decoded one. Throws on a bad frame. */
class FrameReader {
  private chunks: Buffer[] = [];
  private have = 0;
  constructor(
    private readonly maxFrame: number,
    private readonly onFrame: (obj: unknown) => void,
  ) {}

  push(b: Buffer): void {
    this.chunks.push(b);
    this.have += b.length;
    for (;;) {
      if (this.have < 4) return;
      let buf = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
      this.chunks = [buf];
      const len = buf.readUInt32BE(0);
      if (len > this.maxFrame) throw new RpcError('EPROTO', `frame of ${len} bytes exceeds the limit of ${this.maxFrame}`);
      if (this.have < 4 + len) return;
      const body = buf.subarray(4, 4 + len);
      buf = buf.subarray(4 + len);
      this.chunks = buf.length ? [buf] : [];
      this.have = buf.length;
      let obj: unknown;
      try {
        obj = packr.unpack(body);
      } catch (e) {
        throw new RpcError('EPROTO', `undecodable frame: ${(e as Error).message}`);
      }
      this.onFrame(obj);
    }
  }
}

function isObj(x: unknown): x is Record<string, unknown> {
  return typeof x === 'object' && x !== null && !Array.isArray(x) && !Buffer.isBuffer(x);
}

function errorCode(e: unknown): string {
  const c = (e as { code?: unknown })?.code;
  return typeof c === 'string' && c ? c : 'EIO';
}

export interface RpcServerOptions {
  handlers: RpcHandlers;
  logger: Logger;
  maxFrame?: number;
  /** Called once when a connection ends (after its in-flight handlers were started). */
  onDisconnect?: (ctx: RpcContext) => void;
  /**
   * Requests of one connection being handled at once; when reached, the server stops reading that
   * socket until one completes (backpressure reaches the client through the socket buffers).
   * Requests already read in the same chunk wait in a queue of at most one read's worth. Default 256.
   */
  maxInFlight?: number;
}

/** Serves `handlers` on any number of listen addresses. */
export class RpcServer {
  private readonly servers: { server: net.Server; addr: SocketAddress }[] = [];
  private readonly sockets = new Set<net.Socket>();
  private readonly maxFrame: number;
  private readonly maxInFlight: number;
  private nextConn = 1;

  constructor(private readonly opts: RpcServerOptions) {
    this.maxFrame = opts.maxFrame ?? DEFAULT_MAX_FRAME;
    this.maxInFlight = opts.maxInFlight ?? 256;
  }

  /** Listens on `address` (see lib/net/address.ts); returns the bound address (the port chosen for :0). */
  async listen(address: string | SocketAddress): Promise<SocketAddress> {
    const addr = typeof address === 'string' ? parseAddress(address) : address;
    const server = net.createServer((s) => this.accept(s));
    if ('unix' in addr) await prepareSocket(addr.unix, 'rpc socket');
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      if ('unix' in addr) server.listen(addr.unix, () => resolve());
      else server.listen(addr.port, addr.host, () => resolve());
    });
    server.on('error', (e) => this.opts.logger.warn({ err: e }, 'rpc: listener error'));
    let bound: SocketAddress = addr;
    if (!('unix' in addr)) {
      const a = server.address() as net.AddressInfo;
      bound = { host: addr.host, port: a.port };
    } else {
      const { chmod } = await import('node:fs/promises');
      await chmod(addr.unix, 0o600);
    }
    this.servers.push({ server, addr: bound });
    return bound;
  }

  get addresses(): string[] {
    return this.servers.map((s) => formatAddress(s.addr));
  }

  private accept(sock: net.Socket): void {
    this.sockets.add(sock);
    sock.setNoDelay(true);
    const peer = sock.remoteAddress ? `${sock.remoteAddress}:${sock.remotePort}` : 'unix';
    const ctx: RpcContext = { peer, conn: this.nextConn++ };
    let inFlight = 0;
    /** Requests read while at the bound (bounded: the socket is paused, so at most one chunk's). */
    const waiting: { id: number; h: RpcHandler; p: unknown }[] = [];
    const start = (id: number, h: RpcHandler, p: unknown): void => {
      inFlight++;
      Promise.resolve()
        .then(() => h(p, ctx))
        .then(
          (r) => this.reply(sock, { i: id, r: r ?? null }),
          (e: unknown) => this.reply(sock, { i: id, e: { code: errorCode(e), message: (e as Error)?.message ?? String(e) } }),
        )
        .finally(done);
    };
    const done = (): void => {
      inFlight--;
      while (waiting.length && inFlight < this.maxInFlight && !sock.destroyed) {
        const w = waiting.shift()!;
        start(w.id, w.h, w.p);
      }
      if (!waiting.length && inFlight < this.maxInFlight && sock.isPaused() && !sock.destroyed) sock.resume();
    };
    const reader = new FrameReader(this.maxFrame, (obj) => {
      if (!isObj(obj) || typeof obj.i !== 'number' || typeof obj.m !== 'string') {
        throw new RpcError('EPROTO', 'frame is not a request');
      }
      const id = obj.i;
      const h = Object.prototype.hasOwnProperty.call(this.opts.handlers, obj.m) ? this.opts.handlers[obj.m] : undefined;
      if (!h) {
        this.reply(sock, { i: id, e: { code: 'ENOSYS', message: `unknown method ${obj.m}` } });
        return;
      }
      if (inFlight >= this.maxInFlight || waiting.length) {
        waiting.push({ id, h, p: obj.p });
        sock.pause();
        return;
      }
      start(id, h, obj.p);
      if (inFlight >= this.maxInFlight) sock.pause();
    });
    sock.on('data', (b: Buffer) => {
      try {
        reader.push(b);
      } catch (e) {
        this.opts.logger.warn({ peer, err: (e as Error).message }, 'rpc: bad frame; closing the connection');
        sock.destroy();
      }
    });
    sock.on('error', () => {});
    sock.on('close', () => {
      this.sockets.delete(sock);
      try {
        this.opts.onDisconnect?.(ctx);
      } catch (e) {
        this.opts.logger.warn({ peer, err: (e as Error).message }, 'rpc: disconnect hook failed');
      }
    });
  }

  private reply(sock: net.Socket, msg: unknown): void {
    if (sock.destroyed) return;
    try {
      sock.write(encodeFrame(msg));
    } catch (e) {
      // A result msgpack cannot encode: answer with an error instead.
      const m = msg as { i: number };
      sock.write(encodeFrame({ i: m.i, e: { code: 'EIO', message: `unencodable result: ${(e as Error).message}` } }));
    }
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await Promise.all(
      this.servers.map(
        async ({ server, addr }) => {
          await new Promise<void>((r) => server.close(() => r()));
          // Awaited: a server restarted at once on the same path must not lose its new socket file.
          if ('unix' in addr) await rm(addr.unix, { force: true }).catch(() => {});
        },
      ),
    );
    this.servers.length = 0;
  }
}

export interface RpcClientOptions {
  /** Per-call timeout (ms); a call not answered by then fails with ETIMEDOUT. Default 10 s. */
  timeoutMs?: number;
  /** Connect timeout (ms). Default 5 s. */
  connectTimeoutMs?: number;
  maxFrame?: number;
}

interface Pending {
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

/**
 * A client that connects on first use and again after the connection dropped (the next call
 * reconnects). Calls in flight when the connection drops fail with ECONNRESET; the caller decides
 * whether to retry. Emits 'close' when a connection ends.
 */
export class RpcClient extends EventEmitter {
  private sock: net.Socket | null = null;
  private connecting: Promise<net.Socket> | null = null;
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private closed = false;
  readonly address: SocketAddress;

  constructor(
    address: string | SocketAddress,
    private readonly opts: RpcClientOptions = {},
  ) {
    super();
    this.address = typeof address === 'string' ? parseAddress(address) : address;
  }

  async call<T = unknown>(method: string, params?: unknown, opts: { timeoutMs?: number } = {}): Promise<T> {
    if (this.closed) throw new RpcError('ESHUTDOWN', 'rpc client closed', true);
    const sock = await this.connect();
    const id = this.nextId++;
    if (this.nextId > 0x7fffffff) this.nextId = 1;
    const timeoutMs = opts.timeoutMs ?? this.opts.timeoutMs ?? 10_000;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new RpcError('ETIMEDOUT', `${method}: no answer from ${formatAddress(this.address)} in ${timeoutMs} ms`, true));
      }, timeoutMs);
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject, timer });
      sock.write(encodeFrame({ i: id, m: method, p: params ?? null }));
    });
  }

  private connect(): Promise<net.Socket> {
    if (this.sock && !this.sock.destroyed) return Promise.resolve(this.sock);
    if (this.connecting) return this.connecting;
    const a = this.address;
    this.connecting = new Promise<net.Socket>((resolve, reject) => {
      const s = 'unix' in a ? net.connect(a.unix) : net.connect(a.port, a.host);
      const t = setTimeout(() => s.destroy(new RpcError('ETIMEDOUT', `connect to ${formatAddress(a)} timed out`, true)), this.opts.connectTimeoutMs ?? 5000);
      s.once('connect', () => {
        clearTimeout(t);
        s.setNoDelay(true);
        this.attach(s);
        resolve(s);
      });
      s.once('error', (e: NodeJS.ErrnoException) => {
        clearTimeout(t);
        if (this.sock !== s) reject(e instanceof RpcError ? e : new RpcError(e.code ?? 'ECONNREFUSED', `cannot connect to ${formatAddress(a)}: ${e.message}`, true));
      });
    }).finally(() => {
      this.connecting = null;
    });
    return this.connecting;
  }

  private attach(s: net.Socket): void {
    this.sock = s;
    const reader = new FrameReader(this.opts.maxFrame ?? DEFAULT_MAX_FRAME, (obj) => {
      if (!isObj(obj) || typeof obj.i !== 'number') throw new RpcError('EPROTO', 'frame is not a response');
      const p = this.pending.get(obj.i);
      if (!p) return; // timed out already
      this.pending.delete(obj.i);
      clearTimeout(p.timer);
      if (isObj(obj.e)) p.reject(new RpcError(String(obj.e.code ?? 'EIO'), String(obj.e.message ?? 'remote error')));
      else p.resolve(obj.r);
    });
    s.on('data', (b: Buffer) => {
      try {
        reader.push(b);
      } catch {
        s.destroy();
      }
    });
    s.on('error', () => {});
    s.on('close', () => {
      if (this.sock === s) this.sock = null;
      for (const [id, p] of this.pending) {
        clearTimeout(p.timer);
        p.reject(new RpcError('ECONNRESET', `connection to ${formatAddress(this.address)} closed`, true));
        this.pending.delete(id);
      }
      this.emit('close');
    });
  }

  close(): void {
    this.closed = true;
    this.sock?.destroy();
  }
}
