/**
 * A storage node (`vstore node`): the volumes of one DATA directory (volumes.ts) served over NBD
 * (one NbdServer, one export per volume named as the volume, on every listen address), managed
 * over RPC (lib/rpc) on every control address, and registered in the resolver with a lease that
 * a heartbeat keeps alive.
 *
 *   RPC methods: node.info, volume.create {name, size, grow?}, volume.grow {name, size},
 *   volume.delete {name, force?}, volume.list, volume.stat {name}. Errors carry errno-like codes
 *   (EINVAL, ENOENT, EEXIST, EBUSY, ENOSPC, ESHUTDOWN ...).
 *   Shared directories (DATA/dirs/<path>) on the same RPC: dir.* and fs.* (see dirs.ts).
 *
 * Every export's volume is one OrderedVolume over the FileVolume, shared by every connection of
 * the export, so overlapping writes from several connections keep their order and a flush on
 * one connection covers the writes of all (NBD_FLAG_CAN_MULTI_CONN holds).
 *
 * Durability: FileVolume answers FLUSH and FUA writes only after fdatasync on the volume's
 * descriptor (see test/integration/node-durability.test.ts, which checks it from the outside);
 * a created volume's file and directory entries are fsynced before volume.create answers.
 *
 * The resolver is optional and never on the data path: a resolver that cannot be reached is
 * logged once per outage and retried at every heartbeat while the node keeps serving.
 */
import { randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import type { FileEngine } from '../block/file.js';
import { OrderedVolume } from '../block/ordering.js';
import { toVolumeError, VolumeError } from '../block/errors.js';
import type { Logger } from '../log.js';
import type { NbdListenAddress } from '../nbd/api.js';
import { NbdServer } from '../nbd/server.js';
import { formatAddress, parseAddress, prepareSocket } from '../net/address.js';
import { checkNodeId, type NodeRecord, type ResolverStore } from '../resolver/types.js';
import { RpcServer, type RpcHandlers } from '../rpc/index.js';
import { fsyncDir, VolumeStore, type VolumeInfo } from './volumes.js';
import { NodeDirs, type OpenTree } from './dirs.js';
import { LocalFileTree } from '../fs/local.js';
import { ShortCircuitServer, shortCircuitSocketOf } from './shortcircuit.js';

export const DEFAULT_LEASE_TTL_MS = 10_000;
/** How long stop() waits for the resolver to take the deregistration. */
const DEREGISTER_TIMEOUT_MS = 1_000;

export interface StorageNodeOptions {
  /** The node's directory: volumes/, node-id, lock. */
  data: string;
  /** Node id; default the one stored in DATA/node-id (generated on first start). */
  id?: string;
  /** NBD listen addresses (lib/net/address.ts syntax: `unix:/path`, `host:port`; port 0 picks one). */
  nbd: string[];
  /** RPC control listen addresses. */
  control: string[];
  zone?: string;
  resolver?: ResolverStore;
  /** Lease of the registration (default 10 s). */
  leaseTtlMs?: number;
  /** Registration refresh period (default leaseTtlMs / 3). */
  heartbeatMs?: number;
  /** Longest wait for one resolver call before it counts as failed (default min(heartbeat, 5 s)). */
  resolverTimeoutMs?: number;
  /** FileVolume engine (default FileVolume's: io_uring where available). */
  engine?: FileEngine;
  /** How a share directory's FileTree is opened (default LocalFileTree confined to it). */
  openTree?: OpenTree;
  /**
   * Short-circuit local reads (shortcircuit.ts): next to every unix NBD socket P, a socket P.sc
   * hands daemons of this host (same uid) a read-only descriptor of a volume. Default true.
   */
  shortCircuit?: boolean;
  logger: Logger;
}

export interface NodeInfo {
  id: string;
  nbd: string[];
  control: string[];
  capacity: number;
  free: number;
  zone?: string;
  volumes: number;
  /** Shared directories on this node. */
  dirs: number;
}

function formatNbd(a: NbdListenAddress): string {
  return 'unix' in a ? formatAddress({ unix: a.unix }) : formatAddress({ host: a.tcp.host, port: a.tcp.port });
}

function timeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const t = setTimeout(() => reject(Object.assign(new Error(`${what}: no answer in ${ms} ms`), { code: 'ETIMEDOUT' })), ms);
    p.then(
      (v) => {
        clearTimeout(t);
        resolve(v);
      },
      (e: unknown) => {
        clearTimeout(t);
        reject(e);
      },
    );
  });
}

/** Reads DATA/node-id, or writes a new random id there (durably) on the first start. */
export async function stableNodeId(data: string): Promise<string> {
  const file = path.join(data, 'node-id');
  try {
    const id = (await fsp.readFile(file, 'utf8')).trim();
    checkNodeId(id);
    return id;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
  }
  const id = `node-${randomBytes(6).toString('hex')}`;
  const tmp = `${file}.tmp-${randomBytes(4).toString('hex')}`;
  const fh = await fsp.open(tmp, 'wx', 0o644);
  try {
    await fh.writeFile(`${id}\n`);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fsp.rename(tmp, file);
  await fsyncDir(data);
  return id;
}

/** The default tree of a share: LocalFileTree confined to the directory. */
const openLocalTree: OpenTree = (root) => LocalFileTree.open(root);

function param(p: unknown): Record<string, unknown> {
  if (typeof p !== 'object' || p === null || Array.isArray(p)) throw new VolumeError('EINVAL', 'params must be an object');
  return p as Record<string, unknown>;
}
function str(p: Record<string, unknown>, k: string): string {
  const v = p[k];
  if (typeof v !== 'string') throw new VolumeError('EINVAL', `${k}: expected a string`);
  return v;
}
function size(p: Record<string, unknown>, k: string): number {
  const v = p[k];
  if (typeof v !== 'number' || !Number.isSafeInteger(v)) throw new VolumeError('EINVAL', `${k}: expected an integer number of bytes`);
  return v;
}
function bool(p: Record<string, unknown>, k: string): boolean {
  const v = p[k];
  if (v === undefined || v === null) return false;
  if (typeof v !== 'boolean') throw new VolumeError('EINVAL', `${k}: expected a boolean`);
  return v;
}

export class StorageNode {
  readonly id: string;
  readonly zone: string | undefined;
  readonly store: VolumeStore;
  /** Shared directories served over the same RPC (dirs.ts). */
  readonly dirs: NodeDirs;
  private readonly logger: Logger;
  private readonly nbdServer: NbdServer;
  private readonly rpc: RpcServer;
  private readonly resolver: ResolverStore | undefined;
  private readonly leaseTtlMs: number;
  private readonly heartbeatMs: number;
  private readonly resolverTimeoutMs: number;
  private readonly exported = new Set<string>();
  /** One per unix NBD listen address (short-circuit local reads). */
  private readonly shortCircuit: ShortCircuitServer[] = [];
  /** Volume mutations and their export changes, one at a time. */
  private queue: Promise<unknown> = Promise.resolve();
  private timer: NodeJS.Timeout | undefined;
  private beating: Promise<void> | undefined;
  /** The resolver failed the last registration (warned once; cleared by a success). */
  private outage = false;
  private registered = false;
  private stopping: Promise<void> | undefined;

  private constructor(opts: StorageNodeOptions, id: string, store: VolumeStore) {
    this.id = id;
    this.zone = opts.zone;
    this.store = store;
    this.logger = opts.logger;
    this.resolver = opts.resolver;
    this.leaseTtlMs = opts.leaseTtlMs ?? DEFAULT_LEASE_TTL_MS;
    this.heartbeatMs = opts.heartbeatMs ?? Math.max(1, Math.floor(this.leaseTtlMs / 3));
    this.resolverTimeoutMs = opts.resolverTimeoutMs ?? Math.min(this.heartbeatMs, 5_000);
    this.nbdServer = new NbdServer({ logger: opts.logger });
    this.dirs = new NodeDirs({ data: path.resolve(opts.data), logger: opts.logger, openTree: opts.openTree ?? openLocalTree });
    this.rpc = new RpcServer({
      logger: opts.logger,
      handlers: { ...this.handlers(), ...this.dirs.handlers() },
      onDisconnect: (c) => this.dirs.disconnect(c.conn),
    });
    store.setExporter({
      connections: (name) => this.connections(name),
      unexport: (name) => this.unexport(name),
    });
  }

  /** Locks DATA, exports every volume, listens, registers; throws (having undone everything) when it cannot. */
  static async start(opts: StorageNodeOptions): Promise<StorageNode> {
    if (!opts.nbd.length) throw new Error('a storage node needs at least one NBD listen address');
    if (!(opts.leaseTtlMs === undefined || opts.leaseTtlMs > 0)) throw new RangeError('leaseTtlMs must be > 0');
    if (!(opts.heartbeatMs === undefined || opts.heartbeatMs > 0)) throw new RangeError('heartbeatMs must be > 0');
    const nbdAddrs = opts.nbd.map((a) => parseAddress(a, 'nbd listen address'));
    const ctlAddrs = opts.control.map((a) => parseAddress(a, 'control address'));
    const data = path.resolve(opts.data);
    if (opts.id !== undefined) checkNodeId(opts.id);
    const store = await VolumeStore.open(data, { logger: opts.logger, ...(opts.engine ? { engine: opts.engine } : {}) });
    let node: StorageNode | undefined;
    try {
      const id = opts.id ?? (await stableNodeId(data));
      node = new StorageNode(opts, id, store);
      for (const v of await store.list()) await node.exportVolume(v.name);
      for (const a of nbdAddrs) {
        if ('unix' in a) {
          await prepareSocket(a.unix, 'nbd listen address');
          await node.nbdServer.listen({ unix: a.unix });
          if (opts.shortCircuit ?? true) await node.listenShortCircuit(a.unix);
        } else await node.nbdServer.listen({ tcp: a });
      }
      for (const a of ctlAddrs) await node.rpc.listen(a);
    } catch (e) {
      for (const sc of node?.shortCircuit ?? []) sc.close();
      if (node) await node.rpc.close().catch(() => {});
      if (node) await node.nbdServer.close().catch(() => {});
      await store.close().catch(() => {});
      throw e;
    }
    if (node.resolver) {
      await node.beat();
      node.schedule();
    }
    return node;
  }

  /** Bound NBD addresses (`unix:/path`, `host:port` with the chosen port). */
  get nbdAddresses(): string[] {
    return this.nbdServer.addresses.map(formatNbd);
  }

  /** Bound control (RPC) addresses. */
  get controlAddresses(): string[] {
    return this.rpc.addresses;
  }

  /** Short-circuit sockets this node listens on (one per unix NBD address). */
  get shortCircuitServers(): readonly ShortCircuitServer[] {
    return this.shortCircuit;
  }

  private async listenShortCircuit(nbdSocket: string): Promise<void> {
    try {
      const sc = await ShortCircuitServer.listen({
        path: shortCircuitSocketOf(nbdSocket),
        logger: this.logger,
        lookup: async (name) => {
          if (!this.exported.has(name) || this.stopping) throw new VolumeError('ENOENT', `no volume ${name} exported here`);
          const vol = await this.store.open(name);
          // FileVolume keeps its descriptor private; read it only to check O_DIRECT (shortcircuit.ts).
          const nodeFd = (vol as unknown as { fd?: unknown }).fd;
          return { file: this.store.pathOf(name), size: vol.size, ...(typeof nodeFd === 'number' ? { nodeFd } : {}) };
        },
      });
      this.shortCircuit.push(sc);
    } catch (e) {
      // Without the addon (or the socket) reads simply go over NBD.
      this.logger.warn({ socket: nbdSocket, err: (e as Error).message }, 'node: short-circuit reads not offered');
    }
  }

  /** Ends every daemon's short-circuit descriptor of `name` (before its file changes). */
  private invalidateShortCircuit(name: string, why: string): void {
    for (const sc of this.shortCircuit) sc.invalidate(name, why);
  }

  /** Names of the volumes exported now. */
  get exports(): string[] {
    return [...this.exported].sort();
  }

  /** Whether the last registration attempt reached the resolver. */
  get resolverReachable(): boolean {
    return this.resolver !== undefined && !this.outage && this.registered;
  }

  async info(): Promise<NodeInfo> {
    const space = await this.store.space();
    const vols = await this.store.list();
    return {
      id: this.id,
      nbd: this.nbdAddresses,
      control: this.controlAddresses,
      capacity: space.capacity,
      free: space.free,
      ...(this.zone !== undefined ? { zone: this.zone } : {}),
      volumes: vols.length,
      dirs: (await this.dirs.list()).length,
    };
  }

  /** Creates (idempotently) and exports a volume. */
  createVolume(name: string, bytes: number, opts: { grow?: boolean } = {}): Promise<VolumeInfo & { created: boolean }> {
    return this.serial(async () => {
      const { info, created } = await this.store.create(name, bytes, opts);
      if (!this.exported.has(name)) await this.exportVolume(name);
      return { ...info, created };
    });
  }

  /** Grows a volume; its export is replaced (clients connected to it are disconnected after draining). */
  growVolume(name: string, bytes: number): Promise<VolumeInfo> {
    return this.serial(async () => {
      const info = await this.store.grow(name, bytes);
      if (!this.exported.has(name)) await this.exportVolume(name);
      return info;
    });
  }

  /** Deletes a volume: EBUSY while clients are connected to it, unless `force`. */
  deleteVolume(name: string, opts: { force?: boolean } = {}): Promise<void> {
    return this.serial(async () => {
      await this.store.delete(name, opts);
      // After the unlink too: a descriptor granted while the delete ran must not outlive it.
      this.invalidateShortCircuit(name, 'delete');
    });
  }

  listVolumes(): Promise<VolumeInfo[]> {
    return this.store.list();
  }

  statVolume(name: string): Promise<VolumeInfo & { exported: boolean; connections: number }> {
    return this.store.stat(name).then((i) => ({ ...i, exported: this.exported.has(name), connections: this.connections(name) }));
  }

  /**
   * Drains and stops: deregisters (best effort, short timeout), closes the RPC and NBD servers
   * (in-flight requests complete, exports are flushed), flushes and closes the volumes, and
   * releases the lock on DATA.
   */
  stop(): Promise<void> {
    this.stopping ??= this.doStop();
    return this.stopping;
  }

  private async doStop(): Promise<void> {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    await this.beating?.catch(() => {});
    if (this.resolver) {
      try {
        await timeout(this.resolver.deregisterNode(this.id), DEREGISTER_TIMEOUT_MS, 'resolver deregister');
        this.logger.info({ id: this.id }, 'node: deregistered');
      } catch (e) {
        this.logger.warn({ id: this.id, err: (e as Error).message }, 'node: deregistration failed (its lease will expire)');
      }
    }
    for (const sc of this.shortCircuit) sc.close();
    await this.rpc.close();
    await this.dirs.close().catch((e: unknown) => this.logger.warn({ err: (e as Error).message }, 'node: closing the directories failed'));
    await this.queue.catch(() => {});
    // removeExport drains each export and disconnects its clients at once; close() alone would
    // wait for the listeners' close callbacks, which come only after every connection has ended.
    for (const name of [...this.exported]) await this.unexport(name).catch(() => {});
    await this.nbdServer.close();
    await this.store.close();
    this.logger.info({ id: this.id }, 'node: stopped');
  }

  private connections(name: string): number {
    return this.nbdServer.stats().exports.find((e) => e.name === name)?.connections ?? 0;
  }

  private async exportVolume(name: string): Promise<void> {
    const vol = await this.store.open(name);
    this.nbdServer.addExport({ name, volume: new OrderedVolume(vol), description: name });
    this.exported.add(name);
  }

  private async unexport(name: string): Promise<void> {
    if (!this.exported.delete(name)) return;
    // Grow and delete unexport first (volumes.ts closeExported): every descriptor handed out is
    // let go before the file changes size or goes away.
    this.invalidateShortCircuit(name, 'unexport');
    await this.nbdServer.removeExport(name);
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    if (this.stopping) return Promise.reject(new VolumeError('ESHUTDOWN', 'node is stopping'));
    const p = this.queue.then(fn, fn);
    this.queue = p.catch(() => {});
    return p;
  }

  private schedule(): void {
    if (this.stopping) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      void this.beat().finally(() => this.schedule());
    }, this.heartbeatMs);
  }

  /** One registration (at start and every heartbeat) with the free space of now. */
  private beat(): Promise<void> {
    const run = async (): Promise<void> => {
      const resolver = this.resolver!;
      try {
        const space = await this.store.space();
        const rec: NodeRecord = {
          id: this.id,
          nbd: this.nbdAddresses,
          control: this.controlAddresses,
          capacity: space.capacity,
          free: space.free,
          ...(this.zone !== undefined ? { zone: this.zone } : {}),
        };
        await timeout(resolver.registerNode(rec, this.leaseTtlMs), this.resolverTimeoutMs, 'resolver registerNode');
        if (this.outage) this.logger.info({ id: this.id }, 'node: resolver reachable again; registered');
        else if (!this.registered) this.logger.info({ id: this.id, nbd: rec.nbd, control: rec.control, leaseTtlMs: this.leaseTtlMs }, 'node: registered');
        this.outage = false;
        this.registered = true;
      } catch (e) {
        if (!this.outage) {
          const code = (e as { code?: string }).code;
          this.logger.warn({ id: this.id, code, err: (e as Error).message }, 'node: cannot register in the resolver; serving anyway and retrying');
        }
        this.outage = true;
      }
    };
    this.beating = run();
    return this.beating;
  }

  private handlers(): RpcHandlers {
    const wrap =
      <T>(fn: (p: Record<string, unknown>) => Promise<T>) =>
      async (p: unknown): Promise<T> => {
        try {
          return await fn(param(p ?? {}));
        } catch (e) {
          throw toVolumeError(e);
        }
      };
    return {
      'node.info': wrap(() => this.info()),
      'volume.create': wrap((p) => this.createVolume(str(p, 'name'), size(p, 'size'), { grow: bool(p, 'grow') })),
      'volume.grow': wrap((p) => this.growVolume(str(p, 'name'), size(p, 'size'))),
      'volume.delete': wrap(async (p) => {
        await this.deleteVolume(str(p, 'name'), { force: bool(p, 'force') });
        return { deleted: true };
      }),
      'volume.list': wrap(() => this.listVolumes()),
      'volume.stat': wrap((p) => this.statVolume(str(p, 'name'))),
    };
  }
}
