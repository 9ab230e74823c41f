/**
 * Short-circuit local writes, in process: a real StorageNode (unix NBD socket + `.sc` socket),
 * RemoteVolume / ReplicatedVolume over it; ShortCircuitServer alone for the lease races.
 */
import { closeSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import type { ReplicaState } from '../../../lib/block/replicated.js';
import { ShortCircuitReader } from '../../../lib/block/shortcircuit.js';
import { silentLogger } from '../../../lib/log.js';
import { StorageNode } from '../../../lib/node/node.js';
import { ShortCircuitServer } from '../../../lib/node/shortcircuit.js';
import { tempDir } from '../../helpers/index.js';
import { MiB, cleanup, node, remote, replicatedPair, until } from './shortcircuit-helpers.js';

/** Writes the node received over NBD (its export's counters). */
function nbdWrites(n: StorageNode, vol: string): number {
  const s = (n as unknown as { nbdServer: { stats(): { exports: { name: string; writes: number }[] } } }).nbdServer.stats();
  return s.exports.find((e) => e.name === vol)?.writes ?? 0;
}

describe('short-circuit writes (RemoteVolume over a StorageNode on this host)', () => {
  it('writes the node file with pwrite (no NBD write), FUA and flush included; the node serves what was written', async () => {
    const a = await node('n1');
    await a.node.createVolume('v', 4 * MiB);
    const v = await remote(a.sock, 'v');
    await until('read-write descriptor', () => v.shortCircuitStatus().active && v.shortCircuitStatus().writable);
    expect(a.node.shortCircuitServers[0]!.leases('v', true)).toBe(1);
    const before = nbdWrites(a.node, 'v');
    for (let i = 0; i < 16; i++) await v.write(i * 65536 + 512, Buffer.alloc(65536, i + 1), { fua: i % 4 === 0 });
    await v.flush();
    expect(v.shortCircuitStatus().writes).toBe(16);
    expect(nbdWrites(a.node, 'v')).toBe(before);
    const file = readFileSync(a.file('v'));
    for (let i = 0; i < 16; i++) expect(file.subarray(i * 65536 + 512, (i + 1) * 65536 + 512).every((x) => x === i + 1)).toBe(true);
    // The node serves the same bytes over NBD (no state of its own about the data).
    const plain = await remote(a.sock, 'v', { id: 'n1-nbd', shortCircuitWrites: false });
    (plain as unknown as { scSocket: null }).scSocket = null;
    const b = Buffer.alloc(65536);
    await plain.read(3 * 65536 + 512, b);
    expect(b.every((x) => x === 4)).toBe(true);
  });

  it('shortCircuitWrites: false keeps writes on NBD with a read-only descriptor for reads', async () => {
    const a = await node('n1');
    await a.node.createVolume('v', MiB);
    const v = await remote(a.sock, 'v', { shortCircuitWrites: false });
    await until('descriptor', () => v.shortCircuitStatus().active);
    expect(v.shortCircuitStatus().writable).toBe(false);
    expect(a.node.shortCircuitServers[0]!.leases('v', true)).toBe(0);
    const before = nbdWrites(a.node, 'v');
    await v.write(0, Buffer.alloc(4096, 7));
    await v.flush();
    expect(nbdWrites(a.node, 'v')).toBe(before + 1);
    expect(v.shortCircuitStatus().writes).toBe(0);
    const b = Buffer.alloc(4096);
    expect(v.readLocal(0, b)).toBe(true);
    expect(b.every((x) => x === 7)).toBe(true);
  });

  it('a write whose lease ends meanwhile is sent again over NBD (as a broken path) and lands', async () => {
    const a = await node('n1');
    await a.node.createVolume('v', 4 * MiB);
    const v = await remote(a.sock, 'v');
    await until('descriptor', () => v.shortCircuitStatus().writable);
    const before = nbdWrites(a.node, 'v');
    const p = v.write(MiB, Buffer.alloc(MiB, 0x5a));
    a.node.shortCircuitServers[0]!.invalidate('v', 'test'); // before the pwrite's completion is seen
    await p;
    expect(v.shortCircuitStatus().writes).toBe(0);
    expect(nbdWrites(a.node, 'v')).toBe(before + 1);
    expect(readFileSync(a.file('v')).subarray(MiB, 2 * MiB).every((x) => x === 0x5a)).toBe(true);
  });
});

describe('ShortCircuitReader writes and the lease', () => {
  it('grants read-write only when asked; a write or fdatasync completing after the lease ended fails ESHUTDOWN', async () => {
    const dir = tempDir('vst-scw-srv-');
    const file = path.join(dir, 'v.img');
    writeFileSync(file, Buffer.alloc(MiB));
    const sock = path.join(dir, 'x.sc');
    const srv = await ShortCircuitServer.listen({ path: sock, lookup: async () => ({ file, size: MiB }), logger: silentLogger() });
    cleanup.push(() => srv.close());
    const ro = await ShortCircuitReader.open({ socket: sock, volume: 'v' });
    expect(ro.writable).toBe(false);
    await expect(ro.write(0, Buffer.alloc(512))).rejects.toMatchObject({ code: 'ESHUTDOWN' });
    ro.invalidate('done');
    const rw = await ShortCircuitReader.open({ socket: sock, volume: 'v', write: true });
    expect(rw.writable).toBe(true);
    expect(srv.grantedWritable).toBe(1);
    await rw.write(4096, Buffer.alloc(8192, 3));
    await rw.datasync();
    expect(readFileSync(file).subarray(4096, 12288).every((x) => x === 3)).toBe(true);
    // Ended by the node with the write already submitted: never reported done.
    const w = rw.write(0, Buffer.alloc(65536, 4));
    srv.invalidate('v', 'test');
    await expect(w).rejects.toMatchObject({ code: 'ESHUTDOWN' });
    expect(rw.usable).toBe(false);
    await expect(rw.datasync()).rejects.toMatchObject({ code: 'ESHUTDOWN' });
    // The synchronous check alone (the watcher has not run yet): the node closed, the check sees it.
    const rw2 = await ShortCircuitReader.open({ socket: sock, volume: 'v', write: true });
    srv.invalidate('v', 'test');
    await new Promise((r) => setImmediate(r)); // let the close reach the socket, not necessarily the watcher
    expect(rw2.leaseHolds()).toBe(false);
  });
});

describe('short-circuit writes under the replicated layer', () => {
  it('a failed local write demotes the replica, persisted before the write is acknowledged; resync goes through the node', async () => {
    const { a, b, ra, rb, drl, rep, persisted } = await replicatedPair(200);
    await until('descriptors', () => ra.shortCircuitStatus().writable && rb.shortCircuitStatus().writable);
    await rep.write(0, Buffer.alloc(MiB, 1));
    await rep.flush();
    expect(ra.shortCircuitStatus().writes).toBe(1);
    expect(rb.shortCircuitStatus().writes).toBe(1);
    // n1's descriptor now fails every write with a real kernel error (EBADF: opened read-only).
    const sc = (ra as unknown as { sc: { fd: number } }).sc;
    const good = sc.fd;
    const bad = openSync(a.file('v'), 'r');
    sc.fd = bad;
    let ackedWith: Record<string, ReplicaState> | undefined;
    await rep.write(MiB, Buffer.alloc(MiB, 2)).then(() => (ackedWith = persisted.at(-1)));
    closeSync(good); // the reader closed `bad` when it was dropped; its own descriptor is ours to close
    expect(sc.fd).toBe(-1);
    expect(ackedWith).toMatchObject({ n1: 'out-of-sync', n2: 'in-sync' });
    expect(drl.isDirty('n1', Math.floor(MiB / drl.regionSize))).toBe(true);
    expect(ra.shortCircuitStatus().active).toBe(false); // dropped at the demotion
    // n1 stays up: resynced over NBD after resyncRetryMs, then in sync with a descriptor again.
    await until('n1 in sync again', () => rep.status().find((r) => r.id === 'n1')!.state === 'in-sync' && ra.shortCircuitStatus().writable, 10_000);
    await rep.flush();
    expect(readFileSync(a.file('v')).equals(readFileSync(b.file('v')))).toBe(true);
  });
});
