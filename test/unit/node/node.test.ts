/**
 * StorageNode with an in-memory fake ResolverStore: registration with the bound addresses,
 * heartbeats carrying fresh free space, a resolver outage (the node keeps serving, warns once,
 * registers again when the resolver is back), deregistration on stop; the RPC methods and their
 * error codes; volumes exported over NBD as they are created, grown and deleted.
 */
import { existsSync } from 'node:fs';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import * as C from '../../../lib/nbd/constants.js';
import { silentLogger, type Logger } from '../../../lib/log.js';
import { StorageNode } from '../../../lib/node/node.js';
import { VolumeStore } from '../../../lib/node/volumes.js';
import { ResolverError, type NameRecord, type NodeRecord, type NodeStatus, type ResolverStore } from '../../../lib/resolver/types.js';
import { RpcClient, RpcError } from '../../../lib/rpc/index.js';
import { RawClient } from '../nbd/rawclient.js';
import { tempDir } from '../../helpers/index.js';

const MiB = 1024 * 1024;

/** Only the node part of the contract; names are not the node's business. */
class FakeResolver implements ResolverStore {
  down = false;
  /** registerNode never answers (a resolver that hangs). */
  hang = false;
  registrations: { rec: NodeRecord; ttlMs: number | undefined; at: number }[] = [];
  deregistered: string[] = [];
  private fail(): void {
    if (this.down) throw new ResolverError('EUNAVAIL', 'resolver down');
  }
  async registerNode(rec: NodeRecord, ttlMs?: number): Promise<void> {
    if (this.hang) return new Promise(() => {});
    this.fail();
    this.registrations.push({ rec: structuredClone(rec), ttlMs, at: Date.now() });
  }
  async deregisterNode(id: string): Promise<void> {
    if (this.hang) return new Promise(() => {});
    this.fail();
    this.deregistered.push(id);
  }
  async getNode(): Promise<NodeStatus | null> {
    return null;
  }
  async listNodes(): Promise<NodeStatus[]> {
    return [];
  }
  async getName(): Promise<NameRecord | null> {
    return null;
  }
  async listNames(): Promise<NameRecord[]> {
    return [];
  }
  placeName(): never {
    throw new Error('not used');
  }
  putName(): never {
    throw new Error('not used');
  }
  deleteName(): never {
    throw new Error('not used');
  }
  chooseNodes(): never {
    throw new Error('not used');
  }
  async close(): Promise<void> {}
}

function capture(): { logger: Logger; lines: () => Array<Record<string, unknown>> } {
  const out: string[] = [];
  const stream = new Writable({
    write(chunk, _enc, cb) {
      out.push(chunk.toString());
      cb();
    },
  });
  return {
    logger: pino({ level: 'info' }, stream),
    lines: () => out.join('').split('\n').filter(Boolean).map((l) => JSON.parse(l)),
  };
}

async function until(cond: () => boolean, ms = 5000, what = 'condition'): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

const nodes: StorageNode[] = [];
const clients: RpcClient[] = [];
afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  for (const n of nodes.splice(0)) await n.stop().catch(() => {});
});

async function startNode(o: { data?: string; resolver?: ResolverStore; logger?: Logger; heartbeatMs?: number; leaseTtlMs?: number; id?: string } = {}) {
  const dir = tempDir('vstore-node-');
  const data = o.data ?? path.join(dir, 'data');
  const node = await StorageNode.start({
    data,
    nbd: [`unix:${dir}/nbd.sock`, '127.0.0.1:0'],
    control: [`unix:${dir}/ctl.sock`],
    zone: 'z1',
    logger: o.logger ?? silentLogger(),
    ...(o.resolver ? { resolver: o.resolver } : {}),
    ...(o.heartbeatMs ? { heartbeatMs: o.heartbeatMs } : {}),
    ...(o.leaseTtlMs ? { leaseTtlMs: o.leaseTtlMs } : {}),
    ...(o.id ? { id: o.id } : {}),
  });
  nodes.push(node);
  const rpc = new RpcClient(`unix:${dir}/ctl.sock`, { timeoutMs: 5000 });
  clients.push(rpc);
  return { node, rpc, dir, data };
}

async function rpcCode(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(RpcError);
    return (e as RpcError).code;
  }
  throw new Error('expected an RPC error');
}

describe('StorageNode RPC and exports', () => {
  it('node.info, volume.create/list/stat/grow/delete, with errno-like errors', async () => {
    const { node, rpc, dir, data } = await startNode();
    expect(node.nbdAddresses[0]).toBe(`unix:${dir}/nbd.sock`);
    expect(node.nbdAddresses[1]).toMatch(/^127\.0\.0\.1:[1-9]\d*$/);
    const info = await rpc.call<Record<string, unknown>>('node.info');
    expect(info).toMatchObject({ id: node.id, nbd: node.nbdAddresses, control: [`unix:${dir}/ctl.sock`], zone: 'z1', volumes: 0 });
    expect(info.capacity as number).toBeGreaterThan(0);
    expect(info.free as number).toBeLessThanOrEqual(info.capacity as number);
    // The id is stable: stored in DATA/node-id.
    expect((await fsp.readFile(path.join(data, 'node-id'), 'utf8')).trim()).toBe(node.id);

    expect(await rpc.call('volume.create', { name: 'vm1/disk0', size: 8 * MiB })).toMatchObject({ name: 'vm1/disk0', size: 8 * MiB, created: true });
    expect(await rpc.call('volume.create', { name: 'vm1/disk0', size: 8 * MiB })).toMatchObject({ created: false });
    expect(await rpcCode(rpc.call('volume.create', { name: 'vm1/disk0', size: 16 * MiB }))).toBe('EEXIST');
    expect(await rpcCode(rpc.call('volume.create', { name: '../escape', size: MiB }))).toBe('EINVAL');
    expect(await rpcCode(rpc.call('volume.create', { name: 'v', size: '1G' }))).toBe('EINVAL');
    expect(await rpcCode(rpc.call('volume.create', { name: 'v', size: 1000 }))).toBe('EINVAL');
    expect(await rpcCode(rpc.call('volume.create', null))).toBe('EINVAL');
    expect(await rpcCode(rpc.call('volume.stat', { name: 'nope' }))).toBe('ENOENT');
    expect(await rpcCode(rpc.call('volume.nonsense', {}))).toBe('ENOSYS');
    expect(existsSync(path.join(path.dirname(data), 'escape.img'))).toBe(false);

    await rpc.call('volume.create', { name: 'b', size: MiB });
    expect(await rpc.call('volume.list')).toEqual([
      { name: 'b', size: MiB, allocated: 0 },
      { name: 'vm1/disk0', size: 8 * MiB, allocated: 0 },
    ]);
    expect(node.exports).toEqual(['b', 'vm1/disk0']);
    expect(await rpc.call('volume.stat', { name: 'b' })).toMatchObject({ name: 'b', size: MiB, exported: true, connections: 0 });

    // Over NBD on the TCP address: the export exists with its size and multi-conn.
    const [host, port] = node.nbdAddresses[1]!.split(':');
    const c = await RawClient.connect({ host: host!, port: Number(port) });
    const hs = await c.handshake({ name: 'vm1/disk0' });
    expect(hs.size).toBe(8 * MiB);
    expect(hs.flags & C.NBD_FLAG_CAN_MULTI_CONN).toBeTruthy();
    expect(await rpc.call('volume.stat', { name: 'vm1/disk0' })).toMatchObject({ connections: 1 });
    // Delete is refused while a client is connected...
    expect(await rpcCode(rpc.call('volume.delete', { name: 'vm1/disk0' }))).toBe('EBUSY');
    // ...grow replaces the export (the client is disconnected after draining) ...
    expect(await rpc.call('volume.grow', { name: 'vm1/disk0', size: 32 * MiB })).toMatchObject({ size: 32 * MiB });
    await c.waitClosed(5000);
    expect(await rpcCode(rpc.call('volume.grow', { name: 'vm1/disk0', size: MiB }))).toBe('EINVAL');
    const c2 = await RawClient.connect(`${dir}/nbd.sock`);
    expect((await c2.handshake({ name: 'vm1/disk0' })).size).toBe(32 * MiB);
    // ...and force deletes anyway.
    expect(await rpc.call('volume.delete', { name: 'vm1/disk0', force: true })).toEqual({ deleted: true });
    await c2.waitClosed(5000);
    expect(node.exports).toEqual(['b']);
    expect(existsSync(path.join(data, 'volumes/vm1'))).toBe(false);
    expect(await rpcCode(rpc.call('volume.delete', { name: 'vm1/disk0' }))).toBe('ENOENT');
    expect((await rpc.call<{ volumes: number }>('node.info')).volumes).toBe(1);
  });

  it('writes through one address read back through the other; existing volumes are exported at start', async () => {
    const { node, rpc, dir, data } = await startNode({ id: 'n1' });
    await rpc.call('volume.create', { name: 'd', size: MiB });
    const [host, port] = node.nbdAddresses[1]!.split(':');
    const a = await RawClient.connect({ host: host!, port: Number(port) });
    await a.handshake({ name: 'd' });
    const payload = Buffer.alloc(4096, 0xa5);
    a.send(C.NBD_CMD_WRITE, 8192, 4096, { payload, flags: C.NBD_CMD_FLAG_FUA });
    expect((await a.reply()).error).toBe(0);
    a.destroy();
    const b = await RawClient.connect(`${dir}/nbd.sock`);
    await b.handshake({ name: 'd' });
    b.send(C.NBD_CMD_READ, 8192, 4096);
    expect((await b.reply()).data).toEqual(payload);
    b.destroy();
    await node.stop();
    expect(existsSync(`${dir}/nbd.sock`)).toBe(false);
    expect(existsSync(`${dir}/ctl.sock`)).toBe(false);
    expect(existsSync(path.join(data, 'lock'))).toBe(false);
    const f = await fsp.readFile(path.join(data, 'volumes/d.img'));
    expect(f.subarray(8192, 12288)).toEqual(payload);

    // Started again on the same DATA: the volume is exported at once.
    const again = await StorageNode.start({ data, nbd: [`unix:${dir}/nbd2.sock`], control: [], logger: silentLogger() });
    nodes.push(again);
    expect(again.exports).toEqual(['d']);
    expect(again.id).not.toBe('n1'); // --id is not stored; the stored id is used without it
    const c = await RawClient.connect(`${dir}/nbd2.sock`);
    await c.handshake({ name: 'd' });
    c.send(C.NBD_CMD_READ, 8192, 4096);
    expect((await c.reply()).data).toEqual(payload);
    c.destroy();
  });

  it('a second node on the same DATA is refused (EBUSY) and leaves no socket behind', async () => {
    const { data, dir } = await startNode();
    await expect(StorageNode.start({ data, nbd: [`unix:${dir}/other.sock`], control: [], logger: silentLogger() })).rejects.toMatchObject({ code: 'EBUSY' });
    expect(existsSync(`${dir}/other.sock`)).toBe(false);
  });
});

describe('StorageNode registration', () => {
  it('registers its bound addresses at start and heartbeats with fresh free space', async () => {
    const r = new FakeResolver();
    const { node, data } = await startNode({ resolver: r, leaseTtlMs: 900 });
    expect(r.registrations).toHaveLength(1); // registered before start() resolved
    const first = r.registrations[0]!;
    expect(first.ttlMs).toBe(900);
    expect(first.rec).toEqual({
      id: node.id,
      nbd: node.nbdAddresses,
      control: node.controlAddresses,
      capacity: expect.any(Number),
      free: expect.any(Number),
      zone: 'z1',
    });
    expect(first.rec.nbd[1]).not.toMatch(/:0$/);
    // Heartbeat every ttl/3 = 300 ms.
    await until(() => r.registrations.length >= 3, 3000, 'heartbeats');
    const gaps = r.registrations.slice(1).map((x, i) => x.at - r.registrations[i]!.at);
    for (const g of gaps) expect(g).toBeGreaterThanOrEqual(250);
    // Fill the disk a little: the next heartbeat reports less free space.
    const before = r.registrations[r.registrations.length - 1]!.rec.free;
    const fh = await fsp.open(path.join(data, 'filler'), 'w');
    await fh.write(Buffer.alloc(128 * MiB, 1));
    await fh.sync();
    await fh.close();
    const n = r.registrations.length;
    await until(() => r.registrations.length > n, 3000, 'a heartbeat after the fill');
    const after = r.registrations[r.registrations.length - 1]!.rec.free;
    expect(before - after).toBeGreaterThan(64 * MiB);
    await fsp.rm(path.join(data, 'filler'));
  });

  it('a resolver outage: the node keeps serving, warns once, registers again when back', async () => {
    const r = new FakeResolver();
    r.down = true;
    const log = capture();
    const { node, rpc } = await startNode({ resolver: r, heartbeatMs: 50, logger: log.logger });
    expect(node.resolverReachable).toBe(false);
    await new Promise((res) => setTimeout(res, 400)); // several failed heartbeats
    expect(r.registrations).toHaveLength(0);
    // Serving all along: control and NBD answer.
    await rpc.call('volume.create', { name: 'v', size: MiB });
    const c = await RawClient.connect(node.nbdAddresses[0]!.slice('unix:'.length));
    expect((await c.handshake({ name: 'v' })).size).toBe(MiB);
    c.destroy();
    const warns = () => log.lines().filter((l) => String(l.msg).includes('cannot register'));
    expect(warns()).toHaveLength(1);
    expect(warns()[0]).toMatchObject({ level: 40, code: 'EUNAVAIL' });

    r.down = false;
    await until(() => r.registrations.length > 0, 2000, 're-registration');
    expect(node.resolverReachable).toBe(true);
    expect(log.lines().some((l) => String(l.msg).includes('reachable again'))).toBe(true);
    // A second outage warns again (once).
    r.down = true;
    await new Promise((res) => setTimeout(res, 300));
    expect(warns()).toHaveLength(2);
  });

  it('stop deregisters, closes sockets and releases DATA; a hanging resolver does not hold stop', async () => {
    const r = new FakeResolver();
    const { node, dir, data } = await startNode({ resolver: r, heartbeatMs: 50 });
    await node.stop();
    expect(r.deregistered).toEqual([node.id]);
    const count = r.registrations.length;
    await new Promise((res) => setTimeout(res, 200));
    expect(r.registrations.length).toBe(count); // no heartbeat after stop
    expect(existsSync(`${dir}/nbd.sock`)).toBe(false);
    expect(existsSync(`${dir}/ctl.sock`)).toBe(false);
    const s = await VolumeStore.open(data, { logger: silentLogger() }); // lock released
    await s.close();

    const hanging = new FakeResolver();
    const h = await startNode({ resolver: hanging, heartbeatMs: 100 });
    hanging.hang = true;
    await new Promise((res) => setTimeout(res, 150));
    const t0 = Date.now();
    await h.node.stop();
    expect(Date.now() - t0).toBeLessThan(2500);
  });
});
