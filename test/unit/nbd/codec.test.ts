/** The pure NBD codec: round trips of every frame, and fuzzing of every parser. */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import * as codec from '../../../lib/nbd/codec.js';
import * as C from '../../../lib/nbd/constants.js';

const u32 = fc.integer({ min: 0, max: 0xffffffff });
const u16 = fc.integer({ min: 0, max: 0xffff });
const safeU64 = fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER });
const nameArb = fc.string({ maxLength: 64 }).filter((s) => !s.includes('\0'));

describe('codec round trips', () => {
  it('server greeting and client flags', () => {
    fc.assert(
      fc.property(u16, u32, (hf, cf) => {
        const g = codec.parseServerGreeting(codec.encodeServerGreeting(hf));
        expect(g).toEqual({ kind: 'ok', value: { handshakeFlags: hf }, size: 18 });
        expect(codec.parseClientFlags(codec.encodeClientFlags(cf))).toEqual({ kind: 'ok', value: cf, size: 4 });
      }),
    );
  });

  it('option header', () => {
    fc.assert(
      fc.property(u32, fc.uint8Array({ maxLength: 100 }), (opt, data) => {
        const b = codec.encodeOption(opt, data);
        expect(codec.parseOptionHeader(b)).toEqual({ kind: 'ok', value: { option: opt, length: data.length }, size: 16 });
        expect(b.subarray(16)).toEqual(Buffer.from(data));
      }),
    );
  });

  it('INFO/GO request', () => {
    fc.assert(
      fc.property(nameArb, fc.array(u16, { maxLength: 10 }), (name, infos) => {
        const r = codec.parseInfoRequest(codec.encodeInfoRequest(name, infos));
        expect(r.kind === 'ok' && r.value).toEqual({ name, infos });
      }),
    );
  });

  it('meta context request', () => {
    fc.assert(
      fc.property(nameArb, fc.array(nameArb, { maxLength: 8 }), (name, queries) => {
        const r = codec.parseMetaContextRequest(codec.encodeMetaContextRequest(name, queries));
        expect(r.kind === 'ok' && r.value).toEqual({ name, queries });
      }),
    );
  });

  it('option replies: REP_SERVER, REP_INFO (all types), REP_META_CONTEXT, errors', () => {
    fc.assert(
      fc.property(u32, u32, nameArb, nameArb, safeU64, u16, (opt, type, name, desc, size, flags) => {
        const rep = codec.parseOptionReply(codec.encodeOptionReply(opt, type, codec.encodeRepServer(name, desc)));
        if (rep.kind !== 'ok') throw new Error('parse');
        expect([rep.value.option, rep.value.type]).toEqual([opt >>> 0, type >>> 0]);
        expect(codec.parseRepServer(rep.value.data)).toMatchObject({ kind: 'ok', value: { name, description: desc } });
        expect(codec.parseInfo(codec.encodeInfoExport(size, flags))).toMatchObject({ value: { type: 0, size, flags } });
        expect(codec.parseInfo(codec.encodeInfoString(C.NBD_INFO_NAME, name))).toMatchObject({ value: { type: 1, name } });
        expect(codec.parseInfo(codec.encodeInfoString(C.NBD_INFO_DESCRIPTION, desc))).toMatchObject({ value: { type: 2, description: desc } });
        expect(codec.parseInfo(codec.encodeInfoBlockSize(512, 4096, 1 << 25))).toMatchObject({
          value: { type: 3, minimum: 512, preferred: 4096, maximum: 1 << 25 },
        });
        expect(codec.parseRepMetaContext(codec.encodeRepMetaContext(opt, name))).toMatchObject({ value: { id: opt, name } });
      }),
    );
    const e = codec.parseOptionReply(codec.encodeOptionError(7, C.NBD_REP_ERR_UNKNOWN, 'x'.repeat(5000)));
    if (e.kind !== 'ok') throw new Error('parse');
    expect(codec.isOptionError(e.value.type)).toBe(true);
    expect(e.value.data.length).toBe(C.MAX_STRING_LENGTH);
  });

  it('EXPORT_NAME reply, with and without zeroes', () => {
    fc.assert(
      fc.property(safeU64, u16, fc.boolean(), (size, flags, nz) => {
        const b = codec.encodeExportNameReply(size, flags, nz);
        expect(b.length).toBe(nz ? 10 : 134);
        expect(codec.parseExportNameReply(b, 0, nz)).toEqual({ kind: 'ok', value: { size, flags }, size: b.length });
      }),
    );
  });

  it('request header, with 64-bit handles and offsets', () => {
    fc.assert(
      fc.property(u16, u16, fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }), safeU64, u32, (flags, type, handle, offset, length) => {
        const b = codec.encodeRequest({ flags, type, handle, offset, length });
        const r = codec.parseRequest(b);
        if (r.kind !== 'ok') throw new Error('parse');
        expect(codec.handleToBigInt(r.value.handleHi, r.value.handleLo)).toBe(handle);
        expect(r.value).toMatchObject({ flags, type, offset, length });
      }),
    );
    // Offsets past 2^53 stay past every export size.
    const r = codec.parseRequest(codec.encodeRequest({ type: 0, offset: 0xfffffffffffffe00n, length: 512 }));
    expect(r.kind === 'ok' && r.value.offset > Number.MAX_SAFE_INTEGER).toBe(true);
    expect(() => codec.writeU64(Buffer.alloc(8), 0, 2 ** 64)).toThrow(RangeError);
  });

  it('simple replies and every structured chunk', () => {
    fc.assert(
      fc.property(u32, u32, u32, safeU64, fc.uint8Array({ minLength: 1, maxLength: 64 }), nameArb, (hi, lo, err, off, data, msg) => {
        const s = codec.parseReplyHeader(codec.encodeSimpleReply(err, hi, lo));
        expect(s).toEqual({ kind: 'ok', value: { magic: 'simple', error: err, handleHi: hi, handleLo: lo }, size: 16 });
        const chunk = (b: Buffer): codec.ChunkPayload => {
          const h = codec.parseReplyHeader(b);
          if (h.kind !== 'ok' || h.value.magic !== 'structured') throw new Error('hdr');
          expect([h.value.handleHi, h.value.handleLo]).toEqual([hi, lo]);
          expect(h.value.length).toBe(b.length - 20);
          const p = codec.parseChunkPayload(h.value.type, b.subarray(20));
          if (p.kind !== 'ok') throw new Error('payload');
          return p.value;
        };
        expect(chunk(codec.encodeOffsetData(0, hi, lo, off, data))).toEqual({ type: 1, offset: off, data: Buffer.from(data) });
        expect(chunk(codec.encodeOffsetHole(1, hi, lo, off, err || 1))).toEqual({ type: 2, offset: off, length: err || 1 });
        expect(chunk(codec.encodeNoneChunk(hi, lo))).toEqual({ type: 0 });
        const descs = [{ length: err || 1, flags: 3 }, { length: 512, flags: 0 }];
        expect(chunk(codec.encodeBlockStatusChunk(1, hi, lo, 1, descs))).toEqual({ type: 5, contextId: 1, descriptors: descs });
        expect(chunk(codec.encodeErrorChunk(1, hi, lo, err || 5, msg))).toEqual({ type: C.NBD_REPLY_TYPE_ERROR, error: err || 5, message: msg });
        expect(chunk(codec.encodeErrorChunk(1, hi, lo, 5, msg, off))).toEqual({ type: C.NBD_REPLY_TYPE_ERROR_OFFSET, error: 5, message: msg, offset: off });
      }),
    );
  });

  it('truncateUtf8 cuts at a character boundary', () => {
    const s = 'é'.repeat(10); // 2 bytes each
    expect(codec.truncateUtf8(s, 5).toString()).toBe('éé');
    expect(codec.decodeString(codec.truncateUtf8('a€'.repeat(2000), 4096))).not.toBeNull();
  });

  it('strings: NUL, invalid UTF-8 and > 4096 bytes are rejected', () => {
    expect(codec.decodeString(Buffer.from('a\0b'))).toBeNull();
    expect(codec.decodeString(Buffer.from([0xff, 0xfe]))).toBeNull();
    expect(codec.decodeString(Buffer.alloc(4097, 0x61))).toBeNull();
    expect(codec.decodeString(Buffer.alloc(4096, 0x61))).toBe('a'.repeat(4096));
  });
});

describe('codec parsers never throw and never read out of bounds', () => {
  // A buffer that is a view into a larger one filled with a sentinel: a parser that read past
  // its end would pick up sentinel bytes; Buffer methods throw on real out-of-bounds reads.
  const framed = fc.tuple(fc.uint8Array({ maxLength: 300 }), fc.nat({ max: 16 })).map(([bytes, pre]) => {
    const big = Buffer.alloc(pre + bytes.length + 64, 0xa5);
    big.set(bytes, pre);
    return { buf: big.subarray(0, pre + bytes.length), off: pre, bytes: Buffer.from(bytes) };
  });

  const check = (r: codec.Parse<unknown>, available: number): void => {
    expect(['ok', 'more', 'error']).toContain(r.kind);
    if (r.kind === 'ok') expect(r.size).toBeLessThanOrEqual(available);
    if (r.kind === 'more') expect(r.need).toBeGreaterThan(available);
  };

  it('frame parsers at an offset', () => {
    fc.assert(
      fc.property(framed, fc.boolean(), ({ buf, off }, nz) => {
        const avail = buf.length - off;
        check(codec.parseServerGreeting(buf, off), avail);
        check(codec.parseClientFlags(buf, off), avail);
        check(codec.parseOptionHeader(buf, off), avail);
        check(codec.parseOptionReply(buf, off), avail);
        check(codec.parseRequest(buf, off), avail);
        check(codec.parseReplyHeader(buf, off), avail);
        check(codec.parseExportNameReply(buf, off, nz), avail);
      }),
      { numRuns: 2000 },
    );
  });

  it('payload parsers', () => {
    fc.assert(
      fc.property(framed, u16, ({ bytes }, type) => {
        for (const r of [
          codec.parseExportNameData(bytes),
          codec.parseInfoRequest(bytes),
          codec.parseMetaContextRequest(bytes),
          codec.parseRepServer(bytes),
          codec.parseInfo(bytes),
          codec.parseRepMetaContext(bytes),
          codec.parseChunkPayload(type, bytes),
          codec.parseChunkPayload(type % 8, bytes),
          codec.parseChunkPayload(C.NBD_REPLY_TYPE_ERROR_OFFSET, bytes),
        ]) {
          check(r, bytes.length);
        }
      }),
      { numRuns: 2000 },
    );
  });

  it('mutated valid frames', () => {
    const valid = [
      codec.encodeInfoRequest('disk', [3, 1]),
      codec.encodeMetaContextRequest('disk', ['base:allocation', 'x:y']),
      codec.encodeRequest({ type: 1, offset: 512, length: 4096 }),
      codec.encodeOptionReply(7, 3, codec.encodeInfoBlockSize(1, 4096, 1 << 25)),
      codec.encodeErrorChunk(1, 0, 1, 5, 'msg', 4096),
      codec.encodeBlockStatusChunk(1, 0, 1, 1, [{ length: 4096, flags: 3 }]),
    ];
    fc.assert(
      fc.property(fc.constantFrom(...valid), fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { maxLength: 6 }), fc.nat(), (v, muts, cut) => {
        const b = Buffer.from(v);
        for (const [i, x] of muts) b[i % b.length] = x;
        const t = b.subarray(0, cut % (b.length + 1));
        check(codec.parseInfoRequest(t), t.length);
        check(codec.parseMetaContextRequest(t), t.length);
        check(codec.parseRequest(t), t.length);
        check(codec.parseOptionReply(t), t.length);
        check(codec.parseReplyHeader(t), t.length);
        if (t.length >= 20) check(codec.parseChunkPayload(t.readUInt16BE(6), t.subarray(20)), t.length - 20);
      }),
      { numRuns: 3000 },
    );
  });
});
