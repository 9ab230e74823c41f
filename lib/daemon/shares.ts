/**
 * The host side of a shared directory: `openShare` turns a directory path (`/projects/alpha`)
 * into a FileTree the FUSE engine can serve to a guest (virtiofs) or to a host mount.
 *
 *   1. the resolver's record of the path (kind 'directory', 1 replica), placed on the live node
 *      with the most free space when the path is new (placeName: atomic between hosts);
 *   2. `dir.create` on that node (idempotent: mkdir -p under DATA/dirs, durable) — also when the
 *      record existed, so a crash between placement and creation heals;
 *   3. `RemoteFileTree` attached to the directory over the node's control RPC; on every reconnect
 *      it asks the resolver again where the node is now (a node restarted on another TCP port);
 *   4. `CachedFileTree` in front (attributes, entries, file data in RAM; write-through), then an
 *      `IdMapFileTree` when uid/gid maps are given and a `ReadOnlyFileTree` when read-only (the
 *      node is asked for a read-only session too, so either side alone refuses writes).
 *
 *   guest ──► ReadOnly? ──► IdMap? ──► Cached ──► Remote ══RPC══► node: LocalFileTree(DATA/dirs/<path>)
 *
 * Wiring (done elsewhere): the daemon's config `shares:` and the vhost-user-fs device call this
 * when a VM starts, after its disks, and `close()` the share when the VM stops. Control plane
 * only: the resolver is asked at open and at reconnects, never per request.
 */
import type { Logger } from '../log.js';
import { CachedFileTree, type CachedFileTreeOptions } from '../fs/cached.js';
import { FsError } from '../fs/errors.js';
import { IdMapFileTree } from '../fs/idmap.js';
import type { IdMapRange } from '../fs/local.js';
import { ReadOnlyFileTree } from '../fs/readonly.js';
import { RemoteFileTree } from '../fs/remote.js';
import type { FileTree } from '../fs/tree.js';
import { RpcClient, RpcError } from '../rpc/index.js';
import { checkName, type NameRecord, type NodeRecord, type ResolverStore } from '../resolver/types.js';

export interface OpenShareOptions {
  /** The directory's resolver name: an absolute path of [A-Za-z0-9._-] segments. */
  path: string;
  resolver: ResolverStore;
  /**
   * Node records by id, shared between shares: filled from the resolver, and used when the
   * resolver cannot be reached at a reconnect (the node's address rarely changes).
   */
  nodesCache?: Map<string, NodeRecord>;
  readOnly?: boolean;
  /** guest -> node uid/gid ranges (see lib/fs/idmap.ts). */
  uidMap?: IdMapRange[];
  gidMap?: IdMapRange[];
  logger: Logger;
  /** Cache tuning (TTLs, RAM for file data). */
  cache?: CachedFileTreeOptions;
  /** RemoteFileTree's per-call timeout and how long a call waits for the node to come back (ms). */
  timeoutMs?: number;
  reconnectTimeoutMs?: number;
}

export interface Share {
  /** The tree to serve (the top of the stack). */
  readonly tree: FileTree;
  readonly path: string;
  /** The node holding the directory. */
  readonly node: string;
  /** The resolver record was created by this call (the directory is new). */
  readonly created: boolean;
  readonly record: NameRecord;
  /** The layers, for status and tests. */
  readonly cache: CachedFileTree;
  readonly remote: RemoteFileTree;
  /** Disconnects from the node (its session ends there) and drops the cache. */
  close(): Promise<void>;
}

/** Resolves, places and creates the directory `opts.path` and returns the share's FileTree stack. */
export async function openShare(opts: OpenShareOptions): Promise<Share> {
  const { path: name, resolver, logger } = opts;
  checkName(name, 'directory');
  const cache = opts.nodesCache ?? new Map<string, NodeRecord>();
  const { record, created } = await resolver.placeName({ name, kind: 'directory', replicas: 1 });
  const nodeId = record.replicas[0]?.node;
  if (!nodeId) throw new FsError('EIO', `${name}: the resolver record has no replica`);

  /** The node's control addresses now: from the resolver, else the last known ones. */
  const addresses = async (): Promise<string[]> => {
    try {
      const n = await resolver.getNode(nodeId);
      if (n) {
        cache.set(nodeId, n);
        if (!n.alive) logger.debug({ share: name, node: nodeId }, 'share: the resolver sees the node dead; trying its last addresses');
      }
    } catch (e) {
      logger.debug({ share: name, node: nodeId, err: (e as Error).message }, 'share: resolver unreachable; using the cached node address');
    }
    const rec = cache.get(nodeId);
    if (!rec) throw new FsError('EIO', `${name}: node ${nodeId} is not registered in the resolver`);
    if (!rec.control.length) throw new FsError('EIO', `${name}: node ${nodeId} has no control address`);
    return rec.control;
  };

  await createOnNode(name, await addresses());
  const remote = new RemoteFileTree({
    addresses,
    path: name,
    readOnly: opts.readOnly ?? false,
    logger,
    ...(opts.timeoutMs !== undefined ? { timeoutMs: opts.timeoutMs } : {}),
    ...(opts.reconnectTimeoutMs !== undefined ? { reconnectTimeoutMs: opts.reconnectTimeoutMs } : {}),
  });
  try {
    await remote.connect();
  } catch (e) {
    await remote.close();
    throw e;
  }
  const cached = new CachedFileTree(remote, opts.cache);
  let tree: FileTree = cached;
  if (opts.uidMap?.length || opts.gidMap?.length) tree = new IdMapFileTree(tree, opts.uidMap ?? [], opts.gidMap ?? []);
  if (opts.readOnly) tree = new ReadOnlyFileTree(tree);
  logger.info({ share: name, node: nodeId, created, readOnly: opts.readOnly ?? false }, 'share: open');
  return {
    tree,
    path: name,
    node: nodeId,
    created,
    record,
    cache: cached,
    remote,
    close: () => tree.close(),
  };
}

/** `dir.create` on the first control address that answers (idempotent on the node). */
async function createOnNode(name: string, addresses: string[]): Promise<void> {
  let last: unknown;
  for (const a of addresses) {
    const rpc = new RpcClient(a, { timeoutMs: 15_000 });
    try {
      await rpc.call('dir.create', { path: name });
      return;
    } catch (e) {
      if (e instanceof RpcError && !e.transport) throw new FsError(e.code, `${name}: dir.create on ${a}: ${e.message}`);
      last = e;
    } finally {
      rpc.close();
    }
  }
  throw new FsError('EIO', `${name}: no control address of its node answers (${(last as Error)?.message ?? 'none'})`);
}
