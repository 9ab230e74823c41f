#!/usr/bin/env node
// Aggregates bench/nbd.sh's fio runs: median over rounds per (workload, server), a table with
// IOPS, MiB/s and vstore's ratio to each anchor, results.json, and a hand-written SVG bar chart
// (one panel per workload, each with its own scale). No dependencies.
// bench/vhost-blk.sh reuses it with --servers (order, comma-separated), --subject (the server
// whose ratios are shown), --anchors (comma-separated) and --title; the defaults are nbd.sh's.
import { readdirSync, readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const rawDir = args.raw ?? 'bench/out/raw';
const jsonOut = args.json ?? 'bench/out/results.json';
const svgOut = args.svg ?? 'bench/nbd.svg';

const LABEL = {
  randread: '4k randread QD32',
  randwrite: '4k randwrite QD32',
  seqread: '1M seq read QD8',
  seqwrite: '1M seq write QD8',
};
const SERVER_ORDER = (args.servers ?? 'vstore,nbdkit,qemu-nbd').split(',');
const SUBJECT = args.subject ?? 'vstore';
const ANCHORS = (args.anchors ?? 'nbdkit,qemu-nbd').split(',').filter(Boolean);
// A reference server (a ceiling, say) is drawn but left out of each panel's scale; its bar is cut.
const REFERENCE = (args.reference ?? '').split(',').filter(Boolean);
const TITLE = args.title ?? 'NBD over a unix socket, fio nbd engine, 1 connection (higher is better)';
const COLOR = {
  vstore: '#2f6fdf', nbdkit: '#7a8696', 'qemu-nbd': '#c98b2b', replicated: '#2f6fdf', single: '#7fa7ef', 'one-node': '#7a8696',
  'vstore-vhost': '#2f6fdf', 'qsd-vhost': '#c98b2b', 'vstore-nbd': '#7fa7ef', 'null-vhost': '#b8bec6',
};
// Key of a ratio in results.json: vsNbdkit, vsQemuNbd, vsQsdVhost, ...
const ratioKey = (a) => 'vs' + a.split('-').map((p) => p[0].toUpperCase() + p.slice(1)).join('');

// raw file name: WORKLOAD.SERVER.ROUND.json
const runs = [];
for (const f of readdirSync(rawDir).filter((f) => f.endsWith('.json')).sort()) {
  const m = /^([^.]+)\.(.+)\.(\d+)\.json$/.exec(f);
  if (!m) continue;
  const text = readFileSync(path.join(rawDir, f), 'utf8');
  const doc = JSON.parse(text.slice(text.indexOf('{')));
  const job = doc.jobs[0];
  const side = m[1] === 'randwrite' || m[1] === 'seqwrite' ? job.write : job.read;
  runs.push({
    workload: m[1],
    server: m[2],
    round: Number(m[3]),
    iops: side.iops,
    mibs: side.bw_bytes / 1048576,
    latUsP50: (side.clat_ns?.percentile?.['50.000000'] ?? 0) / 1000,
    latUsP99: (side.clat_ns?.percentile?.['99.000000'] ?? 0) / 1000,
    errors: job.error,
  });
}
if (!runs.length) {
  console.error(`chart: no fio results in ${rawDir}`);
  process.exit(1);
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const k = Math.floor(s.length / 2);
  return s.length % 2 ? s[k] : (s[k - 1] + s[k]) / 2;
};
const workloads = Object.keys(LABEL).filter((w) => runs.some((r) => r.workload === w));
const servers = SERVER_ORDER.filter((s) => runs.some((r) => r.server === s));
const results = {};
for (const w of workloads) {
  results[w] = {};
  for (const s of servers) {
    const rs = runs.filter((r) => r.workload === w && r.server === s);
    if (!rs.length) continue;
    results[w][s] = {
      iops: median(rs.map((r) => r.iops)),
      mibs: median(rs.map((r) => r.mibs)),
      latUsP50: median(rs.map((r) => r.latUsP50)),
      latUsP99: median(rs.map((r) => r.latUsP99)),
      rounds: rs.length,
      errors: rs.reduce((a, r) => a + r.errors, 0),
    };
  }
}
const metricOf = (w) => (w === 'seqread' || w === 'seqwrite' ? 'mibs' : 'iops');
const ratio = (w, other) => {
  const a = results[w][SUBJECT]?.[metricOf(w)];
  const b = results[w][other]?.[metricOf(w)];
  return a && b ? a / b : null;
};

// Table.
const fmtIops = (x) => (x >= 1000 ? `${(x / 1000).toFixed(1)}k` : x.toFixed(0));
const head = ['workload', ...servers.map((s) => `${s} IOPS / MiB/s`), ...ANCHORS.map((a) => `${SUBJECT}/${a}`)];
const rows = workloads.map((w) => [
  LABEL[w],
  ...servers.map((s) => (results[w][s] ? `${fmtIops(results[w][s].iops)} / ${results[w][s].mibs.toFixed(0)}` : '-')),
  ...ANCHORS.map((a) => ratio(w, a)?.toFixed(2) ?? '-'),
]);
const table = [`| ${head.join(' | ')} |`, `|${head.map(() => '---').join('|')}|`, ...rows.map((r) => `| ${r.join(' | ')} |`)].join('\n');
console.log(table);

const machine = {
  nproc: os.cpus().length,
  cpu: os.cpus()[0]?.model ?? 'unknown',
  kernel: `${os.type()} ${os.release()}`,
  memGiB: +(os.totalmem() / 2 ** 30).toFixed(1),
  node: process.version,
};
mkdirSync(path.dirname(jsonOut), { recursive: true });
writeFileSync(
  jsonOut,
  JSON.stringify(
    {
      date: new Date().toISOString(),
      machine,
      params: { runtimeS: Number(args.runtime ?? 0), rounds: Number(args.rounds ?? 1), imageMiB: Number(args['size-mib'] ?? 0) },
      results,
      ratios: Object.fromEntries(workloads.map((w) => [w, { metric: metricOf(w), ...Object.fromEntries(ANCHORS.map((a) => [ratioKey(a), ratio(w, a)])) }])),
      runs,
      table,
    },
    null,
    2,
  ) + '\n',
);

// SVG: one panel per workload, bars per server, value labels, vstore ratios under each panel.
const PW = Number(args["panel-width"] ?? 250), TOP = 56, BAR_AREA = 150, MARGIN = 20;
const width = MARGIN * 2 + workloads.length * PW;
const height = TOP + 36 + BAR_AREA + 46;
const esc = (s) => String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
const parts = [];
parts.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="Helvetica, Arial, sans-serif">`);
parts.push(`<rect width="100%" height="100%" fill="#ffffff"/>`);
parts.push(`<text x="${MARGIN}" y="24" font-size="16" font-weight="bold">${esc(TITLE)}</text>`);
parts.push(`<text x="${MARGIN}" y="42" font-size="11" fill="#555">${esc(`${machine.nproc} CPU ${machine.cpu}, ${machine.kernel}; ${args.runtime ?? '?'} s runs, median of ${args.rounds ?? 1}; ${new Date().toISOString().slice(0, 10)}`)}</text>`);
workloads.forEach((w, wi) => {
  const x0 = MARGIN + wi * PW;
  const metric = metricOf(w);
  const vals = servers.map((s) => results[w][s]?.[metric] ?? 0);
  const max = Math.max(...vals.filter((_, i) => !REFERENCE.includes(servers[i]))) || Math.max(...vals) || 1;
  const baseY = TOP + 36 + BAR_AREA;
  parts.push(`<text x="${x0 + PW / 2 - 10}" y="${TOP + 12}" font-size="13" font-weight="bold" text-anchor="middle">${esc(LABEL[w])} (${metric === 'iops' ? 'IOPS' : 'MiB/s'})</text>`);
  parts.push(`<line x1="${x0 + 10}" y1="${baseY}" x2="${x0 + PW - 30}" y2="${baseY}" stroke="#333"/>`);
  const bw = (PW - 60) / servers.length;
  servers.forEach((s, si) => {
    const v = vals[si];
    const cut = v > max * 1.08;
    const h = (cut ? 1.08 : v / max) * BAR_AREA;
    const bx = x0 + 16 + si * bw;
    const look = REFERENCE.includes(s) ? `fill="none" stroke="${COLOR[s] ?? '#999'}" stroke-width="2" stroke-dasharray="4 3"` : `fill="${COLOR[s] ?? '#999'}"`;
    parts.push(`<rect x="${bx.toFixed(1)}" y="${(baseY - h).toFixed(1)}" width="${(bw - 10).toFixed(1)}" height="${h.toFixed(1)}" ${look}><title>${esc(`${s}: ${v.toFixed(0)}`)}</title></rect>`);
    if (cut) parts.push(`<text x="${(bx + (bw - 10) / 2).toFixed(1)}" y="${(baseY - h + 14).toFixed(1)}" font-size="10" fill="#555" text-anchor="middle">(cut)</text>`);
    parts.push(`<text x="${(bx + (bw - 10) / 2).toFixed(1)}" y="${(baseY - h - 4).toFixed(1)}" font-size="11" text-anchor="middle">${esc(metric === 'iops' ? fmtIops(v) : v.toFixed(0))}</text>`);
    parts.push(`<text x="${(bx + (bw - 10) / 2).toFixed(1)}" y="${baseY + 14}" font-size="11" text-anchor="middle">${esc(s)}</text>`);
  });
  const rtxt = ANCHORS.map((a) => [a, ratio(w, a)]).filter(([, r]) => r != null).map(([a, r]) => `vs ${a} ${r.toFixed(2)}x`).join(', ');
  if (rtxt) parts.push(`<text x="${x0 + PW / 2 - 10}" y="${baseY + 32}" font-size="11" fill="${COLOR[SUBJECT] ?? COLOR.vstore}" text-anchor="middle">${esc(SUBJECT)} ${esc(rtxt)}</text>`);
});
parts.push('</svg>');
writeFileSync(svgOut, parts.join('\n') + '\n');
console.error(`chart: wrote ${jsonOut} and ${svgOut}`);
