/**
 * Replicated remote volumes through the daemon, with real processes: `vstore resolver serve`,
 * two (three) `vstore node` processes and `vstore serve`, and real clients (fio's nbd engine,
 * qemu-io, qemu-img). A node is SIGKILLed under load: the client sees no error and verifies its
 * data; the node restarts and is resynced; the replicas end byte-identical (qemu-img compare).
 */
import { spawn } from 'node:child_process';
import { statSync } from 'node:fs';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { MiB, requireCommands, run, tempDir } from '../helpers/index.js';
import { startDaemonWith, startReplicatedCluster, startResolverService, startStorageNode, type DaemonProc, type NodeProc } from '../helpers/cluster.js';

beforeAll(() => requireCommands('fio', 'qemu-io', 'qemu-img', 'nbdinfo'));

interface ReplicaView {
  id: string;
  state: string;
  up: boolean;
  dirtyBytes: number;
}
interface StatusView {
  vms: Array<{ name: string; disks: Array<{ name: string; file: string; replication?: { name: string; replicas: ReplicaView[] } }> }>;
}

async function replicas(d: DaemonProc, vm = 'vm1', disk = 'disk0'): Promise<ReplicaView[]> {
  const s = await d.get<StatusView>('/v1/status');
  return s.vms.find((v) => v.name === vm)!.disks.find((x) => x.name === disk)!.replication!.replicas;
}

async function until(what: string, cond: () => Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function uri(sock: string): string {
  return `nbd+unix:///?socket=${sock}`;
}

describe('replicated volume through the daemon (resolver service, two node processes)', () => {
  it('places the volume on both nodes, serves it, and writes land on both replicas', async () => {
    const { resolver, nodes, daemon } = await startReplicatedCluster('vst-repl-');
    try {
      const info = JSON.parse((await run('nbdinfo', ['--json', uri(daemon.diskSocket('vm1', 'disk0'))])).stdout);
      expect(info.exports[0]['export-size']).toBe(64 * MiB);
      // Where it lives, as the resolver says.
      const show = await run(process.execPath, [path.resolve('bin/vstore.js'), 'resolver', 'show', 'vm1/disk0', '--resolver', resolver.url, '--json']);
      const rec = JSON.parse(show.stdout);
      expect(rec.replicas.map((r: { node: string }) => r.node).sort()).toEqual(['n1', 'n2']);
      await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 1M 3M', '-c', 'flush', uri(daemon.diskSocket('vm1', 'disk0'))]);
      for (const n of nodes) {
        const r = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x5a 1M 3M', '-c', 'read -P 0 0 1M', n.volumeFile('vm1/disk0')]);
        expect(r.stdout, `${n.id}: ${r.stdout}`).not.toMatch(/Pattern verification failed/);
      }
      expect((await replicas(daemon)).map((r) => r.state)).toEqual(['in-sync', 'in-sync']);
      // Operators see the same in `vstore status` and the metrics.
      const st = await run(process.execPath, [path.resolve('bin/vstore.js'), 'status', '--control', daemon.control]);
      expect(st.stdout).toMatch(/REPLICAS/);
      expect(st.stdout).toMatch(/n1:in-sync n2:in-sync|n2:in-sync n1:in-sync/);
      expect(st.stdout).toMatch(/volume vm1\/disk0 \(2 replicas\)/);
      expect(await daemon.text('/metrics')).toMatch(/vstore_replica_in_sync\{vm="vm1",disk="disk0",replica="n1"\} 1/);
    } finally {
      await daemon.stop();
      for (const n of nodes) await n.stop();
      await resolver.stop();
    }
  });

  it('kill -9 of a node under an fio verify job: no error, the node resyncs, the replicas end identical', async () => {
    const { dir, resolver, nodes, daemon } = await startReplicatedCluster('vst-repl-kill-', { waitTimeoutMs: 30_000 }, '128M');
    try {
      const sock = daemon.diskSocket('vm1', 'disk0');
      // Write phase then verify phase, 2 jobs x QD 16 over 2 x 48 MiB; a node dies in the middle.
      const fio = spawn(
        'fio',
        [
          '--name=repl', '--ioengine=nbd', `--uri=${uri(sock)}`, '--rw=randwrite', '--bsrange=4k-64k',
          '--iodepth=16', '--numjobs=2', '--size=48M', '--offset_increment=48M',
          '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_dump=0', '--output-format=json',
        ],
        { stdio: ['ignore', 'pipe', 'pipe'] },
      );
      let fioOut = '';
      fio.stdout.on('data', (b: Buffer) => (fioOut += b));
      fio.stderr.on('data', (b: Buffer) => (fioOut += b));
      const fioDone = new Promise<number | null>((r) => fio.once('exit', (c) => r(c)));
      // Let it write for a while, then kill n2 mid-stream.
      await new Promise((r) => setTimeout(r, 1500));
      await nodes[1]!.kill();
      await until('n2 marked out of sync', async () => (await replicas(daemon)).find((r) => r.id === 'n2')!.state === 'out-of-sync');
      await new Promise((r) => setTimeout(r, 1000)); // degraded writes accumulate dirty regions
      const dirty = (await replicas(daemon)).find((r) => r.id === 'n2')!.dirtyBytes;
      nodes[1] = await startStorageNode({ id: 'n2', data: path.join(dir, 'n2'), resolver: resolver.url });
      const code = await fioDone;
      expect(code, fioOut).toBe(0);
      const jobs = JSON.parse(fioOut.slice(fioOut.indexOf('{\n'))).jobs as Array<{ error: number; read: { io_bytes: number } }>;
      for (const j of jobs) {
        expect(j.error, fioOut).toBe(0);
        expect(j.read.io_bytes).toBe(48 * MiB); // everything written was read back and verified
      }
      expect(dirty).toBeGreaterThan(0);
      await until('both replicas in sync', async () => (await replicas(daemon)).every((r) => r.state === 'in-sync' && r.up), 60_000);
      // The daemon's log tells the story: out of sync, resync with progress, in sync.
      expect(daemon.log()).toMatch(/resync/i);
      await run('qemu-io', ['-f', 'raw', '-c', 'flush', uri(sock)]);
      const a = nodes[0]!.volumeFile('vm1/disk0');
      const b = nodes[1]!.volumeFile('vm1/disk0');
      expect(statSync(a).size).toBe(128 * MiB);
      const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a, b], { check: false });
      expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
    } finally {
      await daemon.stop();
      for (const n of nodes) await n.stop();
      await resolver.stop();
    }
  });

  it('with every replica gone, I/O waits; it completes when a node returns', async () => {
    const dir = tempDir('vst-repl-wait-');
    const resolver = await startResolverService(path.join(dir, 'resolver'));
    let node = await startStorageNode({ id: 'solo', data: path.join(dir, 'solo'), resolver: resolver.url });
    const daemon = await startDaemonWith(path.join(dir, 'host'), {
      resolver: { url: resolver.url },
      vms: [{ name: 'vm1', disks: [{ name: 'disk0', volume: { size: '16M', replicas: 1, waitTimeoutMs: 20_000 } }] }],
    });
    try {
      const sock = daemon.diskSocket('vm1', 'disk0');
      await node.kill();
      const started = Date.now();
      const writer = run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 0 1M', '-c', 'flush', uri(sock)], { timeoutMs: 30_000 });
      await new Promise((r) => setTimeout(r, 1500));
      node = await startStorageNode({ id: 'solo', data: path.join(dir, 'solo'), resolver: resolver.url });
      const w = await writer;
      expect(w.stdout).toMatch(/wrote 1048576\/1048576 bytes/);
      expect(Date.now() - started).toBeGreaterThan(1000); // it waited for the node
      const r = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x33 0 1M', node.volumeFile('vm1/disk0')]);
      expect(r.stdout).not.toMatch(/Pattern verification failed/);
    } finally {
      await daemon.stop();
      await node.stop();
      await resolver.stop();
    }
  });
});

describe('any NBD server as a storage node', () => {
  it('a volume on an nbdkit and a qemu-nbd node: qemu-img and fio through the daemon; both servers hold the data', async () => {
    requireCommands('nbdkit', 'qemu-nbd');
    const dir = tempDir('vst-repl-static-');
    const resolver = await startResolverService(path.join(dir, 'resolver'));
    const vstore = (args: string[]) => run(process.execPath, [path.resolve('bin/vstore.js'), 'resolver', ...args, '--resolver', resolver.url]);
    const SIZE = 64 * MiB;
    const imgA = path.join(dir, 'nbdkit.img');
    const imgB = path.join(dir, 'qemu-nbd.img');
    await run('truncate', ['-s', String(SIZE), imgA]);
    await run('truncate', ['-s', String(SIZE), imgB]);
    const sockA = path.join(dir, 'nbdkit.sock');
    const sockB = path.join(dir, 'qemu-nbd.sock');
    const { spawnProc } = await import('../helpers/cluster.js');
    const { existsSync } = await import('node:fs');
    const nbdkit = await spawnProc('nbdkit', ['--foreground', '--unix', sockA, '--exportname', 'vm1-disk0', 'file', imgA], () => existsSync(sockA));
    const qnbd = await spawnProc('qemu-nbd', ['-f', 'raw', '-t', '--cache=none', '--aio=threads', '-x', 'vm1-disk0', '-k', sockB, '--shared=4', imgB], () => existsSync(sockB));
    let daemon: DaemonProc | undefined;
    try {
      await vstore(['node', 'add', 'kit', '--nbd', `unix:${sockA}`]);
      await vstore(['node', 'add', 'qn', '--nbd', `unix:${sockB}`]);
      await vstore(['place', 'vm1/disk0', '--size', String(SIZE), '--on', 'kit:vm1-disk0', '--on', 'qn:vm1-disk0']);
      daemon = await startDaemonWith(path.join(dir, 'host'), {
        resolver: { url: resolver.url },
        vms: [{ name: 'vm1', disks: [{ name: 'disk0', volume: { size: SIZE, replicas: 2 } }] }],
      });
      const sock = daemon.diskSocket('vm1', 'disk0');
      const src = path.join(dir, 'src.qcow2');
      await run('qemu-img', ['create', '-f', 'qcow2', src, String(SIZE)]);
      await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xc1 0 8M', '-c', 'write -P 0xc2 40M 3M', src]);
      await run('qemu-img', ['convert', '-n', '-f', 'qcow2', '-O', 'raw', src, uri(sock)]);
      const cmp = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', src, uri(sock)], { check: false });
      expect(cmp.code, cmp.stdout).toBe(0);
      const fio = await run('fio', [
        '--name=static', '--ioengine=nbd', `--uri=${uri(sock)}`, '--rw=randwrite', '--bs=4k', '--iodepth=16',
        '--offset=16M', '--size=16M', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_dump=0',
      ], { timeoutMs: 120_000 });
      expect(fio.stdout + fio.stderr).not.toMatch(/verify: bad|err=\s*[1-9]/);
      await run('qemu-io', ['-f', 'raw', '-c', 'flush', uri(sock)]);
      await daemon.stop();
      daemon = undefined;
      await nbdkit.stop();
      await qnbd.stop();
      const same = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', imgA, imgB], { check: false });
      expect(same.code, same.stdout).toBe(0);
      const first = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', src, imgA], { check: false });
      // The fio region differs from the qcow2 source; everything else is what convert wrote.
      expect(first.stdout).toMatch(/Content mismatch at offset 16777216|Images are identical/);
    } finally {
      await daemon?.stop();
      await nbdkit.stop(false);
      await qnbd.stop(false);
      await resolver.stop();
    }
  });
});

describe('rebuild', () => {
  it('a node gone for good: its replica is rebuilt on a third node, which ends identical', async () => {
    const dir = tempDir('vst-repl-rebuild-');
    const resolver = await startResolverService(path.join(dir, 'resolver'));
    const nodes: NodeProc[] = [
      await startStorageNode({ id: 'r1', data: path.join(dir, 'r1'), resolver: resolver.url, leaseTtlMs: 3000 }),
      await startStorageNode({ id: 'r2', data: path.join(dir, 'r2'), resolver: resolver.url, leaseTtlMs: 3000 }),
    ];
    const daemon = await startDaemonWith(path.join(dir, 'host'), {
      resolver: { url: resolver.url },
      vms: [{ name: 'vm1', disks: [{ name: 'disk0', volume: { size: '32M', replicas: 2, rebuildAfterMs: 2000 } }] }],
    });
    try {
      const sock = daemon.diskSocket('vm1', 'disk0');
      await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x44 0 4M', '-c', 'write -P 0x45 20M 2M', '-c', 'flush', uri(sock)]);
      // The third node joins; r2 dies and never returns.
      nodes.push(await startStorageNode({ id: 'r3', data: path.join(dir, 'r3'), resolver: resolver.url, leaseTtlMs: 3000 }));
      await nodes[1]!.kill();
      await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x46 8M 1M', '-c', 'flush', uri(sock)]);
      await until('r3 in sync in place of r2', async () => {
        const r = await replicas(daemon);
        return r.length === 2 && r.some((x) => x.id === 'r3' && x.state === 'in-sync') && !r.some((x) => x.id === 'r2');
      }, 60_000);
      const show = await run(process.execPath, [path.resolve('bin/vstore.js'), 'resolver', 'show', 'vm1/disk0', '--resolver', resolver.url, '--json']);
      expect(JSON.parse(show.stdout).replicas.map((r: { node: string }) => r.node).sort()).toEqual(['r1', 'r3']);
      const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', nodes[0]!.volumeFile('vm1/disk0'), nodes[2]!.volumeFile('vm1/disk0')], { check: false });
      expect(cmp.code, cmp.stdout).toBe(0);
      const r = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x44 0 4M', '-c', 'read -P 0x46 8M 1M', '-c', 'read -P 0x45 20M 2M', nodes[2]!.volumeFile('vm1/disk0')]);
      expect(r.stdout).not.toMatch(/Pattern verification failed/);
    } finally {
      await daemon.stop();
      for (const n of nodes) if (!n.exited) await n.stop();
      await resolver.stop();
    }
  });
});
