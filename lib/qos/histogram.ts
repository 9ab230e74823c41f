/**
 * Latency histogram: log-linear buckets (4 per power of two of microseconds), so recording is a
 * log2 and an increment, and a percentile is within ~19% of the true value (the bucket's upper
 * bound is reported). Cheap enough for every request; percentiles are read off a window.
 */

/** Buckets per doubling. */
const SUB = 4;
/** 2^27 us ~ 134 s; slower requests land in the last bucket. */
const BUCKETS = 27 * SUB + 1;

export class LatencyHistogram {
  readonly counts = new Uint32Array(BUCKETS);
  count = 0;
  /** Sum of recorded values, seconds. */
  sum = 0;

  /** Records one latency in seconds. */
  record(seconds: number): void {
    const us = seconds * 1e6;
    const i = us <= 1 ? 0 : Math.min(BUCKETS - 1, Math.ceil(Math.log2(us) * SUB));
    this.counts[i]!++;
    this.count++;
    this.sum += seconds;
  }

  /** The upper bound (seconds) of the bucket holding quantile q (0..1); 0 when empty. */
  quantile(q: number): number {
    if (this.count === 0) return 0;
    const rank = Math.max(1, Math.ceil(q * this.count));
    let seen = 0;
    for (let i = 0; i < BUCKETS; i++) {
      seen += this.counts[i]!;
      if (seen >= rank) return 2 ** (i / SUB) / 1e6;
    }
    return 2 ** ((BUCKETS - 1) / SUB) / 1e6;
  }

  reset(): void {
    this.counts.fill(0);
    this.count = 0;
    this.sum = 0;
  }
}
