// The addon's io_uring engine (native/src/uring.cc) and its promise layer (UringEngine) against
// a real file.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { native } from '../../../lib/native/index.js';
import { UringEngine } from '../../../lib/block/file.js';

const MiB = 1 << 20;

/** Collects the (id, result) pairs of a raw ring. */
function rawRing(entries = 8): { ring: InstanceType<NonNullable<ReturnType<typeof native>['Uring']>>; results: Map<number, number>; wait(n: number): Promise<void> } {
  const results = new Map<number, number>();
  let waiter: (() => void) | undefined;
  const ring = new (native().Uring!)(entries, (pairs, count) => {
    for (let i = 0; i < count; i++) results.set(pairs[2 * i]!, pairs[2 * i + 1]!);
    waiter?.();
  });
  const wait = async (n: number): Promise<void> => {
    while (results.size < n) await new Promise<void>((r) => (waiter = r));
  };
  return { ring, results, wait };
}

describe('native io_uring engine', () => {
  let dir: string;
  let fd: number;

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vstore-uring-'));
    fd = fs.openSync(path.join(dir, 'img'), 'w+');
    fs.ftruncateSync(fd, 4 * MiB);
  });
  afterEach(() => {
    fs.closeSync(fd);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('reads, writes and fdatasyncs, completions as (id, result) pairs', async () => {
    const { ring, results, wait } = rawRing();
    const data = Buffer.alloc(8192, 0x5a);
    ring.write(fd, data, 4096, 1);
    ring.fsync(fd, true, 2);
    expect(ring.inFlight).toBe(2);
    await wait(2);
    expect(results.get(1)).toBe(8192);
    expect(results.get(2)).toBe(0);
    const back = Buffer.alloc(8192);
    ring.read(fd, back, 4096, 3);
    await wait(3);
    expect(results.get(3)).toBe(8192);
    expect(back.equals(data)).toBe(true);
    // short read at the end of the file, 0 past it
    const tail = Buffer.alloc(8192);
    ring.read(fd, tail, 4 * MiB - 100, 4);
    ring.read(fd, tail, 5 * MiB, 5);
    await wait(5);
    expect(results.get(4)).toBe(100);
    expect(results.get(5)).toBe(0);
    expect(ring.inFlight).toBe(0);
    ring.close();
    expect(fs.readFileSync(path.join(dir, 'img')).subarray(4096, 4096 + 8192).equals(data)).toBe(true);
  });

  it('reports errors as negative errno, and Node-style errors through UringEngine', async () => {
    const { ring, results, wait } = rawRing();
    ring.read(987654, Buffer.alloc(16), 0, 7);
    await wait(1);
    expect(results.get(7)).toBe(-9); // EBADF
    ring.close();
    expect(() => ring.read(fd, Buffer.alloc(1), 0, 1)).toThrow(/EBADF/);
    const e = UringEngine.create(native())!;
    await expect(e.read(987654, Buffer.alloc(16), 0)).rejects.toMatchObject({ code: 'EBADF', errno: -9, syscall: 'read' });
    const ro = fs.openSync(path.join(dir, 'img'), 'r');
    await expect(e.write(ro, Buffer.alloc(16), 0)).rejects.toMatchObject({ code: 'EBADF', syscall: 'write' });
    fs.closeSync(ro);
    await e.close();
    await expect(e.fsync(fd)).rejects.toMatchObject({ code: 'EBADF', syscall: 'fdatasync' });
    expect(() => new (native().Uring!)(0, () => {})).toThrow(TypeError);
  });

  it('keeps many requests in flight, more than the submission queue holds', async () => {
    const e = UringEngine.create(native(), 8)!;
    const N = 1000;
    const size = 4096;
    await Promise.all(
      Array.from({ length: N }, (_, i) => e.write(fd, Buffer.alloc(size, i & 0xff), (i * size) % (4 * MiB))),
    );
    await e.fsync(fd);
    // the last write of each slot wins (N > slots: 1024 slots of 4 KiB in 4 MiB, N < 1024)
    const bufs = Array.from({ length: N }, () => Buffer.alloc(size));
    const got = await Promise.all(bufs.map((b, i) => e.read(fd, b, i * size)));
    expect(got.every((n) => n === size)).toBe(true);
    bufs.forEach((b, i) => expect(b.every((x) => x === (i & 0xff))).toBe(true));
    expect(e.inFlight).toBe(0);
    await e.close();
  });

  it('close waits for what is in flight, then refuses new requests', async () => {
    const e = UringEngine.create(native(), 4)!;
    const ops = Array.from({ length: 64 }, (_, i) => e.write(fd, Buffer.alloc(64 * 1024, i), i * 64 * 1024).catch((err: unknown) => err));
    ops.push(e.fsync(fd).then(() => 0).catch((err: unknown) => err));
    expect(e.inFlight).toBe(65);
    await e.close();
    expect(e.inFlight).toBe(0);
    // every request settled: done, or cancelled by close
    for (const r of await Promise.all(ops)) {
      if (typeof r !== 'number') expect(r).toMatchObject({ code: 'ECANCELED' });
    }
    await e.close(); // idempotent
    await expect(e.read(fd, Buffer.alloc(1), 0)).rejects.toMatchObject({ code: 'EBADF' });
  });

  it('raw close with requests in flight blocks until they are done', async () => {
    const { ring, results } = rawRing(4);
    const bufs = Array.from({ length: 16 }, () => Buffer.alloc(256 * 1024));
    bufs.forEach((b, i) => ring.read(fd, b, i * 256 * 1024, i));
    ring.close();
    expect(ring.inFlight).toBe(0);
    expect(results.size).toBe(0); // not delivered after close
  });
});
