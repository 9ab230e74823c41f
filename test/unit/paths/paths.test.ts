import { describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { renderPaths } from '../../../lib/cli/status.js';
import { renderMetrics, type DaemonStatus } from '../../../lib/daemon/control.js';
import { NodePaths, Path, pathPolicy, selectPath, type Clock, type PathPolicy } from '../../../lib/paths/index.js';

/** A clock the test moves by hand; timers fire in order as time passes. */
class FakeClock implements Clock {
  t = 1_000_000;
  private timers: Array<{ at: number; fn: () => void; id: number }> = [];
  private seq = 0;
  now(): number {
    return this.t;
  }
  setTimeout(fn: () => void, ms: number): unknown {
    const id = ++this.seq;
    this.timers.push({ at: this.t + ms, fn, id });
    return id;
  }
  clearTimeout(h: unknown): void {
    this.timers = this.timers.filter((x) => x.id !== h);
  }
  advance(ms: number): void {
    const end = this.t + ms;
    for (;;) {
      this.timers.sort((a, b) => a.at - b.at);
      const next = this.timers[0];
      if (!next || next.at > end) break;
      this.timers.shift();
      this.t = next.at;
      next.fn();
    }
    this.t = end;
  }
}

const log = pino({ level: 'silent' });

function mkPath(policy: Partial<PathPolicy> = {}, clock = new FakeClock(), id = 'p'): { p: Path; clock: FakeClock; changes: string[] } {
  const changes: string[] = [];
  const p = new Path(id, 'n1', `127.0.0.1:1`, undefined, pathPolicy(policy), clock, (x, from) => changes.push(`${from}->${x.state}`));
  return { p, clock: clock as FakeClock, changes };
}

describe('path state machine', () => {
  it('starts down, comes up on its first healthy signal with no failback delay', () => {
    const { p, changes } = mkPath({ failback: { mode: 'delayed', ms: 5000 } });
    expect(p.state).toBe('down');
    p.healthy();
    expect(p.state).toBe('up');
    expect(changes).toEqual(['down->up']);
  });

  it('a transport error makes it failing; errorsToDown consecutive errors take it down; a success brings failing back up', () => {
    const { p, changes } = mkPath({ errorsToDown: 3 });
    p.healthy();
    p.begin();
    p.failed(true, 'timeout');
    expect(p.state).toBe('failing');
    p.begin();
    p.succeeded(1, 'read', 4096);
    expect(p.state).toBe('up');
    for (let i = 0; i < 3; i++) {
      p.begin();
      p.failed(true, 'timeout');
    }
    expect(p.state).toBe('down');
    expect(changes).toEqual(['down->up', 'up->failing', 'failing->up', 'up->failing', 'failing->down']);
    expect(p.inflight).toBe(0);
    expect(p.errors).toBe(4);
  });

  it('an error the node answered (not transport) leaves the path up', () => {
    const { p } = mkPath();
    p.healthy();
    p.begin();
    p.failed(false, 'ENOSPC');
    expect(p.state).toBe('up');
    expect(p.errors).toBe(1);
  });

  it('a lost connection takes it down at once', () => {
    const { p } = mkPath();
    p.healthy();
    p.connectionLost('reset');
    expect(p.state).toBe('down');
    expect(p.downs).toBe(1);
  });

  it('keeps an EWMA of service time and counts bytes by kind', () => {
    const { p } = mkPath();
    p.healthy();
    for (let i = 0; i < 50; i++) {
      p.begin();
      p.succeeded(10, i % 2 ? 'write' : 'read', 4096);
    }
    expect(p.serviceTimeMs).toBeGreaterThan(9.9);
    expect(p.serviceTimeMs).toBeLessThanOrEqual(10);
    expect(p.status()).toMatchObject({ reads: 25, writes: 25, bytesRead: 25 * 4096, bytesWritten: 25 * 4096, inflight: 0 });
  });
});

describe('service-time percentiles', () => {
  it('p50/p99 of the last closed one-second window in the path status, vstore status and /metrics; an idle window clears them', () => {
    const { p, clock } = mkPath();
    p.healthy();
    const serve = (ms: number, n: number): void => {
      for (let i = 0; i < n; i++) {
        p.begin();
        p.succeeded(ms, 'read', 4096);
      }
    };
    serve(1, 90);
    serve(50, 10);
    // The window is still open: nothing closed yet.
    expect(p.status().latencyMs).toEqual({ p50: 0, p90: 0, p99: 0 });
    clock.advance(1000);
    const st = p.status();
    // Histogram buckets are 4 per doubling: the reported bound is within 19% above the true value.
    expect(st.latencyMs.p50).toBeGreaterThanOrEqual(1);
    expect(st.latencyMs.p50).toBeLessThan(1.19);
    expect(st.latencyMs.p99).toBeGreaterThanOrEqual(50);
    expect(st.latencyMs.p99).toBeLessThan(59.5);
    expect(st).toMatchObject({ latencyCount: 100, latencySumMs: 590 });
    // The next window: fast requests only; the previous window's slow tail is gone from p99.
    serve(2, 20);
    clock.advance(1000);
    expect(p.status().latencyMs.p99).toBeLessThan(2.4);

    const daemon: DaemonStatus = { pid: 1, version: 'x', startedAt: '', uptimeSeconds: 0, control: '/c', vms: [], paths: [p.status()] };
    const table = renderPaths(daemon).split('\n');
    const header = table.find((l) => l.startsWith('NODE'))!;
    expect(header).toMatch(/SVC-MS\s+P50-MS\s+P99-MS\s+READS/);
    const row = table.find((l) => l.startsWith('n1'))!.split(/\s+/);
    const col = (name: string): string => row[header.split(/\s+/).indexOf(name)]!;
    expect(Number(col('P50-MS'))).toBeGreaterThanOrEqual(2);
    expect(Number(col('P99-MS'))).toBeLessThan(2.4);
    expect(col('READS')).toBe('120');
    const metrics = renderMetrics(daemon);
    expect(metrics).toContain('# TYPE vstore_path_latency_seconds summary');
    const q99 = metrics.match(/^vstore_path_latency_seconds\{node="n1",path="p",quantile="0.99"\} (\S+)$/m);
    expect(Number(q99?.[1])).toBeGreaterThanOrEqual(0.002);
    expect(Number(q99?.[1])).toBeLessThan(0.0024);
    expect(metrics).toMatch(/^vstore_path_latency_seconds_sum\{node="n1",path="p"\} 0\.63$/m);
    expect(metrics).toMatch(/^vstore_path_latency_seconds_count\{node="n1",path="p"\} 120$/m);

    // A second without requests: no percentiles ('-' in the table), the totals stay.
    clock.advance(1000);
    expect(p.status()).toMatchObject({ latencyMs: { p50: 0, p90: 0, p99: 0 }, latencyCount: 120 });
    const idle = renderPaths({ ...daemon, paths: [p.status()] }).split('\n').find((l) => l.startsWith('n1'))!;
    expect(idle.split(/\s+/).slice(5, 8)).toEqual(['-', '-', '120']);
  });
});

describe('damping', () => {
  it('holds a flapping path down for growing intervals, and forgives it after a quiet window', () => {
    const { p, clock } = mkPath({ damping: { holdMs: 1000, maxHoldMs: 4000, flapWindowMs: 10_000 } });
    p.healthy();
    // first failure: no hold — it may come back as soon as it is healthy
    p.connectionLost('x');
    p.healthy();
    expect(p.state).toBe('up');
    // second failure within the window: held 1 s
    clock.advance(100);
    p.connectionLost('x');
    p.healthy();
    expect(p.state).toBe('down');
    expect(p.standby).toBe(true);
    expect(p.status().heldUntil).toBe(clock.now() + 1000);
    clock.advance(999);
    p.tick();
    expect(p.state).toBe('down');
    clock.advance(1);
    p.tick();
    expect(p.state).toBe('up');
    // third: 2 s, fourth: 4 s, fifth: capped at 4 s
    const holds: number[] = [];
    for (let i = 0; i < 3; i++) {
      clock.advance(10);
      p.connectionLost('x');
      holds.push(p.status().heldUntil! - clock.now());
      p.healthy();
      clock.advance(holds[i]!);
      p.tick();
      expect(p.state).toBe('up');
    }
    expect(holds).toEqual([2000, 4000, 4000]);
    // stable past the window: the next failure is a first failure again
    clock.advance(10_001);
    p.connectionLost('x');
    expect(p.status().heldUntil).toBeUndefined();
    p.healthy();
    expect(p.state).toBe('up');
  });

  it('a probe failure while held clears the healthy mark: it must be healthy again to return', () => {
    const { p, clock } = mkPath({ damping: { holdMs: 1000, maxHoldMs: 4000, flapWindowMs: 10_000 } });
    p.healthy();
    p.connectionLost('x');
    p.healthy();
    p.connectionLost('x');
    p.healthy();
    p.transportError('probe');
    clock.advance(2000);
    p.tick();
    expect(p.state).toBe('down');
    p.healthy();
    expect(p.state).toBe('up');
  });
});

describe('failback', () => {
  it('delayed: comes back only after staying healthy for the delay without a break', () => {
    const { p, clock } = mkPath({ failback: { mode: 'delayed', ms: 3000 } });
    p.healthy();
    p.connectionLost('x');
    p.healthy();
    expect(p.state).toBe('down');
    expect(p.status().awaitingFailback).toBe(true);
    clock.advance(2000);
    p.transportError('probe'); // a break restarts the delay
    p.healthy();
    clock.advance(2999);
    p.tick();
    expect(p.state).toBe('down');
    clock.advance(1);
    p.tick();
    expect(p.state).toBe('up');
  });

  it('manual: stays out until failback is allowed', () => {
    const { p, clock } = mkPath({ failback: { mode: 'manual' } });
    p.healthy();
    p.connectionLost('x');
    p.healthy();
    clock.advance(3_600_000);
    p.tick();
    expect(p.state).toBe('down');
    expect(p.nextDue()).toBeNull();
    p.allowFailback();
    expect(p.state).toBe('up');
    // the permission is used up: the next failure waits again
    p.connectionLost('x');
    p.healthy();
    expect(p.state).toBe('down');
  });

  it('NodePaths fires the delayed failback on its own timer', async () => {
    const clock = new FakeClock();
    const np = new NodePaths({
      node: 'n1',
      addresses: ['127.0.0.1:1', '127.0.0.2:1'],
      policy: pathPolicy({ failback: { mode: 'delayed', ms: 500 }, healthIntervalMs: 100 }),
      logger: log,
      clock,
      prober: async () => {},
    });
    np.acquire();
    await np.probeAll();
    expect(np.paths.map((p) => p.state)).toEqual(['up', 'up']);
    np.paths[0]!.connectionLost('cut');
    await Promise.resolve();
    await np.probeAll();
    expect(np.paths[0]!.state).toBe('down');
    clock.advance(499);
    expect(np.paths[0]!.state).toBe('down');
    clock.advance(1);
    expect(np.paths[0]!.state).toBe('up');
    np.release();
  });
});

describe('selectors', () => {
  function paths(n: number): Path[] {
    const clock = new FakeClock();
    return Array.from({ length: n }, (_, i) => {
      const p = new Path(`p${i}`, 'n1', `127.0.0.${i + 1}:1`, undefined, pathPolicy(), clock);
      p.healthy();
      return p;
    });
  }

  it('round-robin cycles over the up paths', () => {
    const ps = paths(3);
    const c = { next: 0 };
    expect(Array.from({ length: 6 }, () => selectPath(ps, 'round-robin', c)!.id)).toEqual(['p0', 'p1', 'p2', 'p0', 'p1', 'p2']);
  });

  it('least-pending picks the fewest in flight', () => {
    const ps = paths(3);
    ps[0]!.inflight = 5;
    ps[1]!.inflight = 1;
    ps[2]!.inflight = 3;
    const c = { next: 0 };
    for (let i = 0; i < 5; i++) expect(selectPath(ps, 'least-pending', c)!.id).toBe('p1');
  });

  it('service-time weighs queue depth by service time', () => {
    const ps = paths(2);
    ps[0]!.serviceTimeMs = 1;
    ps[0]!.inflight = 4; // (4+1)*1 = 5
    ps[1]!.serviceTimeMs = 2;
    ps[1]!.inflight = 1; // (1+1)*2 = 4
    expect(selectPath(ps, 'service-time', { next: 0 })!.id).toBe('p1');
    ps[1]!.inflight = 2; // 6
    expect(selectPath(ps, 'service-time', { next: 0 })!.id).toBe('p0');
  });

  it('a VM stays on its home path while it is up; high priority takes the least loaded', () => {
    const ps = paths(3);
    ps[2]!.inflight = 10;
    const c = { next: 0 };
    for (let i = 0; i < 4; i++) expect(selectPath(ps, 'round-robin', c, { home: ps[2] })!.id).toBe('p2');
    ps[1]!.inflight = 1;
    ps[0]!.inflight = 2;
    expect(selectPath(ps, 'round-robin', c, { home: ps[2], high: true })!.id).toBe('p1');
    // home failing: the VM moves to an up path
    ps[2]!.failed(true, 'timeout');
    expect(['p0', 'p1']).toContain(selectPath(ps, 'round-robin', c, { home: ps[2] })!.id);
  });

  it('tiers: up before failing before standby; down-and-unhealthy only when nothing else', () => {
    const ps = paths(3);
    const c = { next: 0 };
    ps[0]!.connectionLost('x');
    ps[0]!.healthy();
    ps[0]!.connectionLost('x'); // second failure in the window: held down
    ps[0]!.healthy(); // standby
    ps[1]!.failed(true, 't'); // failing
    expect(selectPath(ps, 'round-robin', c)!.id).toBe('p2');
    ps[2]!.connectionLost('x');
    expect(selectPath(ps, 'round-robin', c)!.id).toBe('p1');
    ps[1]!.connectionLost('x');
    expect(ps[0]!.standby).toBe(true);
    expect(selectPath(ps, 'round-robin', c)!.id).toBe('p0');
    expect(selectPath([], 'round-robin', c)).toBeUndefined();
  });

  it('VMs spread over the paths of a node', () => {
    const np = new NodePaths({ node: 'n', addresses: ['127.0.0.1:1', '127.0.0.2:1', '127.0.0.3:1'], policy: pathPolicy(), logger: log, prober: async () => {} });
    const homes = ['a', 'b', 'c', 'd', 'e', 'f'].map((vm) => np.assignHome(vm).id);
    expect(new Set(homes.slice(0, 3)).size).toBe(3);
    expect(np.paths.map((p) => p.homes.size)).toEqual([2, 2, 2]);
    expect(np.assignHome('a').id).toBe(homes[0]);
  });

  it('one path per address and source; unix sockets have no source', () => {
    const np = new NodePaths({ node: 'n', addresses: ['127.0.0.1:1', 'unix:/x.sock'], policy: pathPolicy({ sources: ['127.0.0.2', '127.0.0.3'] }), logger: log, prober: async () => {} });
    expect(np.paths.map((p) => p.id)).toEqual(['127.0.0.1:1@127.0.0.2', '127.0.0.1:1@127.0.0.3', 'unix:/x.sock']);
  });
});
