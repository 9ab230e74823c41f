/**
 * A storage node that turns hostile under load. The volume has two replicas on two qemu-nbd
 * servers (registered as static nodes); the daemon reaches the second one through a proxy in
 * this test that, on command, injects garbage into the reply stream, cuts a reply short, or
 * rewrites a reply's handle. fio writes and verifies through the daemon's export meanwhile: it
 * must see no error and verify every block (nothing the hostile node sent reached it); the
 * hostile replica is marked out of sync; once the proxy is honest again the replica is resynced,
 * and both images end identical.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import * as net from 'node:net';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { MiB, requireCommands, run, tempDir } from '../helpers/index.js';
import { spawnProc, startDaemonWith, startResolverService } from '../helpers/cluster.js';

beforeAll(() => requireCommands('qemu-nbd', 'fio', 'qemu-img'));

type Mode = 'honest' | 'garbage' | 'short' | 'handle';

/** A unix-socket proxy to `target`; `mode` decides what happens to the next server->client bytes. */
function hostileProxy(listen: string, target: string) {
  const state = { mode: 'honest' as Mode, acted: 0 };
  const server = net.createServer((client) => {
    const up = net.connect(target);
    client.on('data', (b) => up.write(b));
    // While hostile, every chunk the server sends is tampered with (a reconnection's handshake
    // too: the node stays failed until the proxy is honest again).
    up.on('data', (b: Buffer) => {
      const mode = state.mode;
      if (mode === 'honest') return void client.write(b);
      state.acted++;
      if (mode === 'garbage') {
        client.write(Buffer.concat([b.subarray(0, Math.min(7, b.length)), Buffer.from('\xde\xad\xbe\xefGARBAGE-GARBAGE!', 'latin1'), b.subarray(7)]));
      } else if (mode === 'short') {
        client.end(b.subarray(0, Math.max(1, Math.floor(b.length / 2))));
        up.destroy();
      } else if (mode === 'handle') {
        // Simple reply magic 0x67446698 or structured 0x668e33ef: the cookie is bytes 8..16.
        const c = Buffer.from(b);
        if (c.length >= 16) c.writeUInt32BE((c.readUInt32BE(12) ^ 0x5a5a5a5a) >>> 0, 12);
        client.write(c);
      }
    });
    const end = () => {
      client.destroy();
      up.destroy();
    };
    client.on('error', end);
    up.on('error', end);
    client.on('close', end);
    up.on('close', end);
  });
  return new Promise<{ state: typeof state; close: () => Promise<void> }>((resolve) =>
    server.listen(listen, () => resolve({ state, close: () => new Promise((r) => server.close(() => r())) })),
  );
}

interface ReplicaView {
  id: string;
  state: string;
  up: boolean;
}

describe('a hostile storage node', () => {
  for (const mode of ['garbage', 'short', 'handle'] as const) {
    it(`${mode}: fio through the daemon sees no error and verifies; the node is failed, then resynced`, async () => {
      const dir = tempDir(`vst-hostile-${mode}-`);
      const SIZE = 64 * MiB;
      const imgs = [path.join(dir, 'good.img'), path.join(dir, 'bad.img')];
      const socks = [path.join(dir, 'good.sock'), path.join(dir, 'bad.sock')];
      const procs = [];
      for (const [i, img] of imgs.entries()) {
        await run('truncate', ['-s', String(SIZE), img]);
        procs.push(await spawnProc('qemu-nbd', ['-f', 'raw', '-t', '-x', 'vol', '-k', socks[i]!, '--shared=8', img], () => existsSync(socks[i]!)));
      }
      const proxySock = path.join(dir, 'proxy.sock');
      const proxy = await hostileProxy(proxySock, socks[1]!);
      const resolver = await startResolverService(path.join(dir, 'resolver'));
      const cli = (args: string[]) => run(process.execPath, [path.resolve('bin/vstore.js'), 'resolver', ...args, '--resolver', resolver.url]);
      await cli(['node', 'add', 'good', '--nbd', `unix:${socks[0]}`]);
      await cli(['node', 'add', 'bad', '--nbd', `unix:${proxySock}`]);
      await cli(['place', 'vm1/disk0', '--size', String(SIZE), '--on', 'good:vol', '--on', 'bad:vol']);
      const daemon = await startDaemonWith(path.join(dir, 'host'), {
        resolver: { url: resolver.url },
        vms: [{ name: 'vm1', disks: [{ name: 'disk0', volume: { size: SIZE, replicas: 2, connections: 1 } }] }],
      });
      const replicas = async () =>
        (await daemon.get<{ vms: Array<{ disks: Array<{ replication: { replicas: ReplicaView[] } }> }> }>('/v1/status')).vms[0]!.disks[0]!.replication.replicas;
      try {
        const fio = spawn(
          'fio',
          [
            '--name=hostile', '--ioengine=nbd', `--uri=nbd+unix:///?socket=${daemon.diskSocket('vm1', 'disk0')}`,
            '--rw=randrw', '--rwmixread=30', '--bs=4k', '--iodepth=8', '--size=24M',
            '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_dump=0',
          ],
          { stdio: ['ignore', 'pipe', 'pipe'] },
        );
        let out = '';
        fio.stdout.on('data', (b: Buffer) => (out += b));
        fio.stderr.on('data', (b: Buffer) => (out += b));
        const done = new Promise<number | null>((r) => fio.once('exit', (c) => r(c)));
        await new Promise((r) => setTimeout(r, 700));
        proxy.state.mode = mode;
        const deadline = Date.now() + 20_000;
        while ((await replicas()).find((r) => r.id === 'bad')!.state === 'in-sync') {
          if (Date.now() > deadline) throw new Error(`the hostile replica was never failed (acted ${proxy.state.acted}):\n${daemon.log().slice(-3000)}`);
          await new Promise((r) => setTimeout(r, 50));
        }
        expect(proxy.state.acted).toBeGreaterThan(0);
        await new Promise((r) => setTimeout(r, 500));
        proxy.state.mode = 'honest';
        expect(await done, out).toBe(0);
        expect(out).not.toMatch(/verify: bad|err=\s*[1-9]/);
        // The daemon said why it dropped the node.
        expect(daemon.log()).toMatch(/"replica":"bad"/);
        const back = Date.now() + 40_000;
        while (!(await replicas()).every((r) => r.state === 'in-sync' && r.up)) {
          if (Date.now() > back) throw new Error(`no resync:\n${daemon.log().slice(-3000)}`);
          await new Promise((r) => setTimeout(r, 100));
        }
        await daemon.stop();
        for (const p of procs) await p.stop();
        const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', imgs[0]!, imgs[1]!], { check: false });
        expect(cmp.code, cmp.stdout).toBe(0);
      } finally {
        if (!daemon.exited) await daemon.stop(false);
        for (const p of procs) if (!p.exited) await p.stop(false);
        await proxy.close();
        await resolver.stop();
      }
    });
  }
});
