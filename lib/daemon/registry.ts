/**
 * The VM registry: which VMs the daemon serves, and for each its disks — the volume, the NBD
 * server on the disk's own unix socket, the export on the shared TCP server, and the
 * vhost-user-blk device on its own socket. Nothing global: the server factories and the volume
 * opener are injected, so a test builds the registry over MemoryVolumes and fake servers, and
 * the daemon over files and the real servers.
 *
 * A disk with more than one front end (vhost-user-blk, or an NBD socket and the shared TCP server)
 * puts one OrderedVolume over its volume and hands that to every front end (NBD unix, TCP,
 * vhost-user), so overlapping requests keep their order across them and a flush from either side
 * covers the other's completed writes.
 *
 * Mutations (add/remove of VMs and disks) run one at a time, in order: a remove that arrives
 * while the same VM is being added waits for the add to finish, and never sees half a VM.
 */
import { rm } from 'node:fs/promises';
import path from 'node:path';
import { OrderedVolume } from '../block/ordering.js';
import type { Volume } from '../block/volume.js';
import { diskSockets, diskSource, type DiskConfig, type VmConfig } from '../config/schema.js';
import { shareMountCommand, shareQemuArgs, type ShareConfig } from '../config/shares.js';
import type { RunningShare, ShareCounters, ShareServerFactory } from './virtiofs.js';
import type { Logger } from '../log.js';
import { prepareSocket as prepareNetSocket, SocketConflictError } from '../net/address.js';
import type { NbdExportSpec, NbdListenAddress, NbdServerOptions, NbdServerStats } from '../nbd/api.js';
import type { SuspendStatus } from '../paths/suspend.js';
import type { QosFlow, QosFlowStatus, QosScheduler } from '../qos/scheduler.js';
import { DEFAULT_QOS, type QosSettings } from '../qos/settings.js';
import { QosVolume } from '../qos/volume.js';
import type { CacheHost } from '../block/cache/host.js';
import type { CacheStats, CacheVolume } from '../block/cache/volume.js';

/** What the registry needs of an NBD server (lib/nbd/server.ts's NbdServer has it). */
export interface NbdServerLike {
  addExport(spec: NbdExportSpec): void;
  removeExport(name: string): Promise<void>;
  listen(addr: NbdListenAddress): Promise<void>;
  close(): Promise<void>;
  stats(): NbdServerStats;
  /** The bound addresses (NbdServer has them; for TCP port 0, the port the system chose). */
  readonly addresses?: NbdListenAddress[];
}

export type NbdServerFactory = (opts: NbdServerOptions) => NbdServerLike;

/** Counters of one disk's vhost-user-blk device (lib/vhost: server and VirtioBlkDevice). */
export interface VhostUserCounters {
  /** A front end (QEMU) is connected now. */
  connected: boolean;
  /** Front-end connections accepted so far. */
  connections: number;
  /** Requests completed with VIRTIO_BLK_S_OK, IOERR, UNSUPP; requests dropped unanswered. */
  ok: number;
  ioerr: number;
  unsupp: number;
  dropped: number;
}

/** What the registry needs of a vhost-user-blk server: it listens once created. */
export interface VhostServerLike {
  /** Stops listening, disconnects the front end, removes the socket. */
  close(): Promise<void>;
  stats(): VhostUserCounters;
}

export interface VhostServerOptions {
  socket: string;
  volume: Volume;
  queues: number;
  readOnly: boolean;
  serial?: string;
  logger: Logger;
}

export type VhostServerFactory = (opts: VhostServerOptions) => Promise<VhostServerLike>;
/** Opens a disk's volume; `vm` is the VM's config (a remote disk takes its multipath and suspend settings from it). */
export type VolumeOpener = (disk: DiskConfig, vm?: VmConfig) => Promise<Volume>;

/** An error the control API reports with an HTTP status (and the CLI prints as one line). */
export class RegistryError extends Error {
  constructor(
    readonly status: 400 | 404 | 409 | 500 | 503,
    message: string,
  ) {
    super(message);
    this.name = 'RegistryError';
  }
}

export interface DiskCounters {
  connections: number;
  inflight: number;
  reads: number;
  writes: number;
  bytesRead: number;
  bytesWritten: number;
  errors: number;
}

/** A volume that can say how its replicas stand (ReplicatedVolume). */
export interface ReplicationSource {
  replicationStatus(): ReplicationStatus;
}

export interface ReplicationStatus {
  name: string;
  replicas: Array<{
    id: string; state: string; up: boolean; dirtyBytes: number; resync?: { doneBytes: number; totalBytes: number };
    /** Short-circuit local reads (a node on this host): descriptor held now, reads served by it. */
    shortCircuit?: { active: boolean; reads: number; grants: number; writes?: number; writable?: boolean };
  }>;
}

function suspendedOf(vols: Volume[]): { suspended?: SuspendStatus } {
  for (const v of vols) {
    const s = (v as { suspendStatus?: () => SuspendStatus | undefined }).suspendStatus?.();
    if (s) return { suspended: s };
  }
  return {};
}

function replicationOf(v: Volume): { replication?: ReplicationStatus } {
  const src = v as Partial<ReplicationSource>;
  return typeof src.replicationStatus === 'function' ? { replication: src.replicationStatus() } : {};
}

export interface DiskStatus extends DiskCounters {
  name: string;
  /** The image path, or `volume NAME (N replicas)` for a remote volume. */
  file: string;
  /** Replica states of a remote volume. */
  replication?: ReplicationStatus;
  size: number;
  readOnly: boolean;
  /** NBD unix socket and export name; both '' when the disk has no NBD socket (`nbd: false`). */
  socket: string;
  export: string;
  /** Export name on the shared TCP listener, when there is one. */
  tcpExport?: string;
  /** The vhost-user-blk socket and its counters, when the disk has one. */
  vhostUser?: { socket: string; queues: number } & VhostUserCounters;
  /** The disk's cache layer (when the daemon has a cache device). */
  cache?: CacheStats;
}

export interface ShareStatus extends ShareCounters {
  tag: string;
  /** `dir PATH` (this host) or `path NAME on NODE` (a storage node). */
  source: string;
  target: string;
  readOnly: boolean;
  socket: string;
  queues: number;
  /** The guest's mount command. */
  mount: string;
}

export interface VmStatus {
  name: string;
  disks: DiskStatus[];
  shares: ShareStatus[];
  /** A disk of the VM has no reachable replica: its I/O queues, or the daemon paused it (lib/paths/suspend.ts). */
  suspended?: SuspendStatus;
  /** The VM's service level and measured rates (absent when the daemon runs without QoS). */
  qos?: QosFlowStatus;
}

interface Disk {
  vm: string;
  config: DiskConfig;
  /** The opened volume (flushed and closed on removal). */
  volume: Volume;
  /** What the front ends are given: `volume`, or one OrderedVolume over it shared by all. */
  front: Volume;
  /** The cache layer over `volume` (closing it closes `volume`). */
  cache?: CacheVolume;
  server?: NbdServerLike;
  vhost?: VhostServerLike;
  tcpExport?: string;
  logger: Logger;
}

interface Vm {
  name: string;
  disks: Map<string, Disk>;
  /** Shares being served, by tag (started after the disks, stopped before them). */
  shares: Map<string, RunningShare>;
  /** The VM's flow in the host scheduler: every disk's QosVolume submits to it. */
  flow?: QosFlow;
}

export interface RegistryDeps {
  logger: Logger;
  createServer: NbdServerFactory;
  openVolume: VolumeOpener;
  /** vhost-user-blk servers of disks that ask for one (none: such disks are refused). */
  createVhostServer?: VhostServerFactory;
  /** The shared TCP server: every disk is also exported there as `VM/DISK`. */
  tcpServer?: NbdServerLike;
  /** The host-wide QoS scheduler (none: disks are served without a QoS layer). */
  qos?: QosScheduler;
  /** virtiofs servers of shares (none: VMs with shares are refused). */
  createShareServer?: ShareServerFactory;
  /** The host's cache device: every disk gets a cache layer below QoS (none: no cache). */
  cache?: CacheHost;
}

const ZERO: DiskCounters = { connections: 0, inflight: 0, reads: 0, writes: 0, bytesRead: 0, bytesWritten: 0, errors: 0 };

export class VmRegistry {
  private readonly vms = new Map<string, Vm>();
  /** Each VM's config, for its disks' opener. */
  private readonly vmConfigs = new Map<string, VmConfig>();
  private queue: Promise<unknown> = Promise.resolve();
  private closed = false;

  constructor(private readonly deps: RegistryDeps) {}

  /** Runs mutations one after another. */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => {});
    return run;
  }

  has(vm: string): boolean {
    return this.vms.has(vm);
  }

  /** Adds a VM and serves its disks; all or nothing (disks already up are taken down on failure). */
  addVm(vm: VmConfig): Promise<void> {
    return this.serial(async () => {
      this.open();
      if (this.vms.has(vm.name)) throw new RegistryError(409, `VM "${vm.name}" already exists`);
      this.checkSockets(vm.disks, (j) => `disks[${j}].`);
      this.checkShareSockets(vm.shares ?? []);
      this.vmConfigs.set(vm.name, vm);
      if (vm.qos && !this.deps.qos) throw new RegistryError(400, 'qos: QoS is disabled on this daemon (qos.enabled: false)');
      const entry: Vm = { name: vm.name, disks: new Map(), shares: new Map(), ...(this.deps.qos ? { flow: this.deps.qos.addFlow(vm.name, vm.qos ?? DEFAULT_QOS) } : {}) };
      this.vms.set(vm.name, entry);
      try {
        for (const [j, d] of vm.disks.entries()) await this.startDisk(entry, d, `disks[${j}]`);
        for (const [j, sh] of (vm.shares ?? []).entries()) await this.startShare(entry, sh, `shares[${j}]`);
      } catch (e) {
        await this.stopVm(entry);
        this.vms.delete(vm.name);
        throw e;
      }
      this.deps.logger.info({ vm: vm.name, disks: vm.disks.map((d) => d.name), shares: (vm.shares ?? []).map((sh) => sh.tag) }, 'VM added');
    });
  }

  /** Drains, flushes and removes every disk of a VM, then the VM. */
  removeVm(name: string): Promise<void> {
    return this.serial(async () => {
      const vm = this.vms.get(name);
      if (!vm) throw new RegistryError(404, `no VM "${name}"`);
      this.vms.delete(name);
      this.vmConfigs.delete(name);
      await this.stopVm(vm);
      this.deps.logger.info({ vm: name }, 'VM removed');
    });
  }

  addDisk(vmName: string, disk: DiskConfig): Promise<void> {
    return this.serial(async () => {
      this.open();
      const vm = this.vms.get(vmName);
      if (!vm) throw new RegistryError(404, `no VM "${vmName}"`);
      if (vm.disks.has(disk.name)) throw new RegistryError(409, `VM "${vmName}" already has a disk "${disk.name}"`);
      this.checkSockets([disk], () => '');
      await this.startDisk(vm, disk, '');
    });
  }

  removeDisk(vmName: string, diskName: string): Promise<void> {
    return this.serial(async () => {
      const vm = this.vms.get(vmName);
      if (!vm) throw new RegistryError(404, `no VM "${vmName}"`);
      const disk = vm.disks.get(diskName);
      if (!disk) throw new RegistryError(404, `VM "${vmName}" has no disk "${diskName}"`);
      vm.disks.delete(diskName);
      await this.stopDisk(disk);
    });
  }

  /**
   * Shutdown: refuses further mutations, then takes every VM down at once (each NBD server
   * stops accepting, drains, flushes), and returns when all are down. Errors are logged, not
   * thrown: one stuck disk must not keep the others' sockets around.
   */
  closeAll(): Promise<void> {
    this.closed = true;
    return this.serial(async () => {
      const vms = [...this.vms.values()];
      this.vms.clear();
      await Promise.all(vms.map((vm) => this.stopVm(vm)));
    });
  }

  /**
   * Live handoff (lib/daemon/handoff.ts): runs `fn` with every share being served, between
   * mutations (no VM comes or goes meanwhile); the shares `fn` returns were handed to another
   * process and are forgotten here — not closed: their sockets and connections live on there.
   */
  handOverShares(
    fn: (shares: Array<{ vm: string; share: RunningShare }>) => Promise<Array<{ vm: string; share: RunningShare }>>,
  ): Promise<void> {
    return this.serial(async () => {
      this.open();
      const all = [...this.vms.values()].flatMap((vm) => [...vm.shares.values()].map((share) => ({ vm: vm.name, share })));
      const gone = await fn(all);
      for (const { vm, share } of gone) {
        const v = this.vms.get(vm);
        if (v?.shares.get(share.config.tag) === share) v.shares.delete(share.config.tag);
      }
    });
  }

  /**
   * Replaces a VM's service level; it applies from the scheduler's next dispatch. Not queued
   * behind add/remove: it touches no socket or volume.
   */
  setQos(vmName: string, settings: QosSettings): QosFlowStatus {
    const vm = this.vms.get(vmName);
    if (!vm) throw new RegistryError(404, `no VM "${vmName}"`);
    if (!vm.flow || !this.deps.qos) throw new RegistryError(400, 'QoS is disabled on this daemon (qos.enabled: false)');
    vm.flow.update(settings);
    this.deps.logger.info({ vm: vmName, qos: settings }, 'VM service level changed');
    return vm.flow.status(this.deps.qos.clock.now());
  }

  /** A disk's cache layer (the control API's cache endpoints). */
  cacheOf(vmName: string, diskName: string): CacheVolume {
    const vm = this.vms.get(vmName);
    if (!vm) throw new RegistryError(404, `no VM "${vmName}"`);
    const disk = vm.disks.get(diskName);
    if (!disk) throw new RegistryError(404, `VM "${vmName}" has no disk "${diskName}"`);
    if (!disk.cache) throw new RegistryError(400, 'this daemon has no cache device (top-level cache in its config)');
    return disk.cache;
  }

  status(): VmStatus[] {
    const tcpStats = this.deps.tcpServer?.stats();
    const now = this.deps.qos?.clock.now() ?? 0;
    return [...this.vms.values()].map((vm) => ({
      name: vm.name,
      ...suspendedOf([...vm.disks.values()].map((d) => d.volume)),
      ...(vm.flow ? { qos: vm.flow.status(now) } : {}),
      disks: [...vm.disks.values()].map((d) => {
        const c = { ...ZERO };
        if (d.server && d.config.nbd) add(c, d.server.stats().exports.find((e) => e.name === d.config.nbd!.export));
        if (d.tcpExport) add(c, tcpStats?.exports.find((e) => e.name === d.tcpExport));
        const vu = d.config.vhostUser;
        return {
          name: d.config.name,
          file: diskSource(d.config),
          ...replicationOf(d.volume),
          size: d.volume.size,
          readOnly: d.config.readOnly || d.volume.caps.readOnly,
          socket: d.config.nbd?.socket ?? '',
          export: d.config.nbd?.export ?? '',
          ...(d.tcpExport !== undefined ? { tcpExport: d.tcpExport } : {}),
          ...c,
          ...(vu && d.vhost ? { vhostUser: { socket: vu.socket, queues: vu.queues, ...d.vhost.stats() } } : {}),
          ...(d.cache ? { cache: d.cache.stats() } : {}),
        };
      }),
      shares: [...vm.shares.values()].map((sh) => ({
        tag: sh.config.tag,
        source: sh.config.dir !== undefined ? `dir ${sh.config.dir}` : `path ${sh.config.path}${sh.node ? ` on ${sh.node}` : ''}`,
        target: sh.config.target,
        readOnly: sh.config.readOnly,
        socket: sh.config.socket,
        queues: sh.config.queues,
        mount: shareMountCommand(sh.config),
        ...sh.stats(),
      })),
    }));
  }

  private open(): void {
    if (this.closed) throw new RegistryError(503, 'the daemon is shutting down');
  }

  /** Every socket the daemon serves now (disks and shares), with its owner for the error message. */
  private socketsInUse(): Map<string, string> {
    const inUse = new Map<string, string>();
    for (const vm of this.vms.values()) {
      for (const d of vm.disks.values()) for (const s of diskSockets(d.config)) inUse.set(s.socket, `${vm.name}/${d.config.name}`);
      for (const sh of vm.shares.values()) inUse.set(sh.config.socket, `${vm.name} share ${sh.config.tag}`);
    }
    return inUse;
  }

  /** Two disks or shares never share a socket (the schema checks within one request; this across the daemon). */
  private checkSockets(disks: DiskConfig[], where: (j: number) => string): void {
    const inUse = this.socketsInUse();
    disks.forEach((d, j) => {
      for (const { field, socket } of diskSockets(d)) {
        const owner = inUse.get(socket);
        if (owner) throw new RegistryError(409, `${where(j)}${field}: socket ${socket} is already used by ${owner}`);
      }
    });
  }

  private async startDisk(vm: Vm, config: DiskConfig, where: string): Promise<void> {
    const logger = this.deps.logger.child({ vm: vm.name, disk: config.name });
    const field = (f: string): string => (where ? `${where}.${f}` : f);
    let volume: Volume;
    try {
      volume = await this.deps.openVolume(config, this.vmConfigs.get(vm.name));
    } catch (e) {
      // "ENOENT: ENOENT: no such file..." (VolumeError over a system error) said once
      const why = (e as Error).message.replace(/^(\w+): \1: /, '$1: ');
      if (config.volume) throw new RegistryError(e instanceof RegistryError ? e.status : 400, `${field('volume')}: cannot open volume ${config.volume.name}: ${why}`);
      throw new RegistryError(400, `${field('file')}: cannot open ${config.file}: ${why}`);
    }
    // The cache layer sits below QoS: NbdExport(Ordered(Qos(Cache(volume)))).
    let cache: CacheVolume | undefined;
    if (this.deps.cache) {
      try {
        const key = config.volume ? `volume:${config.volume.name}` : `file:${config.file}`;
        cache = await this.deps.cache.openDisk(vm.name, config.name, key, volume, config.cache ?? {}, config.volume?.name, this.vmConfigs.get(vm.name)?.cache);
      } catch (e) {
        await volume.close().catch(() => {});
        throw new RegistryError(500, `${field('cache')}: cannot open the cache layer: ${(e as Error).message}`);
      }
    }
    // With two kinds of front end, one ordering for all of them (see the header). The QoS
    // layer sits below the ordering (lib/qos/volume.ts says why): NbdExport(Ordered(Qos(volume))).
    const below: Volume = cache ?? volume;
    const scheduled: Volume = vm.flow ? new QosVolume(below, vm.flow) : below;
    const fronts = (config.vhostUser ? 1 : 0) + (config.nbd ? 1 : 0) + (this.deps.tcpServer && config.nbd ? 1 : 0);
    const front: Volume = fronts > 1 ? new OrderedVolume(scheduled) : scheduled;
    const disk: Disk = { vm: vm.name, config, volume, front, logger, ...(cache ? { cache } : {}) };
    let step = field('nbd.socket');
    try {
      if (config.vhostUser && !this.deps.createVhostServer) {
        throw new RegistryError(400, `${field('vhostUser')}: this daemon cannot serve vhost-user-blk`);
      }
      if (config.nbd) {
        // A remote volume's block status is a round trip to a node: a read would wait for two
        // (status, then data) to save sending zeroes over a local socket. Reads are sent as data.
        const server = this.deps.createServer({ logger, ...(config.volume ? { sparseReadThreshold: Number.POSITIVE_INFINITY } : {}) });
        disk.server = server;
        server.addExport({ name: config.nbd.export, volume: front, readOnly: config.readOnly, description: `${vm.name}/${config.name}` });
        await prepareSocket(config.nbd.socket, field('nbd.socket'));
        await server.listen({ unix: config.nbd.socket });
      }
      if (config.vhostUser && this.deps.createVhostServer) {
        step = field('vhostUser.socket');
        const vu = config.vhostUser;
        await prepareSocket(vu.socket, step);
        disk.vhost = await this.deps.createVhostServer({
          socket: vu.socket,
          volume: front,
          queues: vu.queues,
          readOnly: config.readOnly || volume.caps.readOnly,
          ...(vu.serial !== undefined ? { serial: vu.serial } : {}),
          logger: logger.child({ vhostUser: vu.socket }),
        });
      }
      if (this.deps.tcpServer && config.nbd) {
        step = 'tcp';
        disk.tcpExport = `${vm.name}/${config.name}`;
        this.deps.tcpServer.addExport({ name: disk.tcpExport, volume: front, readOnly: config.readOnly, description: disk.tcpExport });
      }
    } catch (e) {
      if (disk.tcpExport) await this.deps.tcpServer?.removeExport(disk.tcpExport).catch(() => {});
      await disk.vhost?.close().catch(() => {});
      await disk.server?.close().catch(() => {});
      if (cache) this.deps.cache?.forget(vm.name, config.name, cache);
      await below.close().catch(() => {});
      if (config.nbd && step !== field('nbd.socket')) await rm(config.nbd.socket, { force: true }).catch(() => {});
      const sock = step === field('vhostUser.socket') ? config.vhostUser?.socket : config.nbd?.socket;
      throw e instanceof RegistryError ? e : new RegistryError(500, `${step}: cannot serve on ${sock}: ${(e as Error).message}`);
    }
    vm.disks.set(config.name, disk);
    logger.info(
      { file: diskSource(config), size: volume.size, socket: config.nbd?.socket, export: config.nbd?.export, tcpExport: disk.tcpExport, vhostUser: config.vhostUser, readOnly: config.readOnly },
      'disk served',
    );
  }

  /** Serves one share over virtiofs; the guest mounts it with `mount -t virtiofs TAG TARGET`. */
  private async startShare(vm: Vm, config: ShareConfig, where: string): Promise<void> {
    if (!this.deps.createShareServer) throw new RegistryError(400, `${where}: this daemon cannot serve shares`);
    let share: RunningShare;
    try {
      // The VM's flow: its shares' requests and its disks' share one QoS allocation.
      share = await this.deps.createShareServer(vm.name, config, vm.flow ? { flow: vm.flow } : {});
    } catch (e) {
      const what = config.path !== undefined ? `path ${config.path}` : `dir ${config.dir}`;
      throw new RegistryError(e instanceof RegistryError ? e.status : 400, `${where}: cannot serve ${what}: ${(e as Error).message}`);
    }
    vm.shares.set(config.tag, share);
    this.deps.logger.info(
      { vm: vm.name, tag: config.tag, socket: config.socket, node: share.node, qemu: shareQemuArgs(config, vm.shares.size - 1).join(' '), mount: shareMountCommand(config) },
      'share served',
    );
  }

  /** Two shares (or a share and a disk) never share a socket. */
  private checkShareSockets(shares: ShareConfig[]): void {
    const inUse = this.socketsInUse();
    shares.forEach((sh, j) => {
      const owner = inUse.get(sh.socket);
      if (owner) throw new RegistryError(409, `shares[${j}].socket: socket ${sh.socket} is already used by ${owner}`);
    });
  }

  private async stopVm(vm: Vm): Promise<void> {
    const shares = [...vm.shares.values()];
    vm.shares.clear();
    await Promise.all(
      shares.map((sh) => sh.close().catch((e: unknown) => this.deps.logger.error({ vm: vm.name, share: sh.config.tag, err: e }, 'share did not stop cleanly'))),
    );
    const disks = [...vm.disks.values()];
    vm.disks.clear();
    await Promise.all(disks.map((d) => this.stopDisk(d)));
    if (vm.flow) this.deps.qos?.removeFlow(vm.flow);
  }

  /** Takes one disk down: TCP export, then its server (stops accepting, drains, flushes), then the volume. */
  private async stopDisk(d: Disk): Promise<void> {
    const log = d.logger;
    const sockets = diskSockets(d.config).map((s) => s.socket);
    log.info({ sockets }, 'disk stopping: draining requests');
    try {
      if (d.tcpExport) await this.deps.tcpServer?.removeExport(d.tcpExport);
    } catch (e) {
      log.error({ err: e }, 'removing the TCP export failed');
    }
    try {
      // removeExport first: it drains and disconnects the export's clients at once. close()
      // alone waits for net.Server's close callback, which (today) comes only after every
      // connection has ended, so a busy client would hold the shutdown until it gives up.
      if (d.server && d.config.nbd) {
        await d.server.removeExport(d.config.nbd.export);
        await d.server.close();
      }
    } catch (e) {
      log.error({ err: e }, 'closing the NBD server failed');
    }
    try {
      // Disconnects the front end: what it had submitted and not yet seen completed is left
      // to the flush below (through the shared OrderedVolume, it waits for those writes).
      await d.vhost?.close();
    } catch (e) {
      log.error({ err: e }, 'closing the vhost-user server failed');
    }
    try {
      await d.front.flush();
      log.info('disk flushed');
    } catch (e) {
      log.error({ err: e }, 'flush failed');
    }
    if (d.cache) {
      // Before a disk is detached its dirty cache is written back: the volume is complete
      // without this host (and the resolver's dirty record is cleared).
      try {
        const dirty = d.cache.stats().dirtyBytes;
        if (dirty > 0) log.info({ dirtyBytes: dirty }, 'writing back the dirty cache before detaching');
        await d.cache.drain();
      } catch (e) {
        log.error({ err: e }, 'cache write-back failed: the dirty data stays on the cache device and is written back at the next attach');
      }
      this.deps.cache?.forget(d.vm, d.config.name, d.cache);
    }
    try {
      await (d.cache ?? d.volume).close();
    } catch (e) {
      log.error({ err: e }, 'closing the volume failed');
    }
    await Promise.all(sockets.map((s) => rm(s, { force: true }).catch(() => {})));
    log.info({ sockets }, 'disk removed');
  }
}

function add(c: DiskCounters, e: Partial<DiskCounters> | undefined): void {
  if (!e) return;
  c.connections += e.connections ?? 0;
  c.inflight += e.inflight ?? 0;
  c.reads += e.reads ?? 0;
  c.writes += e.writes ?? 0;
  c.bytesRead += e.bytesRead ?? 0;
  c.bytesWritten += e.bytesWritten ?? 0;
  c.errors += e.errors ?? 0;
}

/** prepareSocket of lib/net with the control API's status: 409 when the path is taken. */
export async function prepareSocket(p: string, field = 'socket'): Promise<void> {
  try {
    await prepareNetSocket(p, field);
  } catch (e) {
    throw e instanceof SocketConflictError ? new RegistryError(409, e.message) : e;
  }
}
