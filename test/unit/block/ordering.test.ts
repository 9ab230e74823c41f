/** OrderedVolume: conflicting requests keep issue order, the rest run concurrently. */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { VolumeError } from '../../../lib/block/errors.js';
import { MemoryVolume, type MemoryOp } from '../../../lib/block/memory.js';
import { OrderedVolume } from '../../../lib/block/ordering.js';

/** A memory volume whose operations each wait for an explicit release, recording start order. */
function controlled(size = 1 << 20) {
  const started: string[] = [];
  const releases = new Map<string, () => void>();
  let seq = 0;
  const vol = new MemoryVolume({
    size,
    hook: (op: MemoryOp, offset: number, length: number) => {
      const id = `${op}@${offset}+${length}#${seq++}`;
      started.push(id);
      return new Promise<void>((r) => releases.set(id, r));
    },
  });
  const release = (prefix: string): void => {
    const k = [...releases.keys()].find((x) => x.startsWith(prefix));
    if (!k) throw new Error(`nothing started matching ${prefix}; started: ${started.join(', ')}`);
    releases.get(k)!();
    releases.delete(k);
  };
  return { vol, started, release };
}

const tick = () => new Promise((r) => setTimeout(r, 5));
const names = (s: string[]) => s.map((x) => x.replace(/#\d+$/, ''));

describe('OrderedVolume', () => {
  it('runs non-overlapping requests concurrently', async () => {
    const { vol, started, release } = controlled();
    const o = new OrderedVolume(vol);
    const a = o.write(0, Buffer.alloc(4096, 1));
    const b = o.write(4096, Buffer.alloc(4096, 2));
    const c = o.read(8192, Buffer.alloc(4096));
    await tick();
    expect(names(started)).toEqual(['write@0+4096', 'write@4096+4096', 'read@8192+4096']);
    release('write@0');
    release('write@4096');
    release('read@8192');
    await Promise.all([a, b, c]);
    expect(o.pending).toBe(0);
  });

  it('a read waits for an earlier overlapping write; reads do not wait for reads', async () => {
    const { vol, started, release } = controlled();
    const o = new OrderedVolume(vol);
    const w = o.write(0, Buffer.alloc(4096, 7));
    const buf = Buffer.alloc(100);
    const r = o.read(4000, buf);
    const r2 = o.read(8192, Buffer.alloc(10));
    await tick();
    expect(names(started)).toEqual(['write@0+4096', 'read@8192+10']);
    release('write@0');
    await w;
    await tick();
    expect(names(started)).toContain('read@4000+100');
    release('read@4000');
    release('read@8192');
    await Promise.all([r, r2]);
    expect(buf.subarray(0, 96)).toEqual(Buffer.alloc(96, 7));
  });

  it('a write waits for an earlier overlapping read, and for earlier overlapping trims/zeroes', async () => {
    const { vol, started, release } = controlled();
    const o = new OrderedVolume(vol);
    const r = o.read(0, Buffer.alloc(512));
    const w = o.write(256, Buffer.alloc(512, 1));
    const z = o.writeZeroes(600, 100);
    const t = o.trim(0, 100);
    await tick();
    expect(names(started)).toEqual(['read@0+512']);
    release('read@0');
    await r;
    await tick();
    // trim@0+100 overlapped only the read; the zeroes overlap the write, which still runs.
    expect(names(started).sort()).toEqual(['read@0+512', 'trim@0+100', 'write@256+512']);
    release('write@256');
    await w;
    await tick();
    expect(names(started)).toContain('writeZeroes@600+100');
    release('trim@0');
    release('writeZeroes@600');
    await Promise.all([z, t]);
  });

  it('flush waits for every earlier write-like request, but not for reads or later writes', async () => {
    const { vol, started, release } = controlled();
    const o = new OrderedVolume(vol);
    const w1 = o.write(0, Buffer.alloc(10));
    const w2 = o.trim(100000, 10);
    const rd = o.read(50000, Buffer.alloc(10));
    const f = o.flush();
    const w3 = o.write(200000, Buffer.alloc(10));
    await tick();
    expect(names(started)).toEqual(['write@0+10', 'trim@100000+10', 'read@50000+10', 'write@200000+10']);
    release('write@0');
    await w1;
    await tick();
    expect(started.some((s) => s.startsWith('flush'))).toBe(false);
    release('trim@100000');
    await w2;
    await tick();
    expect(started.some((s) => s.startsWith('flush'))).toBe(true);
    release('flush');
    release('read@50000');
    release('write@200000');
    await Promise.all([f, rd, w3]);
  });

  it('a failed operation releases its range (later ones run and see the error only on their own)', async () => {
    let failNext = true;
    const vol = new MemoryVolume({
      size: 1 << 20,
      hook: async (op) => {
        if (op === 'write' && failNext) {
          failNext = false;
          await new Promise((r) => setTimeout(r, 10));
          throw new VolumeError('EIO', 'boom');
        }
      },
    });
    const o = new OrderedVolume(vol);
    const a = o.write(0, Buffer.alloc(10, 1));
    const b = o.write(0, Buffer.alloc(10, 2));
    await expect(a).rejects.toMatchObject({ code: 'EIO' });
    await b;
    const buf = Buffer.alloc(10);
    await o.read(0, buf);
    expect(buf).toEqual(Buffer.alloc(10, 2));
    expect(o.pending).toBe(0);
  });

  it('a synchronous throw below becomes a rejected VolumeError and releases the range', async () => {
    const vol = new MemoryVolume({ size: 4096 });
    const o = new OrderedVolume(vol);
    await expect(o.run('write', 0, 10, () => { throw new Error('bug'); })).rejects.toMatchObject({ code: 'EIO' });
    expect(o.pending).toBe(0);
    await o.write(0, Buffer.alloc(10));
  });

  it('property: with random delays, the result equals applying the operations in issue order', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(
          fc.record({
            kind: fc.constantFrom('write', 'zero', 'trim', 'read'),
            offset: fc.integer({ min: 0, max: 60 }),
            length: fc.integer({ min: 1, max: 20 }),
            delay: fc.integer({ min: 0, max: 3 }),
            byte: fc.integer({ min: 1, max: 255 }),
          }),
          { minLength: 1, maxLength: 25 },
        ),
        async (ops) => {
          let i = 0;
          const delays = ops.map((o) => o.delay);
          const vol = new MemoryVolume({
            size: 80,
            chunkSize: 16,
            hook: () => new Promise((r) => setTimeout(r, delays[i++ % delays.length])),
          });
          const o = new OrderedVolume(vol);
          const model = Buffer.alloc(80);
          const expectedReads: Buffer[] = [];
          const reads: Array<Promise<Buffer>> = [];
          const all: Array<Promise<unknown>> = [];
          for (const op of ops) {
            const len = Math.min(op.length, 80 - op.offset);
            if (op.kind === 'write') {
              all.push(o.write(op.offset, Buffer.alloc(len, op.byte)));
              model.fill(op.byte, op.offset, op.offset + len);
            } else if (op.kind === 'zero' || op.kind === 'trim') {
              all.push(op.kind === 'zero' ? o.writeZeroes(op.offset, len) : o.trim(op.offset, len));
              model.fill(0, op.offset, op.offset + len);
            } else {
              const b = Buffer.alloc(len);
              reads.push(o.read(op.offset, b).then(() => b));
              expectedReads.push(Buffer.from(model.subarray(op.offset, op.offset + len)));
            }
          }
          await Promise.all(all);
          expect(await Promise.all(reads)).toEqual(expectedReads);
          const final = Buffer.alloc(80);
          await o.read(0, final);
          expect(final).toEqual(model);
        },
      ),
      { numRuns: 60 },
    );
  });
});
