/**
 * Crash tests of the write-back cache with real processes: `vstore serve` with a write-back
 * cached disk over an image file, killed with SIGKILL at random (seeded) moments while a client
 * writes with periodic flushes, restarted, and checked:
 *   - through the daemon: every block reads back as what was acknowledged before the last
 *     completed FLUSH, or as a later write (never torn, never older, never another block's);
 *   - on the backing file itself after `vstore cache flush` and a clean stop: exactly what the
 *     daemon served.
 * The writer is an NBD client (lib/nbd/client.ts) that knows which writes each flush covered;
 * fio (nbd engine, --verify=crc32c, --fsync) writes a region, the daemon is killed right after
 * fio's final fsync, and `fio --verify_only` checks the region through the restarted daemon and
 * then on the backing file after write-back.
 */
import type { ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { crc32 } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { NbdClientConnection } from '../../lib/nbd/client.js';
import { silentLogger } from '../../lib/log.js';
import { spawnProc } from '../helpers/cluster.js';
import { VSTORE_BIN } from '../helpers/nbd-server.js';
import { requireCommands, run } from '../helpers/run.js';
import { tempDir } from '../helpers/tmp.js';

const BS = 4096;
const DISK = 32 * 1024 * 1024;
const BLOCKS = 1024; // the region the writer uses (4 MiB)
interface Serve {
  child: ChildProcess;
  log: () => string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

async function serve(cfgFile: string, sock: string, control: string): Promise<Serve> {
  // A killed daemon leaves its sockets behind: readiness is their coming back.
  rmSync(sock, { force: true });
  rmSync(control, { force: true });
  const p = await spawnProc(process.execPath, [VSTORE_BIN, 'serve', '-c', cfgFile, '--log-level', 'info'], () => existsSync(sock) && existsSync(control), 30_000);
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => p.child.once('exit', (code, signal) => resolve({ code, signal })));
  return { child: p.child, log: p.log, exited };
}

function setup(seed: number): { dir: string; cfgFile: string; sock: string; control: string; image: string } {
  const dir = tempDir(`vstore-cache-crash-${seed}-`);
  const image = path.join(dir, 'disk.img');
  writeFileSync(image, '');
  truncateSync(image, DISK);
  const sock = path.join(dir, 'run', 'vm-d0.sock');
  const control = path.join(dir, 'control.sock');
  const cfgFile = path.join(dir, 'config.json');
  writeFileSync(
    cfgFile,
    JSON.stringify({
      runDir: path.join(dir, 'run'),
      control,
      cache: { device: path.join(dir, 'cache.img'), size: '24M', lineSize: '64K' },
      vms: [{ name: 'vm', disks: [{ name: 'd0', file: image, cache: { mode: 'write-back' } }] }],
    }),
  );
  return { dir, cfgFile, sock, control, image };
}

/** Block `index` at generation `gen`: a header (magic, index, gen, crc of the rest) and bytes derived from both. */
function block(index: number, gen: number): Buffer {
  const b = Buffer.alloc(BS);
  let x = (index * 2654435761 + gen * 40503) >>> 0 || 1;
  for (let i = 16; i < BS; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b.writeUInt32LE(x >>> 0, i);
  }
  b.writeUInt32LE(0x56535443, 0);
  b.writeUInt32LE(index, 4);
  b.writeUInt32LE(gen, 8);
  b.writeUInt32LE(crc32(b.subarray(16)), 12);
  return b;
}

/** The generation a block holds (0: never written, all zeroes), or an error text when it is damaged. */
function genOf(b: Buffer, index: number): number | string {
  if (b.every((v) => v === 0)) return 0;
  if (b.readUInt32LE(0) !== 0x56535443) return 'bad magic';
  if (b.readUInt32LE(4) !== index) return `holds block ${b.readUInt32LE(4)}`;
  if (crc32(b.subarray(16)) !== b.readUInt32LE(12)) return 'torn or corrupt (crc)';
  return b.readUInt32LE(8);
}

function lcg(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    return x / 2 ** 32;
  };
}

async function connect(sock: string): Promise<NbdClientConnection> {
  return NbdClientConnection.connect({ address: `unix:${sock}`, logger: silentLogger(), timeoutMs: 20_000 });
}

/** Reads the region and checks it against the model; returns the generations read. */
async function verify(c: NbdClientConnection, durable: number[], since: Array<Set<number>>, when: string): Promise<number[]> {
  const region = Buffer.alloc(BLOCKS * BS);
  await c.read(0, region);
  const got: number[] = [];
  const bad: string[] = [];
  for (let i = 0; i < BLOCKS; i++) {
    const g = genOf(region.subarray(i * BS, (i + 1) * BS), i);
    if (typeof g === 'string') bad.push(`block ${i}: ${g}`);
    else if (g !== durable[i] && !since[i]!.has(g)) bad.push(`block ${i}: generation ${g}, flushed ${durable[i]}, written since ${[...since[i]!].join(',') || 'none'}`);
    got.push(typeof g === 'number' ? g : -1);
  }
  expect(bad.slice(0, 10), `${when}: ${bad.length} bad blocks`).toEqual([]);
  return got;
}

describe('write-back cache under kill -9 (real vstore serve)', () => {
  for (const seed of [11, 23, 37]) {
    it(`seed ${seed}: flushed writes survive kills at random moments, then reach the backing file`, async () => {
      const rand = lcg(seed);
      const { cfgFile, sock, control, image } = setup(seed);
      const durable = new Array<number>(BLOCKS).fill(0);
      const since: Array<Set<number>> = Array.from({ length: BLOCKS }, () => new Set());
      let gen = 1;
      let replays = 0;
      let flushesDone = 0;
      for (let round = 0; round < 3; round++) {
        const d = await serve(cfgFile, sock, control);
        const c = await connect(sock);
        if (round > 0) {
          const got = await verify(c, durable, since, `after kill ${round}`);
          got.forEach((g, i) => {
            durable[i] = g;
            since[i]!.clear();
          });
          if (/dirty data from an earlier run/.test(d.log())) replays++;
        }
        // Write until the kill: batches of 8 distinct blocks in parallel, a FLUSH after every
        // second batch; the kill comes at a random moment (0.3 - 1.5 s in).
        const killAt = 300 + Math.floor(rand() * 1200);
        const killer = setTimeout(() => d.child.kill('SIGKILL'), killAt);
        try {
          for (let batch = 0; ; batch++) {
            const blocks = new Set<number>();
            while (blocks.size < 8) blocks.add(Math.floor(rand() * BLOCKS));
            await Promise.all(
              [...blocks].map((b) => {
                const g = gen++;
                since[b]!.add(g); // may land from now on, acknowledged or not
                return c.write(b * BS, block(b, g));
              }),
            );
            if (batch % 2 === 1) {
              const latest = [...blocks];
              await c.flush();
              flushesDone++;
              // Everything acknowledged before the flush is durable: the newest generation of
              // every block written so far (no write was in flight during the flush).
              for (let i = 0; i < BLOCKS; i++) {
                if (since[i]!.size) {
                  durable[i] = Math.max(...since[i]!);
                  since[i]!.clear();
                }
              }
              void latest;
            }
          }
        } catch {
          // the daemon died under the writer
        } finally {
          clearTimeout(killer);
        }
        await d.exited;
        await c.close().catch(() => {});
      }
      // Final: restart, check, write back with the CLI, stop cleanly, compare the backing file.
      const d = await serve(cfgFile, sock, control);
      const c = await connect(sock);
      const got = await verify(c, durable, since, 'final restart');
      if (/dirty data from an earlier run/.test(d.log())) replays++;
      const viaDaemon = Buffer.alloc(BLOCKS * BS);
      await c.read(0, viaDaemon);
      await c.close();
      const flush = await run(process.execPath, [VSTORE_BIN, 'cache', 'flush', 'vm/d0', '--control', control], { timeoutMs: 60_000 });
      expect(flush.stdout).toMatch(/vm\/d0: written back, 0B dirty/);
      const stats = JSON.parse((await run(process.execPath, [VSTORE_BIN, 'cache', 'stats', 'vm/d0', '--json', '--control', control])).stdout) as { dirtyBytes: number };
      expect(stats.dirtyBytes).toBe(0);
      d.child.kill('SIGTERM');
      expect((await d.exited).code).toBe(0);
      const onFile = readFileSync(image).subarray(0, BLOCKS * BS);
      const diff: number[] = [];
      for (let i = 0; i < BLOCKS; i++) if (!onFile.subarray(i * BS, (i + 1) * BS).equals(viaDaemon.subarray(i * BS, (i + 1) * BS))) diff.push(i);
      expect(diff.slice(0, 10), `${diff.length} blocks differ on the backing file`).toEqual([]);
      // The run must have exercised what it claims: flushes completed, and dirty data was
      // found and written back after at least one kill.
      expect(flushesDone).toBeGreaterThan(0);
      expect(replays).toBeGreaterThan(0);
      expect(got.filter((g) => g > 0).length).toBeGreaterThan(0);
    }, 180_000);
  }

  it('fio --verify=crc32c: a region fio wrote and fsynced verifies after kill -9, through the daemon and on the backing file after write-back', async () => {
    requireCommands('fio');
    const { cfgFile, sock, control, image } = setup(99);
    const uri = `nbd+unix:///?socket=${sock}`;
    const job = ['--name=cachecrash', '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', '--bs=4k', '--size=8M', '--iodepth=16', '--verify=crc32c', '--verify_state_save=0', '--randseed=7'];
    let d = await serve(cfgFile, sock, control);
    // writes with an fsync every 32 writes and at the end, no verify pass yet
    await run('fio', [...job, '--fsync=32', '--end_fsync=1', '--do_verify=0'], { timeoutMs: 120_000 });
    d.child.kill('SIGKILL'); // at once: write-back of the last epochs is usually still under way
    await d.exited;
    d = await serve(cfgFile, sock, control);
    const mode = JSON.parse((await run(process.execPath, [VSTORE_BIN, 'cache', 'stats', 'vm/d0', '--json', '--control', control])).stdout) as { mode: string };
    expect(mode.mode).toBe('write-back');
    const r1 = await run('fio', [...job, '--verify_only'], { timeoutMs: 120_000, check: false });
    expect(r1.code, `fio verify through the daemon:\n${r1.stdout}\n${r1.stderr}`).toBe(0);
    await run(process.execPath, [VSTORE_BIN, 'cache', 'flush', 'vm/d0', '--control', control], { timeoutMs: 60_000 });
    d.child.kill('SIGTERM');
    expect((await d.exited).code).toBe(0);
    const fileJob = job.map((a) => (a === '--ioengine=nbd' ? '--ioengine=psync' : a.startsWith('--uri=') ? `--filename=${image}` : a));
    const r2 = await run('fio', [...fileJob, '--verify_only'], { timeoutMs: 120_000, check: false });
    expect(r2.code, `fio verify on the backing file:\n${r2.stdout}\n${r2.stderr}`).toBe(0);
  }, 300_000);
});
