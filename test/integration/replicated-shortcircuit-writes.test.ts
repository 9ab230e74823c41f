/**
 * Short-circuit local writes with real processes: `vstore resolver serve`, two `vstore node`
 * processes on unix sockets (each offers `nbd.sock.sc`) and `vstore serve`. fio, qemu-io and
 * qemu-img are the clients; the metric vstore_remote_shortcircuit_writes_total proves which path
 * carried the writes, and strace attached to the daemon shows that a FLUSH is the daemon's own
 * fdatasync of both replicas' files (the nodes are not asked).
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { requireCommands, run } from '../helpers/index.js';
import { startStorageNode, type DaemonProc } from '../helpers/cluster.js';
import { cluster, replicas, stopAll, until, uri } from './shortcircuit-cluster.js';

beforeAll(() => requireCommands('fio', 'qemu-io', 'qemu-img', 'strace'));

const MiB = 1024 * 1024;

/** A short-circuit counter per replica, from /metrics. */
async function metric(d: DaemonProc, name: 'writes' | 'reads'): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  const re = new RegExp(`^vstore_remote_shortcircuit_${name}_total\\{vm="vm1",disk="disk0",replica="([^"]+)"\\} (\\d+)$`, 'gm');
  for (const m of (await d.text('/metrics')).matchAll(re)) out[m[1]!] = Number(m[2]);
  return out;
}

/** fio through the export; resolves with its JSON jobs, fails the test on a non-zero exit. */
async function fio(sock: string, args: string[]): Promise<Array<{ error: number; read: { io_bytes: number }; write: { io_bytes: number } }>> {
  const r = await run('fio', ['--name=scw', '--ioengine=nbd', `--uri=${uri(sock)}`, '--output-format=json', ...args], { timeoutMs: 120_000, check: false });
  expect(r.code, r.stdout + r.stderr).toBe(0);
  return JSON.parse(r.stdout.slice(r.stdout.indexOf('{\n'))).jobs;
}

/**
 * strace attached to the daemon (every thread: libuv's pool does the fdatasync), logging
 * fdatasync/fsync with paths. stop() detaches and returns the lines naming a volume image.
 */
async function straceDaemon(pid: number, out: string): Promise<{ stop(): Promise<string[]> }> {
  const st = spawn('strace', ['-f', '-y', '-e', 'trace=fdatasync,fsync', '-o', out, '-p', String(pid)], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  st.stderr!.on('data', (b: Buffer) => (err += b));
  const exited = new Promise<void>((r) => st.once('exit', () => r()));
  await until('strace attached', async () => /attached/.test(err), 10_000);
  await new Promise((r) => setTimeout(r, 300)); // every thread
  return {
    async stop() {
      st.kill('SIGINT'); // detaches
      await exited;
      return completedImageSyncs(readFileSync(out, 'utf8'));
    },
  };
}

/**
 * The fdatasync/fsync calls on a volume image that returned 0, as "PID CALL(FD<path>)". Calls
 * of several threads at once are split by strace into `<unfinished ...>` and a later
 * `<... fdatasync resumed>) = 0` line of the same thread.
 */
function completedImageSyncs(trace: string): string[] {
  const open = new Map<string, string>();
  const done: string[] = [];
  for (const l of trace.split('\n')) {
    const m = /^(\d+)\s+(.*)$/.exec(l);
    if (!m) continue;
    const [, pid, rest] = m as unknown as [string, string, string];
    if (/^(fdatasync|fsync)\(.*volumes\/vm1\/disk0\.img>/.test(rest)) {
      if (/ = 0$/.test(rest)) done.push(`${pid} ${rest}`);
      else if (/<unfinished \.\.\.>$/.test(rest)) open.set(pid, rest);
    } else if (/^<\.\.\. (fdatasync|fsync) resumed>/.test(rest) && open.has(pid)) {
      if (/ = 0$/.test(rest)) done.push(`${pid} ${open.get(pid)!}`);
      open.delete(pid);
    }
  }
  return done;
}

describe('short-circuit local writes through the daemon', () => {
  it('writes land in both node files by pwrite, fio verifies, a FLUSH is the daemon\'s fdatasync of both files', async () => {
    const c = await cluster('vst-scw-', {}, '128M');
    try {
      const sock = c.daemon.diskSocket('vm1', 'disk0');
      await until('a read-write descriptor of each replica', async () => (await replicas(c.daemon)).every((r) => r.shortCircuit?.writable === true));

      // Writes without a flush: no fdatasync of the images by the daemon (so the check can fail).
      const trace = await straceDaemon(c.daemon.child.pid!, path.join(c.dir, 'strace-a.txt'));
      await fio(sock, ['--rw=write', '--bs=1M', '--iodepth=4', '--size=16M', '--refill_buffers']);
      const none = await trace.stop();
      expect(none, none.join('\n')).toEqual([]);
      const w1 = await metric(c.daemon, 'writes');
      expect(w1.n1).toBeGreaterThanOrEqual(16);
      expect(w1.n2).toBeGreaterThanOrEqual(16);

      // A FLUSH: the daemon fdatasyncs both nodes' files itself.
      const trace2 = await straceDaemon(c.daemon.child.pid!, path.join(c.dir, 'strace-b.txt'));
      await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 32M 1M', '-c', 'flush', uri(sock)]);
      const synced = await trace2.stop();
      for (const n of c.nodes) expect(synced.some((l) => l.includes(n.volumeFile('vm1/disk0'))), `${n.id}: ${synced.join('\n')}`).toBe(true);

      // fio with crc32c verification, small and large random writes with FUA-free and fsync'd phases.
      const jobs = await fio(sock, ['--rw=randwrite', '--bsrange=4k-256k', '--iodepth=16', '--size=48M', '--offset=48M', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--fsync=7']);
      expect(jobs[0]!.error).toBe(0);
      expect(jobs[0]!.read.io_bytes).toBe(48 * MiB);

      // The node files hold the same bytes, and what the daemon wrote.
      await run('qemu-io', ['-f', 'raw', '-c', 'flush', uri(sock)]);
      const [a, b] = c.nodes.map((n) => n.volumeFile('vm1/disk0'));
      const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a!, b!], { check: false });
      expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
      const r = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x5a 32M 1M', a!]);
      expect(r.stdout).not.toMatch(/Pattern verification failed/);
      const w2 = await metric(c.daemon, 'writes');
      expect(w2.n1! - w1.n1!).toBeGreaterThan(100);
      expect(w2.n2! - w1.n2!).toBeGreaterThan(100);
    } finally {
      await stopAll(c);
    }
  });

  it('kill -9 of a node mid fio write job: no fio error, out of sync, resynced through the node, files identical, local writes resume', async () => {
    const c = await cluster('vst-scw-kill-', { waitTimeoutMs: 30_000 }, '128M');
    try {
      const sock = c.daemon.diskSocket('vm1', 'disk0');
      await until('read-write descriptors', async () => (await replicas(c.daemon)).every((r) => r.shortCircuit?.writable === true));
      const job = fio(sock, [
        '--rw=randwrite', '--bsrange=4k-1M', '--iodepth=16', '--numjobs=2', '--size=48M', '--offset_increment=48M',
        '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_dump=0',
      ]);
      await new Promise((r) => setTimeout(r, 1500));
      const before = await metric(c.daemon, 'writes');
      expect(before.n2).toBeGreaterThan(0); // n2 was written locally before it died
      await c.nodes[1]!.kill();
      await until('n2 out of sync, descriptor dropped', async () => {
        const r = (await replicas(c.daemon)).find((x) => x.id === 'n2')!;
        return r.state === 'out-of-sync' && r.shortCircuit?.active !== true;
      });
      await new Promise((r) => setTimeout(r, 1000));
      const atDeath = (await metric(c.daemon, 'writes')).n2!;
      expect((await replicas(c.daemon)).find((x) => x.id === 'n2')!.dirtyBytes).toBeGreaterThan(0);
      c.nodes[1] = await startStorageNode({ id: 'n2', data: path.join(c.dir, 'n2'), resolver: c.resolver.url });
      const jobs = await job;
      for (const j of jobs) {
        expect(j.error).toBe(0);
        expect(j.read.io_bytes).toBe(48 * MiB);
      }
      await until('both in sync, n2 with a read-write descriptor again', async () =>
        (await replicas(c.daemon)).every((r) => r.state === 'in-sync' && r.up && r.shortCircuit?.writable === true), 60_000);
      // While out of sync and resyncing, n2 took no local write (resync goes through the node).
      expect((await metric(c.daemon, 'writes')).n2).toBe(atDeath);
      expect(c.daemon.log()).toMatch(/resync/i);
      await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 0 4M', '-c', 'flush', uri(sock)]);
      expect((await metric(c.daemon, 'writes')).n2!).toBeGreaterThan(atDeath);
      const [a, b] = c.nodes.map((n) => n.volumeFile('vm1/disk0'));
      const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a!, b!], { check: false });
      expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
    } finally {
      await stopAll(c);
    }
  });

  it('shortCircuitWrites: false: reads stay local, writes go over NBD', async () => {
    const c = await cluster('vst-scw-off-', { shortCircuitWrites: false }, '128M');
    try {
      const sock = c.daemon.diskSocket('vm1', 'disk0');
      await until('read-only descriptors', async () => (await replicas(c.daemon)).every((r) => r.shortCircuit?.active === true));
      await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x42 0 1M', '-c', 'read -P 0x42 0 1M', '-c', 'flush', uri(sock)]);
      const w = await metric(c.daemon, 'writes');
      expect(w.n1 ?? 0).toBe(0);
      expect(w.n2 ?? 0).toBe(0);
      const reads = await metric(c.daemon, 'reads');
      expect((reads.n1 ?? 0) + (reads.n2 ?? 0)).toBeGreaterThan(0);
      expect((await replicas(c.daemon)).every((r) => r.shortCircuit?.writable === false)).toBe(true);
    } finally {
      await stopAll(c);
    }
  });
});
