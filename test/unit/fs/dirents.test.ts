// parseDirents (getdents64 records -> entries) is a pure codec: round trip and fuzz.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { parseDirents } from '../../../lib/fs/local.js';

function encode(ents: { ino: bigint; off: bigint; type: number; name: Buffer }[]): Buffer {
  const parts = ents.map((e) => {
    const reclen = (19 + e.name.length + 1 + 7) & ~7;
    const b = Buffer.alloc(reclen);
    b.writeBigUInt64LE(e.ino, 0);
    b.writeBigInt64LE(e.off, 8);
    b.writeUInt16LE(reclen, 16);
    b[18] = e.type;
    e.name.copy(b, 19);
    return b;
  });
  return Buffer.concat(parts);
}

const name = fc.uint8Array({ minLength: 1, maxLength: 255 }).map((a) => Buffer.from(a.map((x) => (x === 0 || x === 0x2f ? 0x61 : x))));
const ent = fc.record({
  ino: fc.bigInt({ min: 0n, max: 2n ** 53n - 1n }),
  off: fc.bigInt({ min: 0n, max: 2n ** 63n - 1n }),
  type: fc.integer({ min: 0, max: 14 }),
  name,
});

describe('parseDirents', () => {
  it('round-trips linux_dirent64 records, 63-bit offsets exact', () => {
    fc.assert(
      fc.property(fc.array(ent, { maxLength: 20 }), (ents) => {
        const got = parseDirents(encode(ents));
        expect(got.map((g) => ({ ino: BigInt(g.ino), off: g.off, type: g.type, name: Buffer.from(g.name) }))).toEqual(ents);
      }),
    );
  });

  it('never throws or reads past a truncated or garbage buffer', () => {
    fc.assert(
      fc.property(fc.array(ent, { minLength: 1, maxLength: 5 }), fc.nat(), fc.uint8Array({ maxLength: 64 }), (ents, cut, junk) => {
        const buf = encode(ents);
        const n = cut % buf.length;
        const out = parseDirents(Buffer.concat([buf.subarray(0, n), Buffer.from(junk)]));
        for (const e of out) expect(e.name.length).toBeLessThanOrEqual(255 + 8);
      }),
    );
    expect(parseDirents(Buffer.alloc(0))).toEqual([]);
    // A record claiming a length below the header stops the parse (no infinite loop).
    const bad = Buffer.alloc(24);
    bad.writeUInt16LE(0, 16);
    expect(parseDirents(bad)).toEqual([]);
  });
});
