/**
 * DirtyRegionLog: bits survive close/reopen, concurrent marks share one fdatasync, already-durable
 * bits cost no I/O, and torn writes (of a header copy or of a bitmap page) never lose a bit that
 * was reported durable.
 */
import { describe, expect, it } from 'vitest';
import { open, readFile, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { DirtyRegionLog, decodeDrlHeader } from '../../../lib/block/drl.js';
import { tempDir, MiB } from '../../helpers/index.js';

const SIZE = 64 * MiB + 12345; // 65 regions of 1 MiB, the last one partial
const dir = tempDir('vstore-drl-');
let n = 0;
const file = (): string => path.join(dir, `log${n++}`);

describe('DirtyRegionLog', () => {
  it('marks regions, counts them, and keeps them across a reopen', async () => {
    const f = file();
    const log = await DirtyRegionLog.open(f, { size: SIZE, replicaIds: ['a', 'b'] });
    expect(log.regions).toBe(65);
    await log.mark('a', 0, 1); // region 0
    await log.mark('a', 3 * MiB - 1, 2); // regions 2 and 3
    await log.mark('b', 64 * MiB, 12345); // the partial last region
    expect(log.dirtyRegions('a')).toEqual([0, 2, 3]);
    expect(log.count('a')).toBe(3);
    expect(log.dirtyRegions('b')).toEqual([64]);
    expect(log.dirtyBytes('b')).toBe(12345);
    log.clear('a', 2);
    await log.close();

    const again = await DirtyRegionLog.open(f, { size: SIZE, replicaIds: ['a', 'b'] });
    expect(again.dirtyRegions('a')).toEqual([0, 3]);
    expect(again.dirtyRegions('b')).toEqual([64]);
    await again.close();
  });

  it('a mark resolves only after fdatasync, and concurrent marks share one (group commit)', async () => {
    const log = await DirtyRegionLog.open(file(), { size: SIZE, replicaIds: ['a', 'b'] });
    const before = log.syncs;
    const marks = [];
    for (let i = 0; i < 40; i++) marks.push(log.mark(i % 2 ? 'a' : 'b', i * MiB, 10));
    await Promise.all(marks);
    // The first mark starts a cycle; all the others join the next one.
    expect(log.syncs - before).toBeLessThanOrEqual(2);
    expect(log.count('a') + log.count('b')).toBe(40);
    await log.close();
  });

  it('marking bits that are already durable does no I/O', async () => {
    const log = await DirtyRegionLog.open(file(), { size: SIZE, replicaIds: ['a'] });
    await log.mark('a', 5 * MiB, 3 * MiB);
    const syncs = log.syncs;
    expect(log.isMarked('a', 5 * MiB, 3 * MiB)).toBe(true);
    await log.mark('a', 6 * MiB, 100);
    await log.mark('a', 5 * MiB, 3 * MiB);
    expect(log.syncs).toBe(syncs);
    // Cleared, the bit costs a sync again.
    log.clear('a', 6);
    expect(log.isMarked('a', 6 * MiB, 1)).toBe(false);
    await log.mark('a', 6 * MiB, 1);
    expect(log.syncs).toBe(syncs + 1);
    await log.close();
  });

  it('a second mark of a bit whose sync is still running waits for that sync', async () => {
    const log = await DirtyRegionLog.open(file(), { size: SIZE, replicaIds: ['a'] });
    const first = log.mark('a', 0, 1);
    const second = log.mark('a', 0, 1); // the bit is set in memory, not yet durable
    await second;
    expect(log.syncs).toBeGreaterThanOrEqual(1);
    await first;
    await log.close();
  });

  it('setAll and rename (a rebuilt replica takes the slot) survive a reopen', async () => {
    const f = file();
    const log = await DirtyRegionLog.open(f, { size: SIZE, replicaIds: ['a', 'b'] });
    await log.setAll('b');
    await log.rename('b', 'c');
    expect(log.replicaIds).toEqual(['a', 'c']);
    expect(log.count('c')).toBe(65);
    expect(() => log.count('b')).toThrow(/not in the dirty-region log/);
    await expect(log.rename('a', 'c')).rejects.toMatchObject({ code: 'EEXIST' });
    await log.close();
    const again = await DirtyRegionLog.open(f, { size: SIZE, replicaIds: ['a', 'c'] });
    expect(again.count('c')).toBe(65);
    expect(again.count('a')).toBe(0);
    await again.close();
  });

  it('two renames at once both land (each computed from the ids of its turn)', async () => {
    const f = file();
    const log = await DirtyRegionLog.open(f, { size: SIZE, replicaIds: ['a', 'b', 'c'] });
    await Promise.all([log.rename('b', 'b2'), log.rename('c', 'c2')]);
    expect(log.replicaIds).toEqual(['a', 'b2', 'c2']);
    await log.close();
    const again = await DirtyRegionLog.open(f, { size: SIZE, replicaIds: ['a', 'b2', 'c2'] });
    expect(again.replicaIds).toEqual(['a', 'b2', 'c2']);
    expect(again.count('b2')).toBe(0); // known ids: no slot was taken over
    await again.close();
  });

  it('a replica id the file does not know takes a stale slot, all dirty', async () => {
    const f = file();
    const log = await DirtyRegionLog.open(f, { size: SIZE, replicaIds: ['a', 'b'] });
    await log.close();
    const again = await DirtyRegionLog.open(f, { size: SIZE, replicaIds: ['a', 'z'] });
    expect(again.replicaIds).toEqual(['a', 'z']);
    expect(again.count('z')).toBe(65);
    expect(again.count('a')).toBe(0);
    await again.close();
    await expect(DirtyRegionLog.open(f, { size: SIZE, replicaIds: ['x', 'y', 'w'] })).rejects.toMatchObject({ code: 'EINVAL' });
  });

  it('refuses a log made for another geometry, and a file that is not a log', async () => {
    const f = file();
    await (await DirtyRegionLog.open(f, { size: SIZE, replicaIds: ['a'] })).close();
    await expect(DirtyRegionLog.open(f, { size: SIZE * 2, replicaIds: ['a'] })).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(DirtyRegionLog.open(f, { size: SIZE, regionSize: 4096, replicaIds: ['a'] })).rejects.toMatchObject({ code: 'EINVAL' });
    const junk = file();
    await writeFile(junk, Buffer.alloc(20000, 7));
    await expect(DirtyRegionLog.open(junk, { size: SIZE, replicaIds: ['a'] })).rejects.toMatchObject({ code: 'EIO' });
  });

  it('a torn header write falls back to the previous header copy (bits intact)', async () => {
    const f = file();
    const log = await DirtyRegionLog.open(f, { size: SIZE, replicaIds: ['a', 'b'] });
    await log.mark('b', 7 * MiB, 1);
    await log.rename('b', 'c'); // generation 2, written to header copy 0
    await log.close();
    // Simulate a crash in the middle of writing copy 0: its first 512 bytes are new, the rest old junk.
    const fh = await open(f, 'r+');
    const hdr = Buffer.alloc(4096);
    await fh.read(hdr, 0, 4096, 0);
    expect(decodeDrlHeader(hdr)?.ids).toEqual(['a', 'c']);
    await fh.write(Buffer.alloc(3584, 0xee), 0, 3584, 512);
    await fh.close();
    const again = await DirtyRegionLog.open(f, { size: SIZE, replicaIds: ['a', 'b'] });
    // The rename is lost (copy 1, generation 1, still says 'b'); the bit is not.
    expect(again.replicaIds).toEqual(['a', 'b']);
    expect(again.dirtyRegions('b')).toEqual([7]);
    await again.close();
    // Both copies torn: not a log any more.
    const fh2 = await open(f, 'r+');
    await fh2.write(Buffer.alloc(4096, 0xee), 0, 4096, 4096);
    await fh2.write(Buffer.alloc(4096, 0xee), 0, 4096, 0);
    await fh2.close();
    await expect(DirtyRegionLog.open(f, { size: SIZE, replicaIds: ['a', 'b'] })).rejects.toMatchObject({ code: 'EIO' });
  });

  it('a torn bitmap page write (some sectors old, some new) keeps every durable bit', async () => {
    // 16 Mi regions of 512 bytes: a bitmap of 2 MiB, so bits in several sectors of one page.
    const size = 8 * MiB;
    const f = file();
    const log = await DirtyRegionLog.open(f, { size, regionSize: 512, replicaIds: ['a'] });
    const durable = [1, 700, 4000, 8000, 12000, 16000];
    for (const k of durable) await log.mark('a', k * 512, 1);
    await log.close();
    const bitmapAt = 8192;
    const oldPage = (await readFile(f)).subarray(bitmapAt, bitmapAt + 4096);
    // The next state of the page: more bits set and one cleared (region 700, after its copy).
    const newPage = Buffer.from(oldPage);
    for (const k of [5, 3000, 9000, 15000]) newPage[k >> 3]! |= 1 << (k & 7);
    newPage[700 >> 3]! &= ~(1 << (700 & 7));
    // Crash mid-write: sectors 1 and 3 of the page (bits 4096-8191, 12288-16383) made it, the
    // others did not.
    const fh = await open(f, 'r+');
    for (const s of [1, 3]) await fh.write(newPage, s * 512, 512, bitmapAt + s * 512);
    await fh.close();
    const again = await DirtyRegionLog.open(f, { size, regionSize: 512, replicaIds: ['a'] });
    const got = new Set(again.dirtyRegions('a'));
    for (const k of durable) expect(got.has(k)).toBe(true); // 700's clear (sector 0) did not land: safe
    expect(got.has(15000)).toBe(true); // sector 3: new
    expect(got.has(3000)).toBe(false); // sector 0: old, its mark was never reported durable
    expect(got.has(9000)).toBe(false); // sector 2: old
    await again.close();
  });

  it('refuses a truncated log file', async () => {
    const f = file();
    await (await DirtyRegionLog.open(f, { size: SIZE, replicaIds: ['a', 'b'] })).close();
    const st = await stat(f);
    const fh = await open(f, 'r+');
    await fh.truncate(st.size - 4096);
    await fh.close();
    await expect(DirtyRegionLog.open(f, { size: SIZE, replicaIds: ['a', 'b'] })).rejects.toMatchObject({ code: 'EIO' });
  });
});
