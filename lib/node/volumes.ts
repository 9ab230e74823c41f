/**
 * A storage node's volumes: sparse raw files under `DATA/volumes/<name>.img`, where `name` is a
 * volume name valid for the resolver (`vm1/disk0` -> DATA/volumes/vm1/disk0.img). The store owns
 * the files and the FileVolumes kept open while a volume is exported; it knows nothing of NBD
 * except through the injected `VolumeExporter` (connection count, unexport before a file is
 * closed or removed).
 *
 * Durability of metadata: a created volume is made at a temporary name, sized, fsynced, linked
 * to its final name (link fails atomically if the name exists), and every directory from the
 * file's up to DATA is fsynced before `create` resolves; grow fsyncs the file, delete fsyncs the
 * directory. Mutations are serialized (control plane: one at a time per store).
 *
 * The DATA directory is locked by `DATA/lock`, an O_EXCL pid file (`pid starttime`), so two
 * nodes never serve the same DATA: Node has no flock and the addon offers none. A lock whose
 * process is gone (or whose pid was reused by a process started at another time) is stale and
 * is broken by renaming it away first, so two nodes breaking the same stale lock cannot both win.
 */
import { randomBytes } from 'node:crypto';
import { constants as FS, promises as fsp, readFileSync } from 'node:fs';
import path from 'node:path';
import { FileVolume, type FileEngine } from '../block/file.js';
import { toVolumeError, VolumeError } from '../block/errors.js';
import type { Logger } from '../log.js';
import type { NativeAddon } from '../native/index.js';
import { checkName } from '../resolver/types.js';

/** Volume sizes are whole 512-byte sectors (what a virtual disk needs). */
export const SECTOR = 512;
const IMG = '.img';
const TMP_RE = /\.img\.tmp-[0-9a-f]{12}$/;

export interface VolumeInfo {
  name: string;
  /** Size in bytes. */
  size: number;
  /** Bytes allocated on the filesystem (sparse files: less than size). */
  allocated: number;
}

export interface SpaceInfo {
  /** Bytes of the filesystem holding DATA, in all and still available to the node. */
  capacity: number;
  free: number;
}

/** What the store needs from whoever exports its volumes (the node's NBD server). */
export interface VolumeExporter {
  /** Clients connected to the volume's export now (0 when not exported). */
  connections(name: string): number;
  /** Stops exporting the volume: drains in-flight requests and disconnects its clients. */
  unexport(name: string): Promise<void>;
}

export interface VolumeStoreOptions {
  logger: Logger;
  exporter?: VolumeExporter;
  /** FileVolume engine (default: FileVolume's). */
  engine?: FileEngine;
  /** Override the native addon for FileVolumes (tests). */
  native?: NativeAddon | null;
}

export class VolumeStore {
  readonly data: string;
  readonly root: string;
  private readonly logger: Logger;
  private readonly opts: VolumeStoreOptions;
  private exporter: VolumeExporter | undefined;
  private readonly lock: DataLock;
  private readonly open_ = new Map<string, FileVolume>();
  /** Tail of the serialized mutations. */
  private queue: Promise<unknown> = Promise.resolve();
  private closed = false;

  private constructor(data: string, lock: DataLock, opts: VolumeStoreOptions) {
    this.data = data;
    this.root = path.join(data, 'volumes');
    this.lock = lock;
    this.logger = opts.logger;
    this.opts = opts;
    this.exporter = opts.exporter;
  }

  /** Locks DATA (EBUSY when another live store holds it) and prepares DATA/volumes. */
  static async open(data: string, opts: VolumeStoreOptions): Promise<VolumeStore> {
    const dir = path.resolve(data);
    try {
      await fsp.mkdir(dir, { recursive: true });
    } catch (e) {
      throw toVolumeError(e);
    }
    const lock = await DataLock.acquire(dir, opts.logger);
    try {
      const store = new VolumeStore(dir, lock, opts);
      let made = false;
      try {
        await fsp.mkdir(store.root);
        made = true;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      }
      if (made) await fsyncDir(dir);
      await store.removeTemporaries(store.root);
      return store;
    } catch (e) {
      await lock.release();
      throw toVolumeError(e);
    }
  }

  /** Sets the exporter (the node creates its NBD server after the store). */
  setExporter(exporter: VolumeExporter | undefined): void {
    this.exporter = exporter;
  }

  /** The image file of a volume; EINVAL for a name the resolver would refuse (never a path outside DATA/volumes). */
  pathOf(name: string): string {
    if (typeof name !== 'string' || name.includes('\0')) throw new VolumeError('EINVAL', 'bad volume name');
    try {
      checkName(name, 'volume');
    } catch (e) {
      throw new VolumeError('EINVAL', (e as Error).message);
    }
    const p = path.resolve(this.root, name + IMG);
    // Defence in depth: checkName already refuses '..', '.', empty and absolute names.
    if (!p.startsWith(this.root + path.sep)) throw new VolumeError('EINVAL', `bad volume name "${name}"`);
    return p;
  }

  /**
   * Creates a sparse volume of `size` bytes, durable (file and directory entries) when this
   * resolves. Idempotent: an existing volume of the same size is fine (`created: false`); of
   * another size EEXIST, unless `grow` is set and the size is larger (then it grows).
   */
  create(name: string, size: number, opts: { grow?: boolean } = {}): Promise<{ info: VolumeInfo; created: boolean }> {
    const file = this.pathOf(name);
    checkSize(size);
    return this.serial(async () => {
      const existing = await statOrNull(file);
      if (existing) {
        if (existing.size === size) return { info: infoOf(name, existing), created: false };
        if (!opts.grow) throw new VolumeError('EEXIST', `volume ${name} exists with size ${existing.size} (asked ${size})`);
        if (size < existing.size) throw new VolumeError('EINVAL', `volume ${name}: ${size} would shrink it from ${existing.size}`);
        return { info: await this.growLocked(name, file, size), created: false };
      }
      const dir = path.dirname(file);
      const made = await mkdirs(this.root, dir);
      const tmp = `${file}.tmp-${randomBytes(6).toString('hex')}`;
      let fh: fsp.FileHandle | undefined;
      try {
        fh = await fsp.open(tmp, FS.O_RDWR | FS.O_CREAT | FS.O_EXCL, 0o600);
        await fh.truncate(size);
        await fh.sync();
        await fh.close();
        fh = undefined;
        try {
          await fsp.link(tmp, file);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
          throw new VolumeError('EEXIST', `volume ${name} appeared meanwhile`);
        }
      } catch (e) {
        throw toVolumeError(e);
      } finally {
        await fh?.close().catch(() => {});
        await fsp.rm(tmp, { force: true }).catch(() => {});
      }
      // The new entry (and every directory made for it) must survive a crash before we answer.
      await fsyncDir(dir);
      for (const d of made) await fsyncDir(path.dirname(d));
      const st = await fsp.stat(file);
      this.logger.info({ volume: name, size }, 'volume created');
      return { info: infoOf(name, st), created: true };
    });
  }

  /**
   * Grows a volume to `newSize` (EINVAL if smaller; the same size is a no-op). An open volume is
   * unexported and closed first: the caller exports it again with its new size.
   */
  grow(name: string, newSize: number): Promise<VolumeInfo> {
    const file = this.pathOf(name);
    checkSize(newSize);
    return this.serial(() => this.growLocked(name, file, newSize));
  }

  private async growLocked(name: string, file: string, newSize: number): Promise<VolumeInfo> {
    const st = await statOrNull(file);
    if (!st) throw new VolumeError('ENOENT', `no volume ${name}`);
    if (newSize < st.size) throw new VolumeError('EINVAL', `volume ${name}: ${newSize} would shrink it from ${st.size}`);
    if (newSize === st.size) return infoOf(name, st);
    await this.closeExported(name);
    try {
      const fh = await fsp.open(file, FS.O_RDWR);
      try {
        await fh.truncate(newSize);
        await fh.sync();
      } finally {
        await fh.close();
      }
      const after = await fsp.stat(file);
      this.logger.info({ volume: name, from: st.size, to: newSize }, 'volume grown');
      return infoOf(name, after);
    } catch (e) {
      throw toVolumeError(e);
    }
  }

  /** Deletes a volume: EBUSY while its export has clients, unless `force` (they are disconnected). */
  delete(name: string, opts: { force?: boolean } = {}): Promise<void> {
    const file = this.pathOf(name);
    return this.serial(async () => {
      if (!(await statOrNull(file))) throw new VolumeError('ENOENT', `no volume ${name}`);
      const conns = this.exporter?.connections(name) ?? 0;
      if (conns > 0 && !opts.force) throw new VolumeError('EBUSY', `volume ${name} has ${conns} connected client(s) (force to delete anyway)`);
      await this.closeExported(name);
      try {
        await fsp.unlink(file);
      } catch (e) {
        throw toVolumeError(e);
      }
      const dir = path.dirname(file);
      await fsyncDir(dir);
      // Remove directories left empty, up to (not including) DATA/volumes.
      let d = dir;
      while (d !== this.root && d.startsWith(this.root + path.sep)) {
        try {
          await fsp.rmdir(d);
        } catch {
          break; // not empty
        }
        await fsyncDir(path.dirname(d));
        d = path.dirname(d);
      }
      this.logger.info({ volume: name, force: Boolean(opts.force), connections: conns }, 'volume deleted');
    });
  }

  /** Every volume, sorted by name. */
  async list(): Promise<VolumeInfo[]> {
    const out: VolumeInfo[] = [];
    const walk = async (dir: string, prefix: string): Promise<void> => {
      let entries;
      try {
        entries = await fsp.readdir(dir, { withFileTypes: true });
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
        throw toVolumeError(e);
      }
      for (const ent of entries) {
        const rel = prefix ? `${prefix}/${ent.name}` : ent.name;
        if (ent.isDirectory()) await walk(path.join(dir, ent.name), rel);
        else if (ent.isFile() && ent.name.endsWith(IMG) && ent.name.length > IMG.length) {
          const name = rel.slice(0, -IMG.length);
          try {
            checkName(name, 'volume');
          } catch {
            continue; // not one of ours
          }
          const st = await statOrNull(path.join(dir, ent.name));
          if (st) out.push(infoOf(name, st));
        }
      }
    };
    await walk(this.root, '');
    return out.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  async stat(name: string): Promise<VolumeInfo> {
    const st = await statOrNull(this.pathOf(name));
    if (!st) throw new VolumeError('ENOENT', `no volume ${name}`);
    return infoOf(name, st);
  }

  /** Opens the volume's FileVolume (the same one while it stays open); it stays open until close/grow/delete. */
  async open(name: string): Promise<FileVolume> {
    const file = this.pathOf(name);
    const have = this.open_.get(name);
    if (have) return have;
    const vol = await FileVolume.open(file, {
      logger: this.logger,
      ...(this.opts.engine ? { engine: this.opts.engine } : {}),
      ...(this.opts.native !== undefined ? { native: this.opts.native } : {}),
    });
    const raced = this.open_.get(name);
    if (raced) {
      await vol.close();
      return raced;
    }
    this.open_.set(name, vol);
    return vol;
  }

  /** Whether the store holds the volume open. */
  isOpen(name: string): boolean {
    return this.open_.has(name);
  }

  /** Flushes and closes an open volume (no-op when it is not open). Unexport it first. */
  async closeVolume(name: string): Promise<void> {
    const vol = this.open_.get(name);
    if (!vol) return;
    this.open_.delete(name);
    try {
      await vol.flush();
    } finally {
      await vol.close();
    }
  }

  /** Capacity of DATA's filesystem and the space still available to the node (statfs). */
  async space(): Promise<SpaceInfo> {
    try {
      const s = await fsp.statfs(this.data);
      return { capacity: s.blocks * s.bsize, free: s.bavail * s.bsize };
    } catch (e) {
      throw toVolumeError(e);
    }
  }

  /** Flushes and closes every open volume and releases the lock on DATA. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.queue.catch(() => {});
    let first: unknown;
    for (const name of [...this.open_.keys()]) {
      try {
        await this.closeVolume(name);
      } catch (e) {
        this.logger.error({ volume: name, err: (e as Error).message }, 'volume: flush/close failed');
        first ??= e;
      }
    }
    await this.lock.release();
    if (first) throw toVolumeError(first);
  }

  private async closeExported(name: string): Promise<void> {
    if (this.exporter && this.open_.has(name)) await this.exporter.unexport(name);
    await this.closeVolume(name);
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    if (this.closed) return Promise.reject(new VolumeError('ESHUTDOWN', 'volume store closed'));
    const p = this.queue.then(fn, fn);
    this.queue = p.catch(() => {});
    return p;
  }

  private async removeTemporaries(dir: string): Promise<void> {
    const entries = await fsp.readdir(dir, { withFileTypes: true });
    for (const ent of entries) {
      const p = path.join(dir, ent.name);
      if (ent.isDirectory()) await this.removeTemporaries(p);
      else if (TMP_RE.test(ent.name)) {
        this.logger.info({ file: p }, 'removing a half-created volume left by a crash');
        await fsp.rm(p, { force: true });
      }
    }
  }
}

function checkSize(size: number): void {
  if (!Number.isSafeInteger(size) || size <= 0 || size % SECTOR !== 0) {
    throw new VolumeError('EINVAL', `bad size ${String(size)} (a positive multiple of ${SECTOR} bytes)`);
  }
}

function infoOf(name: string, st: { size: number; blocks: number }): VolumeInfo {
  return { name, size: st.size, allocated: st.blocks * 512 };
}

async function statOrNull(p: string): Promise<import('node:fs').Stats | null> {
  try {
    const st = await fsp.stat(p);
    if (!st.isFile()) throw new VolumeError('EINVAL', `${p} is not a regular file`);
    return st;
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return null;
    if (code === 'ENOTDIR') return null; // a parent is a volume file: no such volume
    throw toVolumeError(e);
  }
}

/** mkdir -p from `root` (which exists) down to `dir`; returns the directories it made, outermost first. */
async function mkdirs(root: string, dir: string): Promise<string[]> {
  const rel = path.relative(root, dir);
  if (!rel) return [];
  const made: string[] = [];
  let cur = root;
  for (const seg of rel.split(path.sep)) {
    cur = path.join(cur, seg);
    try {
      await fsp.mkdir(cur, 0o700);
      made.push(cur);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code !== 'EEXIST') throw toVolumeError(e);
      const st = await fsp.lstat(cur);
      if (!st.isDirectory()) throw new VolumeError('ENOTDIR', `${cur} is not a directory (a volume of that name exists)`);
    }
  }
  return made;
}

export async function fsyncDir(dir: string): Promise<void> {
  let fh: fsp.FileHandle | undefined;
  try {
    fh = await fsp.open(dir, FS.O_RDONLY | FS.O_DIRECTORY);
    await fh.sync();
  } catch (e) {
    throw toVolumeError(e);
  } finally {
    await fh?.close().catch(() => {});
  }
}

// ---------------------------------------------------------------------------------------------
// The DATA lock

/** The kernel's start time of a process (field 22 of /proc/PID/stat), or null when it is gone. */
function procStart(pid: number): string | null {
  try {
    const s = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // comm may hold spaces and parentheses: fields start after the last ')'.
    const rest = s.slice(s.lastIndexOf(')') + 2).split(' ');
    return rest[19] ?? null; // field 22 overall = index 19 after pid, comm
  } catch {
    return null;
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** `DATA/lock`: O_EXCL pid file with stale-pid detection (see the file header). */
export class DataLock {
  private released = false;
  private constructor(
    readonly file: string,
    private readonly token: string,
  ) {}

  static async acquire(dir: string, logger: Logger): Promise<DataLock> {
    const file = path.join(dir, 'lock');
    const token = `${process.pid} ${procStart(process.pid) ?? '0'} ${randomBytes(8).toString('hex')}\n`;
    for (let attempt = 0; attempt < 5; attempt++) {
      try {
        const fh = await fsp.open(file, FS.O_WRONLY | FS.O_CREAT | FS.O_EXCL, 0o600);
        try {
          await fh.writeFile(token);
          await fh.sync();
        } finally {
          await fh.close();
        }
        return new DataLock(file, token);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw toVolumeError(e);
      }
      let content: string;
      try {
        content = await fsp.readFile(file, 'utf8');
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'ENOENT') continue; // released meanwhile
        throw toVolumeError(e);
      }
      const holder = parseLock(content);
      if (holder && isHeld(holder)) {
        throw new VolumeError('EBUSY', `${dir} is in use by process ${holder.pid} (lock ${file})`);
      }
      if (!holder) {
        // Written by a creator that has not finished writing yet? Give it a moment.
        const st = await fsp.stat(file).catch(() => null);
        if (st && Date.now() - st.mtimeMs < 2000) {
          await new Promise((r) => setTimeout(r, 100));
          continue;
        }
      }
      // Stale: move it aside atomically (only one breaker wins the rename), then check that
      // what was moved is the stale lock we judged and not a fresh one.
      const aside = `${file}.stale-${randomBytes(6).toString('hex')}`;
      try {
        await fsp.rename(file, aside);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'ENOENT') continue;
        throw toVolumeError(e);
      }
      const moved = await fsp.readFile(aside, 'utf8').catch(() => '');
      if (moved !== content) {
        await fsp.rename(aside, file).catch(() => {}); // someone else's fresh lock: put it back
        continue;
      }
      await fsp.rm(aside, { force: true });
      logger.warn({ lock: file, stale: holder ?? content }, 'removed a stale lock left by a process that is gone');
    }
    throw new VolumeError('EBUSY', `${dir}: could not take the lock ${file}`);
  }

  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    const content = await fsp.readFile(this.file, 'utf8').catch(() => null);
    if (content === this.token) await fsp.rm(this.file, { force: true });
  }
}

function parseLock(s: string): { pid: number; start: string } | null {
  const m = /^(\d+) (\d+) [0-9a-f]+\n$/.exec(s);
  if (!m) return null;
  return { pid: Number(m[1]), start: m[2]! };
}

function isHeld(h: { pid: number; start: string }): boolean {
  if (!alive(h.pid)) return false;
  const start = procStart(h.pid);
  // Without /proc we cannot tell a reused pid: assume held.
  return start === null || h.start === '0' || start === h.start;
}
