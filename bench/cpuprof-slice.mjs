// Where a daemon's CPU time went during each bench job: reads a V8 .cpuprofile (node
// --cpu-prof) and a times file of "name start_ms end_ms" lines (CLOCK_MONOTONIC ms, as
// bench/cache.sh writes them), and prints per job the busy share of the window and the top
// functions by self time (with file:line), plus the top by inclusive time of vstore's own code.
//
//   node bench/cpuprof-slice.mjs /tmp/prof/CPU.*.cpuprofile bench/out-cache/times.txt [TOP]
import { readFileSync } from 'node:fs';

const [profPath, timesPath, topArg] = process.argv.slice(2);
if (!profPath || !timesPath) {
  console.error('usage: node bench/cpuprof-slice.mjs PROFILE TIMES [TOP]');
  process.exit(2);
}
const top = Number(topArg ?? 25);
const prof = JSON.parse(readFileSync(profPath, 'utf8'));
const byId = new Map(prof.nodes.map((n) => [n.id, n]));
const parent = new Map();
for (const n of prof.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
const name = (n) => {
  const f = n.callFrame;
  const file = f.url ? f.url.replace(/^file:\/\//, '').replace(/.*\/(dist|node_modules)\//, '$1/') : '';
  return `${f.functionName || '(anonymous)'} ${file ? `${file}:${f.lineNumber + 1}` : ''}`.trim();
};
// sample times in µs, V8's clock (CLOCK_MONOTONIC on Linux)
const times = [];
let t = prof.startTime;
for (const d of prof.timeDeltas) times.push((t += d));
const jobs = readFileSync(timesPath, 'utf8').trim().split('\n').map((l) => l.split(' ')).map(([n, a, b]) => ({ n, a: Number(a) * 1000, b: Number(b) * 1000 }));
for (const j of jobs) {
  const self = new Map();
  const incl = new Map();
  let total = 0;
  let idle = 0;
  for (let i = 0; i < prof.samples.length; i++) {
    if (times[i] < j.a || times[i] > j.b) continue;
    total++;
    const leaf = byId.get(prof.samples[i]);
    const nm = name(leaf);
    if (leaf.callFrame.functionName === '(idle)') idle++;
    self.set(nm, (self.get(nm) ?? 0) + 1);
    const seen = new Set();
    for (let id = prof.samples[i]; id !== undefined; id = parent.get(id)) {
      const k = name(byId.get(id));
      if (seen.has(k)) continue;
      seen.add(k);
      incl.set(k, (incl.get(k) ?? 0) + 1);
    }
  }
  if (!total) continue;
  console.log(`\n== ${j.n}: ${((j.b - j.a) / 1e6).toFixed(2)} s, ${total} samples, busy ${(100 * (1 - idle / total)).toFixed(0)}%`);
  const pct = (x) => `${((100 * x) / total).toFixed(1).padStart(5)}%`;
  console.log('  self:');
  for (const [k, v] of [...self].sort((a, b) => b[1] - a[1]).slice(0, top)) console.log(`  ${pct(v)}  ${k}`);
  console.log('  inclusive (dist/):');
  for (const [k, v] of [...incl].filter(([k]) => k.includes('dist/')).sort((a, b) => b[1] - a[1]).slice(0, top)) console.log(`  ${pct(v)}  ${k}`);
}
