// The split-ring walker over plain memory: well-formed chains (direct and indirect) come back as
// exact views; corrupt rings fail with RingError; random rings never crash or escape memory.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { GuestMemory, regionOf } from '../../../lib/vhost/memory.js';
import {
  needEvent,
  ringSizes,
  RingError,
  SplitRing,
  VRING_AVAIL_F_NO_INTERRUPT,
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  type Element,
} from '../../../lib/vhost/virtqueue.js';

const GPA = 0x100000;
const UVA = 0x7f0000000000;
const RAM = 256 * 1024;
const DATA = 64 * 1024; // data buffers live at [DATA, RAM)

interface Harness {
  ram: Buffer;
  mem: GuestMemory;
  ring: SplitRing;
  size: number;
  desc: (i: number, addr: number, len: number, flags: number, next?: number, at?: number) => void;
  avail: (heads: number[]) => void;
  usedIdx: () => number;
  usedElem: (i: number) => { id: number; len: number };
}

function harness(size = 16, eventIdx = false): Harness {
  const ram = Buffer.alloc(RAM);
  const mem = new GuestMemory();
  mem.add(regionOf(ram, GPA, UVA));
  const s = ringSizes(size);
  const availOff = s.desc;
  const usedOff = (availOff + s.avail + 3) & ~3;
  const ring = new SplitRing(mem, {
    size,
    desc: ram.subarray(0, s.desc),
    avail: ram.subarray(availOff, availOff + s.avail),
    used: ram.subarray(usedOff, usedOff + s.used),
    eventIdx,
  });
  let availIdx = 0;
  return {
    ram,
    mem,
    ring,
    size,
    desc(i, addr, len, flags, next = 0, at = 0) {
      const o = at + i * 16;
      ram.writeBigUInt64LE(BigInt(addr), o);
      ram.writeUInt32LE(len, o + 8);
      ram.writeUInt16LE(flags, o + 12);
      ram.writeUInt16LE(next, o + 14);
    },
    avail(heads) {
      for (const h of heads) {
        ram.writeUInt16LE(h, availOff + 4 + 2 * (availIdx % size));
        availIdx = (availIdx + 1) & 0xffff;
      }
      ram.writeUInt16LE(availIdx, availOff + 2);
    },
    usedIdx: () => ram.readUInt16LE(usedOff + 2),
    usedElem: (i) => ({ id: ram.readUInt32LE(usedOff + 4 + 8 * i), len: ram.readUInt32LE(usedOff + 8 + 8 * i) }),
  };
}

/** [offset in ram, length] of each view, to compare with what was described. */
function spans(h: Harness, views: Buffer[]): [number, number][] {
  return views.map((v) => {
    expect(v.buffer).toBe(h.ram.buffer); // a view, not a copy
    return [v.byteOffset - h.ram.byteOffset, v.length];
  });
}

describe('SplitRing', () => {
  it('pops well-formed direct and indirect chains as exact views, and pushes used entries', () => {
    const seg = fc.record({ len: fc.integer({ min: 1, max: 2048 }), write: fc.boolean() });
    const chain = fc.record({ segs: fc.array(seg, { minLength: 1, maxLength: 5 }), indirect: fc.boolean() });
    fc.assert(
      fc.property(fc.array(chain, { minLength: 1, maxLength: 8 }), (chains) => {
        const h = harness(16);
        let nextDesc = 0;
        let dataAt = DATA;
        let tableAt = 8192; // indirect tables between the rings and the data
        const expected: { head: number; r: [number, number][]; w: [number, number][] }[] = [];
        const heads: number[] = [];
        for (const c of chains) {
          const segs = [...c.segs].sort((a, b) => Number(a.write) - Number(b.write)); // readable first
          const r: [number, number][] = [];
          const w: [number, number][] = [];
          const place = (at: number, i: number, s: { len: number; write: boolean }, last: boolean, next: number, tableOff: number) => {
            h.desc(i, GPA + at, s.len, (s.write ? VRING_DESC_F_WRITE : 0) | (last ? 0 : VRING_DESC_F_NEXT), next, tableOff);
            (s.write ? w : r).push([at, s.len]);
          };
          let head: number;
          if (c.indirect && nextDesc < 16) {
            head = nextDesc++;
            segs.forEach((s, i) => {
              place(dataAt, i, s, i === segs.length - 1, i + 1, tableAt);
              dataAt += s.len;
            });
            h.desc(head, GPA + tableAt, 16 * segs.length, VRING_DESC_F_INDIRECT);
            tableAt += 16 * segs.length;
          } else {
            if (nextDesc + segs.length > 16) break;
            head = nextDesc;
            segs.forEach((s, i) => {
              place(dataAt, nextDesc, s, i === segs.length - 1, nextDesc + 1, 0);
              nextDesc++;
              dataAt += s.len;
            });
          }
          heads.push(head);
          expected.push({ head, r, w });
        }
        h.avail(heads);
        const got: Element[] = [];
        let el: Element | null;
        while ((el = h.ring.pop()) !== null) got.push(el);
        expect(got.map((e) => ({ head: e.head, r: spans(h, e.readable), w: spans(h, e.writable) }))).toEqual(expected);
        for (const e of got) {
          expect(e.error).toBeUndefined();
          expect(e.writableMapped).toBe(true);
          h.ring.push(e.head, e.writableLen);
        }
        expect(h.usedIdx()).toBe(got.length);
        got.forEach((e, i) => expect(h.usedElem(i)).toEqual({ id: e.head, len: e.writableLen }));
      }),
      { numRuns: 300 },
    );
  });

  it('flags per-request errors: buffers outside memory, readable after writable', () => {
    const h = harness(8);
    h.desc(0, GPA + DATA, 16, VRING_DESC_F_NEXT, 1);
    h.desc(1, GPA + RAM - 4, 100, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2); // runs past the end of memory
    h.desc(2, GPA + DATA + 100, 1, VRING_DESC_F_WRITE);
    h.desc(3, 2 ** 60, 16, VRING_DESC_F_NEXT, 4); // far outside
    h.desc(4, GPA + DATA, 1, VRING_DESC_F_WRITE);
    h.desc(5, GPA + DATA + 200, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 6);
    h.desc(6, GPA + DATA, 16, 0); // readable after writable
    h.desc(7, GPA + RAM, 1, VRING_DESC_F_WRITE); // just past the end
    h.avail([0, 3, 5, 7]);
    const a = h.ring.pop()!;
    expect(a.error).toMatch(/outside guest memory/);
    expect(a.writableMapped).toBe(true); // the last writable buffer is fine
    expect(a.writable.map((v) => v.length)).toEqual([1]);
    const b = h.ring.pop()!;
    expect(b.error).toMatch(/outside guest memory/);
    expect(b.writableMapped).toBe(true);
    expect(b.writable).toHaveLength(1);
    const c = h.ring.pop()!;
    expect(c.error).toMatch(/readable descriptor after a device-writable/);
    const d = h.ring.pop()!;
    expect(d.writableMapped).toBe(false);
    expect(h.ring.pop()).toBeNull();
  });

  it('throws RingError on corrupt rings: loops, long chains, bad heads, nested indirect, runaway avail idx', () => {
    const cases: [string, (h: Harness) => void][] = [
      ['loop', (h) => { h.desc(0, GPA + DATA, 1, VRING_DESC_F_NEXT, 1); h.desc(1, GPA + DATA, 1, VRING_DESC_F_NEXT, 0); h.avail([0]); }],
      ['self loop', (h) => { h.desc(0, GPA + DATA, 1, VRING_DESC_F_NEXT, 0); h.avail([0]); }],
      ['next out of range', (h) => { h.desc(0, GPA + DATA, 1, VRING_DESC_F_NEXT, 99); h.avail([0]); }],
      ['head out of range', (h) => h.avail([8])],
      ['indirect loop', (h) => {
        h.desc(0, GPA + 8192, 32, VRING_DESC_F_INDIRECT);
        h.desc(0, GPA + DATA, 1, VRING_DESC_F_NEXT, 1, 8192);
        h.desc(1, GPA + DATA, 1, VRING_DESC_F_NEXT, 0, 8192);
        h.avail([0]);
      }],
      ['nested indirect', (h) => {
        h.desc(0, GPA + 8192, 16, VRING_DESC_F_INDIRECT);
        h.desc(0, GPA + 8192, 16, VRING_DESC_F_INDIRECT, 0, 8192);
        h.avail([0]);
      }],
      ['indirect with NEXT', (h) => { h.desc(0, GPA + 8192, 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 1); h.avail([0]); }],
      ['indirect table of odd size', (h) => { h.desc(0, GPA + 8192, 17, VRING_DESC_F_INDIRECT); h.avail([0]); }],
      ['indirect table outside memory', (h) => { h.desc(0, GPA + RAM - 8, 16, VRING_DESC_F_INDIRECT); h.avail([0]); }],
      ['indirect not at head', (h) => { h.desc(0, GPA + DATA, 1, VRING_DESC_F_NEXT, 1); h.desc(1, GPA + 8192, 16, VRING_DESC_F_INDIRECT); h.avail([0]); }],
      ['avail idx runs ahead', (h) => { h.ram.writeUInt16LE(9, ringSizes(8).desc + 2); }],
    ];
    for (const [name, setup] of cases) {
      const h = harness(8);
      setup(h);
      expect(() => h.ring.pop(), name).toThrow(RingError);
    }
  });

  it('fuzz: random rings and tables never crash, hang or yield views outside guest memory', () => {
    fc.assert(
      fc.property(
        fc.uint8Array({ minLength: 8 * 16, maxLength: 8 * 16 }),
        fc.uint8Array({ minLength: 256, maxLength: 256 }),
        fc.array(fc.integer({ min: 0, max: 15 }), { minLength: 1, maxLength: 10 }),
        fc.integer({ min: 0, max: 0xffff }),
        (descBytes, tableBytes, heads, idxJitter) => {
          const h = harness(8);
          // Random descriptors, with addresses pulled into (or near) guest memory half the time.
          Buffer.from(descBytes).copy(h.ram, 0);
          Buffer.from(tableBytes).copy(h.ram, 8192);
          for (let i = 0; i < 8 + 16; i++) {
            const at = i < 8 ? i * 16 : 8192 + (i - 8) * 16;
            if (h.ram[at + 15]! & 1) h.ram.writeBigUInt64LE(BigInt(GPA + (h.ram.readUInt32LE(at) % (RAM + 64))), at);
            if (h.ram[at + 14]! & 1) h.ram.writeUInt32LE(h.ram.readUInt32LE(at + 8) % 4096, at + 8);
            if (i < 8 && h.ram[at + 13]! & 1) h.ram.writeBigUInt64LE(BigInt(GPA + 8192 + (h.ram[at]! % 8) * 16), at);
          }
          h.avail(heads);
          if (idxJitter % 7 === 0) h.ram.writeUInt16LE(idxJitter, ringSizes(8).desc + 2);
          for (let n = 0; n < 20; n++) {
            let el: Element | null;
            try {
              el = h.ring.pop();
            } catch (e) {
              expect(e).toBeInstanceOf(RingError);
              return;
            }
            if (el === null) return;
            for (const v of [...el.readable, ...el.writable]) {
              expect(v.buffer).toBe(h.ram.buffer);
              expect(v.byteOffset - h.ram.byteOffset + v.length).toBeLessThanOrEqual(RAM);
            }
            h.ring.push(el.head, 0);
          }
        },
      ),
      { numRuns: 1500 },
    );
  });

  it('notifies per EVENT_IDX (used_event) or the NO_INTERRUPT flag, and asks for kicks', () => {
    expect(needEvent(0, 1, 0)).toBe(true);
    expect(needEvent(5, 3, 2)).toBe(false);
    expect(needEvent(5, 6, 2)).toBe(true);
    expect(needEvent(0xffff, 0, 0xfffe)).toBe(true); // wraps

    const h = harness(8, true);
    const availOff = ringSizes(8).desc;
    h.desc(0, GPA + DATA, 1, VRING_DESC_F_WRITE);
    h.avail([0, 0, 0]);
    for (let i = 0; i < 3; i++) h.ring.pop();
    h.ring.push(0, 1);
    expect(h.ring.needNotify()).toBe(true); // first one always
    h.ram.writeUInt16LE(5, availOff + 4 + 2 * 8); // used_event = 5: notify once used idx passes 5
    h.ring.push(0, 1);
    expect(h.ring.needNotify()).toBe(false);
    h.ring.push(0, 1);
    expect(h.ring.needNotify()).toBe(false);
    h.ram.writeUInt16LE(3, availOff + 4 + 2 * 8); // the driver has seen 3 entries: wants the 4th
    h.ring.push(0, 1); // used idx 4 passes used_event 3
    expect(h.ring.needNotify()).toBe(true);
    // enableNotify writes avail_event = lastAvail and reports nothing pending.
    expect(h.ring.enableNotify()).toBe(false);
    const usedOff = (availOff + ringSizes(8).avail + 3) & ~3;
    expect(h.ram.readUInt16LE(usedOff + 4 + 8 * 8)).toBe(3);

    const g = harness(8, false);
    g.desc(0, GPA + DATA, 1, VRING_DESC_F_WRITE);
    g.avail([0]);
    g.ring.pop();
    g.ring.push(0, 1);
    expect(g.ring.needNotify()).toBe(true);
    g.ram.writeUInt16LE(VRING_AVAIL_F_NO_INTERRUPT, availOff);
    expect(g.ring.needNotify()).toBe(false);
  });

  it('rejects bad ring geometry', () => {
    const ram = Buffer.alloc(4096);
    const mem = new GuestMemory();
    const o = { desc: ram, avail: ram.subarray(0, 100), used: ram.subarray(0, 200), eventIdx: false };
    expect(() => new SplitRing(mem, { ...o, size: 3 })).toThrow(RingError);
    expect(() => new SplitRing(mem, { ...o, size: 65536 })).toThrow(RingError);
    expect(() => new SplitRing(mem, { ...o, size: 64 })).toThrow(/too small/);
    expect(() => new SplitRing(mem, { ...o, size: 4, used: ram.subarray(2, 200) })).toThrow(/misaligned/);
  });
});

describe('GuestMemory', () => {
  it('translates across adjacent regions into split views and refuses overlaps and gaps', () => {
    const a = Buffer.alloc(4096);
    const b = Buffer.alloc(4096);
    const m = new GuestMemory();
    m.add(regionOf(a, 0x10000, 0x5000000));
    m.add(regionOf(b, 0x11000, 0x9000000));
    const out: Buffer[] = [];
    expect(m.guestViews(0x10ff0, 32, out)).toBe(true);
    expect(out.map((v) => v.length)).toEqual([16, 16]);
    expect(out[0]!.buffer).toBe(a.buffer);
    expect(out[1]!.buffer).toBe(b.buffer);
    expect(m.guestView(0x10ff0, 32)).toBeNull(); // not contiguous
    expect(m.guestViews(0x11ff0, 32, out)).toBe(false); // runs off the end
    expect(out).toHaveLength(2); // nothing appended on failure
    expect(m.guestViews(0xfff0, 32, out)).toBe(false);
    expect(m.userView(0x9000000 + 4090, 6)!.buffer).toBe(b.buffer);
    expect(m.userView(0x9000000 + 4090, 7)).toBeNull();
    expect(m.userToGuest(0x5000010)).toBe(0x10010);
    expect(() => m.add(regionOf(Buffer.alloc(16), 0x10ff8, 0x1))).toThrow(/overlaps/);
    expect(() => m.add(regionOf(Buffer.alloc(16), 0x1, 0x5000008))).toThrow(/overlaps/);
    expect(m.remove(0x10000, 4096)).not.toBeNull();
    expect(m.guestViews(0x10ff0, 1, [])).toBe(false);
    expect(m.remove(0x10000, 4096)).toBeNull();
  });
});
