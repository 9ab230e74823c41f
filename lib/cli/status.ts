/** `vstore status`: the running daemon's VMs and disks, as a table or JSON. */
import type { Command } from 'commander';
import type { DaemonStatus } from '../daemon/control.js';
import type { BalloonStatus } from '../block/cache/balloon.js';
import { formatHostPort } from '../daemon/daemon.js';
import { renderQosTable } from '../qos/metrics.js';
import { call, controlOption } from './client.js';

export function formatBytes(n: number): string {
  const units = ['B', 'K', 'M', 'G', 'T', 'P'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1 && v % 1024 === 0) {
    v /= 1024;
    i++;
  }
  if (i === 0 && n >= 1024) {
    // not a round size: one decimal
    let j = 0;
    let f = n;
    while (f >= 1024 && j < units.length - 1) {
      f /= 1024;
      j++;
    }
    return `${f.toFixed(1)}${units[j]}`;
  }
  return `${v}${units[i]}`;
}

export function renderTable(rows: string[][]): string {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  return rows.map((r) => r.map((cell, c) => (c === r.length - 1 ? cell : cell.padEnd(widths[c]!))).join('  ')).join('\n') + '\n';
}

export function renderStatus(s: DaemonStatus): string {
  let out = `daemon pid ${s.pid}, version ${s.version}, up ${s.uptimeSeconds}s, control ${s.control}`;
  const tcp = s.tcpAddresses ?? (s.tcp ? [s.tcp] : []);
  if (tcp.length) out += `, TCP ${tcp.map((a) => formatHostPort(a.host, a.port)).join(', ')} (exports VM/DISK)`;
  out += `\n`;
  if (s.vms.length === 0) return out + 'no VMs\n';
  const vhost = s.vms.some((vm) => vm.disks.some((d) => d.vhostUser));
  const header = ['VM', 'DISK', 'SIZE', 'MODE', 'CONN', 'INFLIGHT', 'READS', 'WRITES', 'ERRORS', 'SOCKET', 'EXPORT'];
  // The vhost-user columns only when some disk has a vhost-user-blk socket.
  if (vhost) header.push('VHOST-USER', 'VU-CONN', 'VU-REQS', 'VU-ERRORS');
  // The replica column only when some disk is a replicated volume.
  const replicated = s.vms.some((vm) => vm.disks.some((d) => d.replication));
  if (replicated) header.push('REPLICAS');
  header.push('FILE');
  const rows = [header];
  for (const vm of s.vms) {
    if (vm.disks.length === 0) rows.push([vm.name, '-', ...header.slice(2).map(() => '')]);
    for (const d of vm.disks) {
      rows.push([
        vm.name,
        d.name,
        formatBytes(d.size),
        d.readOnly ? 'ro' : 'rw',
        String(d.connections),
        String(d.inflight),
        String(d.reads),
        String(d.writes),
        String(d.errors),
        d.socket || '-',
        d.socket ? JSON.stringify(d.export) : '-',
        ...(vhost ? vhostCells(d) : []),
        ...(replicated ? [replicaCell(d)] : []),
        d.file,
      ]);
    }
  }
  return out + renderTable(rows) + renderShares(s) + renderQosTable(s, renderTable) + renderCache(s) + renderPaths(s);
}

/** The cached disks: mode, hit ratio, dirty bytes, write-back rate, evictions (when the daemon has a cache device). */
export function renderCache(s: DaemonStatus): string {
  const disks = s.vms.flatMap((vm) => vm.disks.flatMap((d) => (d.cache ? [{ name: `${vm.name}/${d.name}`, c: d.cache }] : [])));
  if (!s.cache || disks.length === 0) return '';
  const rows = [['CACHE', 'MODE', 'HIT%', 'USED', 'DIRTY', 'WB-RATE', 'EVICTIONS', 'STATE']];
  for (const { name, c } of disks) {
    rows.push([name, c.mode, (c.hitRatio * 100).toFixed(1), formatBytes(c.usedBytes), formatBytes(c.dirtyBytes), `${formatBytes(Math.round(c.writeBackRate))}/s`, String(c.evictions), c.degraded ? 'DEGRADED' : 'ok']);
  }
  return `\ncache device ${s.cache.device} (host ${s.cache.host}): ${s.cache.slots} lines of ${formatBytes(s.cache.lineSize)}, ${s.cache.freeSlots} free\n` + renderTable(rows) + (s.cache.balloon ? renderBalloon(s.cache.balloon) : '');
}

/** The capacity scheduler's view per VM: shares, min/max, target, allotment (actual), used, hit ratio, activity. */
export function renderBalloon(b: BalloonStatus): string {
  if (b.vms.length === 0) return '';
  const rows = [['VM', 'SHARES', 'MIN', 'MAX', 'TARGET', 'ALLOTMENT', 'USED', 'HIT%', 'ACTIVE%', 'IO/S', 'NOTE']];
  for (const v of b.vms) {
    rows.push([
      v.vm,
      String(v.shares),
      v.minBytes !== undefined ? formatBytes(v.minBytes) : '-',
      v.maxBytes !== undefined ? formatBytes(v.maxBytes) : '-',
      formatBytes(v.targetBytes),
      formatBytes(v.allotmentBytes),
      formatBytes(v.usedBytes),
      (v.hitRatio * 100).toFixed(1),
      (v.activeFraction * 100).toFixed(0),
      `${formatBytes(Math.round(v.activityBytesPerSec))}/s`,
      v.draining ? 'writing back before shrinking' : '',
    ]);
  }
  return `cache balloon: ${formatBytes(b.capacityBytes)} shared, rate ${formatBytes(b.rateBytesPerSec)}/s, every ${b.intervalMs} ms, idle tax ${b.idleTax}\n` + renderTable(rows);
}

/** The VMs' shared directories (virtiofs), when there are any. */
export function renderShares(s: DaemonStatus): string {
  const shares = s.vms.flatMap((vm) => (vm.shares ?? []).map((sh) => ({ vm: vm.name, ...sh })));
  if (shares.length === 0) return '';
  const rows = [['VM', 'SHARE', 'MODE', 'CONNECTED', 'SESSIONS', 'REQUESTS', 'DROPPED', 'SOCKET', 'SOURCE', 'GUEST MOUNT']];
  for (const sh of shares) {
    rows.push([sh.vm, sh.tag, sh.readOnly ? 'ro' : 'rw', sh.connected ? 'yes' : 'no', String(sh.sessions), String(sh.requests), String(sh.dropped), sh.socket, sh.source, sh.mount]);
  }
  return '\n' + renderTable(rows);
}

/** Suspended VMs, then the paths to storage nodes (only when there are remote volumes). */
export function renderPaths(s: DaemonStatus): string {
  let out = '';
  for (const vm of s.vms) {
    const u = vm.suspended;
    if (!u) continue;
    out += `VM ${vm.name} SUSPENDED since ${u.since}: no reachable replica for ${u.disks.join(', ')}; ${u.paused ? 'paused over QMP by vstore' : u.action === 'fail' ? 'requests fail after failAfterMs' : 'requests queued'}\n`;
  }
  const ps = s.paths ?? [];
  if (ps.length === 0) return out;
  const rows = [['NODE', 'PATH', 'STATE', 'INFLIGHT', 'SVC-MS', 'P50-MS', 'P99-MS', 'READS', 'WRITES', 'READ', 'WRITTEN', 'ERRORS', 'FAILOVERS', 'DOWNS', 'VMS', 'NOTE']];
  for (const p of ps) {
    const note = p.heldUntil ? `held ${Math.max(0, Math.ceil((p.heldUntil - Date.now()) / 1000))}s (flapping)` : p.awaitingFailback ? 'healthy, awaiting failback' : (p.reason ?? '');
    rows.push([p.node, p.id, p.state, String(p.inflight), p.serviceTimeMs.toFixed(2), fmtMs(p.latencyMs?.p50), fmtMs(p.latencyMs?.p99), String(p.reads), String(p.writes), formatBytes(p.bytesRead), formatBytes(p.bytesWritten), String(p.errors), String(p.failovers), String(p.downs), p.vms.join(',') || '-', note]);
  }
  return out + renderTable(rows);
}

/** A percentile in ms ('-': no request in the last window, or a daemon too old to say). */
function fmtMs(ms: number | undefined): string {
  return !ms ? '-' : ms.toFixed(ms < 0.1 ? 3 : 2);
}

/** Each replica as NODE:STATE, with `down`, dirty bytes and resync progress when there are any. */
export function replicaCell(d: DaemonStatus['vms'][number]['disks'][number]): string {
  const r = d.replication;
  if (!r) return '-';
  return r.replicas
    .map((x) => {
      let c = `${x.id}:${x.state}`;
      if (!x.up) c += '(down)';
      if (x.resync) c += `(resync ${x.resync.totalBytes ? Math.floor((100 * x.resync.doneBytes) / x.resync.totalBytes) : 100}%)`;
      else if (x.dirtyBytes > 0) c += `(${formatBytes(x.dirtyBytes)} dirty)`;
      return c;
    })
    .join(' ');
}

/** Socket, front end connected (and connections so far), requests completed, errors and drops. */
function vhostCells(d: DaemonStatus['vms'][number]['disks'][number]): string[] {
  const v = d.vhostUser;
  if (!v) return ['-', '', '', ''];
  return [v.socket, `${v.connected ? 1 : 0}/${v.connections}`, String(v.ok + v.ioerr + v.unsupp), String(v.ioerr + v.unsupp + v.dropped)];
}

export function registerStatus(program: Command): void {
  program
    .command('status')
    .summary("show the running daemon's VMs, disks and counters")
    .description("show the running daemon's VMs and disks: size, mode, connections, in-flight requests, counters, socket, export, vhost-user-blk socket and counters (when a disk has one), replica states, dirty bytes and resync progress (for a replicated volume) and file or volume; the cache (per disk, and per VM the balloon scheduler's shares, target and allotment); then suspended VMs and the paths to storage nodes (state, in flight, service time: EWMA and p50/p99 of the last second, counters, failovers)")
    .addOption(controlOption())
    .option('--json', 'print the raw status object (GET /v1/status) as JSON', false)
    .addHelpText(
      'after',
      `
Examples:
  $ vstore status
  $ vstore status --control .state/run/control.sock --json`,
    )
    .action(async (opts: { control: string; json: boolean }) => {
      const s = await call<DaemonStatus>(opts.control, 'GET', '/v1/status');
      process.stdout.write(opts.json ? JSON.stringify(s, null, 2) + '\n' : renderStatus(s));
    });
}
