/**
 * The resolver service: a ResolverStore (normally the embedded one) served over lib/rpc, and
 * `RemoteResolver`, the ResolverStore that calls it. This is how `vstore node --resolver unix:PATH`
 * reaches a resolver that a daemon embeds.
 *
 * Methods (params -> result):
 *   node.register   {rec, ttlMs?}            -> null
 *   node.deregister {id, forget?}            -> null
 *   node.get        {id}                     -> NodeStatus | null
 *   node.list       {}                       -> NodeStatus[]
 *   node.choose     {count, size?, exclude?} -> NodeStatus[]
 *   name.get        {name}                   -> NameRecord | null
 *   name.list       {prefix?}                -> NameRecord[]
 *   name.place      PlaceRequest             -> {record, created}
 *   name.put        {record}                 -> NameRecord
 *   name.delete     {name, version?}         -> null
 * Errors carry the ResolverError code (ENOENT, EEXIST, ESTALE, ENOSPC, EINVAL, EUNAVAIL).
 */
import type { Logger } from '../log.js';
import { RpcClient, RpcError, RpcServer, type RpcHandlers } from '../rpc/index.js';
import { formatAddress } from '../net/address.js';
import {
  isResolverErrorCode,
  ResolverError,
  type NameRecord,
  type NodeRecord,
  type NodeStatus,
  type PlaceRequest,
  type ResolverStore,
} from './types.js';

function obj(p: unknown, method: string): Record<string, any> {
  if (typeof p !== 'object' || p === null || Array.isArray(p)) throw new ResolverError('EINVAL', `${method}: params must be an object`);
  return p as Record<string, any>;
}

/** msgpack peers may send null for an absent optional field. */
function opt<T>(v: T | null | undefined): T | undefined {
  return v === null ? undefined : v;
}

/** Drops null-valued fields (absent optionals) from a record a peer sent. */
function dropNulls<T>(v: T): T {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return v;
  return Object.fromEntries(Object.entries(v).filter(([, x]) => x !== null)) as T;
}

/** The RPC handlers of the resolver service over `store`; mount them on any RpcServer. */
export function resolverHandlers(store: ResolverStore): RpcHandlers {
  return {
    'node.register': async (p) => {
      const q = obj(p, 'node.register');
      await store.registerNode(dropNulls(q.rec as NodeRecord), opt(q.ttlMs as number | undefined));
      return null;
    },
    'node.deregister': async (p) => {
      const q = obj(p, 'node.deregister');
      await store.deregisterNode(q.id as string, { forget: !!q.forget });
      return null;
    },
    'node.get': (p) => store.getNode(obj(p, 'node.get').id as string),
    'node.list': () => store.listNodes(),
    'node.choose': (p) => {
      const q = obj(p, 'node.choose');
      const o: { size?: number; exclude?: string[] } = {};
      if (opt(q.size) !== undefined) o.size = q.size as number;
      if (opt(q.exclude) !== undefined) o.exclude = q.exclude as string[];
      return store.chooseNodes(q.count as number, o);
    },
    'name.get': (p) => store.getName(obj(p, 'name.get').name as string),
    'name.list': (p) => store.listNames(opt(obj(p ?? {}, 'name.list').prefix as string | undefined)),
    'name.place': (p) => {
      const q = dropNulls(obj(p, 'name.place')) as unknown as PlaceRequest;
      if (Array.isArray(q.nodes)) q.nodes = q.nodes.map((n) => dropNulls(n));
      return store.placeName(q);
    },
    'name.put': (p) => {
      const r = dropNulls(obj(p, 'name.put').record as NameRecord);
      if (r && Array.isArray(r.replicas)) r.replicas = r.replicas.map((x) => dropNulls(x));
      return store.putName(r);
    },
    'name.delete': async (p) => {
      const q = obj(p, 'name.delete');
      await store.deleteName(q.name as string, opt(q.version as number | undefined));
      return null;
    },
  };
}

export interface ResolverServiceOptions {
  store: ResolverStore;
  /** Listen addresses (lib/net/address.ts syntax): `unix:/run/vstore/resolver.sock`, `127.0.0.1:7000`. */
  listen: string[];
  logger: Logger;
}

/** A store served over RPC. Closing the service does not close the store (its owner does). */
export class ResolverService {
  private constructor(readonly server: RpcServer) {}

  static async start(opts: ResolverServiceOptions): Promise<ResolverService> {
    if (opts.listen.length === 0) throw new Error('resolver service: nothing to listen on');
    const server = new RpcServer({ handlers: resolverHandlers(opts.store), logger: opts.logger });
    try {
      for (const a of opts.listen) await server.listen(a);
    } catch (e) {
      await server.close();
      throw e;
    }
    opts.logger.info({ listen: server.addresses }, 'resolver service listening');
    return new ResolverService(server);
  }

  /** Bound addresses (the port chosen for `:0`). */
  get addresses(): string[] {
    return this.server.addresses;
  }

  close(): Promise<void> {
    return this.server.close();
  }
}

export interface RemoteResolverOptions {
  /** Per-call timeout (ms); default 5000. */
  timeoutMs?: number;
  /** Connect timeout (ms); default 3000. */
  connectTimeoutMs?: number;
  /** Polling interval of watchName (ms); default 1000. */
  watchIntervalMs?: number;
}

/**
 * A ResolverStore served by a ResolverService elsewhere. ResolverError codes come back as they
 * were thrown; a service that cannot be reached (refused, no socket, reset, no answer in time)
 * is ResolverError('EUNAVAIL').
 */
export class RemoteResolver implements ResolverStore {
  private readonly client: RpcClient;
  private readonly where: string;
  private readonly watchers = new Set<() => void>();

  constructor(
    address: string,
    private readonly opts: RemoteResolverOptions = {},
  ) {
    this.client = new RpcClient(address, { timeoutMs: opts.timeoutMs ?? 5000, connectTimeoutMs: opts.connectTimeoutMs ?? 3000 });
    this.where = formatAddress(this.client.address);
  }

  private async call<T>(method: string, params: unknown): Promise<T> {
    try {
      return await this.client.call<T>(method, params);
    } catch (e) {
      throw this.mapError(e);
    }
  }

  private mapError(e: unknown): Error {
    if (e instanceof RpcError) {
      // The client reports a failed connect as RpcError(errno, 'cannot connect to ...'): ENOENT
      // there is a missing socket, not a missing name.
      const transport = /^cannot connect to |^connect to .* timed out/.test(e.message) || !isResolverErrorCode(e.code);
      if (!transport) return new ResolverError(e.code as ResolverError['code'], e.message);
      return new ResolverError('EUNAVAIL', `resolver service at ${this.where} unreachable: ${e.message}`);
    }
    const err = e as NodeJS.ErrnoException;
    return new ResolverError('EUNAVAIL', `resolver service at ${this.where} unreachable: ${err?.message ?? String(e)}`);
  }

  async registerNode(rec: NodeRecord, ttlMs?: number): Promise<void> {
    await this.call('node.register', ttlMs === undefined ? { rec } : { rec, ttlMs });
  }

  async deregisterNode(id: string, opts: { forget?: boolean } = {}): Promise<void> {
    await this.call('node.deregister', { id, forget: !!opts.forget });
  }

  getNode(id: string): Promise<NodeStatus | null> {
    return this.call('node.get', { id });
  }

  listNodes(): Promise<NodeStatus[]> {
    return this.call('node.list', {});
  }

  getName(name: string): Promise<NameRecord | null> {
    return this.call('name.get', { name });
  }

  listNames(prefix?: string): Promise<NameRecord[]> {
    return this.call('name.list', prefix === undefined ? {} : { prefix });
  }

  placeName(req: PlaceRequest): Promise<{ record: NameRecord; created: boolean }> {
    return this.call('name.place', req);
  }

  putName(record: NameRecord): Promise<NameRecord> {
    return this.call('name.put', { record });
  }

  async deleteName(name: string, version?: number): Promise<void> {
    await this.call('name.delete', version === undefined ? { name } : { name, version });
  }

  chooseNodes(count: number, opts: { size?: number; exclude?: string[] }): Promise<NodeStatus[]> {
    return this.call('node.choose', { count, ...opts });
  }

  /**
   * Polls the service (every `watchIntervalMs`) and calls `cb` when the record's version changes
   * or it appears / disappears. The RPC has no push; a resolver is asked rarely, so polling is fine.
   */
  watchName(name: string, cb: (rec: NameRecord | null) => void): () => void {
    let last: string | undefined;
    let stopped = false;
    let timer: NodeJS.Timeout | undefined;
    const tick = async (): Promise<void> => {
      try {
        const rec = await this.getName(name);
        const key = rec ? `${rec.version}:${rec.created}` : 'none';
        if (last !== undefined && key !== last && !stopped) cb(rec);
        last = key;
      } catch {
        // unreachable for now: try again at the next tick
      }
      if (!stopped) timer = setTimeout(() => void tick(), this.opts.watchIntervalMs ?? 1000);
    };
    void tick();
    const stop = (): void => {
      stopped = true;
      if (timer) clearTimeout(timer);
      this.watchers.delete(stop);
    };
    this.watchers.add(stop);
    return stop;
  }

  async close(): Promise<void> {
    for (const w of [...this.watchers]) w();
    this.client.close();
  }
}
