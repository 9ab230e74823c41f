/**
 * EtcdStore against a real etcd 3.4 on loopback (started here, on free ports): node records and
 * leases, placement, racing placements, compare-and-set, watch, and etcd going away and coming back.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import * as net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { requireCommands, run, tempDir } from '../helpers/index.js';
import { silentLogger } from '../../lib/log.js';
import { EtcdStore } from '../../lib/resolver/etcd.js';
import { openResolver } from '../../lib/resolver/open.js';
import { ResolverError, type NameRecord, type NodeRecord } from '../../lib/resolver/types.js';

const G = 1024 ** 3;

async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}

class Etcd {
  proc: ChildProcess | null = null;
  log = '';
  constructor(
    readonly dataDir: string,
    readonly clientPort: number,
    readonly peerPort: number,
  ) {}

  get endpoint(): string {
    return `http://127.0.0.1:${this.clientPort}`;
  }

  async start(): Promise<void> {
    const peer = `http://127.0.0.1:${this.peerPort}`;
    const p = spawn(
      'etcd',
      [
        '--data-dir', this.dataDir,
        '--listen-client-urls', this.endpoint,
        '--advertise-client-urls', this.endpoint,
        '--listen-peer-urls', peer,
        '--initial-advertise-peer-urls', peer,
        '--initial-cluster', `default=${peer}`,
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    this.proc = p;
    p.stdout!.on('data', (b) => (this.log += b));
    p.stderr!.on('data', (b) => (this.log += b));
    const deadline = Date.now() + 20_000;
    for (;;) {
      if (p.exitCode !== null) throw new Error(`etcd exited ${p.exitCode}:\n${this.log.slice(-3000)}`);
      try {
        const r = await fetch(`${this.endpoint}/health`, { signal: AbortSignal.timeout(1000) });
        if (r.ok && ((await r.json()) as { health?: string }).health === 'true') return;
      } catch {
        // not yet
      }
      if (Date.now() > deadline) throw new Error(`etcd did not become healthy:\n${this.log.slice(-3000)}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  /**
   * Sends `sig`; for SIGSTOP, resolves only once every thread of etcd is stopped. A group stop
   * reaches threads running on another CPU asynchronously: a request sent right after kill()
   * could still be answered (it happened once in CI).
   */
  async signal(sig: NodeJS.Signals): Promise<void> {
    const p = this.proc;
    if (!p?.pid) return;
    p.kill(sig);
    if (sig !== 'SIGSTOP') return;
    const tasks = `/proc/${p.pid}/task`;
    const deadline = Date.now() + 2000;
    const stopped = (): boolean =>
      readdirSync(tasks).every((t) => {
        let stat: string;
        try {
          stat = readFileSync(`${tasks}/${t}/stat`, 'utf8');
        } catch {
          return true; // the thread is gone
        }
        return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) === 'T';
      });
    while (!stopped()) {
      if (Date.now() > deadline) throw new Error('etcd did not stop within 2 s of SIGSTOP');
      await new Promise((r) => setTimeout(r, 5));
    }
  }

  async stop(sig: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    const p = this.proc;
    if (!p || p.exitCode !== null || p.signalCode !== null) return;
    const exited = new Promise((r) => p.once('exit', r));
    p.kill('SIGCONT');
    p.kill(sig);
    await exited;
    this.proc = null;
  }

  etcdctl(...args: string[]): Promise<string> {
    return run('etcdctl', ['--endpoints', this.endpoint, ...args], { env: { ...process.env, ETCDCTL_API: '3' }, timeoutMs: 10_000 }).then((r) => r.stdout);
  }
}

function nodeRec(id: string, free: number, extra: Partial<NodeRecord> = {}): NodeRecord {
  return { id, nbd: [`127.0.0.1:${10800 + id.length}`], control: [`unix:/run/vstore/${id}.ctl`], capacity: 100 * G, free, ...extra };
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

let etcd: Etcd;
const stores: EtcdStore[] = [];
function store(prefix: string, extra: { timeoutMs?: number; endpoints?: string[] } = {}): EtcdStore {
  const s = new EtcdStore({ endpoints: extra.endpoints ?? [etcd.endpoint], prefix, logger: silentLogger(), ...(extra.timeoutMs ? { timeoutMs: extra.timeoutMs } : {}) });
  stores.push(s);
  return s;
}

beforeAll(async () => {
  requireCommands('etcd', 'etcdctl');
  const dir = tempDir('vstore-etcd-');
  etcd = new Etcd(path.join(dir, 'data'), await freePort(), await freePort());
  await etcd.start();
});

afterAll(async () => {
  for (const s of stores) await s.close();
  await etcd?.stop('SIGKILL');
});

describe('EtcdStore on a real etcd', () => {
  it('keeps node records and leases: a silent node turns dead after its ttl, deregister ends liveness at once', async () => {
    const s = store('/t-lease/');
    await s.registerNode(nodeRec('quiet', 10 * G), 2000);
    await s.registerNode(nodeRec('beating', 20 * G), 2000);
    await s.registerNode(nodeRec('nbdkit1', 0, { static: true, control: [], capacity: 0 }));
    expect((await s.listNodes()).map((n) => [n.id, n.alive])).toEqual([
      ['beating', true],
      ['nbdkit1', true],
      ['quiet', true],
    ]);
    const leaseOf = async (id: string): Promise<string> => {
      // lease ids are int64: read them from the text (JSON.parse would round them)
      const out = await etcd.etcdctl('get', `/t-lease/alive/${id}`, '-w', 'json');
      return /"lease":(\d+)/.exec(out)?.[1] ?? 'none';
    };
    const lease1 = await leaseOf('beating');
    expect(lease1).not.toBe('none');
    // heartbeat 'beating' for 4.5 s; 'quiet' says nothing
    const t0 = Date.now();
    while (Date.now() - t0 < 4500) {
      await s.registerNode(nodeRec('beating', 19 * G), 2000);
      await new Promise((r) => setTimeout(r, 400));
    }
    expect(await leaseOf('beating')).toBe(lease1); // kept alive, not replaced
    expect(await s.getNode('quiet')).toMatchObject({ alive: false, free: 10 * G });
    expect(await s.getNode('beating')).toMatchObject({ alive: true, free: 19 * G });
    expect((await s.getNode('nbdkit1'))!.alive).toBe(true);
    expect((await s.getNode('beating'))!.seen).toBeGreaterThan(Date.now() - 2000);
    // the quiet node comes back with a heartbeat (a new lease)
    await s.registerNode(nodeRec('quiet', 10 * G), 2000);
    expect((await s.getNode('quiet'))!.alive).toBe(true);
    // clean exit: dead at once
    await s.deregisterNode('beating');
    expect((await s.getNode('beating'))!.alive).toBe(false);
    expect(await leaseOf('beating')).toBe('none');
    await s.deregisterNode('beating', { forget: true });
    expect(await s.getNode('beating')).toBeNull();
    expect(await codeOf(s.deregisterNode('beating'))).toBe('ENOENT');
    // an id held by another live node (another client, another address) is refused
    const other = store('/t-lease/');
    expect(await codeOf(other.registerNode(nodeRec('quiet', 1, { control: ['10.0.0.9:1'] }), 2000))).toBe('EEXIST');
    expect(await codeOf(other.registerNode(nodeRec('nbdkit1', 1), 2000))).toBe('EEXIST');
  });

  it('places on the most free live nodes, in distinct zones', async () => {
    const s = store('/t-place/');
    await s.registerNode(nodeRec('a1', 90 * G, { zone: 'a' }), 30_000);
    await s.registerNode(nodeRec('a2', 80 * G, { zone: 'a' }), 30_000);
    await s.registerNode(nodeRec('b1', 10 * G, { zone: 'b' }), 30_000);
    await s.registerNode(nodeRec('c1', 50 * G, { zone: 'c' }), 30_000);
    await s.registerNode(nodeRec('dead', 99 * G, { zone: 'd' }), 30_000);
    await s.deregisterNode('dead');
    await s.registerNode(nodeRec('st', 0, { static: true, control: [], capacity: 0 }));
    const r1 = await s.placeName({ name: 'vm1/disk0', kind: 'volume', size: 5 * G, replicas: 3 });
    expect(r1.created).toBe(true);
    expect(r1.record.replicas.map((r) => r.node)).toEqual(['a1', 'c1', 'b1']);
    expect(r1.record.version).toBe(1);
    const r2 = await s.placeName({ name: 'vm1/disk1', kind: 'volume', size: 20 * G, replicas: 2 });
    expect(r2.record.replicas.map((r) => r.node)).toEqual(['a1', 'c1']);
    const r3 = await s.placeName({ name: 'vm1/disk2', kind: 'volume', size: G, replicas: 1, nodes: [{ node: 'st', export: 'disk2' }] });
    expect(r3.record.replicas).toEqual([{ node: 'st', export: 'disk2', state: 'in-sync' }]);
    expect(await codeOf(s.placeName({ name: 'vm1/big', kind: 'volume', size: 60 * G, replicas: 3 }))).toBe('ENOSPC');
    expect(await s.getName('vm1/big')).toBeNull();
    expect((await s.chooseNodes(2, { exclude: ['a1'] })).map((n) => n.id)).toEqual(['a2', 'c1']);
    expect((await s.listNames('vm1/')).map((r) => r.name)).toEqual(['vm1/disk0', 'vm1/disk1', 'vm1/disk2']);
  });

  it('two clients racing placeName on one name 20 times at once end with one placement', async () => {
    const a = store('/t-race/');
    const b = store('/t-race/');
    for (let i = 0; i < 6; i++) await a.registerNode(nodeRec(`n${i}`, (10 + i) * G), 30_000);
    for (let round = 0; round < 3; round++) {
      const name = `vm/race${round}`;
      const results = await Promise.all(Array.from({ length: 20 }, (_, i) => (i % 2 ? a : b).placeName({ name, kind: 'volume', size: G, replicas: 2 })));
      expect(results.filter((r) => r.created)).toHaveLength(1);
      for (const r of results) expect(r.record).toEqual(results[0]!.record);
      expect(await a.getName(name)).toEqual(results[0]!.record);
      expect((await b.getName(name))!.version).toBe(1);
    }
  });

  it('putName is compare-and-set on the key version (ESTALE); deleteName too', async () => {
    const a = store('/t-cas/');
    const b = store('/t-cas/');
    await a.registerNode(nodeRec('n1', 10 * G), 30_000);
    await a.registerNode(nodeRec('n2', 10 * G), 30_000);
    const { record } = await a.placeName({ name: 'vm1/disk0', kind: 'volume', size: G, replicas: 2 });
    const v2 = await a.putName({ ...record, replicas: [record.replicas[0]!, { ...record.replicas[1]!, state: 'out-of-sync' }] });
    expect(v2.version).toBe(2);
    expect(await b.getName('vm1/disk0')).toEqual(v2);
    expect(await codeOf(b.putName({ ...record, dirtyHost: 'h1' }))).toBe('ESTALE');
    const v3 = await b.putName({ ...v2, dirtyHost: 'h1' });
    expect(v3).toMatchObject({ version: 3, dirtyHost: 'h1', created: record.created });
    expect(await codeOf(a.putName(v2))).toBe('ESTALE');
    // two writers from the same version: exactly one wins
    const race = await Promise.allSettled([a.putName({ ...v3, dirtyHost: 'a' }), b.putName({ ...v3, dirtyHost: 'b' })]);
    expect(race.filter((r) => r.status === 'fulfilled')).toHaveLength(1);
    expect(race.filter((r) => r.status === 'rejected').map((r) => ((r as PromiseRejectedResult).reason as ResolverError).code)).toEqual(['ESTALE']);
    expect(await codeOf(a.putName({ ...v3, name: 'vm1/none' }))).toBe('ENOENT');
    expect(await codeOf(a.deleteName('vm1/disk0', 3))).toBe('ESTALE');
    await a.deleteName('vm1/disk0', 4);
    expect(await codeOf(a.deleteName('vm1/disk0'))).toBe('ENOENT');
    expect(await b.getName('vm1/disk0')).toBeNull();
  });

  it('watchName sees the changes another client makes', async () => {
    const a = store('/t-watch/');
    const b = store('/t-watch/');
    await b.registerNode(nodeRec('n1', 10 * G), 30_000);
    const seen: (NameRecord | null)[] = [];
    const stop = a.watchName('vm1/disk0', (r) => seen.push(r));
    await new Promise((r) => setTimeout(r, 300)); // the watch is set up
    const { record } = await b.placeName({ name: 'vm1/disk0', kind: 'volume', size: G, replicas: 1 });
    await expect.poll(() => seen.length, { timeout: 5000 }).toBe(1);
    expect(seen[0]).toEqual(record);
    const v2 = await b.putName({ ...record, dirtyHost: 'host7' });
    await expect.poll(() => seen.length, { timeout: 5000 }).toBe(2);
    expect(seen[1]).toEqual(v2);
    await b.deleteName('vm1/disk0');
    await expect.poll(() => seen.length, { timeout: 5000 }).toBe(3);
    expect(seen[2]).toBeNull();
    await b.placeName({ name: 'vm1/other', kind: 'volume', size: G, replicas: 1 });
    stop();
    await b.placeName({ name: 'vm1/disk0', kind: 'volume', size: G, replicas: 1 });
    await new Promise((r) => setTimeout(r, 500));
    expect(seen).toHaveLength(3); // other names and changes after stop() are not seen
  });

  it('keeps its keys where it says (checked with etcdctl)', async () => {
    const s = await openResolver(`etcd://127.0.0.1:${etcd.clientPort}`, { logger: silentLogger() });
    stores.push(s as EtcdStore);
    await s.registerNode(nodeRec('k1', 10 * G, { zone: 'z' }), 30_000);
    await s.registerNode(nodeRec('kst', 0, { static: true, control: [], capacity: 0 }));
    const { record } = await s.placeName({ name: 'vm9/disk0', kind: 'volume', size: G, replicas: 1 });
    await s.putName(record);
    const keys = (await etcd.etcdctl('get', '--prefix', '/vstore/', '--keys-only')).split('\n').filter(Boolean);
    expect(keys).toEqual(['/vstore/alive/k1', '/vstore/names/vm9/disk0', '/vstore/nodes/k1', '/vstore/nodes/kst']);
    const name = JSON.parse((await etcd.etcdctl('get', '/vstore/names/vm9/disk0', '--print-value-only')).trim());
    expect(name).toEqual({ name: 'vm9/disk0', kind: 'volume', size: G, replicas: [{ node: 'k1', state: 'in-sync' }], created: record.created });
    const kv = JSON.parse(await etcd.etcdctl('get', '/vstore/names/vm9/disk0', '-w', 'json')) as { kvs: { version: number }[] };
    expect(kv.kvs[0]!.version).toBe(2); // the record's version is the key's
    expect((await s.getName('vm9/disk0'))!.version).toBe(2);
    const node = JSON.parse((await etcd.etcdctl('get', '/vstore/nodes/k1', '--print-value-only')).trim());
    expect(node.rec).toEqual(nodeRec('k1', 10 * G, { zone: 'z' }));
    const aliveText = await etcd.etcdctl('get', '/vstore/alive/k1', '-w', 'json');
    const alive = JSON.parse(aliveText) as { kvs: { value: string }[] };
    const lease = BigInt(/"lease":(\d+)/.exec(aliveText)![1]!); // int64: not through JSON.parse
    expect(lease).toBeGreaterThan(0n);
    expect(JSON.parse(Buffer.from(alive.kvs[0]!.value, 'base64').toString())).toHaveProperty('seen');
    const ttl = await etcd.etcdctl('lease', 'timetolive', lease.toString(16));
    expect(ttl).toMatch(/granted with TTL\(30s\)/);
  });

  it('tries the endpoints in turn', async () => {
    const dead = `127.0.0.1:${await freePort()}`;
    const s = store('/t-place/', { endpoints: [dead, etcd.endpoint], timeoutMs: 1000 });
    expect((await s.getName('vm1/disk0'))!.replicas).toHaveLength(3);
    const none = store('/t-place/', { endpoints: [dead], timeoutMs: 1000 });
    const e = await none.getName('vm1/disk0').catch((x: ResolverError) => x);
    expect(e).toBeInstanceOf(ResolverError);
    expect((e as ResolverError).code).toBe('EUNAVAIL');
    expect((e as ResolverError).message).toContain(`etcd at ${dead} unreachable`);
  });

  it('etcd stopped: calls fail with EUNAVAIL within the timeout; restarted on its data: records are all there', async () => {
    const s = store('/t-down/', { timeoutMs: 1000 });
    await s.registerNode(nodeRec('n1', 10 * G), 30_000);
    await s.registerNode(nodeRec('st', 0, { static: true, control: [], capacity: 0 }));
    const { record } = await s.placeName({ name: 'vm1/disk0', kind: 'volume', size: G, replicas: 1 });
    const watcher = store('/t-down/', { timeoutMs: 1000 });
    const seen: (NameRecord | null)[] = [];
    watcher.watchName('vm1/disk0', (r) => seen.push(r));
    await new Promise((r) => setTimeout(r, 300));

    await etcd.signal('SIGSTOP');
    try {
      for (const call of [() => s.getName('vm1/disk0'), () => s.listNodes(), () => s.placeName({ name: 'vm1/disk1', kind: 'volume', size: G, replicas: 1 })]) {
        const t0 = Date.now();
        const e = await call().catch((x: unknown) => x);
        const took = Date.now() - t0;
        expect(e).toBeInstanceOf(ResolverError);
        expect((e as ResolverError).code).toBe('EUNAVAIL');
        expect((e as ResolverError).message).toMatch(/etcd at 127\.0\.0\.1:\d+ unreachable: .*no answer in 1000 ms/);
        expect(took).toBeGreaterThanOrEqual(900);
        expect(took).toBeLessThan(2500);
      }
    } finally {
      await etcd.signal('SIGCONT');
    }
    expect(await s.getName('vm1/disk0')).toEqual(record);

    await etcd.stop('SIGKILL');
    const t0 = Date.now();
    expect(await codeOf(s.listNames())).toBe('EUNAVAIL');
    expect(await codeOf(s.registerNode(nodeRec('n1', 10 * G), 30_000))).toBe('EUNAVAIL');
    expect(Date.now() - t0).toBeLessThan(2500);

    await etcd.start();
    expect(await s.getName('vm1/disk0')).toEqual(record);
    expect((await s.listNodes()).map((n) => n.id)).toEqual(['n1', 'st']);
    await s.registerNode(nodeRec('n1', 10 * G), 30_000);
    expect((await s.getNode('n1'))!.alive).toBe(true);
    const r2 = await s.placeName({ name: 'vm1/disk1', kind: 'volume', size: G, replicas: 1 });
    expect(r2.created).toBe(true);
    // the watch reconnected by itself and sees changes made after the restart
    expect(seen).toEqual([]);
    const v2 = await s.putName({ ...record, dirtyHost: 'after-restart' });
    await expect.poll(() => seen.length, { timeout: 10_000 }).toBe(1);
    expect(seen[0]).toEqual(v2);
    // the other tests' records survived too
    expect((await store('/t-place/').listNames()).length).toBe(3);
  });
});
