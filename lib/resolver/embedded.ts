/**
 * The embedded resolver store: node records and name records in one JSON file, owned by one
 * process (serve it to others with ./service.ts).
 *
 * Durability: every change rewrites the whole file as `FILE.tmp`, fsyncs it, renames it over
 * `FILE` (atomic) and fsyncs the directory, before the call returns. A crash leaves either the old
 * or the new file, never a torn one; a leftover `FILE.tmp` is ignored (and replaced) at open.
 *
 * Liveness lives in memory only (a lease ends at seen + ttl): after a restart every non-static node
 * counts dead until it heartbeats again. Static nodes are always alive.
 *
 * Every operation runs in turn (an in-process queue), so placeName is atomic for all callers of
 * this store.
 */
import { open as fsOpen, readFile, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from '../log.js';
import { chooseNodes, placeRecord } from './placement.js';
import {
  checkNameRecord,
  checkNodeId,
  checkNodeRecord,
  cleanName,
  cleanNode,
  DEFAULT_LEASE_TTL_MS,
  ResolverError,
  type NameRecord,
  type NodeRecord,
  type NodeStatus,
  type PlaceRequest,
  type ResolverStore,
} from './types.js';

const FORMAT = 'vstore-resolver';
const FORMAT_VERSION = 1;

/** A node as stored: the record and when it was first registered. */
interface StoredNode {
  rec: NodeRecord;
  registered: number;
}

interface FileBody {
  format: typeof FORMAT;
  version: typeof FORMAT_VERSION;
  nodes: Record<string, StoredNode>;
  names: Record<string, NameRecord>;
}

export interface EmbeddedStoreOptions {
  logger: Logger;
  /** Clock (ms since the epoch); tests inject one to age leases. */
  now?: () => number;
}

export class EmbeddedStore implements ResolverStore {
  private readonly nodes = new Map<string, StoredNode>();
  private readonly names = new Map<string, NameRecord>();
  /** In memory only: id -> lease. */
  private readonly leases = new Map<string, { seen: number; expires: number }>();
  private readonly watchers = new Map<string, Set<(rec: NameRecord | null) => void>>();
  private queue: Promise<unknown> = Promise.resolve();
  private closed = false;
  private readonly now: () => number;
  private readonly logger: Logger;

  private constructor(
    readonly path: string,
    opts: EmbeddedStoreOptions,
  ) {
    this.now = opts.now ?? Date.now;
    this.logger = opts.logger;
  }

  /** Opens (or creates, at the first change) the store file at `file`. */
  static async open(file: string, opts: EmbeddedStoreOptions): Promise<EmbeddedStore> {
    const store = new EmbeddedStore(path.resolve(file), opts);
    await store.load();
    return store;
  }

  private async load(): Promise<void> {
    let text: string;
    try {
      text = await readFile(this.path, 'utf8');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') {
        this.logger.info({ file: this.path }, 'resolver store: new (no file yet)');
        await rm(this.path + '.tmp', { force: true });
        return;
      }
      throw new ResolverError('EUNAVAIL', `resolver store ${this.path}: ${(e as Error).message}`);
    }
    let body: FileBody;
    try {
      body = JSON.parse(text) as FileBody;
    } catch (e) {
      throw new ResolverError('EINVAL', `resolver store ${this.path}: not JSON (${(e as Error).message}); refusing to start over it`);
    }
    if (body?.format !== FORMAT || body.version !== FORMAT_VERSION || typeof body.nodes !== 'object' || typeof body.names !== 'object') {
      throw new ResolverError('EINVAL', `resolver store ${this.path}: not a vstore resolver store (format ${FORMAT} version ${FORMAT_VERSION})`);
    }
    for (const [id, n] of Object.entries(body.nodes)) {
      checkNodeRecord(n.rec);
      if (n.rec.id !== id) throw new ResolverError('EINVAL', `resolver store ${this.path}: node ${id} holds the record of ${n.rec.id}`);
      this.nodes.set(id, n);
    }
    for (const [name, r] of Object.entries(body.names)) {
      checkNameRecord(r);
      if (r.name !== name) throw new ResolverError('EINVAL', `resolver store ${this.path}: name ${name} holds the record of ${r.name}`);
      this.names.set(name, r);
    }
    await rm(this.path + '.tmp', { force: true });
    this.logger.info({ file: this.path, nodes: this.nodes.size, names: this.names.size }, 'resolver store: loaded');
  }

  /** Runs `fn` after every operation queued before it. */
  private serial<T>(fn: () => Promise<T> | T): Promise<T> {
    const run = this.queue.then(() => {
      if (this.closed) throw new ResolverError('EUNAVAIL', `resolver store ${this.path} is closed`);
      return fn();
    });
    this.queue = run.catch(() => {});
    return run;
  }

  /** Writes the whole state: temp file, fsync, rename, fsync of the directory. */
  private async persist(): Promise<void> {
    const body: FileBody = {
      format: FORMAT,
      version: FORMAT_VERSION,
      nodes: Object.fromEntries([...this.nodes].sort(([a], [b]) => (a < b ? -1 : 1))),
      names: Object.fromEntries([...this.names].sort(([a], [b]) => (a < b ? -1 : 1))),
    };
    const tmp = this.path + '.tmp';
    const data = JSON.stringify(body, null, 1) + '\n';
    const fh = await fsOpen(tmp, 'w', 0o600);
    try {
      await fh.writeFile(data, 'utf8');
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, this.path);
    const dir = await fsOpen(path.dirname(this.path), 'r');
    try {
      await dir.sync();
    } finally {
      await dir.close();
    }
  }

  /**
   * Saves the state after a change; when saving fails, `rollback` puts the maps back as the file
   * has them and the call fails with EUNAVAIL.
   */
  private async save(rollback: () => void): Promise<void> {
    try {
      await this.persist();
    } catch (e) {
      rollback();
      throw new ResolverError('EUNAVAIL', `resolver store ${this.path}: cannot save: ${(e as Error).message}`);
    }
  }

  /** Sets (rec) or deletes (null) a name and saves. */
  private async setName(name: string, rec: NameRecord | null): Promise<void> {
    const prev = this.names.get(name);
    if (rec) this.names.set(name, rec);
    else this.names.delete(name);
    await this.save(() => {
      if (prev) this.names.set(name, prev);
      else this.names.delete(name);
    });
  }

  private status(n: StoredNode, now: number): NodeStatus {
    const copy = structuredClone(n.rec);
    if (n.rec.static) return { ...copy, alive: true, seen: n.registered };
    const l = this.leases.get(n.rec.id);
    return { ...copy, alive: !!l && now < l.expires, seen: l?.seen ?? 0 };
  }

  private allStatus(): NodeStatus[] {
    const now = this.now();
    return [...this.nodes.values()].map((n) => this.status(n, now)).sort((a, b) => (a.id < b.id ? -1 : 1));
  }

  registerNode(rec: NodeRecord, ttlMs?: number): Promise<void> {
    return this.serial(async () => {
      checkNodeRecord(rec);
      if (ttlMs !== undefined && (!Number.isFinite(ttlMs) || ttlMs <= 0)) throw new ResolverError('EINVAL', `node ${rec.id}: ttl must be positive, got ${ttlMs}`);
      const now = this.now();
      const old = this.nodes.get(rec.id);
      if (old) {
        if (!!old.rec.static !== !!rec.static) {
          throw new ResolverError('EEXIST', `node id ${rec.id} is taken by a ${old.rec.static ? 'static node registered by hand' : 'node with a lease'}`);
        }
        const l = this.leases.get(rec.id);
        if (!rec.static && l && now < l.expires && !sameList(old.rec.control, rec.control)) {
          throw new ResolverError(
            'EEXIST',
            `node id ${rec.id} is held by a live node at ${old.rec.control.join(', ') || '(no control address)'} (its lease ends in ${l.expires - now} ms)`,
          );
        }
      }
      const stored: StoredNode = { rec: cleanNode(rec), registered: old && old.rec.static === rec.static ? old.registered : now };
      if (!old || JSON.stringify(old.rec) !== JSON.stringify(stored.rec)) {
        // A heartbeat that changes nothing is not written.
        this.nodes.set(rec.id, stored);
        await this.save(() => {
          if (old) this.nodes.set(rec.id, old);
          else this.nodes.delete(rec.id);
        });
      }
      if (!rec.static) this.leases.set(rec.id, { seen: now, expires: now + (ttlMs ?? DEFAULT_LEASE_TTL_MS) });
    });
  }

  deregisterNode(id: string, opts: { forget?: boolean } = {}): Promise<void> {
    return this.serial(async () => {
      checkNodeId(id);
      if (!this.nodes.has(id)) throw new ResolverError('ENOENT', `no node ${id}`);
      this.leases.delete(id);
      if (opts.forget) {
        const prev = this.nodes.get(id)!;
        this.nodes.delete(id);
        await this.save(() => this.nodes.set(id, prev));
      }
    });
  }

  getNode(id: string): Promise<NodeStatus | null> {
    return this.serial(() => {
      checkNodeId(id);
      const n = this.nodes.get(id);
      return n ? this.status(n, this.now()) : null;
    });
  }

  listNodes(): Promise<NodeStatus[]> {
    return this.serial(() => this.allStatus());
  }

  getName(name: string): Promise<NameRecord | null> {
    return this.serial(() => {
      if (typeof name !== 'string') throw new ResolverError('EINVAL', 'name must be a string');
      const r = this.names.get(name);
      return r ? structuredClone(r) : null;
    });
  }

  listNames(prefix = ''): Promise<NameRecord[]> {
    return this.serial(() =>
      [...this.names.values()]
        .filter((r) => r.name.startsWith(prefix))
        .sort((a, b) => (a.name < b.name ? -1 : 1))
        .map((r) => structuredClone(r)),
    );
  }

  async placeName(req: PlaceRequest): Promise<{ record: NameRecord; created: boolean }> {
    const r = await this.serial(async () => {
      const existing = typeof req?.name === 'string' ? this.names.get(req.name) : undefined;
      if (existing) return { record: existing, created: false };
      const rec = placeRecord(req, this.allStatus(), this.now());
      await this.setName(rec.name, rec);
      return { record: rec, created: true };
    });
    if (r.created) this.notify(r.record.name, r.record);
    return { record: structuredClone(r.record), created: r.created };
  }

  async putName(record: NameRecord): Promise<NameRecord> {
    const next = await this.serial(async () => {
      checkNameRecord(record);
      const cur = this.names.get(record.name);
      if (!cur) throw new ResolverError('ENOENT', `no name ${record.name}`);
      if (cur.version !== record.version) throw new ResolverError('ESTALE', `${record.name}: version ${record.version} is stale (now ${cur.version})`);
      const rec: NameRecord = { ...cleanName(record), version: cur.version + 1, created: cur.created };
      await this.setName(rec.name, rec);
      return rec;
    });
    this.notify(next.name, next);
    return structuredClone(next);
  }

  async deleteName(name: string, version?: number): Promise<void> {
    await this.serial(async () => {
      const cur = typeof name === 'string' ? this.names.get(name) : undefined;
      if (!cur) throw new ResolverError('ENOENT', `no name ${name}`);
      if (version !== undefined && cur.version !== version) throw new ResolverError('ESTALE', `${name}: version ${version} is stale (now ${cur.version})`);
      await this.setName(name, null);
    });
    this.notify(name, null);
  }

  chooseNodes(count: number, opts: { size?: number; exclude?: string[] }): Promise<NodeStatus[]> {
    return this.serial(() => chooseNodes(this.allStatus(), count, opts));
  }

  watchName(name: string, cb: (rec: NameRecord | null) => void): () => void {
    let set = this.watchers.get(name);
    if (!set) this.watchers.set(name, (set = new Set()));
    const fn = (r: NameRecord | null): void => cb(r);
    set.add(fn);
    return () => {
      set.delete(fn);
      if (set.size === 0 && this.watchers.get(name) === set) this.watchers.delete(name);
    };
  }

  private notify(name: string, rec: NameRecord | null): void {
    const set = this.watchers.get(name);
    if (!set) return;
    for (const cb of [...set]) {
      queueMicrotask(() => {
        try {
          cb(rec ? structuredClone(rec) : null);
        } catch (e) {
          this.logger.warn({ name, err: e }, 'resolver store: watch callback threw');
        }
      });
    }
  }

  /** Waits for the operations under way, then refuses new ones. */
  async close(): Promise<void> {
    await this.serial(() => {
      this.closed = true;
    }).catch(() => {});
    this.watchers.clear();
  }
}

function sameList(a: string[], b: string[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

