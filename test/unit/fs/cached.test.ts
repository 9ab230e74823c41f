// CachedFileTree: TTLs of attributes and entries (negative too) on a test clock, invalidation by
// this host's own mutations, lookup counting against the tree below, the RAM data cache (bounded,
// LRU, model-checked with fast-check against the file on disk), and close-to-open consistency
// between two hosts (two RemoteFileTree + cache stacks on one in-process node).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import fc from 'fast-check';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CachedFileTree, MemoryDataCache } from '../../../lib/fs/cached.js';
import { LocalFileTree } from '../../../lib/fs/local.js';
import { ROOT_ID, type FileTree } from '../../../lib/fs/tree.js';
import { O_APPEND, O_RDONLY, O_RDWR, O_TRUNC, O_WRONLY, S_IFREG, b, ctx, errno, readFile, walk, writeFile } from './helpers.js';
import { remoteTree, startDirServer } from './remote-helpers.js';

const c = ctx('s1');

/** A tree that counts the calls that reach it. */
function counting(t: FileTree): { tree: FileTree; calls: Record<string, number> } {
  const calls: Record<string, number> = {};
  const tree = new Proxy(t, {
    get(target, prop) {
      const v = Reflect.get(target, prop, target) as unknown;
      if (typeof v !== 'function') return v;
      return (...args: unknown[]) => {
        calls[String(prop)] = (calls[String(prop)] ?? 0) + 1;
        return (v as (...a: unknown[]) => unknown).apply(target, args);
      };
    },
  });
  return { tree, calls };
}

let dir: string;
let local: LocalFileTree;
let now = 1_000_000;
const clock = (): number => now;

beforeEach(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vstore-cached-'));
  local = await LocalFileTree.open(dir);
  now = 1_000_000;
});
afterEach(async () => {
  await local.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('CachedFileTree: names and attributes', () => {
  it('serves getattr and lookup from the cache within the TTL, from below after it', async () => {
    const { tree, calls } = counting(local);
    const t = new CachedFileTree(tree, { attrTtlMs: 1000, entryTtlMs: 2000, negativeTtlMs: 500, now: clock });
    const id = await writeFile(t, c, ROOT_ID, 'f', 'abc');
    await t.getattr(c, id); // the write dropped the attributes; this fetches them again
    const before = { ...calls };
    for (let i = 0; i < 5; i++) expect((await t.getattr(c, id)).attr.size).toBe(3);
    for (let i = 0; i < 5; i++) expect((await t.lookup(c, ROOT_ID, b('f'))).nodeId).toBe(id);
    expect(calls.getattr ?? 0).toBe(before.getattr ?? 0);
    expect(calls.lookup ?? 0).toBe(before.lookup ?? 0);
    expect(t.stats.attrHits).toBe(5);
    expect(t.stats.entryHits).toBe(5);
    // Another host changes the file on the node: seen only once the attribute TTL is over.
    fs.appendFileSync(path.join(dir, 'f'), 'defg');
    expect((await t.getattr(c, id)).attr.size).toBe(3);
    now += 1001;
    expect((await t.getattr(c, id)).attr.size).toBe(7);
    expect(calls.getattr).toBe((before.getattr ?? 0) + 1);
    // The entry's TTL is longer, but an expired attribute makes a lookup go below as well.
    now += 1001;
    await t.lookup(c, ROOT_ID, b('f'));
    expect(calls.lookup).toBe((before.lookup ?? 0) + 1);
  });

  it('caches ENOENT for the negative TTL; its own create, mkdir, rename and link end it at once', async () => {
    const { tree, calls } = counting(local);
    const t = new CachedFileTree(tree, { negativeTtlMs: 500, now: clock });
    expect(await errno(t.lookup(c, ROOT_ID, b('n')))).toBe('ENOENT');
    expect(await errno(t.lookup(c, ROOT_ID, b('n')))).toBe('ENOENT');
    expect(calls.lookup).toBe(1);
    expect(t.stats.negativeHits).toBe(1);
    // Created by another host: invisible for the negative TTL, then seen.
    fs.writeFileSync(path.join(dir, 'n'), 'x');
    expect(await errno(t.lookup(c, ROOT_ID, b('n')))).toBe('ENOENT');
    now += 501;
    expect((await t.lookup(c, ROOT_ID, b('n'))).attr.size).toBe(1);
    // This host's own mutations never leave a wrong negative entry behind.
    for (const name of ['m1', 'm2', 'm3', 'm4']) expect(await errno(t.lookup(c, ROOT_ID, b(name)))).toBe('ENOENT');
    await writeFile(t, c, ROOT_ID, 'm1', 'x');
    await t.mkdir(c, ROOT_ID, b('m2'), 0o755);
    await t.rename(c, ROOT_ID, b('n'), ROOT_ID, b('m3'), 0);
    await t.link(c, await walk(t, c, 'm1'), ROOT_ID, b('m4'));
    for (const name of ['m1', 'm2', 'm3', 'm4']) await t.lookup(c, ROOT_ID, b(name));
    // ... and removing or renaming away leaves no positive one.
    expect(await errno(t.lookup(c, ROOT_ID, b('n')))).toBe('ENOENT');
    await t.unlink(c, ROOT_ID, b('m1'));
    expect(await errno(t.lookup(c, ROOT_ID, b('m1')))).toBe('ENOENT');
    await t.rmdir(c, ROOT_ID, b('m2'));
    expect(await errno(t.lookup(c, ROOT_ID, b('m2')))).toBe('ENOENT');
    // nlink of the other name's node is not served stale after the unlink
    expect((await t.lookup(c, ROOT_ID, b('m4'))).attr.nlink).toBe(1);
  });

  it('its own setattr, write and truncate update the attributes it serves', async () => {
    const t = new CachedFileTree(local, { attrTtlMs: 60_000, now: clock });
    const id = await writeFile(t, c, ROOT_ID, 'f', 'abc');
    expect((await t.getattr(c, id)).attr.size).toBe(3);
    await t.setattr(c, id, { mode: 0o600 });
    expect((await t.getattr(c, id)).attr.mode & 0o777).toBe(0o600);
    const h = await t.open(c, id, O_RDWR);
    await t.write(c, id, h.fh, 10, b('z'));
    expect((await t.getattr(c, id)).attr.size).toBe(11);
    await t.setattr(c, id, { size: 2 }, h.fh);
    expect((await t.getattr(c, id)).attr.size).toBe(2);
    expect((await t.read(c, id, h.fh, 0, 100)).toString()).toBe('ab');
    await t.release(c, id, h.fh);
  });

  it('counts lookups it answered itself: the tree below forgets an id only when the caller has forgotten it entirely', async () => {
    const { tree, calls } = counting(local);
    const t = new CachedFileTree(tree, { entryTtlMs: 60_000, attrTtlMs: 60_000, now: clock });
    const id = await writeFile(t, c, ROOT_ID, 'f', 'abc'); // create: 1 lookup
    await t.getattr(c, id);
    await t.lookup(c, ROOT_ID, b('f')); // cached: 2
    await t.lookup(c, ROOT_ID, b('f')); // cached: 3
    expect(calls.lookup ?? 0).toBe(0);
    t.forget(id, 2);
    expect(calls.forget ?? 0).toBe(0);
    expect((await local.getattr(c, id)).attr.size).toBe(3); // still valid below
    t.forget(id, 1);
    expect(calls.forget).toBe(1);
    expect(await errno(local.getattr(c, id))).toBe('ENOENT');
    // A forgotten id is not served from a stale entry: the next lookup goes below.
    const again = await t.lookup(c, ROOT_ID, b('f'));
    expect(calls.lookup).toBe(1);
    expect((await local.getattr(c, again.nodeId)).attr.size).toBe(3);
  });
});

describe('CachedFileTree: file data', () => {
  it('reads a block once, then from RAM; write-through patches what it cached', async () => {
    const { tree, calls } = counting(local);
    const t = new CachedFileTree(tree, { blockSize: 4096, dataBytes: 1 << 20, now: clock });
    const data = Buffer.alloc(10_000, 'a');
    const id = await writeFile(t, c, ROOT_ID, 'f', data);
    const h = await t.open(c, id, O_RDWR);
    const reads0 = calls.read ?? 0;
    expect((await t.read(c, id, h.fh, 0, 10_000)).equals(data)).toBe(true);
    expect(calls.read).toBe(reads0 + 3);
    expect((await t.read(c, id, h.fh, 100, 5000)).equals(data.subarray(100, 5100))).toBe(true);
    expect(calls.read).toBe(reads0 + 3);
    // The write reaches the file on disk before it is acknowledged, and the cache follows it.
    await t.write(c, id, h.fh, 4000, b('XYZ'));
    expect(fs.readFileSync(path.join(dir, 'f')).subarray(4000, 4003).toString()).toBe('XYZ');
    expect((await t.read(c, id, h.fh, 3998, 7)).toString()).toBe('aaXYZaa');
    expect(calls.read).toBe(reads0 + 3);
    // Past the end: the short last block is dropped, the file now has a hole.
    await t.write(c, id, h.fh, 20_000, b('end'));
    const all = await t.read(c, id, h.fh, 0, 30_000);
    expect(all.length).toBe(20_003);
    expect(all.subarray(10_000, 20_000).equals(Buffer.alloc(10_000))).toBe(true);
    expect(all.subarray(20_000).toString()).toBe('end');
    await t.release(c, id, h.fh);
    // O_APPEND: the node picks the offset; the cache does not guess it.
    const a = await t.open(c, id, O_WRONLY | O_APPEND);
    await t.write(c, id, a.fh, 0, b('++'));
    await t.release(c, id, a.fh);
    const r = await t.open(c, id, O_RDONLY);
    expect((await t.read(c, id, r.fh, 20_000, 100)).toString()).toBe('end++');
    await t.release(c, id, r.fh);
    // O_TRUNC
    const tr = await t.open(c, id, O_WRONLY | O_TRUNC);
    await t.release(c, id, tr.fh);
    expect((await readFile(t, c, id)).length).toBe(0);
  });

  it('MemoryDataCache stays within its bytes, evicting the least recently used block', () => {
    const m = new MemoryDataCache(3000);
    m.set(1, 0, Buffer.alloc(1000, 1));
    m.set(1, 1, Buffer.alloc(1000, 2));
    m.set(2, 0, Buffer.alloc(1000, 3));
    expect(m.bytes).toBe(3000);
    m.get(1, 0); // now most recent
    m.set(2, 1, Buffer.alloc(1000, 4));
    expect(m.bytes).toBe(3000);
    expect(m.get(1, 1)).toBeUndefined();
    expect(m.get(1, 0)?.[0]).toBe(1);
    m.dropFile(2);
    expect(m.bytes).toBe(1000);
    m.set(3, 0, Buffer.alloc(5000)); // larger than the cache: not kept
    expect(m.bytes).toBe(1000);
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.integer({ min: 0, max: 3 }), fc.integer({ min: 0, max: 20 }), fc.integer({ min: 0, max: 1500 }))), (ops) => {
        const mc = new MemoryDataCache(4000);
        for (const [f, blk, len] of ops) {
          if (len === 0) mc.dropFile(f);
          else mc.set(f, blk, Buffer.alloc(len));
          expect(mc.bytes).toBeLessThanOrEqual(4000);
        }
      }),
    );
  });

  it('reads through the cache equal the file on disk under random writes, truncates, appends and reopens (fast-check)', async () => {
    const op = fc.oneof(
      fc.record({ k: fc.constant('write' as const), off: fc.integer({ min: 0, max: 6000 }), len: fc.integer({ min: 1, max: 2000 }), v: fc.integer({ min: 1, max: 255 }) }),
      fc.record({ k: fc.constant('read' as const), off: fc.integer({ min: 0, max: 8000 }), len: fc.integer({ min: 0, max: 4000 }) }),
      fc.record({ k: fc.constant('truncate' as const), size: fc.integer({ min: 0, max: 7000 }) }),
      fc.record({ k: fc.constant('append' as const), len: fc.integer({ min: 1, max: 700 }), v: fc.integer({ min: 1, max: 255 }) }),
      fc.record({ k: fc.constant('reopen' as const) }),
      fc.record({ k: fc.constant('external' as const), off: fc.integer({ min: 0, max: 6000 }), v: fc.integer({ min: 1, max: 255 }) }),
    );
    let run = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(op, { maxLength: 30 }), async (ops) => {
        const name = `p${run++}`;
        const t = new CachedFileTree(local, { blockSize: 512, dataBytes: 4096, now: clock });
        const file = path.join(dir, name);
        const cr = await t.create(c, ROOT_ID, b(name), S_IFREG | 0o644, O_RDWR);
        const id = cr.entry.nodeId;
        let fh = cr.open.fh;
        for (const o of ops) {
          if (o.k === 'write') await t.write(c, id, fh, o.off, Buffer.alloc(o.len, o.v));
          else if (o.k === 'truncate') await t.setattr(c, id, { size: o.size }, fh);
          else if (o.k === 'append') {
            const a = await t.open(c, id, O_WRONLY | O_APPEND);
            await t.write(c, id, a.fh, 0, Buffer.alloc(o.len, o.v));
            await t.flush(c, id, a.fh, 1n);
            await t.release(c, id, a.fh);
          } else if (o.k === 'reopen') {
            await t.flush(c, id, fh, 1n);
            await t.release(c, id, fh);
            fh = (await t.open(c, id, O_RDWR)).fh;
          } else if (o.k === 'external') {
            // Another host writes, then this one reopens (close-to-open); mtime must move.
            await t.flush(c, id, fh, 1n);
            await t.release(c, id, fh);
            const fd = fs.openSync(file, 'r+');
            fs.writeSync(fd, Buffer.alloc(10, o.v), 0, 10, o.off);
            fs.futimesSync(fd, new Date(), new Date(Date.now() + 1000 * (run + o.off)));
            fs.closeSync(fd);
            fh = (await t.open(c, id, O_RDWR)).fh;
          } else {
            const got = await t.read(c, id, fh, o.off, o.len);
            const disk = fs.readFileSync(file);
            expect(got.equals(disk.subarray(Math.min(o.off, disk.length), Math.min(o.off + o.len, disk.length)))).toBe(true);
          }
        }
        const whole = await t.read(c, id, fh, 0, 20_000);
        expect(whole.equals(fs.readFileSync(file))).toBe(true);
        await t.release(c, id, fh);
        t.forget(id, 1);
      }),
      { numRuns: 60 },
    );
  });
});

describe('close-to-open between two hosts on one node', () => {
  it('data written and closed through host A is read through host B after it opens again', async () => {
    const srv = await startDirServer();
    try {
      await srv.dirs.create('/shared');
      const a = new CachedFileTree(remoteTree(srv, '/shared'), { attrTtlMs: 60_000, entryTtlMs: 60_000 });
      const bt = new CachedFileTree(remoteTree(srv, '/shared'), { attrTtlMs: 60_000, entryTtlMs: 60_000 });
      const ca = ctx('host-a');
      const cb = ctx('host-b');
      await writeFile(a, ca, ROOT_ID, 'doc', 'version 1');
      const idB = await walk(bt, cb, 'doc');
      expect((await readFile(bt, cb, idB)).toString()).toBe('version 1');
      // B reads again while nothing changed: from its cache.
      const missesBefore = bt.stats.dataMisses;
      expect((await readFile(bt, cb, idB)).toString()).toBe('version 1');
      expect(bt.stats.dataMisses).toBe(missesBefore);
      // A rewrites and closes; B's attributes are cached for a minute, yet its next open sees it all.
      const idA = await walk(a, ca, 'doc');
      const h = await a.open(ca, idA, O_WRONLY | O_TRUNC);
      await a.write(ca, idA, h.fh, 0, b('version 2, longer'));
      await a.flush(ca, idA, h.fh, 1n);
      await a.release(ca, idA, h.fh);
      const hb = await bt.open(cb, idB, O_RDONLY);
      expect((await bt.getattr(cb, idB)).attr.size).toBe(17);
      expect((await bt.read(cb, idB, hb.fh, 0, 100)).toString()).toBe('version 2, longer');
      await bt.release(cb, idB, hb.fh);
      // And A's own cache kept its data across its own write (no needless re-read).
      const missesA = a.stats.dataMisses;
      expect((await readFile(a, ca, idA)).toString()).toBe('version 2, longer');
      expect(a.stats.dataMisses).toBe(missesA + 1); // A never read it before: one block
      expect((await readFile(a, ca, idA)).toString()).toBe('version 2, longer');
      expect(a.stats.dataMisses).toBe(missesA + 1);
      await a.close();
      await bt.close();
    } finally {
      await srv.stop();
      fs.rmSync(srv.data, { recursive: true, force: true });
    }
  });
});
