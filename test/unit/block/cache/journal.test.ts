import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { allSet, anySet, clearRange, popcount, runs, setRange, test as bit } from '../../../../lib/block/cache/bitmap.js';
import { BLOCK, computeLayout, decodeBlock, decodeSuper, encodeBlock, encodeSuper, packBlocks, RecordType, type MetaRecord } from '../../../../lib/block/cache/journal.js';
import { TwoQueue } from '../../../../lib/block/cache/twoq.js';

const slotRec = (slot: number, words = 1): MetaRecord => ({ type: RecordType.Slot, slot, disk: 3, line: slot * 7, epoch: slot + 1, valid: new Uint32Array(words).fill(slot) });

describe('bitmaps', () => {
  it('set, clear, test, runs and popcount agree with a boolean array model', () => {
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.boolean(), fc.nat(255), fc.nat(255)), { maxLength: 30 }), (ops) => {
        const b = new Uint32Array(8);
        const model = new Array<boolean>(256).fill(false);
        for (const [set, x, y] of ops) {
          const [from, to] = x <= y ? [x, y] : [y, x];
          if (set) setRange(b, from, to);
          else clearRange(b, from, to);
          for (let i = from; i < to; i++) model[i] = set;
        }
        expect(popcount(b)).toBe(model.filter(Boolean).length);
        for (let i = 0; i < 256; i++) expect(bit(b, i)).toBe(model[i]);
        const r = runs(b, 0, 256);
        const fromRuns = new Array<boolean>(256).fill(false);
        for (const [a, z] of r) for (let i = a; i < z; i++) fromRuns[i] = true;
        expect(fromRuns).toEqual(model);
        expect(allSet(b, 10, 20)).toBe(model.slice(10, 20).every(Boolean));
        expect(anySet(b, 10, 20)).toBe(model.slice(10, 20).some(Boolean));
      }),
    );
  });
});

describe('journal blocks', () => {
  it('round-trip every record type', () => {
    const recs: MetaRecord[] = [
      { type: RecordType.Disk, disk: 2, key: 'vm1/disk0 é', size: 1 << 30 },
      { type: RecordType.DiskDrop, disk: 2 },
      { type: RecordType.EpochDone, disk: 2, epoch: 123456789 },
      slotRec(9, 8),
      { type: RecordType.Checkpoint, nextSeq: 77, blocks: 3 },
    ];
    const b = encodeBlock(42, 1000, recs);
    expect(b.length).toBe(BLOCK);
    expect(decodeBlock(b, 42, 1000)).toEqual(recs);
  });

  it('refuses a block of another stream or seq, a torn block and any flipped bit', () => {
    const recs = Array.from({ length: 50 }, (_, i) => slotRec(i));
    const b = encodeBlock(7, 5, recs);
    expect(decodeBlock(b, 8, 5)).toBeNull();
    expect(decodeBlock(b, 7, 6)).toBeNull();
    // torn: the second half of the block is from an older write
    const torn = Buffer.from(b);
    encodeBlock(7, 4, recs.slice(0, 10)).copy(torn, 2048, 2048);
    torn.fill(0xee, 3000, 4096);
    expect(decodeBlock(torn, 7, 5)).toEqual(recs); // bytes past `used` do not matter...
    const used = b.readUInt16LE(16);
    fc.assert(
      fc.property(fc.nat(used - 1), fc.integer({ min: 0, max: 7 }), (at, bitNo) => {
        const c = Buffer.from(b);
        c[at] ^= 1 << bitNo;
        expect(decodeBlock(c, 7, 5)).toBeNull(); // ...every byte before it does
      }),
    );
    expect(decodeBlock(Buffer.alloc(BLOCK), 0, 0)).toBeNull();
  });

  it('fuzz: random bytes never decode and never throw', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: BLOCK, maxLength: BLOCK }), fc.nat(), (bytes, seq) => {
        const b = Buffer.from(bytes);
        expect(decodeBlock(b, b.readUInt32LE(4), seq)).toBeNull();
      }),
    );
  });

  it('packs groups without splitting one across blocks', () => {
    const groups = Array.from({ length: 400 }, (_, i) => [slotRec(i * 3), slotRec(i * 3 + 1), slotRec(i * 3 + 2)]);
    const blocks = packBlocks(groups);
    expect(blocks.flat().length).toBe(1200);
    for (const blk of blocks) {
      expect(() => encodeBlock(0, 0, blk)).not.toThrow();
      const slots = blk.map((r) => (r as { slot: number }).slot);
      expect(slots[0]! % 3).toBe(0);
      expect(slots.length % 3).toBe(0);
    }
  });

  it('superblock round-trips; a damaged one is an error, a blank one is a fresh device', () => {
    const layout = computeLayout(64 * 1024 * 1024, 65536)!;
    const sb = { ...layout, version: 1, uuid: '12345678-9abc-def0-1234-56789abcdef0' };
    const b = encodeSuper(sb);
    expect(decodeSuper(b)).toEqual(sb);
    b[20]! ^= 1;
    expect(() => decodeSuper(b)).toThrow(/checksum/);
    expect(decodeSuper(Buffer.alloc(BLOCK))).toBeNull();
  });

  it('layouts fit their device', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 4096 }), fc.constantFrom(4096, 65536, 1 << 20), (mib, line) => {
        const size = mib * 1024 * 1024;
        const l = computeLayout(size, line);
        if (!l) return;
        expect(l.dataStart + l.slots * line).toBeLessThanOrEqual(size);
        expect(l.journalStart + l.journalBlocks).toBeLessThanOrEqual(l.dataStart / BLOCK);
        expect(l.checkpointStart[1] + l.checkpointBlocks).toBeLessThanOrEqual(l.journalStart);
      }),
    );
  });
});

describe('2Q eviction', () => {
  it('a scan does not flush the hot set (plain LRU would)', () => {
    const q = new TwoQueue<number>(100);
    const resident = new Set<number>();
    const access = (k: number): void => {
      if (!q.has(k)) {
        while (resident.size >= 100) {
          const v = q.victim()!;
          q.remove(v);
          resident.delete(v);
        }
        resident.add(k);
      }
      q.touch(k);
    };
    // a hot set of 20 keys, referenced again after they left A1in (so they reach Am)
    for (let k = 0; k < 20; k++) access(k);
    for (let k = 1000; k < 1100; k++) access(k); // the 20 leave A1in (remembered as ghosts)
    for (let k = 0; k < 20; k++) access(k);
    expect(q.hotSize).toBe(20);
    const hot = [...Array(20).keys()];
    // a long scan of keys seen once
    for (let k = 10_000; k < 12_000; k++) access(k);
    expect(hot.filter((k) => q.has(k)).length).toBe(20);
  });

  it('skips keys that cannot be evicted', () => {
    const q = new TwoQueue<number>(10);
    for (let k = 0; k < 5; k++) q.touch(k);
    expect(q.victim((k) => k > 2)).toBe(3);
    expect(q.victim(() => false)).toBeUndefined();
  });
});
