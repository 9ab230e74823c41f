// Reply buffers are reused once the socket wrote them: a reuse too early would send one reply's
// bytes in another's. Many large reads in flight on two connections at once must each return
// exactly their own data, in simple and structured (sparse-read) modes.
import { afterEach, describe, expect, it } from 'vitest';
import { BufferPool } from '../../../lib/nbd/bufpool.js';
import * as C from '../../../lib/nbd/constants.js';
import { MiB, startHarness, type Harness } from './setup.js';

describe('BufferPool', () => {
  it('reuses large buffers of the same size, within its byte bound', () => {
    const p = new BufferPool(3 * 100_000, 65536);
    const a = p.get(100_000);
    p.put(a);
    expect(p.pooledBytes).toBe(100_000);
    expect(p.get(100_000)).toBe(a);
    expect(p.pooledBytes).toBe(0);
    expect(p.get(99_999)).not.toBe(a);
    const bs = [p.get(100_000), p.get(100_000), p.get(100_000), p.get(100_000)];
    for (const b of bs) p.put(b);
    expect(p.pooledBytes).toBe(300_000); // the fourth was left to the GC
    const small = p.get(4096);
    p.put(small);
    expect(p.pooledBytes).toBe(300_000); // small buffers are not pooled
  });
});

describe('pooled read replies', () => {
  let h: Harness;
  afterEach(async () => h?.cleanup());

  for (const structured of [false, true]) {
    it(`never mixes up data between concurrent large reads (structured=${structured})`, async () => {
      h = await startHarness({ size: 32 * MiB, server: { sparseReadThreshold: 0 } });
      const BLOCK = 256 * 1024;
      const blocks = 32 * MiB / BLOCK;
      // Every block carries its own index in every byte (and block 5 stays a hole).
      for (let i = 0; i < blocks; i++) if (i !== 5) await h.vol.write(i * BLOCK, Buffer.alloc(BLOCK, i + 1));
      const clients = [await h.open({ structured, meta: false }), await h.open({ structured, meta: false })];
      await Promise.all(
        clients.map(async (c, ci) => {
          for (let round = 0; round < 4; round++) {
            const want = new Map<bigint, number>();
            for (let k = 0; k < 24; k++) {
              const i = (k * 7 + round * 3 + ci * 11) % blocks;
              want.set(c.send(C.NBD_CMD_READ, i * BLOCK, BLOCK), i);
            }
            for (let k = 0; k < 24; k++) {
              const r = await c.reply();
              const i = want.get(r.handle)!;
              expect(r.error).toBe(0);
              const fill = i === 5 ? 0 : i + 1;
              expect(r.data!.length).toBe(BLOCK);
              expect(r.data!.every((x) => x === fill)).toBe(true);
            }
          }
        }),
      );
    });
  }
});
