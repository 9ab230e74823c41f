/**
 * The bytes received and not yet parsed, as the socket's own chunks (no concatenation): one
 * queue for the NBD server's connections (connection.ts) and the NBD client (client.ts).
 * `peek(n)` exposes n contiguous bytes as (pb, po): the first chunk itself when it holds them,
 * else a scratch copy (only frames that straddle two chunks are copied).
 */
export class ChunkQueue {
  private chunks: Buffer[] = [];
  private head = 0;
  private pos = 0;
  length = 0;
  /** Buffer and offset of the bytes exposed by the last successful peek. */
  pb: Buffer = Buffer.alloc(0);
  po = 0;
  private scratch = Buffer.allocUnsafe(64);

  push(b: Buffer): void {
    if (b.length === 0) return;
    this.chunks.push(b);
    this.length += b.length;
  }

  peek(n: number): boolean {
    if (this.length < n) return false;
    const first = this.chunks[this.head]!;
    if (first.length - this.pos >= n) {
      this.pb = first;
      this.po = this.pos;
      return true;
    }
    if (this.scratch.length < n) this.scratch = Buffer.allocUnsafe(Math.max(n, this.scratch.length * 2));
    this.copyOut(this.scratch, n);
    this.pb = this.scratch;
    this.po = 0;
    return true;
  }

  /** Copies the first n bytes (without consuming them) into target. */
  private copyOut(target: Buffer, n: number): void {
    let done = 0;
    let i = this.head;
    let p = this.pos;
    while (done < n) {
      const c = this.chunks[i]!;
      const k = Math.min(c.length - p, n - done);
      c.copy(target, done, p, p + k);
      done += k;
      i++;
      p = 0;
    }
  }

  skip(n: number): void {
    this.length -= n;
    while (n > 0) {
      const c = this.chunks[this.head]!;
      const left = c.length - this.pos;
      if (n < left) {
        this.pos += n;
        return;
      }
      n -= left;
      this.chunks[this.head] = undefined as unknown as Buffer;
      this.head++;
      this.pos = 0;
    }
    if (this.head === this.chunks.length) {
      this.chunks = [];
      this.head = 0;
    } else if (this.head > 64) {
      this.chunks = this.chunks.slice(this.head);
      this.head = 0;
    }
  }

  /** Skips as much as is available up to n; returns how much it skipped. */
  skipUpTo(n: number): number {
    const k = Math.min(n, this.length);
    this.skip(k);
    return k;
  }

  /**
   * Takes n bytes as one Buffer: a view of the socket's chunk when it holds them all (no copy),
   * else a new Buffer they are copied into (a payload that arrived in several chunks).
   */
  take(n: number): Buffer | null {
    if (this.length < n) return null;
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[this.head]!;
    let out: Buffer;
    if (first.length - this.pos >= n) out = first.subarray(this.pos, this.pos + n);
    else {
      out = Buffer.allocUnsafe(n);
      this.copyOut(out, n);
    }
    this.skip(n);
    return out;
  }

  /** Moves up to n bytes into target[off...] (or drops them when target is null); returns how many. */
  drainInto(target: Buffer | null, off: number, n: number): number {
    let done = 0;
    while (done < n && this.length > 0) {
      const c = this.chunks[this.head]!;
      const k = Math.min(c.length - this.pos, n - done);
      if (target) c.copy(target, off + done, this.pos, this.pos + k);
      done += k;
      this.skip(k);
    }
    return done;
  }

  /** Removes and returns everything buffered. */
  takeAll(): Buffer {
    const out = Buffer.allocUnsafe(this.length);
    this.copyOut(out, this.length);
    this.skip(this.length);
    return out;
  }
}
