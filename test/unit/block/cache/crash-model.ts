/**
 * A cache "device" for tests: a Volume whose completed writes are volatile until flush() (as a
 * disk's write cache or the page cache before fdatasync), and `crash()` gives the device as it
 * could be found after a power cut or a kill -9 before the next sync: the durable contents plus
 * an arbitrary subset of the unflushed writes, each possibly torn at a 4 KiB boundary.
 * `fail()` makes every later request fail with EIO (a dead device).
 */
import { VolumeError } from '../../../../lib/block/errors.js';
import { MemoryVolume } from '../../../../lib/block/memory.js';
import { VolumeLayer } from '../../../../lib/block/layer.js';
import type { WriteOptions } from '../../../../lib/block/volume.js';

export class CrashableVolume extends VolumeLayer {
  private pending: Array<{ offset: number; data: Buffer }> = [];
  private failing = false;
  flushes = 0;

  constructor(readonly durable: MemoryVolume) {
    super(durable);
  }

  static create(size: number): CrashableVolume {
    return new CrashableVolume(new MemoryVolume({ size }));
  }

  fail(): void {
    this.failing = true;
  }

  private check(): void {
    if (this.failing) throw new VolumeError('EIO', 'injected device failure');
  }

  override async read(offset: number, buf: Buffer): Promise<void> {
    this.check();
    await this.durable.read(offset, buf);
    for (const p of this.pending) {
      const a = Math.max(offset, p.offset);
      const b = Math.min(offset + buf.length, p.offset + p.data.length);
      if (a < b) p.data.copy(buf, a - offset, a - p.offset, b - p.offset);
    }
  }

  override async write(offset: number, buf: Buffer, opts?: WriteOptions): Promise<void> {
    this.check();
    this.pending.push({ offset, data: Buffer.from(buf) });
    if (opts?.fua) await this.flush();
  }

  /**
   * FileVolume's turn-complete page-cache write (the cache's lock-free fills and writes use it),
   * declined every third call so that the cache's async paths run too. (No readCachedSync: the
   * durable MemoryVolume reads asynchronously; crash-concurrent.property.test.ts has both.)
   */
  writeInlineSync(offset: number, buf: Buffer): boolean {
    this.check();
    if (++this.syncCalls % 3 === 0) return false;
    this.pending.push({ offset, data: Buffer.from(buf) });
    return true;
  }
  private syncCalls = 0;

  override async flush(): Promise<void> {
    this.check();
    for (const p of this.pending) await this.durable.write(p.offset, p.data);
    this.pending = [];
    this.flushes++;
  }

  override async close(): Promise<void> {}

  /** The device after a crash now: durable data plus a random subset of unflushed writes (maybe torn). */
  async crash(rand: () => number = Math.random): Promise<CrashableVolume> {
    const mem = new MemoryVolume({ size: this.durable.size });
    const all = Buffer.alloc(this.durable.size);
    await this.durable.read(0, all);
    await mem.write(0, all);
    for (const p of this.pending) {
      const r = rand();
      if (r < 0.4) continue; // lost
      let data = p.data;
      if (r < 0.55 && data.length > 4096) data = data.subarray(0, 4096 * Math.floor(rand() * (data.length / 4096))); // torn
      if (data.length) await mem.write(p.offset, data);
    }
    return new CrashableVolume(mem);
  }
}
