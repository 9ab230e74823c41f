/**
 * The daemon and storage nodes coordinating through a real etcd: nodes register under leases,
 * the daemon places a volume through etcd and serves it. Then etcd is stopped: the disk that is
 * already served keeps working; a new placement (a disk added at runtime) fails with a clear
 * error; after etcd returns, the same request succeeds.
 */
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { MiB, REPO_ROOT, requireCommands, run, tempDir } from '../helpers/index.js';
import { startDaemonWith, startEtcd, startStorageNode, type NodeProc } from '../helpers/cluster.js';

beforeAll(() => requireCommands('etcd', 'etcdctl', 'qemu-io', 'nbdinfo'));

const VSTORE = path.join(REPO_ROOT, 'bin/vstore.js');
const uri = (sock: string) => `nbd+unix:///?socket=${sock}`;

describe('daemon and nodes over etcd', () => {
  it('serves through an etcd outage; new placements fail clearly while etcd is down and succeed after it returns', async () => {
    const dir = tempDir('vst-etcd-');
    let etcd = await startEtcd(dir);
    const nodes: NodeProc[] = [
      await startStorageNode({ id: 'e1', data: path.join(dir, 'e1'), resolver: etcd.vstoreUrl, zone: 'a' }),
      await startStorageNode({ id: 'e2', data: path.join(dir, 'e2'), resolver: etcd.vstoreUrl, zone: 'b' }),
    ];
    const daemon = await startDaemonWith(path.join(dir, 'host'), {
      resolver: { url: etcd.vstoreUrl },
      vms: [{ name: 'vm1', disks: [{ name: 'disk0', volume: { size: '32M', replicas: 2 } }] }],
    });
    try {
      // The records are in etcd, where etcdctl sees them.
      const keys = await run('etcdctl', ['--endpoints', etcd.url, 'get', '--prefix', '--keys-only', '/vstore/']);
      expect(keys.stdout).toMatch(/nodes\/e1/);
      expect(keys.stdout).toMatch(/nodes\/e2/);
      expect(keys.stdout).toMatch(/names\/vm1\/disk0/);
      const sock = daemon.diskSocket('vm1', 'disk0');
      await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 1M', '-c', 'flush', uri(sock)]);

      await etcd.stop(false); // etcd ends on SIGTERM by the signal
      // The served disk does not need etcd.
      const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 1M 1M', '-c', 'flush', '-c', 'read -P 0x11 0 1M', '-c', 'read -P 0x22 1M 1M', uri(sock)]);
      expect(w.stdout).not.toMatch(/Pattern verification failed|error/i);
      // A new placement fails, and says why.
      const disk = JSON.stringify({ name: 'disk1', volume: { size: '16M', replicas: 2 } });
      const add = await run(process.execPath, [VSTORE, 'disk', 'add', 'vm1', '-', '--control', daemon.control], { input: disk, check: false });
      expect(add.code).not.toBe(0);
      expect(add.stderr).toMatch(/etcd|resolver/i);
      expect(add.stderr).toMatch(/unreachable|unavailable|refused/i);

      etcd = await etcd.restart();
      const deadline = Date.now() + 30_000;
      let ok = await run(process.execPath, [VSTORE, 'disk', 'add', 'vm1', '-', '--control', daemon.control], { input: disk, check: false });
      while (ok.code !== 0 && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 500)); // nodes re-register their leases
        ok = await run(process.execPath, [VSTORE, 'disk', 'add', 'vm1', '-', '--control', daemon.control], { input: disk, check: false });
      }
      expect(ok.code, ok.stderr).toBe(0);
      const info = JSON.parse((await run('nbdinfo', ['--json', uri(daemon.diskSocket('vm1', 'disk1'))])).stdout);
      expect(info.exports[0]['export-size']).toBe(16 * MiB);
    } finally {
      await daemon.stop();
      for (const n of nodes) await n.stop();
      await etcd.stop(false);
    }
  });
});
