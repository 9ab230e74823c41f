/**
 * The NBD client (lib/nbd/client.ts) and RemoteVolume (lib/block/remote.ts) against vstore's own
 * NbdServer, in-process, over MemoryVolumes: every command, both reply styles, errors mapped,
 * many requests in flight, multi-conn, outages and reconnection, timeouts.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { VolumeError } from '../../../lib/block/errors.js';
import { VolumeLayer } from '../../../lib/block/layer.js';
import { MemoryVolume, type MemoryOp } from '../../../lib/block/memory.js';
import { RemoteVolume, type RemoteVolumeOptions } from '../../../lib/block/remote.js';
import type { Volume, VolumeCapabilities } from '../../../lib/block/volume.js';
import { silentLogger } from '../../../lib/log.js';
import { NbdClientConnection, parseNbdUri, volumeErrorFromNbd } from '../../../lib/nbd/client.js';
import * as C from '../../../lib/nbd/constants.js';
import type { NbdServerOptions } from '../../../lib/nbd/api.js';
import { NbdServer } from '../../../lib/nbd/server.js';
import { gate, pattern, sleep } from './setup.js';

const MiB = 1024 * 1024;
const log = silentLogger();

const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const f of cleanups.splice(0).reverse()) await f();
});

function tmp(): string {
  const dir = mkdtempSync(path.join(tmpdir(), 'vstore-nbdc-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

async function serve(
  vol: Volume, sock: string, o: { server?: Partial<NbdServerOptions>; name?: string; readOnly?: boolean } = {},
): Promise<NbdServer> {
  const server = new NbdServer({ logger: log, ...o.server });
  server.addExport({ name: o.name ?? 'disk', volume: vol, readOnly: o.readOnly });
  await server.listen({ unix: sock });
  cleanups.push(() => server.close());
  return server;
}

async function setup(o: {
  size?: number;
  hook?: (op: MemoryOp, offset: number, length: number) => void | Promise<void>;
  limits?: ConstructorParameters<typeof MemoryVolume>[0]['limits'];
  server?: Partial<NbdServerOptions>;
  readOnly?: boolean;
} = {}): Promise<{ vol: MemoryVolume; sock: string; server: NbdServer; dir: string }> {
  const dir = tmp();
  const sock = path.join(dir, 'nbd.sock');
  const vol = new MemoryVolume({ size: o.size ?? 8 * MiB, hook: o.hook, limits: o.limits });
  const server = await serve(vol, sock, { server: o.server, readOnly: o.readOnly });
  return { vol, sock, server, dir };
}

async function client(sock: string, o: Partial<Parameters<typeof NbdClientConnection.connect>[0]> = {}): Promise<NbdClientConnection> {
  const c = await NbdClientConnection.connect({ address: `unix:${sock}`, export: 'disk', logger: log, ...o });
  cleanups.push(() => c.close());
  return c;
}

async function remote(sock: string, o: Partial<RemoteVolumeOptions> = {}): Promise<RemoteVolume> {
  const r = await RemoteVolume.open({ id: 'node-a', addresses: [`unix:${sock}`], export: 'disk', logger: log, ...o });
  cleanups.push(() => r.close());
  return r;
}

async function rejects(p: Promise<unknown>): Promise<VolumeError> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(VolumeError);
    return e as VolumeError;
  }
  throw new Error('expected a rejection');
}

function once<T = unknown>(em: NodeJS.EventEmitter, ev: string, ms = 5000): Promise<T> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`no '${ev}' within ${ms} ms`)), ms);
    em.once(ev, (v: T) => {
      clearTimeout(t);
      resolve(v);
    });
  });
}

/** A unix-socket proxy in front of a server whose connections the test can cut. */
async function proxy(target: string, at: string): Promise<{ cut: () => void; close: () => Promise<void>; count: () => number }> {
  const socks = new Set<net.Socket>();
  const srv = net.createServer((a) => {
    const b = net.connect(target);
    socks.add(a);
    socks.add(b);
    a.on('error', () => b.destroy());
    b.on('error', () => a.destroy());
    a.on('close', () => { socks.delete(a); b.destroy(); });
    b.on('close', () => { socks.delete(b); a.destroy(); });
    a.pipe(b);
    b.pipe(a);
  });
  await new Promise<void>((r) => srv.listen(at, r));
  const p = {
    cut: () => { for (const s of socks) s.destroy(); },
    close: () => new Promise<void>((r) => { p.cut(); srv.close(() => r()); }),
    count: () => socks.size / 2,
  };
  cleanups.push(() => p.close());
  return p;
}

describe('parseNbdUri', () => {
  it('accepts nbd URIs and lib/net addresses', () => {
    expect(parseNbdUri('nbd://127.0.0.1:10900/vm1%2Fdisk0')).toEqual({ address: { host: '127.0.0.1', port: 10900 }, export: 'vm1/disk0' });
    expect(parseNbdUri('nbd://example.org')).toEqual({ address: { host: 'example.org', port: 10809 }, export: undefined });
    expect(parseNbdUri('nbd://[::1]:99/')).toEqual({ address: { host: '::1', port: 99 }, export: '' });
    expect(parseNbdUri('nbd+unix:///exp?socket=/run/n.sock')).toEqual({ address: { unix: '/run/n.sock' }, export: 'exp' });
    expect(parseNbdUri('nbd+unix:///?socket=/run/n.sock')).toEqual({ address: { unix: '/run/n.sock' }, export: '' });
    expect(parseNbdUri('unix:/run/x.sock')).toEqual({ address: { unix: '/run/x.sock' } });
    expect(parseNbdUri('10.0.0.1:10809')).toEqual({ address: { host: '10.0.0.1', port: 10809 } });
    expect(parseNbdUri('tcp://h:1')).toEqual({ address: { host: 'h', port: 1 } });
  });
  it('refuses TLS, unknown schemes and incomplete URIs', () => {
    expect(() => parseNbdUri('nbds://h/x')).toThrow(/TLS/);
    expect(() => parseNbdUri('http://h/x')).toThrow(/scheme/);
    expect(() => parseNbdUri('nbd+unix:///x')).toThrow(/socket=/);
    expect(() => parseNbdUri('nbd:///x')).toThrow();
    expect(() => parseNbdUri('nbd://h:99999/x')).toThrow();
  });
  it('maps NBD errors to volume errors', () => {
    const m = (n: number): string => volumeErrorFromNbd(n).code;
    expect([1, 5, 12, 22, 28, 75, 95, 108, 4242].map(m)).toEqual(['EPERM', 'EIO', 'ENOMEM', 'EINVAL', 'ENOSPC', 'EOVERFLOW', 'ENOTSUP', 'ESHUTDOWN', 'EIO']);
  });
});

describe('NbdClientConnection against NbdServer', () => {
  it('negotiates GO, structured replies, base:allocation and block sizes', async () => {
    const { sock } = await setup({ limits: { minimum: 512, preferred: 4096, maximum: 1 * MiB } });
    const c = await client(sock);
    expect(c.info).toMatchObject({ export: 'disk', size: 8 * MiB, structured: true, via: 'go', blockSize: { minimum: 512, preferred: 4096, maximum: MiB } });
    expect(c.info.baseAllocationId).not.toBeNull();
    for (const f of [C.NBD_FLAG_SEND_FLUSH, C.NBD_FLAG_SEND_FUA, C.NBD_FLAG_SEND_TRIM, C.NBD_FLAG_SEND_WRITE_ZEROES, C.NBD_FLAG_SEND_FAST_ZERO,
      C.NBD_FLAG_CAN_MULTI_CONN, C.NBD_FLAG_SEND_CACHE, C.NBD_FLAG_SEND_DF]) expect(c.has(f)).toBe(true);
    expect(c.has(C.NBD_FLAG_READ_ONLY)).toBe(false);
  });

  it('rejects an unknown export with ENOENT and a dead socket with EIO', async () => {
    const { sock, dir } = await setup();
    const e = await rejects(NbdClientConnection.connect({ address: sock, export: 'nope', logger: log }));
    expect(e.code).toBe('ENOENT');
    expect(e.message).toMatch(/nope/);
    const e2 = await rejects(NbdClientConnection.connect({ address: path.join(dir, 'missing.sock'), logger: log }));
    expect(e2.code).toBe('EIO');
    expect(e2.message).toMatch(/cannot connect/);
  });

  for (const structured of [true, false]) {
    it(`every command, ${structured ? 'structured' : 'simple'} replies`, async () => {
      const { sock, vol } = await setup({ server: { sparseReadThreshold: 0 } });
      const c = await client(sock, { structuredReplies: structured });
      expect(c.info.structured).toBe(structured);
      const data = pattern(300_000, 7);
      await c.write(1000, data);
      await c.write(2 * MiB, data, { fua: true });
      expect(vol.stats.fuaWrites).toBe(1);
      const back = Buffer.alloc(data.length, 0xaa);
      await c.read(1000, back);
      expect(back.equals(data)).toBe(true);
      // A read spanning data and holes: the hole part arrives as OFFSET_HOLE (structured) and
      // must overwrite the caller's 0xaa with zeroes.
      const wide = Buffer.alloc(1 * MiB, 0xaa);
      await c.read(0, wide);
      const expect1 = Buffer.alloc(1 * MiB);
      data.copy(expect1, 1000);
      expect(wide.equals(expect1)).toBe(true);
      await c.flush();
      expect(vol.stats.flushes).toBeGreaterThanOrEqual(1);
      await c.trim(2 * MiB, 65536);
      await c.writeZeroes(2 * MiB + 65536, 70000 - 65536, { noHole: true });
      await c.writeZeroes(2 * MiB + 70000, 2000, { fastZero: true, fua: true });
      await c.cache(0, 4096);
      const z = Buffer.alloc(72000, 1);
      await c.read(2 * MiB, z);
      expect(z.equals(Buffer.alloc(72000))).toBe(true);
      const rest = Buffer.alloc(data.length - 72000);
      await c.read(2 * MiB + 72000, rest);
      expect(rest.equals(data.subarray(72000))).toBe(true);
      if (structured) {
        const ext = await c.blockStatus(0, 8 * MiB);
        expect(ext[0]).toEqual({ offset: 0, length: 65536 * 5, hole: false, zero: false });
        expect(ext[1]).toMatchObject({ offset: 65536 * 5, hole: true, zero: true });
        const total = ext.reduce((s, e) => s + e.length, 0);
        expect(total).toBeLessThanOrEqual(8 * MiB);
        for (let i = 1; i < ext.length; i++) expect(ext[i]!.offset).toBe(ext[i - 1]!.offset + ext[i - 1]!.length);
        const one = await c.blockStatus(4 * MiB, 4 * MiB, { reqOne: true });
        expect(one).toEqual([{ offset: 4 * MiB, length: 4 * MiB, hole: true, zero: true }]);
      } else {
        expect((await rejects(c.blockStatus(0, 4096))).code).toBe('ENOTSUP');
      }
      // Range checks happen before the wire.
      expect((await rejects(c.read(8 * MiB - 10, Buffer.alloc(20)))).code).toBe('EINVAL');
      expect((await rejects(c.write(8 * MiB - 10, Buffer.alloc(20)))).code).toBe('ENOSPC');
    });

    it(`server errors arrive as VolumeErrors with their codes (${structured ? 'structured' : 'simple'})`, async () => {
      let fail: VolumeError | null = null;
      const { sock } = await setup({ hook: () => { if (fail) throw fail; } });
      const c = await client(sock, { structuredReplies: structured });
      for (const code of ['EIO', 'ENOSPC', 'EPERM', 'EINVAL', 'ENOMEM', 'ESHUTDOWN'] as const) {
        fail = new VolumeError(code, 'injected');
        const buf = Buffer.alloc(4096, 0x55);
        expect((await rejects(c.read(0, buf))).code).toBe(code === 'ENOSPC' ? 'ENOSPC' : code);
        expect((await rejects(c.write(0, buf))).code).toBe(code);
      }
      fail = new VolumeError('ENOTSUP', 'slow');
      expect((await rejects(c.writeZeroes(0, 4096, { fastZero: true }))).code).toBe('ENOTSUP');
      fail = null;
      // The connection is still usable after errors.
      await c.write(0, pattern(4096, 1));
      const b = Buffer.alloc(4096);
      await c.read(0, b);
      expect(b.equals(pattern(4096, 1))).toBe(true);
    });
  }

  it('a read-only export refuses writes with EPERM', async () => {
    const { sock } = await setup({ readOnly: true });
    const c = await client(sock);
    expect(c.has(C.NBD_FLAG_READ_ONLY)).toBe(true);
    expect((await rejects(c.write(0, Buffer.alloc(512)))).code).toBe('EPERM');
  });

  it('keeps many requests in flight, completes them out of order, queues beyond the bound', async () => {
    let maxSeen = 0;
    let now = 0;
    const { sock, vol } = await setup({
      hook: async (op) => {
        if (op !== 'read' && op !== 'write') return;
        now++;
        maxSeen = Math.max(maxSeen, now);
        await sleep(Math.floor(Math.random() * 15));
        now--;
      },
      server: { maxInflightPerConnection: 256 },
    });
    const c = await client(sock, { maxInflight: 32 });
    const N = 300;
    const order: number[] = [];
    await Promise.all(Array.from({ length: N }, (_, i) => c.write(i * 8192, pattern(8192, i + 1)).then(() => order.push(i))));
    expect(maxSeen).toBeLessThanOrEqual(32);
    expect(maxSeen).toBeGreaterThan(8);
    expect(order).not.toEqual([...order].sort((a, b) => a - b)); // out of order
    const bufs = Array.from({ length: N }, () => Buffer.alloc(8192));
    await Promise.all(bufs.map((b, i) => c.read(i * 8192, b)));
    bufs.forEach((b, i) => expect(b.equals(pattern(8192, i + 1))).toBe(true));
    const direct = Buffer.alloc(8192);
    await vol.read(299 * 8192, direct);
    expect(direct.equals(pattern(8192, 300))).toBe(true);
  });

  it('bounds the queue: beyond maxQueued a request fails at once with EAGAIN', async () => {
    const g = gate();
    const { sock } = await setup({ hook: (op) => (op === 'read' ? g.wait() : undefined) });
    const c = await client(sock, { maxInflight: 2, maxQueued: 3 });
    const ps = Array.from({ length: 5 }, () => c.read(0, Buffer.alloc(512)));
    expect((await rejects(c.read(0, Buffer.alloc(512)))).code).toBe('EAGAIN');
    g.open();
    await Promise.all(ps);
  });

  it('a request unanswered within its timeout breaks the connection: EIO for all in flight', async () => {
    const g = gate();
    const { sock } = await setup({ hook: (op) => (op === 'read' ? g.wait() : undefined) });
    const c = await client(sock, { timeoutMs: 300 });
    const closed = once<string>(c, 'close');
    const t0 = Date.now();
    const [e1, e2] = await Promise.all([rejects(c.read(0, Buffer.alloc(512))), rejects(c.read(4096, Buffer.alloc(512)))]);
    expect(e1.code).toBe('EIO');
    expect(e2.code).toBe('EIO');
    expect(e1.message).toMatch(/timeout/);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(290);
    expect(Date.now() - t0).toBeLessThan(3000);
    expect(await closed).toMatch(/unanswered/);
    expect((await rejects(c.read(0, Buffer.alloc(1)))).code).toBe('ESHUTDOWN');
    g.open();
  });

  it('close() waits for requests in flight, then sends DISC', async () => {
    const g = gate();
    const { sock, server } = await setup({ hook: (op) => (op === 'write' ? g.wait() : undefined) });
    const c = await NbdClientConnection.connect({ address: sock, export: 'disk', logger: log });
    const w = c.write(0, pattern(4096, 3));
    await sleep(20);
    const closing = c.close();
    expect((await rejects(c.read(0, Buffer.alloc(1)))).code).toBe('ESHUTDOWN');
    g.open();
    await w;
    await closing;
    await sleep(50);
    expect(server.stats().connections).toBe(0);
  });
});

describe('RemoteVolume against NbdServer', () => {
  it('takes size, caps and limits from the server and does I/O', async () => {
    const { sock, vol } = await setup({ limits: { minimum: 512, preferred: 8192, maximum: 256 * 1024 } });
    const r = await remote(sock);
    expect(r.size).toBe(8 * MiB);
    expect(r.up).toBe(true);
    expect(r.limits).toEqual({ minimum: 512, preferred: 8192, maximum: 256 * 1024 });
    expect(r.caps).toEqual({ readOnly: false, flush: true, fua: true, trim: true, writeZeroes: true, fastZero: true, blockStatus: true, prefetch: true, multiConn: true });
    // Larger than the server's maximum: split (the server would refuse it whole).
    const big = pattern(3 * MiB + 512, 9);
    await r.write(512, big);
    const back = Buffer.alloc(big.length);
    await r.read(512, back);
    expect(back.equals(big)).toBe(true);
    const direct = Buffer.alloc(big.length);
    await vol.read(512, direct);
    expect(direct.equals(big)).toBe(true);
    // Unaligned requests against a server with a 512-byte minimum: read-modify-write.
    const small = pattern(1000, 4);
    await r.write(1234, small);
    const expected = Buffer.from(big.subarray(0, 4096));
    small.copy(expected, 1234 - 512);
    const got = Buffer.alloc(4096);
    await r.read(512, got);
    expect(got.equals(expected)).toBe(true);
    const odd = Buffer.alloc(77);
    await r.read(1300, odd);
    expect(odd.equals(expected.subarray(1300 - 512, 1300 - 512 + 77))).toBe(true);
    await r.writeZeroes(1300, 100);
    const z = Buffer.alloc(100, 1);
    await r.read(1300, z);
    expect(z.equals(Buffer.alloc(100))).toBe(true);
    await r.flush();
    await r.trim(4 * MiB, 2 * MiB);
    await r.prefetch(0, 100);
    const ext = await r.blockStatus(4 * MiB, 4 * MiB);
    expect(ext[0]).toMatchObject({ offset: 4 * MiB, hole: true, zero: true });
    const ext2 = await r.blockStatus(1000, 3000);
    expect(ext2).toEqual([{ offset: 1000, length: 3000, hole: false, zero: false }]);
  });

  it('fastZero without SEND_FAST_ZERO fails at once with ENOTSUP; no multi-conn without CAN_MULTI_CONN', async () => {
    const dir = tmp();
    const sock = path.join(dir, 's');
    const mem = new MemoryVolume({ size: 4 * MiB });
    class Plain extends VolumeLayer {
      override get caps(): VolumeCapabilities {
        return { ...this.inner.caps, fastZero: false, fua: false, multiConn: false };
      }
    }
    await serve(new Plain(mem), sock);
    const r = await remote(sock, { connections: 4 });
    expect(r.caps.fastZero).toBe(false);
    expect(r.caps.multiConn).toBe(false);
    expect(r.connectionCount).toBe(1); // no multi-conn without CAN_MULTI_CONN
    const zeroes = mem.stats.writeZeroes;
    expect((await rejects(r.writeZeroes(0, 4096, { fastZero: true }))).code).toBe('ENOTSUP');
    expect(mem.stats.writeZeroes).toBe(zeroes); // never reached the server
    await r.writeZeroes(0, 4096);
    expect(mem.stats.writeZeroes).toBe(zeroes + 1);
  });

  it('multi-conn: N connections, requests spread over them', async () => {
    const { sock, server } = await setup({ hook: () => sleep(2) });
    const r = await remote(sock, { connections: 4 });
    expect(r.connectionCount).toBe(4);
    expect(server.stats().connections).toBe(4);
    await Promise.all(Array.from({ length: 64 }, (_, i) => r.write(i * 4096, pattern(4096, i + 1))));
    const bufs = Array.from({ length: 64 }, () => Buffer.alloc(4096));
    await Promise.all(bufs.map((b, i) => r.read(i * 4096, b)));
    bufs.forEach((b, i) => expect(b.equals(pattern(4096, i + 1))).toBe(true));
    await r.flush();
    await r.close();
    await sleep(50);
    expect(server.stats().connections).toBe(0);
  });

  it('down/up: the server goes away (ESHUTDOWN at once), comes back on the same socket (I/O again)', async () => {
    const dir = tmp();
    const sock = path.join(dir, 's');
    const mem = new MemoryVolume({ size: 4 * MiB });
    const s1 = await serve(mem, sock);
    const r = await remote(sock, { connections: 2, reconnect: { initialMs: 20, maxMs: 100 } });
    await r.write(0, pattern(4096, 5));
    let downs = 0;
    r.on('down', () => downs++);
    const down = once<{ id: string }>(r, 'down');
    await s1.close();
    expect((await down).id).toBe('node-a');
    expect(r.up).toBe(false);
    const t0 = Date.now();
    expect((await rejects(r.read(0, Buffer.alloc(4096)))).code).toBe('ESHUTDOWN');
    expect((await rejects(r.write(0, Buffer.alloc(4096)))).code).toBe('ESHUTDOWN');
    expect(Date.now() - t0).toBeLessThan(50); // not queued
    await sleep(300); // several reconnect attempts fail meanwhile
    const up = once(r, 'up');
    await serve(mem, sock);
    await up;
    expect(r.up).toBe(true);
    expect(downs).toBe(1);
    const b = Buffer.alloc(4096);
    await r.read(0, b);
    expect(b.equals(pattern(4096, 5))).toBe(true);
    // Both connections come back.
    for (let i = 0; i < 50 && r.connectionCount < 2; i++) await sleep(20);
    expect(r.connectionCount).toBe(2);
  });

  it('requests in flight when the connection breaks fail with EIO; reconnect backs off', async () => {
    const g = gate();
    const dir = tmp();
    const { sock: target } = await setup({ hook: (op) => (op === 'read' ? g.wait() : undefined) });
    const front = path.join(dir, 'p');
    let p = await proxy(target, front);
    const r = await remote(front, { reconnect: { initialMs: 50, maxMs: 400 } });
    const pending = r.read(0, Buffer.alloc(4096));
    await sleep(30);
    const down = once(r, 'down');
    await p.close(); // the path disappears: reconnects fail
    expect((await rejects(pending)).code).toBe('EIO');
    await down;
    g.open();
    // Backoff: attempts at ~50, 100, 200, 400, 400 ms... Count them through a listener that refuses.
    let attempts = 0;
    const refuser = net.createServer((s) => { attempts++; s.destroy(); });
    await new Promise<void>((res) => refuser.listen(front, res));
    const t0 = Date.now();
    await sleep(1300);
    await new Promise<void>((res) => refuser.close(() => res()));
    expect(attempts).toBeGreaterThanOrEqual(2);
    expect(attempts).toBeLessThanOrEqual(6); // not a busy loop
    expect(Date.now() - t0).toBeGreaterThan(1000);
    const up = once(r, 'up');
    p = await proxy(target, front);
    await up;
    const b = Buffer.alloc(4096);
    await r.read(0, b);
    expect(p.count()).toBe(1);
  });

  it('a server that comes back with another size is treated as down', async () => {
    const dir = tmp();
    const sock = path.join(dir, 's');
    const s1 = await serve(new MemoryVolume({ size: 4 * MiB }), sock);
    const r = await remote(sock, { reconnect: { initialMs: 20, maxMs: 50 } });
    const down = once(r, 'down');
    await s1.close();
    await down;
    let ups = 0;
    r.on('up', () => ups++);
    const s2 = await serve(new MemoryVolume({ size: 2 * MiB }), sock);
    await sleep(300);
    expect(ups).toBe(0);
    expect(r.up).toBe(false);
    expect((await rejects(r.read(0, Buffer.alloc(512)))).code).toBe('ESHUTDOWN');
    await s2.close();
    const up = once(r, 'up');
    await serve(new MemoryVolume({ size: 4 * MiB }), sock);
    await up;
    expect(r.up).toBe(true);
  });

  it('a request timeout takes the replica down and it reconnects', async () => {
    let stall = true;
    const g = gate();
    const { sock } = await setup({ hook: (op) => (op === 'read' && stall ? g.wait() : undefined) });
    const r = await remote(sock, { timeoutMs: 200, reconnect: { initialMs: 20 } });
    const down = once(r, 'down');
    const up = once(r, 'up');
    expect((await rejects(r.read(0, Buffer.alloc(512)))).code).toBe('EIO');
    await down;
    stall = false;
    g.open();
    await up;
    await r.read(0, Buffer.alloc(512));
  });

  it('open() rejects with a VolumeError when no address works; later addresses are tried', async () => {
    const dir = tmp();
    const e = await rejects(RemoteVolume.open({ id: 'x', addresses: [path.join(dir, 'a'), path.join(dir, 'b')], export: 'disk', logger: log }));
    expect(e.code).toBe('EIO');
    expect(e.message).toMatch(/a:.*b:/s);
    const { sock } = await setup();
    const r = await remote(sock, { addresses: [path.join(dir, 'nothing'), `nbd+unix:///disk?socket=${sock}`] });
    expect(r.up).toBe(true);
    const bad = await rejects(RemoteVolume.open({ id: 'x', addresses: [`nbd+unix:///other?socket=${sock}`], export: 'disk', logger: log }));
    expect(bad.code).toBe('EINVAL');
    const close = await r.close();
    expect(close).toBeUndefined();
    expect((await rejects(r.read(0, Buffer.alloc(1)))).code).toBe('ESHUTDOWN');
  });
});
