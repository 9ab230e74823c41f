/**
 * Path selection (pure: paths in, one path out).
 *
 * Candidates are ranked in tiers: up paths, then failing ones (a transport error, not yet
 * down), then standby ones (down but healthy, held back by damping or the failback policy: used
 * only when nothing else works, since availability beats policy). Within the best tier:
 *   - a high-priority request takes the least-loaded path (fewest in flight, then fastest);
 *   - a request with a home path (per-VM affinity) stays on it while it is up;
 *   - otherwise the selector: round-robin, least-pending (ties in turn), or service-time
 *     (lowest expected completion: (in flight + 1) × EWMA service time).
 */
import type { Path } from './path.js';
import type { SelectorName } from './policy.js';

export interface SelectOptions {
  /** The VM's home path (affinity). */
  home?: Path | undefined;
  high?: boolean;
}

/** Round-robin position, per caller. */
export interface Cursor {
  next: number;
}

function tier(p: Path): number {
  if (p.state === 'up') return 0;
  if (p.state === 'failing') return 1;
  return p.standby ? 2 : 3;
}

/** Picks a path among `cands` (already filtered to those the caller can use), or undefined. */
export function selectPath(cands: readonly Path[], selector: SelectorName, cursor: Cursor, opts: SelectOptions = {}): Path | undefined {
  let best = 3;
  for (const p of cands) best = Math.min(best, tier(p));
  // Tier 3 (down, not known healthy) is still tried when it is all there is: the caller holds a
  // ready connection on it, and a connection that works beats failing the request.
  if (cands.length === 0) return undefined;
  const pool = cands.filter((p) => tier(p) === best);
  if (opts.high) return leastLoaded(pool);
  if (opts.home && best === 0 && pool.includes(opts.home)) return opts.home;
  switch (selector) {
    case 'round-robin':
      return roundRobin(pool, cursor);
    case 'least-pending':
      return leastPending(pool, cursor);
    case 'service-time':
      return serviceTime(pool);
  }
}

function roundRobin(pool: readonly Path[], cursor: Cursor): Path {
  const p = pool[cursor.next % pool.length]!;
  cursor.next = (cursor.next + 1) % 1_000_000_007;
  return p;
}

/** Fewest in flight; ties go round-robin so that an idle node's paths all get used. */
function leastPending(pool: readonly Path[], cursor: Cursor): Path {
  const n = pool.length;
  const start = cursor.next % n;
  cursor.next = (cursor.next + 1) % 1_000_000_007;
  let best = pool[start]!;
  for (let k = 1; k < n; k++) {
    const p = pool[(start + k) % n]!;
    if (p.inflight < best.inflight) best = p;
  }
  return best;
}

function serviceTime(pool: readonly Path[]): Path {
  let best = pool[0]!;
  let score = (best.inflight + 1) * best.serviceTimeMs;
  for (let i = 1; i < pool.length; i++) {
    const p = pool[i]!;
    const s = (p.inflight + 1) * p.serviceTimeMs;
    if (s < score) {
      best = p;
      score = s;
    }
  }
  return best;
}

function leastLoaded(pool: readonly Path[]): Path {
  let best = pool[0]!;
  for (let i = 1; i < pool.length; i++) {
    const p = pool[i]!;
    if (p.inflight < best.inflight || (p.inflight === best.inflight && p.serviceTimeMs < best.serviceTimeMs)) best = p;
  }
  return best;
}
