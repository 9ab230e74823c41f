// The cache layer's cost per request, in one process, without NBD server, fio or the daemon:
// CacheVolume (write-back, a cache file in the page cache) over a RemoteVolume to nbdkit's file
// plugin behind its delay filter, beside a FileVolume on a local image and the bare
// RemoteVolume. Jobs as bench/cache.sh's (4k, every block of a region once in random order,
// QD16); prints IOPS and CPU microseconds per request of this process (user + system), which a
// loaded machine disturbs much less than wall time. Each round uses a fresh region. Run after
// `npm run build`:
//
//   node bench/cache-inproc.mjs [REGION_MIB] [ROUNDS] [RAM_MIB]
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, rmSync } from 'node:fs';
import { FileVolume } from '../dist/lib/block/file.js';
import { RemoteVolume } from '../dist/lib/block/remote.js';
import { CacheDevice } from '../dist/lib/block/cache/device.js';
import { CacheVolume, createRamTier } from '../dist/lib/block/cache/volume.js';
import { silentLogger } from '../dist/lib/log.js';

const regionMiB = Number(process.argv[2] ?? 64);
const rounds = Number(process.argv[3] ?? 2);
const ramMiB = Number(process.argv[4] ?? 64);
const QD = 16;
const dir = `${process.env.TMPDIR ?? '/tmp'}/vstore-cache-inproc`;
rmSync(dir, { recursive: true, force: true });
mkdirSync(dir, { recursive: true });
const size = regionMiB * rounds * 1024 * 1024;
for (const f of ['remote.img', 'local.img']) {
  const v = await FileVolume.open(`${dir}/${f}`, { create: { size } });
  const b = Buffer.alloc(1024 * 1024, 0x5a);
  for (let p = 0; p < size; p += b.length) await v.write(p, b);
  await v.flush();
  await v.close();
}
const nbdkit = spawn('nbdkit', ['-f', '-U', `${dir}/remote.sock`, '--filter=delay', 'file', `${dir}/remote.img`, 'rdelay=1ms', 'wdelay=1ms'], { stdio: 'inherit' });
for (let i = 0; i < 100 && !existsSync(`${dir}/remote.sock`); i++) await new Promise((r) => setTimeout(r, 50));
const logger = silentLogger();
const local = await FileVolume.open(`${dir}/local.img`, {});
const remote = await RemoteVolume.open({ id: 'r', addresses: [`unix:${dir}/remote.sock`], export: '', logger });
const remote2 = await RemoteVolume.open({ id: 'r2', addresses: [`unix:${dir}/remote.sock`], export: '', logger });
const dev = await CacheDevice.open(await FileVolume.open(`${dir}/cache.img`, { create: { size: size * 3 } }), { logger });
const cache = await CacheVolume.open({ device: dev, backing: remote2, key: 'bench', mode: 'write-back', logger, ...(ramMiB > 0 ? { ram: createRamTier(ramMiB * 1024 * 1024) } : {}) });

/** Every 4k block of round r's region once, random order, QD16: { kiops, us CPU per request }. */
async function job(vol, op, r) {
  const base = (r - 1) * regionMiB * 1024 * 1024;
  const n = (regionMiB * 1024 * 1024) / 4096;
  const order = Array.from({ length: n }, (_, i) => i);
  let x = 12345 + r;
  for (let i = n - 1; i > 0; i--) {
    x = (x * 1103515245 + 12345) & 0x7fffffff;
    const j = x % (i + 1);
    [order[i], order[j]] = [order[j], order[i]];
  }
  let next = 0;
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: QD }, async () => {
      const b = Buffer.alloc(4096, 1);
      while (next < n) {
        const off = base + order[next++] * 4096;
        if (op === 'read') await vol.read(off, b);
        else await vol.write(off, b);
      }
    }),
  );
  const cpu = process.cpuUsage(cpu0);
  return { kiops: n / (performance.now() - t0), us: (cpu.user + cpu.system) / n };
}
const res = {};
const add = (k, v) => (res[k] ??= []).push(v);
await job(local, 'read', 1); // warm-up (JIT, page cache)
for (let r = 1; r <= rounds; r++) {
  add('remote-read', await job(remote, 'read', r));
  add('vcache-cold', await job(cache, 'read', r));
  await new Promise((res) => setTimeout(res, 500));
  add('local-read', await job(local, 'read', r));
  add('vcache-warm', await job(cache, 'read', r));
  add('local-write', await job(local, 'write', r));
  add('vcache-write', await job(cache, 'write', r));
  await cache.drain();
}
console.log(`| in-process, ${regionMiB} MiB x ${rounds} rounds, QD${QD}, RAM ${ramMiB} MiB | kIOPS per round | CPU us/request per round |`);
console.log('|---|---|---|');
for (const [k, v] of Object.entries(res)) console.log(`| ${k} | ${v.map((x) => x.kiops.toFixed(1)).join(' / ')} | ${v.map((x) => x.us.toFixed(1)).join(' / ')} |`);
const st = cache.stats();
console.log(`cache: hit ${(st.hitRatio * 100).toFixed(1)}%, ram hits ${(st.ramHitBytes / 1048576).toFixed(0)} MiB, evictions ${st.evictions}, written back ${(st.writtenBackBytes / 1048576).toFixed(0)} MiB, commits ${dev.deviceStats().commits}`);
await cache.close();
await dev.close();
await remote.close();
await local.close();
nbdkit.kill();
rmSync(dir, { recursive: true, force: true });
process.exit(0);
