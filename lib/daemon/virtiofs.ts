/**
 * A VM's share served over virtiofs: the FileTree stack (a directory of this host, or a directory
 * on a storage node through the resolver: lib/daemon/shares.ts), a FUSE engine per front-end
 * connection, the virtio-fs device and its vhost-user socket.
 *
 *   QEMU vhost-user-fs-pci ══ socket ══► VhostUserServer ► VirtioFsDevice ► FuseEngine ► FileTree
 *
 * One engine serves one FUSE session: a guest reboot (device reset) ends the session — its
 * handles, lookups and locks are dropped in the tree — and the next INIT starts a fresh one.
 */
import type { ShareConfig } from '../config/shares.js';
import { IdMapFileTree } from '../fs/idmap.js';
import { LocalFileTree } from '../fs/local.js';
import { ReadOnlyFileTree } from '../fs/readonly.js';
import type { FileTree } from '../fs/tree.js';
import { FuseEngine } from '../fuse/engine.js';
import type { Logger } from '../log.js';
import { prepareSocket } from '../net/address.js';
import type { NodeRecord, ResolverStore } from '../resolver/types.js';
import { VirtioFsDevice, type FuseRequestHandler } from '../vhost/fs.js';
import { VhostUserServer } from '../vhost/server.js';
import { openShare } from './shares.js';

export interface ShareCounters {
  /** A front end (QEMU) is connected now. */
  connected: boolean;
  connections: number;
  /** FUSE requests answered; chains dropped as unusable. */
  requests: number;
  dropped: number;
  /** FUSE sessions started (INIT after connect or reset). */
  sessions: number;
}

export interface RunningShare {
  readonly config: ShareConfig;
  /** The storage node holding a remote share; absent for a local directory. */
  readonly node?: string;
  stats(): ShareCounters;
  /** Stops listening, disconnects QEMU, ends the FUSE session, closes the tree. */
  close(): Promise<void>;
}

export interface ShareDeps {
  logger: Logger;
  /** Needed by shares with `path` (directories on storage nodes). */
  resolver?: ResolverStore;
  /** Node records shared between shares (see openShare). */
  nodesCache?: Map<string, NodeRecord>;
}

export type ShareServerFactory = (vm: string, share: ShareConfig) => Promise<RunningShare>;

/** Opens the share's tree (top of its stack) and says where it lives. */
async function openTree(vm: string, s: ShareConfig, deps: ShareDeps): Promise<{ tree: FileTree; node?: string }> {
  const log = deps.logger;
  if (s.dir !== undefined) {
    let tree: FileTree = await LocalFileTree.open(s.dir, { readOnly: s.readOnly });
    if (s.uidMap || s.gidMap) tree = new IdMapFileTree(tree, s.uidMap ?? [], s.gidMap ?? []);
    if (s.readOnly) tree = new ReadOnlyFileTree(tree);
    return { tree };
  }
  if (!deps.resolver) throw new Error(`share ${vm}/${s.tag}: path ${s.path} needs a resolver (top-level resolver)`);
  const share = await openShare({
    path: s.path!,
    resolver: deps.resolver,
    ...(deps.nodesCache ? { nodesCache: deps.nodesCache } : {}),
    readOnly: s.readOnly,
    ...(s.uidMap ? { uidMap: s.uidMap } : {}),
    ...(s.gidMap ? { gidMap: s.gidMap } : {}),
    logger: log,
  });
  log.info({ vm, tag: s.tag, path: s.path, node: share.node, created: share.created }, 'share: directory resolved');
  return { tree: share.tree, node: share.node };
}

export function shareServerFactory(deps: ShareDeps): ShareServerFactory {
  return async (vm, s) => {
    const log = deps.logger.child({ vm, share: s.tag });
    const { tree, node } = await openTree(vm, s, deps);
    let sessions = 0;
    let engine: FuseEngine | null = null;
    const engineNow = (): FuseEngine => {
      if (!engine) {
        sessions++;
        engine = new FuseEngine({ tree, logger: log, session: `${vm}/${s.tag}#${sessions}`, readOnly: s.readOnly });
      }
      return engine;
    };
    const handler: FuseRequestHandler = {
      handle: (msg) => engineNow().handle(msg),
      reset: () => {
        const e = engine;
        engine = null;
        if (e) void e.end();
      },
    };
    const device = new VirtioFsDevice({ handler, logger: log, requestQueues: s.queues });
    let server: VhostUserServer;
    try {
      await prepareSocket(s.socket, 'share socket');
      server = await VhostUserServer.listen({ path: s.socket, device, logger: log });
    } catch (e) {
      await tree.close().catch(() => {});
      throw e;
    }
    return {
      config: s,
      ...(node ? { node } : {}),
      stats: () => ({ connected: server.connected, connections: server.connections, requests: device.stats.requests, dropped: device.stats.dropped, sessions }),
      close: async () => {
        await server.close();
        const e = engine;
        engine = null;
        if (e) await e.end();
        await tree.close();
      },
    };
  };
}
