/**
 * The NBD client (through RemoteVolume) against real servers: nbdkit (memory plugin; file plugin
 * on a sparse image, also behind filters that take capabilities away) and qemu-nbd (qcow2 on a
 * unix socket, raw over TCP). What is written through the client is checked with the peer's own
 * view: nbdcopy of the export, qemu-img compare, sha256 of the image after the server stopped,
 * nbdinfo --map for block status. A SIGKILLed peer takes the volume down, in-flight requests fail,
 * nothing acknowledged is lost, and I/O resumes when the peer is back.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { VolumeError } from '../../lib/block/errors.js';
import { RemoteVolume, type RemoteVolumeOptions } from '../../lib/block/remote.js';
import type { Extent } from '../../lib/block/volume.js';
import { silentLogger } from '../../lib/log.js';
import { expectedImage, freePort, MiB, patterned, requireCommands, run, sha256, sha256File, sparseImage, tempDir } from '../helpers/index.js';

requireCommands('nbdkit', 'qemu-nbd', 'qemu-img', 'nbdinfo', 'nbdcopy');

const log = silentLogger();

interface Peer {
  child: ChildProcess;
  /** SIGTERM and wait. */
  stop(): Promise<void>;
  /** SIGKILL and wait. */
  kill(): Promise<void>;
  stderr(): string;
}

const peers = new Set<Peer>();
afterAll(() => {
  for (const p of peers) p.child.kill('SIGKILL');
});

function canConnect(o: { path: string } | { host: string; port: number }): Promise<boolean> {
  return new Promise((resolve) => {
    const c = net.connect(o as net.NetConnectOpts);
    c.once('connect', () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
}

async function startPeer(cmd: string, args: string[], at: { path: string } | { host: string; port: number }): Promise<Peer> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  child.stdout!.on('data', (b: Buffer) => (err += b.toString()));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  let done = false;
  void exited.then(() => (done = true));
  const deadline = Date.now() + 15_000;
  for (;;) {
    if (done) throw new Error(`${cmd} ${args.join(' ')} exited before listening:\n${err}`);
    if ((!('path' in at) || existsSync(at.path)) && (await canConnect(at))) break;
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`${cmd}: not listening after 15 s:\n${err}`);
    }
    await new Promise((r) => setTimeout(r, 30));
  }
  const p: Peer = {
    child,
    stderr: () => err,
    async stop() {
      peers.delete(p);
      if (!done) child.kill('SIGTERM');
      await exited;
    },
    async kill() {
      peers.delete(p);
      if (!done) child.kill('SIGKILL');
      await exited;
    },
  };
  peers.add(p);
  return p;
}

async function open(addresses: string[], o: Partial<RemoteVolumeOptions> = {}): Promise<RemoteVolume> {
  return RemoteVolume.open({ id: 'peer', addresses, export: '', logger: log, ...o });
}

/** Every extent of the volume, merged by type (hole|zero bits as nbdinfo prints them). */
async function map(v: RemoteVolume): Promise<Array<{ offset: number; length: number; type: number }>> {
  const out: Array<{ offset: number; length: number; type: number }> = [];
  let pos = 0;
  while (pos < v.size) {
    const ext: Extent[] = await v.blockStatus(pos, v.size - pos);
    expect(ext[0]!.offset).toBe(pos);
    for (const e of ext) {
      const type = (e.hole ? 1 : 0) | (e.zero ? 2 : 0);
      const last = out[out.length - 1];
      if (last && last.type === type && last.offset + last.length === e.offset) last.length += e.length;
      else out.push({ offset: e.offset, length: e.length, type });
      pos = e.offset + e.length;
    }
  }
  return out;
}

async function nbdinfoMap(uri: string): Promise<Array<{ offset: number; length: number; type: number }>> {
  const r = await run('nbdinfo', ['--map', '--json', uri]);
  const out: Array<{ offset: number; length: number; type: number }> = [];
  for (const e of JSON.parse(r.stdout) as Array<{ offset: number; length: number; type: number }>) {
    const last = out[out.length - 1];
    if (last && last.type === e.type) last.length += e.length;
    else out.push({ offset: e.offset, length: e.length, type: e.type });
  }
  return out;
}

/** Writes a fixed set of patterns (some larger than 32 MiB, some unaligned) into v and into the model. */
async function writePatterns(v: RemoteVolume, model: Buffer): Promise<void> {
  const writes: Array<[number, number, number]> = [
    [0, 4096, 1],
    [4096 * 3 + 17, 100_003, 2],
    [5 * MiB, 2 * MiB, 3],
    [9 * MiB - 1, 2, 4],
    [12 * MiB, 33 * MiB, 5], // larger than any server's maximum: split
  ];
  await Promise.all(writes.map(async ([off, len, seed]) => {
    const b = patterned(len, seed);
    await v.write(off, b, { fua: seed === 3 });
    b.copy(model, off);
  }));
  await v.writeZeroes(5 * MiB + 4096, 8192);
  model.fill(0, 5 * MiB + 4096, 5 * MiB + 4096 + 8192);
  await v.writeZeroes(20 * MiB, 2 * MiB, { mayTrim: true });
  model.fill(0, 20 * MiB, 22 * MiB);
  await v.flush();
  // Read everything back through the client.
  const back = Buffer.alloc(model.length, 0xaa);
  await v.read(0, back);
  expect(sha256(back)).toBe(sha256(model));
}

async function rejection(p: Promise<unknown>): Promise<VolumeError> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(VolumeError);
    return e as VolumeError;
  }
  throw new Error('expected a rejection');
}

describe('nbdkit', () => {
  it('memory plugin: caps, patterns through the client equal nbdcopy of the export, block status equals nbdinfo --map', async () => {
    const dir = tempDir('vstore-nbdcp-');
    const sock = path.join(dir, 'm.sock');
    const size = 64 * MiB;
    const peer = await startPeer('nbdkit', ['-f', '-U', sock, 'memory', String(size)], { path: sock });
    const uri = `nbd+unix:///?socket=${sock}`;
    const v = await open([uri], { connections: 4 });
    expect(v.size).toBe(size);
    expect(v.caps).toEqual({ readOnly: false, flush: true, fua: true, trim: true, writeZeroes: true, fastZero: true, blockStatus: true, prefetch: true, multiConn: true });
    expect(v.connectionCount).toBe(4);
    const model = Buffer.alloc(size);
    await writePatterns(v, model);
    await v.trim(5 * MiB, 2 * MiB);
    model.fill(0, 5 * MiB, 7 * MiB); // the memory plugin reads trimmed ranges as zeroes
    await v.writeZeroes(30 * MiB, MiB, { fastZero: true });
    model.fill(0, 30 * MiB, 31 * MiB);
    const ours = await map(v);
    expect(ours).toEqual(await nbdinfoMap(uri));
    expect(ours.some((e) => e.type === 3)).toBe(true);
    const out = path.join(dir, 'copy.raw');
    await run('nbdcopy', [uri, out]);
    expect(sha256File(out)).toBe(sha256(model));
    await v.close();
    await peer.stop();
  });

  it('file plugin on a sparse image: reads the image, holes where it is sparse, writes land in the file', async () => {
    const dir = tempDir('vstore-nbdcp-');
    const img = path.join(dir, 'disk.raw');
    const size = 48 * MiB;
    const regions = [{ offset: MiB, length: 3 * MiB, seed: 11 }, { offset: 40 * MiB, length: 64 * 1024, seed: 12 }];
    sparseImage(img, size, regions);
    const sock = path.join(dir, 'f.sock');
    const peer = await startPeer('nbdkit', ['-f', '-U', sock, 'file', img], { path: sock });
    const uri = `nbd+unix:///?socket=${sock}`;
    const v = await open([`unix:${sock}`]);
    const model = expectedImage(size, regions);
    const back = Buffer.alloc(size);
    await v.read(0, back);
    expect(sha256(back)).toBe(sha256(model));
    const before = await map(v);
    expect(before).toEqual(await nbdinfoMap(uri));
    expect(before.find((e) => e.offset === 0)).toMatchObject({ type: 3 }); // the image starts with a hole
    await writePatterns(v, model);
    expect(await map(v)).toEqual(await nbdinfoMap(uri));
    await v.close();
    await peer.stop();
    expect(sha256File(img)).toBe(sha256(model));
  });

  it('capabilities taken away by filters: emulated write-zeroes, FUA as flush, no fast zero, block-size policy honoured', async () => {
    const dir = tempDir('vstore-nbdcp-');
    const img = path.join(dir, 'disk.raw');
    const size = 48 * MiB;
    sparseImage(img, size, [{ offset: 0, length: 48 * MiB, seed: 21 }]);
    const sock = path.join(dir, 'f.sock');
    // blocksize-policy with error policy: the server answers EINVAL to unaligned or oversized
    // requests, so the client's splitting and read-modify-write are what make these work.
    const peer = await startPeer('nbdkit', [
      '-f', '-U', sock, '--filter=nozero', '--filter=fua', '--filter=blocksize-policy', 'file', img, // the fua filter's default: FUA not advertised
      'blocksize-minimum=512', 'blocksize-preferred=4096', 'blocksize-maximum=1048576', 'blocksize-error-policy=error',
    ], { path: sock });
    const v = await open([sock]);
    expect(v.caps.writeZeroes).toBe(false);
    expect(v.caps.fastZero).toBe(false);
    expect(v.caps.fua).toBe(false);
    expect(v.limits).toEqual({ minimum: 512, preferred: 4096, maximum: MiB });
    expect((await rejection(v.writeZeroes(0, 4096, { fastZero: true }))).code).toBe('ENOTSUP');
    const model = expectedImage(size, [{ offset: 0, length: 48 * MiB, seed: 21 }]);
    await writePatterns(v, model);
    await v.writeZeroes(1000, 3 * MiB + 5);
    model.fill(0, 1000, 1000 + 3 * MiB + 5);
    const b = Buffer.alloc(3 * MiB + 2000);
    await v.read(0, b);
    expect(b.equals(model.subarray(0, b.length))).toBe(true);
    await v.close();
    await peer.stop();
    expect(sha256File(img)).toBe(sha256(model));
  });
});

describe('qemu-nbd', () => {
  it('qcow2 on a unix socket: qemu-img compare against the model', async () => {
    const dir = tempDir('vstore-nbdcp-');
    const img = path.join(dir, 'disk.qcow2');
    const size = 64 * MiB;
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, String(size)]);
    const sock = path.join(dir, 'q.sock');
    const peer = await startPeer('qemu-nbd', ['-k', sock, '-f', 'qcow2', '-t', '-e', '4', '--discard=unmap', '--cache=writeback', img], { path: sock });
    const uri = `nbd+unix:///?socket=${sock}`;
    const v = await open([uri], { connections: 2 });
    expect(v.size).toBe(size);
    expect(v.caps.blockStatus).toBe(true);
    expect(v.caps.readOnly).toBe(false);
    const model = Buffer.alloc(size);
    await writePatterns(v, model);
    expect(await map(v)).toEqual(await nbdinfoMap(uri));
    await v.close();
    await peer.stop();
    const raw = path.join(dir, 'model.raw');
    writeFileSync(raw, model);
    await run('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', img, raw]);
  });

  it('raw over TCP: sha256 of the image after the server stopped', async () => {
    const dir = tempDir('vstore-nbdcp-');
    const img = path.join(dir, 'disk.raw');
    const size = 48 * MiB;
    sparseImage(img, size, []);
    const port = await freePort();
    const peer = await startPeer('qemu-nbd', ['-b', '127.0.0.1', '-p', String(port), '-f', 'raw', '-t', '-e', '4', '--cache=writeback', img], { host: '127.0.0.1', port });
    const v = await open([`nbd://127.0.0.1:${port}/`]);
    const model = Buffer.alloc(size);
    await writePatterns(v, model);
    await v.close();
    await peer.stop();
    expect(sha256File(img)).toBe(sha256(model));
  });

  it('SIGKILL: down, in-flight requests fail, nothing acknowledged is lost, restart: up and I/O again', async () => {
    const dir = tempDir('vstore-nbdcp-');
    const img = path.join(dir, 'disk.raw');
    const size = 256 * MiB;
    sparseImage(img, size, []);
    const sock = path.join(dir, 'k.sock');
    const args = ['-k', sock, '-f', 'raw', '-t', '-e', '4', '--cache=writeback', img];
    let peer = await startPeer('qemu-nbd', args, { path: sock });
    const v = await open([sock], { reconnect: { initialMs: 20, maxMs: 200 }, timeoutMs: 10_000 });
    const events: string[] = [];
    v.on('down', () => events.push('down'));
    v.on('up', () => events.push('up'));
    const acked = new Map<number, number>(); // region index -> seed
    const failures: string[] = [];
    let next = 0;
    let stop = false;
    // 16 writers of 1 MiB each into distinct regions, until the peer dies.
    const writer = async (): Promise<void> => {
      while (!stop && next < 250) {
        const i = next++;
        try {
          await v.write(i * MiB, patterned(MiB, i + 1));
          acked.set(i, i + 1);
        } catch (e) {
          failures.push((e as VolumeError).code);
          if ((e as VolumeError).code === 'ESHUTDOWN') return;
        }
      }
    };
    const writers = Array.from({ length: 16 }, writer);
    while (acked.size < 20) await new Promise((r) => setTimeout(r, 5));
    const down = new Promise((r) => v.once('down', r));
    await peer.kill();
    await down;
    stop = true;
    await Promise.all(writers);
    expect(failures.length).toBeGreaterThan(0);
    expect(failures).toContain('EIO'); // requests that were in flight
    for (const f of failures) expect(['EIO', 'ESHUTDOWN']).toContain(f);
    expect(v.up).toBe(false);
    expect((await rejection(v.read(0, Buffer.alloc(512)))).code).toBe('ESHUTDOWN');
    // Everything acknowledged before the kill is there (qemu-nbd wrote it to the file).
    const up = new Promise((r) => v.once('up', r));
    peer = await startPeer('qemu-nbd', args, { path: sock });
    await up;
    expect(events).toEqual(['down', 'up']);
    for (const [i, seed] of acked) {
      const b = Buffer.alloc(MiB);
      await v.read(i * MiB, b);
      expect(b.equals(patterned(MiB, seed))).toBe(true);
    }
    await v.write(255 * MiB, patterned(MiB, 999));
    await v.flush();
    await v.close();
    await peer.stop();
    const file = readFileSync(img);
    expect(file.subarray(255 * MiB).equals(patterned(MiB, 999))).toBe(true);
    for (const [i, seed] of acked) expect(file.subarray(i * MiB, (i + 1) * MiB).equals(patterned(MiB, seed))).toBe(true);
  });
});
