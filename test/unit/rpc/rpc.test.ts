import * as net from 'node:net';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { Packr } from 'msgpackr';
import { silentLogger } from '../../../lib/log.js';
import { RpcClient, RpcError, RpcServer, type RpcHandlers } from '../../../lib/rpc/index.js';

const dir = mkdtempSync(path.join(tmpdir(), 'vstore-rpc-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const cleanups: (() => unknown)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function serve(handlers: RpcHandlers, opts: { maxFrame?: number; address?: string } = {}): Promise<{ server: RpcServer; address: string }> {
  const server = new RpcServer({ handlers, logger: silentLogger(), ...(opts.maxFrame ? { maxFrame: opts.maxFrame } : {}) });
  await server.listen(opts.address ?? '127.0.0.1:0');
  cleanups.push(() => server.close());
  return { server, address: server.addresses[0]! };
}

function client(address: string, opts: ConstructorParameters<typeof RpcClient>[1] = {}): RpcClient {
  const c = new RpcClient(address, opts);
  cleanups.push(() => c.close());
  return c;
}

const packr = new Packr({ useRecords: false, moreTypes: false });
function frame(obj: unknown): Buffer {
  const body = packr.pack(obj);
  const h = Buffer.alloc(4);
  h.writeUInt32BE(body.length);
  return Buffer.concat([h, body]);
}

/** Connects a raw socket, writes `bytes`, resolves when the server closes it (or rejects after `ms`). */
function rawExchange(address: string, bytes: Buffer, ms = 3000): Promise<{ closed: boolean; data: Buffer }> {
  const [host, port] = address.split(':');
  return new Promise((resolve) => {
    const s = net.connect(Number(port), host);
    const chunks: Buffer[] = [];
    const t = setTimeout(() => {
      s.destroy();
      resolve({ closed: false, data: Buffer.concat(chunks) });
    }, ms);
    s.on('data', (b) => chunks.push(b));
    s.on('error', () => {});
    s.on('close', () => {
      clearTimeout(t);
      resolve({ closed: true, data: Buffer.concat(chunks) });
    });
    s.on('connect', () => s.write(bytes));
  });
}

describe('rpc', () => {
  it('calls a method and gets its result, over TCP and over a unix socket', async () => {
    const handlers: RpcHandlers = { add: (p: { a: number; b: number }) => p.a + p.b, echo: (p) => p, nothing: () => undefined };
    const tcp = await serve(handlers);
    const unix = await serve(handlers, { address: `unix:${path.join(dir, 'a.sock')}` });
    for (const addr of [tcp.address, unix.address]) {
      const c = client(addr);
      expect(await c.call('add', { a: 2, b: 40 })).toBe(42);
      const obj = { s: 'x', n: [1, 2, 3], nested: { big: 2 ** 40, neg: -7, f: 1.5 }, bin: Buffer.from([1, 2, 3]), nul: null };
      expect(await c.call('echo', obj)).toEqual(obj);
      expect(await c.call('nothing')).toBeNull();
    }
  });

  it('carries error codes and messages; unknown methods are ENOSYS; errors without a code are EIO', async () => {
    const { address } = await serve({
      fail: () => {
        throw Object.assign(new Error('no such volume vm1/disk0'), { code: 'ENOENT' });
      },
      failAsync: async () => {
        throw Object.assign(new Error('version moved'), { code: 'ESTALE' });
      },
      plain: () => {
        throw new Error('boom');
      },
    });
    const c = client(address);
    await expect(c.call('fail')).rejects.toMatchObject({ name: 'RpcError', code: 'ENOENT', message: 'no such volume vm1/disk0' });
    await expect(c.call('failAsync')).rejects.toMatchObject({ code: 'ESTALE', message: 'version moved' });
    await expect(c.call('plain')).rejects.toMatchObject({ code: 'EIO', message: 'boom' });
    await expect(c.call('nope')).rejects.toMatchObject({ code: 'ENOSYS' });
    // toString and __proto__ are not methods
    await expect(c.call('toString')).rejects.toMatchObject({ code: 'ENOSYS' });
    await expect(c.call('__proto__')).rejects.toMatchObject({ code: 'ENOSYS' });
    // the connection still works after errors
    await expect(c.call('fail')).rejects.toBeInstanceOf(RpcError);
  });

  it('matches replies that come back out of order to their calls', async () => {
    const order: number[] = [];
    const { address } = await serve({
      sleep: async (p: { ms: number; v: number }) => {
        await new Promise((r) => setTimeout(r, p.ms));
        order.push(p.v);
        return p.v;
      },
    });
    const c = client(address);
    const delays = [120, 10, 80, 0, 40, 100, 20, 60];
    const results = await Promise.all(delays.map((ms, v) => c.call('sleep', { ms, v })));
    expect(results).toEqual(delays.map((_, v) => v));
    // the server did answer out of order
    expect(order).not.toEqual([...order].sort((a, b) => a - b));
  });

  it('times out a call that gets no answer, and later calls still work', async () => {
    const { address } = await serve({
      hang: () => new Promise(() => {}),
      ping: () => 'pong',
    });
    const c = client(address, { timeoutMs: 5000 });
    const t0 = Date.now();
    await expect(c.call('hang', null, { timeoutMs: 200 })).rejects.toMatchObject({ code: 'ETIMEDOUT' });
    const took = Date.now() - t0;
    expect(took).toBeGreaterThanOrEqual(190);
    expect(took).toBeLessThan(2000);
    expect(await c.call('ping')).toBe('pong');
  });

  it('closes a connection that sends an oversize frame, without answering it, and keeps serving others', async () => {
    const { address } = await serve({ ping: () => 'pong' }, { maxFrame: 1024 });
    const good = client(address);
    expect(await good.call('ping')).toBe('pong');
    const big = Buffer.alloc(4);
    big.writeUInt32BE(1025);
    const r = await rawExchange(address, Buffer.concat([big, Buffer.alloc(100)]));
    expect(r.closed).toBe(true);
    expect(r.data.length).toBe(0);
    // a frame announcing 4 GiB is refused before any of it arrives
    const huge = Buffer.from([0xff, 0xff, 0xff, 0xff]);
    expect((await rawExchange(address, huge)).closed).toBe(true);
    // the server is still up; the existing client still works
    expect(await good.call('ping')).toBe('pong');
    expect(await client(address).call('ping')).toBe('pong');
    // and a frame at the limit is fine
    expect(await good.call('ping', 'x'.repeat(900))).toBe('pong');
  });

  it('closes a connection that sends garbage or a frame that is not a request', async () => {
    let calls = 0;
    const { address } = await serve({
      ping: () => {
        calls++;
        return 'pong';
      },
    });
    // bytes that are not msgpack at all (0xc1 is never used)
    const garbage = Buffer.concat([Buffer.from([0, 0, 0, 3]), Buffer.from([0xc1, 0xc1, 0xc1])]);
    expect((await rawExchange(address, garbage)).closed).toBe(true);
    // valid msgpack, not a request
    expect((await rawExchange(address, frame([1, 2, 3]))).closed).toBe(true);
    expect((await rawExchange(address, frame({ i: 'x', m: 'ping' }))).closed).toBe(true);
    expect(calls).toBe(0);
    // a well-formed request on a raw socket is answered
    const ok = await rawExchange(address, frame({ i: 7, m: 'ping', p: null }), 300);
    expect(ok.closed).toBe(false);
    expect(ok.data.readUInt32BE(0)).toBe(ok.data.length - 4);
    expect(packr.unpack(ok.data.subarray(4))).toEqual({ i: 7, r: 'pong' });
    expect(await client(address).call('ping')).toBe('pong');
  });

  it('fails calls in flight when the server goes away, and reconnects once it is back', async () => {
    const sock = path.join(dir, 'restart.sock');
    const handlers: RpcHandlers = { ping: () => 'pong', hang: () => new Promise(() => {}) };
    const s1 = new RpcServer({ handlers, logger: silentLogger() });
    await s1.listen(`unix:${sock}`);
    const c = client(`unix:${sock}`, { timeoutMs: 5000, connectTimeoutMs: 1000 });
    expect(await c.call('ping')).toBe('pong');
    // the rejection may arrive while s1.close() is still awaited: take it at once
    const inflight = c.call('hang').then(
      () => undefined,
      (e: unknown) => e,
    );
    const closed = new Promise((r) => c.once('close', r));
    await s1.close();
    expect(await inflight).toMatchObject({ code: 'ECONNRESET' });
    await closed;
    // nobody listening: the call fails at once with the connect error
    await expect(c.call('ping')).rejects.toBeInstanceOf(RpcError);
    const s2 = new RpcServer({ handlers, logger: silentLogger() });
    await s2.listen(`unix:${sock}`);
    cleanups.push(() => s2.close());
    expect(await c.call('ping')).toBe('pong');
  });

  it('refuses calls after close', async () => {
    const { address } = await serve({ ping: () => 'pong' });
    const c = client(address);
    expect(await c.call('ping')).toBe('pong');
    c.close();
    await expect(c.call('ping')).rejects.toMatchObject({ code: 'ESHUTDOWN' });
  });
});
