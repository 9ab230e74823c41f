import * as net from 'node:net';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { tempDir } from '../../helpers/index.js';
import { silentLogger } from '../../../lib/log.js';
import { RpcClient } from '../../../lib/rpc/index.js';
import { EmbeddedStore } from '../../../lib/resolver/embedded.js';
import { openResolver } from '../../../lib/resolver/open.js';
import { EtcdStore } from '../../../lib/resolver/etcd.js';
import { RemoteResolver, ResolverService } from '../../../lib/resolver/service.js';
import { ResolverError, type NameRecord, type NodeRecord } from '../../../lib/resolver/types.js';

const G = 1024 ** 3;
const cleanups: (() => unknown)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

function nodeRec(id: string, free: number, extra: Partial<NodeRecord> = {}): NodeRecord {
  return { id, nbd: [`unix:/run/${id}.sock`], control: [`unix:/run/${id}.ctl`], capacity: 100 * G, free, ...extra };
}

async function codeOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(ResolverError);
    return (e as ResolverError).code;
  }
  throw new Error('did not throw');
}

async function startService(): Promise<{ dir: string; sock: string; tcp: string; store: EmbeddedStore; service: ResolverService }> {
  const dir = tempDir('vstore-rsvc-');
  const store = await EmbeddedStore.open(path.join(dir, 'r.json'), { logger: silentLogger() });
  const sock = path.join(dir, 'r.sock');
  const service = await ResolverService.start({ store, listen: [`unix:${sock}`, '127.0.0.1:0'], logger: silentLogger() });
  cleanups.push(() => store.close());
  cleanups.push(() => service.close());
  return { dir, sock, tcp: service.addresses[1]!, store, service };
}

function remote(addr: string, opts: ConstructorParameters<typeof RemoteResolver>[1] = {}): RemoteResolver {
  const r = new RemoteResolver(addr, opts);
  cleanups.push(() => r.close());
  return r;
}

describe('resolver service over RPC', () => {
  it('round-trips every operation, over a unix socket and TCP, and both see one store', async () => {
    const { sock, tcp } = await startService();
    const a = remote(`unix:${sock}`);
    const b = remote(tcp);
    await a.registerNode(nodeRec('n1', 10 * G, { zone: 'z1' }), 30_000);
    await b.registerNode(nodeRec('n2', 20 * G, { zone: 'z2' }), 30_000);
    await a.registerNode(nodeRec('nbdkit1', 0, { static: true, control: [], capacity: 0 }));
    expect((await b.listNodes()).map((n) => [n.id, n.alive, n.zone ?? null])).toEqual([
      ['n1', true, 'z1'],
      ['n2', true, 'z2'],
      ['nbdkit1', true, null],
    ]);
    expect(await a.getNode('n2')).toMatchObject({ id: 'n2', free: 20 * G, alive: true });
    expect(await a.getNode('nope')).toBeNull();

    const placed = await a.placeName({ name: 'vm1/disk0', kind: 'volume', size: G, replicas: 2 });
    expect(placed.created).toBe(true);
    expect(placed.record.replicas.map((r) => r.node)).toEqual(['n2', 'n1']);
    const again = await b.placeName({ name: 'vm1/disk0', kind: 'volume', size: G, replicas: 2 });
    expect(again).toEqual({ record: placed.record, created: false });
    const pinned = await b.placeName({ name: 'vm2/disk0', kind: 'volume', size: G, replicas: 1, nodes: [{ node: 'nbdkit1', export: 'disk0' }] });
    expect(pinned.record.replicas).toEqual([{ node: 'nbdkit1', export: 'disk0', state: 'in-sync' }]);

    expect((await b.listNames()).map((r) => r.name)).toEqual(['vm1/disk0', 'vm2/disk0']);
    expect((await b.listNames('vm2/')).map((r) => r.name)).toEqual(['vm2/disk0']);
    const rec = (await b.getName('vm1/disk0'))!;
    const v2 = await a.putName({ ...rec, replicas: [rec.replicas[0]!, { ...rec.replicas[1]!, state: 'out-of-sync' }] });
    expect(v2.version).toBe(2);
    expect((await b.getName('vm1/disk0'))!.replicas[1]!.state).toBe('out-of-sync');
    expect((await a.chooseNodes(1, { exclude: ['n1', 'n2'] }).catch((e: ResolverError) => e.code))).toBe('ENOSPC');
    expect((await a.chooseNodes(1, { exclude: ['n2'] })).map((n) => n.id)).toEqual(['n1']);
    await b.deleteName('vm2/disk0', 1);
    expect(await a.getName('vm2/disk0')).toBeNull();
    await a.deregisterNode('n1');
    expect((await b.getNode('n1'))!.alive).toBe(false);
    await a.deregisterNode('n1', { forget: true });
    expect(await b.getNode('n1')).toBeNull();
  });

  it('carries the resolver error codes over the wire', async () => {
    const { sock } = await startService();
    const r = remote(`unix:${sock}`);
    await r.registerNode(nodeRec('n1', 10 * G), 30_000);
    const { record } = await r.placeName({ name: 'vm1/disk0', kind: 'volume', size: G, replicas: 1 });
    await r.putName(record);
    expect(await codeOf(r.putName(record))).toBe('ESTALE');
    expect(await codeOf(r.deleteName('vm1/disk0', 1))).toBe('ESTALE');
    expect(await codeOf(r.deleteName('vm1/none'))).toBe('ENOENT');
    expect(await codeOf(r.deregisterNode('ghost'))).toBe('ENOENT');
    expect(await codeOf(r.placeName({ name: 'vm1/disk1', kind: 'volume', size: G, replicas: 2 }))).toBe('ENOSPC');
    expect(await codeOf(r.placeName({ name: '../etc', kind: 'volume', size: G, replicas: 1 }))).toBe('EINVAL');
    expect(await codeOf(r.registerNode(nodeRec('n1', 1, { control: ['127.0.0.1:1'] }), 30_000))).toBe('EEXIST');
    const e = await r.placeName({ name: 'vm1/disk1', kind: 'volume', size: G, replicas: 2 }).catch((x: ResolverError) => x);
    expect((e as ResolverError).message).toContain('need 2 live node(s)');
  });

  it('refuses malformed params with EINVAL, also from a raw RPC client', async () => {
    const { sock } = await startService();
    const c = new RpcClient(`unix:${sock}`);
    cleanups.push(() => c.close());
    await expect(c.call('node.register', { rec: { id: 'x' } })).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(c.call('node.register', 'hello')).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(c.call('name.place', { name: 'v', kind: 'volume', size: null, replicas: 1 })).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(c.call('name.put', { record: { name: 'v' } })).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(c.call('node.get', { id: 42 })).rejects.toMatchObject({ code: 'EINVAL' });
    // optional fields sent as null are absent
    await c.call('node.register', { rec: { ...nodeRec('n1', G), zone: null }, ttlMs: null });
    expect(await c.call('node.get', { id: 'n1' })).toMatchObject({ id: 'n1', alive: true });
  });

  it('watchName over the service sees a change made by another client', async () => {
    const { sock } = await startService();
    const a = remote(`unix:${sock}`, { watchIntervalMs: 50 });
    const b = remote(`unix:${sock}`);
    await b.registerNode(nodeRec('n1', 10 * G), 30_000);
    const seen: (NameRecord | null)[] = [];
    const stop = a.watchName('vm1/disk0', (r) => seen.push(r));
    await new Promise((r) => setTimeout(r, 120));
    await b.placeName({ name: 'vm1/disk0', kind: 'volume', size: G, replicas: 1 });
    await expect.poll(() => seen.length, { timeout: 2000 }).toBe(1);
    expect(seen[0]?.version).toBe(1);
    await b.deleteName('vm1/disk0');
    await expect.poll(() => seen.length, { timeout: 2000 }).toBe(2);
    expect(seen[1]).toBeNull();
    stop();
  });

  it('an unreachable service is EUNAVAIL: no socket, connection refused, no answer, service gone', async () => {
    const dir = tempDir('vstore-rsvc-');
    expect(await codeOf(remote(`unix:${path.join(dir, 'missing.sock')}`).listNodes())).toBe('EUNAVAIL');
    // a port nobody listens on
    const probe = net.createServer();
    await new Promise<void>((r) => probe.listen(0, '127.0.0.1', r));
    const port = (probe.address() as net.AddressInfo).port;
    await new Promise((r) => probe.close(r));
    expect(await codeOf(remote(`127.0.0.1:${port}`).getName('x'))).toBe('EUNAVAIL');
    // a server that accepts and never answers: EUNAVAIL at the timeout
    const mute = net.createServer((s) => s.resume()); // reads, never answers
    await new Promise<void>((r) => mute.listen(0, '127.0.0.1', r));
    cleanups.push(() => new Promise((r) => mute.close(r)));
    const t0 = Date.now();
    const e = await remote(`127.0.0.1:${(mute.address() as net.AddressInfo).port}`, { timeoutMs: 300 })
      .listNodes()
      .catch((x: ResolverError) => x);
    expect((e as ResolverError).code).toBe('EUNAVAIL');
    expect((e as ResolverError).message).toMatch(/resolver service at 127\.0\.0\.1:\d+ unreachable/);
    expect(Date.now() - t0).toBeLessThan(2000);
    // the service stops: EUNAVAIL; it comes back on the same socket: the same client works again
    const { sock, store, service } = await startService();
    const r = remote(`unix:${sock}`);
    await r.registerNode(nodeRec('st', 0, { static: true, control: [] }));
    await service.close();
    expect(await codeOf(r.listNodes())).toBe('EUNAVAIL');
    const again = await ResolverService.start({ store, listen: [`unix:${sock}`], logger: silentLogger() });
    cleanups.push(() => again.close());
    expect((await r.listNodes()).map((n) => n.id)).toEqual(['st']);
  });

  it('openResolver picks the store from the URL and refuses what it does not know', async () => {
    const { sock, tcp, dir } = await startService();
    const log = { logger: silentLogger() };
    for (const url of [`unix:${sock}`, sock, tcp, `vstore://${tcp}`]) {
      const s = await openResolver(url, log);
      expect(s).toBeInstanceOf(RemoteResolver);
      expect(await s.listNodes()).toEqual([]);
      await s.close();
    }
    const f = await openResolver(`file:${path.join(dir, 'other.json')}`, log);
    expect(f).toBeInstanceOf(EmbeddedStore);
    await f.close();
    const e = await openResolver('etcd://127.0.0.1:1,127.0.0.2:2/myprefix', log);
    expect(e).toBeInstanceOf(EtcdStore);
    expect((e as EtcdStore).endpoints).toEqual(['http://127.0.0.1:1', 'http://127.0.0.2:2']);
    expect((e as EtcdStore).prefix).toBe('/myprefix/');
    await e.close();
    for (const bad of ['', 'http://x:1', 'nonsense', 'file:', 'etcd://', 'etcd://host', 'vstore://nope']) {
      expect(await codeOf(openResolver(bad, log))).toBe('EINVAL');
    }
  });
});
