/**
 * Per-VM service levels, resolved (defaults filled): what the scheduler reads. The config schema
 * (lib/config/schema.ts) validates what a file or a control request says and resolves it into
 * these shapes; a runtime change through the control API replaces a VM's settings wholesale.
 */

/** Priority classes, highest first. Spare capacity goes to a higher class strictly first. */
export const QOS_PRIORITIES = ['high', 'normal', 'low'] as const;
export type QosPriority = (typeof QOS_PRIORITIES)[number];

/** A rate in both dimensions; an absent one is not constrained. */
export interface QosRate {
  /** Requests per second. */
  iops?: number;
  /** Bytes per second. */
  bps?: number;
}

export interface QosLimit extends QosRate {
  /**
   * How far a VM that ran below its limit may run ahead of it: a token bucket of
   * `burstSeconds x limit` (requests and/or bytes), refilled while the VM is under its limit.
   * 0 (the default) is a strict limit: in any window of T seconds at most `limit x T` (+1 request).
   */
  burstSeconds: number;
}

export interface QosSettings {
  /** Served first while due, in every priority class (a guarantee the host is sized for). */
  reservation: QosRate;
  /** Never exceeded beyond the burst, even on an idle host. */
  limit: QosLimit;
  /** Shares of the spare capacity among VMs of the same priority class. */
  weight: number;
  priority: QosPriority;
}

/** The host-wide scheduler's knobs (the top-level `qos` block of the daemon config). */
export interface HostQosConfig {
  /** false: no QoS layer at all (the disk stack is as without this feature). */
  enabled: boolean;
  /** Requests outstanding at the backends, host-wide; more wait in the scheduler's queues. */
  depth: number;
  /** Bytes that cost as much as one request in the weight tags (cost = 1 + bytes / costUnit). */
  costUnit: number;
  /** A reservation unmet this long (seconds) while the VM had requests queued: "migrate advised". */
  adviseAfterSeconds: number;
}

export const DEFAULT_QOS: QosSettings = Object.freeze({
  reservation: Object.freeze({}),
  limit: Object.freeze({ burstSeconds: 0 }),
  weight: 1,
  priority: 'normal',
}) as QosSettings;

export const DEFAULT_HOST_QOS: HostQosConfig = Object.freeze({
  enabled: true,
  depth: 64,
  costUnit: 64 * 1024,
  adviseAfterSeconds: 30,
});

/** True when the settings constrain nothing (no reservation, no limit): the cheap path. */
export function unconstrained(s: QosSettings): boolean {
  return s.reservation.iops === undefined && s.reservation.bps === undefined && s.limit.iops === undefined && s.limit.bps === undefined;
}

/** One line for humans: `R 100/s L 500/s,10M/s burst 2s W 2 high`. */
export function describeQos(s: QosSettings): string {
  const rate = (r: QosRate): string =>
    [r.iops !== undefined ? `${fmtNum(r.iops)}/s` : '', r.bps !== undefined ? `${fmtBytes(r.bps)}/s` : ''].filter(Boolean).join(',');
  const parts: string[] = [];
  const r = rate(s.reservation);
  if (r) parts.push(`R ${r}`);
  const l = rate(s.limit);
  if (l) parts.push(`L ${l}${s.limit.burstSeconds ? ` burst ${s.limit.burstSeconds}s` : ''}`);
  parts.push(`W ${fmtNum(s.weight)}`, s.priority);
  return parts.join(' ');
}

export function fmtNum(n: number): string {
  if (n >= 1e6) return `${+(n / 1e6).toFixed(1)}M`;
  if (n >= 1e4) return `${+(n / 1e3).toFixed(1)}k`;
  return String(+n.toFixed(n < 10 ? 2 : 0));
}

export function fmtBytes(n: number): string {
  const units = ['B', 'K', 'M', 'G', 'T'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${+v.toFixed(v < 10 && i > 0 ? 1 : 0)}${units[i]}`;
}
