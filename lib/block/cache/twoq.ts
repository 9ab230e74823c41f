/**
 * 2Q replacement (Johnson & Shasha, VLDB 1994), the simplified full version: a line seen once
 * enters A1in (FIFO); it is promoted to Am (LRU) only when it is referenced again after it left
 * A1in (its key is still remembered in the A1out ghost FIFO). A sequential scan therefore only
 * cycles through A1in and never flushes the hot set out of Am, which plain LRU does.
 *
 * Pure bookkeeping of keys; the cache asks `victim(canEvict)` for a key to evict and skips keys
 * it cannot evict now (dirty lines), so the policy never waits.
 */
export class TwoQueue<K> {
  /** Insertion-ordered: the first key is the oldest (FIFO head / LRU end). */
  private readonly a1in = new Map<K, true>();
  private readonly am = new Map<K, true>();
  private readonly a1out = new Map<K, true>();

  /**
   * @param kinFraction share of the resident keys A1in may hold before it is evicted first
   * @param koutFraction ghost keys remembered, as a share of `capacity`
   */
  constructor(
    private capacity: number,
    private readonly kinFraction = 0.25,
    private readonly koutFraction = 0.5,
  ) {}

  get size(): number {
    return this.a1in.size + this.am.size;
  }

  /** Resident keys of the hot queue (for tests and stats). */
  get hotSize(): number {
    return this.am.size;
  }

  setCapacity(n: number): void {
    this.capacity = Math.max(1, n);
  }

  has(k: K): boolean {
    return this.a1in.has(k) || this.am.has(k);
  }

  /** A reference to a resident key (a hit), or the insertion of a new resident key (a fill). */
  touch(k: K): void {
    if (this.am.has(k)) {
      this.am.delete(k);
      this.am.set(k, true);
      return;
    }
    if (this.a1in.has(k)) return; // correlated references while in A1in do not promote
    if (this.a1out.delete(k)) {
      this.am.set(k, true);
      return;
    }
    this.a1in.set(k, true);
  }

  /** The key is no longer resident (evicted or dropped); it is remembered as a ghost when it left A1in. */
  remove(k: K, ghost = true): void {
    if (this.a1in.delete(k)) {
      if (ghost) {
        this.a1out.set(k, true);
        const max = Math.max(1, Math.floor(this.capacity * this.koutFraction));
        while (this.a1out.size > max) this.a1out.delete(this.a1out.keys().next().value as K);
      }
      return;
    }
    this.am.delete(k);
  }

  /** Forgets every key (resident and ghost). */
  clear(): void {
    this.a1in.clear();
    this.am.clear();
    this.a1out.clear();
  }

  /**
   * The key to evict next: the A1in head when A1in is over its share, else the Am LRU end;
   * keys for which `canEvict` is false are skipped. Undefined when nothing can be evicted.
   * Does not remove the key (call remove() once it is gone).
   */
  victim(canEvict: (k: K) => boolean = () => true): K | undefined {
    const kin = Math.max(1, Math.floor(this.capacity * this.kinFraction));
    const order = this.a1in.size > kin ? [this.a1in, this.am] : [this.am, this.a1in];
    for (const q of order) for (const k of q.keys()) if (canEvict(k)) return k;
    return undefined;
  }
}
