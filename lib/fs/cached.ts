/**
 * `CachedFileTree`: the host's cache in front of a share's tree (a RemoteFileTree), so that
 * repeated lookups, stats and reads do not each cost a round trip to the storage node.
 *
 * What is cached:
 * - attributes per node id, for `attrTtlMs`;
 * - directory entries (parent, name) -> node id, for `entryTtlMs`, and negative entries
 *   (ENOENT) for `negativeTtlMs`;
 * - file data in blocks of `blockSize` bytes, in a `DataCache` (RAM, bounded in bytes, LRU;
 *   the host's cache device will implement the same interface).
 *
 * Consistency: this host's own mutations update or drop what they change at once. Between hosts
 * sharing a directory the model is close-to-open, as NFS: `open` always asks the node for fresh
 * attributes, and when mtime, ctime or size differ from those the cached data was read under, the
 * data is dropped; so a file another host wrote and closed is seen whole by the next open here.
 * Within the TTLs, names and attributes changed by another host may be seen late.
 *
 * Writes are write-through: a write is acknowledged only when the tree below (the node)
 * acknowledged it, and the cached blocks it covers are updated; nothing is ever dirty here, so a
 * flush or close has nothing to write back and a crash of this host loses no acknowledged write.
 *
 * Lookup counting: a lookup answered from the cache is not seen by the tree below, so this layer
 * keeps both counts (the caller's and the lower tree's) and forwards `forget` with the lower count
 * only when the caller has forgotten the id entirely; an id is thus valid below as long as the
 * caller holds it.
 */
import { FsError, isFsError } from './errors.js';
import { FileTreeLayer } from './layer.js';
import type { Attr, CreateResult, DirEntryPlus, Entry, FileTree, FsContext, OpenResult, SetAttr } from './tree.js';

type MaybePromise<T> = T | Promise<T>;

/**
 * Where file data blocks are kept: RAM now (`MemoryDataCache`), the host's cache device later
 * (hence the methods may answer with promises). Operations on one file must take effect in the
 * order they are called: a `dropFile` hides every block `set` before it from a later `get`.
 * Failures of `set`/`drop` are ignored by the tree (a cache may lose blocks), `dropFile` must not
 * fail (a dropped file must never be served).
 */
export interface DataCache {
  /** A block of a file, or undefined. `file` identifies the file within one tree. */
  get(file: number, block: number): MaybePromise<Buffer | undefined>;
  /** Stores a block (at most the block size; shorter only for the block holding end of file). */
  set(file: number, block: number, data: Buffer): MaybePromise<void>;
  /** Drops one block. */
  drop(file: number, block: number): MaybePromise<void>;
  /** Drops every block of a file. */
  dropFile(file: number): MaybePromise<void>;
  /** Bytes held now. */
  readonly bytes: number;
}

/** Runs a cache operation whose completion nobody waits for (a RAM cache completes at once). */
function background(p: MaybePromise<void>): void {
  if (p instanceof Promise) p.catch(() => {});
}

/**
 * A byte-bounded LRU of blocks in RAM. The Map's insertion order is the recency order (a hit is
 * re-inserted), so eviction takes the first key: O(1) per operation, no dependency needed.
 */
export class MemoryDataCache implements DataCache {
  private readonly blocks = new Map<string, Buffer>();
  private readonly perFile = new Map<number, Set<number>>();
  private used = 0;

  constructor(readonly maxBytes: number) {
    if (!(maxBytes >= 0)) throw new RangeError('maxBytes must be >= 0');
  }

  get bytes(): number {
    return this.used;
  }

  get(file: number, block: number): Buffer | undefined {
    const k = `${file}:${block}`;
    const b = this.blocks.get(k);
    if (b) {
      this.blocks.delete(k);
      this.blocks.set(k, b);
    }
    return b;
  }

  set(file: number, block: number, data: Buffer): void {
    if (data.length > this.maxBytes) return;
    const k = `${file}:${block}`;
    const old = this.blocks.get(k);
    if (old) {
      this.used -= old.length;
      this.blocks.delete(k);
    }
    this.blocks.set(k, data);
    this.used += data.length;
    let s = this.perFile.get(file);
    if (!s) this.perFile.set(file, (s = new Set()));
    s.add(block);
    while (this.used > this.maxBytes) {
      const first = this.blocks.keys().next().value as string;
      this.remove(first);
    }
  }

  drop(file: number, block: number): void {
    this.remove(`${file}:${block}`);
  }

  dropFile(file: number): void {
    const s = this.perFile.get(file);
    if (!s) return;
    for (const b of [...s]) this.remove(`${file}:${b}`);
  }

  private remove(k: string): void {
    const b = this.blocks.get(k);
    if (!b) return;
    this.blocks.delete(k);
    this.used -= b.length;
    const i = k.indexOf(':');
    const file = Number(k.slice(0, i));
    const s = this.perFile.get(file);
    s?.delete(Number(k.slice(i + 1)));
    if (s && s.size === 0) this.perFile.delete(file);
  }
}

export interface CachedFileTreeOptions {
  /** Attribute TTL (ms). Default 1000. */
  attrTtlMs?: number;
  /** Positive entry TTL (ms). Default 1000. */
  entryTtlMs?: number;
  /** Negative entry TTL (ms); 0 disables negative caching. Default 1000. */
  negativeTtlMs?: number;
  /** File data cache; default a MemoryDataCache of `dataBytes`. */
  data?: DataCache;
  /** Bytes of RAM for file data when `data` is not given. Default 64 MiB. */
  dataBytes?: number;
  /** Block size of the data cache. Default 128 KiB. */
  blockSize?: number;
  /** Clock (ms), for tests. */
  now?: () => number;
}

interface CachedAttr {
  attr: Attr;
  expires: number;
}
interface CachedEntry {
  /** null: negative (no such name). */
  nodeId: number | null;
  generation: number;
  expires: number;
}
interface Counts {
  upper: number;
  lower: number;
}
interface FileState {
  /** mtime/ctime/size the cached data was read under (set by open's revalidation). */
  stamp: string;
  /** Bumped by every change of the data: a block read before a change must not be stored after it. */
  epoch: number;
  /** This host wrote since the stamp: the next flush (or open) adopts the node's new stamp and keeps the data. */
  ownWrite: boolean;
  /** Cached blocks shorter than a block (they end at end of file): a write past their end makes them wrong. */
  short: Set<number>;
}

const O_APPEND = 0o2000;
const O_TRUNC = 0o1000;
const ENTRY_NAME = (name: Buffer): string => name.toString('latin1');

function stampOf(a: Attr): string {
  return `${a.size}:${a.mtime.sec}.${a.mtime.nsec}:${a.ctime.sec}.${a.ctime.nsec}`;
}

export class CachedFileTree extends FileTreeLayer {
  private readonly attrTtlMs: number;
  private readonly entryTtlMs: number;
  private readonly negativeTtlMs: number;
  private readonly blockSize: number;
  private readonly now: () => number;
  readonly data: DataCache;
  private readonly attrs = new Map<number, CachedAttr>();
  private readonly entries = new Map<number, Map<string, CachedEntry>>();
  private readonly counts = new Map<number, Counts>();
  private readonly files = new Map<number, FileState>();
  /** Open file handles: fh -> open flags (O_APPEND writes land at an offset only the node knows). */
  private readonly handles = new Map<number, number>();
  /** Counters for tests and status. */
  readonly stats = { attrHits: 0, entryHits: 0, negativeHits: 0, dataHits: 0, dataMisses: 0 };

  constructor(inner: FileTree, opts: CachedFileTreeOptions = {}) {
    super(inner);
    this.attrTtlMs = opts.attrTtlMs ?? 1000;
    this.entryTtlMs = opts.entryTtlMs ?? 1000;
    this.negativeTtlMs = opts.negativeTtlMs ?? 1000;
    this.blockSize = opts.blockSize ?? 128 * 1024;
    if (!Number.isSafeInteger(this.blockSize) || this.blockSize < 512) throw new RangeError('blockSize must be an integer >= 512');
    this.now = opts.now ?? Date.now;
    this.data = opts.data ?? new MemoryDataCache(opts.dataBytes ?? 64 * 1024 * 1024);
  }

  // ---- bookkeeping --------------------------------------------------------------------------

  private putAttr(nodeId: number, attr: Attr): void {
    if (this.attrTtlMs > 0) this.attrs.set(nodeId, { attr, expires: this.now() + this.attrTtlMs });
  }

  private freshAttr(nodeId: number): Attr | undefined {
    const a = this.attrs.get(nodeId);
    if (!a) return undefined;
    if (a.expires <= this.now()) {
      this.attrs.delete(nodeId);
      return undefined;
    }
    return a.attr;
  }

  private putEntry(parent: number, name: Buffer, nodeId: number | null, generation = 0): void {
    const ttl = nodeId === null ? this.negativeTtlMs : this.entryTtlMs;
    let m = this.entries.get(parent);
    if (ttl <= 0) {
      m?.delete(ENTRY_NAME(name));
      return;
    }
    if (!m) this.entries.set(parent, (m = new Map()));
    m.set(ENTRY_NAME(name), { nodeId, generation, expires: this.now() + ttl });
  }

  private dropEntry(parent: number, name: Buffer): CachedEntry | undefined {
    const m = this.entries.get(parent);
    const k = ENTRY_NAME(name);
    const e = m?.get(k);
    m?.delete(k);
    return e;
  }

  /** A lookup the lower tree counted: count it for both sides and cache what it says. */
  private counted(parent: number | null, name: Buffer | null, e: Entry): Entry {
    const c = this.counts.get(e.nodeId);
    if (c) {
      c.upper++;
      c.lower++;
    } else this.counts.set(e.nodeId, { upper: 1, lower: 1 });
    this.putAttr(e.nodeId, e.attr);
    if (parent !== null && name !== null) this.putEntry(parent, name, e.nodeId, e.generation);
    return { ...e, entryTtlMs: this.entryTtlMs, attrTtlMs: this.attrTtlMs };
  }

  private fileState(nodeId: number): FileState {
    let f = this.files.get(nodeId);
    if (!f) this.files.set(nodeId, (f = { stamp: '', epoch: 0, ownWrite: false, short: new Set() }));
    return f;
  }

  /** The file's data changed in a way the cache cannot follow: drop it. */
  private dropData(nodeId: number): void {
    background(this.data.dropFile(nodeId));
    const f = this.files.get(nodeId);
    if (f) {
      f.epoch++;
      f.short.clear();
    }
  }

  // ---- names and attributes -----------------------------------------------------------------

  override async lookup(ctx: FsContext, parent: number, name: Buffer): Promise<Entry> {
    const ce = this.entries.get(parent)?.get(ENTRY_NAME(name));
    const now = this.now();
    if (ce && ce.expires > now) {
      if (ce.nodeId === null) {
        this.stats.negativeHits++;
        throw new FsError('ENOENT', 'no such entry (cached)');
      }
      const c = this.counts.get(ce.nodeId);
      const attr = this.freshAttr(ce.nodeId);
      if (c && attr) {
        this.stats.entryHits++;
        c.upper++;
        return { nodeId: ce.nodeId, generation: ce.generation, attr, entryTtlMs: ce.expires - now, attrTtlMs: this.attrs.get(ce.nodeId)!.expires - now };
      }
    }
    try {
      return this.counted(parent, name, await this.inner.lookup(ctx, parent, name));
    } catch (e) {
      if (isFsError(e) && e.code === 'ENOENT') this.putEntry(parent, name, null);
      throw e;
    }
  }

  override forget(nodeId: number, nlookup: number): void {
    const c = this.counts.get(nodeId);
    if (!c) {
      this.inner.forget(nodeId, nlookup);
      return;
    }
    c.upper -= nlookup;
    if (c.upper > 0) return;
    this.counts.delete(nodeId);
    this.attrs.delete(nodeId);
    this.files.delete(nodeId);
    background(this.data.dropFile(nodeId));
    this.inner.forget(nodeId, c.lower);
  }

  override async getattr(ctx: FsContext, nodeId: number, fh?: number): Promise<{ attr: Attr; attrTtlMs?: number }> {
    const a = this.freshAttr(nodeId);
    if (a) {
      this.stats.attrHits++;
      return { attr: a, attrTtlMs: this.attrs.get(nodeId)!.expires - this.now() };
    }
    const r = await this.inner.getattr(ctx, nodeId, fh);
    this.putAttr(nodeId, r.attr);
    return { attr: r.attr, attrTtlMs: this.attrTtlMs };
  }

  override async setattr(ctx: FsContext, nodeId: number, changes: SetAttr, fh?: number): Promise<{ attr: Attr; attrTtlMs?: number }> {
    if (changes.size !== undefined) this.dropData(nodeId);
    this.attrs.delete(nodeId);
    const r = await this.inner.setattr(ctx, nodeId, changes, fh);
    this.putAttr(nodeId, r.attr);
    if (changes.size !== undefined) this.fileState(nodeId).ownWrite = true;
    return { attr: r.attr, attrTtlMs: this.attrTtlMs };
  }

  override async mknod(ctx: FsContext, parent: number, name: Buffer, mode: number, rdev: number): Promise<Entry> {
    this.attrs.delete(parent);
    this.dropEntry(parent, name);
    return this.counted(parent, name, await this.inner.mknod(ctx, parent, name, mode, rdev));
  }

  override async mkdir(ctx: FsContext, parent: number, name: Buffer, mode: number): Promise<Entry> {
    this.attrs.delete(parent);
    this.dropEntry(parent, name);
    return this.counted(parent, name, await this.inner.mkdir(ctx, parent, name, mode));
  }

  override async symlink(ctx: FsContext, parent: number, name: Buffer, target: Buffer): Promise<Entry> {
    this.attrs.delete(parent);
    this.dropEntry(parent, name);
    return this.counted(parent, name, await this.inner.symlink(ctx, parent, name, target));
  }

  override async link(ctx: FsContext, nodeId: number, newParent: number, newName: Buffer): Promise<Entry> {
    this.attrs.delete(newParent);
    this.attrs.delete(nodeId);
    this.dropEntry(newParent, newName);
    return this.counted(newParent, newName, await this.inner.link(ctx, nodeId, newParent, newName));
  }

  /** A name goes away: its entry becomes negative, and the parent's and the node's attributes (nlink, times) are stale. */
  private removed(parent: number, name: Buffer): void {
    this.attrs.delete(parent);
    const old = this.dropEntry(parent, name);
    if (old?.nodeId) this.attrs.delete(old.nodeId);
  }

  override async unlink(ctx: FsContext, parent: number, name: Buffer): Promise<void> {
    this.removed(parent, name);
    await this.inner.unlink(ctx, parent, name);
    this.putEntry(parent, name, null);
  }

  override async rmdir(ctx: FsContext, parent: number, name: Buffer): Promise<void> {
    this.removed(parent, name);
    await this.inner.rmdir(ctx, parent, name);
    this.putEntry(parent, name, null);
  }

  override async rename(ctx: FsContext, parent: number, name: Buffer, newParent: number, newName: Buffer, flags: number): Promise<void> {
    this.removed(parent, name);
    this.removed(newParent, newName);
    await this.inner.rename(ctx, parent, name, newParent, newName, flags);
  }

  // ---- files --------------------------------------------------------------------------------

  /** Close-to-open: fresh attributes from below; data read under other ones is dropped. */
  override async open(ctx: FsContext, nodeId: number, flags: number): Promise<OpenResult> {
    this.attrs.delete(nodeId);
    const { attr } = await this.inner.getattr(ctx, nodeId);
    this.putAttr(nodeId, attr);
    const f = this.fileState(nodeId);
    const stamp = stampOf(attr);
    if (stamp !== f.stamp && !f.ownWrite) this.dropData(nodeId);
    f.stamp = stamp;
    f.ownWrite = false;
    if (flags & O_TRUNC) this.dropData(nodeId);
    const r = await this.inner.open(ctx, nodeId, flags);
    if (flags & O_TRUNC) {
      this.attrs.delete(nodeId);
      f.ownWrite = true;
    }
    this.handles.set(r.fh, flags);
    return r;
  }

  override async create(ctx: FsContext, parent: number, name: Buffer, mode: number, flags: number): Promise<CreateResult> {
    this.attrs.delete(parent);
    this.dropEntry(parent, name);
    const r = await this.inner.create(ctx, parent, name, mode, flags);
    const entry = this.counted(parent, name, r.entry);
    this.dropData(entry.nodeId);
    const f = this.fileState(entry.nodeId);
    f.stamp = stampOf(r.entry.attr);
    f.ownWrite = false;
    this.handles.set(r.open.fh, flags);
    return { entry, open: r.open };
  }

  override async read(ctx: FsContext, nodeId: number, fh: number, offset: number, size: number): Promise<Buffer> {
    if (size === 0) return Buffer.alloc(0);
    const bs = this.blockSize;
    const first = Math.floor(offset / bs);
    const last = Math.floor((offset + size - 1) / bs);
    const f = this.fileState(nodeId);
    const blocks: Buffer[] = [];
    const missing: number[] = [];
    for (let b = first; b <= last; b++) {
      const got = await this.data.get(nodeId, b);
      if (got) blocks[b - first] = got;
      else missing.push(b);
    }
    if (missing.length) {
      this.stats.dataMisses += missing.length;
      const epoch = f.epoch;
      await Promise.all(
        missing.map(async (b) => {
          const data = await this.inner.read(ctx, nodeId, fh, b * bs, bs);
          blocks[b - first] = data;
          if (f.epoch === epoch && this.files.get(nodeId) === f) {
            background(this.data.set(nodeId, b, data));
            if (data.length < bs) f.short.add(b);
          }
        }),
      );
    }
    this.stats.dataHits += last - first + 1 - missing.length;
    // One block covering the whole request: a view, no copy. Otherwise the pieces are copied
    // into one reply buffer (the FUSE reply needs contiguous bytes).
    const startIn = offset - first * bs;
    if (first === last) {
      const b = blocks[0]!;
      return b.subarray(Math.min(startIn, b.length), Math.min(startIn + size, b.length));
    }
    const parts: Buffer[] = [];
    for (let i = 0; i < blocks.length; i++) {
      const b = blocks[i]!;
      const from = i === 0 ? startIn : 0;
      const to = i === blocks.length - 1 ? Math.min(b.length, offset + size - (first + i) * bs) : b.length;
      if (from < b.length) parts.push(b.subarray(from, to));
      if (b.length < bs) break; // end of file
    }
    return Buffer.concat(parts);
  }

  override async write(ctx: FsContext, nodeId: number, fh: number, offset: number, data: Buffer): Promise<number> {
    const f = this.fileState(nodeId);
    f.epoch++; // reads in flight must not store what they read before this write
    this.attrs.delete(nodeId);
    let n: number;
    try {
      n = await this.inner.write(ctx, nodeId, fh, offset, data);
    } catch (e) {
      this.dropData(nodeId);
      throw e;
    }
    f.epoch++;
    f.ownWrite = true;
    this.attrs.delete(nodeId);
    if ((this.handles.get(fh) ?? 0) & O_APPEND) {
      this.dropData(nodeId); // the node chose the offset (end of file)
      return n;
    }
    await this.patch(nodeId, f, offset, data.subarray(0, n));
    return n;
  }

  /**
   * Brings the cached blocks a write covered up to date. A short block (it ended at end of file)
   * that the write reaches past is dropped: the file is longer now, maybe with a hole. A full
   * block is replaced by a patched copy, never changed in place: earlier reads may have handed
   * views of it to replies not sent yet (copying one block is the price of that).
   */
  private async patch(nodeId: number, f: FileState, offset: number, data: Buffer): Promise<void> {
    const bs = this.blockSize;
    const end = offset + data.length;
    for (const b of [...f.short]) {
      const blk = await this.data.get(nodeId, b);
      if (!blk || b * bs + blk.length < end) {
        await this.data.drop(nodeId, b);
        f.short.delete(b);
      }
    }
    for (let b = Math.floor(offset / bs); b * bs < end; b++) {
      const blk = await this.data.get(nodeId, b);
      if (!blk) continue;
      const from = Math.max(offset, b * bs);
      const to = Math.min(end, (b + 1) * bs);
      const copy = Buffer.from(blk);
      data.copy(copy, from - b * bs, from - offset, to - offset);
      await this.data.set(nodeId, b, copy);
    }
  }

  /** close(2): nothing to write back (write-through); the node's attributes after our writes become the data's stamp. */
  override async flush(ctx: FsContext, nodeId: number, fh: number, lockOwner: bigint): Promise<void> {
    await this.inner.flush(ctx, nodeId, fh, lockOwner);
    const f = this.files.get(nodeId);
    if (f?.ownWrite) {
      const { attr } = await this.inner.getattr(ctx, nodeId, fh);
      this.putAttr(nodeId, attr);
      f.stamp = stampOf(attr);
      f.ownWrite = false;
    }
  }

  override async release(ctx: FsContext, nodeId: number, fh: number, lockOwner?: bigint): Promise<void> {
    this.handles.delete(fh);
    await this.inner.release(ctx, nodeId, fh, lockOwner);
  }

  override async fallocate(ctx: FsContext, nodeId: number, fh: number, mode: number, offset: number, length: number): Promise<void> {
    this.dropData(nodeId);
    this.attrs.delete(nodeId);
    await this.inner.fallocate(ctx, nodeId, fh, mode, offset, length);
    this.fileState(nodeId).ownWrite = true;
  }

  override async copyFileRange(
    ctx: FsContext,
    from: { nodeId: number; fh: number; offset: number },
    to: { nodeId: number; fh: number; offset: number },
    length: number,
    flags: number,
  ): Promise<number> {
    this.dropData(to.nodeId);
    this.attrs.delete(to.nodeId);
    const n = await this.inner.copyFileRange(ctx, from, to, length, flags);
    this.fileState(to.nodeId).ownWrite = true;
    return n;
  }

  override async setxattr(ctx: FsContext, nodeId: number, name: Buffer, value: Buffer, flags: number): Promise<void> {
    this.attrs.delete(nodeId);
    await this.inner.setxattr(ctx, nodeId, name, value, flags);
  }

  override async removexattr(ctx: FsContext, nodeId: number, name: Buffer): Promise<void> {
    this.attrs.delete(nodeId);
    await this.inner.removexattr(ctx, nodeId, name);
  }

  override async readdirplus(ctx: FsContext, nodeId: number, fh: number, offset: number, maxEntries: number): Promise<DirEntryPlus[]> {
    const list = await this.inner.readdirplus(ctx, nodeId, fh, offset, maxEntries);
    return list.map((d) => (d.entry ? { ...d, entry: this.counted(nodeId, d.name, d.entry) } : d));
  }

  override async close(): Promise<void> {
    this.attrs.clear();
    this.entries.clear();
    this.counts.clear();
    for (const id of this.files.keys()) background(this.data.dropFile(id));
    this.files.clear();
    await this.inner.close();
  }
}
