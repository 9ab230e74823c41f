// The QoS layer's CPU cost per request, in one process: the real NbdServer over a FileVolume
// (an image in the page cache) with and without a QosVolume (unconstrained, and with a limit
// and a reservation that never bind), driven by the project's NBD client at QD32 over a unix
// socket. Client and server share the process, so the figure is CPU per request of both; the
// variants alternate (order rotated) so drift hits all alike. Less noisy than fio on a shared
// machine: it counts CPU time, not wall time. Run after `npm run build`:
//
//   node bench/qos-inproc.mjs [IMAGE] [ROUNDS] [REQUESTS]      (IMAGE default: bench/qos.sh's)
import { rmSync } from 'node:fs';
import { FileVolume } from '../dist/lib/block/file.js';
import { silentLogger } from '../dist/lib/log.js';
import { NbdClientConnection } from '../dist/lib/nbd/client.js';
import { NbdServer } from '../dist/lib/nbd/server.js';
import { QosScheduler } from '../dist/lib/qos/scheduler.js';
import { DEFAULT_QOS } from '../dist/lib/qos/settings.js';
import { QosVolume } from '../dist/lib/qos/volume.js';

const img = process.argv[2] ?? `${process.env.TMPDIR ?? '/tmp'}/vstore-bench-qos/bench.img`;
const rounds = Number(process.argv[3] ?? 10);
const n = Number(process.argv[4] ?? 100_000);
const sched = new QosScheduler({ depth: 64 });
sched.start();
const fv = await FileVolume.open(img, {});
const serve = async (name, vol) => {
  const sock = `/tmp/vstore-qos-inproc-${process.pid}-${name}.sock`;
  rmSync(sock, { force: true });
  const s = new NbdServer({ logger: silentLogger() });
  s.addExport({ name: '', volume: vol });
  await s.listen({ unix: sock });
  return { s, c: await NbdClientConnection.connect({ address: `unix:${sock}`, logger: silentLogger() }) };
};
const variants = {
  disabled: await serve('disabled', fv),
  enabled: await serve('enabled', new QosVolume(fv, sched.addFlow('enabled', DEFAULT_QOS))),
  limited: await serve('limited', new QosVolume(fv, sched.addFlow('limited', { ...DEFAULT_QOS, limit: { iops: 1e7, burstSeconds: 0 }, reservation: { iops: 10 } }))),
};
const blocks = Math.floor(fv.size / 4096);
async function once(c) {
  const bufs = Array.from({ length: 32 }, () => Buffer.alloc(4096));
  let i = 0;
  let x = 12345;
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  await Promise.all(
    bufs.map(async (b) => {
      while (i++ < n) {
        x = (x * 1103515245 + 12345) & 0x7fffffff;
        await c.read((x % blocks) * 4096, b);
      }
    }),
  );
  const cpu = process.cpuUsage(cpu0);
  return { us: (cpu.user + cpu.system) / n, kiops: n / (performance.now() - t0) };
}
const names = Object.keys(variants);
const res = Object.fromEntries(names.map((k) => [k, []]));
await once(variants.disabled.c); // warm up
for (let r = 0; r < rounds; r++) {
  const order = [...names.slice(r % names.length), ...names.slice(0, r % names.length)];
  for (const k of order) res[k].push(await once(variants[k].c));
}
const median = (a) => {
  const s = [...a].sort((x, y) => x - y);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const base = median(res.disabled.map((r) => r.us));
console.log(`| QoS (in-process, ${rounds} x ${n} 4k reads QD32) | CPU us / request (median) | rounds | kIOPS (median) | CPU ratio to disabled |`);
console.log('|---|---|---|---|---|');
for (const k of names) {
  const us = median(res[k].map((r) => r.us));
  console.log(`| ${k} | ${us.toFixed(2)} | ${res[k].map((r) => r.us.toFixed(1)).join(' ')} | ${median(res[k].map((r) => r.kiops)).toFixed(1)} | ${(us / base).toFixed(3)} |`);
}
for (const v of Object.values(variants)) await v.c.close();
process.exit(0);
