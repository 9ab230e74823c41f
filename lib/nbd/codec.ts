/**
 * The NBD wire format as pure functions of bytes: no sockets, timers or state. Both directions
 * are here (the server uses the request parsers and reply encoders; tests and a future client
 * use the others), so that every frame can be round-tripped and fuzzed alone.
 *
 * Parsers take (buf, offset) and never throw and never read outside `buf`: they answer
 * `ok` (with the value and the bytes it took), `more` (how many bytes from `offset` are needed
 * at least) or `error` (the frame is malformed; a reason for the log).
 *
 * 64-bit handles travel as two uint32 words (hi, lo) so the hot path never builds a BigInt.
 * 64-bit offsets and sizes are read as JS numbers: exact up to 2^53, and any larger value stays
 * larger than every export size (which is a safe integer), so range checks remain correct.
 */
import * as C from './constants.js';

export type Parse<T> =
  | { kind: 'ok'; value: T; size: number }
  | { kind: 'more'; need: number }
  | { kind: 'error'; reason: string };

function ok<T>(value: T, size: number): Parse<T> {
  return { kind: 'ok', value, size };
}
function more<T>(need: number): Parse<T> {
  return { kind: 'more', need };
}
function fail<T>(reason: string): Parse<T> {
  return { kind: 'error', reason };
}

const TWO32 = 4294967296;

/** Reads a big-endian u64 as a number (exact below 2^53). */
export function readU64(buf: Buffer, off: number): number {
  return buf.readUInt32BE(off) * TWO32 + buf.readUInt32BE(off + 4);
}

/** Writes a u64 from a non-negative number (a safe integer) or a bigint. */
export function writeU64(buf: Buffer, off: number, value: number | bigint): void {
  if (typeof value === 'bigint') {
    buf.writeBigUInt64BE(BigInt.asUintN(64, value), off);
    return;
  }
  if (!Number.isSafeInteger(value) || value < 0) throw new RangeError(`u64 value ${value} is not a safe non-negative integer (use a bigint)`);
  const hi = Math.floor(value / TWO32);
  buf.writeUInt32BE(hi >>> 0, off);
  buf.writeUInt32BE(value - hi * TWO32, off + 4);
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** Decodes a protocol string: valid UTF-8, no NUL, at most 4096 bytes. Null if invalid. */
export function decodeString(buf: Uint8Array): string | null {
  if (buf.length > C.MAX_STRING_LENGTH) return null;
  if (buf.indexOf(0) !== -1) return null;
  try {
    return utf8.decode(buf);
  } catch {
    return null;
  }
}

// =========================================================================== handshake

export interface ServerGreeting {
  handshakeFlags: number;
}

/** S: NBDMAGIC, IHAVEOPT, 16-bit handshake flags. */
export function encodeServerGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.allocUnsafe(C.SERVER_GREETING_SIZE);
  b.writeBigUInt64BE(C.NBDMAGIC, 0);
  b.writeBigUInt64BE(C.IHAVEOPT, 8);
  b.writeUInt16BE(handshakeFlags & 0xffff, 16);
  return b;
}

export function parseServerGreeting(buf: Buffer, off = 0): Parse<ServerGreeting> {
  if (buf.length - off < C.SERVER_GREETING_SIZE) return more(C.SERVER_GREETING_SIZE);
  if (buf.readBigUInt64BE(off) !== C.NBDMAGIC) return fail('bad NBDMAGIC');
  if (buf.readBigUInt64BE(off + 8) !== C.IHAVEOPT) return fail('not a newstyle server (no IHAVEOPT)');
  return ok({ handshakeFlags: buf.readUInt16BE(off + 16) }, C.SERVER_GREETING_SIZE);
}

export function encodeClientFlags(flags: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(flags >>> 0, 0);
  return b;
}

/** C: 32-bit client flags. Unknown bits are reported by the caller (the server must disconnect). */
export function parseClientFlags(buf: Buffer, off = 0): Parse<number> {
  if (buf.length - off < 4) return more(4);
  return ok(buf.readUInt32BE(off), 4);
}

// =========================================================================== options (client -> server)

export interface OptionHeader {
  option: number;
  /** Length of the option data that follows the 16-byte header. */
  length: number;
}

export function encodeOption(option: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(C.OPTION_HEADER_SIZE + data.length);
  b.writeBigUInt64BE(C.IHAVEOPT, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(data.length, 12);
  b.set(data, C.OPTION_HEADER_SIZE);
  return b;
}

/** Parses the 16-byte header of an option request (the data is not included in `size`). */
export function parseOptionHeader(buf: Buffer, off = 0): Parse<OptionHeader> {
  if (buf.length - off < C.OPTION_HEADER_SIZE) return more(C.OPTION_HEADER_SIZE);
  if (buf.readUInt32BE(off) !== C.IHAVEOPT_HI || buf.readUInt32BE(off + 4) !== C.IHAVEOPT_LO) {
    return fail('bad option magic (expected IHAVEOPT)');
  }
  return ok({ option: buf.readUInt32BE(off + 8), length: buf.readUInt32BE(off + 12) }, C.OPTION_HEADER_SIZE);
}

/** NBD_OPT_EXPORT_NAME data: the whole payload is the name. */
export function parseExportNameData(data: Buffer): Parse<string> {
  const name = decodeString(data);
  if (name === null) return fail('export name is not a valid string (UTF-8, no NUL, <= 4096 bytes)');
  return ok(name, data.length);
}

export interface InfoRequest {
  name: string;
  /** NBD_INFO_* types requested (unknown types included; the server ignores them). */
  infos: number[];
}

/** NBD_OPT_INFO / NBD_OPT_GO data: u32 name length, name, u16 count, count x u16. */
export function encodeInfoRequest(name: string, infos: number[] = []): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length + 2 + 2 * infos.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((t, i) => b.writeUInt16BE(t & 0xffff, 6 + n.length + 2 * i));
  return b;
}

/** Parses the whole data of an INFO/GO option; the data must be consumed exactly. */
export function parseInfoRequest(data: Buffer): Parse<InfoRequest> {
  if (data.length < 6) return fail('INFO/GO data shorter than 6 bytes');
  const nameLen = data.readUInt32BE(0);
  if (nameLen > data.length - 6) return fail('INFO/GO name length exceeds option length - 6');
  const name = decodeString(data.subarray(4, 4 + nameLen));
  if (name === null) return fail('INFO/GO export name is not a valid string');
  const count = data.readUInt16BE(4 + nameLen);
  if (data.length !== 6 + nameLen + 2 * count) return fail('INFO/GO information request count does not match option length');
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(data.readUInt16BE(6 + nameLen + 2 * i));
  return ok({ name, infos }, data.length);
}

export interface MetaContextRequest {
  name: string;
  queries: string[];
}

/** LIST_META_CONTEXT / SET_META_CONTEXT data: u32 name len, name, u32 count, count x (u32 len, query). */
export function encodeMetaContextRequest(name: string, queries: string[]): Buffer {
  const parts: Buffer[] = [];
  const n = Buffer.from(name, 'utf8');
  const h = Buffer.allocUnsafe(4);
  h.writeUInt32BE(n.length, 0);
  parts.push(h, n);
  const c = Buffer.allocUnsafe(4);
  c.writeUInt32BE(queries.length, 0);
  parts.push(c);
  for (const q of queries) {
    const qb = Buffer.from(q, 'utf8');
    const l = Buffer.allocUnsafe(4);
    l.writeUInt32BE(qb.length, 0);
    parts.push(l, qb);
  }
  return Buffer.concat(parts);
}

export function parseMetaContextRequest(data: Buffer): Parse<MetaContextRequest> {
  if (data.length < 8) return fail('meta context data shorter than 8 bytes');
  const nameLen = data.readUInt32BE(0);
  if (nameLen > data.length - 8) return fail('meta context export name length exceeds option length');
  const name = decodeString(data.subarray(4, 4 + nameLen));
  if (name === null) return fail('meta context export name is not a valid string');
  let pos = 4 + nameLen;
  const count = data.readUInt32BE(pos);
  pos += 4;
  // Each query takes at least 4 bytes: bound the count before looping.
  if (count > (data.length - pos) / 4) return fail('meta context query count exceeds option length');
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (data.length - pos < 4) return fail('meta context query length truncated');
    const qLen = data.readUInt32BE(pos);
    pos += 4;
    if (qLen > data.length - pos) return fail('meta context query exceeds option length');
    const q = decodeString(data.subarray(pos, pos + qLen));
    if (q === null) return fail('meta context query is not a valid string');
    queries.push(q);
    pos += qLen;
  }
  if (pos !== data.length) return fail('trailing bytes after meta context queries');
  return ok({ name, queries }, data.length);
}

// =========================================================================== option replies (server -> client)

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

export function encodeOptionReply(option: number, type: number, data?: Uint8Array): Buffer {
  const len = data ? data.length : 0;
  const b = Buffer.allocUnsafe(C.OPTION_REPLY_HEADER_SIZE + len);
  b.writeUInt32BE(C.REPLY_OPT_MAGIC_HI, 0);
  b.writeUInt32BE(C.REPLY_OPT_MAGIC_LO, 4);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(len, 16);
  if (data) b.set(data, C.OPTION_REPLY_HEADER_SIZE);
  return b;
}

/** An error reply with a human-readable message (truncated to the 4096-byte string limit). */
export function encodeOptionError(option: number, type: number, message = ''): Buffer {
  return encodeOptionReply(option, type, truncateUtf8(message, C.MAX_STRING_LENGTH));
}

/** Parses one option reply; `maxData` bounds the data a client accepts. */
export function parseOptionReply(buf: Buffer, off = 0, maxData = 1 << 20): Parse<OptionReply> {
  if (buf.length - off < C.OPTION_REPLY_HEADER_SIZE) return more(C.OPTION_REPLY_HEADER_SIZE);
  if (buf.readUInt32BE(off) !== C.REPLY_OPT_MAGIC_HI || buf.readUInt32BE(off + 4) !== C.REPLY_OPT_MAGIC_LO) {
    return fail('bad option reply magic');
  }
  const len = buf.readUInt32BE(off + 16);
  if (len > maxData) return fail(`option reply data too long (${len})`);
  const total = C.OPTION_REPLY_HEADER_SIZE + len;
  if (buf.length - off < total) return more(total);
  return ok(
    {
      option: buf.readUInt32BE(off + 8),
      type: buf.readUInt32BE(off + 12),
      data: Buffer.from(buf.subarray(off + C.OPTION_REPLY_HEADER_SIZE, off + total)),
    },
    total,
  );
}

export function isOptionError(type: number): boolean {
  return type >= C.NBD_REP_FLAG_ERROR;
}

/** NBD_REP_SERVER data: u32 name length, name, then an optional description. */
export function encodeRepServer(name: string, description = ''): Buffer {
  const n = Buffer.from(name, 'utf8');
  const d = Buffer.from(description, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.length);
  return b;
}

export function parseRepServer(data: Buffer): Parse<{ name: string; description: string }> {
  if (data.length < 4) return fail('REP_SERVER shorter than 4 bytes');
  const len = data.readUInt32BE(0);
  if (len > data.length - 4) return fail('REP_SERVER name length exceeds reply length - 4');
  const name = decodeString(data.subarray(4, 4 + len));
  const description = decodeString(data.subarray(4 + len));
  if (name === null || description === null) return fail('REP_SERVER strings invalid');
  return ok({ name, description }, data.length);
}

export type Info =
  | { type: typeof C.NBD_INFO_EXPORT; size: number; flags: number }
  | { type: typeof C.NBD_INFO_NAME; name: string }
  | { type: typeof C.NBD_INFO_DESCRIPTION; description: string }
  | { type: typeof C.NBD_INFO_BLOCK_SIZE; minimum: number; preferred: number; maximum: number }
  | { type: -1; infoType: number; data: Buffer };

export function encodeInfoExport(size: number, transmissionFlags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(C.NBD_INFO_EXPORT, 0);
  writeU64(b, 2, size);
  b.writeUInt16BE(transmissionFlags & 0xffff, 10);
  return b;
}

export function encodeInfoString(type: typeof C.NBD_INFO_NAME | typeof C.NBD_INFO_DESCRIPTION, s: string): Buffer {
  const d = truncateUtf8(s, C.MAX_STRING_LENGTH);
  const b = Buffer.allocUnsafe(2 + d.length);
  b.writeUInt16BE(type, 0);
  d.copy(b, 2);
  return b;
}

export function encodeInfoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(C.NBD_INFO_BLOCK_SIZE, 0);
  b.writeUInt32BE(minimum >>> 0, 2);
  b.writeUInt32BE(preferred >>> 0, 6);
  b.writeUInt32BE(maximum >>> 0, 10);
  return b;
}

export function parseInfo(data: Buffer): Parse<Info> {
  if (data.length < 2) return fail('REP_INFO shorter than 2 bytes');
  const type = data.readUInt16BE(0);
  switch (type) {
    case C.NBD_INFO_EXPORT:
      if (data.length !== 12) return fail('INFO_EXPORT length must be 12');
      return ok({ type, size: readU64(data, 2), flags: data.readUInt16BE(10) }, 12);
    case C.NBD_INFO_NAME:
    case C.NBD_INFO_DESCRIPTION: {
      const s = decodeString(data.subarray(2));
      if (s === null) return fail('INFO string invalid');
      return ok(type === C.NBD_INFO_NAME ? { type, name: s } : { type, description: s }, data.length);
    }
    case C.NBD_INFO_BLOCK_SIZE:
      if (data.length !== 14) return fail('INFO_BLOCK_SIZE length must be 14');
      return ok({ type, minimum: data.readUInt32BE(2), preferred: data.readUInt32BE(6), maximum: data.readUInt32BE(10) }, 14);
    default:
      return ok({ type: -1, infoType: type, data: Buffer.from(data.subarray(2)) }, data.length);
  }
}

/** NBD_REP_META_CONTEXT data: u32 context id, name. */
export function encodeRepMetaContext(id: number, name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length);
  b.writeUInt32BE(id >>> 0, 0);
  n.copy(b, 4);
  return b;
}

export function parseRepMetaContext(data: Buffer): Parse<{ id: number; name: string }> {
  if (data.length < 4) return fail('REP_META_CONTEXT shorter than 4 bytes');
  const name = decodeString(data.subarray(4));
  if (name === null) return fail('REP_META_CONTEXT name invalid');
  return ok({ id: data.readUInt32BE(0), name }, data.length);
}

/** Reply to NBD_OPT_EXPORT_NAME: size, transmission flags, 124 zero bytes unless NO_ZEROES. */
export function encodeExportNameReply(size: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(10 + (noZeroes ? 0 : C.EXPORT_NAME_PADDING));
  writeU64(b, 0, size);
  b.writeUInt16BE(transmissionFlags & 0xffff, 8);
  return b;
}

export function parseExportNameReply(buf: Buffer, off: number, noZeroes: boolean): Parse<{ size: number; flags: number }> {
  const need = 10 + (noZeroes ? 0 : C.EXPORT_NAME_PADDING);
  if (buf.length - off < need) return more(need);
  return ok({ size: readU64(buf, off), flags: buf.readUInt16BE(off + 8) }, need);
}

// =========================================================================== transmission: requests

export interface RequestHeader {
  flags: number;
  type: number;
  handleHi: number;
  handleLo: number;
  /** Offset (exact below 2^53; above that, still larger than any export). */
  offset: number;
  length: number;
}

export function encodeRequest(r: {
  flags?: number;
  type: number;
  handle?: bigint;
  handleHi?: number;
  handleLo?: number;
  offset: number | bigint;
  length: number;
}, payload?: Uint8Array): Buffer {
  const b = Buffer.allocUnsafe(C.REQUEST_HEADER_SIZE + (payload ? payload.length : 0));
  b.writeUInt32BE(C.REQUEST_MAGIC, 0);
  b.writeUInt16BE((r.flags ?? 0) & 0xffff, 4);
  b.writeUInt16BE(r.type & 0xffff, 6);
  if (r.handle !== undefined) b.writeBigUInt64BE(BigInt.asUintN(64, r.handle), 8);
  else {
    b.writeUInt32BE((r.handleHi ?? 0) >>> 0, 8);
    b.writeUInt32BE((r.handleLo ?? 0) >>> 0, 12);
  }
  writeU64(b, 16, r.offset);
  b.writeUInt32BE(r.length >>> 0, 24);
  if (payload) b.set(payload, C.REQUEST_HEADER_SIZE);
  return b;
}

/** Parses a 28-byte request header (a WRITE's payload follows and is not included). */
export function parseRequest(buf: Buffer, off = 0): Parse<RequestHeader> {
  if (buf.length - off < C.REQUEST_HEADER_SIZE) return more(C.REQUEST_HEADER_SIZE);
  const magic = buf.readUInt32BE(off);
  if (magic !== C.REQUEST_MAGIC) {
    return fail(magic === C.EXTENDED_REQUEST_MAGIC ? 'extended request header not negotiated' : `bad request magic 0x${magic.toString(16)}`);
  }
  return ok(
    {
      flags: buf.readUInt16BE(off + 4),
      type: buf.readUInt16BE(off + 6),
      handleHi: buf.readUInt32BE(off + 8),
      handleLo: buf.readUInt32BE(off + 12),
      offset: readU64(buf, off + 16),
      length: buf.readUInt32BE(off + 24),
    },
    C.REQUEST_HEADER_SIZE,
  );
}

export function handleToBigInt(hi: number, lo: number): bigint {
  return (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);
}

// =========================================================================== transmission: replies

/** Writes a 16-byte simple reply header at `off` (the server reserves room in front of read data). */
export function writeSimpleReply(target: Buffer, off: number, error: number, handleHi: number, handleLo: number): void {
  target.writeUInt32BE(C.SIMPLE_REPLY_MAGIC, off);
  target.writeUInt32BE(error >>> 0, off + 4);
  target.writeUInt32BE(handleHi, off + 8);
  target.writeUInt32BE(handleLo, off + 12);
}

export function encodeSimpleReply(error: number, handleHi: number, handleLo: number): Buffer {
  const b = Buffer.allocUnsafe(C.SIMPLE_REPLY_SIZE);
  writeSimpleReply(b, 0, error, handleHi, handleLo);
  return b;
}

/** Writes a 20-byte structured chunk header at `off`. */
export function writeChunkHeader(
  target: Buffer, off: number, flags: number, type: number, handleHi: number, handleLo: number, length: number,
): void {
  target.writeUInt32BE(C.STRUCTURED_REPLY_MAGIC, off);
  target.writeUInt16BE(flags, off + 4);
  target.writeUInt16BE(type, off + 6);
  target.writeUInt32BE(handleHi, off + 8);
  target.writeUInt32BE(handleLo, off + 12);
  target.writeUInt32BE(length >>> 0, off + 16);
}

/**
 * Writes the 28-byte prefix of an OFFSET_DATA chunk (header + offset) at `off`; `dataLength`
 * bytes of data follow it in the same buffer or in the next write.
 */
export function writeOffsetDataPrefix(
  target: Buffer, off: number, flags: number, handleHi: number, handleLo: number, offset: number, dataLength: number,
): void {
  writeChunkHeader(target, off, flags, C.NBD_REPLY_TYPE_OFFSET_DATA, handleHi, handleLo, 8 + dataLength);
  writeU64(target, off + C.STRUCTURED_REPLY_HEADER_SIZE, offset);
}

export function encodeOffsetData(flags: number, handleHi: number, handleLo: number, offset: number, data: Uint8Array): Buffer {
  const b = Buffer.allocUnsafe(C.OFFSET_DATA_PREFIX + data.length);
  writeOffsetDataPrefix(b, 0, flags, handleHi, handleLo, offset, data.length);
  b.set(data, C.OFFSET_DATA_PREFIX);
  return b;
}

export function encodeOffsetHole(flags: number, handleHi: number, handleLo: number, offset: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(C.STRUCTURED_REPLY_HEADER_SIZE + 12);
  writeChunkHeader(b, 0, flags, C.NBD_REPLY_TYPE_OFFSET_HOLE, handleHi, handleLo, 12);
  writeU64(b, 20, offset);
  b.writeUInt32BE(length >>> 0, 28);
  return b;
}

export function encodeNoneChunk(handleHi: number, handleLo: number): Buffer {
  const b = Buffer.allocUnsafe(C.STRUCTURED_REPLY_HEADER_SIZE);
  writeChunkHeader(b, 0, C.NBD_REPLY_FLAG_DONE, C.NBD_REPLY_TYPE_NONE, handleHi, handleLo, 0);
  return b;
}

export interface StatusDescriptor {
  length: number;
  flags: number;
}

export function encodeBlockStatusChunk(
  flags: number, handleHi: number, handleLo: number, contextId: number, descriptors: readonly StatusDescriptor[],
): Buffer {
  const len = 4 + 8 * descriptors.length;
  const b = Buffer.allocUnsafe(C.STRUCTURED_REPLY_HEADER_SIZE + len);
  writeChunkHeader(b, 0, flags, C.NBD_REPLY_TYPE_BLOCK_STATUS, handleHi, handleLo, len);
  b.writeUInt32BE(contextId >>> 0, 20);
  let p = 24;
  for (const d of descriptors) {
    b.writeUInt32BE(d.length >>> 0, p);
    b.writeUInt32BE(d.flags >>> 0, p + 4);
    p += 8;
  }
  return b;
}

/** ERROR chunk (or ERROR_OFFSET when `offset` is given); the message is cut to 4096 bytes. */
export function encodeErrorChunk(
  flags: number, handleHi: number, handleLo: number, error: number, message = '', offset?: number,
): Buffer {
  const msg = truncateUtf8(message, C.MAX_STRING_LENGTH);
  const extra = offset === undefined ? 0 : 8;
  const len = 6 + msg.length + extra;
  const b = Buffer.allocUnsafe(C.STRUCTURED_REPLY_HEADER_SIZE + len);
  const type = offset === undefined ? C.NBD_REPLY_TYPE_ERROR : C.NBD_REPLY_TYPE_ERROR_OFFSET;
  writeChunkHeader(b, 0, flags, type, handleHi, handleLo, len);
  b.writeUInt32BE(error >>> 0, 20);
  b.writeUInt16BE(msg.length, 24);
  msg.copy(b, 26);
  if (offset !== undefined) writeU64(b, 26 + msg.length, offset);
  return b;
}

export type ReplyHeader =
  | { magic: 'simple'; error: number; handleHi: number; handleLo: number }
  | { magic: 'structured'; flags: number; type: number; handleHi: number; handleLo: number; length: number };

/** Parses a simple reply (16 bytes) or a structured chunk header (20 bytes; payload not included). */
export function parseReplyHeader(buf: Buffer, off = 0): Parse<ReplyHeader> {
  if (buf.length - off < 4) return more(4);
  const magic = buf.readUInt32BE(off);
  if (magic === C.SIMPLE_REPLY_MAGIC) {
    if (buf.length - off < C.SIMPLE_REPLY_SIZE) return more(C.SIMPLE_REPLY_SIZE);
    return ok(
      { magic: 'simple', error: buf.readUInt32BE(off + 4), handleHi: buf.readUInt32BE(off + 8), handleLo: buf.readUInt32BE(off + 12) },
      C.SIMPLE_REPLY_SIZE,
    );
  }
  if (magic === C.STRUCTURED_REPLY_MAGIC) {
    if (buf.length - off < C.STRUCTURED_REPLY_HEADER_SIZE) return more(C.STRUCTURED_REPLY_HEADER_SIZE);
    return ok(
      {
        magic: 'structured',
        flags: buf.readUInt16BE(off + 4),
        type: buf.readUInt16BE(off + 6),
        handleHi: buf.readUInt32BE(off + 8),
        handleLo: buf.readUInt32BE(off + 12),
        length: buf.readUInt32BE(off + 16),
      },
      C.STRUCTURED_REPLY_HEADER_SIZE,
    );
  }
  return fail(`bad reply magic 0x${magic.toString(16)}`);
}

export type ChunkPayload =
  | { type: typeof C.NBD_REPLY_TYPE_NONE }
  | { type: typeof C.NBD_REPLY_TYPE_OFFSET_DATA; offset: number; data: Buffer }
  | { type: typeof C.NBD_REPLY_TYPE_OFFSET_HOLE; offset: number; length: number }
  | { type: typeof C.NBD_REPLY_TYPE_BLOCK_STATUS; contextId: number; descriptors: StatusDescriptor[] }
  | { type: typeof C.NBD_REPLY_TYPE_ERROR; error: number; message: string }
  | { type: typeof C.NBD_REPLY_TYPE_ERROR_OFFSET; error: number; message: string; offset: number }
  | { type: number; unknown: true; data: Buffer };

/** Interprets a structured chunk's payload (the bytes after its 20-byte header). */
export function parseChunkPayload(type: number, p: Buffer): Parse<ChunkPayload> {
  switch (type) {
    case C.NBD_REPLY_TYPE_NONE:
      return p.length === 0 ? ok({ type }, 0) : fail('NONE chunk with payload');
    case C.NBD_REPLY_TYPE_OFFSET_DATA:
      if (p.length < 9) return fail('OFFSET_DATA shorter than 9 bytes');
      return ok({ type, offset: readU64(p, 0), data: p.subarray(8) }, p.length);
    case C.NBD_REPLY_TYPE_OFFSET_HOLE:
      if (p.length !== 12) return fail('OFFSET_HOLE length must be 12');
      if (p.readUInt32BE(8) === 0) return fail('OFFSET_HOLE of size 0');
      return ok({ type, offset: readU64(p, 0), length: p.readUInt32BE(8) }, 12);
    case C.NBD_REPLY_TYPE_BLOCK_STATUS: {
      if (p.length < 12 || (p.length - 4) % 8 !== 0) return fail('BLOCK_STATUS length must be 4 + 8n, n >= 1');
      const descriptors: StatusDescriptor[] = [];
      for (let i = 4; i < p.length; i += 8) descriptors.push({ length: p.readUInt32BE(i), flags: p.readUInt32BE(i + 4) });
      return ok({ type, contextId: p.readUInt32BE(0), descriptors }, p.length);
    }
    case C.NBD_REPLY_TYPE_ERROR:
    case C.NBD_REPLY_TYPE_ERROR_OFFSET: {
      const extra = type === C.NBD_REPLY_TYPE_ERROR ? 0 : 8;
      if (p.length < 6 + extra) return fail('error chunk too short');
      const mlen = p.readUInt16BE(4);
      if (mlen > p.length - 6 - extra) return fail('error chunk message length exceeds chunk');
      const message = decodeString(p.subarray(6, 6 + mlen)) ?? '';
      const error = p.readUInt32BE(0);
      if (type === C.NBD_REPLY_TYPE_ERROR) return ok({ type, error, message }, p.length);
      return ok({ type, error, message, offset: readU64(p, 6 + mlen) }, p.length);
    }
    default:
      return ok({ type, unknown: true, data: p }, p.length);
  }
}

// =========================================================================== helpers

/** UTF-8 bytes of `s`, cut at a character boundary so that they fit in `max` bytes. */
export function truncateUtf8(s: string, max: number): Buffer {
  const b = Buffer.from(s, 'utf8');
  if (b.length <= max) return b;
  let end = max;
  while (end > 0 && (b[end]! & 0xc0) === 0x80) end--;
  return b.subarray(0, end);
}
