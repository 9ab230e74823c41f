/**
 * `vstore cache ...`: the host's cache of a running daemon — stats, flush (write back every dirty
 * byte, with a progress bar), warm (read a range into the cache, with a progress bar), mode, and
 * invalidate. A disk is named VM/DISK. Progress is drawn from the disk's stats, polled while the
 * request runs (the daemon answers the request when the work is done).
 */
import type { Command } from 'commander';
import { parseSize } from '../config/schema.js';
import type { CacheStats } from '../block/cache/volume.js';
import { call, controlOption } from './client.js';
import { formatBytes, renderBalloon, renderTable } from './status.js';
import type { BalloonStatus } from '../block/cache/balloon.js';

function diskPath(spec: string): string {
  const m = /^([^/]+)\/([^/]+)$/.exec(spec);
  if (!m) throw new Error(`disk "${spec}": give it as VM/DISK`);
  return `/v1/vms/${encodeURIComponent(m[1]!)}/disks/${encodeURIComponent(m[2]!)}/cache`;
}

/** One progress line: `[#######.............]  35%  12.0M/34.0M` (`\r`-redrawn on a terminal). */
export function progressBar(done: number, total: number, width = 30): string {
  const f = total > 0 ? Math.min(1, Math.max(0, done / total)) : 1;
  const n = Math.round(f * width);
  return `[${'#'.repeat(n)}${'.'.repeat(width - n)}] ${String(Math.floor(f * 100)).padStart(3)}%  ${fmt(done)}/${fmt(total)}`;
}

function fmt(n: number): string {
  return formatBytes(Math.round(n));
}

/** Runs `request` while polling the disk's stats for progress; draws on stderr. */
async function withProgress<T>(control: string, path: string, label: string, pick: (s: CacheStats) => { done: number; total: number } | undefined, request: Promise<T>): Promise<T> {
  const tty = process.stderr.isTTY;
  let lastLine = '';
  let stopped = false;
  const draw = (line: string, final = false): void => {
    if (line === lastLine && !final) return;
    lastLine = line;
    if (tty) process.stderr.write(`\r${label} ${line}${final ? '\n' : ''}`);
    else process.stderr.write(`${label} ${line}\n`);
  };
  const poll = (async () => {
    while (!stopped) {
      await new Promise((r) => setTimeout(r, tty ? 200 : 1000));
      if (stopped) break;
      try {
        const p = pick(await call<CacheStats>(control, 'GET', path));
        if (p && !stopped) draw(progressBar(p.done, p.total));
      } catch {
        // the request itself reports errors
      }
    }
  })();
  try {
    return await request;
  } finally {
    stopped = true;
    await poll;
  }
}

export function renderCacheStats(disks: Array<{ name: string; s: CacheStats }>): string {
  const rows = [['DISK', 'MODE', 'HIT%', 'USED', 'DIRTY', 'WB-RATE', 'WRITTEN-BACK', 'EVICTIONS', 'STATE']];
  for (const { name, s } of disks) {
    rows.push([
      name,
      s.mode,
      (s.hitRatio * 100).toFixed(1),
      formatBytes(s.usedBytes) + (s.allotmentBytes !== undefined ? `/${formatBytes(s.allotmentBytes)}` : ''),
      formatBytes(s.dirtyBytes),
      `${formatBytes(Math.round(s.writeBackRate))}/s`,
      formatBytes(s.writtenBackBytes),
      String(s.evictions),
      s.degraded ? `DEGRADED (device failed${s.lostBytes ? `, ${formatBytes(s.lostBytes)} lost` : ''})` : 'ok',
    ]);
  }
  return renderTable(rows);
}

export function registerCache(program: Command): void {
  const cache = program
    .command('cache')
    .description("the host's local cache device: per-disk stats, write-back flush, warm-up, mode and invalidation")
    .addHelpText(
      'after',
      `
Disks are named VM/DISK. Modes: write-back (writes acknowledged once durable on the cache device,
written back in flush order), write-through, write-around, pass-through.

Examples:
  $ vstore cache stats
  $ vstore cache balloon                    each VM's shares, target and allotment
  $ vstore cache shares vm1 4 --min 1G      change a VM's share at runtime (not saved)
  $ vstore cache flush vm1/disk0            write back every dirty byte (progress bar)
  $ vstore cache warm vm1/disk0 --range 0:1G
  $ vstore cache mode vm1/disk0 write-back
  $ vstore cache invalidate vm1/disk0 --force
  $ vstore cache invalidate --volume vm1/disk0 --force   clear another host's dirty record`,
    );

  cache
    .command('stats')
    .summary('the cache device and every cached disk')
    .argument('[disk]', 'VM/DISK (default: all)')
    .option('--json', 'print JSON', false)
    .addOption(controlOption())
    .action(async (disk: string | undefined, opts: { control: string; json: boolean }) => {
      if (disk) {
        const s = await call<CacheStats>(opts.control, 'GET', diskPath(disk));
        process.stdout.write(opts.json ? JSON.stringify(s, null, 2) + '\n' : renderCacheStats([{ name: disk, s }]));
        return;
      }
      const all = await call<{ host: string; device: { slots: number; freeSlots: number; lineSize: number }; disks: Array<{ vm: string; disk: string; stats: CacheStats }> }>(opts.control, 'GET', '/v1/cache');
      if (opts.json) {
        process.stdout.write(JSON.stringify(all, null, 2) + '\n');
        return;
      }
      const d = all.device;
      let out = `cache device (host ${all.host}): ${d.slots} lines of ${formatBytes(d.lineSize)}, ${d.freeSlots} free\n`;
      if (all.disks.length) out += renderCacheStats(all.disks.map((x) => ({ name: `${x.vm}/${x.disk}`, s: x.stats })));
      process.stdout.write(out);
    });

  cache
    .command('balloon')
    .summary("the capacity scheduler: each VM's shares, target and allotment")
    .option('--json', 'print JSON (GET /v1/cache/balloon)', false)
    .addOption(controlOption())
    .action(async (opts: { control: string; json: boolean }) => {
      const b = await call<BalloonStatus>(opts.control, 'GET', '/v1/cache/balloon');
      process.stdout.write(opts.json ? JSON.stringify(b, null, 2) + '\n' : renderBalloon(b) || 'no ballooned VMs\n');
    });

  cache
    .command('shares')
    .summary("change a VM's share of the cache at runtime (the config's vms[].cache; not saved)")
    .argument('<vm>', 'VM name')
    .argument('<shares>', 'relative share (a positive number)')
    .option('--min <size>', 'least cache space the scheduler leaves the VM (e.g. 1G)')
    .option('--max <size>', 'most cache space the scheduler gives the VM')
    .addOption(controlOption())
    .action(async (vm: string, shares: string, opts: { control: string; min?: string; max?: string }) => {
      const n = Number(shares);
      if (!(n > 0) || !Number.isFinite(n)) throw new Error(`shares: a positive number, got ${shares}`);
      const size = (what: string, v: string | undefined): number | undefined => {
        if (v === undefined) return undefined;
        const b = parseSize(v);
        if (b === undefined) throw new Error(`--${what}: a size such as 512M or 2G, got ${v}`);
        return b;
      };
      const body = { shares: n, min: size('min', opts.min) ?? null, max: size('max', opts.max) ?? null };
      const b = await call<BalloonStatus>(opts.control, 'PUT', `/v1/cache/balloon/${encodeURIComponent(vm)}`, body);
      process.stdout.write(renderBalloon(b) || 'no ballooned VMs\n');
    });

  cache
    .command('flush')
    .summary("write back every dirty byte of a disk's cache (progress bar)")
    .argument('<disk>', 'VM/DISK')
    .addOption(controlOption())
    .action(async (disk: string, opts: { control: string }) => {
      const path = diskPath(disk);
      const before = await call<CacheStats>(opts.control, 'GET', path);
      const s = await withProgress(
        opts.control,
        path,
        'flush',
        (st) => (st.flush ? { done: st.flush.totalBytes - st.flush.remainingBytes, total: st.flush.totalBytes } : undefined),
        call<CacheStats>(opts.control, 'POST', `${path}/flush`, {}),
      );
      process.stderr.write(`flush ${progressBar(before.dirtyBytes, before.dirtyBytes)}\n`);
      process.stdout.write(`${disk}: written back, ${formatBytes(s.dirtyBytes)} dirty, ${formatBytes(s.writtenBackBytes)} written back in all\n`);
    });

  cache
    .command('warm')
    .summary('read a range of a disk into the cache (progress bar)')
    .argument('<disk>', 'VM/DISK')
    .option('--range <from:length>', 'byte range, e.g. 0:1G or 512M:64M (default: the whole disk)')
    .addOption(controlOption())
    .action(async (disk: string, opts: { control: string; range?: string }) => {
      const path = diskPath(disk);
      let body: { offset?: number; length?: number } = {};
      if (opts.range !== undefined) {
        const [a, b] = opts.range.split(':');
        const offset = a === '0' ? 0 : parseSize(a ?? '');
        const length = b === undefined ? undefined : parseSize(b);
        if (offset === undefined || (b !== undefined && length === undefined)) throw new Error(`--range: FROM:LENGTH with sizes (e.g. 0:1G), got ${opts.range}`);
        body = { offset, ...(length !== undefined ? { length } : {}) };
      }
      const s = await withProgress(
        opts.control,
        path,
        'warm',
        (st) => (st.warm ? { done: st.warm.doneBytes, total: st.warm.totalBytes } : undefined),
        call<CacheStats>(opts.control, 'POST', `${path}/warm`, body),
      );
      const total = body.length ?? (body.offset !== undefined ? Math.max(0, s.sizeBytes - body.offset) : s.sizeBytes);
      process.stderr.write(`warm ${progressBar(total, total)}\n`);
      process.stdout.write(`${disk}: warm, ${formatBytes(s.usedBytes)} cached\n`);
    });

  cache
    .command('mode')
    .summary("show or switch a disk's cache mode")
    .argument('<disk>', 'VM/DISK')
    .argument('[mode]', 'write-back | write-through | write-around | pass-through')
    .addOption(controlOption())
    .action(async (disk: string, mode: string | undefined, opts: { control: string }) => {
      const path = diskPath(disk);
      const s = mode ? await call<CacheStats>(opts.control, 'PUT', `${path}/mode`, { mode }) : await call<CacheStats>(opts.control, 'GET', path);
      process.stdout.write(`${disk}: ${s.mode}${s.degraded ? ' (degraded: the cache device failed)' : ''}\n`);
    });

  cache
    .command('invalidate')
    .summary("drop a disk's cache, dirty data included; or clear another host's dirty record of a volume")
    .argument('[disk]', 'VM/DISK')
    .option('--volume <name>', "clear the resolver's dirty-cache record of this volume (the host holding it is gone)")
    .option('--force', 'required: dirty data not yet written back is lost', false)
    .addOption(controlOption())
    .action(async (disk: string | undefined, opts: { control: string; force: boolean; volume?: string }) => {
      if (!opts.force) throw new Error('--force is required: dirty data that was not written back is lost');
      if (opts.volume !== undefined) {
        await call(opts.control, 'POST', '/v1/cache/invalidate-volume', { volume: opts.volume, force: true });
        process.stdout.write(`volume ${opts.volume}: dirty-cache record cleared\n`);
        return;
      }
      if (!disk) throw new Error('give VM/DISK, or --volume NAME');
      const r = await call<{ droppedDirtyBytes: number }>(opts.control, 'POST', `${diskPath(disk)}/invalidate`, { force: true });
      process.stdout.write(`${disk}: cache dropped (${formatBytes(r.droppedDirtyBytes)} dirty data discarded)\n`);
    });
}
