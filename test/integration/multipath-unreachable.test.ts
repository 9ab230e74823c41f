/**
 * A disk whose only node loses every path, through the real daemon: with `onUnreachable: fail`
 * a guest request fails with EIO after failAfterMs (not after the disk's waitTimeoutMs), and with
 * `queue` it waits and completes when a path returns. `vstore status` shows the VM suspended
 * with its action meanwhile, and not once the path is back. The client is qemu-io.
 */
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { requireCommands, run, tempDir } from '../helpers/index.js';
import { startPathCluster } from '../unit/paths/cluster.js';
import { waitFor } from '../unit/paths/wait.js';

beforeAll(() => requireCommands('qemu-io'));

interface VmView {
  suspended?: { action: string; disks: string[]; paused: boolean };
}

describe('a VM whose disk has no reachable path', () => {
  it('fail: EIO after failAfterMs; queue: the request completes when a path returns; status shows the suspension', async () => {
    const dir = tempDir('vst-unreach-');
    const cluster = await startPathCluster(dir, { id: 'one', hosts: ['127.0.0.2'], volumes: ['vf/d', 'vq/d'], size: 16 * 1024 * 1024 });
    const proxy = cluster.proxies[0]!;
    try {
      const d = await cluster.daemon({
        paths: { requestTimeoutMs: 1000, healthIntervalMs: 200, probeTimeoutMs: 300 },
        vms: [
          { name: 'vf', onUnreachable: { action: 'fail', failAfterMs: 1500 }, disks: [{ name: 'd', volume: { name: 'vf/d', size: '16M', replicas: 1, waitTimeoutMs: 120_000 } }] },
          { name: 'vq', onUnreachable: { action: 'queue' }, disks: [{ name: 'd', volume: { name: 'vq/d', size: '16M', replicas: 1 } }] },
        ],
      });
      const vm = async (name: string) => (await d.get<{ vms: Array<VmView & { name: string }> }>('/v1/status')).vms.find((v) => v.name === name)!;
      const io = (name: string, cmd: string) =>
        run('qemu-io', ['-f', 'raw', '-c', cmd, `nbd+unix:///?socket=${d.diskSocket(name, 'd')}`], { check: false, timeoutMs: 60_000 });
      expect((await io('vq', 'write -P 0x5a 0 64k')).code).toBe(0);

      await proxy.cut();
      await waitFor('both VMs suspended', async () => (await vm('vf')).suspended && (await vm('vq')).suspended, 10_000, d.log);
      expect((await vm('vf')).suspended).toMatchObject({ action: 'fail', disks: ['d'], paused: false });
      expect((await vm('vq')).suspended).toMatchObject({ action: 'queue', disks: ['d'] });

      // fail: EIO after failAfterMs (the disk's own waitTimeoutMs is two minutes).
      const t0 = Date.now();
      const failed = await io('vf', 'read 0 4k');
      const took = Date.now() - t0;
      expect(failed.stdout + failed.stderr).toMatch(/Input\/output error/);
      expect(took).toBeGreaterThanOrEqual(1400);
      expect(took).toBeLessThan(15_000);

      // queue: the read waits for the path and then returns the data.
      const queued = io('vq', 'read -P 0x5a 0 64k');
      await new Promise((r) => setTimeout(r, 1500));
      await proxy.restore();
      const q = await queued;
      expect(q.code, q.stdout + q.stderr).toBe(0);
      expect(q.stdout).not.toMatch(/error|mismatch/i);
      await waitFor('no VM suspended', async () => !(await vm('vf')).suspended && !(await vm('vq')).suspended, 10_000, d.log);
      expect((await io('vf', 'read 0 4k')).code).toBe(0);
      const table = await run(process.execPath, [path.resolve('bin/vstore.js'), 'status', '--control', d.control]);
      expect(table.stdout).not.toMatch(/SUSPENDED/);
      await d.stop();
    } finally {
      await cluster.stop();
    }
  }, 120_000);
});
