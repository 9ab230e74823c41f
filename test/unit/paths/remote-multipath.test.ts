/**
 * RemoteVolume over several paths to one in-process NBD server (MemoryVolume), each path a TCP
 * proxy on its own loopback address that the test cuts, blackholes and restores while requests
 * run: no request fails, the data is right, the failed path is left, and it is used again per
 * the failback policy.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { MemoryVolume } from '../../../lib/block/memory.js';
import { OrderedVolume } from '../../../lib/block/ordering.js';
import { RemoteVolume } from '../../../lib/block/remote.js';
import { silentLogger } from '../../../lib/log.js';
import { NbdServer } from '../../../lib/nbd/server.js';
import { PathTable, pathPolicy, type PathPolicy } from '../../../lib/paths/index.js';
import { pattern, sleep } from '../nbd/setup.js';
import { startProxy, type Proxy } from './proxy.js';
import { waitFor } from './wait.js';

const MiB = 1024 * 1024;
const log = silentLogger();
const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const f of cleanups.splice(0).reverse()) await f();
});

async function setup(policy: Partial<PathPolicy>, vm?: string) {
  const mem = new MemoryVolume({ size: 8 * MiB });
  const server = new NbdServer({ logger: log });
  server.addExport({ name: 'disk', volume: mem });
  await server.listen({ tcp: { host: '127.0.0.1', port: 0 } });
  cleanups.push(() => server.close());
  const port = (server.addresses[0] as { tcp: { port: number } }).tcp.port;
  const proxies: Proxy[] = [];
  for (const host of ['127.0.0.1', '127.0.0.2', '127.0.0.3']) {
    const p = await startProxy(host, { host: '127.0.0.1', port });
    cleanups.push(() => p.close());
    proxies.push(p);
  }
  const table = new PathTable(pathPolicy({ requestTimeoutMs: 500, probeTimeoutMs: 300, healthIntervalMs: 100, ...policy }), log);
  const paths = table.forNode('n1', proxies.map((p) => p.address));
  const vol = await RemoteVolume.open({ id: 'n1', addresses: paths.paths.map((p) => p.address), export: 'disk', paths, logger: log, connectTimeoutMs: 300, reconnect: { initialMs: 50, maxMs: 200 }, ...(vm ? { vm } : {}) });
  cleanups.push(() => vol.close());
  // The daemon's export orders overlapping requests above the remote volume; so does this test.
  return { mem, proxies, table, paths, vol, ordered: new OrderedVolume(vol) };
}

/** Writes and verifies random 4 KiB blocks until `stop()`; every error is collected. */
function workload(v: OrderedVolume, depth = 8) {
  let running = true;
  const errors: Error[] = [];
  let ops = 0;
  const model = new Map<number, number>();
  const worker = async (w: number): Promise<void> => {
    let seed = w * 7919;
    while (running) {
      const block = (seed = (seed * 1103515245 + 12345) % 2048);
      const off = block * 4096;
      try {
        if (seed % 3 === 0 && model.has(block)) {
          const b = Buffer.alloc(4096);
          const want = model.get(block)!;
          await v.read(off, b);
          if (!b.equals(pattern(4096, want))) errors.push(new Error(`block ${block}: wrong data`));
        } else {
          const s = ops + w * 100000;
          model.set(block, s);
          await v.write(off, pattern(4096, s));
        }
        ops++;
      } catch (e) {
        errors.push(e as Error);
      }
    }
  };
  const done = Promise.all(Array.from({ length: depth }, (_, w) => worker(w)));
  return {
    errors,
    get ops() {
      return ops;
    },
    async stop() {
      running = false;
      await done;
      return model;
    },
  };
}

describe('RemoteVolume multipath', () => {
  it('one connection per path; round-robin spreads requests over all of them', async () => {
    const { vol, paths } = await setup({ selector: 'round-robin' });
    await waitFor('three connections', () => vol.connectionCount === 3, 3000);
    for (let i = 0; i < 30; i++) await vol.write(i * 4096, pattern(4096, i));
    expect(paths.status().map((p) => p.writes)).toEqual([10, 10, 10]);
    expect(paths.status().every((p) => p.state === 'up')).toBe(true);
  });

  for (const how of ['cut', 'blackhole'] as const) {
    it(`${how}: requests on the lost path are retried on the others, no error reaches the caller, the path comes back`, async () => {
      const { vol, paths, proxies, ordered, mem } = await setup({ selector: 'least-pending', failback: { mode: 'immediate' } });
      await waitFor('three connections', () => vol.connectionCount === 3, 3000);
      const w = workload(ordered);
      await sleep(150);
      if (how === 'cut') await proxies[1]!.cut();
      else proxies[1]!.blackhole();
      await waitFor('path 2 down', () => paths.paths[1]!.state === 'down', 5000);
      const before = w.ops;
      await sleep(300);
      expect(w.ops).toBeGreaterThan(before); // I/O goes on over the other paths
      const writesOnCutPath = paths.paths[1]!.writes;
      await sleep(200);
      expect(paths.paths[1]!.writes).toBe(writesOnCutPath);
      await proxies[1]!.restore();
      await waitFor('path 2 up again', () => paths.paths[1]!.state === 'up', 5000);
      await waitFor('path 2 used again', () => paths.paths[1]!.writes > writesOnCutPath + 5, 5000);
      const model = await w.stop();
      expect(w.errors.map((e) => e.message)).toEqual([]);
      if (how === 'blackhole') expect(vol.failovers).toBeGreaterThan(0);
      expect(paths.paths[1]!.status().downs).toBe(1);
      // Every block holds its last write, on the server itself.
      for (const [block, seed] of model) {
        const b = Buffer.alloc(4096);
        await mem.read(block * 4096, b);
        expect(b.equals(pattern(4096, seed)), `block ${block}`).toBe(true);
      }
    });
  }

  it('every path gone: the request fails (EIO), so the replicated layer above can act', async () => {
    const { vol, proxies } = await setup({});
    await waitFor('three connections', () => vol.connectionCount === 3, 3000);
    for (const p of proxies) p.blackhole();
    const t0 = Date.now();
    await expect(vol.read(0, Buffer.alloc(4096))).rejects.toMatchObject({ code: 'EIO' });
    // one request timeout per path at most
    expect(Date.now() - t0).toBeLessThan(3 * 500 + 1500);
  });

  it('delayed failback: a returning path waits for the delay before it takes requests again', async () => {
    const { vol, paths, proxies } = await setup({ selector: 'round-robin', failback: { mode: 'delayed', ms: 1000 } });
    await waitFor('three connections', () => vol.connectionCount === 3, 3000);
    await proxies[0]!.cut();
    await waitFor('path 1 down', () => paths.paths[0]!.state === 'down', 3000);
    await proxies[0]!.restore();
    await waitFor('reconnected', () => vol.connectionCount === 3, 3000);
    const t0 = Date.now();
    const w0 = paths.paths[0]!.writes;
    for (let i = 0; i < 20; i++) await vol.write(i * 4096, pattern(4096, i));
    expect(paths.paths[0]!.writes).toBe(w0); // healthy, connected, but not used yet
    expect(paths.paths[0]!.status().awaitingFailback).toBe(true);
    await waitFor('failback', () => paths.paths[0]!.state === 'up', 3000);
    expect(Date.now() - t0).toBeGreaterThan(500);
    for (let i = 0; i < 20; i++) await vol.write(i * 4096, pattern(4096, i));
    expect(paths.paths[0]!.writes).toBeGreaterThan(w0);
  });

  it('a VM keeps to its home path; two VMs on one node get different paths', async () => {
    const a = await setup({ selector: 'round-robin' }, 'vmA');
    const vb = await RemoteVolume.open({ id: 'n1', addresses: a.paths.paths.map((p) => p.address), export: 'disk', paths: a.paths, vm: 'vmB', logger: log });
    cleanups.push(() => vb.close());
    await waitFor('connections', () => a.vol.connectionCount === 3 && vb.connectionCount === 3, 3000);
    for (let i = 0; i < 10; i++) {
      await a.vol.write(i * 4096, pattern(4096, i));
      await vb.write(i * 4096, pattern(4096, i));
    }
    const st = a.paths.status();
    const homeA = st.findIndex((p) => p.vms.includes('vmA'));
    const homeB = st.findIndex((p) => p.vms.includes('vmB'));
    expect(homeA).not.toBe(homeB);
    expect(st[homeA]!.writes).toBe(10);
    expect(st[homeB]!.writes).toBe(10);
  });

  it('paths.sources: one path per address and local source, each connection bound to its source', async () => {
    const { proxies } = await setup({});
    const table = new PathTable(pathPolicy({ sources: ['127.0.0.2', '127.0.0.3'], healthIntervalMs: 0 }), log);
    const paths = table.forNode('n2', [proxies[0]!.address]);
    const before = proxies[0]!.clients.length;
    const vol = await RemoteVolume.open({ id: 'n2', addresses: [proxies[0]!.address], export: 'disk', paths, logger: log });
    cleanups.push(() => vol.close());
    await waitFor('two connections', () => vol.connectionCount === 2, 3000);
    expect(paths.paths.map((p) => p.id)).toEqual([`${proxies[0]!.address}@127.0.0.2`, `${proxies[0]!.address}@127.0.0.3`]);
    expect(proxies[0]!.clients.slice(before).sort()).toEqual(['127.0.0.2', '127.0.0.3']);
  });
});
