/**
 * Dirty-region log (DRL): one write-intent bitmap per replica of a replicated volume, kept in one
 * local file. Bit k of replica R set = region k (bytes [k*regionSize, (k+1)*regionSize)) of R
 * may differ from the in-sync replicas and must be copied before R is in sync again.
 *
 * File layout (all integers little-endian):
 *
 *   [0, 4096)        header copy 0 ┐ double-buffered: a header update is written to the copy that
 *   [4096, 8192)     header copy 1 ┘ does not hold the current one, with generation + 1, then synced
 *   [8192 + i*B, …)  bitmap of slot i (B = bitmap bytes rounded up to 4096)
 *
 *   header: magic "VSTDRL\0\1" | u32 version | u32 slots | u64 generation | u64 size |
 *           u32 regionSize | u32 reserved | slots × (u8 idLength, id bytes) | … | u32 crc32 at 4092
 *
 * Crash safety:
 *   - Header: open() takes the copy with a valid CRC and the highest generation. A torn header
 *     write leaves the other copy (the previous state) valid, so a crash during rename() loses at
 *     most that rename, never the file.
 *   - Bitmaps: a page of bitmap is written whole from the in-memory bitmap, and mark() resolves
 *     only after that write and an fdatasync. A torn page write leaves each sector either old or
 *     new. A bit that was durable before the write is 1 in the old sector and 1 in the new one
 *     (only clear() turns bits off, and losing a clear costs only a needless copy), so no mix of
 *     sectors loses it. A bit whose first setting is torn was never reported durable, so the
 *     write it protects was never issued/acknowledged. Writes of pages are serialized (one sync
 *     cycle at a time), so an older snapshot of a page can never land after a newer one.
 *   - Group commit: marks that arrive while a sync cycle runs join the next cycle; one
 *     fdatasync serves them all. Marking bits that are already durable does no I/O at all.
 *   - The file is created under a temporary name and renamed into place (then the directory is
 *     synced), so a crash during creation leaves no half-written log.
 */
import { open, rename, unlink, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { VolumeError, toVolumeError } from './errors.js';

export const DRL_MAGIC = Buffer.from('VSTDRL\0\x01', 'latin1');
export const DRL_VERSION = 1;
export const DRL_DEFAULT_REGION_SIZE = 1024 * 1024;
const HEADER_SIZE = 4096;
const PAGE = 4096;
const DATA_START = 2 * HEADER_SIZE;
const MAX_ID_BYTES = 255;
const FIXED_HEADER = 40;

export interface DirtyRegionLogOptions {
  /** Volume size in bytes. */
  size: number;
  /** Bytes covered by one bit (default 1 MiB); a positive multiple of 512. */
  regionSize?: number;
  /**
   * The replicas to track. A new file gets one slot per id. An existing file keeps its ids;
   * an id given here that the file does not know takes the slot of an id the file has and this
   * list lacks (that slot becomes all dirty: nothing is known about the new replica), so a
   * crash between a rebuild's rename and the resolver record update cannot lose a region.
   */
  replicaIds: string[];
}

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

/** CRC-32 (IEEE), pure. */
export function crc32(buf: Uint8Array): number {
  let c = 0xffffffff;
  for (let i = 0; i < buf.length; i++) c = CRC_TABLE[(c ^ buf[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

interface Header {
  generation: number;
  size: number;
  regionSize: number;
  ids: string[];
}

/** Encodes one header copy (pure). */
export function encodeDrlHeader(h: Header): Buffer {
  const b = Buffer.alloc(HEADER_SIZE);
  DRL_MAGIC.copy(b, 0);
  b.writeUInt32LE(DRL_VERSION, 8);
  b.writeUInt32LE(h.ids.length, 12);
  b.writeBigUInt64LE(BigInt(h.generation), 16);
  b.writeBigUInt64LE(BigInt(h.size), 24);
  b.writeUInt32LE(h.regionSize, 32);
  let pos = FIXED_HEADER;
  for (const id of h.ids) {
    const idb = Buffer.from(id, 'utf8');
    if (idb.length === 0 || idb.length > MAX_ID_BYTES) throw new VolumeError('EINVAL', `replica id "${id}" must be 1-${MAX_ID_BYTES} bytes`);
    if (pos + 1 + idb.length > HEADER_SIZE - 4) throw new VolumeError('EINVAL', 'too many replica ids for the log header');
    b[pos] = idb.length;
    idb.copy(b, pos + 1);
    pos += 1 + idb.length;
  }
  b.writeUInt32LE(crc32(b.subarray(0, HEADER_SIZE - 4)), HEADER_SIZE - 4);
  return b;
}

/** Decodes one header copy; null when it is not a valid one (torn, never written, not a DRL). */
export function decodeDrlHeader(b: Buffer): Header | null {
  if (b.length < HEADER_SIZE) return null;
  if (!b.subarray(0, 8).equals(DRL_MAGIC)) return null;
  if (b.readUInt32LE(HEADER_SIZE - 4) !== crc32(b.subarray(0, HEADER_SIZE - 4))) return null;
  if (b.readUInt32LE(8) !== DRL_VERSION) return null;
  const slots = b.readUInt32LE(12);
  const ids: string[] = [];
  let pos = FIXED_HEADER;
  for (let i = 0; i < slots; i++) {
    if (pos >= HEADER_SIZE - 4) return null;
    const n = b[pos]!;
    if (n === 0 || pos + 1 + n > HEADER_SIZE - 4) return null;
    ids.push(b.toString('utf8', pos + 1, pos + 1 + n));
    pos += 1 + n;
  }
  return {
    generation: Number(b.readBigUInt64LE(16)),
    size: Number(b.readBigUInt64LE(24)),
    regionSize: b.readUInt32LE(32),
    ids,
  };
}

interface Waiter {
  resolve: () => void;
  reject: (e: unknown) => void;
}

function popcount8(x: number): number {
  x = x - ((x >> 1) & 0x55);
  x = (x & 0x33) + ((x >> 2) & 0x33);
  return (x + (x >> 4)) & 0x0f;
}

export class DirtyRegionLog {
  readonly size: number;
  readonly regionSize: number;
  /** Number of regions (bits per bitmap). */
  readonly regions: number;
  /** Bytes of one bitmap in the file (rounded up to whole pages). */
  private readonly bitmapBytes: number;
  private ids: string[];
  private generation: number;
  /** In-memory bitmaps, by slot. */
  private readonly bits: Uint8Array[];
  /** Bits known to be durable in the file (a subset of what the file holds; cleared by clear()). */
  private readonly durable: Uint8Array[];
  /** Pages (slot * pagesPerBitmap + page) changed in memory and not yet written. */
  private readonly dirtyPages = new Set<number>();
  private readonly pagesPerBitmap: number;
  private waiters: Waiter[] = [];
  private cycle: Promise<void> | null = null;
  /** Serializes header updates with sync cycles. */
  private headerLock: Promise<void> = Promise.resolve();
  private closed = false;
  /** Completed fdatasync cycles (for tests of group commit). */
  syncs = 0;

  private constructor(
    private readonly fh: FileHandle,
    readonly path: string,
    h: Header,
    bitmaps: Uint8Array[],
  ) {
    this.size = h.size;
    this.regionSize = h.regionSize;
    this.regions = Math.ceil(h.size / h.regionSize);
    this.bitmapBytes = roundUp(Math.ceil(this.regions / 8), PAGE);
    this.pagesPerBitmap = this.bitmapBytes / PAGE;
    this.ids = [...h.ids];
    this.generation = h.generation;
    this.bits = bitmaps;
    this.durable = bitmaps.map((b) => Uint8Array.from(b));
  }

  /** Opens the log at `file`, creating it (all clean) when it does not exist. */
  static async open(file: string, opts: DirtyRegionLogOptions): Promise<DirtyRegionLog> {
    const regionSize = opts.regionSize ?? DRL_DEFAULT_REGION_SIZE;
    if (!Number.isSafeInteger(opts.size) || opts.size < 0) throw new VolumeError('EINVAL', `bad size ${opts.size}`);
    if (!Number.isSafeInteger(regionSize) || regionSize <= 0 || regionSize % 512 !== 0 || regionSize > 2 ** 31) {
      throw new VolumeError('EINVAL', `regionSize must be a positive multiple of 512, got ${regionSize}`);
    }
    if (opts.replicaIds.length === 0) throw new VolumeError('EINVAL', 'no replica ids');
    if (new Set(opts.replicaIds).size !== opts.replicaIds.length) throw new VolumeError('EINVAL', 'duplicate replica ids');
    const regions = Math.ceil(opts.size / regionSize);
    const bitmapBytes = roundUp(Math.ceil(regions / 8), PAGE);

    let fh: FileHandle;
    try {
      fh = await open(file, 'r+');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw toVolumeError(e);
      await create(file, { generation: 1, size: opts.size, regionSize, ids: opts.replicaIds }, bitmapBytes);
      fh = await open(file, 'r+');
    }
    try {
      const hb = Buffer.alloc(DATA_START);
      await fh.read(hb, 0, DATA_START, 0);
      const a = decodeDrlHeader(hb.subarray(0, HEADER_SIZE));
      const b = decodeDrlHeader(hb.subarray(HEADER_SIZE));
      const h = a && b ? (a.generation >= b.generation ? a : b) : (a ?? b);
      if (!h) throw new VolumeError('EIO', `${file}: no valid dirty-region log header`);
      if (h.size !== opts.size || h.regionSize !== regionSize) {
        throw new VolumeError('EINVAL', `${file}: log is for size ${h.size}/region ${h.regionSize}, asked ${opts.size}/${regionSize}`);
      }
      const st = await fh.stat();
      if (st.size < DATA_START + h.ids.length * bitmapBytes) throw new VolumeError('EIO', `${file}: log file is truncated`);
      const bitmaps: Uint8Array[] = [];
      for (let i = 0; i < h.ids.length; i++) {
        const bm = Buffer.alloc(bitmapBytes);
        await fh.read(bm, 0, bitmapBytes, DATA_START + i * bitmapBytes);
        bitmaps.push(bm);
      }
      const log = new DirtyRegionLog(fh, file, h, bitmaps);
      await log.adopt(opts.replicaIds);
      return log;
    } catch (e) {
      await fh.close().catch(() => {});
      throw toVolumeError(e);
    }
  }

  /** Replica ids, one per slot. */
  get replicaIds(): string[] {
    return [...this.ids];
  }

  has(replicaId: string): boolean {
    return this.ids.includes(replicaId);
  }

  /**
   * Sets the bits of every region [offset, offset+length) touches for `replicaId`; resolves once
   * they are durable. Bits that are already durable cost nothing (no I/O, an already-resolved
   * promise); concurrent marks share one fdatasync.
   */
  mark(replicaId: string, offset: number, length: number): Promise<void> {
    if (length <= 0) return Promise.resolve();
    let slot: number;
    try {
      slot = this.slot(replicaId);
      if (this.closed) throw new VolumeError('ESHUTDOWN', 'dirty-region log is closed');
    } catch (e) {
      return Promise.reject(e);
    }
    const first = Math.floor(offset / this.regionSize);
    const last = Math.min(this.regions - 1, Math.floor((offset + length - 1) / this.regionSize));
    return this.setBits(slot, first, last);
  }

  /** Marks one region by index. */
  markRegion(replicaId: string, region: number): Promise<void> {
    try {
      return this.setBits(this.slot(replicaId), region, region);
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /** True when every region [offset, offset+length) touches is marked durably for the replica. */
  isMarked(replicaId: string, offset: number, length: number): boolean {
    const slot = this.slot(replicaId);
    const first = Math.floor(offset / this.regionSize);
    const last = Math.min(this.regions - 1, Math.floor((offset + length - 1) / this.regionSize));
    const bm = this.bits[slot]!;
    const du = this.durable[slot]!;
    for (let k = first; k <= last; k++) {
      const m = 1 << (k & 7);
      if (!(bm[k >> 3]! & m) || !(du[k >> 3]! & m)) return false;
    }
    return true;
  }

  /** Marks every region (a replica that must be rebuilt whole). Resolves when durable. */
  setAll(replicaId: string): Promise<void> {
    try {
      return this.setBits(this.slot(replicaId), 0, this.regions - 1);
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /**
   * Clears one region's bit (after its copy was written and flushed). Not synced by itself:
   * a clear lost in a crash only costs a needless copy later.
   */
  clear(replicaId: string, region: number): void {
    const slot = this.slot(replicaId);
    if (region < 0 || region >= this.regions) return;
    const m = 1 << (region & 7);
    const i = region >> 3;
    if (!(this.bits[slot]![i]! & m)) return;
    this.bits[slot]![i]! &= ~m;
    this.durable[slot]![i]! &= ~m;
    this.dirtyPages.add(slot * this.pagesPerBitmap + Math.floor(i / PAGE));
    // Written with the next sync cycle (or close), never synced on its own.
  }

  isDirty(replicaId: string, region: number): boolean {
    const bm = this.bits[this.slot(replicaId)]!;
    return (bm[region >> 3]! & (1 << (region & 7))) !== 0;
  }

  /** Region indices whose bit is set, ascending. */
  dirtyRegions(replicaId: string): number[] {
    const bm = this.bits[this.slot(replicaId)]!;
    const out: number[] = [];
    const bytes = Math.ceil(this.regions / 8);
    for (let i = 0; i < bytes; i++) {
      const v = bm[i]!;
      if (v === 0) continue;
      for (let j = 0; j < 8; j++) if (v & (1 << j)) out.push(i * 8 + j);
    }
    return out;
  }

  /** Number of regions whose bit is set. */
  count(replicaId: string): number {
    const bm = this.bits[this.slot(replicaId)]!;
    const bytes = Math.ceil(this.regions / 8);
    let n = 0;
    for (let i = 0; i < bytes; i++) if (bm[i]) n += popcount8(bm[i]!);
    return n;
  }

  /** Bytes of the volume covered by set bits (the last region may be partial). */
  dirtyBytes(replicaId: string): number {
    const n = this.count(replicaId);
    if (n === 0) return 0;
    const lastPartial = this.size - (this.regions - 1) * this.regionSize;
    return this.isDirty(replicaId, this.regions - 1) ? (n - 1) * this.regionSize + lastPartial : n * this.regionSize;
  }

  /**
   * Gives a slot a new replica id (a rebuilt replica replaces a failed one). Bits are kept: a
   * rebuild calls setAll(old) first, then rename, so a crash between the two leaves the slot all
   * dirty. Resolves when the new header is durable.
   */
  async rename(oldId: string, newId: string): Promise<void> {
    this.slot(oldId);
    if (oldId === newId) return;
    if (this.ids.includes(newId)) throw new VolumeError('EEXIST', `replica id "${newId}" already in the log`);
    // The new ids are computed under the header lock, from the ids as they are then (two
    // renames at once must not undo each other).
    await this.writeHeader((ids) => {
      const slot = ids.indexOf(oldId);
      if (slot < 0) throw new VolumeError('ENOENT', `replica "${oldId}" is not in the dirty-region log`);
      if (ids.includes(newId)) throw new VolumeError('EEXIST', `replica id "${newId}" already in the log`);
      const next = [...ids];
      next[slot] = newId;
      return next;
    });
  }

  /** Writes pending changes (clears included) and closes the file. */
  async close(): Promise<void> {
    if (this.closed) return;
    try {
      await this.headerLock;
      if (this.dirtyPages.size) await this.sync();
      else if (this.cycle) await this.cycle;
    } finally {
      this.closed = true;
      const rejected = this.waiters.splice(0);
      for (const w of rejected) w.reject(new VolumeError('ESHUTDOWN', 'dirty-region log is closed'));
      await this.fh.close();
    }
  }

  // ---- internals ----

  private slot(replicaId: string): number {
    const s = this.ids.indexOf(replicaId);
    if (s < 0) throw new VolumeError('ENOENT', `replica "${replicaId}" is not in the dirty-region log`);
    return s;
  }

  private setBits(slot: number, first: number, last: number): Promise<void> {
    const bm = this.bits[slot]!;
    const du = this.durable[slot]!;
    let needSync = false;
    for (let k = first; k <= last; k++) {
      const m = 1 << (k & 7);
      const i = k >> 3;
      if (!(bm[i]! & m)) {
        bm[i]! |= m;
        this.dirtyPages.add(slot * this.pagesPerBitmap + Math.floor(i / PAGE));
        needSync = true;
      } else if (!(du[i]! & m)) {
        // Set in memory by someone else whose sync is still to come: wait for it as well.
        needSync = true;
      }
    }
    if (!needSync) return Promise.resolve();
    return this.sync();
  }

  /** Resolves after a sync cycle that starts after this call completes. */
  private sync(): Promise<void> {
    if (this.closed) return Promise.reject(new VolumeError('ESHUTDOWN', 'dirty-region log is closed'));
    const p = new Promise<void>((resolve, reject) => this.waiters.push({ resolve, reject }));
    if (!this.cycle) this.cycle = this.runCycles();
    return p;
  }

  private async runCycles(): Promise<void> {
    try {
      while (this.waiters.length > 0) {
        const batch = this.waiters.splice(0);
        try {
          await this.headerLock;
          await this.writePages();
          this.syncs++;
          for (const w of batch) w.resolve();
        } catch (e) {
          for (const w of batch) w.reject(toVolumeError(e));
        }
      }
    } finally {
      this.cycle = null;
    }
  }

  /** Writes the dirty pages from snapshots, fdatasyncs, then records what became durable. */
  private async writePages(): Promise<void> {
    const pages = [...this.dirtyPages].sort((a, b) => a - b);
    this.dirtyPages.clear();
    const snaps: { slot: number; page: number; snap: Buffer }[] = [];
    for (const p of pages) {
      const slot = Math.floor(p / this.pagesPerBitmap);
      const page = p % this.pagesPerBitmap;
      snaps.push({ slot, page, snap: Buffer.from(this.bits[slot]!.subarray(page * PAGE, (page + 1) * PAGE)) });
    }
    try {
      for (const s of snaps) {
        await this.fh.write(s.snap, 0, PAGE, DATA_START + s.slot * this.bitmapBytes + s.page * PAGE);
      }
      await this.fh.datasync();
    } catch (e) {
      for (const p of pages) this.dirtyPages.add(p);
      throw e;
    }
    // durable |= snapshot & memory-now: a bit cleared after the snapshot stays non-durable
    // (clear() zeroed it in `durable`, and the next cycle writes it as 0).
    for (const s of snaps) {
      const bm = this.bits[s.slot]!;
      const du = this.durable[s.slot]!;
      const base = s.page * PAGE;
      for (let i = 0; i < PAGE; i++) du[base + i]! |= s.snap[i]! & bm[base + i]!;
    }
  }

  private writeHeader(change: (ids: string[]) => string[]): Promise<void> {
    const run = async (): Promise<void> => {
      if (this.closed) throw new VolumeError('ESHUTDOWN', 'dirty-region log is closed');
      const ids = change(this.ids);
      const generation = this.generation + 1;
      const hb = encodeDrlHeader({ generation, size: this.size, regionSize: this.regionSize, ids });
      await this.fh.write(hb, 0, HEADER_SIZE, (generation % 2) * HEADER_SIZE);
      await this.fh.datasync();
      this.generation = generation;
      this.ids = ids;
    };
    const p = this.headerLock.then(run);
    this.headerLock = p.catch(() => {});
    return p;
  }

  /** Maps the asked replica ids onto the file's slots (see DirtyRegionLogOptions.replicaIds). */
  private async adopt(asked: string[]): Promise<void> {
    const missing = asked.filter((id) => !this.ids.includes(id));
    if (missing.length === 0) return;
    const free = this.ids.map((id, i) => (asked.includes(id) ? -1 : i)).filter((i) => i >= 0);
    if (free.length < missing.length) {
      throw new VolumeError('EINVAL', `${this.path}: no slot for replica(s) ${missing.join(', ')} (log has ${this.ids.join(', ')})`);
    }
    const ids = [...this.ids];
    for (const id of missing) {
      const slot = free.shift()!;
      await this.setBits(slot, 0, this.regions - 1);
      ids[slot] = id;
    }
    await this.writeHeader(() => ids);
  }
}

function roundUp(n: number, m: number): number {
  return Math.max(m, Math.ceil(n / m) * m);
}

async function create(file: string, h: Header, bitmapBytes: number): Promise<void> {
  const tmp = `${file}.${process.pid}.tmp`;
  const hb = encodeDrlHeader(h);
  const fh = await open(tmp, 'w');
  try {
    await fh.write(hb, 0, HEADER_SIZE, 0);
    await fh.write(hb, 0, HEADER_SIZE, HEADER_SIZE);
    await fh.truncate(DATA_START + h.ids.length * bitmapBytes);
    await fh.sync();
  } catch (e) {
    await fh.close().catch(() => {});
    await unlink(tmp).catch(() => {});
    throw e;
  }
  await fh.close();
  await rename(tmp, file);
  const dir = await open(path.dirname(file), 'r');
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}
