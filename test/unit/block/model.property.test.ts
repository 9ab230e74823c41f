/**
 * Property test: FileVolume and MemoryVolume behave like a plain Buffer under random sequences
 * of writes, reads, trims, zeroes and flushes; blockStatus never calls non-zero bytes a hole and
 * always tiles a prefix of the asked range.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { FileVolume } from '../../../lib/block/file.js';
import { MemoryVolume } from '../../../lib/block/memory.js';
import type { Volume } from '../../../lib/block/volume.js';

const SIZE = 256 * 1024;

type Op =
  | { kind: 'write'; offset: number; length: number; byte: number; fua: boolean }
  | { kind: 'read'; offset: number; length: number }
  | { kind: 'trim'; offset: number; length: number }
  | { kind: 'zero'; offset: number; length: number; mayTrim: boolean }
  | { kind: 'flush' }
  | { kind: 'status'; offset: number; length: number };

// Ranges biased towards 4 KiB alignment (where filesystems punch and allocate) but not only.
const range = fc
  .tuple(fc.nat({ max: SIZE - 1 }), fc.integer({ min: 1, max: 64 * 1024 }), fc.boolean())
  .map(([o, l, aligned]) => {
    const offset = aligned ? o - (o % 4096) : o;
    const length = Math.min(aligned ? Math.max(4096, l - (l % 4096)) : l, SIZE - offset);
    return { offset, length };
  });

const op: fc.Arbitrary<Op> = fc.oneof(
  fc.record({ r: range, byte: fc.integer({ min: 1, max: 255 }), fua: fc.boolean() }).map(({ r, byte, fua }) => ({ kind: 'write' as const, ...r, byte, fua })),
  range.map((r) => ({ kind: 'read' as const, ...r })),
  range.map((r) => ({ kind: 'trim' as const, ...r })),
  fc.record({ r: range, mayTrim: fc.boolean() }).map(({ r, mayTrim }) => ({ kind: 'zero' as const, ...r, mayTrim })),
  fc.constant({ kind: 'flush' as const }),
  range.map((r) => ({ kind: 'status' as const, ...r })),
);

async function run(vol: Volume, ops: Op[]): Promise<void> {
  const model = Buffer.alloc(SIZE);
  for (const o of ops) {
    switch (o.kind) {
      case 'write': {
        const b = Buffer.alloc(o.length, o.byte);
        await vol.write(o.offset, b, { fua: o.fua });
        b.copy(model, o.offset);
        break;
      }
      case 'read': {
        const b = Buffer.alloc(o.length, 0xfe);
        await vol.read(o.offset, b);
        expect(b.equals(model.subarray(o.offset, o.offset + o.length))).toBe(true);
        break;
      }
      case 'trim':
        await vol.trim(o.offset, o.length);
        model.fill(0, o.offset, o.offset + o.length); // both volumes read trimmed ranges as zeroes
        break;
      case 'zero':
        await vol.writeZeroes(o.offset, o.length, { mayTrim: o.mayTrim });
        model.fill(0, o.offset, o.offset + o.length);
        break;
      case 'flush':
        await vol.flush();
        break;
      case 'status': {
        const ext = await vol.blockStatus(o.offset, o.length);
        expect(ext.length).toBeGreaterThan(0);
        let pos = o.offset;
        for (const e of ext) {
          expect(e.offset).toBe(pos);
          expect(e.length).toBeGreaterThan(0);
          if (e.zero) expect(model.subarray(e.offset, e.offset + e.length).every((x) => x === 0)).toBe(true);
          pos += e.length;
        }
        expect(pos).toBeLessThanOrEqual(o.offset + o.length);
        break;
      }
    }
  }
  const all = Buffer.alloc(SIZE);
  await vol.read(0, all);
  expect(all.equals(model)).toBe(true);
}

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(path.join(tmpdir(), 'vstore-prop-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('volumes against a Buffer model', () => {
  it('MemoryVolume', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(op, { maxLength: 40 }), fc.constantFrom(512, 4096, 65536), async (ops, chunkSize) => {
        const v = new MemoryVolume({ size: SIZE, chunkSize });
        await run(v, ops);
        await v.close();
      }),
      { numRuns: 200 },
    );
  });

  it('FileVolume', async () => {
    let i = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(op, { maxLength: 40 }), async (ops) => {
        const v = await FileVolume.open(path.join(dir, `p${i++}.raw`), { create: { size: SIZE } });
        try {
          await run(v, ops);
        } finally {
          await v.close();
        }
      }),
      { numRuns: 100 },
    );
  });

  it('FileVolume without the addon (emulated zeroing, no holes)', async () => {
    let i = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(op, { maxLength: 30 }), async (ops) => {
        const v = await FileVolume.open(path.join(dir, `q${i++}.raw`), { create: { size: SIZE }, native: null });
        try {
          // trim is a no-op without the addon: contents become unspecified, so model only the rest
          await run(v, ops.filter((o) => o.kind !== 'trim'));
        } finally {
          await v.close();
        }
      }),
      { numRuns: 40 },
    );
  });
});
