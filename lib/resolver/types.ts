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
  /** Calls `cb` when a name's record changes (etcd watch; embedded: in-process); returns an unsubscribe. */
  watchName?(name: string, cb: (rec: NameRecord | null) => void): () => void;

  close(): Promise<void>;
}

const NODE_ID = /^[A-Za-z0-9._-]{1,64}$/;

export function checkNodeId(id: string): void {
  if (!NODE_ID.test(id)) throw new ResolverError('EINVAL', `bad node id "${id}" (1-64 of A-Z a-z 0-9 . _ -)`);
}

/**
 * Volume names: segments of [A-Za-z0-9._-] joined by '/', no '.' or '..' segment, at most 255
 * bytes (`vm1/disk0`). Directory names: absolute paths of such segments (`/projects/alpha`).
 */
export function checkName(name: string, kind: NameKind): void {
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
