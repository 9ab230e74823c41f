/**
 * Per-sector bitmaps of cache lines (valid, dirty, durably-valid), packed in 32-bit words.
 * Pure helpers over `Uint32Array` views so that one big array holds every slot's bitmap and a
 * slot's bitmap is a subarray of it (no per-slot allocation). Bit i = sector i of the line.
 */
export type Bitmap = Uint32Array;

/** Words needed for `bits` bits. */
export function wordsFor(bits: number): number {
  return Math.max(1, Math.ceil(bits / 32));
}

/** Sets bits [from, to). */
export function setRange(b: Bitmap, from: number, to: number): void {
  for (let i = from; i < to; i++) b[i >>> 5]! |= 1 << (i & 31);
}

/** Clears bits [from, to). */
export function clearRange(b: Bitmap, from: number, to: number): void {
  for (let i = from; i < to; i++) b[i >>> 5]! &= ~(1 << (i & 31));
}

export function test(b: Bitmap, i: number): boolean {
  return (b[i >>> 5]! & (1 << (i & 31))) !== 0;
}

/** Whether every bit of [from, to) is set. */
export function allSet(b: Bitmap, from: number, to: number): boolean {
  for (let i = from; i < to; i++) if (!test(b, i)) return false;
  return true;
}

/** Whether any bit of [from, to) is set. */
export function anySet(b: Bitmap, from: number, to: number): boolean {
  for (let i = from; i < to; i++) if (test(b, i)) return true;
  return false;
}

export function isEmpty(b: Bitmap): boolean {
  for (let w = 0; w < b.length; w++) if (b[w] !== 0) return false;
  return true;
}

/** Number of set bits. */
export function popcount(b: Bitmap): number {
  let n = 0;
  for (let w = 0; w < b.length; w++) {
    let v = b[w]! >>> 0;
    v = v - ((v >>> 1) & 0x55555555);
    v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
    n += (((v + (v >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
  }
  return n;
}

/** Maximal runs of set bits within [from, to): [start, end) pairs, ascending. */
export function runs(b: Bitmap, from: number, to: number, set = true): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  let start = -1;
  for (let i = from; i < to; i++) {
    if (test(b, i) === set) {
      if (start < 0) start = i;
    } else if (start >= 0) {
      out.push([start, i]);
      start = -1;
    }
  }
  if (start >= 0) out.push([start, to]);
  return out;
}

/**
 * How bits [from, to) of the bitmap at word `off` of `b` are set: 1 all, -1 none, 0 some. Works
 * on the big array with an offset (no subarray per call: this runs once per slot on every cache
 * hit) and a word at a time.
 */
export function coverage(b: Bitmap, off: number, from: number, to: number): 1 | 0 | -1 {
  let all = true;
  let any = false;
  for (let i = from; i < to; ) {
    const w = i >>> 5;
    const lo = i & 31;
    const hi = Math.min(32, to - (w << 5));
    const mask = hi - lo === 32 ? 0xffffffff : ((1 << (hi - lo)) - 1) << lo;
    const bits = (b[off + w]! & mask) >>> 0;
    if (bits !== 0) any = true;
    if (bits !== mask >>> 0) all = false;
    if (any && !all) return 0;
    i = (w + 1) << 5;
  }
  return all ? 1 : any ? 0 : -1;
}
