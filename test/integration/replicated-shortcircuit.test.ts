/**
 * Short-circuit local reads with real processes: `vstore resolver serve`, two `vstore node`
 * processes on unix sockets (so on this host: each offers `nbd.sock.sc`) and `vstore serve`.
 * qemu-io through the daemon's export is the client. The metric
 * vstore_remote_shortcircuit_reads_total proves which path served the reads.
 */
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { requireCommands, run } from '../helpers/index.js';
import { startStorageNode, type DaemonProc } from '../helpers/cluster.js';
import { cluster, replicas, until, uri } from './shortcircuit-cluster.js';

beforeAll(() => requireCommands('qemu-io'));

/** vstore_remote_shortcircuit_reads_total per replica, from /metrics. */
async function scReads(d: DaemonProc): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const m of (await d.text('/metrics')).matchAll(/^vstore_remote_shortcircuit_reads_total\{vm="vm1",disk="disk0",replica="([^"]+)"\} (\d+)$/gm)) {
    out[m[1]!] = Number(m[2]);
  }
  return out;
}
const total = (r: Record<string, number>): number => Object.values(r).reduce((a, b) => a + b, 0);

/** qemu-io commands on the export; fails the test when a pattern does not verify. */
async function qio(sock: string, cmds: string[]): Promise<string> {
  const r = await run('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), uri(sock)]);
  expect(r.stdout, r.stdout).not.toMatch(/Pattern verification failed|error|failed/i);
  return r.stdout;
}

describe('short-circuit local reads through the daemon', () => {
  it('reads come from the local files, see every acknowledged write, fall back when a node dies, and resume after its resync', async () => {
    const { dir, resolver, nodes, daemon } = await cluster('vst-sc-', { waitTimeoutMs: 30_000 });
    try {
      const sock = daemon.diskSocket('vm1', 'disk0');
      await until('a short-circuit descriptor of each replica', async () => (await replicas(daemon)).every((r) => r.shortCircuit?.active === true));
      expect(nodes[0]!.log()).not.toMatch(/short-circuit: refused/);

      // Reads return written data, through the local files.
      await qio(sock, ['write -P 0x5a 0 4M', 'flush']);
      const before = total(await scReads(daemon));
      await qio(sock, ['read -P 0x5a 0 4M', 'read -P 0 4M 1M']);
      const after = total(await scReads(daemon));
      expect(after - before).toBeGreaterThanOrEqual(2);

      // A write then a read sees the write at once (same qemu-io process, no flush in between),
      // many times over, at small and odd sizes.
      const cmds: string[] = [];
      for (let i = 0; i < 40; i++) {
        const off = 32 * 1024 * 1024 + (i * 37 + 3) * 4096 + (i % 3) * 512;
        const pat = (i * 11 + 1) % 255 || 7;
        cmds.push(`write -P ${pat} ${off} ${4096 + (i % 5) * 512}`, `read -P ${pat} ${off} ${4096 + (i % 5) * 512}`);
      }
      await qio(sock, cmds);
      expect(total(await scReads(daemon)) - after).toBeGreaterThanOrEqual(40);

      // kill -9 of n1: reads go on (n2's file or NBD), no error, the data is still right.
      await nodes[0]!.kill();
      await until('n1 down and its descriptor dropped', async () => {
        const r = (await replicas(daemon)).find((x) => x.id === 'n1')!;
        return !r.up && r.shortCircuit?.active !== true;
      });
      const n1Before = (await scReads(daemon)).n1 ?? 0;
      await qio(sock, ['write -P 0x33 8M 1M', 'read -P 0x33 8M 1M', 'read -P 0x5a 1M 1M']);
      expect((await scReads(daemon)).n1 ?? 0).toBe(n1Before); // nothing read from the dead node's file
      await until('n1 out of sync', async () => (await replicas(daemon)).find((x) => x.id === 'n1')!.state === 'out-of-sync');

      // n1 returns: resynced, then read locally again; while it was out of sync it served no read.
      nodes[0] = await startStorageNode({ id: 'n1', data: path.join(dir, 'n1'), resolver: resolver.url });
      await until('n1 in sync again with a descriptor', async () => {
        const r = (await replicas(daemon)).find((x) => x.id === 'n1')!;
        return r.state === 'in-sync' && r.up && r.shortCircuit?.active === true;
      }, 60_000);
      expect((await scReads(daemon)).n1 ?? 0).toBe(n1Before);
      // Local reads resume (the least-pending in-sync replica, ties to the first listed) and see
      // the write n1 missed while it was down (resynced into its file).
      const first = (await replicas(daemon))[0]!.id;
      const resumed = (await scReads(daemon))[first] ?? 0;
      for (let i = 0; i < 5; i++) await qio(sock, ['read -P 0x33 8M 1M', 'read -P 0x5a 0 1M']);
      expect((await scReads(daemon))[first] ?? 0).toBeGreaterThan(resumed);
      expect(await daemon.text('/metrics')).toMatch(/vstore_remote_shortcircuit_active\{vm="vm1",disk="disk0",replica="n1"\} 1/);
    } finally {
      await daemon.stop();
      for (const n of nodes) await n.stop(false).catch(() => {});
      await resolver.stop();
    }
  });

  it('shortCircuit: false reads over NBD only', async () => {
    const { resolver, nodes, daemon } = await cluster('vst-sc-off-', { shortCircuit: false });
    try {
      const sock = daemon.diskSocket('vm1', 'disk0');
      await qio(sock, ['write -P 0x42 0 1M', 'read -P 0x42 0 1M']);
      expect(total(await scReads(daemon))).toBe(0);
      expect((await replicas(daemon)).every((r) => r.shortCircuit?.active !== true)).toBe(true);
    } finally {
      await daemon.stop();
      for (const n of nodes) await n.stop(false).catch(() => {});
      await resolver.stop();
    }
  });
});
