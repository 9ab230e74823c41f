/**
 * Guest memory as the back end sees it: regions of guest-physical address space, each mapped
 * from the front end's memfd (native mmapShared), with the front end's own virtual address for
 * each region (vring addresses arrive in that space). Translation returns Buffers that are views
 * of the mapping — never copies — after checking that every byte lies inside a mapped region.
 *
 * A region is held as chunks (ArrayBuffers of at most CHUNK_SIZE bytes: typed arrays are limited
 * in length), so a range can be split at a chunk or region boundary; callers get a list of views.
 */

export const CHUNK_SHIFT = 30;
/** Size of the ArrayBuffers a region is split into (1 GiB). */
export const CHUNK_SIZE = 2 ** CHUNK_SHIFT;

export interface Region {
  guestAddr: number;
  size: number;
  userAddr: number;
  /** Views of the mapping, in order, each CHUNK_SIZE bytes but the last. */
  chunks: Uint8Array[];
}

export class MemoryError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'MemoryError';
  }
}

function overlaps(a0: number, alen: number, b0: number, blen: number): boolean {
  return a0 < b0 + blen && b0 < a0 + alen;
}

export class GuestMemory {
  private regions: Region[] = [];
  /** Last region that translated a guest address (most requests hit the same one). */
  private last: Region | null = null;

  get count(): number {
    return this.regions.length;
  }

  list(): readonly Region[] {
    return this.regions;
  }

  /** Adds a region; refuses one that overlaps another in either address space. */
  add(r: Region): void {
    const total = r.chunks.reduce((s, c) => s + c.length, 0);
    if (!Number.isSafeInteger(r.guestAddr) || !Number.isSafeInteger(r.userAddr) || !Number.isSafeInteger(r.size) || r.size <= 0) {
      throw new MemoryError(`bad region ${r.guestAddr}+${r.size}`);
    }
    if (total !== r.size) throw new MemoryError(`region of ${r.size} bytes mapped as ${total}`);
    if (!Number.isSafeInteger(r.guestAddr + r.size) || !Number.isSafeInteger(r.userAddr + r.size)) {
      throw new MemoryError('region past 2^53');
    }
    for (const o of this.regions) {
      if (overlaps(o.guestAddr, o.size, r.guestAddr, r.size) || overlaps(o.userAddr, o.size, r.userAddr, r.size)) {
        throw new MemoryError(`region 0x${r.guestAddr.toString(16)}+0x${r.size.toString(16)} overlaps another`);
      }
    }
    this.regions.push(r);
    this.regions.sort((a, b) => a.guestAddr - b.guestAddr);
  }

  /** Removes the region with this guest address and size (REM_MEM_REG); returns it, or null. */
  remove(guestAddr: number, size: number): Region | null {
    const i = this.regions.findIndex((r) => r.guestAddr === guestAddr && r.size === size);
    if (i < 0) return null;
    const [r] = this.regions.splice(i, 1);
    if (this.last === r) this.last = null;
    return r!;
  }

  clear(): void {
    this.regions = [];
    this.last = null;
  }

  private findGuest(addr: number): Region | null {
    const l = this.last;
    if (l !== null && addr >= l.guestAddr && addr < l.guestAddr + l.size) return l;
    for (const r of this.regions) {
      if (addr >= r.guestAddr && addr < r.guestAddr + r.size) {
        this.last = r;
        return r;
      }
    }
    return null;
  }

  /**
   * Appends views of guest-physical [addr, addr + len) to `out`, split where regions or chunks
   * end. Returns false (and appends nothing) when any byte is outside guest memory.
   * A zero-length range appends nothing and succeeds.
   */
  guestViews(addr: number, len: number, out: Buffer[]): boolean {
    if (len === 0) return true;
    if (!(addr >= 0) || !(len > 0) || !Number.isSafeInteger(addr + len)) return false;
    const start = out.length;
    let a = addr;
    let left = len;
    while (left > 0) {
      const r = this.findGuest(a);
      if (r === null) {
        out.length = start;
        return false;
      }
      const off = a - r.guestAddr;
      const ci = Math.floor(off / CHUNK_SIZE);
      const c = r.chunks[ci]!;
      const co = off - ci * CHUNK_SIZE;
      const n = Math.min(left, c.length - co);
      out.push(Buffer.from(c.buffer, c.byteOffset + co, n));
      a += n;
      left -= n;
    }
    return true;
  }

  /** One contiguous view of guest-physical [addr, addr + len), or null (unmapped or split). */
  guestView(addr: number, len: number): Buffer | null {
    const r = this.findGuest(addr);
    if (r === null) return null;
    return contiguous(r, addr - r.guestAddr, len);
  }

  /** One contiguous view of front-end-virtual [addr, addr + len) (vring addresses), or null. */
  userView(addr: number, len: number): Buffer | null {
    for (const r of this.regions) {
      if (addr >= r.userAddr && addr < r.userAddr + r.size) return contiguous(r, addr - r.userAddr, len);
    }
    return null;
  }

  /** The guest-physical address of a front-end-virtual address, or -1. */
  userToGuest(addr: number): number {
    for (const r of this.regions) {
      if (addr >= r.userAddr && addr < r.userAddr + r.size) return r.guestAddr + (addr - r.userAddr);
    }
    return -1;
  }
}

function contiguous(r: Region, off: number, len: number): Buffer | null {
  if (!(len >= 0) || !Number.isSafeInteger(off + len) || off + len > r.size) return null;
  const ci = Math.floor(off / CHUNK_SIZE);
  const c = r.chunks[ci];
  if (c === undefined) return null;
  const co = off - ci * CHUNK_SIZE;
  if (co + len > c.length) return null;
  return Buffer.from(c.buffer, c.byteOffset + co, len);
}

/** A region over plain memory (tests, fuzzing): chunks are views of `buf`. */
export function regionOf(buf: Uint8Array, guestAddr: number, userAddr: number): Region {
  const chunks: Uint8Array[] = [];
  for (let o = 0; o < buf.length; o += CHUNK_SIZE) chunks.push(buf.subarray(o, Math.min(buf.length, o + CHUNK_SIZE)));
  return { guestAddr, size: buf.length, userAddr, chunks };
}
