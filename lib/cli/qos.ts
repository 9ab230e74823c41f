/**
 * `vstore vm qos NAME [flags]`: show or change a running VM's service level (PUT /v1/vms/NAME/qos).
 * Flags change only what they name (the rest is kept, `--reset` starts from the defaults);
 * a rate of 0 (or `none`) removes it. The daemon validates; the new settings apply from the
 * scheduler's next dispatch.
 */
import type { Command } from 'commander';
import { parseSize } from '../config/schema.js';
import type { QosFlowStatus } from '../qos/scheduler.js';
import { describeQos, fmtBytes, fmtNum, type QosSettings } from '../qos/settings.js';
import { call, controlOption } from './client.js';

interface QosFlags {
  control: string;
  json: boolean;
  reset: boolean;
  reservationIops?: string;
  reservationBps?: string;
  limitIops?: string;
  limitBps?: string;
  burstSeconds?: string;
  weight?: string;
  priority?: string;
}

/** A rate flag: undefined (not given), null (remove: 0 or none), or the number. */
function rateFlag(v: string | undefined, bytes: boolean, flag: string): number | null | undefined {
  if (v === undefined) return undefined;
  if (v === '0' || v.toLowerCase() === 'none') return null;
  const n = bytes ? parseSize(v) : Number(v);
  if (n === undefined || !Number.isFinite(n) || n <= 0) throw new Error(`${flag}: not a ${bytes ? 'size (bytes/s, e.g. 100M)' : 'positive number'}: ${v}`);
  return n;
}

/** The qos object to PUT: `current` changed by the flags. */
export function applyQosFlags(current: QosSettings, f: Omit<QosFlags, 'control' | 'json'>): Record<string, unknown> {
  const base: QosSettings = f.reset ? { reservation: {}, limit: { burstSeconds: 0 }, weight: 1, priority: 'normal' } : current;
  const reservation: Record<string, number> = { ...base.reservation };
  const limit: Record<string, number> = { ...base.limit };
  const set = (o: Record<string, number>, k: string, v: number | null | undefined): void => {
    if (v === null) delete o[k];
    else if (v !== undefined) o[k] = v;
  };
  set(reservation, 'iops', rateFlag(f.reservationIops, false, '--reservation-iops'));
  set(reservation, 'bps', rateFlag(f.reservationBps, true, '--reservation-bps'));
  set(limit, 'iops', rateFlag(f.limitIops, false, '--limit-iops'));
  set(limit, 'bps', rateFlag(f.limitBps, true, '--limit-bps'));
  if (f.burstSeconds !== undefined) limit.burstSeconds = Number(f.burstSeconds);
  // the last limit removed takes its burst along (unless a burst was asked for: then the daemon says why not)
  else if (limit.iops === undefined && limit.bps === undefined) delete limit.burstSeconds;
  return {
    reservation,
    limit,
    weight: f.weight !== undefined ? Number(f.weight) : base.weight,
    priority: f.priority ?? base.priority,
  };
}

export function renderQosStatus(vm: string, q: QosFlowStatus): string {
  return (
    `VM ${vm}: ${describeQos(q.settings)}\n` +
    `  measured: ${fmtNum(Math.round(q.iops))} IOPS, ${fmtBytes(q.bps)}/s, p50 ${(q.latency.p50 * 1e3).toFixed(2)} ms, p99 ${(q.latency.p99 * 1e3).toFixed(2)} ms\n` +
    `  queued ${q.queued}, outstanding ${q.outstanding}, throttled ${q.throttledSeconds.toFixed(1)} s` +
    (q.migrateAdvised ? ', MIGRATE ADVISED (reservation unmet)' : '') +
    '\n'
  );
}

export function registerVmQos(vm: Command): void {
  vm.command('qos')
    .summary("show or change a VM's service level (reservation, limit, weight, priority)")
    .description(
      "show or change a running VM's service level: reservation (served first while due), limit (never exceeded beyond the burst), weight (share of spare capacity in its priority class) and priority class (high, normal, low: spare capacity goes to a higher class first). Without flags it prints the settings and measured rates. Flags change only what they name; a rate of 0 or none removes it; the change applies from the next request the scheduler dispatches",
    )
    .argument('<name>', 'VM name')
    .option('--reservation-iops <n>', 'reserved requests per second (0: none)')
    .option('--reservation-bps <size>', 'reserved bytes per second, e.g. 50M (0: none)')
    .option('--limit-iops <n>', 'limit in requests per second (0: none)')
    .option('--limit-bps <size>', 'limit in bytes per second, e.g. 200M (0: none)')
    .option('--burst-seconds <s>', 'seconds of limit a VM under its limit may spend at once (default 0: strict)')
    .option('--weight <w>', 'share of spare capacity (default 1)')
    .option('--priority <class>', 'high, normal or low')
    .option('--reset', 'start from the defaults instead of the current settings', false)
    .option('--json', 'print the VM qos status as JSON', false)
    .addOption(controlOption())
    .addHelpText(
      'after',
      `
Examples:
  $ vstore vm qos vm1
  $ vstore vm qos vm1 --limit-iops 500 --burst-seconds 2
  $ vstore vm qos vm1 --reservation-iops 200 --weight 4 --priority high
  $ vstore vm qos vm1 --limit-iops 0          remove the limit`,
    )
    .action(async (name: string, opts: QosFlags) => {
      const url = `/v1/vms/${encodeURIComponent(name)}/qos`;
      const current = await call<QosFlowStatus>(opts.control, 'GET', url);
      const changes = [opts.reservationIops, opts.reservationBps, opts.limitIops, opts.limitBps, opts.burstSeconds, opts.weight, opts.priority].some((v) => v !== undefined);
      const st = changes || opts.reset ? await call<QosFlowStatus>(opts.control, 'PUT', url, applyQosFlags(current.settings, opts)) : current;
      process.stdout.write(opts.json ? JSON.stringify(st, null, 2) + '\n' : renderQosStatus(name, st));
    });
}
