/**
 * The daemon with a disk that offers both an NBD socket and a vhost-user-blk socket:
 * `node bin/vstore.js serve` in a child process, qemu-io on the NBD side, the test front-end
 * driver (test/helpers/vhost-frontend.ts) on the vhost-user side, over the one volume.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { BlkStatus } from '../../lib/vhost/blk.js';
import { KiB, MiB, REPO_ROOT, VSTORE_BIN, patterned, requireCommands, run, sparseImage, tempDir } from '../helpers/index.js';
import { VhostUserFrontend, type FrontendOptions } from '../helpers/vhost-frontend.js';

const SIZE = 32 * MiB;
const live = new Set<ChildProcess>();
const frontends = new Set<VhostUserFrontend>();
afterAll(() => {
  for (const f of frontends) f.close();
  for (const c of live) c.kill('SIGKILL');
});

beforeAll(() => {
  requireCommands('qemu-io');
  if (!existsSync(path.join(REPO_ROOT, 'dist/lib/cli/index.js'))) throw new Error('vstore is not built: run scripts/setup.sh');
});

function canConnect(p: string): Promise<boolean> {
  return new Promise((resolve) => {
    const c = net.connect(p);
    c.once('connect', () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
}

function httpGet(socketPath: string, p: string): Promise<string> {
  return new Promise((resolve, reject) => {
    request({ socketPath, path: p }, (res) => {
      let body = '';
      res.on('data', (b: Buffer) => (body += b.toString()));
      res.on('end', () => resolve(body));
    })
      .on('error', reject)
      .end();
  });
}

function vstore(args: string[], input?: string) {
  return run(process.execPath, [VSTORE_BIN, ...args], { check: false, timeoutMs: 30_000, ...(input !== undefined ? { input } : {}) });
}

async function connectFrontend(o: FrontendOptions): Promise<VhostUserFrontend> {
  const fe = await VhostUserFrontend.connect(o);
  frontends.add(fe);
  return fe;
}

function closeFrontend(fe: VhostUserFrontend): void {
  fe.close();
  frontends.delete(fe);
}

/** qemu-io on the NBD socket; a failed command (pattern mismatch included) is an error. */
async function qemuIo(sock: string, ...cmds: string[]): Promise<string> {
  const r = await run('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), `nbd+unix:///?socket=${sock}`], { check: false, timeoutMs: 30_000 });
  if (r.code !== 0 || /fail|error/i.test(r.stdout + r.stderr)) throw new Error(`qemu-io ${cmds.join('; ')}: exit ${r.code}\n${r.stdout}${r.stderr}`);
  return r.stdout;
}

it('serves one disk over NBD and vhost-user-blk at once; runtime remove/add; SIGTERM', async () => {
  const dir = tempDir('vst-dvu-');
  const runDir = path.join(dir, 'run');
  const control = path.join(runDir, 'control.sock');
  const image = path.join(dir, 'd0.img');
  sparseImage(image, SIZE);
  const config = path.join(dir, 'vstore.json');
  writeFileSync(config, JSON.stringify({ runDir, log: { level: 'info' }, vms: [{ name: 'vm1', disks: [{ name: 'd0', file: image, vhostUser: { queues: 2, serial: 'vu-d0' } }] }] }));
  const nbdSock = path.join(runDir, 'vm1-d0.sock');
  const vuSock = path.join(runDir, 'vm1-d0.vhost.sock');

  const child = spawn(process.execPath, [VSTORE_BIN, 'serve', '--config', config], { stdio: ['ignore', 'pipe', 'pipe'] });
  live.add(child);
  let out = '';
  child.stdout!.on('data', (b: Buffer) => (out += b.toString()));
  child.stderr!.on('data', (b: Buffer) => (out += b.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.on('exit', (code, signal) => {
      live.delete(child);
      resolve({ code, signal });
    }),
  );
  const deadline = Date.now() + 15_000;
  while (!(await canConnect(control))) {
    if (child.exitCode !== null) throw new Error(`daemon exited before it was ready:\n${out}`);
    if (Date.now() > deadline) throw new Error(`daemon not ready after 15 s:\n${out}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  expect(existsSync(nbdSock)).toBe(true);
  expect(existsSync(vuSock)).toBe(true);
  // the "where is it served" lines come right after the control socket opens
  const line = `vstore: vm1/d0: ${image} on vhost-user-blk ${vuSock} (2 queues)`;
  for (const until = Date.now() + 5_000; !out.includes(line) && Date.now() < until; ) await new Promise((r) => setTimeout(r, 20));
  expect(out).toContain(line);

  // NBD writes, vhost-user reads
  await qemuIo(nbdSock, 'write -P 0x5a 1M 256k', 'flush');
  const fe = await connectFrontend({ socket: vuSock, numQueues: 2, maxIo: 256 * KiB });
  expect(fe.config.capacity).toBe(BigInt(SIZE / 512));
  expect(fe.config.numQueues).toBe(2);
  expect(await fe.getId()).toEqual({ status: BlkStatus.OK, id: 'vu-d0' });
  const r = await fe.read(MiB / 512, 256 * KiB, 1);
  expect(r.status).toBe(BlkStatus.OK);
  expect(r.data.equals(Buffer.alloc(256 * KiB, 0x5a))).toBe(true);

  // vhost-user writes, NBD reads (and a wrong pattern is seen as wrong: the check can fail)
  expect(await fe.write((4 * MiB) / 512, Buffer.alloc(128 * KiB, 0xa7), 0)).toBe(BlkStatus.OK);
  expect(await fe.flush(1)).toBe(BlkStatus.OK);
  await qemuIo(nbdSock, 'read -P 0xa7 4M 128k');
  await expect(qemuIo(nbdSock, 'read -P 0x00 4M 128k')).rejects.toThrow();
  // both sides, overlapping: the last write wins whichever socket it came through
  const pat = patterned(64 * KiB, 7);
  expect(await fe.write((8 * MiB) / 512, pat)).toBe(BlkStatus.OK);
  await qemuIo(nbdSock, 'write -P 0x11 8M 4k');
  const mixed = (await fe.read((8 * MiB) / 512, 64 * KiB)).data;
  expect(mixed.subarray(0, 4 * KiB).equals(Buffer.alloc(4 * KiB, 0x11))).toBe(true);
  expect(mixed.subarray(4 * KiB).equals(pat.subarray(4 * KiB))).toBe(true);

  // status (JSON and table) and metrics show the vhost-user socket and its counters
  const st = await vstore(['status', '--control', control, '--json']);
  expect(st.code).toBe(0);
  const disk = (JSON.parse(st.stdout) as { vms: Array<{ disks: Array<Record<string, unknown>> }> }).vms[0]!.disks[0]!;
  expect(disk.socket).toBe(nbdSock);
  expect(disk.vhostUser).toMatchObject({ socket: vuSock, queues: 2, connected: true, connections: 1, ok: 6, ioerr: 0, unsupp: 0, dropped: 0 });
  const table = await vstore(['status', '--control', control]);
  expect(table.stdout).toMatch(/VHOST-USER\s+VU-CONN\s+VU-REQS\s+VU-ERRORS/);
  expect(table.stdout).toMatch(new RegExp(`${vuSock.replace(/[.]/g, '\\.')}\\s+1/1\\s+6\\s+0\\s`));
  const metrics = await httpGet(control, '/metrics');
  expect(metrics).toContain('vstore_disk_vhost_user_connected{vm="vm1",disk="d0"} 1');
  expect(metrics).toContain('vstore_disk_vhost_user_requests_total{vm="vm1",disk="d0",status="ok"} 6');

  // runtime remove with the front end still connected: it is disconnected, both sockets go
  const rm = await vstore(['disk', 'remove', 'vm1', 'd0', '--control', control]);
  expect(rm.code, rm.stderr).toBe(0);
  const gone = await Promise.race([fe.whenClosed().then(() => true), new Promise((r) => setTimeout(() => r(false), 5_000))]);
  expect(gone, 'the vhost-user front end was not disconnected by disk remove').toBe(true);
  closeFrontend(fe);
  expect(existsSync(nbdSock)).toBe(false);
  expect(existsSync(vuSock)).toBe(false);

  // runtime add of a vhost-user-only disk over the same image: what both sides wrote is there
  const vu2 = path.join(runDir, 'd1.vu');
  const add = await vstore(['disk', 'add', 'vm1', '-', '--control', control], JSON.stringify({ name: 'd1', file: image, nbd: false, vhostUser: { socket: vu2 } }));
  expect(add.code, add.stderr).toBe(0);
  expect(existsSync(vu2)).toBe(true);
  expect(existsSync(path.join(runDir, 'vm1-d1.sock'))).toBe(false);
  const fe2 = await connectFrontend({ socket: vu2 });
  expect((await fe2.read((4 * MiB) / 512, 128 * KiB)).data.equals(Buffer.alloc(128 * KiB, 0xa7))).toBe(true);
  expect(await fe2.write(0, Buffer.alloc(4 * KiB, 0x3c))).toBe(BlkStatus.OK);

  // SIGTERM with a front end connected: exit 0, sockets removed, the write is in the image
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 15_000);
  const { code, signal } = await exited;
  clearTimeout(timer);
  expect({ code, signal }, out).toEqual({ code: 0, signal: null });
  expect(existsSync(vu2)).toBe(false);
  expect(existsSync(control)).toBe(false);
  expect(readFileSync(image).subarray(0, 4 * KiB).equals(Buffer.alloc(4 * KiB, 0x3c))).toBe(true);
  expect(fe2.closed).toBe(true);
  closeFrontend(fe2);
}, 60_000);
