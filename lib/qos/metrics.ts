/**
 * QoS in the Prometheus exposition (GET /metrics) and in `vstore status`: per VM the settings,
 * measured rates (last ~1 s window), latency percentiles (same window; a summary with the
 * cumulative _sum and _count), queue depth, requests at the backends, throttled time and the
 * "migrate advised" flag; for the host the device depth and what is outstanding and queued.
 * Pure functions of the status object.
 */
import type { QosFlowStatus, QosHostStatus } from './scheduler.js';
import { describeQos, fmtBytes, fmtNum } from './settings.js';

interface StatusLike {
  vms: Array<{ name: string; qos?: QosFlowStatus }>;
  qos?: QosHostStatus;
}

function lv(s: string): string {
  return s.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');
}

export function renderQosMetrics(s: StatusLike): string[] {
  if (!s.qos) return [];
  const out: string[] = [];
  const family = (name: string, type: 'counter' | 'gauge' | 'summary', help: string, rows: Array<[string, number]>): void => {
    out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
    for (const [labels, v] of rows) out.push(`${name}${labels} ${v}`);
  };
  const h = s.qos;
  family('vstore_qos_device_depth', 'gauge', 'Requests the host-wide QoS scheduler lets be outstanding at the backends.', [['', h.depth]]);
  family('vstore_qos_outstanding_requests', 'gauge', 'Requests at the backends now (host-wide).', [['', h.outstanding]]);
  family('vstore_qos_queued_requests', 'gauge', 'Requests waiting in the QoS scheduler now (host-wide).', [['', h.queued]]);
  const vms = s.vms.flatMap((vm) => (vm.qos ? [{ l: `{vm="${lv(vm.name)}"}`, q: vm.qos }] : []));
  const per = (name: string, type: 'counter' | 'gauge', help: string, pick: (q: QosFlowStatus) => number | undefined): void =>
    family(
      name,
      type,
      help,
      vms.flatMap(({ l, q }) => {
        const v = pick(q);
        return v === undefined ? [] : [[l, v] as [string, number]];
      }),
    );
  const withLabel = (l: string, k: string, v: string): string => `${l.slice(0, -1)},${k}="${v}"}`;
  per('vstore_vm_qos_weight', 'gauge', 'QoS weight (share of spare capacity within the priority class).', (q) => q.settings.weight);
  family(
    'vstore_vm_qos_priority',
    'gauge',
    '1 for the VM priority class.',
    vms.map(({ l, q }) => [withLabel(l, 'class', q.settings.priority), 1]),
  );
  per('vstore_vm_qos_reservation_iops', 'gauge', 'Reserved requests per second (absent: none).', (q) => q.settings.reservation.iops);
  per('vstore_vm_qos_reservation_bytes_per_second', 'gauge', 'Reserved bytes per second (absent: none).', (q) => q.settings.reservation.bps);
  per('vstore_vm_qos_limit_iops', 'gauge', 'Limit in requests per second (absent: none).', (q) => q.settings.limit.iops);
  per('vstore_vm_qos_limit_bytes_per_second', 'gauge', 'Limit in bytes per second (absent: none).', (q) => q.settings.limit.bps);
  per('vstore_vm_qos_iops', 'gauge', 'Requests completed per second over the last window (~1 s).', (q) => round(q.iops));
  per('vstore_vm_qos_bytes_per_second', 'gauge', 'Bytes read and written per second over the last window (~1 s).', (q) => round(q.bps));
  family(
    'vstore_vm_qos_requests_total',
    'counter',
    'Requests completed through the QoS layer, by operation (read, write, other: flush, trim, zeroes).',
    vms.flatMap(({ l, q }) => [
      [withLabel(l, 'op', 'read'), q.reads],
      [withLabel(l, 'op', 'write'), q.writes],
      [withLabel(l, 'op', 'other'), q.others],
    ]),
  );
  family(
    'vstore_vm_qos_bytes_total',
    'counter',
    'Bytes moved through the QoS layer, by direction.',
    vms.flatMap(({ l, q }) => [
      [withLabel(l, 'op', 'read'), q.bytesRead],
      [withLabel(l, 'op', 'write'), q.bytesWritten],
    ]),
  );
  out.push('# HELP vstore_vm_qos_latency_seconds Request latency (QoS queueing + service): quantiles over the last window (~1 s), cumulative sum and count.');
  out.push('# TYPE vstore_vm_qos_latency_seconds summary');
  for (const { l, q } of vms) {
    out.push(`vstore_vm_qos_latency_seconds${withLabel(l, 'quantile', '0.5')} ${q.latency.p50}`);
    out.push(`vstore_vm_qos_latency_seconds${withLabel(l, 'quantile', '0.9')} ${q.latency.p90}`);
    out.push(`vstore_vm_qos_latency_seconds${withLabel(l, 'quantile', '0.99')} ${q.latency.p99}`);
    out.push(`vstore_vm_qos_latency_seconds_sum${l} ${q.latencySum}`);
    out.push(`vstore_vm_qos_latency_seconds_count${l} ${q.latencyCount}`);
  }
  per('vstore_vm_qos_queued_requests', 'gauge', 'Requests of the VM waiting in the QoS scheduler now.', (q) => q.queued);
  per('vstore_vm_qos_outstanding_requests', 'gauge', 'Requests of the VM at the backends now.', (q) => q.outstanding);
  per('vstore_vm_qos_throttled_seconds_total', 'counter', 'Time requests of the VM spent waiting in the QoS scheduler (summed over requests).', (q) => q.throttledSeconds);
  per('vstore_vm_qos_reservation_dispatches_total', 'counter', 'Requests dispatched because the VM reservation was due.', (q) => q.reservationDispatches);
  per('vstore_vm_qos_migrate_advised', 'gauge', '1 while the VM reservation has gone unmet on this host (with requests queued) for the advise time.', (q) => (q.migrateAdvised ? 1 : 0));
  per('vstore_vm_qos_migrate_advised_events_total', 'counter', 'Times "migrate advised" was raised for the VM.', (q) => q.migrateAdvisedEvents);
  return out;
}

function round(n: number): number {
  return Math.round(n * 10) / 10;
}

/** The QoS table of `vstore status` (empty when the daemon runs without QoS). */
export function renderQosTable(s: StatusLike, renderTable: (rows: string[][]) => string): string {
  if (!s.qos) return '';
  const vms = s.vms.filter((v) => v.qos);
  const h = s.qos;
  let out = `\nQoS: device depth ${h.depth}, outstanding ${h.outstanding}, queued ${h.queued}\n`;
  if (vms.length === 0) return out;
  const rows = [['VM', 'QOS', 'IOPS', 'BYTES/S', 'P50', 'P99', 'QUEUED', 'OUTSTANDING', 'THROTTLED', 'MIGRATE']];
  for (const vm of vms) {
    const q = vm.qos!;
    rows.push([
      vm.name,
      describeQos(q.settings),
      fmtNum(Math.round(q.iops)),
      `${fmtBytes(q.bps)}/s`,
      fmtLatency(q.latency.p50),
      fmtLatency(q.latency.p99),
      String(q.queued),
      String(q.outstanding),
      `${q.throttledSeconds.toFixed(1)}s`,
      q.migrateAdvised ? 'ADVISED' : q.reservationShortSeconds > 0 ? `short ${Math.round(q.reservationShortSeconds)}s` : '-',
    ]);
  }
  return out + renderTable(rows);
}

function fmtLatency(s: number): string {
  if (s === 0) return '-';
  if (s < 1e-3) return `${Math.round(s * 1e6)}us`;
  if (s < 1) return `${+(s * 1e3).toFixed(s < 0.01 ? 2 : 1)}ms`;
  return `${s.toFixed(2)}s`;
}
