/**
 * A real guest on a replicated disk while a storage node is killed: `vstore resolver serve`, two
 * `vstore node` processes and `vstore serve` export a volume with two replicas; QEMU (TCG)
 * attaches it as a virtio-blk drive. The guest makes an ext2 filesystem and writes files; when it
 * announces the long write phase, node n2 is SIGKILLed. The guest must see no I/O error (dmesg,
 * its own checks); n2 is restarted and resynced; then each replica's file, checked on the host
 * with e2fsck, is a clean filesystem whose files match the guest's checksums.
 */
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { requireCommands, run, runGuest, tempDir } from '../helpers/index.js';
import { startDaemonWith, startResolverService, startStorageNode, type DaemonProc, type NodeProc } from '../helpers/cluster.js';

beforeAll(() => requireCommands('qemu-system-x86_64', 'e2fsck', 'debugfs'));

const SCRIPT = String.raw`
/sbin/mke2fs -q -F -t ext2 -b 4096 /dev/vda
mount -t ext2 /dev/vda /target
dd if=/dev/urandom of=/target/before bs=1M count=2 2>/dev/null
sync
result phase writing
i=0
while [ $i -lt 12 ]; do
  dd if=/dev/urandom of=/target/f$i bs=1M count=1 conv=fsync 2>/dev/null || result ioerr "dd f$i"
  i=$((i+1))
done
sync
cd /target && sha256sum before f* > SUMS && cd /
while read h f; do result sum "$f" "$h"; done < /target/SUMS
umount /target
sync
if dmesg | grep -qiE 'I/O error|blk_update_request|Buffer I/O'; then result ioerr dmesg; else result ioerr no; fi
result done 1
`;

async function inSync(d: DaemonProc): Promise<boolean> {
  const s = await d.get<{ vms: Array<{ disks: Array<{ replication?: { replicas: Array<{ state: string; up: boolean }> } }> }> }>('/v1/status');
  return s.vms[0]!.disks[0]!.replication!.replicas.every((r) => r.state === 'in-sync' && r.up);
}

describe('guest on a replicated disk (QEMU TCG, virtio-blk over the daemon NBD export)', () => {
  it('a node killed while the guest writes: no guest I/O error; after resync both replicas hold the same clean filesystem', async () => {
    const dir = tempDir('vst-e2e-repl-');
    const resolver = await startResolverService(path.join(dir, 'resolver'));
    const nodes: NodeProc[] = [
      await startStorageNode({ id: 'n1', data: path.join(dir, 'n1'), resolver: resolver.url }),
      await startStorageNode({ id: 'n2', data: path.join(dir, 'n2'), resolver: resolver.url }),
    ];
    const daemon = await startDaemonWith(path.join(dir, 'host'), {
      resolver: { url: resolver.url },
      vms: [{ name: 'vm1', disks: [{ name: 'disk0', volume: { size: '64M', replicas: 2 } }] }],
    });
    try {
      let killed: Promise<void> | null = null;
      const g = await runGuest({
        script: SCRIPT,
        qemuArgs: ['-drive', `file=nbd:unix:${daemon.diskSocket('vm1', 'disk0')},format=raw,if=virtio,cache=none`],
        onResult: (key) => {
          if (key === 'phase' && !killed) killed = nodes[1]!.kill();
        },
      });
      expect(killed, g.serial.slice(-3000)).not.toBeNull();
      await killed;
      if (g.exitCode !== 0) throw new Error(`guest failed (exit ${g.exitCode}):\n${g.serial.slice(-5000)}`);
      expect(g.map.get('done')).toBe('1');
      expect(g.map.get('ioerr'), g.serial.slice(-3000)).toBe('no');
      const sums = g.results.filter((r) => r.key === 'sum').map((r) => r.value.split(' ') as [string, string]);
      expect(sums).toHaveLength(13);

      nodes[1] = await startStorageNode({ id: 'n2', data: path.join(dir, 'n2'), resolver: resolver.url });
      const deadline = Date.now() + 60_000;
      while (!(await inSync(daemon))) {
        if (Date.now() > deadline) throw new Error(`no resync:\n${daemon.log().slice(-4000)}`);
        await new Promise((r) => setTimeout(r, 200));
      }
      for (const n of nodes) {
        const img = n.volumeFile('vm1/disk0');
        const fsck = await run('e2fsck', ['-fn', img], { check: false });
        expect(fsck.code, `${n.id}: ${fsck.stdout}${fsck.stderr}`).toBe(0);
        // The guest's own checksums, as it stored them in the filesystem (the serial console
        // has dropped characters of a long line under load, so it is not the only witness).
        const stored = (await run('debugfs', ['-R', 'cat /SUMS', img])).stdout
          .trim()
          .split('\n')
          .map((l) => l.trim().split(/\s+/) as [string, string]);
        const names = ['before', ...Array.from({ length: 12 }, (_, i) => `f${i}`)];
        expect(stored.map(([, f]) => f).sort(), `${n.id}: SUMS`).toEqual(names.sort());
        for (const [hash, file] of stored) {
          const fromSerial = sums.find(([f]) => f === file)?.[1] ?? '';
          if (/^[0-9a-f]{64}$/.test(fromSerial)) expect(hash, `${n.id}:${file}: SUMS vs console`).toBe(fromSerial);
          const raw = await run('sh', ['-c', `debugfs -R 'cat /${file}' ${img} 2>/dev/null | sha256sum | cut -d' ' -f1`]);
          expect(raw.stdout.trim(), `${n.id}:${file}`).toBe(hash);
        }
      }
      const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', nodes[0]!.volumeFile('vm1/disk0'), nodes[1]!.volumeFile('vm1/disk0')], { check: false });
      expect(cmp.code, cmp.stdout).toBe(0);
    } finally {
      await daemon.stop();
      // (a node killed by the test and not restarted because the test failed first is gone:
      // stopping it would report that instead of the failure)
      for (const n of nodes) if (!n.exited) await n.stop();
      await resolver.stop();
    }
  });
});
