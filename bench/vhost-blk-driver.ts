/**
 * The load generator of bench/vhost-blk.sh: test/helpers/vhost-frontend.ts (the front end that
 * plays QEMU: memfd guest memory, split rings, eventfds) driven like fio at a fixed queue depth,
 * against any vhost-user-blk back end. It writes fio-shaped JSON (jobs[0].read|write with iops,
 * bw_bytes, clat_ns percentiles, error) so bench/chart.mjs aggregates it beside fio's own runs.
 *
 *   node DRIVER run --socket S --rw randread|randwrite|read --bs 4096 --iodepth 32 \
 *        --size BYTES --runtime 5 --ramp 1 --output FILE
 *   node DRIVER serve-null --socket S --size BYTES   # a vhost-user-blk back end whose volume
 *                                                     # does nothing: the driver's ceiling
 *
 * The hot loop bypasses VhostUserFrontend.blk() (which copies every read out of guest memory
 * into a fresh Buffer and every write in) and submits straight from the request slots, as a
 * guest driver does: data stays in "guest memory". It reaches the helper's private
 * reserve()/submitChain() through a cast; the ring code is the helper's, unchanged.
 *
 * Compiled by bench/vhost-blk.sh with tsc (no tsx here); not part of the shipped build.
 */
import { writeFileSync } from 'node:fs';
import { VhostUserFrontend, type Completion } from '../test/helpers/vhost-frontend.js';
import { BlkType, VirtioBlkDevice } from '../lib/vhost/blk.js';
import { VhostUserServer } from '../lib/vhost/server.js';
import { createLogger } from '../lib/log.js';
import type { Volume } from '../lib/block/volume.js';

const SLOT_HDR = 128; // the helper's slot layout: header 16 B, status 1 B at 16, data at 128

function parseArgs(argv: string[]): Record<string, string> {
  const o: Record<string, string> = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a.startsWith('--')) o[a.slice(2)] = argv[++i] ?? '';
  }
  return o;
}

interface Internals {
  reserve(q: unknown, descs: number): Promise<number>;
  submitChain(q: unknown, bufs: [number, number, boolean][], slot: number): Promise<Completion>;
}

async function connectRetry(socket: string, depth: number, maxIo: number): Promise<VhostUserFrontend> {
  const deadline = Date.now() + 15_000;
  for (;;) {
    try {
      return await VhostUserFrontend.connect({ socket, queueSize: 128, depth, maxIo, numQueues: 1 });
    } catch (e) {
      if (Date.now() > deadline) throw e;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

function percentile(sorted: Float64Array, p: number): number {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

async function run(a: Record<string, string>): Promise<void> {
  const rw = a.rw ?? 'randread';
  const bs = Number(a.bs ?? 4096);
  const qd = Number(a.iodepth ?? 32);
  const runtimeMs = Number(a.runtime ?? 5) * 1000;
  const rampMs = Number(a.ramp ?? 1) * 1000;
  const fe = await connectRetry(a.socket!, qd, bs);
  const size = Math.min(Number(a.size ?? Number.MAX_SAFE_INTEGER), Number(fe.config.capacity) * 512);
  const blocks = Math.floor(size / bs);
  const write = rw === 'randwrite' || rw === 'write';
  const random = rw.startsWith('rand');
  const q = fe.queue(0);
  const I = fe as unknown as Internals;
  const mem = fe.mem;
  // Write payloads: whatever random bytes the slots hold (fio without refill_buffers).
  for (let s = 0; s < qd; s++) {
    const d = fe.slotAddr(q, s) + SLOT_HDR;
    for (let i = 0; i < bs; i += 4) mem.writeUInt32LE((Math.random() * 2 ** 32) >>> 0, d + i);
  }

  let cursor = 0;
  let measuring = false;
  let stop = false;
  let ios = 0;
  let errors = 0;
  const LAT_CAP = 1 << 21;
  const lat = new Float64Array(LAT_CAP); // ns, sampled over the measured window
  let nlat = 0;
  let t0 = 0n;

  const worker = async (): Promise<void> => {
    while (!stop) {
      const slot = await I.reserve(q, 3);
      const base = fe.slotAddr(q, slot);
      const blk = random ? Math.floor(Math.random() * blocks) : cursor++ % blocks;
      mem.writeUInt32LE(write ? BlkType.OUT : BlkType.IN, base);
      mem.writeUInt32LE(0, base + 4);
      mem.writeBigUInt64LE(BigInt((blk * bs) / 512), base + 8);
      mem[base + 16] = 0xff;
      const start = process.hrtime.bigint();
      await I.submitChain(q, [[base, 16, false], [base + SLOT_HDR, bs, !write], [base + 16, 1, true]], slot);
      if (mem[base + 16] !== 0) errors++;
      if (measuring) {
        ios++;
        if (nlat < LAT_CAP) lat[nlat++] = Number(process.hrtime.bigint() - start);
      }
    }
  };

  const workers = Array.from({ length: qd }, worker);
  await new Promise((r) => setTimeout(r, rampMs));
  measuring = true;
  t0 = process.hrtime.bigint();
  await new Promise((r) => setTimeout(r, runtimeMs));
  measuring = false;
  const elapsedNs = Number(process.hrtime.bigint() - t0);
  stop = true;
  await Promise.all(workers);
  fe.close();

  const sorted = lat.subarray(0, nlat).sort();
  const iops = ios / (elapsedNs / 1e9);
  const side = {
    io_bytes: ios * bs,
    iops,
    bw_bytes: iops * bs,
    clat_ns: {
      mean: nlat ? sorted.reduce((x, y) => x + y, 0) / nlat : 0,
      percentile: { '50.000000': percentile(sorted, 50), '99.000000': percentile(sorted, 99) },
    },
  };
  const zero = { io_bytes: 0, iops: 0, bw_bytes: 0, clat_ns: { mean: 0, percentile: {} } };
  const doc = {
    'fio version': 'vstore vhost-blk-driver',
    jobs: [{ jobname: rw, error: errors, read: write ? zero : side, write: write ? side : zero, job_runtime: Math.round(elapsedNs / 1e6) }],
  };
  writeFileSync(a.output!, JSON.stringify(doc, null, 2) + '\n');
  if (errors) console.error(`driver: ${errors} requests completed with a non-zero status`);
}

/** A volume that does nothing: completes every request at once, touching no data. */
function nullVolume(size: number): Volume {
  const done = (): Promise<void> => Promise.resolve();
  return {
    size,
    limits: { minimum: 512, preferred: 4096, maximum: 32 * 1024 * 1024 },
    caps: { readOnly: false, flush: false, fua: false, trim: false, writeZeroes: false, fastZero: false, blockStatus: false, prefetch: false, multiConn: true },
    read: done,
    write: done,
    flush: done,
    trim: done,
    writeZeroes: done,
    prefetch: done,
    blockStatus: async (offset: number, length: number) => [{ offset, length, type: 0 }] as never,
    close: done,
  };
}

async function serveNull(a: Record<string, string>): Promise<void> {
  const logger = createLogger({ level: 'warn' });
  const device = new VirtioBlkDevice({ volume: nullVolume(Number(a.size ?? 2 ** 30)), logger, numQueues: 1 });
  const server = await VhostUserServer.listen({ path: a.socket!, device, logger });
  const stop = async (): Promise<void> => {
    await server.close();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

const [cmd, ...rest] = process.argv.slice(2);
const args = parseArgs(rest);
const main = cmd === 'serve-null' ? serveNull : cmd === 'run' ? run : null;
if (!main) {
  console.error('usage: vhost-blk-driver run|serve-null --socket S ...');
  process.exit(2);
}
main(args).catch((e: unknown) => {
  console.error(`driver: ${e instanceof Error ? e.stack : String(e)}`);
  process.exit(1);
});
