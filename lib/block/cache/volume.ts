/**
 * CacheVolume: a Volume over a (remote, replicated, or file) backing Volume that keeps data on
 * the host's cache device (device.ts), in lines of the device's line size with per-4 KiB-sector
 * valid state, so a 4 KiB write or read never moves a whole line.
 *
 * Modes (per disk, switchable at runtime; leaving write-back drains dirty data first):
 *   write-back     writes land on the cache device only; FLUSH = durable on the cache device
 *                  (data fdatasync, then the metadata journal, fdatasync); written back later;
 *   write-through  writes go to the backing volume, then into the cache (clean);
 *   write-around   writes go to the backing volume and drop what the cache held there;
 *   pass-through   the cache is not read (writes still drop stale cached sectors).
 * Reads in every mode but pass-through are served from the cache where valid and fill it on a
 * miss (cache-on-read, in the background, so filling never slows the first read).
 *
 * Write-back and ordering (the crash contract): every write belongs to an *epoch*; a guest
 * FLUSH (and a FUA write, after itself) seals the current epoch. A write never goes in place into
 * a slot of a sealed epoch: each epoch has its own slot per line (`open slot`), and a line's
 * slots are kept in epoch order — for every sector the newest valid slot is the data. Write-back
 * takes sealed epochs one at a time, oldest first: every dirty sector of epoch N reaches the
 * backing volume, then a backing FLUSH, then the record "epoch N done" — only then epoch N+1.
 * So the backing volume only ever holds states the guest saw between two flushes (plus a subset
 * of the writes of one epoch, which the guest could not tell from a crash). Dirty is implied:
 * a slot's valid sectors are dirty while its epoch > the disk's epochDone (no dirty bitmap on
 * disk). After a crash, replay knows every slot and epochDone, so every dirty line is known
 * and written back in epoch order; a write acknowledged before the last completed FLUSH (or
 * with FUA) is in a committed slot.
 *
 * Clean-data safety: fills (cache-on-read, write-through) write only sectors that are neither
 * valid nor durably valid in the slot they go to, into the line's epoch-0 slot, and are skipped
 * when a write touched the line since the data was read (`fillGuard`), so the cache never holds
 * older data than the backing volume for a sector it calls valid — also after a crash.
 *
 * Failure: when the cache device fails (any error from it), the disk degrades to pass-through
 * with one error log line and `degraded` in its stats; dirty data that can still be read from
 * the device is written back (epoch order); sectors that cannot be read are counted in
 * `lostBytes` and reads of them fail with EIO rather than return stale data.
 *
 * Concurrency: one async lock per line (requests on different lines run in parallel); the
 * write-back loop is a single task whose concurrency adapts to foreground load.
 */
import { LRUCache } from 'lru-cache';
import type { Logger } from 'pino';
import { toVolumeError, VolumeError } from '../errors.js';
import type { BlockLimits, Extent, Volume, VolumeCapabilities, WriteOptions, ZeroOptions } from '../volume.js';
import { allSet, anySet, coverage, runs, setRange, test } from './bitmap.js';
import { SECTOR, type CacheDevice, type DiskMeta } from './device.js';
import { TwoQueue } from './twoq.js';

export const CACHE_MODES = ['write-back', 'write-through', 'write-around', 'pass-through'] as const;
export type CacheMode = (typeof CACHE_MODES)[number];

/** The RAM tier shared by the host's cached disks: whole-line images of hot lines, bounded in bytes. */
export type RamTier = LRUCache<string, RamLine>;
export interface RamLine {
  data: Buffer;
  valid: Uint32Array;
}

export function createRamTier(maxBytes: number): RamTier {
  return new LRUCache<string, RamLine>({ maxSize: Math.max(1, maxBytes), sizeCalculation: (v) => v.data.length + 64 });
}

export interface CacheVolumeOptions {
  device: CacheDevice;
  backing: Volume;
  /** What the device files this disk under (a volume name, an image path); stable across restarts. */
  key: string;
  mode?: CacheMode;
  /** Dirty bytes over which writers wait for write-back (default: 1/4 of the device, at most 1 GiB). */
  maxDirtyBytes?: number;
  /** Slots this disk may hold (the per-disk allotment; default: no bound but the device). Settable at runtime. */
  allotmentBytes?: number;
  ram?: RamTier;
  /**
   * A read miss on a line the cache holds nothing of reads the whole line from the backing
   * volume (one round trip, like the 64 KiB blocks of nbdkit's cache filter) and fills it;
   * reads of the line's other sectors meanwhile wait for that fetch. Worth it when the
   * backing volume's latency dwarfs its bandwidth and reads have locality (file systems);
   * a random-read workload then moves up to a line per 4 KiB from the backing volume.
   * Default false.
   */
  fillWholeLines?: boolean;
  /** Lines read ahead on a sequential read stream (0: off; default 4). */
  readaheadLines?: number;
  logger?: Pick<Logger, 'info' | 'warn' | 'error' | 'debug'>;
  /**
   * Called with true before the first write-back write of a clean disk is acknowledged (the
   * resolver records that this host holds dirty data), and with false once everything was
   * written back and that is durable here. Awaited on the true transition.
   */
  onDirtyChange?: (dirty: boolean) => Promise<void>;
  /** Seals an epoch that has been open (with dirty data) this long, so write-back starts (ms; default 1000). */
  sealAfterMs?: number;
}

export interface CacheStats {
  key: string;
  mode: CacheMode;
  degraded: boolean;
  /** The disk's size. */
  sizeBytes: number;
  lineSize: number;
  /** Bytes read that the cache (device or RAM) served, and that went to the backing volume. */
  readHitBytes: number;
  readMissBytes: number;
  ramHitBytes: number;
  hitRatio: number;
  dirtyBytes: number;
  maxDirtyBytes: number;
  writtenBackBytes: number;
  /** Bytes the guest wrote through the cache layer (any mode): the capacity scheduler's activity measure. */
  writtenBytes: number;
  /** Bytes per second written back over the last few seconds. */
  writeBackRate: number;
  evictions: number;
  usedBytes: number;
  /** The allotment (bytes), absent when unbounded. */
  allotmentBytes?: number;
  epoch: number;
  epochDone: number;
  /** Dirty bytes that could not be read back from a failed device. */
  lostBytes: number;
  /** A running flush (drain): bytes dirty when it started and still dirty now. */
  flush?: { totalBytes: number; remainingBytes: number };
  /** A running warm (prefetch): bytes to visit and visited. */
  warm?: { totalBytes: number; doneBytes: number };
}

/** Slots written back at once when write-back is not held back (16 made crash-concurrent.property.test.ts hang at some seeds, with memory growing: not understood yet, kept at 8). */
const WB_WIDTH = 8;
/** Fills (cache-on-read) waiting to be written into the cache at once; more are skipped. */
const MAX_PENDING_FILLS = 64;

export class CacheVolume implements Volume {
  readonly size: number;
  private readonly device: CacheDevice;
  private readonly backing: Volume;
  private readonly meta: DiskMeta;
  private readonly lineSize: number;
  private readonly spl: number;
  private readonly logger: CacheVolumeOptions['logger'];
  private readonly ram: RamTier | undefined;
  private readonly q: TwoQueue<number>;
  private modeNow: CacheMode;
  private degraded = false;
  private degrading: Promise<void> | null = null;
  private closed = false;

  /** The open epoch; epochs below it are sealed. */
  private epoch: number;
  /** Whether the open epoch has writes (a FLUSH with none does not seal). */
  private epochWrites = 0;
  private epochOpenedAt = 0;
  /** Dirty slots by epoch, and their bytes. */
  private readonly dirtySlots = new Map<number, Set<number>>();
  private readonly epochBytes = new Map<number, number>();
  private dirtyBytes = 0;
  private readonly maxDirty: number;
  /** Writes in progress per epoch: write-back of an epoch waits for them. */
  private readonly inflight = new Map<number, number>();
  private foreground = 0;
  private dirtyMarked = false;
  private markPromise: Promise<void> | null = null;
  private readonly onDirtyChange: CacheVolumeOptions['onDirtyChange'];
  private clearTimer: NodeJS.Timeout | undefined;

  private readonly locks = new Map<number, Promise<void>>();
  private readonly fillGuard = new Map<number, { gen: number; pending: number }>();
  private pendingFills = 0;
  /** Sectors (disk byte offsets of sectors) that were dirty on a device that failed and could not be read. */
  private readonly unreadable = new Set<number>();

  private wbRunning: Promise<void> | null = null;
  /** The last write-back pass failed with this (the backing volume); cleared by a pass that succeeds. */
  private wbError: VolumeError | null = null;
  /** drain() calls under way (write-back then runs at full width). */
  private draining = 0;
  private wbWaiters: Array<() => void> = [];
  private readonly timer: NodeJS.Timeout;
  private readonly sealAfterMs: number;
  private readonly readaheadLines: number;
  private readonly wholeLines: boolean;
  /** Whole-line fetches in flight (fillWholeLines), with the fill-guard generation they started under. */
  private readonly fetches = new Map<number, { gen: number; data: Promise<Buffer> }>();
  private lastReadEnd = -1;
  private seqReads = 0;
  private readaheadUntil = 0;
  private readaheadBusy = false;

  private readonly st = { readHit: 0, readMiss: 0, ramHit: 0, writtenBack: 0, evictions: 0, lost: 0, written: 0 };
  private readonly wbWindow: Array<[number, number]> = [];
  private flushProgress: { total: number } | undefined;
  private warmProgress: { total: number; done: number } | undefined;

  private constructor(opts: CacheVolumeOptions, meta: DiskMeta) {
    this.device = opts.device;
    this.backing = opts.backing;
    this.size = opts.backing.size;
    this.meta = meta;
    this.lineSize = opts.device.lineSize;
    this.spl = opts.device.sectorsPerLine;
    this.logger = opts.logger;
    this.ram = opts.ram;
    this.modeNow = opts.mode ?? 'write-back';
    const devBytes = opts.device.slots * this.lineSize;
    this.maxDirty = opts.maxDirtyBytes ?? Math.max(this.lineSize * 4, Math.min(devBytes / 4, 1024 ** 3));
    this.onDirtyChange = opts.onDirtyChange;
    this.sealAfterMs = opts.sealAfterMs ?? 1000;
    this.readaheadLines = opts.readaheadLines ?? 4;
    this.wholeLines = opts.fillWholeLines ?? false;
    this.q = new TwoQueue<number>(opts.device.slots);
    if (opts.allotmentBytes !== undefined) this.setAllotment(opts.allotmentBytes);
    this.epoch = Math.max(meta.maxEpoch, meta.epochDone) + 1;
    // What replay left: every line is resident (warm), slots of epochs above epochDone are dirty.
    for (const [line, slots] of meta.lines) {
      this.q.touch(line);
      for (const s of slots) {
        const e = this.device.slotEpoch[s]!;
        if (e > 0 && e > meta.epochDone) this.addDirty(e, s, this.device.slotBytes(s));
      }
    }
    meta.evict = (want) => this.evict(want);
    this.timer = setInterval(() => this.tick(), 250);
    this.timer.unref();
  }

  /**
   * Opens the disk `key` on the device over `backing`. Lines left by an earlier run are warm;
   * dirty ones (a crash, or a stop without write-back) are written back in the background.
   */
  static async open(opts: CacheVolumeOptions): Promise<CacheVolume> {
    const meta = await opts.device.attach(opts.key, opts.backing.size);
    const v = new CacheVolume(opts, meta);
    if (v.dirtyBytes > 0) {
      v.logger?.info({ key: opts.key, dirtyBytes: v.dirtyBytes, epochs: v.dirtySlots.size }, 'cache: dirty data from an earlier run; writing it back');
      await v.markDirty();
      v.kick();
    }
    return v;
  }

  get limits(): BlockLimits {
    return this.backing.limits;
  }

  get caps(): VolumeCapabilities {
    // Asked per request by the layers above: derived again only when the backing volume's
    // object changes (a new object per call was a measurable share of a 4 KiB write).
    const b = this.backing.caps;
    if (b !== this.capsOf) {
      this.capsOf = b;
      this.capsNow = { ...b, flush: !b.readOnly, fua: !b.readOnly, prefetch: true, multiConn: true };
    }
    return this.capsNow!;
  }
  private capsOf: VolumeCapabilities | undefined;
  private capsNow: VolumeCapabilities | undefined;

  get mode(): CacheMode {
    return this.modeNow;
  }

  get isDegraded(): boolean {
    return this.degraded;
  }

  /** Sets the per-disk allotment (the capacity scheduler's knob); the allocator enforces it from now on. */
  setAllotment(bytes: number | undefined): void {
    this.meta.allotment = bytes === undefined || !Number.isFinite(bytes) ? Infinity : Math.max(1, Math.floor(bytes / this.lineSize));
    if (this.meta.used > this.meta.allotment) this.evict(this.meta.used - this.meta.allotment);
  }

  // ------------------------------------------------------------------------------ read

  async read(offset: number, buf: Buffer): Promise<void> {
    // A hit within one line is answered in this turn: no lock, no promise layers (hitLine).
    if (this.hitNow(offset, buf)) return;
    // Not cached (pass-through): straight to the backing volume, as the general path below
    // would, without its layers (a pass-through disk should cost what an uncached one does).
    if (!this.cached('read') && this.unreadable.size === 0) return this.backing.read(offset, buf);
    this.foreground++;
    try {
      await this.orDegrade(async () => {
        if (!this.cached('read')) {
          if (this.unreadable.size) this.checkUnreadable(offset, buf.length);
          return this.backing.read(offset, buf);
        }
        await this.forLines(offset, buf.length, (line, at, pos, len) => this.readLine(line, at, buf.subarray(pos, pos + len)));
        this.readahead(offset, buf.length);
      });
    } finally {
      this.foreground--;
    }
  }

  /** Runs `op`; when the cache device failed under it, degrades the disk and runs it again (now pass-through). */
  private async orDegrade<T>(op: () => Promise<T>): Promise<T> {
    try {
      return await op();
    } catch (e) {
      if (this.device.failure && !this.degraded) {
        await this.degrade();
        return op();
      }
      throw toVolumeError(e);
    }
  }

  /** hitLine for a request within one line (read's fast path); false: take the general path. */
  private hitNow(offset: number, buf: Buffer): boolean {
    if (buf.length === 0 || !this.cached('read')) return false;
    const line = Math.floor(offset / this.lineSize);
    const at = offset - line * this.lineSize;
    if (at + buf.length > this.lineSize || !this.hitLine(line, at, buf)) return false;
    this.readahead(offset, buf.length);
    return true;
  }

  /** The piece is served now from the RAM tier or the device (hitSync); false: it was not. */
  private hitLine(line: number, at: number, view: Buffer): boolean {
    const s0 = Math.floor(at / SECTOR);
    const s1 = Math.ceil((at + view.length) / SECTOR);
    const r = this.ram?.get(`${this.meta.id}:${line}`);
    if (r && allSet(r.valid, s0, s1)) {
      r.data.copy(view, 0, at, at + view.length); // a copy out of the RAM tier is what a hit is
      this.st.ramHit += view.length;
    } else if (!this.hitSync(line, at, view, s0, s1)) {
      return false;
    }
    this.st.readHit += view.length;
    this.q.touch(line);
    return true;
  }

  private async readLine(line: number, at: number, view: Buffer): Promise<void> {
    if (this.hitLine(line, at, view)) return;
    const s0 = Math.floor(at / SECTOR);
    const s1 = Math.ceil((at + view.length) / SECTOR);
    const key = this.ram ? `${this.meta.id}:${line}` : '';
    // A plain miss (no slot holds any of the sectors) on a line nobody holds needs no lock
    // either: the check and the fill guard are taken in this turn (as hitSync argues), and
    // the backing read never held the lock anyway.
    if (!this.locks.has(line) && this.noneCached(line, s0, s1)) return this.missLine(line, at, view);
    const base = line * this.lineSize;
    const missed: Array<[number, number]> = [];
    let gen = 0;
    await this.withLine(line, async () => {
      const slots = this.meta.lines.get(line);
      // per sector, the newest slot holding it (-1: the backing volume)
      const runs: Array<[number, number, number]> = []; // [from sector, to sector, slot or -1]
      for (let s = s0; s < s1; s++) {
        let src = -1;
        if (slots) {
          for (let i = slots.length - 1; i >= 0; i--) {
            if (test(this.device.slotValid(slots[i]!), s)) {
              src = slots[i]!;
              break;
            }
          }
        }
        const last = runs[runs.length - 1];
        if (last && last[2] === src) last[1] = s + 1;
        else runs.push([s, s + 1, src]);
      }
      // Registered before the backing read: a write to the line from now on cancels the fill.
      if (runs.some((r) => r[2] < 0)) gen = this.guard(line);
      const io: Promise<void>[] = [];
      let hit = 0;
      for (const [a, b, src] of runs) {
        const from = Math.max(a * SECTOR, at);
        const to = Math.min(b * SECTOR, at + view.length);
        const sub = view.subarray(from - at, to - at);
        if (src >= 0) {
          hit += sub.length;
          io.push(this.device.readData(src, from, sub));
        } else {
          missed.push([from, to]);
        }
      }
      // Device reads hold the line (its slots cannot be evicted or reused meanwhile); the
      // backing reads below do not: the fill guard taken above keeps a fill of what they return
      // from landing after a newer write, and other requests on the line need not wait for
      // the remote.
      await Promise.all(io);
      this.st.readHit += hit;
      this.st.readMiss += view.length - hit;
      if (missed.length === 0) {
        this.q.touch(line);
        if (this.ram && s0 * SECTOR === at && s1 * SECTOR === at + view.length) this.ramPut(key, s0, view);
      }
    });
    if (missed.length) {
      try {
        await Promise.all(missed.map(([from, to]) => this.backing.read(base + from, view.subarray(from - at, to - at))));
      } catch (e) {
        this.unguard(line);
        throw e;
      }
    }
    if (missed.length === 0) return;
    this.fillAfterRead(line, gen, missed.map(([from, to]) => ({ from, data: view.subarray(from - at, to - at) })));
  }

  /** True when no slot of the line holds any sector of [s0, s1). */
  private noneCached(line: number, s0: number, s1: number): boolean {
    const slots = this.meta.lines.get(line);
    if (!slots) return true;
    for (const sl of slots) if (coverage(this.device.valid, sl * this.device.words, s0, s1) !== -1) return false;
    return true;
  }

  /** A piece no slot holds: one backing read, then the fill (noneCached, checked by the caller in this turn). */
  private async missLine(line: number, at: number, view: Buffer): Promise<void> {
    if (this.wholeLines && !this.meta.lines.has(line)) return this.missWholeLine(line, at, view);
    const gen = this.guard(line);
    this.st.readMiss += view.length;
    try {
      await this.backing.read(line * this.lineSize + at, view);
    } catch (e) {
      this.unguard(line);
      throw e;
    }
    this.fillAfterRead(line, gen, [{ from: at, data: view }]);
  }

  /**
   * fillWholeLines: the piece comes from a fetch of the whole line (started here, or one in
   * flight that no write has touched since it started: the fill guard's generation is the
   * same, so its data is what the backing volume holds for every sector not in a slot; a
   * sector written since is in a slot and never gets here). The fetch fills the line.
   */
  private async missWholeLine(line: number, at: number, view: Buffer): Promise<void> {
    let f = this.fetches.get(line);
    if (!f || (this.fillGuard.get(line)?.gen ?? -1) !== f.gen) {
      const gen = this.guard(line);
      const base = line * this.lineSize;
      const data = Buffer.allocUnsafe(Math.min(this.lineSize, this.size - base));
      const fetch = this.backing.read(base, data).then(
        () => {
          this.fillAfterRead(line, gen, [{ from: 0, data }]); // releases the guard
          return data;
        },
        (e: unknown) => {
          this.unguard(line);
          throw e;
        },
      );
      const mine = { gen, data: fetch };
      this.fetches.set(line, mine);
      const done = (): void => {
        if (this.fetches.get(line) === mine) this.fetches.delete(line);
      };
      fetch.then(done, done);
      f = mine;
    }
    this.st.readMiss += view.length;
    (await f.data).copy(view, 0, at, at + view.length);
  }

  /**
   * Cache-on-read of what a read got from the backing volume (`pieces` view the caller's
   * buffer; the fill guard of `gen` is held and released here). Done in this turn when the line
   * is free and a slot is at hand (fillSync: a page-cache copy, no lock, no allocation, no copy
   * of the data, and the reply waits only for that copy); otherwise in the background after the
   * reply, from a copy, since the caller's buffer (guest memory) is theirs again once we return.
   */
  private fillAfterRead(line: number, gen: number, pieces: Array<{ from: number; data: Buffer }>): void {
    if (this.modeNow === 'pass-through') {
      this.unguard(line);
      return;
    }
    try {
      if (this.fillSync(line, gen, pieces)) {
        this.unguard(line);
        return;
      }
    } catch (e) {
      this.unguard(line);
      this.onBackgroundError(e); // the read was served; the fill was only a hint
      return;
    }
    if (this.pendingFills >= MAX_PENDING_FILLS) {
      this.unguard(line);
      return;
    }
    const copies = pieces.map((p) => ({ from: p.from, data: Buffer.from(p.data) }));
    this.pendingFills++;
    void this.fill(line, gen, copies)
      .catch((e: unknown) => this.onBackgroundError(e))
      .finally(() => {
        this.pendingFills--;
        this.unguard(line);
      });
  }

  /** Registers a fill guard on the line (before a backing read whose data may fill it); its generation. */
  private guard(line: number): number {
    const g = this.fillGuard.get(line);
    if (g) {
      g.pending++;
      return g.gen;
    }
    this.fillGuard.set(line, { gen: 0, pending: 1 });
    return 0;
  }

  /**
   * A hit served in this turn without the line lock: the newest slot of the line holding any of
   * the request's sectors holds all of them (one slot serves the whole piece: no per-sector
   * walk), and the device copies them from the page cache now (RWF_NOWAIT). Anything else
   * (a miss, a piece spread over slots, data not in the page cache) takes the locked path.
   *
   * Why no lock is needed: the check and the copy run in one JS turn, so no other request,
   * fill, write-back or eviction runs between them — it is the same as taking the lock and
   * releasing it at once. It is only done when nobody holds or waits for the line's lock
   * (`locks` has no entry), so it never overtakes a request queued on the line. What it reads
   * is what the lock would have shown: every writer of a slot (writes, fills) sets valid bits
   * only after its data write completed, and a slot is reused only after release() took it out
   * of the line's list and cleared its bits.
   */
  private hitSync(line: number, at: number, view: Buffer, s0: number, s1: number): boolean {
    if (this.locks.has(line)) return false;
    const slots = this.meta.lines.get(line);
    if (!slots) return false;
    const words = this.device.words;
    for (let i = slots.length - 1; i >= 0; i--) {
      const c = coverage(this.device.valid, slots[i]! * words, s0, s1);
      if (c === -1) continue;
      return c === 1 && this.device.readDataSync(slots[i]!, at, view);
    }
    return false;
  }

  private unguard(line: number): void {
    const g = this.fillGuard.get(line);
    if (g && --g.pending <= 0) this.fillGuard.delete(line);
  }

  /** Reads served from RAM next time: the line's image in the RAM tier gets these sectors. */
  private ramPut(key: string, s0: number, data: Buffer): void {
    let e = this.ram!.get(key);
    if (!e) {
      e = { data: Buffer.allocUnsafe(this.lineSize), valid: new Uint32Array(this.device.words) };
      this.ram!.set(key, e);
    }
    data.copy(e.data, s0 * SECTOR);
    setRange(e.valid, s0, s0 + data.length / SECTOR);
  }

  /**
   * Writes data read from the backing volume into the line's epoch-0 slot: only whole sectors,
   * only where no slot holds the sector and the epoch-0 slot's durable record does not say
   * valid, and not at all when a write touched the line since the data was read.
   */
  private async fill(line: number, gen: number, pieces: Array<{ from: number; data: Buffer }>): Promise<void> {
    if (!this.cached('fill')) return;
    await this.withLine(line, async () => {
      if ((this.fillGuard.get(line)?.gen ?? 0) !== gen) return;
      let slots = this.meta.lines.get(line);
      let slot = slots?.[0] !== undefined && this.device.slotEpoch[slots[0]]! === 0 ? slots[0] : -1;
      for (const p of pieces) {
        const b = Math.floor((p.from + p.data.length) / SECTOR);
        for (let r = this.fillRun(slots, slot, Math.ceil(p.from / SECTOR), b); r; r = this.fillRun(slots, slot, r[1], b)) {
          const [s, e] = r;
          if (slot < 0) {
            const got = await this.device.allocate(this.meta, line, 0);
            if (got === null) return; // no room now: the read was served, the fill is only a hint
            slot = got;
            slots = this.meta.lines.get(line);
            this.q.touch(line);
          }
          await this.device.writeData(slot, s * SECTOR, p.data.subarray(s * SECTOR - p.from, e * SECTOR - p.from));
          setRange(this.device.slotValid(slot), s, e);
          this.device.mark(slot);
        }
      }
    });
  }

  /** The next run [s, e) of fillable sectors from `from` below `to` (fillable() of the slots as they are now), or null. */
  private fillRun(slots: number[] | undefined, slot: number, from: number, to: number): [number, number] | null {
    let s = from;
    while (s < to && !this.fillable(slots, slot, s)) s++;
    if (s >= to) return null;
    let e = s + 1;
    while (e < to && this.fillable(slots, slot, e)) e++;
    return [s, e];
  }

  /** Whether sector x may be filled into `slot` (the line's epoch-0 slot, -1: none yet): no slot holds it and no durable record calls it valid there. */
  private fillable(slots: number[] | undefined, slot: number, x: number): boolean {
    if (slots) for (const sl of slots) if (test(this.device.slotValid(sl), x)) return false;
    return slot < 0 || !test(this.device.slotCommitted(slot), x);
  }

  /**
   * fill() completed in this turn, without the lock (hitSync says why a turn on a line nobody
   * holds is as good as the lock): true when done (or nothing to do), false when it would have
   * to wait (the line is held, no slot at hand, the device write would not be inline); what it
   * wrote by then stays, and fill() finishes the rest. Throws when the device failed.
   */
  private fillSync(line: number, gen: number, pieces: Array<{ from: number; data: Buffer }>): boolean {
    if (!this.cached('fill')) return true;
    if (this.locks.has(line)) return false;
    if ((this.fillGuard.get(line)?.gen ?? 0) !== gen) return true; // a write came: its data is newer
    let slots = this.meta.lines.get(line);
    let slot = slots?.[0] !== undefined && this.device.slotEpoch[slots[0]]! === 0 ? slots[0] : -1;
    for (const p of pieces) {
      const b = Math.floor((p.from + p.data.length) / SECTOR);
      for (let r = this.fillRun(slots, slot, Math.ceil(p.from / SECTOR), b); r; r = this.fillRun(slots, slot, r[1], b)) {
        const [s, e] = r;
        if (slot < 0) {
          slot = this.device.allocateNow(this.meta, line, 0);
          if (slot < 0) return false;
          slots = this.meta.lines.get(line);
          this.q.touch(line);
        }
        if (!this.device.writeDataSync(slot, s * SECTOR, p.data.subarray(s * SECTOR - p.from, e * SECTOR - p.from))) return false;
        setRange(this.device.slotValid(slot), s, e);
        this.device.mark(slot);
      }
    }
    return true;
  }

  // ------------------------------------------------------------------------------ write

  async write(offset: number, buf: Buffer, opts?: WriteOptions): Promise<void> {
    if (this.backing.caps.readOnly) throw new VolumeError('EROFS', 'volume is read-only');
    this.st.written += buf.length;
    // A write-back write into the line's open slot is done in this turn (writeNow).
    try {
      if (this.writeNow(offset, buf, opts)) return;
    } catch (e) {
      if (!this.device.failure) throw toVolumeError(e);
      // The device failed under it: degrade as orDegrade does, then the general path (now
      // pass-through, after the dirty data went back).
      if (!this.degraded) await this.degrade();
    }
    this.foreground++;
    try {
      await this.orDegrade(() => this.writeOnce(offset, buf, opts));
    } finally {
      this.foreground--;
    }
  }

  private async writeOnce(offset: number, buf: Buffer, opts?: WriteOptions): Promise<void> {
    const mode = this.cached('write') ? this.modeNow : 'pass-through';
    if (mode !== 'write-back') {
      const guards = mode === 'write-through' ? this.guardLines(offset, buf.length) : undefined;
      try {
        // Cached sectors this write changes are dropped durably first: after a crash the cache
        // must not say "valid" for data the backing volume no longer has.
        await this.invalidateRange(offset, buf.length, guards, true);
        await this.backing.write(offset, buf, opts);
        await this.afterBackingWrite(offset, buf, guards);
      } finally {
        if (guards) for (const line of guards.keys()) this.unguard(line);
      }
      if (opts?.fua && this.device.hasPending && !this.degraded) await this.device.commit();
      return;
    }
    await this.dirtyGate();
    await this.markDirty();
    for (let attempt = 0; ; attempt++) {
      const epoch = this.epoch;
      this.inflight.set(epoch, (this.inflight.get(epoch) ?? 0) + 1);
      let full = false;
      try {
        await this.forLines(offset, buf.length, async (line, at, pos, len) => {
          if (!(await this.writeLineBack(line, at, buf.subarray(pos, pos + len), epoch))) full = true;
        });
      } finally {
        const n = this.inflight.get(epoch)! - 1;
        if (n === 0) this.inflight.delete(epoch);
        else this.inflight.set(epoch, n);
      }
      if (!full) break;
      if (attempt < 3) {
        // No slot: wait for write-back to turn dirty lines clean (evictable), then try again
        // (the lines this write already put in the cache are simply written again).
        this.seal();
        this.kick();
        await this.waitWriteBack();
        continue;
      }
      // Still no room: drain, then this write goes straight to the backing volume (the
      // ordering holds: nothing older is dirty any more).
      await this.drain();
      await this.invalidateRange(offset, buf.length, undefined, true);
      await this.backing.write(offset, buf, opts);
      await this.afterBackingWrite(offset, buf);
      return;
    }
    this.epochWrites++;
    if (opts?.fua) {
      this.seal();
      await this.device.commit();
    }
    this.kick();
  }

  /**
   * A write-back write completed in this turn, or false (nothing done: the general path runs):
   * whole sectors within one line nobody holds (hitSync says why a turn on such a line is as
   * good as its lock), no FUA, under the dirty bound with the dirty mark recorded, and a slot
   * of the open epoch at hand — the line's newest slot when it is of this epoch (in place under
   * the same rule as writeLineBack: over sectors the durable record calls valid only when that
   * record is of this epoch), else a fresh one when a free slot is at hand and the newest slot
   * cannot be joined. Then one page-cache write of the device and the bookkeeping: no lock, no
   * promise, no copy. Throws when the device failed.
   */
  private writeNow(offset: number, buf: Buffer, opts?: WriteOptions): boolean {
    if (this.modeNow !== 'write-back' || opts?.fua || !this.cached('write') || buf.length === 0) return false;
    if (this.clearTimer || (this.onDirtyChange && !this.dirtyMarked) || this.dirtyBytes >= this.dirtyBound()) return false;
    const line = Math.floor(offset / this.lineSize);
    const at = offset - line * this.lineSize;
    if (at % SECTOR !== 0 || buf.length % SECTOR !== 0 || at + buf.length > this.lineSize || this.locks.has(line)) return false;
    const s0 = at / SECTOR;
    const s1 = s0 + buf.length / SECTOR;
    const epoch = this.epoch;
    const words = this.device.words;
    const slots = this.meta.lines.get(line);
    const last = slots?.[slots.length - 1];
    let slot: number;
    if (last !== undefined && this.device.slotEpoch[last] === epoch) {
      slot = last;
      if (this.device.committedEpoch[slot] !== epoch && coverage(this.device.committedValid, slot * words, s0, s1) !== -1) return false;
    } else {
      // A clean newest slot that could join this epoch is writeLineBack's case (not here).
      if (last !== undefined && !this.isDirtySlot(last) && coverage(this.device.committedValid, last * words, s0, s1) === -1) return false;
      slot = this.device.allocateNow(this.meta, line, epoch);
      if (slot < 0) return false;
    }
    if (!this.device.writeDataSync(slot, at, buf)) return false; // an empty slot of the epoch may stay: the general path uses it
    this.bumpGuard(line);
    if (this.ram) this.ram.delete(`${this.meta.id}:${line}`);
    const v = this.device.slotValid(slot);
    let added = 0;
    for (let x = s0; x < s1; x++) if (!test(v, x)) added++;
    setRange(v, s0, s1);
    this.device.mark(slot);
    this.addDirty(epoch, slot, added * SECTOR);
    this.q.touch(line);
    this.epochWrites++;
    this.kick();
    return true;
  }

  /** One line's part of a write-back write; false when no slot could be had. */
  private async writeLineBack(line: number, at: number, view: Buffer, epoch: number): Promise<boolean> {
    const s0 = Math.floor(at / SECTOR);
    const s1 = Math.ceil((at + view.length) / SECTOR);
    return this.withLine(line, async () => {
      this.bumpGuard(line);
      this.ram?.delete(`${this.meta.id}:${line}`);
      let slots = this.meta.lines.get(line);
      const lastSlot = slots?.[slots.length - 1];
      let slot = lastSlot !== undefined && this.device.slotEpoch[lastSlot] === epoch ? lastSlot : -1;
      if (slot < 0 && lastSlot !== undefined && this.device.slotEpoch[lastSlot]! < epoch && !this.isDirtySlot(lastSlot) && !anySet(this.device.slotCommitted(lastSlot), s0, s1)) {
        // The line's newest slot is clean and its durable record does not cover these sectors:
        // it joins this epoch instead of a new slot per line per epoch (which made a 4 KiB
        // random write cost a whole line). Its older sectors become dirty again and are written
        // back once more (the same bytes the backing volume has); a crash before the next
        // commit finds the old record, which says nothing of the sectors written here.
        slot = lastSlot;
        this.device.slotEpoch[slot] = epoch;
        this.device.mark(slot);
        this.addDirty(epoch, slot, this.device.slotBytes(slot));
      }
      // Partial sectors at the edges: read-modify-write of the sector (its current data is
      // the newest slot's or the backing volume's). Aligned writes go down without a copy.
      let data = view;
      if (s0 * SECTOR !== at || s1 * SECTOR !== at + view.length) {
        data = Buffer.alloc((s1 - s0) * SECTOR);
        await this.readCurrent(line, s0, data.subarray(0, SECTOR));
        if (s1 - 1 > s0) await this.readCurrent(line, s1 - 1, data.subarray(data.length - SECTOR));
        view.copy(data, at - s0 * SECTOR);
      }
      if (slot < 0) {
        const got = await this.device.allocate(this.meta, line, epoch);
        if (got === null) return false;
        slot = got;
        slots = this.meta.lines.get(line);
      } else if (this.device.committedEpoch[slot] !== epoch && anySet(this.device.slotCommitted(slot), s0, s1)) {
        // In place over sectors the device's record still calls valid under another (older,
        // clean) epoch: a slot that joined this epoch (above, or for an earlier write of it)
        // and whose join is not durable yet. Written now, a crash would bring these sectors
        // back as clean data the backing volume never had; the commit makes the join durable
        // first (then a crash finds them dirty in this epoch, an unflushed write). Found by
        // the concurrent crash model (crash-concurrent.property.test.ts).
        await this.device.commit();
      }
      await this.device.writeData(slot, s0 * SECTOR, data);
      const v = this.device.slotValid(slot);
      let added = 0;
      for (let s = s0; s < s1; s++) if (!test(v, s)) added++;
      setRange(v, s0, s1);
      this.device.mark(slot);
      this.addDirty(epoch, slot, added * SECTOR);
      this.q.touch(line);
      return true;
    });
  }

  /** Fills `out` (one sector) with sector `s` of line as it reads now (newest slot, else backing). */
  private async readCurrent(line: number, s: number, out: Buffer): Promise<void> {
    const slots = this.meta.lines.get(line) ?? [];
    for (let i = slots.length - 1; i >= 0; i--) {
      if (test(this.device.slotValid(slots[i]!), s)) return this.device.readData(slots[i]!, s * SECTOR, out);
    }
    const off = line * this.lineSize + s * SECTOR;
    const n = Math.min(out.length, this.size - off);
    out.fill(0);
    if (n > 0) await this.backing.read(off, out.subarray(0, n));
  }

  /** Fill guards for the lines of a range (write-through registers them before its backing write). */
  private guardLines(offset: number, length: number): Map<number, number> {
    const out = new Map<number, number>();
    if (length === 0) return out;
    for (let line = Math.floor(offset / this.lineSize); line <= Math.floor((offset + length - 1) / this.lineSize); line++) out.set(line, this.guard(line));
    return out;
  }

  /**
   * After a write went to the backing volume: drop cached sectors it changed; write-through
   * (`guards`: the fill guards taken before the backing write) then caches the new data.
   */
  private async afterBackingWrite(offset: number, buf: Buffer, guards?: Map<number, number>): Promise<void> {
    await this.invalidateRange(offset, buf.length, guards);
    if (guards && this.cached('fill')) {
      await this.forLines(offset, buf.length, async (line, at, pos, len) => {
        // Not a copy: the caller's buffer is ours until this write resolves.
        await this.fill(line, guards.get(line)!, [{ from: at, data: buf.subarray(pos, pos + len) }]);
      });
    }
  }

  private bumpGuard(line: number): void {
    const g = this.fillGuard.get(line);
    if (g) g.gen++;
  }

  /**
   * Drops cached sectors overlapping [offset, offset+length) (partially covered sectors too);
   * with `durable`, commits when a dropped sector was valid in the durable metadata.
   */
  private async invalidateRange(offset: number, length: number, own?: Map<number, number>, durable = false): Promise<void> {
    if (this.degraded || this.device.failure || length === 0) return;
    const first = Math.floor(offset / this.lineSize);
    const last = Math.floor((offset + length - 1) / this.lineSize);
    const lines: number[] = [];
    if (last - first + 1 > this.meta.lines.size + this.fillGuard.size) {
      // Lines with a fill guard but no slot yet count too: their fill must be cancelled (found
      // by fastpath.test.ts: with no line cached at all, a write-around write left a pending
      // fill of the old data in place).
      for (const l of this.meta.lines.keys()) if (l >= first && l <= last) lines.push(l);
      for (const l of this.fillGuard.keys()) if (l >= first && l <= last && !this.meta.lines.has(l)) lines.push(l);
    } else {
      for (let l = first; l <= last; l++) if (this.meta.lines.has(l) || this.fillGuard.has(l)) lines.push(l);
    }
    let durableHit = false;
    for (const line of lines) {
      await this.withLine(line, async () => {
        this.bumpGuard(line);
        // Our own write-through fill must still run (it carries the newest data) unless another
        // write touched the line since our guard was taken (then the bump was not only ours).
        const mine = own?.get(line);
        if (mine !== undefined && this.fillGuard.get(line)!.gen === mine + 1) own!.set(line, mine + 1);
        this.ram?.delete(`${this.meta.id}:${line}`);
        const base = line * this.lineSize;
        const a = Math.floor(Math.max(0, offset - base) / SECTOR);
        const b = Math.ceil(Math.min(this.lineSize, offset + length - base) / SECTOR);
        for (const s of [...(this.meta.lines.get(line) ?? [])]) {
          if (!anySet(this.device.slotValid(s), a, b)) continue;
          if (this.isDirtySlot(s)) throw new VolumeError('EIO', 'cache: invalidating dirty data (bug: drain first)');
          if (anySet(this.device.slotCommitted(s), a, b)) durableHit = true;
          this.device.invalidate(s, a, b);
          if (this.device.slotEmpty(s)) this.device.release(this.meta, s);
        }
        if (!this.meta.lines.has(line)) this.q.remove(line, false);
      });
    }
    if (durable && durableHit) await this.device.commit();
  }

  // ------------------------------------------------------------------------------ flush, trim, zero

  flush(): Promise<void> {
    return this.orDegrade(async () => {
      if (!this.cached('flush') || this.modeNow !== 'write-back') {
        await this.backing.flush();
        if (!this.degraded && !this.device.failure && this.device.hasPending) await this.device.commit();
        return;
      }
      this.seal();
      await this.device.commit();
      this.kick();
    });
  }

  async trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    await this.zeroLike(offset, length, () => this.backing.trim(offset, length, opts));
  }

  async writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    await this.zeroLike(offset, length, () => this.backing.writeZeroes(offset, length, opts));
  }

  /**
   * Trim and write-zeroes go to the backing volume. In write-back mode everything dirty is
   * written back first: the backing volume must not see this request before older writes.
   */
  private async zeroLike(offset: number, length: number, op: () => Promise<void>): Promise<void> {
    this.foreground++;
    try {
      await this.orDegrade(async () => {
        if (this.cached('write') && this.dirtyBytes > 0) await this.drain();
        await this.invalidateRange(offset, length, undefined, true);
        await op();
        await this.invalidateRange(offset, length);
      });
    } finally {
      this.foreground--;
    }
  }

  /** Warms [offset, offset+length): every sector not cached is read from the backing volume into the cache. */
  async prefetch(offset: number, length: number): Promise<void> {
    if (!this.cached('fill') || this.modeNow === 'pass-through') return;
    const CHUNK = 4 * this.lineSize;
    const jobs: Array<[number, number]> = [];
    for (let p = offset; p < offset + length; p += CHUNK) jobs.push([p, Math.min(CHUNK, offset + length - p)]);
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < jobs.length) {
        const [p, n] = jobs[next++]!;
        await this.forLines(p, n, (line, at, _pos, len) => this.warmLine(line, at, len));
        if (this.warmProgress) this.warmProgress.done += n;
      }
    };
    try {
      await Promise.all([worker(), worker(), worker(), worker()]);
    } catch (e) {
      if (this.device.failure && !this.degraded) return this.degrade();
      throw toVolumeError(e);
    }
  }

  /** `cache warm`: prefetch with progress in stats. */
  async warm(offset: number, length: number): Promise<void> {
    this.warmProgress = { total: length, done: 0 };
    try {
      await this.prefetch(offset, length);
    } finally {
      this.warmProgress = undefined;
    }
  }

  private async warmLine(line: number, at: number, len: number): Promise<void> {
    const s0 = Math.floor(at / SECTOR);
    const s1 = Math.ceil((at + len) / SECTOR);
    let gen = 0;
    const missing: Array<[number, number]> = [];
    await this.withLine(line, async () => {
      const slots = this.meta.lines.get(line) ?? [];
      let start = -1;
      for (let s = s0; s <= s1; s++) {
        const have = s < s1 && slots.some((sl) => test(this.device.slotValid(sl), s));
        if (s < s1 && !have) {
          if (start < 0) start = s;
        } else if (start >= 0) {
          missing.push([start, s]);
          start = -1;
        }
      }
      if (missing.length) gen = this.guard(line);
    });
    if (!missing.length) return;
    try {
      const base = line * this.lineSize;
      const pieces = await Promise.all(
        missing.map(async ([a, b]) => {
          const from = a * SECTOR;
          const n = Math.min(b * SECTOR, this.size - base) - from;
          const data = Buffer.alloc(n);
          await this.backing.read(base + from, data);
          return { from, data };
        }),
      );
      await this.fill(line, gen, pieces);
    } finally {
      this.unguard(line);
    }
  }

  /** Sequential read streams get the next lines read ahead (in the background, one batch at a time). */
  private readahead(offset: number, length: number): void {
    if (this.readaheadLines <= 0) return;
    this.seqReads = offset === this.lastReadEnd ? this.seqReads + 1 : 0;
    this.lastReadEnd = offset + length;
    if (this.seqReads < 2 || this.readaheadBusy) return;
    const end = offset + length;
    if (end + this.lineSize <= this.readaheadUntil) return;
    const from = Math.max(end, this.readaheadUntil);
    const until = Math.min(this.size, Math.floor(end / this.lineSize) * this.lineSize + (this.readaheadLines + 1) * this.lineSize);
    if (until <= from) return;
    this.readaheadUntil = until;
    this.readaheadBusy = true;
    void this.prefetch(from, until - from)
      .catch((e: unknown) => this.onBackgroundError(e))
      .finally(() => (this.readaheadBusy = false));
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    // With dirty data the backing volume's holes may not be holes: say "data" (never wrong).
    if (this.dirtyBytes > 0 || this.unreadable.size > 0) return [{ offset, length: Math.min(length, this.size - offset), hole: false, zero: false }];
    return this.backing.blockStatus(offset, length);
  }

  // ------------------------------------------------------------------------------ dirty, epochs, write-back

  private isDirtySlot(s: number): boolean {
    const e = this.device.slotEpoch[s]!;
    return e > 0 && e > this.meta.epochDone;
  }

  private addDirty(epoch: number, slot: number, bytes: number): void {
    let set = this.dirtySlots.get(epoch);
    if (!set) this.dirtySlots.set(epoch, (set = new Set()));
    set.add(slot);
    this.epochBytes.set(epoch, (this.epochBytes.get(epoch) ?? 0) + bytes);
    this.dirtyBytes += bytes;
  }

  /** Seals the open epoch (when it has writes): its data goes back before anything written after. */
  private seal(): void {
    if (this.epochWrites === 0 && !this.dirtySlots.has(this.epoch)) return;
    this.epoch++;
    this.epochWrites = 0;
    this.epochOpenedAt = 0;
  }

  private async markDirty(): Promise<void> {
    if (this.clearTimer) {
      clearTimeout(this.clearTimer);
      this.clearTimer = undefined;
    }
    if (this.dirtyMarked || !this.onDirtyChange) return;
    this.markPromise ??= this.onDirtyChange(true).then(
      () => {
        this.dirtyMarked = true;
        this.markPromise = null;
      },
      (e: unknown) => {
        this.markPromise = null;
        throw new VolumeError('EIO', `cache: cannot record dirty data in the resolver: ${(e as Error).message}`);
      },
    );
    await this.markPromise;
  }

  /** Dirty bytes over which writers wait: maxDirty, and at most half the disk's allotment (dirty lines cannot be evicted). */
  private dirtyBound(): number {
    return Math.min(this.maxDirty, Math.max(this.lineSize, (this.meta.allotment * this.lineSize) / 2));
  }

  /** Writers wait while the disk has more dirty data than its bound. */
  private async dirtyGate(): Promise<void> {
    while (this.dirtyBytes >= this.dirtyBound() && !this.degraded) {
      this.seal();
      this.kick();
      await this.waitWriteBack();
    }
  }

  /** Resolves when write-back completes an epoch (or after 50 ms: callers check again). */
  private waitWriteBack(): Promise<void> {
    return new Promise((r) => {
      const t = setTimeout(r, 50);
      this.wbWaiters.push(() => {
        clearTimeout(t);
        r();
      });
    });
  }

  private wakeWriters(): void {
    const w = this.wbWaiters.splice(0);
    for (const f of w) f();
  }

  /** Starts the write-back task when it is not running. */
  private kick(): void {
    if (this.wbRunning || this.closed) return;
    if (this.epochWrites > 0 && this.epochOpenedAt === 0) this.epochOpenedAt = Date.now();
    if (!this.hasSealed()) return;
    this.wbRunning = this.writeBackLoop()
      .then(
        () => {
          this.wbError = null;
        },
        (e: unknown) => {
          this.wbError = toVolumeError(e);
          this.onBackgroundError(e);
        },
      )
      .finally(() => {
        this.wbRunning = null;
        this.wakeWriters();
        // More to do: at once, or after a second when the backing volume failed (no busy retry).
        if (this.hasSealed() && !this.degraded && !this.device.failure && !this.closed) {
          setTimeout(() => this.kick(), this.wbError ? 1000 : 0).unref();
        }
      });
  }

  /** Whether a sealed epoch holds dirty data (write-back has work). Runs per write: no array. */
  private hasSealed(): boolean {
    for (const e of this.dirtySlots.keys()) if (e < this.epoch) return true;
    return false;
  }

  /** Periodic: seal an epoch left open with dirty data, so that write-back is never starved. */
  private tick(): void {
    if (this.closed || this.degraded) return;
    if (this.epochWrites > 0) {
      if (this.epochOpenedAt === 0) this.epochOpenedAt = Date.now();
      // Not while write-back runs: it is not starved then, and an epoch sealed meanwhile only
      // means a new slot for every line written again (a 4 KiB random write costing a slot per
      // line per second, the allotment filling with dirty slots nothing may evict, writers
      // waiting: bench/RESULTS-cache.md). A guest FLUSH still seals at once.
      else if (Date.now() - this.epochOpenedAt >= this.sealAfterMs && !this.wbRunning) this.seal();
    }
    this.kick();
  }

  private async writeBackLoop(): Promise<void> {
    for (;;) {
      if (this.closed && !this.draining) return;
      const epochs = [...this.dirtySlots.keys()].filter((e) => e < this.epoch).sort((a, b) => a - b);
      const n = epochs[0];
      if (n === undefined) return;
      while ((this.inflight.get(n) ?? 0) > 0) await new Promise((r) => setTimeout(r, 1));
      const slots = [...(this.dirtySlots.get(n) ?? [])];
      // The epoch's slots must be durable here before their data reaches the backing volume:
      // else a crash could bring back an older clean slot they shadow, now older than the
      // backing volume (found by the crash model). After a guest FLUSH this costs nothing.
      if (!this.device.durable(slots)) await this.device.commit();
      // Adapt to load: with guest requests in flight and room under the dirty bound, go
      // slowly (one slot at a time with a breather); otherwise WB_WIDTH at once. The bound is
      // the disk's own (its allotment halves it): against maxDirty alone, writers waiting at an
      // allotment's bound saw write-back stay in its slow mode.
      const slow = (): boolean => this.foreground > 0 && this.dirtyBytes < this.dirtyBound() / 2 && !this.draining;
      let i = 0;
      const worker = async (): Promise<void> => {
        while (i < slots.length) {
          const s = slots[i++]!;
          if (slow()) await new Promise((r) => setTimeout(r, 2));
          await this.writeBackSlot(s);
        }
      };
      await Promise.all(Array.from({ length: Math.min(slow() ? 1 : WB_WIDTH, slots.length) }, worker));
      await this.backing.flush();
      const bytes = this.epochBytes.get(n) ?? 0;
      this.device.epochDone(this.meta, n);
      this.dirtySlots.delete(n);
      this.epochBytes.delete(n);
      this.dirtyBytes -= bytes;
      this.st.writtenBack += bytes;
      this.wbWindow.push([Date.now(), bytes]);
      for (const s of slots) this.collect(s);
      this.wakeWriters();
      if (this.dirtyBytes === 0) await this.settleClean();
    }
  }

  /**
   * Copies a dirty slot's valid sectors to the backing volume, its runs' writes in parallel
   * (one epoch: their order does not matter; the epoch's backing FLUSH comes after all). No
   * line lock: the slot belongs to a sealed epoch whose writes have all completed (the loop
   * waited for `inflight`), so nothing writes into it any more — writes go to the open epoch's
   * slot, and only clean slots join an epoch — and nothing frees it before its epoch is done
   * (dirty slots are neither evicted nor invalidated). Holding the lock over the backing
   * write (a remote round trip) made every foreground request on the line wait for it.
   */
  private async writeBackSlot(s: number): Promise<void> {
    if (this.device.slotDisk[s] !== this.meta.id) return;
    const line = this.device.slotLine[s]!;
    const base = line * this.lineSize;
    const pieces: Array<{ at: number; data: Buffer }> = [];
    for (const [a, b] of runs(this.device.slotValid(s), 0, this.spl)) {
      const from = a * SECTOR;
      const to = Math.min(b * SECTOR, this.size - base);
      if (to <= from) continue;
      const data = Buffer.allocUnsafe(to - from);
      try {
        if (!this.device.readDataSync(s, from, data)) await this.device.readData(s, from, data);
      } catch (e) {
        if (!this.degrading) throw e;
        // The device failed: these dirty sectors are lost; reads of them fail (EIO).
        for (let x = a; x < b; x++) this.unreadable.add(base + x * SECTOR);
        this.st.lost += to - from;
        continue;
      }
      pieces.push({ at: base + from, data });
    }
    // all read first: no backing write may fail unobserved while a device read is awaited
    await Promise.all(pieces.map((p) => this.backing.write(p.at, p.data)));
  }

  /** A written-back slot whose every valid sector is shadowed by newer slots is freed. */
  private collect(s: number): void {
    if (this.device.slotDisk[s] !== this.meta.id) return;
    const line = this.device.slotLine[s]!;
    const slots = this.meta.lines.get(line) ?? [];
    const newer = slots.slice(slots.indexOf(s) + 1);
    if (newer.length === 0) return;
    const v = this.device.slotValid(s);
    for (let x = 0; x < this.spl; x++) if (test(v, x) && !newer.some((o) => test(this.device.slotValid(o), x))) return;
    this.device.release(this.meta, s);
  }

  /** Everything was written back: make that durable here, then tell the resolver (after a short quiet period). */
  private async settleClean(): Promise<void> {
    await this.device.commit();
    if (!this.onDirtyChange || !this.dirtyMarked || this.clearTimer) return;
    this.clearTimer = setTimeout(() => {
      this.clearTimer = undefined;
      if (this.dirtyBytes > 0 || !this.dirtyMarked) return;
      this.dirtyMarked = false;
      this.onDirtyChange!(false).catch((e: unknown) => {
        this.dirtyMarked = true; // try again at the next settle
        this.logger?.warn({ err: (e as Error).message }, 'cache: could not clear the dirty mark in the resolver');
      });
    }, 200);
    this.clearTimer.unref();
  }

  /** Writes back every dirty byte (sealing the open epoch), with progress in stats. */
  async drain(): Promise<void> {
    this.draining++;
    const own = !this.flushProgress;
    if (own) this.flushProgress = { total: this.dirtyBytes };
    try {
      this.seal();
      while (this.dirtyBytes > 0 || this.wbRunning) {
        if (this.device.failure && !this.degraded) await this.degrade();
        if (this.degraded) {
          if (this.degrading) await this.degrading;
          return;
        }
        this.seal();
        this.kick();
        if (this.wbRunning) {
          await this.wbRunning;
          // The backing volume failed: the dirty data stays on the cache device (durable, known,
          // written back later); the caller learns that the drain did not complete.
          if (this.wbError) throw this.wbError;
        } else if (this.dirtyBytes > 0) await new Promise((r) => setTimeout(r, 5));
      }
      await this.device.commit();
    } finally {
      this.draining--;
      if (own) this.flushProgress = undefined;
    }
  }

  // ------------------------------------------------------------------------------ modes, eviction, failure

  /** Switches the mode; leaving write-back writes every dirty byte back first. */
  async setMode(mode: CacheMode): Promise<void> {
    if (!CACHE_MODES.includes(mode)) throw new VolumeError('EINVAL', `unknown cache mode ${mode}`);
    if (mode === this.modeNow) return;
    if (this.degraded) throw new VolumeError('EIO', 'the cache device failed: the disk stays pass-through');
    const from = this.modeNow;
    if (from === 'write-back') {
      await this.drain();
    }
    this.modeNow = mode;
    this.logger?.info({ key: this.meta.key, from, to: mode }, 'cache mode changed');
  }

  /** Drops everything cached for this disk, dirty data included (`vstore cache invalidate --force`). */
  async invalidate(): Promise<number> {
    const dropped = this.dirtyBytes;
    await this.device.dropDisk(this.meta);
    this.dirtySlots.clear();
    this.epochBytes.clear();
    this.dirtyBytes = 0;
    for (const k of [...this.ramKeys()]) this.ram?.delete(k);
    this.q.clear();
    this.wakeWriters();
    if (this.onDirtyChange && this.dirtyMarked) {
      this.dirtyMarked = false;
      await this.onDirtyChange(false);
    }
    return dropped;
  }

  private *ramKeys(): Generator<string> {
    if (!this.ram) return;
    const prefix = `${this.meta.id}:`;
    for (const k of this.ram.keys()) if (k.startsWith(prefix)) yield k;
  }

  /** The device asks for room: frees up to `want` slots of clean, unlocked lines (2Q order). */
  private evict(want: number): number {
    let freed = 0;
    const canEvict = (line: number): boolean => {
      if (this.locks.has(line) || this.fillGuard.has(line)) return false;
      const slots = this.meta.lines.get(line);
      return !slots || slots.every((s) => !this.isDirtySlot(s));
    };
    while (freed < want) {
      const line = this.q.victim(canEvict);
      if (line === undefined) break;
      const slots = [...(this.meta.lines.get(line) ?? [])];
      for (const s of slots) this.device.release(this.meta, s);
      this.q.remove(line);
      this.ram?.delete(`${this.meta.id}:${line}`);
      freed += slots.length;
      this.st.evictions++;
    }
    return freed;
  }

  /** Whether the cache takes part in `op` now (false: degraded). */
  private cached(_op: 'read' | 'write' | 'flush' | 'fill'): boolean {
    if (this.degraded) return false;
    if (this.device.failure) return false;
    return _op === 'read' ? this.modeNow !== 'pass-through' : true;
  }

  /**
   * The device failed: log once, go pass-through, write back what can still be read (epoch
   * order), remember what cannot (reads of it fail with EIO).
   */
  private degrade(): Promise<void> {
    this.degrading ??= (async () => {
      const why = this.device.failure?.message ?? 'unknown';
      this.logger?.error({ key: this.meta.key, err: why, dirtyBytes: this.dirtyBytes }, 'cache device failed: disk degraded to pass-through; writing back the dirty data that can still be read');
      // Let the running write-back end (its device reads fail now), then write back in order.
      if (this.wbRunning) await this.wbRunning.catch(() => {});
      const epochs = [...this.dirtySlots.keys()].sort((a, b) => a - b);
      for (const n of epochs) {
        for (const s of this.dirtySlots.get(n) ?? []) await this.writeBackSlot(s).catch(() => {});
        await this.backing.flush().catch(() => {});
      }
      this.dirtySlots.clear();
      this.epochBytes.clear();
      this.dirtyBytes = 0;
      this.degraded = true;
      this.modeNow = 'pass-through';
      this.ram?.clear();
      this.wakeWriters();
      if (this.st.lost > 0) this.logger?.error({ key: this.meta.key, lostBytes: this.st.lost }, 'cache: dirty data on the failed device could not be read; reads of it fail with EIO');
    })();
    return this.degrading;
  }

  private checkUnreadable(offset: number, length: number): void {
    for (let s = Math.floor(offset / SECTOR) * SECTOR; s < offset + length; s += SECTOR) {
      if (this.unreadable.has(s)) throw new VolumeError('EIO', `cache: the dirty data at ${s} was lost with the failed cache device`);
    }
  }

  private onBackgroundError(e: unknown): void {
    if (this.device.failure) {
      if (!this.degraded) void this.degrade();
      return;
    }
    this.logger?.warn({ key: this.meta.key, err: (e as Error).message }, 'cache: background I/O failed');
  }

  // ------------------------------------------------------------------------------ helpers

  /** Runs fn for each line piece of [offset, offset+length): (line, offset in line, offset in request, length). */
  private async forLines(offset: number, length: number, fn: (line: number, at: number, pos: number, len: number) => Promise<void>): Promise<void> {
    const ls = this.lineSize;
    const first = Math.floor(offset / ls);
    const last = Math.floor((offset + length - 1) / ls);
    if (length === 0) return;
    if (first === last) return fn(first, offset - first * ls, 0, length);
    const jobs: Promise<void>[] = [];
    for (let line = first; line <= last; line++) {
      const start = Math.max(offset, line * ls);
      const end = Math.min(offset + length, (line + 1) * ls);
      jobs.push(fn(line, start - line * ls, start - offset, end - start));
    }
    await Promise.all(jobs);
  }

  /** Runs fn holding the line's lock (requests on one line run one at a time, in arrival order). */
  private async withLine<T>(line: number, fn: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(line);
    let release!: () => void;
    const mine = new Promise<void>((r) => (release = r));
    const tail = prev ? prev.then(() => mine) : mine;
    this.locks.set(line, tail);
    if (prev) await prev;
    try {
      return await fn();
    } finally {
      release();
      if (this.locks.get(line) === tail) this.locks.delete(line);
    }
  }

  stats(): CacheStats {
    const now = Date.now();
    while (this.wbWindow.length && now - this.wbWindow[0]![0] > 5000) this.wbWindow.shift();
    const wb = this.wbWindow.reduce((n, [, b]) => n + b, 0);
    const reads = this.st.readHit + this.st.readMiss;
    return {
      key: this.meta.key,
      sizeBytes: this.size,
      mode: this.modeNow,
      degraded: this.degraded,
      lineSize: this.lineSize,
      readHitBytes: this.st.readHit,
      readMissBytes: this.st.readMiss,
      ramHitBytes: this.st.ramHit,
      hitRatio: reads ? this.st.readHit / reads : 0,
      dirtyBytes: this.dirtyBytes,
      maxDirtyBytes: this.maxDirty,
      writtenBackBytes: this.st.writtenBack,
      writtenBytes: this.st.written,
      writeBackRate: wb / 5,
      evictions: this.st.evictions,
      usedBytes: this.meta.used * this.lineSize,
      ...(Number.isFinite(this.meta.allotment) ? { allotmentBytes: this.meta.allotment * this.lineSize } : {}),
      epoch: this.epoch,
      epochDone: this.meta.epochDone,
      lostBytes: this.st.lost,
      ...(this.flushProgress ? { flush: { totalBytes: Math.max(this.flushProgress.total, this.dirtyBytes), remainingBytes: this.dirtyBytes } } : {}),
      ...(this.warmProgress ? { warm: { totalBytes: this.warmProgress.total, doneBytes: this.warmProgress.done } } : {}),
    };
  }

  /**
   * Closes the cache layer: commits what is cached (dirty data stays on the device, known, and is
   * written back at the next open), then closes the backing volume. Call drain() first to leave
   * the backing volume complete (the daemon does before a disk is detached).
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.timer);
    if (this.clearTimer) clearTimeout(this.clearTimer);
    if (this.wbRunning) await this.wbRunning.catch(() => {});
    this.meta.evict = undefined;
    if (!this.device.failure) await this.device.commit().catch(() => {});
    await this.backing.close();
  }
}
