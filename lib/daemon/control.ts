/**
 * The control API: HTTP + JSON on a local unix socket (mode 0600: only the daemon's user may
 * drive it). Off the data path; it reads counters and calls the registry.
 *
 *   GET    /v1/status                 daemon, VMs, disks, counters
 *   POST   /v1/vms                    body: one VM of the config schema   (400 bad, 409 duplicate)
 *   DELETE /v1/vms/:vm                drain, flush, remove sockets
 *   POST   /v1/vms/:vm/disks          body: one disk of the config schema
 *   DELETE /v1/vms/:vm/disks/:disk
 *   GET    /v1/vms/:vm/qos            the VM's service level and measured rates
 *   PUT    /v1/vms/:vm/qos            body: a qos object (replaces the VM's; {} = defaults)
 *   POST   /v1/paths/failback[?node=ID]  manual failback of healthy paths to storage nodes
 *   GET    /metrics                   Prometheus text format
 *
 * Relative paths in a request body are resolved against `?base=DIR` (the CLI sends the
 * directory of the file it read), else against the daemon's config directory.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { chmod, rm } from 'node:fs/promises';
import path from 'node:path';
import { ConfigError, parseDisk, parseQos, parseVm, type ResolveContext } from '../config/schema.js';
import type { Logger } from '../log.js';
import { renderQosMetrics } from '../qos/metrics.js';
import type { QosHostStatus } from '../qos/scheduler.js';
import { prepareSocket, RegistryError, type VmRegistry, type VmStatus } from './registry.js';
import { renderPathMetrics } from '../paths/metrics.js';
import type { PathStatus } from '../paths/path.js';
import { handleCacheRequest } from '../block/cache/control.js';
import type { CacheHost } from '../block/cache/host.js';
import { renderCacheMetrics } from '../block/cache/metrics.js';
import type { DeviceStats } from '../block/cache/device.js';
import type { BalloonStatus } from '../block/cache/balloon.js';

const MAX_BODY = 1024 * 1024;

export interface DaemonStatus {
  pid: number;
  version: string;
  startedAt: string;
  uptimeSeconds: number;
  control: string;
  /** The shared TCP listener's bound address (the first, when there are several). */
  tcp?: { host: string; port: number };
  /** Every address the shared TCP listener is bound to. */
  tcpAddresses?: Array<{ host: string; port: number }>;
  vms: VmStatus[];
  /** Paths to storage nodes (remote volumes), per node and path. */
  paths?: PathStatus[];
  /** The host-wide QoS scheduler (absent when QoS is disabled). */
  qos?: QosHostStatus;
  /** The host's cache device (absent without one). */
  cache?: DeviceStats & { device: string; host: string; balloon?: BalloonStatus };
}

export interface ControlDeps {
  logger: Logger;
  registry: VmRegistry;
  /** Anchors of requests' relative paths and default sockets. */
  resolve: ResolveContext;
  status: () => DaemonStatus;
  /** The host's cache device (the /v1/cache and /v1/vms/VM/disks/DISK/cache endpoints). */
  cache?: CacheHost;
  /** Manual failback (paths.failback: manual): healthy paths of `node` (all nodes when absent) take requests again. */
  failback?: (node?: string) => void;
}

class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

export class ControlServer {
  private readonly http: Server;
  private socketPath: string | undefined;

  constructor(private readonly deps: ControlDeps) {
    this.http = createServer((req, res) => {
      this.handle(req, res).catch((e: unknown) => this.fail(res, e));
    });
    // Local, trusted, small requests: keep-alive connections must not hold shutdown up.
    this.http.keepAliveTimeout = 1000;
  }

  async listen(socketPath: string): Promise<void> {
    await prepareSocket(socketPath, 'control');
    await new Promise<void>((resolve, reject) => {
      this.http.once('error', reject);
      // bind() happens synchronously inside listen(): a 0177 umask around it creates the
      // socket 0600, so there is no window where others may connect; chmod below to be sure.
      const umask = process.umask(0o177);
      try {
        this.http.listen(socketPath, () => {
          this.http.off('error', reject);
          resolve();
        });
      } finally {
        process.umask(umask);
      }
    });
    await chmod(socketPath, 0o600);
    this.socketPath = socketPath;
  }

  /** Stops accepting control requests and removes the socket. */
  async close(): Promise<void> {
    await new Promise<void>((resolve) => {
      this.http.close(() => resolve());
      this.http.closeIdleConnections();
    });
    if (this.socketPath) await rm(this.socketPath, { force: true });
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://vstore');
    const parts = url.pathname.split('/').filter(Boolean).map(decodeURIComponent);
    const method = req.method ?? 'GET';
    const { registry } = this.deps;
    this.deps.logger.debug({ method, path: url.pathname }, 'control request');

    if (parts[0] === 'metrics' && parts.length === 1) {
      if (method !== 'GET') throw new HttpError(405, 'use GET');
      const body = renderMetrics(this.deps.status());
      res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4; charset=utf-8' });
      res.end(body);
      return;
    }
    if (parts[0] !== 'v1') throw new HttpError(404, `no such endpoint: ${url.pathname}`);
    const [, coll, vm, sub, disk] = parts;
    const ctx = this.requestContext(url);

    if (coll === 'paths' && vm === 'failback' && parts.length === 3) {
      if (method !== 'POST') throw new HttpError(405, 'use POST');
      if (!this.deps.failback) throw new RegistryError(400, 'this daemon has no remote volumes');
      const node = url.searchParams.get('node') ?? undefined;
      this.deps.failback(node);
      return this.json(res, 200, { failback: node ?? 'all' });
    }
    if (coll === 'status' && parts.length === 2) {
      if (method !== 'GET') throw new HttpError(405, 'use GET');
      return this.json(res, 200, this.deps.status());
    }
    if (coll === 'vms' && parts.length === 2) {
      if (method === 'GET') return this.json(res, 200, registry.status());
      if (method !== 'POST') throw new HttpError(405, 'use GET or POST');
      const cfg = parseVm(await readJson(req), ctx);
      await registry.addVm(cfg);
      this.deps.logger.info({ vm: cfg.name }, 'VM added through the control API');
      return this.json(res, 201, registry.status().find((v) => v.name === cfg.name));
    }
    if (coll === 'vms' && vm !== undefined && parts.length === 3) {
      if (method !== 'DELETE') throw new HttpError(405, 'use DELETE');
      await registry.removeVm(vm);
      return this.json(res, 200, { removed: vm });
    }
    if (coll === 'vms' && vm !== undefined && sub === 'qos' && parts.length === 4) {
      if (method === 'GET') {
        const st = registry.status().find((v) => v.name === vm);
        if (!st) throw new RegistryError(404, `no VM "${vm}"`);
        if (!st.qos) throw new RegistryError(400, 'QoS is disabled on this daemon (qos.enabled: false)');
        return this.json(res, 200, st.qos);
      }
      if (method !== 'PUT') throw new HttpError(405, 'use GET or PUT');
      if (!registry.has(vm)) throw new RegistryError(404, `no VM "${vm}"`);
      return this.json(res, 200, registry.setQos(vm, parseQos(await readJson(req))));
    }
    if (coll === 'vms' && vm !== undefined && sub === 'disks' && parts.length === 4) {
      if (method !== 'POST') throw new HttpError(405, 'use POST');
      if (!registry.has(vm)) throw new RegistryError(404, `no VM "${vm}"`);
      const cfg = parseDisk(vm, await readJson(req), ctx);
      await registry.addDisk(vm, cfg);
      return this.json(res, 201, registry.status().find((v) => v.name === vm)?.disks.find((d) => d.name === cfg.name));
    }
    if (coll === 'vms' && vm !== undefined && sub === 'disks' && disk !== undefined && parts.length === 5) {
      if (method !== 'DELETE') throw new HttpError(405, 'use DELETE');
      await registry.removeDisk(vm, disk);
      return this.json(res, 200, { removed: `${vm}/${disk}` });
    }
    const cached = await handleCacheRequest(method, parts.slice(1), () => readJson(req), registry, this.deps.cache);
    if (cached) return this.json(res, cached.status, cached.body);
    throw new HttpError(404, `no such endpoint: ${method} ${url.pathname}`);
  }

  private requestContext(url: URL): ResolveContext {
    const base = url.searchParams.get('base');
    if (base !== null && !path.isAbsolute(base)) throw new HttpError(400, 'base: must be an absolute directory');
    return { baseDir: base ?? this.deps.resolve.baseDir, runDir: this.deps.resolve.runDir };
  }

  private json(res: ServerResponse, status: number, body: unknown): void {
    const text = JSON.stringify(body ?? null);
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
    res.end(text);
  }

  private fail(res: ServerResponse, e: unknown): void {
    let status = 500;
    let problems: string[] | undefined;
    if (e instanceof ConfigError) {
      status = 400;
      problems = e.problems;
    } else if (e instanceof RegistryError || e instanceof HttpError) {
      status = e.status;
    }
    const message = e instanceof Error ? e.message : String(e);
    if (status >= 500) this.deps.logger.error({ err: e }, 'control request failed');
    else this.deps.logger.warn({ status, error: message }, 'control request refused');
    if (res.headersSent) {
      res.destroy();
      return;
    }
    this.json(res, status, { error: message, ...(problems ? { problems } : {}) });
  }
}

async function readJson(req: IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const c of req) {
    n += (c as Buffer).length;
    if (n > MAX_BODY) throw new HttpError(413, `request body over ${MAX_BODY} bytes`);
    chunks.push(c as Buffer);
  }
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8')) as unknown;
  } catch (e) {
    throw new ConfigError([`request body is not valid JSON: ${(e as Error).message}`]);
  }
}

/** Escapes a Prometheus label value. */
function lv(s: string): string {
  return s.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');
}

/** Renders daemon and per-disk counters and gauges in the Prometheus text exposition format. */
export function renderMetrics(s: DaemonStatus): string {
  const out: string[] = [];
  const family = (name: string, type: 'counter' | 'gauge', help: string, rows: Array<[string, number]>): void => {
    out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
    for (const [labels, v] of rows) out.push(`${name}${labels} ${v}`);
  };
  family('vstore_uptime_seconds', 'gauge', 'Seconds since the daemon started.', [['', s.uptimeSeconds]]);
  family('vstore_vms', 'gauge', 'VMs served.', [['', s.vms.length]]);
  const disks = s.vms.flatMap((vm) => vm.disks.map((d) => ({ labels: `{vm="${lv(vm.name)}",disk="${lv(d.name)}"}`, d })));
  const per = (name: string, type: 'counter' | 'gauge', help: string, pick: (d: (typeof disks)[number]['d']) => number): void =>
    family(name, type, help, disks.map(({ labels, d }) => [labels, pick(d)]));
  per('vstore_disk_size_bytes', 'gauge', 'Size of the disk.', (d) => d.size);
  per('vstore_disk_read_only', 'gauge', '1 when the disk is served read-only.', (d) => (d.readOnly ? 1 : 0));
  per('vstore_disk_connections', 'gauge', 'Open NBD connections to the disk (unix socket and TCP).', (d) => d.connections);
  per('vstore_disk_inflight_requests', 'gauge', 'Requests being served.', (d) => d.inflight);
  per('vstore_disk_reads_total', 'counter', 'Read requests served.', (d) => d.reads);
  per('vstore_disk_writes_total', 'counter', 'Write requests served.', (d) => d.writes);
  per('vstore_disk_read_bytes_total', 'counter', 'Bytes read by clients.', (d) => d.bytesRead);
  per('vstore_disk_written_bytes_total', 'counter', 'Bytes written by clients.', (d) => d.bytesWritten);
  per('vstore_disk_errors_total', 'counter', 'Requests answered with an error.', (d) => d.errors);
  // virtiofs shares
  const shares = s.vms.flatMap((vm) => (vm.shares ?? []).map((sh) => ({ labels: `{vm="${lv(vm.name)}",share="${lv(sh.tag)}"}`, sh })));
  family('vstore_share_connected', 'gauge', '1 when a vhost-user-fs front end (QEMU) is connected to the share.', shares.map(({ labels, sh }) => [labels, sh.connected ? 1 : 0]));
  family('vstore_share_sessions_total', 'counter', 'FUSE sessions started on the share (guest mounts after connect or reset).', shares.map(({ labels, sh }) => [labels, sh.sessions]));
  family('vstore_share_requests_total', 'counter', 'FUSE requests answered on the share.', shares.map(({ labels, sh }) => [labels, sh.requests]));
  family('vstore_share_dropped_total', 'counter', 'Unusable request chains dropped by the share.', shares.map(({ labels, sh }) => [labels, sh.dropped]));
  // vhost-user-blk devices: only the disks that have one get rows
  const vu = disks.flatMap(({ labels, d }) => (d.vhostUser ? [{ labels, v: d.vhostUser }] : []));
  family('vstore_disk_vhost_user_connected', 'gauge', '1 when a vhost-user-blk front end (QEMU) is connected to the disk.', vu.map(({ labels, v }) => [labels, v.connected ? 1 : 0]));
  family('vstore_disk_vhost_user_connections_total', 'counter', 'vhost-user-blk front-end connections accepted.', vu.map(({ labels, v }) => [labels, v.connections]));
  family(
    'vstore_disk_vhost_user_requests_total',
    'counter',
    'vhost-user-blk requests completed, by virtio-blk status (ok, ioerr, unsupp), and dropped unanswered.',
    vu.flatMap(({ labels, v }) =>
      (['ok', 'ioerr', 'unsupp', 'dropped'] as const).map((k): [string, number] => [`${labels.slice(0, -1)},status="${k}"}`, v[k]]),
    ),
  );
  // Replicated volumes: one row per replica.
  const reps = disks.flatMap(({ d, labels }) =>
    (d.replication?.replicas ?? []).map((r) => ({ labels: `${labels.slice(0, -1)},replica="${lv(r.id)}"}`, r })),
  );
  family('vstore_replica_in_sync', 'gauge', '1 when the replica is in sync (0: out of sync or rebuilding).', reps.map(({ labels, r }) => [labels, r.state === 'in-sync' ? 1 : 0]));
  family('vstore_replica_up', 'gauge', '1 when the replica is reachable.', reps.map(({ labels, r }) => [labels, r.up ? 1 : 0]));
  const scs = reps.filter(({ r }) => r.shortCircuit !== undefined);
  family('vstore_remote_shortcircuit_reads_total', 'counter', 'Reads of the replica served by short-circuit (pread on the local volume file the node handed over) instead of NBD.', scs.map(({ labels, r }) => [labels, r.shortCircuit!.reads]));
  family('vstore_remote_shortcircuit_writes_total', 'counter', 'Writes to the replica done by short-circuit (pwrite on the local volume file the node handed over read-write) instead of NBD.', scs.map(({ labels, r }) => [labels, r.shortCircuit!.writes ?? 0]));
  family('vstore_remote_shortcircuit_active', 'gauge', '1 while the daemon holds a short-circuit descriptor of the replica (node on this host, replica in sync).', scs.map(({ labels, r }) => [labels, r.shortCircuit!.active ? 1 : 0]));
  family('vstore_replica_dirty_bytes', 'gauge', 'Bytes the replica missed (dirty-region log), to be resynced.', reps.map(({ labels, r }) => [labels, r.dirtyBytes]));
  family(
    'vstore_replica_resync_remaining_bytes',
    'gauge',
    'Bytes a running resync or rebuild still has to copy (0 when none runs).',
    reps.map(({ labels, r }) => [labels, r.resync ? r.resync.totalBytes - r.resync.doneBytes : 0]),
  );
  out.push(...renderPathMetrics(s));
  out.push(...renderQosMetrics(s));
  out.push(...renderCacheMetrics(s));
  return out.join('\n') + '\n';
}
