/**
 * The directory resolver's contract: maps names (a volume `vm1/disk0`, a directory `/projects/alpha`)
 * to the storage nodes that hold them, and keeps the registry of nodes. Two stores implement it —
 * embedded (a file, in one process, optionally served to others over lib/rpc) and etcd — and
 * callers never know which one they hold (`openResolver(url)` in ./open.ts).
 *
 * Control plane only: the daemon asks the resolver when it sets a disk up and when a replica's
 * state changes, never per I/O request.
 */

/** A storage node as registered. Node records persist; liveness is separate (`alive`). */
export interface NodeRecord {
  /** Unique, stable id ([A-Za-z0-9._-], 1..64 chars). */
  id: string;
  /** NBD listen addresses (lib/net/address.ts syntax: `unix:/path`, `host:port`), one per path; export name = volume name. */
  nbd: string[];
  /** RPC control addresses (create/grow/delete volumes); empty for a plain NBD server registered by hand. */
  control: string[];
  /** Bytes of storage the node has in all, and still free. */
  capacity: number;
  free: number;
  /** Failure domain label; replicas go to distinct zones when nodes carry one. */
  zone?: string;
  /** Registered by hand (nbdkit, qemu-nbd, any NBD server): no lease, always counted alive. */
  static?: boolean;
}

/** A node with its liveness as the store sees it now. */
export interface NodeStatus extends NodeRecord {
  /** The node's lease is live (or the node is static). */
  alive: boolean;
  /** ms since the epoch of the last registration/heartbeat (static nodes: registration time). */
  seen: number;
}

export type ReplicaState = 'in-sync' | 'out-of-sync' | 'rebuilding';

export interface ReplicaRecord {
  node: string;
  /** Export name on that node; default the record's name (set for volumes on static nodes). */
  export?: string;
  state: ReplicaState;
}

export type NameKind = 'volume' | 'directory';

export interface NameRecord {
  name: string;
  kind: NameKind;
  /** Volumes: size in bytes. */
  size?: number;
  replicas: ReplicaRecord[];
  /** Host that holds dirty write-back cache for this volume (the cache issue); absent when clean. */
  dirtyHost?: string;
  /**
   * Host that last opened the volume writable. A host whose cache holds lines of the volume and
   * finds another host here drops them when it opens the volume (they may predate that host's
   * writes); absent in records from before this field (their caches are trusted).
   */
  lastWriter?: string;
  /** Incremented on every change; compare-and-set token for putName(). */
  version: number;
  /** ms since the epoch. */
  created: number;
}

export interface PlaceRequest {
  name: string;
  kind: NameKind;
  /** Volumes: size in bytes (also the space placement needs free on each node). */
  size?: number;
  /** Number of replicas on distinct nodes (and distinct zones where nodes have zones). */
  replicas: number;
  /** Pin replicas to these nodes instead of choosing (e.g. volumes on static NBD servers). */
  nodes?: { node: string; export?: string }[];
}

/** Error codes stores throw (as `ResolverError.code`). */
export type ResolverErrorCode =
  | 'ENOENT' // no such name / node
  | 'EEXIST' // node id taken by a different registration
  | 'ESTALE' // putName: the version changed under you
  | 'ENOSPC' // placement: not enough live nodes with the space (or distinct zones)
  | 'EINVAL' // bad name, bad record
  | 'EUNAVAIL'; // the store itself cannot be reached (etcd down, resolver service down)

export class ResolverError extends Error {
  constructor(
    readonly code: ResolverErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'ResolverError';
  }
}

export interface ResolverStore {
  /**
   * Registers (or refreshes) a node and its liveness lease of `ttlMs`; call again before the
   * lease ends to keep it alive (a heartbeat). Static nodes: `rec.static` and no ttl.
   */
  registerNode(rec: NodeRecord, ttlMs?: number): Promise<void>;
  /** Removes the node's liveness at once (clean exit); `forget` also drops its record. */
  deregisterNode(id: string, opts?: { forget?: boolean }): Promise<void>;
  getNode(id: string): Promise<NodeStatus | null>;
  listNodes(): Promise<NodeStatus[]>;

  getName(name: string): Promise<NameRecord | null>;
  listNames(prefix?: string): Promise<NameRecord[]>;
  /**
   * Returns the name's record, creating it first when it does not exist: replicas placed on the
   * live nodes with the most free space (see placement.ts). Atomic across callers: when two place
   * the same name at once, both get the same record and exactly one gets `created: true`.
   */
  placeName(req: PlaceRequest): Promise<{ record: NameRecord; created: boolean }>;
  /** Replaces a record if its version is still `record.version` (ESTALE otherwise); returns it with version + 1. */
  putName(record: NameRecord): Promise<NameRecord>;
  /** Deletes a name (ENOENT when missing; ESTALE when `version` is given and differs). */
  deleteName(name: string, version?: number): Promise<void>;
  /**
   * Chooses `count` live nodes for an existing name, excluding `exclude` (its current replicas),
   * by the same rules as placeName; used to rebuild a replica elsewhere. Does not change records.
   */
  chooseNodes(count: number, opts: { size?: number; exclude?: string[] }): Promise<NodeStatus[]>;
  /**
   * Calls `cb` when a name's record changes (etcd: /v3/watch; embedded: in-process; the resolver
   * service: polling); returns an unsubscribe. `cb` gets the new record, or null once deleted.
   */
  watchName?(name: string, cb: (rec: NameRecord | null) => void): () => void;

  close(): Promise<void>;
}

const NODE_ID = /^[A-Za-z0-9._-]{1,64}$/;

export function checkNodeId(id: string): void {
  if (typeof id !== 'string' || !NODE_ID.test(id)) throw new ResolverError('EINVAL', `bad node id "${id}" (1-64 of A-Z a-z 0-9 . _ -)`);
}

/**
 * Volume names: segments of [A-Za-z0-9._-] joined by '/', no '.' or '..' segment, at most 255
 * bytes (`vm1/disk0`). Directory names: absolute paths of such segments (`/projects/alpha`).
 */
export function checkName(name: string, kind: NameKind): void {
  if (typeof name !== 'string') throw new ResolverError('EINVAL', `bad ${kind} name ${JSON.stringify(name)}: not a string`);
  const body = kind === 'directory' ? (name.startsWith('/') ? name.slice(1) : null) : name;
  const ok =
    body !== null &&
    name.length <= 255 &&
    body.length > 0 &&
    body.split('/').every((s) => /^[A-Za-z0-9._-]+$/.test(s) && s !== '.' && s !== '..');
  if (!ok) {
    throw new ResolverError(
      'EINVAL',
      kind === 'directory'
        ? `bad directory path "${name}" (absolute, segments of A-Z a-z 0-9 . _ -)`
        : `bad volume name "${name}" (segments of A-Z a-z 0-9 . _ - joined by /)`,
    );
  }
}

// ---- Additions (validation shared by every store and the resolver service) ----

/** Lease of a node that registers without a ttl (and is not static). */
export const DEFAULT_LEASE_TTL_MS = 10_000;
/** Most replicas a name may have. */
export const MAX_REPLICAS = 16;

const RESOLVER_CODES: ReadonlySet<string> = new Set(['ENOENT', 'EEXIST', 'ESTALE', 'ENOSPC', 'EINVAL', 'EUNAVAIL']);

export function isResolverErrorCode(code: unknown): code is ResolverErrorCode {
  return typeof code === 'string' && RESOLVER_CODES.has(code);
}

function isCount(n: unknown): n is number {
  return typeof n === 'number' && Number.isSafeInteger(n) && n >= 0;
}

function isStringArray(a: unknown): a is string[] {
  return Array.isArray(a) && a.every((s) => typeof s === 'string' && s.length > 0 && s.length <= 4096);
}

/** Checks the shape of a node record as it arrives from a caller (RPC, CLI, a store's file); EINVAL otherwise. */
export function checkNodeRecord(rec: NodeRecord): void {
  if (typeof rec !== 'object' || rec === null) throw new ResolverError('EINVAL', 'node record: not an object');
  checkNodeId(rec.id);
  const bad = (what: string): never => {
    throw new ResolverError('EINVAL', `node ${rec.id}: ${what}`);
  };
  if (!isStringArray(rec.nbd)) bad('nbd: expected a list of addresses');
  if (!isStringArray(rec.control)) bad('control: expected a list of addresses');
  if (!isCount(rec.capacity)) bad(`capacity: expected bytes (a non-negative integer), got ${JSON.stringify(rec.capacity)}`);
  if (!isCount(rec.free)) bad(`free: expected bytes (a non-negative integer), got ${JSON.stringify(rec.free)}`);
  if (rec.zone !== undefined && (typeof rec.zone !== 'string' || !/^[A-Za-z0-9._-]{1,64}$/.test(rec.zone))) {
    bad(`zone: expected 1-64 of A-Z a-z 0-9 . _ -, got ${JSON.stringify(rec.zone)}`);
  }
  if (rec.static !== undefined && typeof rec.static !== 'boolean') bad('static: expected true or false');
  if (rec.static && rec.nbd.length === 0) bad('a static node needs at least one NBD address');
}

/** Checks a place request (name syntax, replicas, size, pins); EINVAL otherwise. */
export function checkPlaceRequest(req: PlaceRequest): void {
  if (typeof req !== 'object' || req === null) throw new ResolverError('EINVAL', 'place request: not an object');
  if (req.kind !== 'volume' && req.kind !== 'directory') throw new ResolverError('EINVAL', `kind: expected volume or directory, got ${JSON.stringify(req.kind)}`);
  checkName(req.name, req.kind);
  if (!Number.isSafeInteger(req.replicas) || req.replicas < 1 || req.replicas > MAX_REPLICAS) {
    throw new ResolverError('EINVAL', `${req.name}: replicas must be 1..${MAX_REPLICAS}, got ${JSON.stringify(req.replicas)}`);
  }
  if (req.kind === 'volume' && (!isCount(req.size) || req.size === 0)) {
    throw new ResolverError('EINVAL', `${req.name}: a volume needs a size in bytes (a positive integer), got ${JSON.stringify(req.size)}`);
  }
  if (req.kind === 'directory' && req.size !== undefined && !isCount(req.size)) {
    throw new ResolverError('EINVAL', `${req.name}: size must be a non-negative integer`);
  }
  if (req.nodes !== undefined) {
    if (!Array.isArray(req.nodes)) throw new ResolverError('EINVAL', `${req.name}: nodes: expected a list`);
    if (req.nodes.length > req.replicas) {
      throw new ResolverError('EINVAL', `${req.name}: ${req.nodes.length} pinned nodes for ${req.replicas} replica(s)`);
    }
    const seen = new Set<string>();
    for (const p of req.nodes) {
      checkNodeId(p?.node);
      if (p.export !== undefined && (typeof p.export !== 'string' || p.export.length > 4096)) {
        throw new ResolverError('EINVAL', `${req.name}: export on ${p.node}: expected a string of at most 4096 bytes`);
      }
      if (seen.has(p.node)) throw new ResolverError('EINVAL', `${req.name}: node ${p.node} pinned twice (replicas live on distinct nodes)`);
      seen.add(p.node);
    }
  }
}

/** Checks a name record handed to putName; EINVAL otherwise. */
export function checkNameRecord(rec: NameRecord): void {
  if (typeof rec !== 'object' || rec === null) throw new ResolverError('EINVAL', 'name record: not an object');
  if (rec.kind !== 'volume' && rec.kind !== 'directory') throw new ResolverError('EINVAL', `kind: expected volume or directory, got ${JSON.stringify(rec.kind)}`);
  checkName(rec.name, rec.kind);
  const bad = (what: string): never => {
    throw new ResolverError('EINVAL', `${rec.name}: ${what}`);
  };
  if (!Number.isSafeInteger(rec.version) || rec.version < 1) bad(`version: expected a positive integer, got ${JSON.stringify(rec.version)}`);
  if (!isCount(rec.created)) bad('created: expected ms since the epoch');
  if (rec.size !== undefined && !isCount(rec.size)) bad('size: expected bytes (a non-negative integer)');
  if (rec.dirtyHost !== undefined && typeof rec.dirtyHost !== 'string') bad('dirtyHost: expected a string');
  if (rec.lastWriter !== undefined && typeof rec.lastWriter !== 'string') bad('lastWriter: expected a string');
  if (!Array.isArray(rec.replicas) || rec.replicas.length > MAX_REPLICAS) bad(`replicas: expected a list of at most ${MAX_REPLICAS}`);
  const nodes = new Set<string>();
  for (const r of rec.replicas) {
    if (typeof r !== 'object' || r === null) bad('replicas: expected objects');
    checkNodeId(r.node);
    if (nodes.has(r.node)) bad(`node ${r.node} holds two replicas`);
    nodes.add(r.node);
    if (r.state !== 'in-sync' && r.state !== 'out-of-sync' && r.state !== 'rebuilding') bad(`replica on ${r.node}: bad state ${JSON.stringify(r.state)}`);
    if (r.export !== undefined && typeof r.export !== 'string') bad(`replica on ${r.node}: export must be a string`);
  }
}

/** The record with only the fields a NodeRecord has (callers may hand a NodeStatus, or extra fields over RPC). */
export function cleanNode(r: NodeRecord): NodeRecord {
  const out: NodeRecord = { id: r.id, nbd: [...r.nbd], control: [...r.control], capacity: r.capacity, free: r.free };
  if (r.zone !== undefined) out.zone = r.zone;
  if (r.static) out.static = true;
  return out;
}

/** The record with only the fields a NameRecord has. */
export function cleanName(r: NameRecord): NameRecord {
  const out: NameRecord = {
    name: r.name,
    kind: r.kind,
    replicas: r.replicas.map((x) => (x.export !== undefined ? { node: x.node, export: x.export, state: x.state } : { node: x.node, state: x.state })),
    version: r.version,
    created: r.created,
  };
  if (r.size !== undefined) out.size = r.size;
  if (r.dirtyHost !== undefined) out.dirtyHost = r.dirtyHost;
  if (r.lastWriter !== undefined) out.lastWriter = r.lastWriter;
  return out;
}
