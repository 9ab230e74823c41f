/** Prometheus rows of the paths to storage nodes and of suspended VMs (rendered by the control API). */
import type { PathStatus } from './path.js';
import type { SuspendStatus } from './suspend.js';

/** Escapes a Prometheus label value. */
function lv(s: string): string {
  return s.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');
}

export function renderPathMetrics(s: { paths?: PathStatus[]; vms: Array<{ name: string; suspended?: SuspendStatus }> }): string[] {
  const out: string[] = [];
  const family = (name: string, type: 'counter' | 'gauge', help: string, rows: Array<[string, number]>): void => {
    out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
    for (const [labels, v] of rows) out.push(`${name}${labels} ${v}`);
  };
  const paths = (s.paths ?? []).map((p) => ({ labels: `{node="${lv(p.node)}",path="${lv(p.id)}"}`, p }));
  const per = (name: string, type: 'counter' | 'gauge', help: string, pick: (p: PathStatus) => number): void =>
    family(name, type, help, paths.map(({ labels, p }) => [labels, pick(p)]));
  family(
    'vstore_path_state',
    'gauge',
    '1 for the state the path to a storage node is in (up, failing, down).',
    paths.flatMap(({ labels, p }) => (['up', 'failing', 'down'] as const).map((st): [string, number] => [`${labels.slice(0, -1)},state="${st}"}`, p.state === st ? 1 : 0])),
  );
  per('vstore_path_inflight_requests', 'gauge', 'Requests in flight on the path.', (p) => p.inflight);
  per('vstore_path_service_time_seconds', 'gauge', 'EWMA of request service time on the path.', (p) => p.serviceTimeMs / 1000);
  // A summary as the VMs' vstore_vm_qos_latency_seconds: quantiles of the last window, cumulative sum and count.
  out.push('# HELP vstore_path_latency_seconds Service time of requests on the path: quantiles over the last window (~1 s), cumulative sum and count.');
  out.push('# TYPE vstore_path_latency_seconds summary');
  for (const { labels, p } of paths) {
    for (const [q, v] of [['0.5', p.latencyMs.p50], ['0.9', p.latencyMs.p90], ['0.99', p.latencyMs.p99]] as const) {
      out.push(`vstore_path_latency_seconds${labels.slice(0, -1)},quantile="${q}"} ${v / 1000}`);
    }
    out.push(`vstore_path_latency_seconds_sum${labels} ${p.latencySumMs / 1000}`);
    out.push(`vstore_path_latency_seconds_count${labels} ${p.latencyCount}`);
  }
  per('vstore_path_reads_total', 'counter', 'Read requests completed on the path.', (p) => p.reads);
  per('vstore_path_writes_total', 'counter', 'Write requests completed on the path.', (p) => p.writes);
  per('vstore_path_read_bytes_total', 'counter', 'Bytes read over the path.', (p) => p.bytesRead);
  per('vstore_path_written_bytes_total', 'counter', 'Bytes written over the path.', (p) => p.bytesWritten);
  per('vstore_path_errors_total', 'counter', 'Requests that failed on the path.', (p) => p.errors);
  per('vstore_path_failovers_total', 'counter', 'Requests that failed on the path and were retried on another.', (p) => p.failovers);
  per('vstore_path_downs_total', 'counter', 'Times the path went down.', (p) => p.downs);
  family(
    'vstore_vm_suspended',
    'gauge',
    '1 while a disk of the VM has no reachable replica (its I/O queued, or the VM paused).',
    s.vms.map((vm) => [`{vm="${lv(vm.name)}"}`, vm.suspended ? 1 : 0]),
  );
  family('vstore_vm_paused_by_vstore', 'gauge', '1 while the daemon holds the VM paused over QMP.', s.vms.map((vm) => [`{vm="${lv(vm.name)}"}`, vm.suspended?.paused ? 1 : 0]));
  return out;
}
