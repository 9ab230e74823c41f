/**
 * Remote disks: a disk whose `volume` names a replicated volume on storage nodes. This file turns
 * that config into a Volume stack — ReplicatedVolume over one RemoteVolume (NBD client) per
 * replica — through the resolver:
 *
 *   1. placeName: the record of the name, created on the nodes with the most free space when new;
 *   2. each replica's node is asked (RPC `volume.create`, idempotent) to have the volume, at the
 *      configured size (grown when the record is smaller);
 *   3. a RemoteVolume per replica; a replica whose node is unreachable now starts as "down" and
 *      joins (resync) when it comes up;
 *   4. ReplicatedVolume with a dirty-region log under stateDir and replica states persisted in a
 *      local state file (fsynced: the durable truth on this host) and in the resolver record (best
 *      effort: the resolver may be unreachable exactly when a replica fails).
 *
 * Multipath: every replica's RemoteVolume reaches its node over that node's paths in the daemon's
 * PathTable (one NodePaths per node, shared by all volumes on it: health, damping, failback), with
 * the VM's home path (affinity) and priority. When a disk has no reachable in-sync replica, the
 * VM's `onUnreachable` applies (lib/paths/suspend.ts): queue, fail after failAfterMs, or pause
 * the VM over QMP.
 *
 * Control plane only: nothing here is on the per-request path.
 */
import { EventEmitter } from 'node:events';
import { mkdir, open, readFile, rename } from 'node:fs/promises';
import path from 'node:path';
import { DirtyRegionLog } from '../block/drl.js';
import { VolumeError } from '../block/errors.js';
import { RemoteVolume } from '../block/remote.js';
import { ReplicatedVolume, type ReplicaVolume } from '../block/replicated.js';
import type { Extent, Volume, WriteOptions, ZeroOptions } from '../block/volume.js';
import type { DiskConfig, VmConfig, VolumeSpec } from '../config/schema.js';
import type { Logger } from '../log.js';
import { PathTable } from '../paths/node-paths.js';
import { DEFAULT_PATH_POLICY } from '../paths/policy.js';
import { SuspendGate, VmSuspender, type SuspendStatus } from '../paths/suspend.js';
import { QmpVmControl } from './qmp.js';
import { RpcClient } from '../rpc/index.js';
import type { NameRecord, NodeStatus, ReplicaState, ResolverStore } from '../resolver/types.js';
import { RegistryError, type ReplicationSource, type ReplicationStatus } from './registry.js';

/** The replicated layer as the daemon serves it: it also reports its replicas to `vstore status`. */
class ServedReplicatedVolume extends ReplicatedVolume implements ReplicationSource {
  private readonly volumeName: string;
  constructor(opts: ConstructorParameters<typeof ReplicatedVolume>[0]) {
    super(opts);
    this.volumeName = opts.name;
  }
  replicationStatus(): ReplicationStatus {
    return {
      name: this.volumeName,
      replicas: this.status().map((r) => ({
        id: r.id,
        state: r.state,
        up: r.up,
        dirtyBytes: r.dirtyBytes,
        ...(r.resync ? { resync: { doneBytes: r.resync.doneBytes, totalBytes: r.resync.totalBytes } } : {}),
        ...(r.shortCircuit ? { shortCircuit: r.shortCircuit } : {}),
      })),
    };
  }
}

export interface RemoteDisksDeps {
  resolver: ResolverStore;
  /** Where dirty-region logs and replica state files live. */
  stateDir: string;
  logger: Logger;
  /** How long a resolver update may take before the daemon goes on without it. Default 3 s. */
  resolverTimeoutMs?: number;
  /** The daemon's paths to storage nodes (default: a table with the default policy). */
  paths?: PathTable;
}

/** A disk volume that says whether its VM is suspended (`vstore status`). */
export interface SuspendSource {
  suspendStatus(): SuspendStatus | undefined;
}

/**
 * What the registry serves for a remote disk: the replicated volume, gated (pause) or not. It
 * reports the replicas and the VM's suspension, and leaves the VM's suspender on close.
 */
class ServedRemoteDisk extends SuspendGate implements ReplicationSource, SuspendSource {
  constructor(
    private readonly rep: ServedReplicatedVolume,
    private readonly suspender: VmSuspender | undefined,
    private readonly gated: boolean,
    private readonly onClose: () => void,
  ) {
    super(rep);
  }
  override replicationStatus(): ReplicationStatus {
    return this.rep.replicationStatus();
  }
  suspendStatus(): SuspendStatus | undefined {
    return this.suspender?.status();
  }
  override async close(): Promise<void> {
    this.onClose();
    await this.rep.close();
  }
  // Without pause, requests go straight to the replicated layer (no gate on the hot path).
  override read(offset: number, buf: Buffer): Promise<void> {
    return this.gated ? super.read(offset, buf) : this.rep.read(offset, buf);
  }
  override write(offset: number, buf: Buffer, opts?: WriteOptions): Promise<void> {
    return this.gated ? super.write(offset, buf, opts) : this.rep.write(offset, buf, opts);
  }
  override flush(): Promise<void> {
    return this.gated ? super.flush() : this.rep.flush();
  }
  override trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    return this.gated ? super.trim(offset, length, opts) : this.rep.trim(offset, length, opts);
  }
  override writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    return this.gated ? super.writeZeroes(offset, length, opts) : this.rep.writeZeroes(offset, length, opts);
  }
  override prefetch(offset: number, length: number): Promise<void> {
    return this.gated ? super.prefetch(offset, length) : this.rep.prefetch(offset, length);
  }
  override blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.gated ? super.blockStatus(offset, length) : this.rep.blockStatus(offset, length);
  }
}

/** File-name form of a volume name (`vm1/disk0` → `vm1%2Fdisk0`). */
function fileKey(name: string): string {
  return encodeURIComponent(name);
}

async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<T>((_, reject) => {
        t = setTimeout(() => reject(new Error(`${what}: no answer in ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(t);
  }
}

/** Writes a small JSON file atomically and durably (temp file, fsync, rename, fsync of the directory). */
export async function writeFileDurable(file: string, data: unknown): Promise<void> {
  await mkdir(path.dirname(file), { recursive: true });
  const tmp = `${file}.tmp`;
  const fh = await open(tmp, 'w', 0o600);
  try {
    await fh.writeFile(JSON.stringify(data, null, 2) + '\n');
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, file);
  const dir = await open(path.dirname(file), 'r');
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}

export class RemoteDisks {
  private readonly timeoutMs: number;
  readonly paths: PathTable;
  /** One suspender per VM with remote disks. */
  private readonly suspenders = new Map<string, { s: VmSuspender; control?: QmpVmControl }>();
  constructor(private readonly deps: RemoteDisksDeps) {
    this.timeoutMs = deps.resolverTimeoutMs ?? 3000;
    this.paths = deps.paths ?? new PathTable(DEFAULT_PATH_POLICY, deps.logger.child({ component: 'paths' }));
  }

  /** The VolumeOpener for disks with `volume`; `vm` gives the VM's affinity, priority and onUnreachable. */
  async open(disk: DiskConfig, vm?: VmConfig): Promise<Volume> {
    const spec = disk.volume;
    if (!spec) throw new Error(`disk ${disk.name} has no volume`);
    const log = this.deps.logger.child({ volume: spec.name });
    const resolver = this.deps.resolver;
    let record: NameRecord;
    let created: boolean;
    try {
      ({ record, created } = await resolver.placeName({ name: spec.name, kind: 'volume', size: spec.size, replicas: spec.replicas }));
    } catch (e) {
      const code = (e as { code?: string }).code;
      throw new RegistryError(code === 'EUNAVAIL' ? 503 : 400, `resolver: ${(e as Error).message}`);
    }
    if (record.kind !== 'volume') throw new RegistryError(409, `${spec.name} is a ${record.kind} in the resolver, not a volume`);
    log.info({ created, replicas: record.replicas.map((r) => `${r.node}:${r.state}`), size: record.size }, created ? 'volume placed' : 'volume found');

    const nodes = new Map<string, NodeStatus>();
    for (const r of record.replicas) {
      const n = await resolver.getNode(r.node);
      if (!n) throw new RegistryError(409, `replica on node ${r.node}, which the resolver does not know`);
      nodes.set(r.node, n);
    }
    // Make sure every reachable node has the volume at the configured size.
    const size = Math.max(record.size ?? spec.size, spec.size);
    await Promise.all(
      record.replicas.map(async (r) => {
        const n = nodes.get(r.node)!;
        if (n.control.length === 0) return; // a plain NBD server: the export is there or it is not
        try {
          await this.nodeCall(n, 'volume.create', { name: r.export ?? spec.name, size: record.size ?? spec.size });
          if (size > (record.size ?? 0)) await this.nodeCall(n, 'volume.grow', { name: r.export ?? spec.name, size });
        } catch (e) {
          if (created) throw new RegistryError(503, `node ${n.id}: cannot create ${spec.name}: ${(e as Error).message}`);
          log.warn({ node: n.id, err: (e as Error).message }, 'node unreachable while setting the volume up; the replica starts down');
        }
      }),
    );
    if (size > (record.size ?? 0)) {
      record = await this.updateRecord(spec.name, (r) => ({ ...r, size }), log).catch(() => ({ ...record, size }));
    }

    // States: the local state file wins over the resolver for out-of-sync marks (it is written
    // first, and the resolver may have been unreachable when a replica failed).
    const stateFile = path.join(this.deps.stateDir, 'volumes', `${fileKey(spec.name)}.state.json`);
    const local = await readFile(stateFile, 'utf8').then((t) => JSON.parse(t) as { states?: Record<string, ReplicaState> }, () => ({ states: {} as Record<string, ReplicaState> }));
    const states: Record<string, ReplicaState> = {};
    for (const r of record.replicas) {
      const l = local.states?.[r.node];
      states[r.node] = l && l !== 'in-sync' ? l : r.state;
    }

    const vmName = vm?.name;
    // pathPriority, else the VM's QoS priority class: a high-priority VM takes the least-loaded path.
    const priority = vm?.pathPriority ?? (vm?.qos?.priority === 'high' ? 'high' : 'normal');
    const replicas: ReplicaVolume[] = await Promise.all(
      record.replicas.map((r) => this.openReplica(nodes.get(r.node)!, r.export ?? spec.name, spec, size, log, vmName, priority)),
    );
    await mkdir(path.join(this.deps.stateDir, 'volumes'), { recursive: true, mode: 0o700 });
    const drl = await DirtyRegionLog.open(path.join(this.deps.stateDir, 'volumes', `${fileKey(spec.name)}.drl`), {
      size,
      replicaIds: replicas.map((r) => r.id),
    });
    const persistStates = async (s: Record<string, ReplicaState>): Promise<void> => {
      await writeFileDurable(stateFile, { name: spec.name, states: s, updated: new Date().toISOString() });
      // The resolver record follows, best effort: the local file is what this host trusts.
      void this.updateRecord(
        spec.name,
        (rec) => ({ ...rec, replicas: rec.replicas.map((r) => ({ ...r, state: s[r.node] ?? r.state })) }),
        log,
      ).catch((e: unknown) => log.warn({ err: (e as Error).message }, 'resolver: replica states not recorded (kept locally)'));
    };
    const replaceReplica = async (failed: string): Promise<ReplicaVolume> => {
      const cur = (await resolver.getName(spec.name)) ?? record;
      const [node] = await resolver.chooseNodes(1, { size, exclude: cur.replicas.map((r) => r.node) });
      if (!node) throw new Error('no node to rebuild on');
      await this.nodeCall(node, 'volume.create', { name: spec.name, size });
      const replica = await this.openReplica(node, spec.name, spec, size, log, vmName, priority);
      await this.updateRecord(
        spec.name,
        (rec) => ({ ...rec, replicas: rec.replicas.map((r) => (r.node === failed ? { node: node.id, state: 'rebuilding' as const } : r)) }),
        log,
      );
      log.warn({ failed, replacement: node.id }, 'replica replaced: rebuilding on another node');
      return replica;
    };
    const u = vm?.onUnreachable;
    // pause without a QMP socket cannot pause: it queues (warned once here).
    const action = u?.action === 'pause' && !vm?.qmp ? 'queue' : (u?.action ?? 'queue');
    if (u?.action === 'pause' && !vm?.qmp) log.warn({ vm: vmName }, 'onUnreachable pause needs vms[].qmp; requests queue instead');
    // queue/fail: the replicated layer's bounded wait is the queue, failAfterMs its bound.
    // pause: requests wait while the VM is being stopped, then go back to QEMU (suspend.ts).
    const waitMs = u?.failAfterMs ?? spec.waitTimeoutMs;
    const rep = new ServedReplicatedVolume({
      name: spec.name,
      replicas,
      states,
      drl,
      persistStates,
      replaceReplica,
      rebuildAfterMs: spec.rebuildAfterMs,
      waitMs,
      logger: log,
    });
    if (!vm) return rep;
    let entry = this.suspenders.get(vm.name);
    if (!entry) {
      const control = action === 'pause' && vm.qmp ? new QmpVmControl(vm.qmp) : undefined;
      entry = { s: new VmSuspender({ vm: vm.name, action, ...(control ? { control } : {}), logger: this.deps.logger.child({ component: 'suspend' }) }), ...(control ? { control } : {}) };
      this.suspenders.set(vm.name, entry);
    }
    const { s } = entry;
    const served = new ServedRemoteDisk(rep, s, action === 'pause', () => {
      s.removeDisk(disk.name);
      if (s.empty) {
        s.close();
        entry.control?.close();
        if (this.suspenders.get(vm.name) === entry) this.suspenders.delete(vm.name);
      }
    });
    s.addDisk({
      name: disk.name,
      reachable: () => rep.status().some((r) => r.state === 'in-sync' && r.up),
      ...(action === 'pause' ? { gate: served } : {}),
    });
    return served;
  }

  private async nodeCall(n: NodeStatus, method: string, params: unknown): Promise<unknown> {
    let last: unknown;
    for (const addr of n.control) {
      const c = new RpcClient(addr, { timeoutMs: 10_000, connectTimeoutMs: 2000 });
      try {
        return await c.call(method, params);
      } catch (e) {
        last = e;
        if ((e as { code?: string }).code !== 'ECONNREFUSED' && (e as { code?: string }).code !== 'ENOENT' && (e as { code?: string }).code !== 'ETIMEDOUT') throw e;
      } finally {
        c.close();
      }
    }
    throw last ?? new Error(`node ${n.id} has no control address`);
  }

  private async updateRecord(name: string, change: (r: NameRecord) => NameRecord, log: Logger): Promise<NameRecord> {
    const resolver = this.deps.resolver;
    for (let attempt = 0; ; attempt++) {
      const cur = await withTimeout(resolver.getName(name), this.timeoutMs, 'resolver');
      if (!cur) throw new Error(`${name} vanished from the resolver`);
      try {
        return await withTimeout(resolver.putName(change(cur)), this.timeoutMs, 'resolver');
      } catch (e) {
        if ((e as { code?: string }).code !== 'ESTALE' || attempt >= 5) throw e;
        log.debug('resolver: record changed under us, retrying');
      }
    }
  }

  private async openReplica(
    n: NodeStatus, exportName: string, spec: VolumeSpec, size: number, log: Logger, vm: string | undefined, priority: 'normal' | 'high',
  ): Promise<ReplicaVolume> {
    const opts = {
      id: n.id,
      addresses: n.nbd,
      export: exportName,
      connections: spec.connections,
      paths: this.paths.forNode(n.id, n.nbd),
      ...(vm !== undefined ? { vm } : {}),
      priority,
      shortCircuit: spec.shortCircuit ?? true,
      shortCircuitWrites: spec.shortCircuitWrites ?? spec.shortCircuit ?? true,
      logger: log.child({ replica: n.id }),
    };
    try {
      return await RemoteVolume.open(opts);
    } catch (e) {
      log.warn({ node: n.id, err: (e as Error).message }, 'replica unreachable at start; it joins when it comes up');
      return new PendingReplica(n.id, size, () => RemoteVolume.open(opts), log);
    }
  }
}

/**
 * A replica whose node could not be reached when the disk was set up: down (requests fail with
 * ESHUTDOWN, as a RemoteVolume that lost its connection) until a background connect succeeds,
 * then a plain pass-through to the RemoteVolume, emitting 'up'/'down' as it does.
 */
export class PendingReplica extends EventEmitter implements ReplicaVolume {
  private inner: RemoteVolume | null = null;
  private closed = false;
  /** The replicated layer's short-circuit switch, applied to the volume once connected. */
  private scAllowed = true;
  private timer: NodeJS.Timeout | null = null;
  private delay = 200;

  constructor(
    readonly id: string,
    readonly size: number,
    private readonly connect: () => Promise<RemoteVolume>,
    private readonly log: Logger,
  ) {
    super();
    this.schedule();
  }

  private schedule(): void {
    if (this.closed) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      this.connect().then(
        (v) => {
          if (this.closed) {
            void v.close();
            return;
          }
          if (v.size < this.size) {
            this.log.error({ replica: this.id, size: v.size, want: this.size }, 'replica came up smaller than the volume; ignored');
            void v.close();
            this.delay = Math.min(this.delay * 2, 5000);
            this.schedule();
            return;
          }
          this.inner = v;
          v.setShortCircuit(this.scAllowed);
          v.on('up', () => this.emit('up'));
          v.on('down', () => this.emit('down'));
          this.log.info({ replica: this.id }, 'replica reachable');
          this.emit('up');
        },
        () => {
          this.delay = Math.min(this.delay * 2, 5000);
          this.schedule();
        },
      );
    }, this.delay);
    this.timer.unref?.();
  }

  private get v(): Volume {
    if (!this.inner) throw new VolumeError('ESHUTDOWN', `replica ${this.id} not connected`);
    return this.inner;
  }
  get up(): boolean {
    return this.inner?.up ?? false;
  }
  get limits() {
    return this.inner?.limits ?? { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 };
  }
  get caps() {
    return (
      this.inner?.caps ?? {
        readOnly: false,
        flush: true,
        fua: true,
        trim: true,
        writeZeroes: true,
        fastZero: false,
        blockStatus: true,
        prefetch: false,
        multiConn: true,
      }
    );
  }
  async read(offset: number, buf: Buffer): Promise<void> {
    return this.v.read(offset, buf);
  }
  readLocal(offset: number, buf: Buffer): boolean {
    return this.inner?.readLocal(offset, buf) ?? false;
  }
  setShortCircuit(allowed: boolean): void {
    this.scAllowed = allowed;
    this.inner?.setShortCircuit(allowed);
  }
  shortCircuitStatus(): { active: boolean; reads: number; grants: number; writes?: number; writable?: boolean } | undefined {
    return this.inner?.shortCircuitStatus();
  }
  async write(offset: number, buf: Buffer, opts?: WriteOptions): Promise<void> {
    return this.v.write(offset, buf, opts);
  }
  async flush(): Promise<void> {
    return this.v.flush();
  }
  async trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    return this.v.trim(offset, length, opts);
  }
  async writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    return this.v.writeZeroes(offset, length, opts);
  }
  async prefetch(offset: number, length: number): Promise<void> {
    return this.v.prefetch(offset, length);
  }
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.v.blockStatus(offset, length);
  }
  async close(): Promise<void> {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    await this.inner?.close();
  }
}
