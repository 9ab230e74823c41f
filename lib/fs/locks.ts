/**
 * File locks of a FileTree, pure logic (no fds, no timers): POSIX record locks and BSD flocks,
 * kept by the tree instead of the host kernel. virtiofsd answers locks with ENOSYS; taking them
 * on the host fds would not work either, because every lock of one share is then owned by the
 * one daemon process (POSIX locks of one process never conflict) and a restarted daemon would
 * lose them. Here a lock belongs to (session, lock owner) — the guest kernel's owner id — so two
 * VMs sharing a directory on one node see each other's locks.
 *
 * Files are identified by a string key (the tree's inode key, e.g. "dev:ino"), not by node id:
 * a node forgotten and looked up again is the same file with the same locks.
 *
 * Semantics follow Linux's fs/locks.c:
 * - POSIX: locks of one owner never conflict with each other; a new lock replaces the owner's
 *   locks in its range (splitting them) and merges with adjacent or overlapping ones of the same
 *   type. A read lock conflicts with another owner's write lock, a write lock with any lock of
 *   another owner. SETLKW waits in a FIFO per file; when locks change, waiters are granted in
 *   order, each as soon as it no longer conflicts. A wait that would close a cycle of owners
 *   waiting on each other fails with EDEADLK.
 * - flock: whole-file, per (session, fh) (one open file description). Converting a lock drops the
 *   old one first, then takes the new one (possibly waiting), as Linux does: two shared holders
 *   upgrading at once would otherwise deadlock.
 * - A waiter's AbortSignal (FUSE_INTERRUPT) rejects the wait with EINTR.
 * - Queues are bounded: at most `maxWaitersPerFile` waiters per file (ENOLCK beyond).
 */
import { FsError } from './errors.js';
import { F_RDLCK, F_UNLCK, F_WRLCK, type FileLock } from './tree.js';

/** The end of a lock "to end of file" (FileLock.end). */
export const LOCK_EOF = Number.MAX_SAFE_INTEGER;

/** Who holds a POSIX lock: the guest kernel's lock owner within a session, and the pid reported by F_GETLK. */
export interface LockOwner {
  session: string;
  owner: bigint;
  pid: number;
}

/** One held POSIX lock (inclusive range). */
export interface HeldLock {
  session: string;
  owner: bigint;
  pid: number;
  start: number;
  end: number;
  type: number;
}

interface Waiter {
  kind: 'posix' | 'flock';
  file: string;
  session: string;
  /** posix: the owner key; flock: the holder key. */
  key: string;
  owner?: LockOwner;
  start: number;
  end: number;
  type: number;
  resolve: () => void;
  reject: (e: Error) => void;
  signal?: AbortSignal;
  onAbort?: () => void;
}

interface FlockHolder {
  session: string;
  type: number;
}

interface FileLocks {
  posix: HeldLock[];
  flocks: Map<string, FlockHolder>;
  waiters: Waiter[];
}

function ownerKey(session: string, owner: bigint): string {
  return `${session}\u0000${owner}`;
}

function holderKey(session: string, fh: number): string {
  return `${session}\u0000${fh}`;
}

function overlaps(a: { start: number; end: number }, b: { start: number; end: number }): boolean {
  return a.start <= b.end && b.start <= a.end;
}

function checkLock(lock: FileLock): void {
  if (
    !Number.isSafeInteger(lock.start) || !Number.isSafeInteger(lock.end) ||
    lock.start < 0 || lock.end < lock.start ||
    (lock.type !== F_RDLCK && lock.type !== F_WRLCK && lock.type !== F_UNLCK)
  ) {
    throw new FsError('EINVAL', `bad lock range or type ${lock.start}..${lock.end} type ${lock.type}`);
  }
}

export interface LockManagerOptions {
  /** Bound on queued SETLKW/flock waiters per file (default 1024): ENOLCK beyond. */
  maxWaitersPerFile?: number;
}

export class LockManager {
  private readonly files = new Map<string, FileLocks>();
  /** Pending POSIX waiters by owner key (for deadlock detection across files). */
  private readonly waitingOwners = new Map<string, Set<Waiter>>();
  private readonly maxWaiters: number;

  constructor(opts: LockManagerOptions = {}) {
    this.maxWaiters = opts.maxWaitersPerFile ?? 1024;
  }

  /** The first lock (lowest start) of another owner that conflicts with `lock`, or `lock` with type F_UNLCK. */
  getlk(file: string, owner: LockOwner, lock: FileLock): FileLock {
    checkLock(lock);
    if (lock.type === F_UNLCK) throw new FsError('EINVAL', 'F_GETLK of an unlock');
    const c = this.conflict(file, ownerKey(owner.session, owner.owner), lock.start, lock.end, lock.type);
    if (!c) return { start: lock.start, end: lock.end, type: F_UNLCK, pid: 0 };
    return { start: c.start, end: c.end, type: c.type, pid: c.pid };
  }

  /**
   * Takes (F_RDLCK/F_WRLCK) or releases (F_UNLCK) a POSIX lock on [start, end]. Without `wait`
   * a conflict fails with EAGAIN; with it the promise resolves once granted (EDEADLK if waiting
   * would deadlock, EINTR when `signal` aborts).
   */
  setlk(file: string, owner: LockOwner, lock: FileLock, opts: { wait?: boolean; signal?: AbortSignal } = {}): Promise<void> {
    try {
      checkLock(lock);
      const key = ownerKey(owner.session, owner.owner);
      if (lock.type === F_UNLCK) {
        const f = this.files.get(file);
        if (f) {
          this.apply(f, key, owner, lock.start, lock.end, F_UNLCK);
          this.wake(file);
        }
        return Promise.resolve();
      }
      if (!this.conflict(file, key, lock.start, lock.end, lock.type)) {
        const f = this.file(file);
        this.apply(f, key, owner, lock.start, lock.end, lock.type);
        // A write lock turned read, or a range given back, may let waiters in.
        this.wake(file);
        return Promise.resolve();
      }
      if (!opts.wait) return Promise.reject(new FsError('EAGAIN', 'conflicting lock'));
      if (this.wouldDeadlock(file, key, lock.start, lock.end, lock.type)) {
        return Promise.reject(new FsError('EDEADLK', 'waiting would deadlock'));
      }
      return this.enqueue({ kind: 'posix', file, session: owner.session, key, owner, start: lock.start, end: lock.end, type: lock.type }, opts.signal);
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /** BSD flock of the whole file by one handle (F_RDLCK shared, F_WRLCK exclusive, F_UNLCK release). */
  flock(file: string, session: string, fh: number, type: number, opts: { wait?: boolean; signal?: AbortSignal } = {}): Promise<void> {
    if (type !== F_RDLCK && type !== F_WRLCK && type !== F_UNLCK) {
      return Promise.reject(new FsError('EINVAL', `bad flock type ${type}`));
    }
    const key = holderKey(session, fh);
    const f = this.files.get(file);
    const held = f?.flocks.get(key);
    if (held && held.type === type) return Promise.resolve();
    if (held) {
      // Conversion: drop first (Linux), then take the new type below.
      f!.flocks.delete(key);
      this.wake(file);
    }
    if (type === F_UNLCK) {
      this.cleanup(file);
      return Promise.resolve();
    }
    if (!this.flockConflict(file, key, type)) {
      this.file(file).flocks.set(key, { session, type });
      return Promise.resolve();
    }
    if (!opts.wait) {
      this.cleanup(file);
      return Promise.reject(new FsError('EAGAIN', 'file is flocked'));
    }
    return this.enqueue({ kind: 'flock', file, session, key, start: 0, end: LOCK_EOF, type }, opts.signal);
  }

  /** flush(lockOwner): every POSIX lock of the owner on the file goes (close(2) semantics). */
  releaseOwner(file: string, session: string, owner: bigint): void {
    const f = this.files.get(file);
    if (!f) return;
    const key = ownerKey(session, owner);
    const before = f.posix.length;
    f.posix = f.posix.filter((l) => ownerKey(l.session, l.owner) !== key);
    if (f.posix.length !== before) this.wake(file);
    else this.cleanup(file);
  }

  /** release of a handle: its flock goes, and its flock waits end with EINTR. */
  releaseHandle(file: string, session: string, fh: number): void {
    const f = this.files.get(file);
    if (!f) return;
    const key = holderKey(session, fh);
    for (const w of [...f.waiters]) {
      if (w.kind === 'flock' && w.key === key) this.dropWaiter(w, new FsError('EINTR', 'handle released'));
    }
    if (f.flocks.delete(key)) this.wake(file);
    else this.cleanup(file);
  }

  /** Everything of a session goes: its locks, flocks and waits (EINTR). */
  endSession(session: string): void {
    for (const [file, f] of [...this.files]) {
      for (const w of [...f.waiters]) {
        if (w.session === session) this.dropWaiter(w, new FsError('EINTR', 'session ended'));
      }
      f.posix = f.posix.filter((l) => l.session !== session);
      for (const [k, h] of [...f.flocks]) if (h.session === session) f.flocks.delete(k);
      this.wake(file);
    }
  }

  /** Rejects every wait (EINTR) and forgets every lock: the tree is closing. */
  clear(): void {
    for (const f of [...this.files.values()]) {
      for (const w of [...f.waiters]) this.dropWaiter(w, new FsError('EINTR', 'tree closed'));
    }
    this.files.clear();
    this.waitingOwners.clear();
  }

  /** The POSIX locks held on a file, sorted by start (for tests and status). */
  posixLocks(file: string): HeldLock[] {
    return [...(this.files.get(file)?.posix ?? [])].sort((a, b) => a.start - b.start || (a.owner < b.owner ? -1 : 1));
  }

  /** The flocks held on a file: holder (session, fh) and type. */
  flocks(file: string): { session: string; fh: number; type: number }[] {
    return [...(this.files.get(file)?.flocks ?? [])].map(([k, h]) => ({ session: h.session, fh: Number(k.slice(k.lastIndexOf('\u0000') + 1)), type: h.type }));
  }

  /** Number of files with any lock state (bounded-memory checks in tests). */
  get fileCount(): number {
    return this.files.size;
  }

  // ---- internals ----

  private file(file: string): FileLocks {
    let f = this.files.get(file);
    if (!f) {
      f = { posix: [], flocks: new Map(), waiters: [] };
      this.files.set(file, f);
    }
    return f;
  }

  private cleanup(file: string): void {
    const f = this.files.get(file);
    if (f && f.posix.length === 0 && f.flocks.size === 0 && f.waiters.length === 0) this.files.delete(file);
  }

  private conflict(file: string, key: string, start: number, end: number, type: number): HeldLock | undefined {
    const f = this.files.get(file);
    if (!f) return undefined;
    let best: HeldLock | undefined;
    for (const l of f.posix) {
      if (ownerKey(l.session, l.owner) === key) continue;
      if (!overlaps(l, { start, end })) continue;
      if (l.type !== F_WRLCK && type !== F_WRLCK) continue;
      if (!best || l.start < best.start) best = l;
    }
    return best;
  }

  private flockConflict(file: string, key: string, type: number): boolean {
    const f = this.files.get(file);
    if (!f) return false;
    for (const [k, h] of f.flocks) {
      if (k !== key && (h.type === F_WRLCK || type === F_WRLCK)) return true;
    }
    return false;
  }

  /** Sets the owner's lock state on [start, end] to `type` (F_UNLCK removes), splitting and merging. */
  private apply(f: FileLocks, key: string, owner: LockOwner, start: number, end: number, type: number): void {
    const others: HeldLock[] = [];
    let mine: HeldLock[] = [];
    for (const l of f.posix) {
      if (ownerKey(l.session, l.owner) !== key) others.push(l);
      else mine.push(l);
    }
    const kept: HeldLock[] = [];
    for (const l of mine) {
      if (!overlaps(l, { start, end })) {
        kept.push(l);
        continue;
      }
      if (l.start < start) kept.push({ ...l, end: start - 1 });
      if (l.end > end) kept.push({ ...l, start: end + 1 });
    }
    if (type !== F_UNLCK) kept.push({ session: owner.session, owner: owner.owner, pid: owner.pid, start, end, type });
    kept.sort((a, b) => a.start - b.start);
    mine = [];
    for (const l of kept) {
      const last = mine[mine.length - 1];
      // end + 1 of LOCK_EOF is 2^53, still exact.
      if (last && last.type === l.type && last.end + 1 >= l.start) {
        if (l.end > last.end) last.end = l.end;
        if (l.type === type) last.pid = owner.pid;
      } else {
        mine.push({ ...l });
      }
    }
    f.posix = others.concat(mine);
  }

  private enqueue(w: Omit<Waiter, 'resolve' | 'reject'>, signal?: AbortSignal): Promise<void> {
    if (signal?.aborted) return Promise.reject(new FsError('EINTR', 'interrupted'));
    const f = this.file(w.file);
    if (f.waiters.length >= this.maxWaiters) {
      this.cleanup(w.file);
      return Promise.reject(new FsError('ENOLCK', `more than ${this.maxWaiters} lock waiters on one file`));
    }
    return new Promise<void>((resolve, reject) => {
      const waiter = w as Waiter;
      waiter.resolve = resolve;
      waiter.reject = reject;
      if (signal) {
        waiter.signal = signal;
        waiter.onAbort = () => this.dropWaiter(waiter, new FsError('EINTR', 'interrupted'));
        signal.addEventListener('abort', waiter.onAbort, { once: true });
      }
      f.waiters.push(waiter);
      if (waiter.kind === 'posix') {
        let set = this.waitingOwners.get(waiter.key);
        if (!set) this.waitingOwners.set(waiter.key, (set = new Set()));
        set.add(waiter);
      }
    });
  }

  private unlinkWaiter(w: Waiter): void {
    const f = this.files.get(w.file);
    if (f) {
      const i = f.waiters.indexOf(w);
      if (i >= 0) f.waiters.splice(i, 1);
    }
    if (w.signal && w.onAbort) w.signal.removeEventListener('abort', w.onAbort);
    if (w.kind === 'posix') {
      const set = this.waitingOwners.get(w.key);
      set?.delete(w);
      if (set?.size === 0) this.waitingOwners.delete(w.key);
    }
  }

  private dropWaiter(w: Waiter, err: Error): void {
    const f = this.files.get(w.file);
    if (!f || !f.waiters.includes(w)) return;
    this.unlinkWaiter(w);
    w.reject(err);
    // A waiter gone may unblock nobody, but an empty file record must not linger.
    this.cleanup(w.file);
  }

  /** Grants waiters of a file in FIFO order, each as soon as it no longer conflicts, until none can be. */
  private wake(file: string): void {
    const f = this.files.get(file);
    if (!f) return;
    let granted = true;
    while (granted) {
      granted = false;
      for (const w of [...f.waiters]) {
        if (w.kind === 'posix') {
          if (this.conflict(file, w.key, w.start, w.end, w.type)) continue;
          this.unlinkWaiter(w);
          this.apply(f, w.key, w.owner!, w.start, w.end, w.type);
        } else {
          if (this.flockConflict(file, w.key, w.type)) continue;
          this.unlinkWaiter(w);
          f.flocks.set(w.key, { session: w.session, type: w.type });
        }
        w.resolve();
        granted = true;
      }
    }
    this.cleanup(file);
  }

  /**
   * Would `key` waiting for [start, end] close a cycle? Follows "waits for" edges: from the
   * owners holding conflicting locks, through the locks their own pending waits conflict with,
   * looking for `key` (Linux's posix_locks_deadlock, generalised to every blocker).
   */
  private wouldDeadlock(file: string, key: string, start: number, end: number, type: number): boolean {
    const seen = new Set<string>();
    const stack = this.blockers(file, key, start, end, type);
    while (stack.length > 0) {
      const o = stack.pop()!;
      if (o === key) return true;
      if (seen.has(o)) continue;
      seen.add(o);
      for (const w of this.waitingOwners.get(o) ?? []) stack.push(...this.blockers(w.file, o, w.start, w.end, w.type));
    }
    return false;
  }

  private blockers(file: string, key: string, start: number, end: number, type: number): string[] {
    const f = this.files.get(file);
    if (!f) return [];
    const out: string[] = [];
    for (const l of f.posix) {
      const k = ownerKey(l.session, l.owner);
      if (k !== key && overlaps(l, { start, end }) && (l.type === F_WRLCK || type === F_WRLCK)) out.push(k);
    }
    return out;
  }
}
