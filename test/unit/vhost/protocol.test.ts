// vhost-user codec: round trips, size checks, and fuzzing (any bytes -> a value or ProtocolError).
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  decodeConfig,
  decodeHeader,
  decodeInflight,
  decodeMemRegionMsg,
  decodeMemTable,
  decodeU64,
  decodeVringAddr,
  decodeVringState,
  encodeConfig,
  encodeInflight,
  encodeMemRegionMsg,
  encodeMemTable,
  encodeMessage,
  encodeU64,
  encodeVringAddr,
  encodeVringState,
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  HEADER_SIZE,
  MAX_PAYLOAD,
  MessageReader,
  ProtocolError,
  Req,
  requestName,
  type Message,
} from '../../../lib/vhost/protocol.js';

const u64 = fc.bigInt({ min: 0n, max: (1n << 64n) - 1n });
const u32 = fc.integer({ min: 0, max: 0xffffffff });
const region = fc.record({ guestAddr: u64, size: u64, userAddr: u64, mmapOffset: u64 });

describe('vhost-user codec', () => {
  it('encodes headers with version 1 and decodes them back', () => {
    const m = encodeMessage(Req.GET_FEATURES, FLAG_NEED_REPLY, encodeU64(5n));
    expect(m.length).toBe(HEADER_SIZE + 8);
    expect(decodeHeader(m)).toEqual({ request: 1, flags: 0x9, size: 8 });
    expect(decodeU64(m.subarray(HEADER_SIZE))).toBe(5n);
    expect(requestName(Req.SET_VRING_KICK)).toBe('SET_VRING_KICK');
    expect(requestName(999)).toBe('UNKNOWN(999)');
  });

  it('refuses a bad version and oversized payloads', () => {
    const m = encodeMessage(1, 0);
    m.writeUInt32LE(2, 4);
    expect(() => decodeHeader(m)).toThrow(ProtocolError);
    m.writeUInt32LE(1, 4);
    m.writeUInt32LE(MAX_PAYLOAD + 1, 8);
    expect(() => decodeHeader(m)).toThrow(/exceeds/);
    expect(() => decodeHeader(Buffer.alloc(11))).toThrow(/short/);
  });

  it('round-trips every payload type', () => {
    fc.assert(
      fc.property(u64, u32, u32, (v, a, b) => {
        expect(decodeU64(encodeU64(v))).toBe(v);
        expect(decodeVringState(encodeVringState({ index: a, num: b }))).toEqual({ index: a, num: b });
      }),
    );
    fc.assert(
      fc.property(fc.record({ index: u32, flags: u32, desc: u64, used: u64, avail: u64, log: u64 }), (a) => {
        expect(decodeVringAddr(encodeVringAddr(a))).toEqual(a);
      }),
    );
    fc.assert(
      fc.property(fc.array(region, { maxLength: 8 }), region, (rs, r) => {
        expect(decodeMemTable(encodeMemTable(rs))).toEqual(rs);
        expect(decodeMemRegionMsg(encodeMemRegionMsg(r))).toEqual(r);
      }),
    );
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 128 }), u32, fc.uint8Array({ maxLength: 128 }), (offset, flags, d) => {
        const c = { offset, flags, data: Buffer.from(d) };
        expect(decodeConfig(encodeConfig(c))).toEqual(c);
      }),
    );
    fc.assert(
      fc.property(u64, u64, fc.integer({ min: 0, max: 0xffff }), fc.integer({ min: 0, max: 0xffff }), (s, o, n, q) => {
        const i = { mmapSize: s, mmapOffset: o, numQueues: n, queueSize: q };
        expect(decodeInflight(encodeInflight(i))).toEqual(i);
      }),
    );
  });

  it('checks payload sizes', () => {
    expect(() => decodeU64(Buffer.alloc(7))).toThrow(ProtocolError);
    expect(() => decodeU64(Buffer.alloc(9))).toThrow(ProtocolError);
    expect(() => decodeVringState(Buffer.alloc(4))).toThrow(ProtocolError);
    expect(() => decodeVringAddr(Buffer.alloc(39))).toThrow(ProtocolError);
    const t = encodeMemTable([{ guestAddr: 0n, size: 1n, userAddr: 0n, mmapOffset: 0n }]);
    t.writeUInt32LE(2, 0); // claims two regions, carries one
    expect(() => decodeMemTable(t)).toThrow(ProtocolError);
    t.writeUInt32LE(9, 0);
    expect(() => decodeMemTable(t)).toThrow(/9 regions/);
    // The whole 8-region array (older front ends) is accepted.
    const full = Buffer.alloc(8 + 8 * 32);
    full.writeUInt32LE(1, 0);
    expect(decodeMemTable(full)).toHaveLength(1);
    const c = encodeConfig({ offset: 0, flags: 0, data: Buffer.alloc(10) });
    expect(() => decodeConfig(c.subarray(0, 20))).toThrow(ProtocolError);
    c.writeUInt32LE(250, 0); // offset + size past 256
    expect(() => decodeConfig(c)).toThrow(ProtocolError);
    expect(() => decodeInflight(Buffer.alloc(16))).toThrow(ProtocolError);
  });

  it('fuzz: decoders answer any bytes with a value or a ProtocolError', () => {
    const decoders = [decodeHeader, decodeU64, decodeVringState, decodeVringAddr, decodeMemTable, decodeMemRegionMsg, decodeConfig, decodeInflight];
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 400 }), (b) => {
        for (const d of decoders) {
          try {
            d(Buffer.from(b));
          } catch (e) {
            expect(e).toBeInstanceOf(ProtocolError);
          }
        }
      }),
      { numRuns: 800 },
    );
  });

  it('MessageReader reassembles messages from any split of the stream, fds with their message', () => {
    const msgArb = fc.record({
      request: fc.integer({ min: 1, max: 40 }),
      flags: fc.constantFrom(0, FLAG_REPLY, FLAG_NEED_REPLY),
      payload: fc.uint8Array({ maxLength: 300 }),
      fds: fc.array(fc.integer({ min: 3, max: 1000 }), { maxLength: 3 }),
    });
    fc.assert(
      fc.property(fc.array(msgArb, { minLength: 1, maxLength: 6 }), fc.array(fc.integer({ min: 1, max: 50 }), { minLength: 1 }), (msgs, cuts) => {
        // The kernel delivers fds with the first byte of the sendmsg that carried them; the
        // reader reads headers and payloads in exact pieces, so a piece is never split across messages.
        const r = new MessageReader();
        const out: Message[] = [];
        let ci = 0;
        for (const m of msgs) {
          const wire = encodeMessage(m.request, m.flags, m.payload);
          let off = 0;
          let fdsSent = false;
          while (off < wire.length) {
            const want = r.want();
            const n = Math.min(want.length, cuts[ci++ % cuts.length]!, wire.length - off);
            wire.copy(want, 0, off, off + n);
            off += n;
            const got = r.advance(n, fdsSent ? [] : m.fds);
            fdsSent = true;
            if (got) out.push(got);
          }
        }
        expect(out.map((m) => ({ request: m.request, flags: m.flags | 1, payload: new Uint8Array(m.payload), fds: m.fds }))).toEqual(
          msgs.map((m) => ({ request: m.request, flags: m.flags | 1, payload: new Uint8Array(m.payload), fds: m.fds })),
        );
        expect(r.midMessage).toBe(false);
      }),
    );
  });
});
