/**
 * A VM's share served over virtiofs: the FileTree stack (a directory of this host, or a directory
 * on a storage node through the resolver: lib/daemon/shares.ts), a FUSE engine per front-end
 * connection, the virtio-fs device and its vhost-user socket.
 *
 *   QEMU vhost-user-fs-pci ══ socket ══► VhostUserServer ► VirtioFsDevice ► FuseEngine ► FileTree
 *
 * One engine serves one FUSE session: a guest reboot (device reset) ends the session — its
 * handles, lookups and locks are dropped in the tree — and the next INIT starts a fresh one.
 *
 * Every share's stack has a StableIdFileTree on top (lib/fs/stable.ts): the guest's node ids and
 * handles are its own, so a live handoff to a new daemon process (lib/daemon/handoff.ts) can
 * carry them: `handoff` quiesces the device and exports the vhost-user state, the FUSE session
 * and the id table; the factory's `adopt` rebuilds the share from that in the new process.
 *
 * When the daemon has QoS, the engine's tree is a QosFileTree (lib/qos/fs.ts) over the
 * StableIdFileTree, submitting to the VM's flow (the registry passes it): a VM's disks and shares
 * share one allocation. An adopted share gets the layer unbound and `bindQos` binds it.
 */
import type { ShareConfig } from '../config/shares.js';
import { checkIdMap } from '../fs/idmap.js';
import { LocalFileTree } from '../fs/local.js';
import { StableIdFileTree, type StableSnapshot } from '../fs/stable.js';
import type { FileTree } from '../fs/tree.js';
import { FuseEngine, type Negotiated } from '../fuse/engine.js';
import type { Logger } from '../log.js';
import { prepareSocket } from '../net/address.js';
import type { NodeRecord, ResolverStore } from '../resolver/types.js';
import { VirtioFsDevice, type FuseRequestHandler } from '../vhost/fs.js';
import { closeQuietly } from '../vhost/channel.js';
import { VhostUserServer, type ServerState } from '../vhost/server.js';
import { native } from '../native/index.js';
import { openShare } from './shares.js';
import { QosFileTree } from '../qos/fs.js';
import type { QosFlow } from '../qos/scheduler.js';

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
  /** Live handoff to another process (absent: this share cannot be handed over). */
  readonly handoff?: ShareHandoff;
  /**
   * Puts the share's requests through the VM's QoS flow from now on (a share adopted from a
   * handoff is served before the registry has its VM's flow). Absent: no QoS layer in the stack.
   */
  bindQos?(flow: QosFlow): void;
}

/** A share's part in a live handoff (lib/daemon/handoff.ts), old-process side. */
export interface ShareHandoff {
  /** Stops accepting and taking requests; resolves when none is in flight (see VhostUserBackend.quiesce). */
  quiesce(timeoutMs?: number): Promise<void>;
  /** The handoff failed: serve again. */
  resume(): void;
  /** After quiesce: everything the new process needs, and the fds it names (still this share's). */
  exportState(): { state: ShareHandoffState; fds: number[] };
  /** After the commit: let go of the socket and the connection (not closed for QEMU), close the tree. */
  detach(): Promise<void>;
}

/** What crosses the handoff socket for one share (JSON; fds beside it). */
export interface ShareHandoffState {
  version: 1;
  vm: string;
  tag: string;
  socket: string;
  /** `dir PATH` or `path NAME`: the new process checks its config says the same. */
  source: string;
  /** FUSE sessions started so far (the next one is named after it). */
  sessions: number;
  /** The FUSE session in progress: its name and what INIT settled (flags as a decimal string). */
  engine: { session: string; negotiated: (Omit<Negotiated, 'flags'> & { flags: string }) | null } | null;
  stable: StableSnapshot;
  server: ServerState;
}

/** A share rebuilt from a handoff in the new process: quiesced until start(). */
export interface AdoptedShare extends RunningShare {
  /** The old process has let go: accept, serve, pick up what the guest queued meanwhile. */
  start(): void;
  /** The handoff failed before the commit: close this process's copies, touch nothing else. */
  abandon(): Promise<void>;
}

export interface ShareDeps {
  logger: Logger;
  /** Needed by shares with `path` (directories on storage nodes). */
  resolver?: ResolverStore;
  /** Node records shared between shares (see openShare). */
  nodesCache?: Map<string, NodeRecord>;
}

/** What the registry gives a share of its VM. */
export interface ShareServeOptions {
  /** The VM's flow in the host's QoS scheduler (absent: the daemon runs without QoS). */
  flow?: QosFlow;
}

export type ShareServerFactory = ((vm: string, share: ShareConfig, opts?: ShareServeOptions) => Promise<RunningShare>) & {
  /** Rebuilds a handed-over share (takes every fd; closes them on failure). */
  adopt?: (vm: string, share: ShareConfig, state: ShareHandoffState, fds: number[]) => Promise<AdoptedShare>;
};

/** How a share names its directory, in status and in a handoff. */
export function shareSource(s: ShareConfig): string {
  return s.dir !== undefined ? `dir ${s.dir}` : `path ${s.path}`;
}

/** Opens the share's tree (top of its stack) and says where it lives. */
async function openTree(vm: string, s: ShareConfig, deps: ShareDeps): Promise<{ tree: FileTree; node?: string }> {
  const log = deps.logger;
  if (s.dir !== undefined) {
    // The local tree maps ids and refuses changes itself: no IdMap/ReadOnly layers on top.
    checkIdMap(s.uidMap ?? [], 'uidMap');
    checkIdMap(s.gidMap ?? [], 'gidMap');
    const tree = await LocalFileTree.open(s.dir, { readOnly: s.readOnly, ...(s.uidMap ? { uidMap: s.uidMap } : {}), ...(s.gidMap ? { gidMap: s.gidMap } : {}) });
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
  const create = async (vm: string, s: ShareConfig, opts: ShareServeOptions = {}): Promise<RunningShare> => {
    const log = deps.logger.child({ vm, share: s.tag });
    const { tree, node } = await openTree(vm, s, deps);
    const stable = new StableIdFileTree(tree);
    // QoS on top: the engine's calls are scheduled, StableIdFileTree's own (handoff) work is not.
    const front = opts.flow ? new QosFileTree(stable, opts.flow) : undefined;
    return serveShare(vm, s, log, stable, front, node, { sessions: 0, engine: null }, async (device) => {
      try {
        await prepareSocket(s.socket, 'share socket');
        return await VhostUserServer.listen({ path: s.socket, device, logger: log });
      } catch (e) {
        await stable.close().catch(() => {});
        throw e;
      }
    });
  };
  const adopt = async (vm: string, s: ShareConfig, st: ShareHandoffState, fds: number[]): Promise<AdoptedShare> => {
    const log = deps.logger.child({ vm, share: s.tag });
    let tree: FileTree;
    let node: string | undefined;
    try {
      if (st?.version !== 1) throw new Error('unknown share state version');
      ({ tree, node } = await openTree(vm, s, deps));
    } catch (e) {
      const n = native();
      for (const f of fds) closeQuietly(n, f);
      throw e;
    }
    let stable: StableIdFileTree;
    try {
      const r = await StableIdFileTree.restore(tree, st.stable);
      stable = r.tree;
      log.info({ ...r.report }, 'share: ids and handles restored from the handoff');
    } catch (e) {
      const n = native();
      for (const f of fds) closeQuietly(n, f);
      await tree.close().catch(() => {});
      throw e;
    }
    // Bound to the VM's flow when the registry adds the VM (bindQos); passes through until then.
    const front = new QosFileTree(stable);
    let engine: FuseEngine | null = null;
    if (st.engine) {
      engine = new FuseEngine({ tree: front, logger: log, session: st.engine.session, readOnly: s.readOnly });
      const ng = st.engine.negotiated;
      if (ng) engine.resumeSession({ ...ng, flags: BigInt(ng.flags) });
    }
    let server: VhostUserServer | undefined;
    const share = await serveShare(vm, s, log, stable, front, node, { sessions: st.sessions, engine }, async (device) => {
      try {
        server = VhostUserServer.adopt({ path: s.socket, device, logger: log }, st.server, fds);
        return server;
      } catch (e) {
        await stable.close().catch(() => {});
        throw e;
      }
    });
    return {
      ...share,
      start: () => server!.start(),
      abandon: async () => {
        await server!.detach();
        await stable.close().catch(() => {});
      },
    };
  };
  return Object.assign(create, { adopt });
}

/**
 * The running share over its stack: the engine per FUSE session, the virtio-fs device, the
 * vhost-user server `listen` makes for the device (a new socket, or one adopted from a handoff).
 * `qos`, when set, is the engine's tree: the QoS layer over `tree`.
 */
async function serveShare(
  vm: string,
  s: ShareConfig,
  log: Logger,
  tree: StableIdFileTree,
  qos: QosFileTree | undefined,
  node: string | undefined,
  from: { sessions: number; engine: FuseEngine | null },
  listen: (device: VirtioFsDevice) => Promise<VhostUserServer> | VhostUserServer,
): Promise<RunningShare> {
  let sessions = from.sessions;
  let engine: FuseEngine | null = from.engine;
  const engineNow = (): FuseEngine => {
    if (!engine) {
      sessions++;
      engine = new FuseEngine({ tree: qos ?? tree, logger: log, session: `${vm}/${s.tag}#${sessions}`, readOnly: s.readOnly });
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
  const server = await listen(device);
  const handoff: ShareHandoff = {
    quiesce: (timeoutMs) => server.quiesce(timeoutMs),
    resume: () => server.resume(),
    exportState: () => {
      const { state, fds } = server.exportState();
      const ng = engine?.negotiated;
      return {
        state: {
          version: 1,
          vm,
          tag: s.tag,
          socket: s.socket,
          source: shareSource(s),
          sessions,
          engine: engine ? { session: engine.session, negotiated: ng ? { ...ng, flags: ng.flags.toString() } : null } : null,
          stable: tree.snapshot(),
          server: state,
        },
        fds,
      };
    },
    detach: async () => {
      await server.detach();
      // The session lives on in the new process: it is not ended here (that would only touch
      // this process's tree, which goes now).
      engine = null;
      await tree.close();
    },
  };
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
    handoff,
    ...(qos
      ? {
          bindQos: (flow: QosFlow) => {
            qos.flow = flow;
          },
        }
      : {}),
  };
}
