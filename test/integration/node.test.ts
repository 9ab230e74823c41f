/**
 * A real `vstore node` process with two NBD listen addresses (a unix socket and 127.0.0.1:0),
 * volumes created over its control RPC, and real peers on its exports: nbdinfo (size,
 * multi-conn, both addresses), qemu-img convert/compare, qemu-io across the two addresses, fio
 * with crc32c verify on one volume while qemu-io writes another (no cross-talk: each image file
 * on disk holds exactly what was written to it), grow seen by a new nbdinfo, delete, and SIGTERM
 * (exit 0, sockets and lock gone).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RpcClient, RpcError } from '../../lib/rpc/index.js';
import { expectedImage, KiB, MiB, REPO_ROOT, requireCommands, run, sha256, sparseImage, tempDir } from '../helpers/index.js';

const NODE_CLI = path.join(REPO_ROOT, 'dist/lib/cli/node.js');

interface NodeProc {
  child: ChildProcess;
  nbd: string[];
  control: string[];
  stderr(): string;
  /** SIGTERM; resolves with the exit code (null if killed by a signal). */
  stop(): Promise<number | null>;
}

/** Runs `vstore node ARGS` (the command as lib/cli/node.ts exports it) until it logs "node: serving". */
async function startNode(args: string[]): Promise<NodeProc> {
  if (!existsSync(NODE_CLI)) throw new Error(`${NODE_CLI} missing: run npx tsc -p tsconfig.json`);
  const script = `import {nodeCommand} from ${JSON.stringify(NODE_CLI)}; await nodeCommand().parseAsync(process.argv.slice(1), {from: "user"});`;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script, '--', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  const serving = await new Promise<Record<string, unknown>>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`node did not start:\n${err}`)), 15_000);
    const check = (): void => {
      for (const l of err.split('\n')) {
        if (!l.includes('"node: serving"')) continue;
        clearTimeout(t);
        resolve(JSON.parse(l));
        return;
      }
    };
    child.stderr!.on('data', check);
    void exited.then((c) => {
      clearTimeout(t);
      reject(new Error(`node exited ${c} before serving:\n${err}`));
    });
  });
  return {
    child,
    nbd: serving.nbd as string[],
    control: serving.control as string[],
    stderr: () => err,
    stop: async () => {
      child.kill('SIGTERM');
      return exited;
    },
  };
}

let dir: string;
let data: string;
let node: NodeProc;
let rpc: RpcClient;
let sock: string;
let tcp: string;

/** libnbd URIs of an export on the unix and the TCP address. */
const unixUri = (name: string): string => `nbd+unix:///${name}?socket=${sock}`;
const tcpUri = (name: string): string => `nbd://${tcp}/${name}`;
const imageFile = (name: string): string => path.join(data, 'volumes', `${name}.img`);

beforeAll(async () => {
  requireCommands('nbdinfo', 'qemu-img', 'qemu-io', 'fio', 'nbdcopy');
  dir = tempDir('vstore-nodei-');
  data = path.join(dir, 'data');
  sock = path.join(dir, 'nbd.sock');
  node = await startNode(['--data', data, '--listen', `unix:${sock}`, '--listen', '127.0.0.1:0', '--zone', 'z1']);
  tcp = node.nbd[1]!;
  rpc = new RpcClient(node.control[0]!, { timeoutMs: 20_000 });
});

afterAll(async () => {
  rpc?.close();
  if (node && node.child.exitCode === null) node.child.kill('SIGKILL');
});

async function nbdinfo(uri: string): Promise<Record<string, unknown>> {
  const r = await run('nbdinfo', ['--json', uri]);
  const exports = JSON.parse(r.stdout).exports as Record<string, unknown>[];
  expect(exports).toHaveLength(1);
  return exports[0]!;
}

async function qemuIo(uri: string, cmds: string[]): Promise<void> {
  const r = await run('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), uri], { timeoutMs: 60_000 });
  expect(r.stdout).not.toMatch(/Pattern verification failed|failed:/);
}

describe('vstore node with real peers', () => {
  it('starts with both addresses, an id and the default control socket', async () => {
    expect(node.nbd[0]).toBe(`unix:${sock}`);
    expect(tcp).toMatch(/^127\.0\.0\.1:[1-9]\d*$/);
    expect(node.control).toEqual([`unix:${data}/control.sock`]);
    const info = await rpc.call<Record<string, unknown>>('node.info');
    expect(info).toMatchObject({ nbd: node.nbd, control: node.control, zone: 'z1', volumes: 0 });
    expect(info.id).toBe(readFileSync(path.join(data, 'node-id'), 'utf8').trim());
  });

  it('volumes created over RPC are NBD exports on both addresses (nbdinfo: size, multi-conn)', async () => {
    for (const name of ['vm1/disk0', 'vm1/disk1', 'scratch']) {
      expect(await rpc.call('volume.create', { name, size: 64 * MiB })).toMatchObject({ name, size: 64 * MiB, created: true });
    }
    for (const uri of [unixUri('vm1/disk0'), tcpUri('vm1/disk0')]) {
      const e = await nbdinfo(uri);
      expect(e['export-name']).toBe('vm1/disk0');
      expect(e['export-size']).toBe(64 * MiB);
      expect(e.can_multi_conn).toBe(true);
      expect(e.can_flush).toBe(true);
      expect(e.can_fua).toBe(true);
      expect(e.is_read_only).toBe(false);
    }
    // --list on the TCP address shows every volume.
    const list = JSON.parse((await run('nbdinfo', ['--json', '--list', `nbd://${tcp}`])).stdout).exports as { 'export-name': string }[];
    expect(list.map((e) => e['export-name']).sort()).toEqual(['scratch', 'vm1/disk0', 'vm1/disk1']);
  });

  it('qemu-img convert a patterned image in over unix, qemu-img compare back over TCP; the file holds it', async () => {
    const src = path.join(dir, 'src.raw');
    const regions = [
      { offset: 0, length: 1 * MiB, seed: 1 },
      { offset: 5 * MiB + 512, length: 3 * MiB, seed: 2 },
      { offset: 40 * MiB, length: 256 * KiB, seed: 3 },
      { offset: 64 * MiB - 64 * KiB, length: 64 * KiB, seed: 4 },
    ];
    sparseImage(src, 64 * MiB, regions);
    await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, unixUri('vm1/disk0')], { timeoutMs: 60_000 });
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, tcpUri('vm1/disk0')], { check: false });
    expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
    expect(cmp.stdout).toMatch(/Images are identical/);
    expect(sha256(readFileSync(imageFile('vm1/disk0')))).toBe(sha256(expectedImage(64 * MiB, regions)));
    // compare can fail: a different image is reported as such.
    const other = path.join(dir, 'other.raw');
    sparseImage(other, 64 * MiB, [{ offset: 0, length: 4096, seed: 99 }]);
    const bad = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', other, tcpUri('vm1/disk0')], { check: false });
    expect(bad.code).toBe(1);
  });

  it('qemu-io writes through the unix socket read back through TCP', async () => {
    await qemuIo(unixUri('scratch'), ['write -P 0x5a 0 1M', 'write -P 0xa5 3M 64k', 'aio_write -P 0x3c 10M 512', 'aio_flush', 'flush']);
    await qemuIo(tcpUri('scratch'), ['read -P 0x5a 0 1M', 'read -P 0 1M 2M', 'read -P 0xa5 3M 64k', 'read -P 0x3c 10M 512']);
    // A wrong pattern fails (the check can fail).
    const r = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5b 0 4k', tcpUri('scratch')], { check: false });
    expect(r.stdout + r.stderr).toMatch(/Pattern verification failed/);
  });

  it('fio (crc32c verify) on one volume while qemu-io writes another: no cross-talk', async () => {
    // qemu-io overlays known patterns on vm1/disk0 (which holds the converted image) meanwhile.
    const overlay = [0, 8, 16, 24, 32, 48, 56].map((m, i) => ({ offset: m * MiB + 4096 * i, length: 256 * KiB, byte: 0x10 + i }));
    const fio = run('fio', [
      '--name=node-verify', '--ioengine=nbd', `--uri=${tcpUri('vm1/disk1')}`,
      '--rw=randwrite', '--bs=4k', '--iodepth=16', '--numjobs=2', '--size=32M', '--offset_increment=32M',
      '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_dump=0', '--output-format=json',
    ], { timeoutMs: 120_000, check: false });
    const writer = (async () => {
      for (const o of overlay) await qemuIo(unixUri('vm1/disk0'), [`aio_write -P ${o.byte} ${o.offset} ${o.length}`, 'aio_flush']);
    })();
    const [f] = await Promise.all([fio, writer]);
    expect(f.code, f.stdout + f.stderr).toBe(0);
    const doc = JSON.parse(f.stdout.slice(f.stdout.indexOf('{\n')));
    for (const j of doc.jobs) {
      expect(j.error).toBe(0);
      expect(j.write.io_bytes).toBe(32 * MiB);
      expect(j.read.io_bytes).toBe(32 * MiB); // every block verified
    }
    // disk0 on disk is the converted image with exactly the qemu-io overlays: nothing of fio's.
    const regions = [
      { offset: 0, length: 1 * MiB, seed: 1 },
      { offset: 5 * MiB + 512, length: 3 * MiB, seed: 2 },
      { offset: 40 * MiB, length: 256 * KiB, seed: 3 },
      { offset: 64 * MiB - 64 * KiB, length: 64 * KiB, seed: 4 },
    ];
    const want = expectedImage(64 * MiB, regions);
    for (const o of overlay) want.fill(o.byte, o.offset, o.offset + o.length);
    expect(sha256(readFileSync(imageFile('vm1/disk0')))).toBe(sha256(want));
    // disk1 on disk is what the node serves (what fio verified), and holds none of qemu-io's runs.
    const copy = path.join(dir, 'disk1.copy');
    await run('nbdcopy', [unixUri('vm1/disk1'), copy]);
    const disk1 = readFileSync(imageFile('vm1/disk1'));
    expect(sha256(disk1)).toBe(sha256(readFileSync(copy)));
    for (const o of overlay) expect(disk1.subarray(o.offset, o.offset + o.length).every((b) => b === o.byte)).toBe(false);
  });

  it('volume.grow is seen by a new nbdinfo; data stays', async () => {
    expect(await rpc.call('volume.grow', { name: 'vm1/disk0', size: 128 * MiB })).toMatchObject({ size: 128 * MiB });
    for (const uri of [unixUri('vm1/disk0'), tcpUri('vm1/disk0')]) expect((await nbdinfo(uri))['export-size']).toBe(128 * MiB);
    await qemuIo(tcpUri('vm1/disk0'), ['read -P 0x10 0 256k', 'read -P 0 64M 64M', 'write -P 0x77 127M 1M', 'read -P 0x77 127M 1M']);
    await expect(rpc.call('volume.grow', { name: 'vm1/disk0', size: 64 * MiB })).rejects.toMatchObject({ code: 'EINVAL' });
  });

  it('volume.delete removes the export and the file', async () => {
    await rpc.call('volume.delete', { name: 'scratch' });
    expect(existsSync(imageFile('scratch'))).toBe(false);
    const r = await run('nbdinfo', ['--json', tcpUri('scratch')], { check: false });
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/No such file|not found|unknown export/i);
    const e = await rpc.call('volume.stat', { name: 'scratch' }).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(RpcError);
    expect((e as RpcError).code).toBe('ENOENT');
    expect((await rpc.call<{ name: string }[]>('volume.list')).map((v) => v.name)).toEqual(['vm1/disk0', 'vm1/disk1']);
  });

  it('SIGTERM: exit 0, sockets and lock gone, volumes intact', async () => {
    rpc.close();
    const before = sha256(readFileSync(imageFile('vm1/disk1')));
    expect(await node.stop()).toBe(0);
    expect(node.stderr()).toMatch(/"exiting 0"/);
    expect(existsSync(sock)).toBe(false);
    expect(existsSync(path.join(data, 'control.sock'))).toBe(false);
    expect(existsSync(path.join(data, 'lock'))).toBe(false);
    expect(sha256(readFileSync(imageFile('vm1/disk1')))).toBe(before);
  });
});
