/**
 * Multipath failover through the real daemon. A real storage node (`vstore node`) is reached
 * over three paths, one TCP proxy per loopback address (127.0.0.1, .2, .3) that this test cuts
 * (listener closed, connections reset) or blackholes (connections open, nothing forwarded);
 * the node is registered with the three proxy addresses. fio (nbd engine, crc32c verify) writes
 * and verifies through `vstore serve` meanwhile: zero errors and every block verified; the cut
 * path goes down and the VM's requests move to another path; once the path is back it is used
 * again after the failback delay (`paths.failback: { delayMs }`), or only after the operator's
 * failback (`manual`, POST /v1/paths/failback), as the daemon's status and metrics show per path.
 */
import { spawn } from 'node:child_process';
import { request } from 'node:http';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import type { PathStatus } from '../../lib/paths/path.js';
import { MiB, requireCommands, run, tempDir } from '../helpers/index.js';
import { startPathCluster } from '../unit/paths/cluster.js';
import { waitFor } from '../unit/paths/wait.js';

beforeAll(() => requireCommands('fio'));

const SIZE = 64 * MiB;
const FAILBACK_MS = 1500;

interface Status {
  vms: Array<{ name: string; disks: Array<{ errors: number }> }>;
  paths: PathStatus[];
}

/** POST on the control socket; resolves with the HTTP status. */
function post(control: string, urlPath: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath: control, path: urlPath, method: 'POST', headers: { host: 'vstore' } }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode ?? 0));
    });
    req.on('error', reject);
    req.end();
  });
}

describe('multipath to a storage node through the daemon', () => {
  const cases = [
    { how: 'cut', failback: 'delayed' },
    { how: 'blackhole', failback: 'delayed' },
    { how: 'cut', failback: 'manual' },
  ] as const;
  for (const { how, failback } of cases) {
    it(`${how} the VM's path under fio verify: no error, data verified, the path is used again after ${failback === 'manual' ? 'a manual failback' : 'the failback delay'}`, async () => {
      const dir = tempDir(`vst-mp-${how}-`);
      const cluster = await startPathCluster(dir, { id: 'mp', hosts: ['127.0.0.1', '127.0.0.2', '127.0.0.3'], volumes: ['vm1/disk0'], size: SIZE });
      const proxies = cluster.proxies;
      try {
        const d = await cluster.daemon({
          paths: { selector: 'least-pending', failback: failback === 'manual' ? 'manual' : { delayMs: FAILBACK_MS }, requestTimeoutMs: 1500, healthIntervalMs: 300, probeTimeoutMs: 500 },
          vms: [{ name: 'vm1', disks: [{ name: 'disk0', volume: { size: SIZE, replicas: 1, connections: 3 } }] }],
        });
        const status = () => d.get<Status>('/v1/status');
        const st0 = await waitFor('three paths up', async () => {
          const s = await status();
          return s.paths.length === 3 && s.paths.every((p) => p.state === 'up') && s;
        }, 10_000, d.log);
        // The VM's home path: its requests stay there while it is up.
        const home = st0.paths.find((p) => p.vms.includes('vm1'))!;
        const victim = proxies.find((p) => p.address === home.address)!;

        const fio = spawn(
          'fio',
          [
            '--name=mp', '--ioengine=nbd', `--uri=nbd+unix:///?socket=${d.diskSocket('vm1', 'disk0')}`,
            '--rw=randwrite', '--bs=4k', '--iodepth=8', '--size=24M', '--rate_iops=500',
            '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_backlog=256', '--verify_dump=0',
          ],
          { stdio: ['ignore', 'pipe', 'pipe'] },
        );
        let out = '';
        fio.stdout.on('data', (b: Buffer) => (out += b));
        fio.stderr.on('data', (b: Buffer) => (out += b));
        const exited = new Promise<number | null>((r) => fio.once('exit', (c) => r(c)));

        await waitFor('writes on the home path', async () => (await status()).paths.find((p) => p.id === home.id)!.writes > 200, 10_000, d.log);
        // Replies stop first (so requests are caught in flight, whatever fio's pacing), then the
        // cut variant resets the connections and closes the listener.
        victim.blackhole();
        if (how === 'cut') {
          await new Promise((r) => setTimeout(r, 300));
          await victim.cut();
        }
        const down = await waitFor('the home path down', async () => {
          const p = (await status()).paths.find((x) => x.id === home.id)!;
          return p.state === 'down' && p;
        }, 10_000, d.log);
        // Requests go on over the other paths meanwhile.
        const others0 = (await status()).paths.filter((p) => p.id !== home.id).reduce((n, p) => n + p.writes, 0);
        await waitFor('writes on the other paths', async () => (await status()).paths.filter((p) => p.id !== home.id).reduce((n, p) => n + p.writes, 0) > others0 + 300, 10_000, d.log);
        const stuck = (await status()).paths.find((p) => p.id === home.id)!.writes;
        expect(stuck).toBeGreaterThanOrEqual(down.writes);

        await victim.restore();
        const healthyAt = Date.now();
        if (failback === 'manual') {
          // Healthy again, but it waits for the operator.
          await waitFor('the home path healthy, awaiting failback', async () => (await status()).paths.find((p) => p.id === home.id)!.awaitingFailback, 10_000, d.log);
          await new Promise((r) => setTimeout(r, FAILBACK_MS));
          expect((await status()).paths.find((p) => p.id === home.id)!.state).toBe('down');
          expect(await post(d.control, '/v1/paths/failback?node=mp')).toBe(200);
        }
        // Healthy again, but the failback policy keeps it out for FAILBACK_MS.
        const back = await waitFor('the home path up again', async () => {
          const p = (await status()).paths.find((x) => x.id === home.id)!;
          return p.state === 'up' && p;
        }, 15_000, d.log);
        expect(Date.now() - healthyAt).toBeGreaterThanOrEqual(FAILBACK_MS - 200);
        if (failback === 'manual') expect(back.awaitingFailback).toBeUndefined();
        await waitFor('the VM back on its home path', async () => (await status()).paths.find((p) => p.id === home.id)!.writes > back.writes + 100, 10_000, d.log);

        expect(await exited, out).toBe(0);
        expect(out).not.toMatch(/verify: bad|err=\s*[1-9]/);
        // Every block written was read back and verified.
        expect(out).toMatch(/issued rwts: total=6144,6144,/);
        const fin = await status();
        expect(fin.vms[0]!.disks[0]!.errors).toBe(0);
        const h = fin.paths.find((p) => p.id === home.id)!;
        expect(h.downs).toBe(1);
        // The requests caught on the lost path were retried on another one: the replicated layer
        // above never saw the replica fail (no retry or wait of its own was needed).
        expect(h.failovers).toBeGreaterThan(0);
        expect(d.log()).not.toMatch(/"msg":"replica (down|out of sync)|read failed on a replica/);
        // The same through the CLI and the metrics.
        const table = await run(process.execPath, [path.resolve('bin/vstore.js'), 'status', '--control', d.control]);
        expect(table.stdout).toMatch(/FAILOVERS/);
        expect(table.stdout).toContain(home.id);
        const metrics = await d.text('/metrics');
        expect(metrics).toContain(`vstore_path_state{node="mp",path="${home.id}",state="up"} 1`);
        expect(metrics).toMatch(new RegExp(`vstore_path_downs_total\\{node="mp",path="${home.id.replace(/\./g, '\\.')}"\\} 1`));
        await d.stop();
      } finally {
        await cluster.stop();
      }
    }, 90_000);
  }
});
