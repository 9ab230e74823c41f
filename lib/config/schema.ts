/**
 * The daemon's config: the zod schema (what a file or a control request may say) and its
 * resolution (defaults filled, paths made absolute) into the shape the daemon uses.
 *
 * Objects are strict (a misspelt field is an error, not silently ignored). New kinds of things
 * (remote volumes, vhost-user sockets, shares, QoS, cache) are added as new optional fields of
 * these objects; the resolved types are what the daemon reads, so a default lives in one place.
 */
import path from 'node:path';
import { z } from 'zod';
import { DEFAULT_PATH_POLICY, SELECTORS, type FailbackPolicy, type PathPolicy } from '../paths/policy.js';
import { resolveShare, sharesSchema, type ShareConfig } from './shares.js';
import { DEFAULT_HOST_QOS, QOS_PRIORITIES, type HostQosConfig, type QosSettings } from '../qos/settings.js';
import { DEFAULT_BALLOON, type BalloonSettings, type VmCachePolicy } from '../block/cache/balloon.js';

/** Longest unix socket path (sun_path is 108 bytes with the terminating NUL). */
export const MAX_SOCKET_PATH = 107;
export const DEFAULT_RUN_DIR = '/run/vstore';
export const DEFAULT_TCP_PORT = 10809;
export const LOG_LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'] as const;

const UNITS: Record<string, number> = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40, P: 2 ** 50 };

/**
 * Parses a size: a number of bytes, or a string with an optional binary suffix
 * (`512`, `64K`, `1.5G`, `1GiB`, `10T`). Returns undefined when it is not one.
 */
export function parseSize(v: number | string): number | undefined {
  if (typeof v === 'number') return Number.isSafeInteger(v) && v > 0 ? v : undefined;
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$/i.exec(v);
  if (!m) return undefined;
  const bytes = Number(m[1]) * UNITS[m[2]!.toUpperCase()]!;
  return Number.isSafeInteger(bytes) && bytes > 0 ? bytes : undefined;
}

export const sizeSchema = z
  .union([z.number(), z.string()])
  .transform((v, ctx) => {
    const n = parseSize(v);
    if (n === undefined) {
      ctx.addIssue({ code: 'custom', message: `not a size: ${JSON.stringify(v)} (bytes, or a number with K, M, G, T suffix)` });
      return z.NEVER;
    }
    return n;
  });

/** VM and disk names: they become file names and export names, so no '/' and no leading dot. */
export const nameSchema = z
  .string()
  .min(1, 'must not be empty')
  .max(64, 'at most 64 characters')
  .regex(/^[A-Za-z0-9_][A-Za-z0-9._-]*$/, 'letters, digits, ".", "_" and "-" only, not starting with "." (no "/" or "..")');

const pathSchema = z.string().min(1, 'must not be empty');
const socketPathSchema = pathSchema.max(MAX_SOCKET_PATH, `unix socket paths are at most ${MAX_SOCKET_PATH} bytes`);

export const nbdDiskSchema = z.strictObject({
  /** Unix socket of this disk's NBD server; default `<runDir>/<vm>-<disk>.sock`. */
  socket: socketPathSchema.optional(),
  /** Export name on that socket; default '' (what `nbd:unix:PATH` reaches). */
  export: z.string().max(4096).optional(),
});

/** Most virtqueues a daemon disk's vhost-user-blk device offers. */
export const MAX_VHOST_QUEUES = 16;
/** virtio-blk's GET_ID answer is 20 bytes. */
export const MAX_VHOST_SERIAL_BYTES = 20;

export const vhostUserDiskSchema = z.strictObject({
  /** Unix socket of this disk's vhost-user-blk device; default `<runDir>/<vm>-<disk>.vhost.sock`. */
  socket: socketPathSchema.optional(),
  /** Virtqueues offered (QEMU's vhost-user-blk-pci num-queues); default 1. */
  queues: z.number().int('expected an integer').min(1, 'at least 1').max(MAX_VHOST_QUEUES, `at most ${MAX_VHOST_QUEUES}`).optional(),
  /** Device id the guest reads (VIRTIO_BLK_T_GET_ID); default "vstore". */
  serial: z
    .string()
    .refine((s) => Buffer.byteLength(s) <= MAX_VHOST_SERIAL_BYTES, `at most ${MAX_VHOST_SERIAL_BYTES} bytes (virtio-blk's device id)`)
    .optional(),
});

/** Most replicas a remote volume may have. */
export const MAX_REPLICAS = 5;

const msSchema = z.number().int('expected an integer (milliseconds)').min(0, 'must be >= 0');

export const volumeDiskSchema = z.strictObject({
  /** Name in the resolver; default `<vm>/<disk>`. */
  name: z.string().min(1).max(255).optional(),
  /** Size; the volume is created with it when the resolver does not know the name (and grown to it when smaller). */
  size: sizeSchema,
  /** Copies on distinct storage nodes; default 2. */
  replicas: z.number().int('expected an integer').min(1, 'at least 1').max(MAX_REPLICAS, `at most ${MAX_REPLICAS}`).optional(),
  /** With no replica reachable, I/O waits this long before failing with EIO; default 60000. */
  waitTimeoutMs: msSchema.optional(),
  /** A replica unreachable this long is rebuilt on another node; default 600000 (10 min). */
  rebuildAfterMs: msSchema.optional(),
  /** NBD connections per replica (used when the node advertises multi-conn); default 2. */
  connections: z.number().int().min(1).max(16).optional(),
  /**
   * Short-circuit local reads (HDFS's precedent): a replica whose node runs on this host (reached
   * over a unix socket) is read with pread on a read-only descriptor the node hands over, instead
   * of an NBD round trip. Default true (used when the node offers it); false turns it off.
   */
  shortCircuit: z.boolean().optional(),
  /**
   * Short-circuit local writes: the descriptor is read-write and in-sync local replicas are
   * written with pwrite/fdatasync instead of NBD. Default: as shortCircuit (docs/ARCHITECTURE.md
   * argues why); false keeps writes on NBD while reads stay local.
   */
  shortCircuitWrites: z.boolean().optional(),
});

/** Cache modes of a disk (lib/block/cache/volume.ts). */
export const CACHE_MODE_NAMES = ['write-back', 'write-through', 'write-around', 'pass-through'] as const;

/** A disk's use of the host's cache device (top-level `cache`). */
export const diskCacheSchema = z.strictObject({
  /** write-back | write-through | write-around | pass-through; default write-through. */
  mode: z.enum(CACHE_MODE_NAMES).optional(),
  /** Dirty bytes over which the disk's writers wait for write-back; default 1/4 of the device (at most 1G). */
  maxDirty: sizeSchema.optional(),
  /** Most cache space the disk may hold (the per-disk allotment); default: no bound but the device. */
  allotment: sizeSchema.optional(),
  /** A read miss on a line the cache holds nothing of fetches the whole line (one remote round trip per line); default false. */
  fillWholeLines: z.boolean().optional(),
});

/** The host's cache device (top-level `cache`): shared by every disk of the host. */
export const hostCacheSchema = z.strictObject({
  /** A file (created sparse with `size` when missing), a block device, or an NBD URI (nbd+unix:///EXPORT?socket=PATH, nbd://HOST/EXPORT). */
  device: pathSchema,
  size: sizeSchema.optional(),
  /** Cache line size for a fresh device (a power of two, 4K..1M); default 64K. */
  lineSize: sizeSchema
    .refine((n) => n >= 4096 && n <= 1024 * 1024 && (n & (n - 1)) === 0, 'a power of two from 4K to 1M')
    .optional(),
  /** RAM tier for hot lines, in bytes; default 64M (0: none). */
  ram: z.union([z.literal(0), sizeSchema]).optional(),
  /** This host's name in the resolver's dirty-cache records; default the hostname. */
  host: z.string().min(1).max(255).optional(),
  /** O_DIRECT on the cache device (default false: buffered, fdatasync at every commit). */
  direct: z.boolean().optional(),
  /** The balloon-style capacity scheduler (lib/block/cache/balloon.ts): VMs' allotments follow their shares and use. */
  balloon: z
    .strictObject({
      /** Default true. */
      enabled: z.boolean().optional(),
      /** Milliseconds between steps; default 1000. */
      interval: z.number().int('expected an integer (milliseconds)').min(10, 'at least 10').max(3_600_000, 'at most 3600000').optional(),
      /** Bytes per second a VM's allotment may move (`64M` is 64 MiB/s); default 64M. */
      rate: sizeSchema.optional(),
      /** 0..1: how much less space a VM does not use counts (VMware ESX's memory idle tax); default 0.5. */
      idleTax: z.number().min(0, 'must be >= 0').max(1, 'must be <= 1').optional(),
    })
    .optional(),
});

/** A VM's share of the host's cache device (the balloon scheduler's input). */
export const vmCacheSchema = z
  .strictObject({
    /** Relative share of the device; default 1. */
    shares: z.number().positive('must be > 0').max(10000, 'at most 10000').optional(),
    /** Least cache space the scheduler gives the VM. */
    min: sizeSchema.optional(),
    /** Most cache space the scheduler gives the VM. */
    max: sizeSchema.optional(),
  })
  .superRefine((c, ctx) => {
    if (c.min !== undefined && c.max !== undefined && c.min > c.max) ctx.addIssue({ code: 'custom', path: ['min'], message: `must not exceed max (${c.max})` });
  });

export const diskSchema = z.strictObject({
  name: nameSchema,
  /** Raw image file or block device (a local disk); or give `volume`. */
  file: pathSchema.optional(),
  /** A replicated volume on storage nodes, found through the resolver; or give `file`. */
  volume: volumeDiskSchema.optional(),
  /** Create the image (sparse) with this size when it does not exist. */
  size: sizeSchema.optional(),
  readOnly: z.boolean().optional(),
  /** Open with O_DIRECT (bypass the host page cache). */
  direct: z.boolean().optional(),
  /** The NBD server on its own socket (the default); `false` serves no NBD socket. */
  nbd: z.union([z.literal(false), nbdDiskSchema]).optional(),
  /** A vhost-user-blk device on its own socket, over the same volume as the NBD server. */
  vhostUser: vhostUserDiskSchema.optional(),
  /** How the disk uses the host's cache device (needs top-level cache). */
  cache: diskCacheSchema.optional(),
}).superRefine((d, ctx) => {
  if (d.nbd === false && d.vhostUser === undefined) {
    ctx.addIssue({ code: 'custom', path: ['nbd'], message: 'false leaves the disk with no socket: serve NBD, or add vhostUser' });
  }
  if (d.file === undefined && d.volume === undefined) ctx.addIssue({ code: 'custom', path: ['file'], message: 'required (or give volume)' });
  if (d.file !== undefined && d.volume !== undefined) ctx.addIssue({ code: 'custom', path: ['volume'], message: 'give either file or volume, not both' });
  if (d.volume !== undefined && d.size !== undefined) ctx.addIssue({ code: 'custom', path: ['size'], message: 'a volume has its size in volume.size' });
  if (d.volume !== undefined && d.direct !== undefined) ctx.addIssue({ code: 'custom', path: ['direct'], message: 'applies to a file only' });
});

function noDuplicates<T extends { name: string }>(items: T[], ctx: z.RefinementCtx, what: string): void {
  const seen = new Set<string>();
  items.forEach((it, i) => {
    if (seen.has(it.name)) ctx.addIssue({ code: 'custom', path: [i, 'name'], message: `duplicate ${what} name "${it.name}"` });
    seen.add(it.name);
  });
}

/** Requests per second: a positive number. */
const iopsSchema = z.number().positive('must be > 0').max(1e9, 'at most 1e9');
/** Bytes per second: a size (`100M` is 100 MiB/s). */
const bpsSchema = sizeSchema;

/** A VM's service level (lib/qos): all its disks share it. */
export const qosSchema = z
  .strictObject({
    /** Served first while due, whatever the priority class. */
    reservation: z.strictObject({ iops: iopsSchema.optional(), bps: bpsSchema.optional() }).optional(),
    /** Never exceeded beyond the burst. */
    limit: z
      .strictObject({
        iops: iopsSchema.optional(),
        bps: bpsSchema.optional(),
        /** Seconds of limit a VM under its limit may save up and spend at once; default 0 (strict). */
        burstSeconds: z.number().min(0, 'must be >= 0').max(3600, 'at most 3600').optional(),
      })
      .optional(),
    /** Share of spare capacity within the priority class; default 1. */
    weight: z.number().positive('must be > 0').max(10000, 'at most 10000').optional(),
    /** Priority class: spare capacity goes to high, then normal, then low; default normal. */
    priority: z.enum(QOS_PRIORITIES).optional(),
  })
  .superRefine((q, ctx) => {
    const r = q.reservation;
    const l = q.limit;
    for (const dim of ['iops', 'bps'] as const) {
      if (r?.[dim] !== undefined && l?.[dim] !== undefined && r[dim] > l[dim]) {
        ctx.addIssue({ code: 'custom', path: ['reservation', dim], message: `must not exceed limit.${dim} (${l[dim]})` });
      }
    }
    // (0 is the default, and what a resolved config says: it round-trips through GET then PUT)
    if (l?.burstSeconds && l.iops === undefined && l.bps === undefined) {
      ctx.addIssue({ code: 'custom', path: ['limit', 'burstSeconds'], message: 'needs limit.iops or limit.bps' });
    }
  });

/** The host-wide scheduler (top-level `qos`). */
export const hostQosSchema = z.strictObject({
  /** false: no QoS layer in any disk stack (per-VM qos is then refused). Default true. */
  enabled: z.boolean().optional(),
  /** Requests outstanding at the backends, host-wide; default 64. */
  depth: z.number().int('expected an integer').min(1, 'at least 1').max(65536, 'at most 65536').optional(),
  /** Bytes costing as much as one request in the weight shares; default 64K. */
  costUnit: sizeSchema.optional(),
  /** Seconds a reservation may go unmet (while requests are queued) before "migrate advised"; default 30. */
  adviseAfterSeconds: z.number().positive('must be > 0').max(86400).optional(),
});

/** `paths:` — multipath policy (lib/paths/policy.ts has the defaults and what each means). */
export const pathsSchema = z.strictObject({
  selector: z.enum(SELECTORS as [string, ...string[]]).optional(),
  /** immediate | manual | { delayMs } */
  failback: z.union([z.enum(['immediate', 'manual']), z.strictObject({ delayMs: msSchema })]).optional(),
  healthIntervalMs: msSchema.optional(),
  probeTimeoutMs: z.number().int().min(1).optional(),
  requestTimeoutMs: z.number().int().min(1).optional(),
  errorsToDown: z.number().int().min(1).max(1000).optional(),
  damping: z.strictObject({ holdMs: msSchema.optional(), maxHoldMs: msSchema.optional(), flapWindowMs: msSchema.optional() }).optional(),
  /** Local source addresses: one path per node address and source (several NICs). */
  sources: z.array(z.string().min(1)).optional(),
});

export function resolvePaths(p: z.output<typeof pathsSchema>): PathPolicy {
  const d = DEFAULT_PATH_POLICY;
  const fb: FailbackPolicy =
    p.failback === undefined ? d.failback : typeof p.failback === 'string' ? { mode: p.failback as 'immediate' | 'manual' } : { mode: 'delayed', ms: p.failback.delayMs };
  return {
    selector: (p.selector as PathPolicy['selector'] | undefined) ?? d.selector,
    failback: fb,
    healthIntervalMs: p.healthIntervalMs ?? d.healthIntervalMs,
    probeTimeoutMs: p.probeTimeoutMs ?? d.probeTimeoutMs,
    requestTimeoutMs: p.requestTimeoutMs ?? d.requestTimeoutMs,
    errorsToDown: p.errorsToDown ?? d.errorsToDown,
    damping: { holdMs: p.damping?.holdMs ?? d.damping.holdMs, maxHoldMs: p.damping?.maxHoldMs ?? d.damping.maxHoldMs, flapWindowMs: p.damping?.flapWindowMs ?? d.damping.flapWindowMs },
    sources: p.sources ?? [],
  };
}

/** The VM's multipath and suspend settings, resolved (absent fields stay absent). */
function resolveVmPaths(v: { qmp?: string | undefined; onUnreachable?: { action: 'queue' | 'pause' | 'fail'; failAfterMs?: number | undefined } | undefined; pathPriority?: 'normal' | 'high' | undefined }, ctx: ResolveContext): Pick<VmConfig, 'qmp' | 'onUnreachable' | 'pathPriority'> {
  const u = v.onUnreachable;
  return {
    ...(v.qmp !== undefined ? { qmp: path.resolve(ctx.baseDir, v.qmp) } : {}),
    ...(u ? { onUnreachable: { action: u.action, ...(u.failAfterMs !== undefined ? { failAfterMs: u.failAfterMs } : u.action === 'fail' ? { failAfterMs: 30_000 } : {}) } } : {}),
    ...(v.pathPriority !== undefined ? { pathPriority: v.pathPriority } : {}),
  };
}

export const vmSchema = z.strictObject({
  name: nameSchema,
  disks: z.array(diskSchema).superRefine((d, ctx) => noDuplicates(d, ctx, 'disk')).optional(),
  /** Shared directories over virtiofs (lib/config/shares.ts), started after the disks. */
  shares: sharesSchema.optional(),
  /** The VM's QMP socket (QEMU `-qmp unix:PATH,server=on,wait=off`): the daemon pauses and resumes the VM through it. */
  qmp: socketPathSchema.optional(),
  /** When a disk of the VM has no reachable replica (lib/paths/suspend.ts): queue (default), pause (needs qmp), fail. */
  onUnreachable: z
    .strictObject({ action: z.enum(['queue', 'pause', 'fail']), failAfterMs: msSchema.optional() })
    .optional(),
  /** Multipath: high takes the least-loaded path of a node instead of the VM's own (home) path. */
  pathPriority: z.enum(['normal', 'high']).optional(),
  /** Service level (lib/qos); default: no reservation, no limit, weight 1, normal. */
  qos: qosSchema.optional(),
  /** Share of the host's cache device (needs top-level cache); default shares 1, no min, no max. */
  cache: vmCacheSchema.optional(),
});

export const tlsSchema = z.strictObject({
  cert: pathSchema,
  key: pathSchema,
  ca: pathSchema.optional(),
  mode: z.enum(['on', 'require']).optional(),
});

export const tcpSchema = z.strictObject({
  host: z.string().min(1).optional(),
  port: z.number().int().min(0).max(65535).optional(),
});

const listenListSchema = z.array(z.string().min(1)).min(1, 'at least one address');

/** Where the daemon finds storage nodes: an external resolver (`url`), or one it embeds (`store`). */
export const resolverSchema = z
  .strictObject({
    /** `etcd://HOST:PORT[,HOST:PORT]`, or a resolver service (`unix:PATH`, `HOST:PORT`). */
    url: z.string().min(1).optional(),
    /** Embedded resolver: its JSON store file. */
    store: pathSchema.optional(),
    /** Embedded resolver: also serve it to storage nodes and other daemons on these addresses. */
    listen: listenListSchema.optional(),
  })
  .superRefine((r, ctx) => {
    if ((r.url === undefined) === (r.store === undefined)) ctx.addIssue({ code: 'custom', path: ['url'], message: 'give either url (an external resolver) or store (an embedded one)' });
    if (r.url !== undefined && r.listen !== undefined) ctx.addIssue({ code: 'custom', path: ['listen'], message: 'only an embedded resolver (store) is served' });
  });

/** A storage node run inside the daemon process (the single-machine default). */
export const embeddedNodeSchema = z.strictObject({
  id: z.string().regex(/^[A-Za-z0-9._-]{1,64}$/, '1-64 of A-Z a-z 0-9 . _ -'),
  data: pathSchema,
  /** NBD listen addresses (unix:PATH or HOST:PORT), one per path. */
  listen: listenListSchema,
  /** RPC control addresses; default unix:<data>/control.sock. */
  control: listenListSchema.optional(),
  zone: z.string().min(1).max(64).optional(),
});

export const configSchema = z
  .strictObject({
    runDir: pathSchema.optional(),
    /** Persistent state (dirty-region logs and replica states of remote volumes); default <runDir>/state. */
    stateDir: pathSchema.optional(),
    control: socketPathSchema.optional(),
    log: z.strictObject({ level: z.enum(LOG_LEVELS).optional() }).optional(),
    tcp: tcpSchema.optional(),
    tls: tlsSchema.optional(),
    resolver: resolverSchema.optional(),
    nodes: z.array(embeddedNodeSchema).optional(),
    /** Multipath to storage nodes (lib/paths): selector, failback, health checks, damping, source addresses. */
    paths: pathsSchema.optional(),
    vms: z.array(vmSchema).superRefine((v, ctx) => noDuplicates(v, ctx, 'VM')).optional(),
    qos: hostQosSchema.optional(),
    /** The local cache device shared by the host's disks (lib/block/cache). */
    cache: hostCacheSchema.optional(),
  })
  .superRefine((c, ctx) => {
    if (!c.cache) {
      c.vms?.forEach((vm, i) => {
        if (vm.cache) ctx.addIssue({ code: 'custom', path: ['vms', i, 'cache'], message: 'needs a cache device (top-level cache)' });
      });
      c.vms?.forEach((vm, i) =>
        vm.disks?.forEach((d, j) => {
          if (d.cache) ctx.addIssue({ code: 'custom', path: ['vms', i, 'disks', j, 'cache'], message: 'needs a cache device (top-level cache)' });
        }),
      );
    }
    if (c.qos?.enabled === false) {
      c.vms?.forEach((vm, i) => {
        if (vm.qos) ctx.addIssue({ code: 'custom', path: ['vms', i, 'qos'], message: 'QoS is disabled (qos.enabled: false at the top level)' });
      });
    }
    if (c.tls && !c.tcp) ctx.addIssue({ code: 'custom', path: ['tls'], message: 'needs tcp (TLS is offered on the TCP listener only)' });
    if (c.nodes?.length && !c.resolver) ctx.addIssue({ code: 'custom', path: ['nodes'], message: 'storage nodes need a resolver to register in' });
    const ids = new Set<string>();
    c.nodes?.forEach((n, i) => {
      if (ids.has(n.id)) ctx.addIssue({ code: 'custom', path: ['nodes', i, 'id'], message: `duplicate node id "${n.id}"` });
      ids.add(n.id);
    });
    if (!c.resolver) {
      c.vms?.forEach((vm, i) =>
        vm.disks?.forEach((d, j) => {
          if (d.volume) ctx.addIssue({ code: 'custom', path: ['vms', i, 'disks', j, 'volume'], message: 'a volume disk needs a resolver (top-level resolver)' });
        }),
      );
      c.vms?.forEach((vm, i) =>
        vm.shares?.forEach((sh, j) => {
          if (sh.path !== undefined) ctx.addIssue({ code: 'custom', path: ['vms', i, 'shares', j, 'path'], message: 'a share on a storage node needs a resolver (top-level resolver); or give dir' });
        }),
      );
    }
  });

export type DiskInput = z.input<typeof diskSchema>;
export type VmInput = z.input<typeof vmSchema>;
export type ConfigInput = z.input<typeof configSchema>;

/** A disk with every default filled and every path absolute. */
/** A remote, replicated volume with every default filled. */
export interface VolumeSpec {
  name: string;
  size: number;
  replicas: number;
  waitTimeoutMs: number;
  rebuildAfterMs: number;
  connections: number;
  /** Short-circuit local reads of replicas on this host (default true). */
  shortCircuit: boolean;
  /** Short-circuit local writes of in-sync replicas on this host (default: shortCircuit). */
  shortCircuitWrites: boolean;
}

export interface DiskConfig {
  name: string;
  /** The local image (absent for a remote volume). */
  file?: string;
  /** The remote volume (absent for a local image). */
  volume?: VolumeSpec;
  /** Size for creation when the file is missing (bytes). */
  size?: number;
  readOnly: boolean;
  direct: boolean;
  /** The NBD socket; absent with `nbd: false`. */
  nbd?: { socket: string; export: string };
  /** The vhost-user-blk socket; absent unless configured. */
  vhostUser?: { socket: string; queues: number; serial?: string };
  /** The disk's cache settings (absent: the daemon's default mode, when it has a cache device). */
  cache?: { mode?: (typeof CACHE_MODE_NAMES)[number]; maxDirtyBytes?: number; allotmentBytes?: number; fillWholeLines?: boolean };
}

export interface VmConfig {
  name: string;
  disks: DiskConfig[];
  /** Shared directories (virtiofs); empty when none. */
  shares: ShareConfig[];
  /** QMP socket of the VM (absolute). */
  qmp?: string;
  /** What happens when a disk of the VM has no reachable replica; absent: queue. */
  onUnreachable?: { action: 'queue' | 'pause' | 'fail'; failAfterMs?: number };
  pathPriority?: 'normal' | 'high';
  /** Absent: the defaults (DEFAULT_QOS of lib/qos/settings.ts). */
  qos?: QosSettings;
  /** The VM's share of the host's cache device; absent: shares 1. */
  cache?: VmCachePolicy;
}

export interface TlsConfig {
  cert: string;
  key: string;
  ca?: string;
  mode: 'on' | 'require';
}

export interface ResolverConfig {
  /** External resolver URL; absent when embedded. */
  url?: string;
  /** Embedded store file. */
  store?: string;
  listen: string[];
}

export interface EmbeddedNodeConfig {
  id: string;
  data: string;
  listen: string[];
  control: string[];
  zone?: string;
}

export interface DaemonConfig {
  runDir: string;
  stateDir: string;
  resolver?: ResolverConfig;
  nodes: EmbeddedNodeConfig[];
  control: string;
  log: { level: (typeof LOG_LEVELS)[number] };
  tcp?: { host: string; port: number };
  tls?: TlsConfig;
  vms: VmConfig[];
  /** Multipath policy of remote volumes (defaults of lib/paths/policy.ts filled). */
  paths?: PathPolicy;
  /** The host-wide scheduler; absent: DEFAULT_HOST_QOS. */
  qos?: HostQosConfig;
  /** The local cache device (absent: disks are not cached). */
  cache?: { device: string; size?: number; lineSize?: number; ramBytes: number; host?: string; direct?: boolean; balloon: BalloonSettings };
}

/** Where relative paths are anchored and where sockets go by default. */
export interface ResolveContext {
  /** Directory relative paths are resolved against (the config file's directory). */
  baseDir: string;
  /** Run directory (sockets); already absolute. */
  runDir: string;
}

/** The configuration error: every problem, each naming its field (`vms[0].disks[1].file: required`). */
export class ConfigError extends Error {
  constructor(
    readonly problems: string[],
    readonly source?: string,
  ) {
    // One line, whatever the number of problems: it is what the CLI prints.
    super(`${source ? `${source}: ` : ''}${problems.join('; ')}`);
    this.name = 'ConfigError';
  }
}

export function formatPath(p: ReadonlyArray<PropertyKey>, prefix = ''): string {
  let s = prefix;
  for (const k of p) {
    if (typeof k === 'number') s += `[${k}]`;
    else s += s ? `.${String(k)}` : String(k);
  }
  return s;
}

/** Turns zod issues into "field.path: message" lines. */
export function formatIssues(issues: ReadonlyArray<z.core.$ZodIssue>, prefix = ''): string[] {
  const out: string[] = [];
  for (const iss of issues) {
    if (iss.code === 'invalid_union') {
      // `nbd: false | {...}`: when exactly one branch got past the type check (an object with
      // a bad field), its issues are the ones that name the problem.
      const deep = iss.errors.filter((b) => !b.every((e) => e.path.length === 0 && (e.code === 'invalid_type' || e.code === 'invalid_value')));
      if (deep.length === 1) {
        out.push(...formatIssues(deep[0]!.map((e) => ({ ...e, path: [...iss.path, ...e.path] })), prefix));
        continue;
      }
    }
    if (iss.code === 'unrecognized_keys') {
      for (const k of iss.keys) out.push(`${formatPath([...iss.path, k], prefix)}: unknown field`);
      continue;
    }
    const where = formatPath(iss.path, prefix) || '(top level)';
    out.push(`${where}: ${iss.message}`);
  }
  return out;
}

/** zod's messages, made short: "required" for a missing field. */
const errorMap: z.core.$ZodErrorMap = (iss) => {
  if (iss.code === 'invalid_type' && iss.input === undefined) return 'required';
  if (iss.code === 'invalid_type') return `expected ${iss.expected}, got ${describe(iss.input)}`;
  return undefined;
};

function describe(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'a list';
  if (typeof v === 'object') return 'an object';
  return `${typeof v} ${JSON.stringify(v)}`;
}

/** Validates data against a schema, throwing ConfigError with field paths (prefixed by `prefix`). */
export function validate<S extends z.ZodType>(schema: S, data: unknown, opts: { prefix?: string; source?: string } = {}): z.output<S> {
  const r = schema.safeParse(data, { error: errorMap });
  if (!r.success) throw new ConfigError(formatIssues(r.error.issues, opts.prefix), opts.source);
  return r.data;
}

export function resolveDisk(vmName: string, d: z.output<typeof diskSchema>, ctx: ResolveContext): DiskConfig {
  const nbd = d.nbd === false ? undefined : d.nbd ?? {};
  const vu = d.vhostUser;
  const v = d.volume;
  return {
    name: d.name,
    ...(d.file !== undefined ? { file: path.resolve(ctx.baseDir, d.file) } : {}),
    ...(v
      ? {
          volume: {
            name: v.name ?? `${vmName}/${d.name}`,
            size: v.size,
            replicas: v.replicas ?? 2,
            waitTimeoutMs: v.waitTimeoutMs ?? 60_000,
            rebuildAfterMs: v.rebuildAfterMs ?? 600_000,
            connections: v.connections ?? 2,
            shortCircuit: v.shortCircuit ?? true,
            shortCircuitWrites: v.shortCircuitWrites ?? v.shortCircuit ?? true,
          },
        }
      : {}),
    ...(d.size !== undefined ? { size: d.size } : {}),
    readOnly: d.readOnly ?? false,
    direct: d.direct ?? false,
    ...(nbd
      ? { nbd: { socket: nbd.socket ? path.resolve(ctx.baseDir, nbd.socket) : path.join(ctx.runDir, `${vmName}-${d.name}.sock`), export: nbd.export ?? '' } }
      : {}),
    ...(vu
      ? {
          vhostUser: {
            socket: vu.socket ? path.resolve(ctx.baseDir, vu.socket) : path.join(ctx.runDir, `${vmName}-${d.name}.vhost.sock`),
            queues: vu.queues ?? 1,
            ...(vu.serial !== undefined ? { serial: vu.serial } : {}),
          },
        }
      : {}),
    ...(d.cache
      ? {
          cache: {
            ...(d.cache.mode !== undefined ? { mode: d.cache.mode } : {}),
            ...(d.cache.maxDirty !== undefined ? { maxDirtyBytes: d.cache.maxDirty } : {}),
            ...(d.cache.allotment !== undefined ? { allotmentBytes: d.cache.allotment } : {}),
            ...(d.cache.fillWholeLines !== undefined ? { fillWholeLines: d.cache.fillWholeLines } : {}),
          },
        }
      : {}),
  };
}

export function resolveVm(v: z.output<typeof vmSchema>, ctx: ResolveContext): VmConfig {
  return {
    name: v.name,
    ...resolveVmPaths(v, ctx),
    disks: (v.disks ?? []).map((d) => resolveDisk(v.name, d, ctx)),
    shares: (v.shares ?? []).map((sh) => resolveShare(v.name, sh, ctx)),
    ...(v.qos ? { qos: resolveQos(v.qos) } : {}),
    ...(v.cache ? { cache: { shares: v.cache.shares ?? 1, ...(v.cache.min !== undefined ? { minBytes: v.cache.min } : {}), ...(v.cache.max !== undefined ? { maxBytes: v.cache.max } : {}) } } : {}),
  };
}

/** A VM's qos block with the defaults filled. */
export function resolveQos(q: z.output<typeof qosSchema>): QosSettings {
  const rate = (r: { iops?: number | undefined; bps?: number | undefined } | undefined) => ({
    ...(r?.iops !== undefined ? { iops: r.iops } : {}),
    ...(r?.bps !== undefined ? { bps: r.bps } : {}),
  });
  return {
    reservation: rate(q.reservation),
    limit: { ...rate(q.limit), burstSeconds: q.limit?.burstSeconds ?? 0 },
    weight: q.weight ?? 1,
    priority: q.priority ?? 'normal',
  };
}

/** Validates and resolves a VM's qos block (a control request, `vstore vm qos`). */
export function parseQos(data: unknown, source?: string): QosSettings {
  return resolveQos(validate(qosSchema, data ?? {}, { source }));
}

/**
 * Checks what the schema cannot see field by field: resolved socket paths fit in sun_path and
 * no two disks share a socket (within `vms`, and against `taken`, the sockets already in use).
 */
export function checkResolved(
  vms: VmConfig[],
  prefixOf: (vm: number, disk: number) => string,
  taken = new Set<string>(),
  sharePrefixOf: (vm: number) => string = (i) => `vms[${i}].shares`,
): string[] {
  // Every socket of the request, in order: each disk's NBD and vhost-user sockets, then each share's.
  const entries: Array<{ where: string; field: string; socket: string; owner: string; takenBy: string }> = [];
  vms.forEach((vm, i) => {
    vm.disks.forEach((d, j) =>
      diskSockets(d).forEach(({ field, socket }) =>
        entries.push({ where: `${prefixOf(i, j)}.${field}`, field, socket, owner: `${vm.name}/${d.name}${field === 'nbd.socket' ? '' : ` (${field})`}`, takenBy: ' by another disk' }),
      ),
    );
  });
  vms.forEach((vm, i) =>
    vm.shares.forEach((sh, j) => entries.push({ where: `${sharePrefixOf(i)}[${j}].socket`, field: 'socket', socket: sh.socket, owner: `${vm.name} share ${sh.tag}`, takenBy: '' })),
  );
  const problems: string[] = [];
  const used = new Map<string, string>();
  for (const { where, field, socket, owner, takenBy } of entries) {
    if (Buffer.byteLength(socket) > MAX_SOCKET_PATH) {
      problems.push(`${where}: socket path ${socket} is longer than ${MAX_SOCKET_PATH} bytes (set ${field} or a shorter runDir)`);
    }
    const other = used.get(socket);
    if (other) problems.push(`${where}: socket ${socket} is also used by ${other}`);
    else if (taken.has(socket)) problems.push(`${where}: socket ${socket} is already in use${takenBy}`);
    used.set(socket, owner);
  }
  return problems;
}

/** What a disk's data is, for humans: the image path, or `volume NAME (N replicas)`. */
export function diskSource(d: DiskConfig): string {
  if (d.volume) return `volume ${d.volume.name} (${d.volume.replicas} replica${d.volume.replicas === 1 ? '' : 's'})`;
  return d.file ?? '?';
}

/** The unix sockets a resolved disk listens on, each with the config field that sets it. */
export function diskSockets(d: DiskConfig): Array<{ field: 'nbd.socket' | 'vhostUser.socket'; socket: string }> {
  return [
    ...(d.nbd ? [{ field: 'nbd.socket' as const, socket: d.nbd.socket }] : []),
    ...(d.vhostUser ? [{ field: 'vhostUser.socket' as const, socket: d.vhostUser.socket }] : []),
  ];
}

/** Validates and resolves a whole config document; `baseDir` anchors relative paths. */
export function parseConfig(data: unknown, baseDir: string, source?: string): DaemonConfig {
  const c = validate(configSchema, data ?? {}, { source });
  const runDir = path.resolve(baseDir, c.runDir ?? DEFAULT_RUN_DIR);
  const ctx: ResolveContext = { baseDir, runDir };
  const vms = (c.vms ?? []).map((v) => resolveVm(v, ctx));
  const control = c.control ? path.resolve(baseDir, c.control) : path.join(runDir, 'control.sock');
  const problems = checkResolved(vms, (i, j) => `vms[${i}].disks[${j}]`);
  if (Buffer.byteLength(control) > MAX_SOCKET_PATH) problems.push(`control: socket path ${control} is longer than ${MAX_SOCKET_PATH} bytes`);
  if (problems.length) throw new ConfigError(problems, source);
  const addr = (a: string): string => (a.startsWith('unix:') ? `unix:${path.resolve(baseDir, a.slice(5))}` : a);
  return {
    runDir,
    stateDir: path.resolve(baseDir, c.stateDir ?? path.join(runDir, 'state')),
    ...(c.resolver
      ? {
          resolver: {
            ...(c.resolver.url !== undefined ? { url: addr(c.resolver.url) } : {}),
            ...(c.resolver.store !== undefined ? { store: path.resolve(baseDir, c.resolver.store) } : {}),
            listen: (c.resolver.listen ?? []).map(addr),
          },
        }
      : {}),
    nodes: (c.nodes ?? []).map((n) => {
      const data = path.resolve(baseDir, n.data);
      return {
        id: n.id,
        data,
        listen: n.listen.map(addr),
        control: (n.control ?? [`unix:${path.join(data, 'control.sock')}`]).map(addr),
        ...(n.zone !== undefined ? { zone: n.zone } : {}),
      };
    }),
    control,
    log: { level: c.log?.level ?? 'info' },
    ...(c.paths ? { paths: resolvePaths(c.paths) } : {}),
    ...(c.qos
      ? {
          qos: {
            enabled: c.qos.enabled ?? DEFAULT_HOST_QOS.enabled,
            depth: c.qos.depth ?? DEFAULT_HOST_QOS.depth,
            costUnit: c.qos.costUnit ?? DEFAULT_HOST_QOS.costUnit,
            adviseAfterSeconds: c.qos.adviseAfterSeconds ?? DEFAULT_HOST_QOS.adviseAfterSeconds,
          },
        }
      : {}),
    ...(c.cache
      ? {
          cache: {
            device: /^nbds?(\+unix|\+tcp)?:\/\//.test(c.cache.device) ? c.cache.device : path.resolve(baseDir, c.cache.device),
            ...(c.cache.size !== undefined ? { size: c.cache.size } : {}),
            ...(c.cache.lineSize !== undefined ? { lineSize: c.cache.lineSize } : {}),
            ramBytes: c.cache.ram ?? 64 * 1024 * 1024,
            ...(c.cache.host !== undefined ? { host: c.cache.host } : {}),
            ...(c.cache.direct !== undefined ? { direct: c.cache.direct } : {}),
            balloon: {
              enabled: c.cache.balloon?.enabled ?? DEFAULT_BALLOON.enabled,
              intervalMs: c.cache.balloon?.interval ?? DEFAULT_BALLOON.intervalMs,
              rateBytesPerSec: c.cache.balloon?.rate ?? DEFAULT_BALLOON.rateBytesPerSec,
              idleTax: c.cache.balloon?.idleTax ?? DEFAULT_BALLOON.idleTax,
            },
          },
        }
      : {}),
    ...(c.tcp ? { tcp: { host: c.tcp.host ?? '127.0.0.1', port: c.tcp.port ?? DEFAULT_TCP_PORT } } : {}),
    ...(c.tls
      ? {
          tls: {
            cert: path.resolve(baseDir, c.tls.cert),
            key: path.resolve(baseDir, c.tls.key),
            ...(c.tls.ca ? { ca: path.resolve(baseDir, c.tls.ca) } : {}),
            mode: c.tls.mode ?? 'require',
          },
        }
      : {}),
    vms,
  };
}

/** Validates and resolves one VM object (a control request, `vstore vm add`). */
export function parseVm(data: unknown, ctx: ResolveContext, source?: string): VmConfig {
  const v = validate(vmSchema, data, { source });
  const vm = resolveVm(v, ctx);
  const problems = checkResolved([vm], (_i, j) => `disks[${j}]`, undefined, () => 'shares');
  if (problems.length) throw new ConfigError(problems, source);
  return vm;
}

/** Validates and resolves one disk object of VM `vmName` (a control request, `vstore disk add`). */
export function parseDisk(vmName: string, data: unknown, ctx: ResolveContext, source?: string): DiskConfig {
  const d = resolveDisk(vmName, validate(diskSchema, data, { source }), ctx);
  const problems = checkResolved([{ name: vmName, disks: [d], shares: [] }], () => 'disk');
  if (problems.length) throw new ConfigError(problems.map((p) => p.replace(/^disk\./, '')), source);
  return d;
}
