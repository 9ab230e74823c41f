/**
 * A sparse in-memory Volume: the bottom of test stacks (`Cache(Memory())`) and the model other
 * volumes are compared with. Data lives in fixed-size chunks in a Map; a chunk that was never
 * written (or was trimmed whole) is a hole, reads as zeroes and is reported by blockStatus as
 * {hole: true, zero: true}.
 *
 * Writes are "durable" on completion (there is nothing below memory), so flush and FUA are
 * accepted and trivially honoured; `stats` counts them so that tests of upper layers can check
 * that a flush or a FUA bit travelled down the stack.
 */
import { VolumeError } from './errors.js';
import type { BlockLimits, Extent, Volume, VolumeCapabilities, WriteOptions, ZeroOptions } from './volume.js';

export type MemoryOp = 'read' | 'write' | 'flush' | 'trim' | 'writeZeroes' | 'prefetch' | 'blockStatus';

export interface MemoryVolumeOptions {
  /** Size in bytes (a multiple of limits.minimum). */
  size: number;
  /** Allocation unit in bytes (a power of two); default 64 KiB. */
  chunkSize?: number;
  /** Block-size limits to advertise; defaults minimum 1, preferred 4096, maximum 32 MiB. */
  limits?: Partial<BlockLimits>;
  readOnly?: boolean;
  /**
   * Fault injection for tests: called before every operation; throwing (a VolumeError, or
   * anything, which becomes EIO) fails that operation. May return a promise to delay it.
   */
  hook?: (op: MemoryOp, offset: number, length: number) => void | Promise<void>;
}

export interface MemoryVolumeStats {
  reads: number;
  writes: number;
  fuaWrites: number;
  flushes: number;
  trims: number;
  writeZeroes: number;
}

export const DEFAULT_LIMITS: Readonly<BlockLimits> = Object.freeze({
  minimum: 1,
  preferred: 4096,
  maximum: 32 * 1024 * 1024,
});

/** Extents answered by one blockStatus call at most (the caller asks again for the rest). */
const MAX_EXTENTS = 1024;

export class MemoryVolume implements Volume {
  readonly size: number;
  readonly limits: BlockLimits;
  readonly caps: VolumeCapabilities;
  readonly stats: MemoryVolumeStats = { reads: 0, writes: 0, fuaWrites: 0, flushes: 0, trims: 0, writeZeroes: 0 };

  private readonly chunkSize: number;
  private readonly chunks = new Map<number, Buffer>();
  private readonly hook: MemoryVolumeOptions['hook'];
  private closed = false;

  constructor(opts: MemoryVolumeOptions) {
    const chunkSize = opts.chunkSize ?? 64 * 1024;
    if (!Number.isSafeInteger(chunkSize) || chunkSize <= 0 || (chunkSize & (chunkSize - 1)) !== 0) {
      throw new VolumeError('EINVAL', `chunkSize must be a power of two, got ${chunkSize}`);
    }
    const limits = { ...DEFAULT_LIMITS, ...opts.limits };
    if (!Number.isSafeInteger(opts.size) || opts.size < 0 || opts.size % limits.minimum !== 0) {
      throw new VolumeError('EINVAL', `size must be a non-negative multiple of ${limits.minimum}, got ${opts.size}`);
    }
    this.size = opts.size;
    this.chunkSize = chunkSize;
    this.limits = Object.freeze(limits);
    this.hook = opts.hook;
    const readOnly = opts.readOnly ?? false;
    this.caps = Object.freeze({
      readOnly,
      flush: true,
      fua: true,
      trim: !readOnly,
      writeZeroes: !readOnly,
      fastZero: !readOnly,
      blockStatus: true,
      prefetch: false,
      multiConn: true,
    });
  }

  /** Bytes held in memory (allocated chunks). */
  get allocatedBytes(): number {
    return this.chunks.size * this.chunkSize;
  }

  async read(offset: number, buf: Buffer): Promise<void> {
    await this.enter('read', offset, buf.length);
    this.stats.reads++;
    const cs = this.chunkSize;
    let pos = offset;
    let done = 0;
    while (done < buf.length) {
      const idx = Math.floor(pos / cs);
      const inChunk = pos - idx * cs;
      const n = Math.min(cs - inChunk, buf.length - done);
      const chunk = this.chunks.get(idx);
      if (chunk) chunk.copy(buf, done, inChunk, inChunk + n);
      else buf.fill(0, done, done + n);
      done += n;
      pos += n;
    }
  }

  async write(offset: number, buf: Buffer, opts?: WriteOptions): Promise<void> {
    await this.enter('write', offset, buf.length);
    this.writable();
    this.stats.writes++;
    if (opts?.fua) this.stats.fuaWrites++;
    const cs = this.chunkSize;
    let pos = offset;
    let done = 0;
    while (done < buf.length) {
      const idx = Math.floor(pos / cs);
      const inChunk = pos - idx * cs;
      const n = Math.min(cs - inChunk, buf.length - done);
      buf.copy(this.chunk(idx), inChunk, done, done + n);
      done += n;
      pos += n;
    }
  }

  async flush(): Promise<void> {
    await this.enter('flush', 0, 0);
    this.stats.flushes++;
  }

  async trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    await this.enter('trim', offset, length);
    this.writable();
    this.stats.trims++;
    this.zero(offset, length, true);
  }

  async writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    await this.enter('writeZeroes', offset, length);
    this.writable();
    this.stats.writeZeroes++;
    this.zero(offset, length, opts?.mayTrim ?? false);
  }

  async prefetch(offset: number, length: number): Promise<void> {
    await this.enter('prefetch', offset, length);
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    await this.enter('blockStatus', offset, length);
    const end = Math.min(offset + length, this.size);
    if (end <= offset) return [];
    const cs = this.chunkSize;
    const first = Math.floor(offset / cs);
    const last = Math.floor((end - 1) / cs);
    // Allocated chunk indices within the range, ascending. Scanning the map beats walking the
    // range when the range is much larger than what is allocated (a sparse terabyte).
    let allocated: number[];
    if (last - first + 1 <= this.chunks.size) {
      allocated = [];
      for (let i = first; i <= last; i++) if (this.chunks.has(i)) allocated.push(i);
    } else {
      allocated = [];
      for (const i of this.chunks.keys()) if (i >= first && i <= last) allocated.push(i);
      allocated.sort((a, b) => a - b);
    }
    const out: Extent[] = [];
    const push = (from: number, to: number, hole: boolean): void => {
      const prev = out[out.length - 1];
      if (prev && prev.hole === hole && prev.offset + prev.length === from) prev.length += to - from;
      else out.push({ offset: from, length: to - from, hole, zero: hole });
    };
    let pos = offset;
    for (const i of allocated) {
      const cStart = Math.max(i * cs, offset);
      const cEnd = Math.min((i + 1) * cs, end);
      if (cStart > pos) push(pos, cStart, true);
      if (out.length >= MAX_EXTENTS) return out;
      push(cStart, cEnd, false);
      pos = cEnd;
      if (out.length >= MAX_EXTENTS) return out;
    }
    if (pos < end) push(pos, end, true);
    return out;
  }

  async close(): Promise<void> {
    this.closed = true;
    this.chunks.clear();
  }

  private enter(op: MemoryOp, offset: number, length: number): void | Promise<void> {
    if (this.closed) throw new VolumeError('ESHUTDOWN', 'volume is closed');
    if (this.hook) {
      try {
        const r = this.hook(op, offset, length);
        if (r) return r.catch((e: unknown) => { throw asVolumeError(e); });
      } catch (e) {
        throw asVolumeError(e);
      }
    }
  }

  private writable(): void {
    if (this.caps.readOnly) throw new VolumeError('EROFS', 'volume is read-only');
  }

  private chunk(idx: number): Buffer {
    let c = this.chunks.get(idx);
    if (!c) {
      c = Buffer.alloc(this.chunkSize);
      this.chunks.set(idx, c);
    }
    return c;
  }

  /** Zeroes [offset, offset+length); whole chunks are freed when `free`, else zero-filled (allocated). */
  private zero(offset: number, length: number, free: boolean): void {
    const cs = this.chunkSize;
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const idx = Math.floor(pos / cs);
      const inChunk = pos - idx * cs;
      const n = Math.min(cs - inChunk, end - pos);
      const chunk = this.chunks.get(idx);
      // A chunk is wholly covered when the range spans it, or spans its part inside the volume.
      if (free && inChunk === 0 && (n === cs || pos + n === this.size)) this.chunks.delete(idx);
      else if (chunk) chunk.fill(0, inChunk, inChunk + n);
      else if (!free) this.chunk(idx); // fresh chunks are zero-filled: allocated zeroes
      pos += n;
    }
  }
}

function asVolumeError(e: unknown): VolumeError {
  return e instanceof VolumeError ? e : new VolumeError('EIO', e instanceof Error ? e.message : String(e), { cause: e });
}
