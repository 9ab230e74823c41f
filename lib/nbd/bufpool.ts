/**
 * Reuse of large reply buffers. A 1 MiB read reply allocated per request is 1 MiB of external
 * memory for the garbage collector to find and free: at a thousand replies a second, GC took
 * ~15% of the event loop. Buffers of at least `minSize` bytes are handed back here once the
 * socket has written them (write callback) and reused for the next reply of the same size.
 * Bounded: at most `maxBytes` are kept; beyond, buffers are left to the GC as before.
 */
export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private pooled = 0;

  constructor(
    readonly maxBytes: number,
    readonly minSize = 64 * 1024,
  ) {}

  /** Bytes currently kept for reuse. */
  get pooledBytes(): number {
    return this.pooled;
  }

  /** A buffer of exactly `size` bytes (contents undefined). */
  get(size: number): Buffer {
    if (size >= this.minSize) {
      const b = this.free.get(size)?.pop();
      if (b) {
        this.pooled -= size;
        return b;
      }
      return Buffer.allocUnsafeSlow(size);
    }
    return Buffer.allocUnsafe(size);
  }

  /** Gives back a buffer from get() that nothing references any more. */
  put(b: Buffer): void {
    const size = b.length;
    if (size < this.minSize || this.pooled + size > this.maxBytes) return;
    let list = this.free.get(size);
    if (!list) this.free.set(size, (list = []));
    list.push(b);
    this.pooled += size;
  }
}
