/**
 * The virtio-fs device between a ring element and the FUSE engine: a request spread over several
 * readable buffers is gathered, the reply is scattered over several writable ones, and chains
 * that cannot carry a FUSE request or reply get no reply or an error — never a crash.
 */
import { describe, expect, it } from 'vitest';
import { MemoryFileTree } from '../../../lib/fs/memory.js';
import { FuseEngine } from '../../../lib/fuse/engine.js';
import { createLogger } from '../../../lib/log.js';
import { VirtioFsDevice, type FuseRequestHandler } from '../../../lib/vhost/fs.js';
import type { Element } from '../../../lib/vhost/virtqueue.js';
import { F } from '../fuse/frames.js';

const logger = createLogger({ level: 'silent' });

function element(readable: Buffer[], writable: Buffer[]): Element {
  return {
    head: 0,
    readable,
    writable,
    readableLen: readable.reduce((s, b) => s + b.length, 0),
    writableLen: writable.reduce((s, b) => s + b.length, 0),
    writableMapped: true,
  };
}

/** Splits a buffer into pieces of the given sizes (the rest in the last one). */
function split(b: Buffer, ...sizes: number[]): Buffer[] {
  const out: Buffer[] = [];
  let off = 0;
  for (const n of sizes) {
    out.push(b.subarray(off, off + n));
    off += n;
  }
  out.push(b.subarray(off));
  return out;
}

describe('virtio-fs device', () => {
  it('serves INIT and LOOKUP through a real engine with split requests and split reply buffers', async () => {
    const tree = new MemoryFileTree();
    const engine = new FuseEngine({ tree, logger, session: 't' });
    const dev = new VirtioFsDevice({ handler: { handle: (m) => engine.handle(m), reset: () => void engine.end() }, logger, requestQueues: 2 });
    expect(dev.numQueues).toBe(3);

    const init = F.init({ unique: 1n });
    const out1 = [Buffer.alloc(16), Buffer.alloc(7), Buffer.alloc(200)];
    const n1 = await dev.handle(1, element(split(init, 40, 3), out1));
    const reply1 = Buffer.concat(out1).subarray(0, n1);
    expect(reply1.readUInt32LE(0)).toBe(n1);
    expect(reply1.readInt32LE(4)).toBe(0);
    expect(reply1.readBigUInt64LE(8)).toBe(1n);
    expect(reply1.readUInt32LE(16)).toBe(7); // major

    const ctx = { uid: 0, gid: 0, pid: 1, session: 'setup' };
    await tree.mkdir(ctx, 1, Buffer.from('dir'), 0o755);
    const lookup = F.lookup({ unique: 2n, nodeId: 1 }, 'dir');
    const out2 = [Buffer.alloc(10), Buffer.alloc(300)];
    const n2 = await dev.handle(1, element(split(lookup, 41), out2));
    const reply2 = Buffer.concat(out2).subarray(0, n2);
    expect(reply2.readInt32LE(4)).toBe(0);
    expect(reply2.readBigUInt64LE(8)).toBe(2n);
    expect(reply2.readBigUInt64LE(16)).toBeGreaterThan(1n); // a node id other than the root

    const missing = F.lookup({ unique: 3n, nodeId: 1 }, 'nope');
    const out3 = [Buffer.alloc(300)];
    const n3 = await dev.handle(1, element([missing], out3));
    expect(n3).toBe(16);
    expect(out3[0]!.readInt32LE(4)).toBe(-2); // ENOENT
  });

  it('answers nothing for requests without a reply (FORGET on the hiprio queue)', async () => {
    const engine = new FuseEngine({ tree: new MemoryFileTree(), logger, session: 't' });
    const dev = new VirtioFsDevice({ handler: { handle: (m) => engine.handle(m), reset: () => {} }, logger });
    await dev.handle(1, element([F.init({ unique: 1n })], [Buffer.alloc(200)]));
    expect(await dev.handle(0, element([F.forget({ unique: 9n, nodeId: 5 }, 1)], []))).toBe(0);
  });

  it('drops chains that cannot hold a request, and turns a reply too large for its buffers into ERANGE', async () => {
    const calls: Buffer[] = [];
    const big: FuseRequestHandler = {
      handle: async (m) => {
        calls.push(m);
        const hdr = Buffer.alloc(16);
        hdr.writeUInt32LE(16 + 4096, 0);
        m.copy(hdr, 8, 8, 16);
        return [hdr, Buffer.alloc(4096)];
      },
      reset: () => {},
    };
    const dev = new VirtioFsDevice({ handler: big, logger });
    // shorter than fuse_in_header
    expect(await dev.handle(1, element([Buffer.alloc(39)], [Buffer.alloc(100)]))).toBe(0);
    // a chain the ring walker marked unusable
    expect(await dev.handle(1, { ...element([F.init({ unique: 1n })], [Buffer.alloc(100)]), error: 'bad descriptor' })).toBe(0);
    expect(calls).toHaveLength(0);
    expect(dev.stats.dropped).toBe(2);
    // a reply larger than the writable space: ERANGE with the request's unique
    const out = [Buffer.alloc(8), Buffer.alloc(100)];
    const n = await dev.handle(1, element([F.lookup({ unique: 77n, nodeId: 1 }, 'x')], out));
    expect(n).toBe(16);
    const r = Buffer.concat(out);
    expect(r.readInt32LE(4)).toBe(-34);
    expect(r.readBigUInt64LE(8)).toBe(77n);
    expect(dev.stats.oversized).toBe(1);
    // no room even for a header: nothing
    expect(await dev.handle(1, element([F.lookup({ unique: 78n, nodeId: 1 }, 'x')], [Buffer.alloc(8)]))).toBe(0);
  });

  it('a device reset ends the session', () => {
    let resets = 0;
    const dev = new VirtioFsDevice({ handler: { handle: async () => null, reset: () => resets++ }, logger });
    dev.reset();
    expect(resets).toBe(1);
    expect(() => dev.setConfig()).toThrow();
    expect(dev.getConfig(0, 8)).toEqual(Buffer.alloc(8));
  });
});
