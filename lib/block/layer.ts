/**
 * Base of every Volume layer: forwards each call to the volume below. A layer overrides only
 * what it changes, like an nbdkit filter.
 */
import type { BlockLimits, Extent, Volume, VolumeCapabilities, WriteOptions, ZeroOptions } from './volume.js';

export class VolumeLayer implements Volume {
  constructor(protected readonly inner: Volume) {}
  get size(): number {
    return this.inner.size;
  }
  get limits(): BlockLimits {
    return this.inner.limits;
  }
  get caps(): VolumeCapabilities {
    return this.inner.caps;
  }
  read(offset: number, buf: Buffer): Promise<void> {
    return this.inner.read(offset, buf);
  }
  write(offset: number, buf: Buffer, opts?: WriteOptions): Promise<void> {
    return this.inner.write(offset, buf, opts);
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    return this.inner.trim(offset, length, opts);
  }
  writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    return this.inner.writeZeroes(offset, length, opts);
  }
  prefetch(offset: number, length: number): Promise<void> {
    return this.inner.prefetch(offset, length);
  }
  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.inner.blockStatus(offset, length);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}
