import { describe, expect, it } from 'vitest';
import { CacheDevice } from '../../../../lib/block/cache/device.js';
import { BLOCK } from '../../../../lib/block/cache/journal.js';
import { MemoryVolume } from '../../../../lib/block/memory.js';
import { CrashableVolume } from './crash-model.js';

const MiB = 1024 * 1024;

async function reopen(v: CrashableVolume): Promise<CacheDevice> {
  return CacheDevice.open(await v.crash(() => 0.1)); // every unflushed write lost
}

describe('CacheDevice metadata', () => {
  it('formats a blank device and finds its disks and slots again after a restart', async () => {
    const v = CrashableVolume.create(4 * MiB);
    const d = await CacheDevice.open(v, { lineSize: 65536 });
    const disk = await d.attach('vm1/disk0', 10 * MiB);
    const s = (await d.allocate(disk, 5, 1))!;
    d.slotValid(s)[0] = 0b1011;
    d.mark(s);
    await d.writeData(s, 0, Buffer.alloc(4096, 7));
    await d.commit();
    const d2 = await reopen(v);
    const disk2 = d2.disksByKey().get('vm1/disk0')!;
    expect(disk2.lines.get(5)).toEqual([s]);
    expect(d2.slotValid(s)[0]).toBe(0b1011);
    expect(d2.slotEpoch[s]).toBe(1);
    const b = Buffer.alloc(4096);
    await d2.readData(s, 0, b);
    expect(b[0]).toBe(7);
  });

  it('a change not committed is not replayed; a torn or corrupt journal block ends replay there', async () => {
    const v = CrashableVolume.create(4 * MiB);
    const d = await CacheDevice.open(v, { lineSize: 65536 });
    const disk = await d.attach('k', 10 * MiB);
    const slots: number[] = [];
    for (let i = 0; i < 3; i++) {
      const s = (await d.allocate(disk, i, 1))!;
      d.slotValid(s)[0] = 1;
      d.mark(s);
      await d.commit(); // one journal block each
      slots.push(s);
    }
    const s4 = (await d.allocate(disk, 9, 1))!;
    d.slotValid(s4)[0] = 1; // never committed
    const d2 = await reopen(v);
    expect([...d2.disksByKey().get('k')!.lines.keys()].sort()).toEqual([0, 1, 2]);
    // corrupt the journal block of the second commit: replay keeps only what came before it
    const raw = Buffer.alloc(v.durable.size);
    await v.durable.read(0, raw);
    const sb = (d as unknown as { sb: { journalStart: number; journalBlocks: number } }).sb;
    const blocks: number[] = [];
    for (let b = 0; b < sb.journalBlocks; b++) if (raw.readUInt32LE((sb.journalStart + b) * BLOCK) === 0x4a435356) blocks.push(b);
    expect(blocks.length).toBeGreaterThanOrEqual(3);
    const second = blocks[blocks.length - 2]!;
    await v.durable.write((sb.journalStart + second) * BLOCK + 30, Buffer.from([0xff ^ raw[(sb.journalStart + second) * BLOCK + 30]!]));
    const d3 = await reopen(v);
    expect([...d3.disksByKey().get('k')!.lines.keys()].sort()).toEqual([0]);
  });

  it('a long run wraps the journal ring through checkpoints and replays to the last commit', async () => {
    const v = CrashableVolume.create(2 * MiB);
    const d = await CacheDevice.open(v, { lineSize: 16384 });
    const disk = await d.attach('k', 64 * MiB);
    const want = new Map<number, number>();
    for (let i = 0; i < 600; i++) {
      const line = i % 50;
      let s = disk.lines.get(line)?.[0];
      if (s === undefined) s = (await d.allocate(disk, line, 0))!;
      d.slotValid(s)[0] = i;
      d.mark(s);
      want.set(line, i);
      await d.commit();
    }
    expect(d.deviceStats().checkpoints).toBeGreaterThan(1);
    const d2 = await reopen(v);
    const disk2 = d2.disksByKey().get('k')!;
    for (const [line, val] of want) expect(d2.slotValid(disk2.lines.get(line)![0]!)[0], `line ${line}`).toBe(val);
  });

  it('refuses a device too small, and reports a damaged superblock', async () => {
    await expect(CacheDevice.open(new MemoryVolume({ size: 64 * 1024 }))).rejects.toThrow(/too small/);
    const v = new MemoryVolume({ size: 4 * MiB });
    await CacheDevice.open(v);
    await v.write(20, Buffer.from([0x55]));
    await expect(CacheDevice.open(v)).rejects.toThrow(/superblock/);
  });
});
