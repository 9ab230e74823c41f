/**
 * The server's receive path in transmission (lib/nbd/connection.ts): reads into one buffer per
 * connection (net's user buffer), write payloads copied as they arrive into a buffer of their
 * own, bytes still queued copied out before the next read. A raw client sends request streams
 * cut at arbitrary points (fast-check), with payloads larger than the read buffer, and the
 * volume must end as a byte model says; backpressure (requests held while paused) too.
 */
import fc from 'fast-check';
import { afterEach, describe, expect, it } from 'vitest';
import * as C from '../../../lib/nbd/constants.js';
import * as codec from '../../../lib/nbd/codec.js';
import { READ_BUFFER } from '../../../lib/nbd/connection.js';
import { MiB, startHarness, type Harness } from './setup.js';

let h: Harness | null = null;
afterEach(async () => {
  await h?.cleanup();
  h = null;
});

function connectionsOf(x: Harness): Array<{ readsIntoUserBuffer: boolean }> {
  const exps = (x.server as unknown as { exports: Map<string, { connections: Set<{ readsIntoUserBuffer: boolean }> }> }).exports;
  return [...exps.get('')!.connections];
}

async function contents(x: Harness): Promise<Buffer> {
  const b = Buffer.alloc(x.vol.size);
  await x.vol.read(0, b);
  return b;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe('NBD server receive path', () => {
  it('reads into a user buffer; writes cut anywhere, small and larger than the buffer, land as sent', async () => {
    h = await startHarness({ size: 4 * MiB });
    const c = await h.open();
    expect(connectionsOf(h).map((x) => x.readsIntoUserBuffer)).toEqual([true]);
    const model = Buffer.alloc(4 * MiB);
    let seed = 1;
    await fc.assert(
      fc.asyncProperty(
        fc.array(
          fc.record({
            offset: fc.integer({ min: 0, max: 4 * MiB - 1 }),
            length: fc.oneof(fc.integer({ min: 1, max: 4096 }), fc.integer({ min: 1, max: READ_BUFFER * 3 })),
          }),
          { minLength: 1, maxLength: 8 },
        ),
        fc.array(fc.integer({ min: 1, max: 200_000 }), { minLength: 1, maxLength: 12 }),
        async (writes, cuts) => {
          const frames: Buffer[] = [];
          for (const w of writes) {
            const len = Math.min(w.length, 4 * MiB - w.offset);
            const payload = Buffer.alloc(len, (seed++ % 254) + 1);
            frames.push(codec.encodeRequest({ type: C.NBD_CMD_WRITE, flags: 0, handle: BigInt(seed), offset: w.offset, length: len }, payload));
            payload.copy(model, w.offset);
          }
          const stream = Buffer.concat(frames);
          // The stream in pieces, each its own socket write with a pause between: separate reads.
          let at = 0;
          for (let i = 0; at < stream.length; i++) {
            const n = Math.min(cuts[i % cuts.length]!, stream.length - at);
            c.write(stream.subarray(at, at + n));
            at += n;
            if (i % 3 === 0) await sleep(1);
          }
          for (let i = 0; i < writes.length; i++) expect((await c.reply()).error).toBe(0);
          expect((await contents(h!)).equals(model)).toBe(true);
        },
      ),
      { numRuns: 12 },
    );
    // Read back over the same connection (replies are unaffected).
    const r = await c.readAt(MiB, 65536);
    expect(r.data!.equals(model.subarray(MiB, MiB + 65536))).toBe(true);
    await c.disconnect();
  });

  it('requests held back while paused (max in flight) are kept and served in order when it resumes', async () => {
    let open: () => void = () => {};
    let gate = new Promise<void>((r) => (open = r));
    h = await startHarness({ size: 4 * MiB, server: { maxInflightPerConnection: 2 }, hook: (op) => (op === 'write' ? gate : undefined) });
    const c = await h.open();
    const frames: Buffer[] = [];
    for (let i = 0; i < 40; i++) {
      frames.push(codec.encodeRequest({ type: C.NBD_CMD_WRITE, flags: 0, handle: BigInt(i + 1), offset: (i % 10) * 4096, length: 4096 }, Buffer.alloc(4096, i + 1)));
    }
    c.write(Buffer.concat(frames)); // 40 requests in one go; only 2 may be in flight
    await sleep(50);
    open();
    gate = Promise.resolve();
    for (let i = 0; i < 40; i++) expect((await c.reply()).error).toBe(0);
    // Same offsets were written four times, in order: the last round is what stays.
    const snap = await contents(h);
    for (let k = 0; k < 10; k++) expect(snap.subarray(k * 4096, (k + 1) * 4096).every((x) => x === 30 + k + 1)).toBe(true);
    await c.disconnect();
  });
});
