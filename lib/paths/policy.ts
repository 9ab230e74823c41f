/**
 * Multipath policy: how a path is chosen, when a failed path is used again, how often paths are
 * probed and how flapping paths are damped. One policy per daemon (`paths:` in the config);
 * every default lives here.
 */

/** How a request picks among the usable paths of a node. */
export type SelectorName = 'round-robin' | 'least-pending' | 'service-time';
export const SELECTORS: readonly SelectorName[] = ['round-robin', 'least-pending', 'service-time'];

/**
 * When a path that failed and is healthy again takes traffic again:
 *   immediate — as soon as it is healthy (and not held down by damping);
 *   delayed   — after it stayed healthy for `ms` without a break;
 *   manual    — only after an explicit failback (NodePaths.failback), or as the last resort when
 *               no other path of the node works (availability beats policy).
 */
export type FailbackPolicy = { mode: 'immediate' } | { mode: 'delayed'; ms: number } | { mode: 'manual' };

/**
 * Damping of flapping paths: a path that goes down again within `flapWindowMs` of its previous
 * failure is held down (not used even when healthy) for `holdMs`, doubling with each further
 * flap up to `maxHoldMs`. A path that stays up for `flapWindowMs` is forgiven (the count resets).
 */
export interface DampingPolicy {
  holdMs: number;
  maxHoldMs: number;
  flapWindowMs: number;
}

export interface PathPolicy {
  selector: SelectorName;
  failback: FailbackPolicy;
  /**
   * Health checks this often: paths that are not up get a fresh connect (the NBD greeting);
   * idle connections on up paths a small read. 0: none (failures are seen by requests only).
   */
  healthIntervalMs: number;
  /** A probe that does not see the greeting within this fails. */
  probeTimeoutMs: number;
  /** A request unanswered this long on a path breaks that path's connection (and is retried on another). */
  requestTimeoutMs: number;
  /** Consecutive transport errors (requests or probes) that take a path from failing to down. */
  errorsToDown: number;
  damping: DampingPolicy;
  /** Local source addresses to bind (one path per NBD address and source); empty: the system's choice. */
  sources: string[];
}

export const DEFAULT_PATH_POLICY: Readonly<PathPolicy> = Object.freeze({
  selector: 'service-time' as const,
  failback: Object.freeze({ mode: 'immediate' as const }),
  healthIntervalMs: 2000,
  probeTimeoutMs: 2000,
  requestTimeoutMs: 10_000,
  errorsToDown: 3,
  damping: Object.freeze({ holdMs: 2000, maxHoldMs: 60_000, flapWindowMs: 30_000 }),
  sources: Object.freeze([]) as unknown as string[],
});

/** A policy with `p`'s fields over the defaults. */
export function pathPolicy(p: Partial<Omit<PathPolicy, 'damping'>> & { damping?: Partial<DampingPolicy> } = {}): PathPolicy {
  return {
    ...DEFAULT_PATH_POLICY,
    ...p,
    damping: { ...DEFAULT_PATH_POLICY.damping, ...(p.damping ?? {}) },
    sources: [...(p.sources ?? DEFAULT_PATH_POLICY.sources)],
  };
}

/** Timers and time, injected so that the state machine and damping are tested with a fake clock. */
export interface Clock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(h: unknown): void;
}

export const realClock: Clock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => {
    const t = setTimeout(fn, ms);
    t.unref();
    return t;
  },
  clearTimeout: (h) => clearTimeout(h as NodeJS.Timeout),
};
