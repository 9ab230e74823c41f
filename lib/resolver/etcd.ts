/**
 * The etcd resolver store: etcd 3.4's gRPC-gateway JSON API over Node's fetch (no client library).
 *
 * Keys, under a prefix (default `/vstore/`):
 *   nodes/<id>    {rec: NodeRecord, registered, seen}  persistent (`seen`: last heartbeat, kept after the lease ends)
 *   alive/<id>    {seen}                               under the node's lease: gone when the lease ends
 *   names/<name>  NameRecord without `version`          the record's version is the key's etcd version
 *
 * placeName creates with a transaction (create_revision == 0), putName and deleteName compare the
 * key's version / mod_revision, so racing callers (in one process or in many) end with one record.
 * A node's lease is granted with its ttl (whole seconds; etcd raises a ttl below its minimum, about
 * 2 s) and kept by /v3/lease/keepalive on each heartbeat; a new one is granted when it has ended.
 *
 * Every request goes to the endpoints in turn until one answers, each with a short timeout
 * (default 3 s); when none answers the call fails with ResolverError('EUNAVAIL').
 */
import type { Logger } from '../log.js';
import { chooseNodes, placeRecord } from './placement.js';
import {
  checkNameRecord,
  checkNodeId,
  checkNodeRecord,
  checkPlaceRequest,
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

export interface EtcdStoreOptions {
  /** Client URLs (`http://127.0.0.1:2379`) or `HOST:PORT`; tried in turn. */
  endpoints: string[];
  /** Key prefix; default `/vstore/`. */
  prefix?: string;
  /** Timeout of one request to one endpoint (ms); default 3000. */
  timeoutMs?: number;
  logger: Logger;
  /** Clock (ms since the epoch) for `seen` and `created`. */
  now?: () => number;
}

/** etcd's key-value as the gateway returns it (int64 fields as strings, empty fields omitted). */
interface Kv {
  key: string;
  value?: string;
  create_revision?: string;
  mod_revision?: string;
  version?: string;
  lease?: string;
}

interface Header {
  revision?: string;
}

interface RangeResponse {
  header?: Header;
  kvs?: Kv[];
}

interface TxnResponse {
  header?: Header;
  succeeded?: boolean;
  responses?: { response_range?: RangeResponse; response_put?: unknown; response_delete_range?: unknown }[];
}

interface Compare {
  key: string;
  target: 'VERSION' | 'CREATE' | 'MOD' | 'VALUE' | 'LEASE';
  result: 'EQUAL' | 'GREATER' | 'LESS' | 'NOT_EQUAL';
  version?: string;
  create_revision?: string;
  mod_revision?: string;
}

type RequestOp =
  | { request_range: { key: string; range_end?: string } }
  | { request_put: { key: string; value: string; lease?: string } }
  | { request_delete_range: { key: string; range_end?: string } };

interface StoredNode {
  rec: NodeRecord;
  registered: number;
  seen: number;
}

/** An error etcd answered (gRPC status code and message). */
class EtcdApiError extends Error {
  constructor(
    readonly grpcCode: number,
    message: string,
  ) {
    super(message);
  }
}

const GRPC_DEADLINE_EXCEEDED = 4;
const GRPC_NOT_FOUND = 5;
const GRPC_UNAVAILABLE = 14;

const b64 = (s: string): string => Buffer.from(s, 'utf8').toString('base64');
const unb64 = (s: string | undefined): string => Buffer.from(s ?? '', 'base64').toString('utf8');

/** The end of a prefix range: the prefix with its last byte incremented (base64). */
function prefixEnd(prefix: string): string {
  const b = Buffer.from(prefix, 'utf8');
  for (let i = b.length - 1; i >= 0; i--) {
    if (b[i]! < 0xff) {
      const out = Buffer.from(b.subarray(0, i + 1));
      out[i]!++;
      return out.toString('base64');
    }
  }
  return Buffer.from([0]).toString('base64'); // the whole key space
}

function normalizeEndpoint(e: string): string {
  const s = e.trim().replace(/\/+$/, '');
  if (!s) throw new ResolverError('EINVAL', 'etcd: empty endpoint');
  if (/^https?:\/\//.test(s)) return s;
  if (!/^(\[[^\]]+\]|[^:/]+):\d+$/.test(s)) throw new ResolverError('EINVAL', `etcd: bad endpoint "${e}" (expected HOST:PORT or http://HOST:PORT)`);
  return `http://${s}`;
}

/** `etcd://h1:2379,h2:2379[/prefix/]` -> endpoints and prefix. */
export function parseEtcdUrl(url: string): { endpoints: string[]; prefix?: string } {
  const m = /^etcd:\/\/([^/]+)(\/.*)?$/.exec(url);
  if (!m) throw new ResolverError('EINVAL', `not an etcd URL: "${url}" (expected etcd://HOST:PORT[,HOST:PORT...][/PREFIX/])`);
  const endpoints = m[1]!.split(',').map(normalizeEndpoint);
  const out: { endpoints: string[]; prefix?: string } = { endpoints };
  if (m[2] && m[2] !== '/') out.prefix = m[2].endsWith('/') ? m[2] : `${m[2]}/`;
  return out;
}

function describe(e: unknown, timeoutMs: number): string {
  const err = e as Error & { cause?: { code?: string; message?: string } };
  if (err?.name === 'TimeoutError' || err?.name === 'AbortError') return `no answer in ${timeoutMs} ms`;
  if (err?.cause) return err.cause.code ?? err.cause.message ?? err.message;
  return err?.message ?? String(e);
}

export class EtcdStore implements ResolverStore {
  readonly endpoints: string[];
  readonly prefix: string;
  private readonly timeoutMs: number;
  private readonly logger: Logger;
  private readonly now: () => number;
  /** Index of the endpoint that answered last. */
  private current = 0;
  /** Leases this client holds, per node id. */
  private readonly leases = new Map<string, { id: string; ttlS: number }>();
  private readonly watches = new Set<AbortController>();
  private closed = false;

  constructor(opts: EtcdStoreOptions) {
    if (opts.endpoints.length === 0) throw new ResolverError('EINVAL', 'etcd: no endpoints');
    this.endpoints = opts.endpoints.map(normalizeEndpoint);
    this.prefix = opts.prefix ?? '/vstore/';
    this.timeoutMs = opts.timeoutMs ?? 3000;
    this.logger = opts.logger;
    this.now = opts.now ?? Date.now;
  }

  /** From an `etcd://h1:2379,h2:2379[/prefix/]` URL. */
  static fromUrl(url: string, opts: Omit<EtcdStoreOptions, 'endpoints'>): EtcdStore {
    const u = parseEtcdUrl(url);
    return new EtcdStore({ ...opts, endpoints: u.endpoints, ...(u.prefix && opts.prefix === undefined ? { prefix: u.prefix } : {}) });
  }

  private get where(): string {
    return this.endpoints.map((e) => e.replace(/^http:\/\//, '')).join(',');
  }

  // ---- transport ----

  /** POSTs `body` to `path` on the first endpoint that answers; etcd's own errors throw EtcdApiError. */
  private async post<T>(path: string, body: unknown): Promise<T> {
    if (this.closed) throw new ResolverError('EUNAVAIL', 'etcd store closed');
    const errors: string[] = [];
    const n = this.endpoints.length;
    for (let k = 0; k < n; k++) {
      const i = (this.current + k) % n;
      const ep = this.endpoints[i]!;
      let status: number;
      let text: string;
      try {
        const res = await fetch(ep + path, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify(body),
          signal: AbortSignal.timeout(this.timeoutMs),
        });
        status = res.status;
        text = await res.text();
      } catch (e) {
        errors.push(`${ep.replace(/^http:\/\//, '')}: ${describe(e, this.timeoutMs)}`);
        continue;
      }
      let json: any;
      try {
        json = JSON.parse(text);
      } catch {
        errors.push(`${ep}: HTTP ${status}, not JSON: ${text.slice(0, 200)}`);
        continue;
      }
      // Streaming methods (keepalive) answer {result: ...} or {error: ...}.
      const err = json?.error && typeof json.error === 'object' ? json.error : status >= 400 || json?.code ? json : null;
      if (err) {
        const code = Number(err.code ?? 2);
        const msg = String(err.message ?? err.error ?? `HTTP ${status}`);
        if (code === GRPC_UNAVAILABLE || code === GRPC_DEADLINE_EXCEEDED || status >= 502) {
          errors.push(`${ep}: ${msg}`);
          continue;
        }
        this.current = i;
        throw new EtcdApiError(code, msg);
      }
      this.current = i;
      return (json?.result ?? json) as T;
    }
    throw new ResolverError('EUNAVAIL', `etcd at ${this.where} unreachable: ${errors.join('; ')}`);
  }

  /** `post` with etcd's own errors as ResolverErrors. */
  private async api<T>(path: string, body: unknown): Promise<T> {
    try {
      return await this.post<T>(path, body);
    } catch (e) {
      if (e instanceof EtcdApiError) {
        throw new ResolverError(e.grpcCode === 3 ? 'EINVAL' : e.grpcCode === GRPC_NOT_FOUND ? 'ENOENT' : 'EUNAVAIL', `etcd at ${this.where}: ${e.message}`);
      }
      throw e;
    }
  }

  private txn(compare: Compare[], success: RequestOp[], failure: RequestOp[] = []): Promise<TxnResponse> {
    return this.api<TxnResponse>('/v3/kv/txn', { compare, success, failure });
  }

  private k(rel: string): string {
    return b64(this.prefix + rel);
  }

  private range(rel: string, isPrefix = false): RequestOp {
    return { request_range: { key: this.k(rel), ...(isPrefix ? { range_end: prefixEnd(this.prefix + rel) } : {}) } };
  }

  // ---- nodes ----

  private parseNode(kv: Kv): StoredNode {
    const v = JSON.parse(unb64(kv.value)) as StoredNode;
    return v;
  }

  private status(n: StoredNode, alive: Kv | undefined): NodeStatus {
    if (n.rec.static) return { ...n.rec, alive: true, seen: n.registered };
    let seen = n.seen ?? 0;
    if (alive) {
      try {
        seen = Math.max(seen, (JSON.parse(unb64(alive.value)) as { seen: number }).seen);
      } catch {
        // a foreign value: keep the record's
      }
    }
    return { ...n.rec, alive: !!alive, seen };
  }

  /** Grants a lease of `ttlS`, or keeps the one this client holds for `id` alive. */
  private async ensureLease(id: string, ttlS: number): Promise<string> {
    const held = this.leases.get(id);
    if (held && held.ttlS === ttlS) {
      try {
        const r = await this.post<{ ID?: string; TTL?: string }>('/v3/lease/keepalive', { ID: held.id });
        if (Number(r.TTL ?? 0) > 0) return held.id;
      } catch (e) {
        if (!(e instanceof EtcdApiError)) throw e;
      }
      this.logger.info({ node: id, lease: held.id }, 'etcd: lease ended; granting a new one');
    }
    const g = await this.api<{ ID: string; TTL?: string }>('/v3/lease/grant', { TTL: String(ttlS) });
    this.leases.set(id, { id: g.ID, ttlS });
    if (held && held.id !== g.ID) void this.revoke(held.id);
    return g.ID;
  }

  private async revoke(lease: string): Promise<void> {
    try {
      await this.post('/v3/lease/revoke', { ID: lease });
    } catch (e) {
      if (!(e instanceof EtcdApiError && e.grpcCode === GRPC_NOT_FOUND)) throw e instanceof EtcdApiError ? new ResolverError('EUNAVAIL', e.message) : e;
    }
  }

  async registerNode(rec: NodeRecord, ttlMs?: number): Promise<void> {
    checkNodeRecord(rec);
    if (ttlMs !== undefined && (!Number.isFinite(ttlMs) || ttlMs <= 0)) throw new ResolverError('EINVAL', `node ${rec.id}: ttl must be positive, got ${ttlMs}`);
    const ttlS = Math.max(1, Math.ceil((ttlMs ?? DEFAULT_LEASE_TTL_MS) / 1000));
    const nodeKey = `nodes/${rec.id}`;
    const aliveKey = `alive/${rec.id}`;
    for (let attempt = 0; attempt < 10; attempt++) {
      const r = await this.txn([], [this.range(nodeKey), this.range(aliveKey)]);
      const nodeKv = r.responses?.[0]?.response_range?.kvs?.[0];
      const aliveKv = r.responses?.[1]?.response_range?.kvs?.[0];
      const old = nodeKv ? this.parseNode(nodeKv) : null;
      if (old && !!old.rec.static !== !!rec.static) {
        throw new ResolverError('EEXIST', `node id ${rec.id} is taken by a ${old.rec.static ? 'static node registered by hand' : 'node with a lease'}`);
      }
      const mine = this.leases.get(rec.id)?.id;
      if (!rec.static && old && aliveKv && aliveKv.lease !== mine && !sameList(old.rec.control, rec.control)) {
        throw new ResolverError('EEXIST', `node id ${rec.id} is held by a live node at ${old.rec.control.join(', ') || '(no control address)'}`);
      }
      const now = this.now();
      const stored: StoredNode = { rec: cleanNode(rec), registered: old ? old.registered : now, seen: now };
      const compare: Compare[] = [
        nodeKv
          ? { key: this.k(nodeKey), target: 'MOD', result: 'EQUAL', mod_revision: nodeKv.mod_revision ?? '0' }
          : { key: this.k(nodeKey), target: 'CREATE', result: 'EQUAL', create_revision: '0' },
      ];
      const ops: RequestOp[] = [{ request_put: { key: this.k(nodeKey), value: b64(JSON.stringify(stored)) } }];
      if (!rec.static) {
        const lease = await this.ensureLease(rec.id, ttlS);
        ops.push({ request_put: { key: this.k(aliveKey), value: b64(JSON.stringify({ seen: now })), lease } });
      }
      let done: TxnResponse;
      try {
        done = await this.txn(compare, ops);
      } catch (e) {
        // The lease ended between keepalive and put (etcd: lease not found): grant anew.
        if (e instanceof ResolverError && e.code === 'ENOENT') {
          this.leases.delete(rec.id);
          continue;
        }
        throw e;
      }
      if (done.succeeded) return;
    }
    throw new ResolverError('EUNAVAIL', `etcd at ${this.where}: node ${rec.id} kept changing under registration`);
  }

  async deregisterNode(id: string, opts: { forget?: boolean } = {}): Promise<void> {
    checkNodeId(id);
    const held = this.leases.get(id);
    if (held) {
      this.leases.delete(id);
      await this.revoke(held.id);
    }
    const ops: RequestOp[] = [{ request_delete_range: { key: this.k(`alive/${id}`) } }];
    if (opts.forget) ops.push({ request_delete_range: { key: this.k(`nodes/${id}`) } });
    const r = await this.txn([{ key: this.k(`nodes/${id}`), target: 'CREATE', result: 'GREATER', create_revision: '0' }], ops);
    if (!r.succeeded) throw new ResolverError('ENOENT', `no node ${id}`);
  }

  async getNode(id: string): Promise<NodeStatus | null> {
    checkNodeId(id);
    const r = await this.txn([], [this.range(`nodes/${id}`), this.range(`alive/${id}`)]);
    const nodeKv = r.responses?.[0]?.response_range?.kvs?.[0];
    if (!nodeKv) return null;
    return this.status(this.parseNode(nodeKv), r.responses?.[1]?.response_range?.kvs?.[0]);
  }

  async listNodes(): Promise<NodeStatus[]> {
    // One transaction: both ranges see the same revision.
    const r = await this.txn([], [this.range('nodes/', true), this.range('alive/', true)]);
    const alive = new Map<string, Kv>();
    const aliveBase = this.prefix + 'alive/';
    for (const kv of r.responses?.[1]?.response_range?.kvs ?? []) alive.set(unb64(kv.key).slice(aliveBase.length), kv);
    const out: NodeStatus[] = [];
    for (const kv of r.responses?.[0]?.response_range?.kvs ?? []) {
      let n: StoredNode;
      try {
        n = this.parseNode(kv);
        checkNodeRecord(n.rec);
      } catch (e) {
        this.logger.warn({ key: unb64(kv.key), err: (e as Error).message }, 'etcd: skipping a bad node record');
        continue;
      }
      out.push(this.status(n, alive.get(n.rec.id)));
    }
    return out.sort((a, b) => (a.id < b.id ? -1 : 1));
  }

  // ---- names ----

  private parseName(kv: Kv): NameRecord {
    const v = JSON.parse(unb64(kv.value)) as NameRecord;
    return { ...v, version: Number(kv.version ?? 0) };
  }

  private encodeName(rec: NameRecord): string {
    const { version: _v, ...body } = cleanName(rec);
    return b64(JSON.stringify(body));
  }

  async getName(name: string): Promise<NameRecord | null> {
    if (typeof name !== 'string' || !name) throw new ResolverError('EINVAL', 'name must be a non-empty string');
    const r = await this.api<RangeResponse>('/v3/kv/range', (this.range(`names/${name}`) as { request_range: object }).request_range);
    const kv = r.kvs?.[0];
    return kv ? this.parseName(kv) : null;
  }

  async listNames(prefix = ''): Promise<NameRecord[]> {
    const r = await this.api<RangeResponse>('/v3/kv/range', (this.range(`names/${prefix}`, true) as { request_range: object }).request_range);
    return (r.kvs ?? []).map((kv) => this.parseName(kv)).sort((a, b) => (a.name < b.name ? -1 : 1));
  }

  async placeName(req: PlaceRequest): Promise<{ record: NameRecord; created: boolean }> {
    checkPlaceRequest(req);
    const key = this.k(`names/${req.name}`);
    for (let attempt = 0; attempt < 10; attempt++) {
      const existing = await this.getName(req.name);
      if (existing) return { record: existing, created: false };
      const rec = placeRecord(req, await this.listNodes(), this.now());
      const r = await this.txn(
        [{ key, target: 'CREATE', result: 'EQUAL', create_revision: '0' }],
        [{ request_put: { key, value: this.encodeName(rec) } }],
        [{ request_range: { key } }],
      );
      if (r.succeeded) return { record: rec, created: true };
      const kv = r.responses?.[0]?.response_range?.kvs?.[0];
      if (kv) return { record: this.parseName(kv), created: false };
      // created and deleted again in between: place anew
    }
    throw new ResolverError('EUNAVAIL', `etcd at ${this.where}: ${req.name} kept changing under placement`);
  }

  async putName(record: NameRecord): Promise<NameRecord> {
    checkNameRecord(record);
    const key = this.k(`names/${record.name}`);
    const cur = await this.getNameKv(record.name);
    if (!cur) throw new ResolverError('ENOENT', `no name ${record.name}`);
    const curVersion = Number(cur.version ?? 0);
    if (curVersion !== record.version) throw new ResolverError('ESTALE', `${record.name}: version ${record.version} is stale (now ${curVersion})`);
    const created = this.parseName(cur).created;
    const next: NameRecord = { ...cleanName(record), created, version: record.version + 1 };
    const r = await this.txn(
      [{ key, target: 'MOD', result: 'EQUAL', mod_revision: cur.mod_revision ?? '0' }],
      [{ request_put: { key, value: this.encodeName(next) } }],
      [{ request_range: { key } }],
    );
    if (r.succeeded) return next;
    const kv = r.responses?.[0]?.response_range?.kvs?.[0];
    if (!kv) throw new ResolverError('ENOENT', `no name ${record.name}`);
    throw new ResolverError('ESTALE', `${record.name}: version ${record.version} is stale (now ${kv.version})`);
  }

  private async getNameKv(name: string): Promise<Kv | undefined> {
    const r = await this.api<RangeResponse>('/v3/kv/range', { key: this.k(`names/${name}`) });
    return r.kvs?.[0];
  }

  async deleteName(name: string, version?: number): Promise<void> {
    if (typeof name !== 'string' || !name) throw new ResolverError('EINVAL', 'name must be a non-empty string');
    const key = this.k(`names/${name}`);
    const compare: Compare =
      version === undefined
        ? { key, target: 'CREATE', result: 'GREATER', create_revision: '0' }
        : { key, target: 'VERSION', result: 'EQUAL', version: String(version) };
    const r = await this.txn([compare], [{ request_delete_range: { key } }], [{ request_range: { key } }]);
    if (r.succeeded) return;
    const kv = r.responses?.[0]?.response_range?.kvs?.[0];
    if (!kv) throw new ResolverError('ENOENT', `no name ${name}`);
    throw new ResolverError('ESTALE', `${name}: version ${version} is stale (now ${kv.version})`);
  }

  async chooseNodes(count: number, opts: { size?: number; exclude?: string[] }): Promise<NodeStatus[]> {
    return chooseNodes(await this.listNodes(), count, opts);
  }

  /**
   * Follows `names/<name>` with /v3/watch from the current revision: `cb` gets the new record,
   * or null when deleted. Reconnects (to the next endpoint) after a failure and resumes after the
   * last revision it saw; when that revision has been compacted it reads the record anew and calls
   * `cb` with it.
   */
  watchName(name: string, cb: (rec: NameRecord | null) => void): () => void {
    const ctl = new AbortController();
    this.watches.add(ctl);
    const key = this.k(`names/${name}`);
    let rev: bigint | undefined; // last revision seen
    const deliver = (rec: NameRecord | null): void => {
      try {
        cb(rec);
      } catch (e) {
        this.logger.warn({ name, err: e }, 'etcd: watch callback threw');
      }
    };
    const loop = async (): Promise<void> => {
      let backoff = 100;
      let resync = false;
      while (!ctl.signal.aborted) {
        try {
          if (rev === undefined) {
            const r = await this.api<RangeResponse>('/v3/kv/range', { key });
            rev = BigInt(r.header?.revision ?? '0');
            if (resync) deliver(r.kvs?.[0] ? this.parseName(r.kvs[0]) : null);
            resync = false;
          }
          const ep = this.endpoints[this.current]!;
          const res = await fetch(`${ep}/v3/watch`, {
            method: 'POST',
            headers: { 'content-type': 'application/json' },
            body: JSON.stringify({ create_request: { key, start_revision: String(rev + 1n) } }),
            signal: ctl.signal,
          });
          if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
          let buf = '';
          const dec = new TextDecoder();
          for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
            buf += dec.decode(chunk, { stream: true });
            let nl: number;
            while ((nl = buf.indexOf('\n')) >= 0) {
              const line = buf.slice(0, nl).trim();
              buf = buf.slice(nl + 1);
              if (!line) continue;
              const msg = JSON.parse(line) as { result?: { canceled?: boolean; compact_revision?: string; events?: { type?: string; kv: Kv }[] }; error?: unknown };
              if (msg.error) throw new Error(JSON.stringify(msg.error));
              const res2 = msg.result;
              if (!res2) continue;
              backoff = 100;
              if (res2.canceled) {
                if (res2.compact_revision && res2.compact_revision !== '0') {
                  rev = undefined;
                  resync = true;
                }
                throw new Error('watch canceled');
              }
              for (const ev of res2.events ?? []) {
                rev = BigInt(ev.kv.mod_revision ?? String(rev ?? 0n));
                deliver(ev.type === 'DELETE' ? null : this.parseName(ev.kv));
              }
            }
          }
          throw new Error('watch stream ended');
        } catch (e) {
          if (ctl.signal.aborted) return;
          this.logger.debug({ name, err: (e as Error).message }, 'etcd: watch interrupted; reconnecting');
          this.current = (this.current + 1) % this.endpoints.length;
          await new Promise((r) => setTimeout(r, backoff));
          backoff = Math.min(backoff * 2, 5000);
        }
      }
    };
    void loop();
    return () => {
      ctl.abort();
      this.watches.delete(ctl);
    };
  }

  /** Stops the watches. Leases are not revoked: a node that closes without deregisterNode turns dead at the end of its ttl. */
  async close(): Promise<void> {
    this.closed = true;
    for (const c of this.watches) c.abort();
    this.watches.clear();
  }
}

function sameList(a: string[], b: string[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

