/**
 * Short-circuit local reads, in process: a real StorageNode (unix NBD socket + its `.sc` socket),
 * RemoteVolume / ReplicatedVolume over it, and ShortCircuitServer alone for the refusals.
 */
import { existsSync, openSync, closeSync, constants as FS, writeFileSync, writeSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ShortCircuitReader } from '../../../lib/block/shortcircuit.js';
import { silentLogger } from '../../../lib/log.js';
import { native } from '../../../lib/native/index.js';
import { StorageNode } from '../../../lib/node/node.js';
import { ShortCircuitServer, fdIsDirect, type ShortCircuitServerOptions } from '../../../lib/node/shortcircuit.js';
import { tempDir } from '../../helpers/index.js';
import { MiB, cleanup, node, remote, replicatedPair, until } from './shortcircuit-helpers.js';

describe('short-circuit reads (RemoteVolume over a StorageNode on this host)', () => {
  it('reads the local file, sees each acknowledged write at once, and the node counts the lease', async () => {
    const { node: n, sock } = await node();
    await n.createVolume('v', 4 * MiB);
    const v = await remote(sock, 'v');
    await until('descriptor', () => v.shortCircuitStatus().active);
    expect(n.shortCircuitServers[0]!.leases('v')).toBe(1);
    const buf = Buffer.alloc(8192);
    for (let i = 0; i < 50; i++) {
      const data = Buffer.alloc(8192, (i % 250) + 1);
      const off = ((i * 7919) % 500) * 8192 + (i % 3) * 512;
      await v.write(off, data);
      // Both the promise-free path and the Volume read see it.
      expect(v.readLocal(off, buf)).toBe(true);
      expect(buf.equals(data)).toBe(true);
      buf.fill(0);
      await v.read(off, buf);
      expect(buf.equals(data)).toBe(true);
    }
    expect(v.shortCircuitStatus().reads).toBe(100);
    // A clean stop ends the lease and leaves no socket behind.
    expect(existsSync(`${sock}.sc`)).toBe(true);
    await n.stop();
    expect(existsSync(`${sock}.sc`)).toBe(false);
    await until('dropped', () => !v.shortCircuitStatus().active);
  });

  it('grow and delete end the lease before the file changes; a new descriptor carries a new generation', async () => {
    const { node: n, sock } = await node();
    await n.createVolume('v', 4 * MiB);
    const v = await remote(sock, 'v');
    await until('descriptor', () => v.shortCircuitStatus().active);
    const gen1 = n.shortCircuitServers[0]!.generation('v');
    await v.write(0, Buffer.alloc(4096, 9));
    await n.growVolume('v', 8 * MiB);
    // The grow unexported first: the lease is gone (and the NBD clients with it).
    expect(n.shortCircuitServers[0]!.leases('v')).toBe(0);
    await until('dropped', () => !v.shortCircuitStatus().active);
    const b = Buffer.alloc(4096);
    expect(v.readLocal(0, b)).toBe(false);
    // A volume of the new size (as the daemon reopens it) gets a descriptor of another generation.
    const v2 = await remote(sock, 'v', { id: 'n1b' });
    await until('descriptor again', () => v2.shortCircuitStatus().active);
    expect(n.shortCircuitServers[0]!.generation('v')).not.toBe(gen1);
    expect(v2.readLocal(8 * MiB - 4096, b)).toBe(true);
    expect(v2.readLocal(0, b)).toBe(true);
    expect(b.every((x) => x === 9)).toBe(true);
    await n.deleteVolume('v', { force: true });
    await until('dropped after delete', () => !v2.shortCircuitStatus().active);
    expect(v2.readLocal(0, b)).toBe(false);
    await expect(v2.read(0, b)).rejects.toMatchObject({ code: expect.stringMatching(/ESHUTDOWN|EIO|ENOENT/) });
  });

  it('is not used with shortCircuit: false, nor when the node does not offer it', async () => {
    const a = await node('n1');
    await a.node.createVolume('v', MiB);
    const off = await remote(a.sock, 'v', { shortCircuit: false });
    const b = await node('n2', { shortCircuit: false });
    await b.node.createVolume('v', MiB);
    const none = await remote(b.sock, 'v', { id: 'n2' });
    await new Promise((r) => setTimeout(r, 200));
    for (const v of [off, none]) {
      await v.write(0, Buffer.alloc(512, 3));
      const buf = Buffer.alloc(512);
      expect(v.readLocal(0, buf)).toBe(false);
      await v.read(0, buf);
      expect(buf.every((x) => x === 3)).toBe(true);
      expect(v.shortCircuitStatus()).toMatchObject({ active: false, reads: 0, grants: 0 });
    }
    expect(a.node.shortCircuitServers[0]!.leases()).toBe(0);
  });

  it('the replicated layer uses only in-sync replicas: a demoted replica drops its descriptor, a resynced one gets it back', async () => {
    const { a, ra, rb, rep } = await replicatedPair(100);
    await until('descriptors', () => ra.shortCircuitStatus().active && rb.shortCircuitStatus().active);
    await rep.write(0, Buffer.alloc(65536, 1));
    const buf = Buffer.alloc(65536);
    await rep.read(0, buf);
    expect(buf.every((x) => x === 1)).toBe(true);
    expect(ra.shortCircuitStatus().reads + rb.shortCircuitStatus().reads).toBe(1);
    // n1 stops: it is demoted, its descriptor goes (the lease ended with the node, and the replicated layer says so).
    await a.node.stop();
    await until('n1 out of sync', () => rep.status().find((r) => r.id === 'n1')!.state === 'out-of-sync' || !ra.up);
    await rep.write(0, Buffer.alloc(65536, 2)); // n1 misses this one
    await until('n1 demoted', () => rep.status().find((r) => r.id === 'n1')!.state === 'out-of-sync');
    expect(ra.shortCircuitStatus().active).toBe(false);
    const n1Reads = ra.shortCircuitStatus().reads;
    for (let i = 0; i < 20; i++) {
      await rep.read(0, buf);
      expect(buf.every((x) => x === 2)).toBe(true);
    }
    expect(ra.shortCircuitStatus().reads).toBe(n1Reads);
    // Back on the same data: resynced, then in sync with a descriptor again, showing the write it missed.
    const again = await StorageNode.start({ id: 'n1', data: path.join(path.dirname(a.sock), 'data'), nbd: [`unix:${a.sock}`], control: [], logger: silentLogger() });
    cleanup.push(() => again.stop());
    await until('n1 in sync with a descriptor', () => rep.status().find((r) => r.id === 'n1')!.state === 'in-sync' && ra.shortCircuitStatus().active, 10_000);
    expect(ra.readLocal(0, buf)).toBe(true);
    expect(buf.every((x) => x === 2)).toBe(true);
    // Demoted while it stays up (the switch alone): dropped at once.
    ra.setShortCircuit(false);
    expect(ra.shortCircuitStatus().active).toBe(false);
    expect(ra.readLocal(0, buf)).toBe(false);
  });
});

describe('ShortCircuitServer refusals', () => {
  async function server(lookup: ShortCircuitServerOptions['lookup'], n = native()): Promise<{ sock: string; srv: ShortCircuitServer }> {
    const sock = path.join(tempDir('vst-sc-srv-'), 'x.sc');
    const srv = await ShortCircuitServer.listen({ path: sock, lookup, logger: silentLogger(), native: n });
    cleanup.push(() => srv.close());
    return { sock, srv };
  }

  it('survives hostile requests (garbage, oversized, half lines, early hang-ups) and still serves a good one', async () => {
    const file = path.join(tempDir('vst-sc-fuzz-'), 'v.img');
    writeFileSync(file, Buffer.alloc(8192, 7));
    const { sock, srv } = await server(async (name: string) => {
      if (name !== 'v') throw Object.assign(new Error('no volume'), { code: 'ENOENT' });
      return { file, size: 8192 };
    });
    const send = (bytes: Uint8Array, hangUp: boolean): Promise<string> =>
      new Promise((resolve) => {
        const c = net.connect(sock);
        let got = '';
        c.on('data', (b) => (got += b.toString('latin1')));
        c.on('error', () => resolve(got));
        c.on('close', () => resolve(got));
        c.on('connect', () => {
          c.write(bytes);
          if (hangUp) c.end();
          else setTimeout(() => c.destroy(), 30);
        });
      });
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          fc.uint8Array({ maxLength: 6000 }),
          fc.jsonValue().map((v) => new TextEncoder().encode(JSON.stringify(v) + '\n')),
          fc.record({ v: fc.oneof(fc.constant(1), fc.integer()), volume: fc.oneof(fc.string(), fc.integer()) }).map((v) => new TextEncoder().encode(JSON.stringify(v) + '\n')),
        ),
        fc.boolean(),
        async (bytes, hangUp) => {
          const reply = await send(bytes, hangUp);
          // Whatever it was, the answer is at most one JSON line, never a grant for garbage.
          if (reply !== '') expect(() => JSON.parse(reply.split('\n')[0]!)).not.toThrow();
        },
      ),
      { numRuns: 60 },
    );
    const r = await ShortCircuitReader.open({ socket: sock, volume: 'v' });
    const b = Buffer.alloc(100);
    expect(r.readSync(0, b) || (await r.read(0, b).then(() => true))).toBe(true);
    expect(b.every((x) => x === 7)).toBe(true);
    await until('only the good lease', () => srv.leases() === 1);
    r.invalidate('done');
    await until('lease released', () => srv.leases() === 0);
  });

  it('refuses a peer of another uid (SO_PEERCRED), unknown volumes, and O_DIRECT volumes', async () => {
    const file = path.join(tempDir('vst-sc-file-'), 'v.img');
    writeFileSync(file, Buffer.alloc(65536, 5));
    // Another uid, as the kernel reports it.
    const n = native();
    const liar = Object.assign(Object.create(n) as typeof n, { peerCred: () => [1, 4242, 4242] as [number, number, number] });
    const a = await server(async () => ({ file, size: 65536 }), liar);
    await expect(ShortCircuitReader.open({ socket: a.sock, volume: 'v', timeoutMs: 1000 })).rejects.toMatchObject({ code: 'EACCES' });
    expect(a.srv.refused).toBe(1);
    expect(a.srv.granted).toBe(0);

    const b = await server(async (name: string) => {
      if (name !== 'v') throw Object.assign(new Error('no volume'), { code: 'ENOENT' });
      return { file, size: 65536 };
    });
    await expect(ShortCircuitReader.open({ socket: b.sock, volume: 'nope' })).rejects.toMatchObject({ code: 'ENOENT' });
    const r = await ShortCircuitReader.open({ socket: b.sock, volume: 'v' });
    const buf = Buffer.alloc(4096);
    await r.read(100, buf);
    expect(buf.every((x) => x === 5)).toBe(true);
    // The descriptor is read-only.
    const fdinfo = r as unknown as { fd: number };
    expect(() => writeSync(fdinfo.fd, Buffer.alloc(1), 0, 1, 0)).toThrow();
    // invalidate() by the node: the reader sees it.
    b.srv.invalidate('v', 'test');
    await until('invalid', () => !r.usable);
    expect(r.readSync(0, buf)).toBe(false);
    await expect(r.read(0, buf)).rejects.toMatchObject({ code: 'ESHUTDOWN' });

    let direct = -1;
    try {
      direct = openSync(file, FS.O_RDWR | FS.O_DIRECT);
    } catch {
      return; // a filesystem without O_DIRECT (tmpfs): nothing more to check
    }
    try {
      expect(fdIsDirect(direct)).toBe(true);
      const c = await server(async () => ({ file, size: 65536, nodeFd: direct }));
      await expect(ShortCircuitReader.open({ socket: c.sock, volume: 'v' })).rejects.toMatchObject({ code: 'ENOTSUP' });
    } finally {
      closeSync(direct);
    }
  });
});
