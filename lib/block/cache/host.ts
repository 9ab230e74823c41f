/**
 * The daemon's side of the cache: one CacheDevice per host (the configured file or block device,
 * opened with O_DIRECT where the device allows, through FileVolume and its io_uring engine), one
 * RAM tier, and a CacheVolume per disk, found by `VM/DISK` for the control API.
 *
 * Dirty-cache records: for a disk on a remote volume, the resolver's record of the volume carries
 * `dirtyHost` while this host holds dirty write-back data for it (set before the first dirty write
 * is acknowledged, cleared once everything is written back and that is durable here). Another
 * host refuses to open such a volume writable (`checkDirtyHost`) until then, or until an operator
 * drops the dirty data with `vstore cache invalidate --force` (which also clears the record).
 *
 * Capacity: every disk may use the whole device unless it has an allotment; `setAllotment` is
 * the runtime knob the balloon-style scheduler (balloon.ts, started here unless
 * `cache.balloon.enabled: false`) turns every interval for the disks of each VM, from the VMs'
 * shares (openDisk's `vmPolicy`); a disk with an explicit allotment keeps it and is left out.
 * The allocator enforces it at the next allocation, evicting the disk's own clean lines first.
 */
import { hostname } from 'node:os';
import type { Logger } from 'pino';
import { VolumeError } from '../errors.js';
import { FileVolume } from '../file.js';
import { RemoteVolume } from '../remote.js';
import { parseNbdUri } from '../../nbd/client.js';
import type { Volume } from '../volume.js';
import type { NameRecord, ResolverStore } from '../../resolver/types.js';
import { CacheDevice } from './device.js';
import { BalloonScheduler, DEFAULT_BALLOON, DEFAULT_VM_CACHE_POLICY, type BalloonSettings, type BalloonStatus, type VmCachePolicy } from './balloon.js';
import { CacheVolume, createRamTier, type CacheMode, type CacheStats, type RamTier } from './volume.js';

export interface HostCacheConfig {
  device: string;
  /**
   * O_DIRECT on the device (default false). Measured here (bench/cache.sh): guest buffers are
   * not aligned for O_DIRECT, so every request took two io_uring round trips (EINVAL, then the
   * buffered descriptor), and warm reads could not be served from the page cache; buffered I/O
   * with fdatasync at every commit keeps the same crash contract.
   */
  direct?: boolean;
  size?: number;
  lineSize?: number;
  ramBytes: number;
  host?: string;
  /** The capacity scheduler (default DEFAULT_BALLOON: on). */
  balloon?: BalloonSettings;
}

export interface DiskCacheSettings {
  mode?: CacheMode;
  maxDirtyBytes?: number;
  allotmentBytes?: number;
  fillWholeLines?: boolean;
}

/** Mode of a disk that names none. */
export const DEFAULT_DISK_MODE: CacheMode = 'write-through';

/** The host name recorded in `dirtyHost` (config `cache.host`, else the hostname). */
export function cacheHostId(cfg?: { host?: string }): string {
  return cfg?.host ?? hostname();
}

/**
 * Throws when another host holds dirty cache for the volume: opening it writable here would
 * read data older than what the guest wrote there.
 */
export async function checkDirtyHost(resolver: ResolverStore, volume: string, self: string): Promise<void> {
  const rec = await resolver.getName(volume).catch(() => null);
  if (rec?.dirtyHost && rec.dirtyHost !== self) {
    throw new VolumeError(
      'EBUSY',
      `host ${rec.dirtyHost} holds dirty cache for volume ${volume}: write it back there (vstore cache flush) or drop it (vstore cache invalidate --volume ${volume} --force)`,
    );
  }
}

/**
 * Records this host as the volume's last writer (compare-and-set, retried) and returns the host
 * recorded before (undefined: none yet, or a record from before the field).
 */
export async function claimWriter(resolver: ResolverStore, volume: string, self: string): Promise<string | undefined> {
  for (let attempt = 0; ; attempt++) {
    const cur = await resolver.getName(volume);
    if (!cur) throw new Error(`${volume} is not in the resolver`);
    if (cur.lastWriter === self) return self;
    try {
      await resolver.putName({ ...cur, lastWriter: self });
      return cur.lastWriter;
    } catch (e) {
      if ((e as { code?: string }).code !== 'ESTALE' || attempt >= 8) throw e;
    }
  }
}

/** Sets or clears `dirtyHost` on a volume's record (compare-and-set, retried). */
export async function setDirtyHost(resolver: ResolverStore, volume: string, host: string | null): Promise<void> {
  for (let attempt = 0; ; attempt++) {
    const cur = await resolver.getName(volume);
    if (!cur) throw new Error(`${volume} is not in the resolver`);
    if (host === null && cur.dirtyHost === undefined) return;
    if (host !== null && cur.dirtyHost === host) return;
    const next: NameRecord = { ...cur };
    if (host === null) delete next.dirtyHost;
    else next.dirtyHost = host;
    try {
      await resolver.putName(next);
      return;
    } catch (e) {
      if ((e as { code?: string }).code !== 'ESTALE' || attempt >= 8) throw e;
    }
  }
}

/** `{ balloon }` for the daemon's status (`cache.balloon`), empty when the scheduler is off. */
export function balloonOf(host: CacheHost): { balloon?: BalloonStatus } {
  const b = host.balloonStatus();
  return b ? { balloon: b } : {};
}

export interface CachedDiskInfo {
  vm: string;
  disk: string;
  volume: CacheVolume;
  /** An explicit allotment (config `cache.allotment`): the balloon leaves the disk alone. */
  fixedBytes?: number;
}

export class CacheHost {
  readonly hostId: string;
  private readonly disks = new Map<string, CachedDiskInfo>();
  /** Each VM's share of the device, as its last opened disk gave it. */
  private readonly vmPolicies = new Map<string, VmCachePolicy>();
  /** The capacity scheduler (absent: `cache.balloon.enabled: false`). */
  readonly balloon: BalloonScheduler | undefined;

  private constructor(
    readonly device: CacheDevice,
    private readonly ram: RamTier | undefined,
    private readonly logger: Logger,
    cfg: HostCacheConfig,
    private readonly resolver?: ResolverStore,
  ) {
    this.hostId = cacheHostId(cfg);
    const b = cfg.balloon ?? DEFAULT_BALLOON;
    if (b.enabled) {
      this.balloon = new BalloonScheduler(
        {
          capacityBytes: () => device.slots * device.lineSize,
          disks: () => [...this.disks.values()],
          policy: (vm) => this.vmPolicies.get(vm) ?? DEFAULT_VM_CACHE_POLICY,
        },
        b,
        device.lineSize,
        logger.child({ component: 'cache-balloon' }),
      );
      this.balloon.start();
    }
  }

  /** Opens (creating a file of `size` when missing) and replays the cache device. */
  static async open(cfg: HostCacheConfig, logger: Logger, resolver?: ResolverStore): Promise<CacheHost> {
    const create = cfg.size !== undefined ? { create: { size: cfg.size } } : {};
    let storage: Volume;
    if (/^nbds?(\+unix|\+tcp)?:\/\//.test(cfg.device)) {
      // A cache device served over NBD (an NVMe-oF-less remote SSD, or a test's nbdkit with
      // its error filter): errors it answers make the disks degrade like a local device's.
      storage = await RemoteVolume.open({ id: 'cache-device', addresses: [cfg.device], export: parseNbdUri(cfg.device).export ?? '', logger, timeoutMs: 10_000 });
    } else {
      try {
        storage = await FileVolume.open(cfg.device, { direct: cfg.direct ?? false, logger, ...create });
      } catch (e) {
        // tmpfs and some filesystems refuse O_DIRECT (EINVAL): buffered, synced by fdatasync.
        if ((e as { code?: string }).code !== 'EINVAL' || !cfg.direct) throw e;
        storage = await FileVolume.open(cfg.device, { logger, ...create });
      }
    }
    try {
      const device = await CacheDevice.open(storage, { ...(cfg.lineSize !== undefined ? { lineSize: cfg.lineSize } : {}), logger });
      return new CacheHost(device, cfg.ramBytes > 0 ? createRamTier(cfg.ramBytes) : undefined, logger, cfg, resolver);
    } catch (e) {
      await storage.close().catch(() => {});
      throw e;
    }
  }

  /** Volumes another host opened writable since this host last did (their cached lines are dropped at the next openDisk). */
  private readonly foreignWritten = new Set<string>();

  /**
   * Another host opened `volumeName` writable after this host did (the resolver's lastWriter):
   * whatever this device holds of it — clean lines that may predate that host's writes, and
   * dirty data an operator gave up with `invalidate --volume --force` — is dropped when the disk
   * is opened next, instead of being served or written back over the newer data.
   */
  markForeignWrites(volumeName: string): void {
    this.foreignWritten.add(volumeName);
  }

  /** The cache layer of one disk over its backing volume. `volumeName`: the resolver name, for dirty records. */
  async openDisk(vm: string, disk: string, key: string, backing: Volume, settings: DiskCacheSettings, volumeName?: string, vmPolicy?: VmCachePolicy): Promise<CacheVolume> {
    const log = this.logger.child({ vm, disk, cache: settings.mode ?? DEFAULT_DISK_MODE });
    const resolver = this.resolver;
    if (volumeName !== undefined && this.foreignWritten.delete(volumeName)) {
      const meta = this.device.disksByKey().get(key);
      if (meta && meta.lines.size > 0) {
        let dirty = 0;
        for (const slots of meta.lines.values()) for (const s of slots) if (this.device.slotEpoch[s]! > meta.epochDone) dirty += this.device.slotBytes(s);
        log.warn({ volume: volumeName, lines: meta.lines.size, droppedDirtyBytes: dirty }, 'cache: another host wrote this volume since this host cached it; dropping what the cache holds of it');
        await this.device.dropDisk(meta);
        // The RAM tier keeps line images of a disk closed earlier in this process: drop them too.
        if (this.ram) for (const k of [...this.ram.keys()]) if (k.startsWith(`${meta.id}:`)) this.ram.delete(k);
      }
    }
    const v = await CacheVolume.open({
      device: this.device,
      backing,
      key,
      mode: settings.mode ?? DEFAULT_DISK_MODE,
      ...(settings.maxDirtyBytes !== undefined ? { maxDirtyBytes: settings.maxDirtyBytes } : {}),
      ...(settings.allotmentBytes !== undefined ? { allotmentBytes: settings.allotmentBytes } : {}),
      ...(settings.fillWholeLines !== undefined ? { fillWholeLines: settings.fillWholeLines } : {}),
      ...(this.ram ? { ram: this.ram } : {}),
      logger: log,
      ...(resolver && volumeName
        ? {
            onDirtyChange: async (dirty: boolean) => {
              await setDirtyHost(resolver, volumeName, dirty ? this.hostId : null);
              log.info({ volume: volumeName, dirtyHost: dirty ? this.hostId : null }, dirty ? 'resolver: this host holds dirty cache for the volume' : 'resolver: dirty cache written back, record cleared');
            },
          }
        : {}),
    });
    this.disks.set(`${vm}/${disk}`, { vm, disk, volume: v, ...(settings.allotmentBytes !== undefined ? { fixedBytes: settings.allotmentBytes } : {}) });
    if (vmPolicy) this.vmPolicies.set(vm, vmPolicy);
    return v;
  }

  /**
   * Changes a VM's share of the cache at runtime (`PUT /v1/cache/balloon/VM`): the scheduler moves
   * its allotment toward the new target from its next step, at the configured rate. Not written to
   * the config file: a restart or a re-added VM takes the config's values again.
   */
  setVmPolicy(vm: string, policy: VmCachePolicy): void {
    if (![...this.disks.values()].some((d) => d.vm === vm)) throw Object.assign(new Error(`VM ${vm} has no cached disk`), { status: 404 });
    if (!(policy.shares > 0) || !Number.isFinite(policy.shares)) throw Object.assign(new Error('shares: a positive number'), { status: 400 });
    if (policy.minBytes !== undefined && policy.maxBytes !== undefined && policy.minBytes > policy.maxBytes) {
      throw Object.assign(new Error('min: must not be over max'), { status: 400 });
    }
    this.vmPolicies.set(vm, policy);
    this.logger.info({ vm, shares: policy.shares, minBytes: policy.minBytes, maxBytes: policy.maxBytes }, 'cache: VM share changed');
  }

  /** Forgets a disk (its CacheVolume was closed). */
  forget(vm: string, disk: string, v: CacheVolume): void {
    if (this.disks.get(`${vm}/${disk}`)?.volume === v) this.disks.delete(`${vm}/${disk}`);
    if (![...this.disks.values()].some((d) => d.vm === vm)) this.vmPolicies.delete(vm);
  }

  /** Targets and allotments per VM (GET /v1/cache/balloon); undefined when the scheduler is off. */
  balloonStatus(): BalloonStatus | undefined {
    return this.balloon?.status();
  }

  get(vm: string, disk: string): CacheVolume | undefined {
    return this.disks.get(`${vm}/${disk}`)?.volume;
  }

  list(): Array<{ vm: string; disk: string; stats: CacheStats }> {
    return [...this.disks.values()].map((d) => ({ vm: d.vm, disk: d.disk, stats: d.volume.stats() }));
  }

  /** Clears another host's dirty record of a volume (the operator dropped that data: `invalidate --volume --force`). */
  async clearDirtyRecord(volume: string): Promise<void> {
    if (!this.resolver) throw new VolumeError('EINVAL', 'this daemon has no resolver');
    await setDirtyHost(this.resolver, volume, null);
    this.logger.warn({ volume }, 'resolver: dirty cache record cleared by the operator (that host\'s dirty data is abandoned)');
  }

  async close(): Promise<void> {
    await this.balloon?.stop();
    await this.device.close();
  }
}
