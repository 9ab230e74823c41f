// LockManager: POSIX record locks against a per-byte model (fast-check), waiters, deadlocks,
// flock conversion and session cleanup.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { LOCK_EOF, LockManager, type LockOwner } from '../../../lib/fs/locks.js';
import { F_RDLCK, F_UNLCK, F_WRLCK } from '../../../lib/fs/tree.js';
import { errno } from './helpers.js';

const SIZE = 24; // bytes modelled, plus one cell (index SIZE) standing for every byte from SIZE to EOF
const owners: LockOwner[] = [
  { session: 'a', owner: 1n, pid: 10 },
  { session: 'a', owner: 2n, pid: 20 },
  { session: 'b', owner: 1n, pid: 30 }, // same owner number, other session: a different owner
];

type Model = Map<number, number>[]; // per cell: owner index -> type

function modelConflict(m: Model, who: number, start: number, end: number, type: number): boolean {
  for (let i = start; i <= Math.min(end, SIZE); i++) {
    for (const [o, t] of m[i]!) if (o !== who && (t === F_WRLCK || type === F_WRLCK)) return true;
  }
  return false;
}

const op = fc.record({
  kind: fc.constantFrom('set', 'set', 'set', 'get', 'flush'),
  who: fc.integer({ min: 0, max: owners.length - 1 }),
  start: fc.integer({ min: 0, max: SIZE - 1 }),
  len: fc.integer({ min: 1, max: SIZE }),
  eof: fc.boolean(),
  type: fc.constantFrom(F_RDLCK, F_WRLCK, F_UNLCK),
});

describe('LockManager', () => {
  it('POSIX locks agree with a per-byte model (set/unlock/getlk/flush, split and merge)', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(op, { maxLength: 60 }), async (ops) => {
        const lm = new LockManager();
        const m: Model = Array.from({ length: SIZE + 1 }, () => new Map());
        for (const o of ops) {
          const end = o.eof ? LOCK_EOF : Math.min(o.start + o.len - 1, SIZE - 1);
          const mEnd = Math.min(end, SIZE);
          const who = owners[o.who]!;
          if (o.kind === 'flush') {
            lm.releaseOwner('f', who.session, who.owner);
            for (const b of m) b.delete(o.who);
          } else if (o.kind === 'get') {
            const type = o.type === F_UNLCK ? F_WRLCK : o.type;
            const r = lm.getlk('f', who, { start: o.start, end, type, pid: who.pid });
            const conflict = modelConflict(m, o.who, o.start, end, type);
            expect(r.type !== F_UNLCK).toBe(conflict);
            if (conflict) {
              // The answer is a real conflicting lock of another owner, overlapping the request.
              expect(r.start <= end && o.start <= r.end).toBe(true);
              const holder = owners.findIndex((x) => x.pid === r.pid);
              expect(holder).not.toBe(o.who);
              for (let i = r.start; i <= Math.min(r.end, SIZE); i++) expect(m[i]!.get(holder)).toBe(r.type);
            }
          } else {
            const got = await errno(lm.setlk('f', who, { start: o.start, end, type: o.type, pid: who.pid }));
            const conflict = o.type !== F_UNLCK && modelConflict(m, o.who, o.start, end, o.type);
            expect(got).toBe(conflict ? 'EAGAIN' : 'OK');
            const failed = conflict;
            if (!failed) {
              for (let i = o.start; i <= mEnd; i++) {
                if (o.type === F_UNLCK) m[i]!.delete(o.who);
                else m[i]!.set(o.who, o.type);
              }
            }
          }
          // The lock table equals the model byte for byte, and each owner's locks are merged:
          // no two of one owner overlap or touch with the same type.
          const held = lm.posixLocks('f');
          for (let i = 0; i <= SIZE; i++) {
            const here = new Map<number, number>();
            for (const l of held) {
              if (l.start <= i && i <= l.end) {
                const idx = owners.findIndex((x) => x.session === l.session && x.owner === l.owner);
                expect(here.has(idx)).toBe(false);
                here.set(idx, l.type);
              }
            }
            expect([i, [...here].sort()]).toEqual([i, [...m[i]!].sort()]);
          }
          for (let k = 0; k < owners.length; k++) {
            const mine = held.filter((l) => l.session === owners[k]!.session && l.owner === owners[k]!.owner).sort((x, y) => x.start - y.start);
            for (let j = 1; j < mine.length; j++) {
              expect(mine[j - 1]!.end < mine[j]!.start).toBe(true);
              if (mine[j - 1]!.type === mine[j]!.type) expect(mine[j - 1]!.end + 1 < mine[j]!.start).toBe(true);
            }
          }
        }
        lm.endSession('a');
        lm.endSession('b');
        expect(lm.fileCount).toBe(0);
      }),
      { numRuns: 300 },
    );
  });

  it('a conflicting non-waiting setlk fails with EAGAIN and changes nothing', async () => {
    const lm = new LockManager();
    await lm.setlk('f', owners[0]!, { start: 0, end: 9, type: F_RDLCK, pid: 10 });
    await lm.setlk('f', owners[1]!, { start: 5, end: 15, type: F_RDLCK, pid: 20 });
    expect(await errno(lm.setlk('f', owners[2]!, { start: 8, end: 8, type: F_WRLCK, pid: 30 }))).toBe('EAGAIN');
    expect(lm.posixLocks('f').length).toBe(2);
    expect(await errno(lm.setlk('f', owners[2]!, { start: 5, end: 4, type: F_WRLCK, pid: 30 }))).toBe('EINVAL');
    expect(await errno(lm.setlk('f', owners[2]!, { start: 0, end: 4, type: 7, pid: 30 }))).toBe('EINVAL');
  });

  it('SETLKW waiters are granted in order as locks go, and abort with EINTR', async () => {
    const lm = new LockManager();
    const order: string[] = [];
    await lm.setlk('f', owners[0]!, { start: 0, end: LOCK_EOF, type: F_WRLCK, pid: 10 });
    const w1 = lm.setlk('f', owners[1]!, { start: 0, end: 9, type: F_WRLCK, pid: 20 }, { wait: true }).then(() => order.push('w1'));
    const w2 = lm.setlk('f', owners[2]!, { start: 5, end: 5, type: F_RDLCK, pid: 30 }, { wait: true }).then(() => order.push('w2'));
    const ac = new AbortController();
    const w3 = lm.setlk('f', owners[2]!, { start: 50, end: 60, type: F_WRLCK, pid: 30 }, { wait: true, signal: ac.signal });
    ac.abort();
    expect(await errno(w3)).toBe('EINTR');
    // Giving back [0, 9] lets w1 in; w2 ([5]) then conflicts with w1's write lock.
    await lm.setlk('f', owners[0]!, { start: 0, end: 9, type: F_UNLCK, pid: 10 });
    await w1;
    await new Promise((r) => setTimeout(r, 5));
    expect(order).toEqual(['w1']);
    lm.releaseOwner('f', 'a', 2n);
    await w2;
    expect(order).toEqual(['w1', 'w2']);
    // Bounded queue.
    const small = new LockManager({ maxWaitersPerFile: 1 });
    await small.setlk('g', owners[0]!, { start: 0, end: 0, type: F_WRLCK, pid: 1 });
    const q = small.setlk('g', owners[1]!, { start: 0, end: 0, type: F_WRLCK, pid: 2 }, { wait: true });
    expect(await errno(small.setlk('g', owners[2]!, { start: 0, end: 0, type: F_WRLCK, pid: 3 }, { wait: true }))).toBe('ENOLCK');
    small.endSession('a');
    await q.catch(() => {});
  });

  it('detects a deadlock cycle across files (EDEADLK) and not a mere wait', async () => {
    const lm = new LockManager();
    const [A, B, C] = owners as [LockOwner, LockOwner, LockOwner];
    await lm.setlk('f1', A, { start: 0, end: 0, type: F_WRLCK, pid: 1 });
    await lm.setlk('f2', B, { start: 0, end: 0, type: F_WRLCK, pid: 2 });
    await lm.setlk('f3', C, { start: 0, end: 0, type: F_WRLCK, pid: 3 });
    const aw = lm.setlk('f2', A, { start: 0, end: 0, type: F_WRLCK, pid: 1 }, { wait: true }); // A waits for B
    const bw = lm.setlk('f3', B, { start: 0, end: 0, type: F_WRLCK, pid: 2 }, { wait: true }); // B waits for C
    // C waiting for A closes A -> B -> C -> A.
    expect(await errno(lm.setlk('f1', C, { start: 0, end: 0, type: F_WRLCK, pid: 3 }, { wait: true }))).toBe('EDEADLK');
    lm.endSession('b'); // C goes: B gets f3, then B still holds f2... release B's locks too
    await bw;
    lm.releaseOwner('f2', B.session, B.owner);
    lm.releaseOwner('f3', B.session, B.owner);
    await aw;
    expect(lm.posixLocks('f2')).toMatchObject([{ session: 'a', owner: 1n }]);
  });

  it('flock: shared/exclusive between handles, conversion, release of the handle, end of session', async () => {
    const lm = new LockManager();
    await lm.flock('f', 's1', 1, F_RDLCK);
    await lm.flock('f', 's2', 1, F_RDLCK);
    expect(await errno(lm.flock('f', 's1', 2, F_WRLCK))).toBe('EAGAIN');
    // Upgrade of s1/1 while s2/1 shares: dropped first (as Linux), then waits.
    let up = false;
    const upgrade = lm.flock('f', 's1', 1, F_WRLCK, { wait: true }).then(() => (up = true));
    await new Promise((r) => setTimeout(r, 5));
    expect(up).toBe(false);
    expect(lm.flocks('f')).toEqual([{ session: 's2', fh: 1, type: F_RDLCK }]);
    lm.releaseHandle('f', 's2', 1);
    await upgrade;
    expect(lm.flocks('f')).toEqual([{ session: 's1', fh: 1, type: F_WRLCK }]);
    // Downgrade never waits.
    await lm.flock('f', 's1', 1, F_RDLCK);
    await lm.flock('f', 's2', 9, F_RDLCK);
    const ex = lm.flock('f', 's3', 1, F_WRLCK, { wait: true });
    lm.endSession('s1');
    lm.endSession('s2');
    await ex;
    expect(lm.flocks('f')).toEqual([{ session: 's3', fh: 1, type: F_WRLCK }]);
    // Waits of a released handle end with EINTR.
    const w = lm.flock('f', 's4', 1, F_RDLCK, { wait: true });
    lm.releaseHandle('f', 's4', 1);
    expect(await errno(w)).toBe('EINTR');
    lm.clear();
    expect(lm.fileCount).toBe(0);
  });
});
