/** Prometheus families of the cache layer, one row per cached disk (and the device's). */
import type { CacheStats } from './volume.js';
import type { DeviceStats } from './device.js';
import type { BalloonStatus } from './balloon.js';

interface StatusLike {
  vms: Array<{ name: string; disks: Array<{ name: string; cache?: CacheStats }> }>;
  cache?: DeviceStats & { device: string; balloon?: BalloonStatus };
}

function lv(s: string): string {
  return s.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');
}

export function renderCacheMetrics(s: StatusLike): string[] {
  const out: string[] = [];
  if (!s.cache) return out;
  const family = (name: string, type: 'counter' | 'gauge', help: string, rows: Array<[string, number]>): void => {
    out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
    for (const [labels, v] of rows) out.push(`${name}${labels} ${v}`);
  };
  const dev = `{device="${lv(s.cache.device)}"}`;
  family('vstore_cache_device_slots', 'gauge', 'Cache lines the device holds.', [[dev, s.cache.slots]]);
  family('vstore_cache_device_free_slots', 'gauge', 'Cache lines free for allocation.', [[dev, s.cache.freeSlots]]);
  family('vstore_cache_device_commits_total', 'counter', 'Metadata commits (journal or checkpoint, each fdatasync).', [[dev, s.cache.commits]]);
  const disks = s.vms.flatMap((vm) => vm.disks.flatMap((d) => (d.cache ? [{ l: `{vm="${lv(vm.name)}",disk="${lv(d.name)}"}`, c: d.cache }] : [])));
  const per = (name: string, type: 'counter' | 'gauge', help: string, pick: (c: CacheStats) => number): void => family(name, type, help, disks.map(({ l, c }) => [l, pick(c)]));
  per('vstore_cache_read_hit_bytes_total', 'counter', 'Bytes read that the cache served (device or RAM).', (c) => c.readHitBytes);
  per('vstore_cache_read_miss_bytes_total', 'counter', 'Bytes read from the backing volume.', (c) => c.readMissBytes);
  per('vstore_cache_ram_hit_bytes_total', 'counter', 'Bytes read that the RAM tier served.', (c) => c.ramHitBytes);
  per('vstore_cache_hit_ratio', 'gauge', 'Share of bytes read that the cache served.', (c) => c.hitRatio);
  per('vstore_cache_dirty_bytes', 'gauge', 'Bytes written (write-back) and not yet on the backing volume.', (c) => c.dirtyBytes);
  per('vstore_cache_written_back_bytes_total', 'counter', 'Bytes written back to the backing volume.', (c) => c.writtenBackBytes);
  per('vstore_cache_write_back_bytes_per_second', 'gauge', 'Write-back rate over the last 5 seconds.', (c) => c.writeBackRate);
  per('vstore_cache_evictions_total', 'counter', 'Cache lines evicted.', (c) => c.evictions);
  per('vstore_cache_used_bytes', 'gauge', 'Cache space the disk holds.', (c) => c.usedBytes);
  per('vstore_cache_degraded', 'gauge', '1 when the cache device failed and the disk runs pass-through.', (c) => (c.degraded ? 1 : 0));
  per('vstore_cache_lost_bytes', 'gauge', 'Dirty bytes that could not be read back from a failed cache device.', (c) => c.lostBytes);
  const b = s.cache.balloon;
  if (b) {
    const vms = b.vms.map((v) => ({ l: `{vm="${lv(v.vm)}"}`, v }));
    family('vstore_cache_target_bytes', 'gauge', 'Cache space the capacity scheduler aims to give the VM.', vms.map(({ l, v }) => [l, v.targetBytes]));
    family('vstore_cache_allotment_bytes', 'gauge', 'Cache space the VM\'s disks may hold now (moves toward the target at the balloon rate).', vms.map(({ l, v }) => [l, v.allotmentBytes]));
    family('vstore_cache_vm_used_bytes', 'gauge', 'Cache space the VM\'s ballooned disks hold.', vms.map(({ l, v }) => [l, v.usedBytes]));
    family('vstore_cache_shares', 'gauge', 'The VM\'s configured shares of the cache device.', vms.map(({ l, v }) => [l, v.shares]));
  }
  family(
    'vstore_cache_mode',
    'gauge',
    'The disk\'s cache mode (1 for the mode in force).',
    disks.map(({ l, c }): [string, number] => [`${l.slice(0, -1)},mode="${c.mode}"}`, 1]),
  );
  return out;
}
