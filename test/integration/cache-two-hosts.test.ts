/**
 * A VM's disk moves between two hosts that share one etcd resolver and one storage node, each
 * host with its own write-back cache device (`cache.host` hostA / hostB): real `vstore serve`
 * processes, a real `vstore node`, a real etcd.
 *
 * Host A acknowledges and flushes writes into its cache while the storage node cannot take them
 * (SIGSTOP), then dies (SIGKILL): the data exists only on A's cache device, and the volume's
 * record in etcd says so (`dirtyHost: hostA`). Host B must refuse the disk (a clear error naming
 * hostA and the way out) instead of serving the stale remote copy. A comes back, writes back
 * (`vstore cache flush`), the record is cleared, and B then serves the data A's guest wrote.
 * Then the operator path: A dies dirty again for good; `vstore cache invalidate --volume --force`
 * on B clears the record and B opens the disk (knowingly without A's unwritten data). B writes;
 * when A comes back it finds B as the volume's last writer and drops what its cache holds of the
 * volume (the given-up dirty data and older clean lines) instead of writing it back or serving it.
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { openResolver } from '../../lib/resolver/open.js';
import { silentLogger } from '../../lib/log.js';
import { startDaemonWith, startEtcd, startStorageNode, type DaemonProc } from '../helpers/cluster.js';
import { VSTORE_BIN } from '../helpers/nbd-server.js';
import { requireCommands, run } from '../helpers/run.js';
import { tempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const uri = (sock: string): string => `nbd+unix:///?socket=${sock}`;
const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

describe('write-back cache and a disk moving between hosts (etcd, real daemons and node)', () => {
  it('host B refuses a volume host A holds dirty cache for; after A writes back, B serves A\'s data; invalidate --force is the way out when A is gone', async () => {
    requireCommands('etcd', 'qemu-io', 'nbdcopy');
    const dir = tempDir('vst-cache-2h-');
    const etcd = await startEtcd(dir);
    const node = await startStorageNode({ id: 'n1', data: path.join(dir, 'n1'), resolver: etcd.vstoreUrl });
    const resolver = await openResolver(etcd.vstoreUrl, { logger: silentLogger() });
    // shortCircuit off: the node stands for a storage node on another machine (a local one is
    // written through its file by the daemon, and SIGSTOP would not keep the data dirty).
    const vmConfig = { name: 'vm1', disks: [{ name: 'disk0', volume: { size: '16M', replicas: 1, shortCircuit: false }, cache: { mode: 'write-back' } }] };
    const hostConfig = (host: string, vms: unknown[]): Record<string, unknown> => ({
      resolver: { url: etcd.vstoreUrl },
      cache: { device: path.join(dir, host, 'cache.img'), size: '32M', lineSize: '64K', host },
      vms,
    });
    const daemons: DaemonProc[] = [];
    const addDisk = (d: DaemonProc) =>
      run(process.execPath, [VSTORE_BIN, 'vm', 'add', '-', '--control', d.control], { input: JSON.stringify(vmConfig), check: false });
    try {
      // Host A writes 4 MiB (a known pattern) and flushes: durable in A's cache only.
      let a = await startDaemonWith(path.join(dir, 'hostA'), hostConfig('hostA', [vmConfig]));
      daemons.push(a);
      node.child.kill('SIGSTOP'); // the node takes nothing: write-back cannot reach it
      const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 4M', '-c', 'flush', uri(a.diskSocket('vm1', 'disk0'))]);
      expect(w.stdout).not.toMatch(/error|failed/i);
      expect((await resolver.getName('vm1/disk0'))?.dirtyHost).toBe('hostA');
      await a.kill();
      node.child.kill('SIGCONT');

      // Host B: the disk is refused, with the reason and the way out.
      const b = await startDaemonWith(path.join(dir, 'hostB'), hostConfig('hostB', []));
      daemons.push(b);
      const refused = await addDisk(b);
      expect(refused.code).not.toBe(0);
      expect(refused.stderr).toMatch(/host hostA holds dirty cache for volume vm1\/disk0/);
      expect(refused.stderr).toMatch(/vstore cache flush|invalidate --volume vm1\/disk0 --force/);
      const status = JSON.parse((await run(process.execPath, [VSTORE_BIN, 'status', '--json', '--control', b.control])).stdout) as { vms?: unknown[] };
      expect(JSON.stringify(status.vms ?? [])).not.toMatch(/disk0/);

      // A comes back: its cache replays the dirty data and writes it back on `cache flush`.
      a = await startDaemonWith(path.join(dir, 'hostA'), hostConfig('hostA', [vmConfig]));
      daemons.push(a);
      await expect.poll(() => a.log(), { timeout: 10_000 }).toMatch(/dirty data from an earlier run/);
      const flush = await run(process.execPath, [VSTORE_BIN, 'cache', 'flush', 'vm1/disk0', '--control', a.control], { timeoutMs: 60_000 });
      expect(flush.stdout).toMatch(/written back, 0B dirty/);
      await expect.poll(async () => (await resolver.getName('vm1/disk0'))?.dirtyHost, { timeout: 10_000 }).toBeUndefined();
      await a.stop(true);
      // The node's own copy now holds what A's guest wrote.
      const onNode = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5a 0 4M', node.volumeFile('vm1/disk0')]);
      expect(onNode.stdout).not.toMatch(/Pattern verification failed/);

      // B opens the disk now and serves A's data.
      const added = await addDisk(b);
      expect(added.code, added.stderr).toBe(0);
      const r = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5a 0 4M', '-c', 'read -P 0 4M 12M', uri(b.diskSocket('vm1', 'disk0'))]);
      expect(r.stdout).not.toMatch(/Pattern verification failed|error/i);
      await run(process.execPath, [VSTORE_BIN, 'vm', 'remove', 'vm1', '--control', b.control]);
      expect((await resolver.getName('vm1/disk0'))?.dirtyHost).toBeUndefined();

      // A dies dirty again and does not come back: the operator drops its record on B.
      a = await startDaemonWith(path.join(dir, 'hostA'), hostConfig('hostA', [vmConfig]));
      daemons.push(a);
      node.child.kill('SIGSTOP');
      await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 0 1M', '-c', 'flush', uri(a.diskSocket('vm1', 'disk0'))]);
      expect((await resolver.getName('vm1/disk0'))?.dirtyHost).toBe('hostA');
      await a.kill();
      node.child.kill('SIGCONT');
      // Write-back requests A sent into the stopped node's socket before it died are still read
      // and applied by the node now (nothing fences a dead host's in-flight I/O): let them land.
      await new Promise((r) => setTimeout(r, 1000));
      expect((await addDisk(b)).code).not.toBe(0);
      const inv = await run(process.execPath, [VSTORE_BIN, 'cache', 'invalidate', '--volume', 'vm1/disk0', '--force', '--control', b.control]);
      expect(inv.stdout).toMatch(/dirty-cache record cleared/);
      const again = await addDisk(b);
      expect(again.code, again.stderr).toBe(0);
      // What B serves is the node's copy: the first write-back (0x5a) outside the first MiB, and
      // in it 0x5a or whatever of A's 0x77 reached the node before A died.
      const copy = path.join(dir, 'copy.img');
      await run('nbdcopy', [uri(b.diskSocket('vm1', 'disk0')), copy]);
      const served = readFileSync(copy);
      expect(sha(served)).toBe(sha(readFileSync(node.volumeFile('vm1/disk0')).subarray(0, 16 * MiB)));
      const rest = Buffer.alloc(15 * MiB);
      rest.fill(0x5a, 0, 3 * MiB);
      expect(sha(served.subarray(MiB))).toBe(sha(rest));
      expect(served.subarray(0, MiB).every((x) => x === 0x5a || x === 0x77)).toBe(true);

      // B writes over the region A's given-up data covered, and lets the disk go. When A comes
      // back, the record says B wrote last: A drops what its cache holds of the volume (the
      // dirty 0x77 the operator gave up, and clean lines of 0x5a older than B's writes) instead
      // of writing it back over B's data or serving it.
      const bw = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 0 2M', '-c', 'flush', uri(b.diskSocket('vm1', 'disk0'))]);
      expect(bw.stdout).not.toMatch(/error|failed/i);
      await run(process.execPath, [VSTORE_BIN, 'vm', 'remove', 'vm1', '--control', b.control]);
      expect((await resolver.getName('vm1/disk0'))?.lastWriter).toBe('hostB');
      const shown = await run(process.execPath, [VSTORE_BIN, 'resolver', 'show', 'vm1/disk0', '--resolver', etcd.vstoreUrl]);
      expect(shown.stdout).toMatch(/last opened writable on hostB/);
      a = await startDaemonWith(path.join(dir, 'hostA'), hostConfig('hostA', [vmConfig]));
      daemons.push(a);
      await expect.poll(() => a.log(), { timeout: 10_000 }).toMatch(/another host wrote this volume since this host cached it/);
      const ra = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x33 0 2M', '-c', 'read -P 0x5a 2M 2M', '-c', 'read -P 0 4M 12M', uri(a.diskSocket('vm1', 'disk0'))]);
      expect(ra.stdout).not.toMatch(/Pattern verification failed|error/i);
      await run(process.execPath, [VSTORE_BIN, 'cache', 'flush', 'vm1/disk0', '--control', a.control], { timeoutMs: 60_000 });
      await a.stop(true);
      const finalOnNode = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x33 0 2M', '-c', 'read -P 0x5a 2M 2M', node.volumeFile('vm1/disk0')]);
      expect(finalOnNode.stdout).not.toMatch(/Pattern verification failed/);
      expect((await resolver.getName('vm1/disk0'))?.lastWriter).toBe('hostA');
    } finally {
      for (const d of daemons) if (!d.exited) await d.kill();
      node.child.kill('SIGCONT');
      await node.stop();
      await resolver.close();
      await etcd.stop(false);
    }
  }, 180_000);
});
