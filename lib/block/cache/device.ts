/**
 * The cache device: one file or block device shared by every cached disk of the host. It owns
 * the layout (journal.ts), the slot table (which disk line each slot holds, the line's epoch and
 * its valid sectors), the allocator that hands slots to disks, and the metadata commit.
 *
 * Crash contract of the metadata (what CacheVolume builds on):
 *   - a commit makes durable, in this order: the data of every slot write that completed before
 *     it (fdatasync), then the journal blocks describing the slot table at that point (written
 *     to fresh ring positions), then those blocks (fdatasync). Replay at open applies the newest
 *     complete checkpoint and then journal blocks seq after seq while they check (journal.ts);
 *   - a slot whose durable record says "free" or "invalid sector" may be written at any time; a
 *     slot is handed out again only after the record freeing it is durable (`free` holds only
 *     such slots; evicted ones wait in `freeing` for the next commit). So a crash never finds a
 *     durable mapping over data that belongs to something else;
 *   - `committedValid` is what the durable records say is valid. Fills (cache-on-read,
 *     write-through) only write sectors that are neither valid nor committed-valid, so a crash
 *     never finds a durable "valid" over data that was changed afterwards;
 *   - `committedEpoch` is the epoch the newest *completed* commit recorded for a slot. A write
 *     may overwrite a committed-valid sector in place only when that epoch is the write's own
 *     (a crash then finds the sector dirty in the same, unflushed epoch): a clean slot that
 *     joined a newer epoch in memory still says "clean, old epoch" on the device until the
 *     next commit, and data written into its valid sectors before then would come back after a
 *     crash as clean data the backing volume never had (CacheVolume commits first).
 *
 * Journal space: when the ring would wrap over blocks the newest checkpoint does not cover, the
 * commit writes a checkpoint of the whole table instead (into the older of two areas).
 *
 * Nothing here knows about epochs' meaning or write-back: that is CacheVolume's.
 */
import { randomUUID } from 'node:crypto';
import type { Logger } from 'pino';
import { VolumeError } from '../errors.js';
import type { Volume } from '../volume.js';
import { clearRange, isEmpty, popcount, wordsFor } from './bitmap.js';
import {
  BLOCK,
  computeLayout,
  decodeBlock,
  decodeSuper,
  encodeBlock,
  encodeSuper,
  FREE_DISK,
  packBlocks,
  RecordType,
  type MetaRecord,
  type Superblock,
} from './journal.js';

export const SECTOR = 4096;
export const DEFAULT_LINE_SIZE = 64 * 1024;
const FORMAT_VERSION = 1;
const CKPT_HEADER_XOR = 0xa5a5a5a5;

/** What the device knows of one cached disk. */
export interface DiskMeta {
  id: number;
  key: string;
  size: number;
  /** line -> slots holding it, ascending epoch (epoch 0: filled from the backing volume). */
  lines: Map<number, number[]>;
  /** Dirty sectors of epochs <= this have reached the backing volume. */
  epochDone: number;
  /** Highest epoch seen in a slot (replay) — a reopened disk continues above it. */
  maxEpoch: number;
  /** Slots held. */
  used: number;
  /** Most slots the disk may hold (the per-disk allotment; Infinity: no bound but the device). */
  allotment: number;
  /** Frees clean lines of this disk to make room; returns slots released (set by CacheVolume). */
  evict?: (want: number) => number;
}

/** Page-cache I/O completed in the calling turn or not at all (FileVolume has both). */
export interface SyncIo {
  readCachedSync?(offset: number, buf: Buffer): boolean;
  writeInlineSync?(offset: number, buf: Buffer): boolean;
}

export interface CacheDeviceOptions {
  /** Line size for a fresh format (a power of two, 4 KiB..1 MiB); an existing device keeps its own. */
  lineSize?: number;
  logger?: Pick<Logger, 'info' | 'warn' | 'error' | 'debug'>;
  /** Slots evicted at once when the free pool is empty (default: 1/64 of the slots, >= 4). */
  evictBatch?: number;
}

export interface DeviceStats {
  slots: number;
  freeSlots: number;
  lineSize: number;
  commits: number;
  checkpoints: number;
  journalBlocksWritten: number;
}

export class CacheDevice {
  readonly lineSize: number;
  readonly sectorsPerLine: number;
  readonly slots: number;
  readonly words: number;
  readonly uuid: string;
  readonly stats = { commits: 0, checkpoints: 0, journalBlocksWritten: 0 };

  /** Slot table. */
  readonly slotDisk: Int32Array;
  readonly slotLine: Float64Array;
  readonly slotEpoch: Float64Array;
  /** Valid sectors per slot (words per slot: `words`). */
  readonly valid: Uint32Array;
  /** What the durable metadata says is valid. */
  readonly committedValid: Uint32Array;
  /** The epoch of each slot's record in the newest completed commit (-1: none, or free). */
  readonly committedEpoch: Float64Array;

  private readonly sb: Superblock;
  private readonly stream: number;
  private readonly disks = new Map<number, DiskMeta>();
  private readonly byKey = new Map<string, DiskMeta>();
  private free: number[] = [];
  private freeing: number[] = [];
  /** Slots whose state changed since the last commit -> the group (disk:line) their record belongs to. */
  private pendingSlots = new Map<number, string>();
  private pendingDisk: MetaRecord[] = [];
  /** Slot data written since the last data sync. */
  private dataDirty = false;
  private nextSeq = 0;
  /** Journal seq the newest checkpoint covers up to (replay starts there). */
  private ckptSeq = 0;
  private generation = 0;
  private committing: Promise<void> | null = null;
  private failed: VolumeError | null = null;
  private readonly evictBatch: number;
  private readonly logger: CacheDeviceOptions['logger'];
  private waiters: Array<{ resolve: () => void; reject: (e: unknown) => void }> = [];
  /** The storage's synchronous page-cache paths (FileVolume), when it has them. */
  private readonly syncIo: SyncIo | undefined;

  private constructor(readonly storage: Volume, sb: Superblock, opts: CacheDeviceOptions) {
    this.sb = sb;
    const io = storage as Volume & SyncIo;
    this.syncIo = typeof io.readCachedSync === 'function' || typeof io.writeInlineSync === 'function' ? io : undefined;
    this.lineSize = sb.lineSize;
    this.sectorsPerLine = sb.lineSize / SECTOR;
    this.slots = sb.slots;
    this.words = wordsFor(this.sectorsPerLine);
    this.uuid = sb.uuid;
    this.stream = Buffer.from(sb.uuid.replace(/-/g, ''), 'hex').readUInt32LE(0) || 1;
    this.slotDisk = new Int32Array(this.slots).fill(-1);
    this.slotLine = new Float64Array(this.slots);
    this.slotEpoch = new Float64Array(this.slots);
    this.valid = new Uint32Array(this.slots * this.words);
    this.committedValid = new Uint32Array(this.slots * this.words);
    this.committedEpoch = new Float64Array(this.slots).fill(-1);
    this.evictBatch = opts.evictBatch ?? Math.max(4, Math.floor(this.slots / 64));
    this.logger = opts.logger;
  }

  /**
   * Opens the device (a Volume over the file or block device): replays its metadata, or formats
   * it when it carries no superblock. Throws VolumeError EINVAL when it is too small.
   */
  static async open(storage: Volume, opts: CacheDeviceOptions = {}): Promise<CacheDevice> {
    const head = Buffer.alloc(BLOCK);
    await storage.read(0, head);
    let sb = decodeSuper(head);
    let fresh = false;
    if (!sb) {
      const lineSize = opts.lineSize ?? DEFAULT_LINE_SIZE;
      if (lineSize < SECTOR || lineSize > 1024 * 1024 || (lineSize & (lineSize - 1)) !== 0) {
        throw new VolumeError('EINVAL', `cache line size must be a power of two from 4K to 1M, got ${lineSize}`);
      }
      const layout = computeLayout(storage.size, lineSize);
      if (!layout) throw new VolumeError('EINVAL', `cache device of ${storage.size} bytes is too small for lines of ${lineSize}`);
      sb = { ...layout, version: FORMAT_VERSION, uuid: randomUUID() };
      fresh = true;
    } else if (opts.lineSize !== undefined && opts.lineSize !== sb.lineSize) {
      opts.logger?.warn({ configured: opts.lineSize, device: sb.lineSize }, 'cache: the device was formatted with another line size; keeping the device\'s');
    }
    const dev = new CacheDevice(storage, sb, opts);
    if (fresh) await dev.format();
    else await dev.replay();
    return dev;
  }

  private async format(): Promise<void> {
    for (let s = this.slots - 1; s >= 0; s--) this.free.push(s);
    this.generation = 0;
    // The first checkpoint (empty) goes down before the superblock: a superblock is only ever
    // found with a checkpoint behind it.
    await this.writeCheckpoint();
    await this.storage.write(0, encodeSuper(this.sb));
    await this.storage.flush();
    this.logger?.info({ slots: this.slots, lineSize: this.lineSize, uuid: this.uuid }, 'cache device formatted');
  }

  // ------------------------------------------------------------------------------ replay

  private async readBlock(blockNo: number): Promise<Buffer> {
    const b = Buffer.alloc(BLOCK);
    await this.storage.read(blockNo * BLOCK, b);
    return b;
  }

  private async readCheckpoint(area: 0 | 1): Promise<{ gen: number; nextSeq: number; records: MetaRecord[] } | null> {
    const start = this.sb.checkpointStart[area];
    const head = await this.readBlock(start);
    if (head.length < 16) return null;
    const gen = Number(head.readBigUInt64LE(8));
    const hrec = decodeBlock(head, (this.stream ^ CKPT_HEADER_XOR) >>> 0, gen);
    const h = hrec?.[0];
    if (!h || h.type !== RecordType.Checkpoint || h.blocks > this.sb.checkpointBlocks - 1) return null;
    const records: MetaRecord[] = [];
    for (let i = 0; i < h.blocks; i++) {
      const recs = decodeBlock(await this.readBlock(start + 1 + i), (this.stream + gen) >>> 0, i);
      if (!recs) return null; // a torn checkpoint: the other area is the newest complete one
      records.push(...recs);
    }
    return { gen, nextSeq: h.nextSeq, records };
  }

  private async replay(): Promise<void> {
    const cps = [await this.readCheckpoint(0), await this.readCheckpoint(1)].filter((c) => c !== null);
    cps.sort((a, b) => b!.gen - a!.gen);
    const cp = cps[0];
    if (!cp) throw new VolumeError('EIO', 'cache device: no valid checkpoint (damaged metadata); reformat with `vstore cache invalidate` or a new device');
    this.generation = cp.gen;
    this.ckptSeq = cp.nextSeq;
    for (const r of cp.records) this.apply(r);
    let seq = cp.nextSeq;
    let blocks = 0;
    while (seq - cp.nextSeq < this.sb.journalBlocks) {
      const recs = decodeBlock(await this.readBlock(this.sb.journalStart + (seq % this.sb.journalBlocks)), this.stream, seq);
      if (!recs) break;
      for (const r of recs) this.apply(r);
      seq++;
      blocks++;
    }
    this.nextSeq = seq;
    for (let s = this.slots - 1; s >= 0; s--) if (this.slotDisk[s] === -1) this.free.push(s);
    this.committedValid.set(this.valid);
    for (let s = 0; s < this.slots; s++) this.committedEpoch[s] = this.slotDisk[s]! >= 0 ? this.slotEpoch[s]! : -1;
    // Lines and counts per disk, slots of a line in ascending epoch.
    for (let s = 0; s < this.slots; s++) {
      const d = this.disks.get(this.slotDisk[s]!);
      if (!d) continue;
      const line = this.slotLine[s]!;
      let arr = d.lines.get(line);
      if (!arr) d.lines.set(line, (arr = []));
      arr.push(s);
      d.used++;
      if (this.slotEpoch[s]! > d.maxEpoch) d.maxEpoch = this.slotEpoch[s]!;
    }
    for (const d of this.disks.values()) for (const arr of d.lines.values()) arr.sort((a, b) => this.slotEpoch[a]! - this.slotEpoch[b]!);
    this.logger?.info(
      { slots: this.slots, used: this.slots - this.free.length, disks: this.disks.size, checkpoint: cp.gen, journalBlocks: blocks, uuid: this.uuid },
      'cache device opened (metadata replayed)',
    );
  }

  /** Applies one record to the in-memory table (replay). */
  private apply(r: MetaRecord): void {
    switch (r.type) {
      case RecordType.Disk: {
        const d: DiskMeta = { id: r.disk, key: r.key, size: r.size, lines: new Map(), epochDone: 0, maxEpoch: 0, used: 0, allotment: Infinity };
        const old = this.disks.get(r.disk);
        if (old) {
          d.epochDone = old.epochDone;
          this.byKey.delete(old.key);
        }
        this.disks.set(r.disk, d);
        this.byKey.set(r.key, d);
        break;
      }
      case RecordType.DiskDrop:
        for (let s = 0; s < this.slots; s++) if (this.slotDisk[s] === r.disk) this.setFree(s);
        break;
      case RecordType.EpochDone: {
        const d = this.disks.get(r.disk);
        if (d && r.epoch > d.epochDone) d.epochDone = r.epoch;
        break;
      }
      case RecordType.Slot: {
        if (r.slot >= this.slots) return;
        if (r.disk === FREE_DISK) {
          this.setFree(r.slot);
          return;
        }
        this.slotDisk[r.slot] = r.disk;
        this.slotLine[r.slot] = r.line;
        this.slotEpoch[r.slot] = r.epoch;
        const v = this.slotValid(r.slot);
        v.fill(0);
        v.set(r.valid.subarray(0, this.words));
        break;
      }
      case RecordType.Checkpoint:
        break;
    }
  }

  private setFree(s: number): void {
    this.slotDisk[s] = -1;
    this.slotLine[s] = 0;
    this.slotEpoch[s] = 0;
    this.slotValid(s).fill(0);
  }

  // ------------------------------------------------------------------------------ disks

  /**
   * The disk cached under `key` (a volume name or an image path): its lines as the metadata
   * left them (warm after a restart), or a new empty disk (its record committed before this
   * returns). A disk whose size changed loses the lines past its new end.
   */
  async attach(key: string, size: number): Promise<DiskMeta> {
    this.check();
    let d = this.byKey.get(key);
    if (!d) {
      let id = 0;
      while (this.disks.has(id)) id++;
      if (id >= FREE_DISK) throw new VolumeError('ENOSPC', 'cache device: too many disks');
      d = { id, key, size, lines: new Map(), epochDone: 0, maxEpoch: 0, used: 0, allotment: Infinity };
      this.disks.set(id, d);
      this.byKey.set(key, d);
      this.pendingDisk.push({ type: RecordType.Disk, disk: id, key, size });
      await this.commit();
    } else if (d.size !== size) {
      const lines = Math.ceil(size / this.lineSize);
      for (const [line, slots] of [...d.lines]) if (line >= lines) for (const s of [...slots]) this.release(d, s);
      d.size = size;
      this.pendingDisk.push({ type: RecordType.Disk, disk: d.id, key, size });
      await this.commit();
    }
    return d;
  }

  /** Drops every slot of the disk, dirty or not, atomically (one record). */
  async dropDisk(d: DiskMeta): Promise<void> {
    for (const slots of [...d.lines.values()]) for (const s of [...slots]) this.release(d, s, false);
    this.pendingDisk.push({ type: RecordType.DiskDrop, disk: d.id });
    await this.commit();
  }

  /** Records that every dirty sector of epochs <= epoch reached (and was flushed on) the backing volume. */
  epochDone(d: DiskMeta, epoch: number): void {
    if (epoch <= d.epochDone) return;
    d.epochDone = epoch;
    this.pendingDisk.push({ type: RecordType.EpochDone, disk: d.id, epoch });
  }

  disksByKey(): ReadonlyMap<string, DiskMeta> {
    return this.byKey;
  }

  // ------------------------------------------------------------------------------ slots

  slotValid(s: number): Uint32Array {
    return this.valid.subarray(s * this.words, (s + 1) * this.words);
  }

  slotCommitted(s: number): Uint32Array {
    return this.committedValid.subarray(s * this.words, (s + 1) * this.words);
  }

  /** The slot's state changed: its record goes into the next commit. */
  mark(s: number): void {
    const d = this.slotDisk[s]!;
    this.pendingSlots.set(s, `${d}:${this.slotLine[s]}`);
  }

  /** Slot data was written (the next commit syncs data first). */
  dataWritten(): void {
    this.dataDirty = true;
  }

  /**
   * A free slot for line `line` of disk `d` at `epoch` (inserted in the line's slot list by
   * epoch), or null when nothing can be freed now (every line dirty or busy). May evict clean
   * lines (of `d` when it is at its allotment, else of the disk most over its allotment) and
   * commit, so it may wait.
   */
  async allocate(d: DiskMeta, line: number, epoch: number): Promise<number | null> {
    for (let attempt = 0; attempt < 3; attempt++) {
      const now = this.allocateNow(d, line, epoch);
      if (now >= 0) return now;
      // Make room: evict a batch, then commit so that the freed slots may be reused. A disk at
      // its allotment evicts its own; otherwise a batch already waiting for the commit serves
      // this caller too: concurrent fills each evicting a batch emptied the whole device (seen
      // with the balloon scheduler: 200 fills in flight x 23 slots > every slot).
      const victim = d.used >= d.allotment ? d : this.mostOver(d);
      if (victim === d || this.freeing.length === 0) {
        const got = victim.evict?.(this.evictBatch) ?? 0;
        if (got === 0 && this.freeing.length === 0 && victim !== d) d.evict?.(this.evictBatch);
      }
      if (this.freeing.length === 0 && this.free.length === 0) return null;
      await this.commit();
    }
    return null;
  }

  /**
   * allocate() without waiting: a free slot when one is at hand within the disk's allotment,
   * else -1 (the caller then uses allocate(), which may evict and commit). Throws when the
   * device failed.
   */
  allocateNow(d: DiskMeta, line: number, epoch: number): number {
    this.check();
    if (d.used >= d.allotment || this.free.length === 0) return -1;
    const s = this.free.pop()!;
    this.slotDisk[s] = d.id;
    this.slotLine[s] = line;
    this.slotEpoch[s] = epoch;
    this.valid.fill(0, s * this.words, (s + 1) * this.words);
    d.used++;
    let arr = d.lines.get(line);
    if (!arr) d.lines.set(line, (arr = []));
    let i = arr.length;
    while (i > 0 && this.slotEpoch[arr[i - 1]!]! > epoch) i--;
    arr.splice(i, 0, s);
    this.mark(s);
    return s;
  }

  /** The disk holding the most slots relative to its allotment (the one to take space from). */
  private mostOver(fallback: DiskMeta): DiskMeta {
    let best = fallback;
    let score = -1;
    for (const d of this.disks.values()) {
      if (!d.evict) continue;
      const s = d.allotment === Infinity ? d.used / this.slots : d.used / Math.max(1, d.allotment);
      if (s > score) {
        score = s;
        best = d;
      }
    }
    return best;
  }

  /**
   * Removes slot `s` from its line. With `reuse` (the default) it becomes allocatable after the
   * next commit; without, too (the caller commits a DiskDrop that frees it for replay anyway).
   */
  release(d: DiskMeta, s: number, markIt = true): void {
    const line = this.slotLine[s]!;
    const arr = d.lines.get(line);
    if (arr) {
      const i = arr.indexOf(s);
      if (i >= 0) arr.splice(i, 1);
      if (arr.length === 0) d.lines.delete(line);
    }
    if (markIt) this.mark(s);
    else this.pendingSlots.delete(s);
    this.slotDisk[s] = -1;
    this.slotEpoch[s] = 0;
    this.slotValid(s).fill(0);
    d.used--;
    this.freeing.push(s);
  }

  /** Clears valid sectors [from, to) of slot s (an invalidation; recorded at the next commit). */
  invalidate(s: number, from: number, to: number): void {
    clearRange(this.slotValid(s), from, to);
    this.mark(s);
  }

  slotBytes(s: number): number {
    return popcount(this.slotValid(s)) * SECTOR;
  }

  slotEmpty(s: number): boolean {
    return isEmpty(this.slotValid(s));
  }

  /** Byte offset of sector `sector` of slot `s` on the device. */
  offsetOf(s: number, sector: number): number {
    return this.sb.dataStart + s * this.lineSize + sector * SECTOR;
  }

  /** Reads `buf.length` bytes of slot s from byte `at` of its line. */
  async readData(s: number, at: number, buf: Buffer): Promise<void> {
    // Tried even after the device failed: a device whose writes fail may still read, and the
    // disks write back what they can (CacheVolume.degrade).
    try {
      await this.storage.read(this.offsetOf(s, 0) + at, buf);
    } catch (e) {
      throw this.fail(e);
    }
  }

  /**
   * readData completed in this turn, or false (the caller then uses readData): a page-cache hit
   * copied with RWF_NOWAIT where the storage offers it (FileVolume.readCachedSync). Lets a
   * cache hit skip the line lock (CacheVolume.readLine says why that is safe).
   */
  readDataSync(s: number, at: number, buf: Buffer): boolean {
    return this.syncIo?.readCachedSync?.(this.offsetOf(s, 0) + at, buf) ?? false;
  }

  /**
   * writeData completed in this turn (into the page cache; durable at the next commit like any
   * slot write), or false (the caller then uses writeData). Throws like writeData.
   */
  writeDataSync(s: number, at: number, buf: Buffer): boolean {
    this.check();
    if (!this.syncIo?.writeInlineSync) return false;
    let done: boolean;
    try {
      done = this.syncIo.writeInlineSync(this.offsetOf(s, 0) + at, buf);
    } catch (e) {
      throw this.fail(e);
    }
    if (done) this.dataDirty = true;
    return done;
  }

  /** Writes `buf` into slot s at byte `at` of its line. */
  async writeData(s: number, at: number, buf: Buffer): Promise<void> {
    this.check();
    try {
      await this.storage.write(this.offsetOf(s, 0) + at, buf);
    } catch (e) {
      throw this.fail(e);
    }
    this.dataDirty = true;
  }

  // ------------------------------------------------------------------------------ commit

  /** Whether the records of these slots are durable now (none waits for, or is in, a commit). */
  durable(slots: Iterable<number>): boolean {
    if (this.committing) return false;
    for (const s of slots) if (this.pendingSlots.has(s)) return false;
    return true;
  }

  /** Whether anything waits for a commit. */
  get hasPending(): boolean {
    return this.pendingSlots.size > 0 || this.pendingDisk.length > 0 || this.dataDirty || this.freeing.length > 0;
  }

  /**
   * Makes every completed slot write and every state change so far durable (group commit: calls
   * arriving while one runs share the next).
   */
  commit(): Promise<void> {
    const p = new Promise<void>((resolve, reject) => this.waiters.push({ resolve, reject }));
    this.committing ??= this.runCommits();
    return p;
  }

  /**
   * Runs commits while callers wait; each caller is answered by the first commit that started
   * after it called. `committing` is cleared in the same turn as the last check of `waiters`,
   * so a caller never waits on a loop that has ended.
   */
  private async runCommits(): Promise<void> {
    try {
      while (this.waiters.length) {
        const waiters = this.waiters.splice(0);
        try {
          await this.commitOnce();
          for (const w of waiters) w.resolve();
        } catch (e) {
          for (const w of waiters) w.reject(e);
        }
      }
    } finally {
      this.committing = null;
    }
  }

  private async commitOnce(): Promise<void> {
    this.check();
    if (!this.hasPending) return;
    const slots = [...this.pendingSlots];
    this.pendingSlots.clear();
    const diskRecs = this.pendingDisk.splice(0);
    const freeing = this.freeing.splice(0);
    const data = this.dataDirty;
    this.dataDirty = false;
    if (this.nextSeq + this.estimateBlocks(slots.length, diskRecs.length) - this.ckptSeq > this.sb.journalBlocks) {
      // No journal room: the whole table as a checkpoint (its own snapshot covers these changes).
      try {
        await this.writeCheckpoint();
      } catch (e) {
        throw this.fail(e);
      }
      this.stats.commits++;
      this.free.push(...freeing);
      return;
    }
    // Snapshot the records now (synchronously): they describe only writes already completed.
    const groups = new Map<string, MetaRecord[]>();
    for (const [s, g] of slots) {
      let arr = groups.get(g);
      if (!arr) groups.set(g, (arr = []));
      arr.push(this.slotRecord(s));
    }
    const blocks = packBlocks([...diskRecs.map((r) => [r]), ...groups.values()]);
    // From now on these records may be durable at any moment: a sector they call valid must not
    // be written in place (the rule of the header) even before the commit completes.
    for (const recs of groups.values()) for (const r of recs) if (r.type === RecordType.Slot) orInto(this.slotCommitted(r.slot), r.valid);
    try {
      if (data) await this.storage.flush(); // data before the metadata that points at it
      if (blocks.length) {
        for (const recs of blocks) {
          const seq = this.nextSeq++;
          await this.storage.write((this.sb.journalStart + (seq % this.sb.journalBlocks)) * BLOCK, encodeBlock(this.stream, seq, recs));
        }
        this.stats.journalBlocksWritten += blocks.length;
        await this.storage.flush();
        for (const recs of blocks) {
          for (const r of recs) {
            if (r.type !== RecordType.Slot) continue;
            this.slotCommitted(r.slot).set(r.valid);
            this.committedEpoch[r.slot] = r.disk === FREE_DISK ? -1 : r.epoch;
          }
        }
      }
    } catch (e) {
      throw this.fail(e);
    }
    this.stats.commits++;
    this.free.push(...freeing);
  }

  /** Upper bound of the journal blocks a commit of this many records takes. */
  private estimateBlocks(slots: number, disks: number): number {
    const per = Math.floor((BLOCK - 28) / (3 + 23 + this.words * 4 + 8));
    return Math.ceil(slots / Math.max(1, Math.floor(per / 2))) + disks + 1; // halved: groups are not split across blocks
  }

  private slotRecord(s: number): MetaRecord & { type: RecordType.Slot } {
    const disk = this.slotDisk[s]!;
    return {
      type: RecordType.Slot,
      slot: s,
      disk: disk < 0 ? FREE_DISK : disk,
      line: disk < 0 ? 0 : this.slotLine[s]!,
      epoch: disk < 0 ? 0 : this.slotEpoch[s]!,
      valid: Uint32Array.from(this.slotValid(s)),
    };
  }

  /** Writes the whole table as a checkpoint into the older area and restarts the journal from nextSeq. */
  private async writeCheckpoint(): Promise<void> {
    const gen = this.generation + 1;
    const area = (gen % 2) as 0 | 1;
    const start = this.sb.checkpointStart[area];
    const groups: MetaRecord[][] = [];
    for (const d of this.disks.values()) {
      groups.push([{ type: RecordType.Disk, disk: d.id, key: d.key, size: d.size }]);
      if (d.epochDone > 0) groups.push([{ type: RecordType.EpochDone, disk: d.id, epoch: d.epochDone }]);
    }
    const recs: Array<MetaRecord & { type: RecordType.Slot }> = [];
    for (let s = 0; s < this.slots; s++) if (this.slotDisk[s]! >= 0) recs.push(this.slotRecord(s));
    for (const r of recs) groups.push([r]);
    const body = packBlocks(groups);
    if (body.length > this.sb.checkpointBlocks - 1) throw new VolumeError('ENOSPC', 'cache device: checkpoint area too small');
    for (const r of recs) orInto(this.slotCommitted(r.slot), r.valid); // may be durable from now on
    // The snapshot above describes completed writes only; their data goes down before it.
    await this.storage.flush();
    for (let i = 0; i < body.length; i++) await this.storage.write((start + 1 + i) * BLOCK, encodeBlock((this.stream + gen) >>> 0, i, body[i]!));
    await this.storage.flush(); // the body before the header that makes it count
    const nextSeq = this.nextSeq;
    await this.storage.write(start * BLOCK, encodeBlock((this.stream ^ CKPT_HEADER_XOR) >>> 0, gen, [{ type: RecordType.Checkpoint, nextSeq, blocks: body.length }]));
    await this.storage.flush();
    this.generation = gen;
    this.ckptSeq = nextSeq;
    this.committedValid.fill(0);
    this.committedEpoch.fill(-1);
    for (const r of recs) {
      this.slotCommitted(r.slot).set(r.valid);
      this.committedEpoch[r.slot] = r.epoch;
    }
    this.stats.checkpoints++;
  }

  // ------------------------------------------------------------------------------ failure

  /** The device failed (EIO, or anything from the storage): every later call fails at once. */
  get failure(): VolumeError | null {
    return this.failed;
  }

  private fail(e: unknown): VolumeError {
    const err = e instanceof VolumeError ? e : new VolumeError('EIO', e instanceof Error ? e.message : String(e), { cause: e });
    if (!this.failed) {
      this.failed = err;
      this.logger?.error({ err: err.message }, 'cache device failed: every cached disk goes to pass-through');
    }
    return err;
  }

  private check(): void {
    if (this.failed) throw this.failed;
  }

  deviceStats(): DeviceStats {
    return { slots: this.slots, freeSlots: this.free.length, lineSize: this.lineSize, ...this.stats };
  }

  async close(): Promise<void> {
    if (!this.failed) await this.commit().catch(() => {});
    await this.storage.close();
  }
}

function orInto(dst: Uint32Array, src: Uint32Array): void {
  for (let i = 0; i < dst.length; i++) dst[i]! |= src[i]!;
}
