/**
 * A raw NBD client for tests: it speaks the protocol byte by byte (through the codec's client
 * side) so that tests can send exactly the frames they want, legal or not, and check exactly
 * what the server answers.
 */
import * as net from 'node:net';
import * as tls from 'node:tls';
import * as codec from '../../../lib/nbd/codec.js';
import * as C from '../../../lib/nbd/constants.js';

export type Addr = string | { host: string; port: number };

export interface Reply {
  handle: bigint;
  /** 0 on success; the first error otherwise. */
  error: number;
  /** Read data (simple reply, or structured chunks assembled; holes are zero-filled). */
  data?: Buffer;
  chunks: codec.ChunkPayload[];
  simple: boolean;
}

export class RawClient {
  socket: net.Socket;
  private chunks: Buffer[] = [];
  private length = 0;
  private waiter: (() => void) | null = null;
  closed = false;
  private closedP: Promise<void>;
  /** Expected read lengths for simple replies, by handle. */
  private readLens = new Map<bigint, number>();
  private readBase = new Map<bigint, number>();
  structured = false;
  private nextHandle = 1n;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    this.closedP = new Promise((resolve) => socket.once('close', () => {
      this.closed = true;
      this.wake();
      resolve();
    }));
    this.listen(socket);
  }

  private listen(s: net.Socket): void {
    s.on('data', (b: Buffer) => {
      this.chunks.push(b);
      this.length += b.length;
      this.wake();
    });
    s.on('error', () => {});
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  static connect(addr: Addr): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = typeof addr === 'string' ? net.connect({ path: addr }) : net.connect({ host: addr.host, port: addr.port });
      s.once('connect', () => resolve(new RawClient(s)));
      s.once('error', reject);
    });
  }

  /** Resolves when the server has closed the connection (rejects after `ms`). */
  waitClosed(ms = 5000): Promise<void> {
    return withTimeout(this.closedP, ms, 'connection not closed by the server');
  }

  /** Reads exactly n bytes (rejects if the connection closes first or after `ms`). */
  async read(n: number, ms = 5000): Promise<Buffer> {
    const deadline = Date.now() + ms;
    while (this.length < n) {
      if (this.closed) throw new Error(`connection closed with ${this.length}/${n} bytes`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timeout waiting for ${n} bytes (have ${this.length})`);
      await withTimeout(new Promise<void>((r) => (this.waiter = r)), left, `timeout waiting for ${n} bytes (have ${this.length})`).catch((e) => {
        this.waiter = null;
        throw e;
      });
    }
    const all = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
    const out = Buffer.from(all.subarray(0, n));
    const rest = all.subarray(n);
    this.chunks = rest.length ? [rest] : [];
    this.length = rest.length;
    return out;
  }

  /** Bytes received and not read yet. */
  get buffered(): number {
    return this.length;
  }

  write(b: Uint8Array): void {
    this.socket.write(b);
  }

  destroy(): void {
    this.socket.destroy();
  }

  // ------------------------------------------------------------------ handshake

  async greeting(flags = C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES): Promise<number> {
    const g = codec.parseServerGreeting(await this.read(C.SERVER_GREETING_SIZE));
    if (g.kind !== 'ok') throw new Error('bad greeting');
    this.write(codec.encodeClientFlags(flags));
    return g.value.handshakeFlags;
  }

  async readOptionReply(): Promise<codec.OptionReply> {
    const h = await this.read(C.OPTION_REPLY_HEADER_SIZE);
    const len = h.readUInt32BE(16);
    const data = await this.read(len);
    const r = codec.parseOptionReply(Buffer.concat([h, data]));
    if (r.kind !== 'ok') throw new Error(`bad option reply: ${JSON.stringify(r)}`);
    return r.value;
  }

  /** Sends an option and collects replies up to the final one (ACK or an error). */
  async option(opt: number, data: Uint8Array = Buffer.alloc(0)): Promise<codec.OptionReply[]> {
    this.write(codec.encodeOption(opt, data));
    const out: codec.OptionReply[] = [];
    for (;;) {
      const r = await this.readOptionReply();
      out.push(r);
      if (r.option !== opt) throw new Error(`reply for option ${r.option}, expected ${opt}`);
      if (r.type === C.NBD_REP_ACK || codec.isOptionError(r.type)) return out;
    }
  }

  /** Full handshake to transmission with NBD_OPT_GO; returns the export size and flags. */
  async handshake(o: { name?: string; structured?: boolean; meta?: boolean; infos?: number[] } = {}): Promise<{ size: number; flags: number }> {
    await this.greeting();
    return this.go(o);
  }

  async go(o: { name?: string; structured?: boolean; meta?: boolean; infos?: number[] } = {}): Promise<{ size: number; flags: number }> {
    const name = o.name ?? '';
    if (o.structured ?? true) {
      const r = await this.option(C.NBD_OPT_STRUCTURED_REPLY);
      if (r[0]!.type !== C.NBD_REP_ACK) throw new Error('structured reply refused');
      this.structured = true;
    }
    if (o.meta ?? this.structured) {
      const r = await this.option(C.NBD_OPT_SET_META_CONTEXT, codec.encodeMetaContextRequest(name, [C.BASE_ALLOCATION]));
      if (r[r.length - 1]!.type !== C.NBD_REP_ACK) throw new Error('SET_META_CONTEXT refused');
    }
    const replies = await this.option(C.NBD_OPT_GO, codec.encodeInfoRequest(name, o.infos ?? [C.NBD_INFO_BLOCK_SIZE]));
    const last = replies[replies.length - 1]!;
    if (last.type !== C.NBD_REP_ACK) throw new Error(`GO refused: 0x${last.type.toString(16)} ${last.data.toString()}`);
    for (const r of replies) {
      const i = codec.parseInfo(r.data);
      if (r.type === C.NBD_REP_INFO && i.kind === 'ok' && i.value.type === C.NBD_INFO_EXPORT) return { size: i.value.size, flags: i.value.flags };
    }
    throw new Error('no NBD_INFO_EXPORT');
  }

  /** Upgrades to TLS after a STARTTLS ACK. */
  async startTls(opts: tls.ConnectionOptions): Promise<void> {
    const r = await this.option(C.NBD_OPT_STARTTLS);
    if (r[0]!.type !== C.NBD_REP_ACK) throw new Error(`STARTTLS refused: 0x${r[0]!.type.toString(16)}`);
    const raw = this.socket;
    raw.removeAllListeners('data');
    const t = tls.connect({ socket: raw, checkServerIdentity: () => undefined, ...opts });
    await new Promise<void>((resolve, reject) => {
      t.once('secureConnect', resolve);
      t.once('error', reject);
    });
    this.socket = t;
    this.closedP = new Promise((resolve) => t.once('close', () => {
      this.closed = true;
      this.wake();
      resolve();
    }));
    this.listen(t);
  }

  // ------------------------------------------------------------------ transmission

  send(type: number, offset: number | bigint, length: number, o: { flags?: number; payload?: Uint8Array; handle?: bigint } = {}): bigint {
    const handle = o.handle ?? this.nextHandle++;
    if (type === C.NBD_CMD_READ) {
      this.readLens.set(handle, length);
      this.readBase.set(handle, Number(offset));
    }
    this.write(codec.encodeRequest({ type, flags: o.flags ?? 0, handle, offset, length }, o.payload));
    return handle;
  }

  /** Reads one complete reply (all chunks up to DONE for structured ones). */
  async reply(ms = 5000): Promise<Reply> {
    let h = await this.read(4, ms);
    const magic = h.readUInt32BE(0);
    if (magic === C.SIMPLE_REPLY_MAGIC) {
      h = Buffer.concat([h, await this.read(12, ms)]);
      const p = codec.parseReplyHeader(h);
      if (p.kind !== 'ok' || p.value.magic !== 'simple') throw new Error('bad simple reply');
      const handle = codec.handleToBigInt(p.value.handleHi, p.value.handleLo);
      const readLen = this.readLens.get(handle);
      this.readLens.delete(handle);
      let data: Buffer | undefined;
      if (readLen !== undefined && p.value.error === 0) data = await this.read(readLen, ms);
      return { handle, error: p.value.error, data, chunks: [], simple: true };
    }
    if (magic !== C.STRUCTURED_REPLY_MAGIC) throw new Error(`bad reply magic 0x${magic.toString(16)}`);
    // Structured: collect chunks of this handle until DONE (other handles' chunks are not expected
    // to interleave in these tests; the server sends each reply's chunks together).
    const chunks: codec.ChunkPayload[] = [];
    let error = 0;
    let handle = 0n;
    let first = true;
    for (;;) {
      if (!first) h = await this.read(4, ms);
      first = false;
      h = Buffer.concat([h, await this.read(16, ms)]);
      const p = codec.parseReplyHeader(h);
      if (p.kind !== 'ok' || p.value.magic !== 'structured') throw new Error(`bad structured chunk ${JSON.stringify(p)}`);
      handle = codec.handleToBigInt(p.value.handleHi, p.value.handleLo);
      const payload = await this.read(p.value.length, ms);
      const c = codec.parseChunkPayload(p.value.type, payload);
      if (c.kind !== 'ok') throw new Error(`bad chunk payload: ${JSON.stringify(c)}`);
      chunks.push(c.value);
      if ('error' in c.value && error === 0) error = c.value.error;
      if (p.value.flags & C.NBD_REPLY_FLAG_DONE) break;
    }
    const readLen = this.readLens.get(handle);
    this.readLens.delete(handle);
    let data: Buffer | undefined;
    if (readLen !== undefined && error === 0) {
      data = Buffer.alloc(readLen, 0xee); // bytes no chunk covered stay 0xee: visible in asserts
      const base = this.readBase.get(handle) ?? 0;
      for (const c of chunks) {
        if (c.type === C.NBD_REPLY_TYPE_OFFSET_DATA && 'data' in c) c.data.copy(data, c.offset - base);
        else if (c.type === C.NBD_REPLY_TYPE_OFFSET_HOLE && 'length' in c) data.fill(0, c.offset - base, c.offset - base + c.length);
      }
    }
    this.readBase.delete(handle);
    return { handle, error, data, chunks, simple: false };
  }

  async readAt(offset: number, length: number, flags = 0): Promise<Reply> {
    this.send(C.NBD_CMD_READ, offset, length, { flags });
    return this.reply();
  }

  async cmd(type: number, offset: number | bigint, length: number, o: { flags?: number; payload?: Uint8Array } = {}): Promise<Reply> {
    this.send(type, offset, length, o);
    return this.reply();
  }

  /** Sends DISC and waits for the server to close. */
  async disconnect(): Promise<void> {
    this.send(C.NBD_CMD_DISC, 0, 0);
    await this.waitClosed();
  }
}

export function withTimeout<T>(p: Promise<T>, ms: number, msg: string): Promise<T> {
  let t: NodeJS.Timeout;
  return Promise.race([
    p.finally(() => clearTimeout(t)),
    new Promise<T>((_, reject) => {
      t = setTimeout(() => reject(new Error(msg)), ms);
    }),
  ]);
}
