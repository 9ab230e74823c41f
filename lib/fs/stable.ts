/**
 * `StableIdFileTree`: node ids and file handles of its own, mapped to the tree below, and a
 * record of how to find each again — so that the ids and handles a guest holds survive a change
 * of the tree below, namely the daemon's live handoff to a new process (lib/daemon/handoff.ts):
 * the old process `snapshot()`s the table, the new one `StableIdFileTree.restore(inner, snap)`s
 * it over a fresh tree, and the guest's next request names the same ids and handles.
 *
 * What is remembered, per session (a FUSE session is one guest connection; the trees below key
 * lookups and handles by session, so the table does too):
 * - for each node id: (parent id, name), the inode number it had, and its lookup count;
 * - for each handle: (node id, open flags, file or directory).
 * Paths are kept as parent ids, not strings, so a rename of a directory changes one record and
 * its descendants follow. Renames, unlinks and rmdirs done through this layer keep the records
 * right; hard links keep the first name that still exists.
 *
 * Restore re-resolves every id from the root (one lookup per node, parents first) and re-opens
 * every handle (without O_CREAT, O_EXCL, O_TRUNC; O_APPEND and the access mode kept), under the
 * same session name. Limits (answered ESTALE after a restore, and only then):
 * - a node whose name is gone: an unlinked file still open, a directory removed with its handle
 *   open (the data of an unlinked-but-open file lives only in the old process's descriptor);
 * - a name that now leads elsewhere (renamed or replaced by someone else: the inode differs);
 * - a node whose parent was forgotten while it was not (the kernel pins parents, so rare).
 * Locks: the POSIX and flock locks granted below are mirrored here (lib/fs/locks.ts, used only
 * for its range arithmetic: one table entry per owner, so nothing conflicts in the mirror), and
 * taken again after a restore — waiting (SETLKW), since on a storage node the old process's
 * session holds them until it lets go. A lock operation of the guest on the same owner or handle
 * first cancels such a pending retake. A retake that fails (the file is gone) is lost.
 * A directory listing continues at its cookie on the re-opened handle (cookies are the inner
 * tree's: d_off of the host file system, stable across opens on ext4/xfs/tmpfs).
 *
 * Cost per request: one Map lookup per id or handle in it (the record holds the inner id and
 * session). Lookup-like answers add a record or a count, and a name index entry.
 */
import { FsError } from './errors.js';
import type { SessionForget } from './layer.js';
import { LOCK_EOF, LockManager } from './locks.js';
import {
  ROOT_ID,
  RENAME_EXCHANGE,
  type Attr,
  type CreateResult,
  type DirEntry,
  type DirEntryPlus,
  type Entry,
  type FileLock,
  type FileTree,
  type FsContext,
  type OpenResult,
  type SetAttr,
  type StatFs,
} from './tree.js';

const O_CREAT = 0o100;
const O_EXCL = 0o200;
const O_TRUNC = 0o1000;

interface NodeRec {
  id: number;
  /** The inner tree's id; 0 once stale (after a restore that could not find it). */
  inner: number;
  session: string;
  /** Parent id (ours) and name; name null when the name is gone (unlinked, replaced). */
  parent: number;
  name: Buffer | null;
  ino: number;
  /** Lookups the guest holds (FUSE nlookup). */
  lookups: number;
  /** Lookups this layer holds on the inner id (given back with forget when `lookups` reaches 0). */
  held: number;
}

interface HandleRec {
  fh: number;
  inner: number;
  node: number;
  session: string;
  flags: number;
  dir: boolean;
  /** Could not be re-opened after a restore. */
  stale: boolean;
  /**
   * Directories: the last batch of entries handed out (the engine may send only a prefix of a
   * READDIRPLUS batch, so the kernel continues at any of them). Cookies are the inner handle's
   * own (LocalFileTree maps ext4's 63-bit hashes per handle), so after a restore the first
   * listing call that continues at one of these cookies is translated: the new handle is listed
   * from the start to that entry's name, and goes on from there (`translate`: set by restore).
   */
  recent?: readonly DirEntry[];
  translate?: boolean;
}

/** One session's index: inner id -> record (a node looked up twice is one id), name -> record. */
interface SessionIndex {
  byInner: Map<number, NodeRec>;
  byName: Map<string, NodeRec>;
}

/** The table as plain data (JSON-safe: names in base64). */
export interface StableSnapshot {
  version: 1;
  nextId: number;
  nextFh: number;
  nodes: Array<{ id: number; session: string; parent: number; name: string | null; ino: number; lookups: number }>;
  handles: Array<{ fh: number; node: number; session: string; flags: number; dir: boolean; recent?: Array<[cookie: number, name: string]> }>;
  /** Locks held by the guest (owner as a decimal string; a flock names its handle). */
  locks?: Array<{ node: number; session: string; owner: string; pid: number; start: number; end: number; type: number; flockFh?: number }>;
}

export interface RestoreReport {
  nodes: number;
  handles: number;
  /** Ids and handles that answer ESTALE from now on. */
  staleNodes: number;
  staleHandles: number;
  /** Locks being taken again (see `relocked`), and those without a handle to take them on. */
  locks: number;
  lostLocks: number;
}

/** A lock holder in the mirror: a POSIX owner on a node, or a flock's handle. */
interface LockKey {
  node: number;
  session: string;
  owner: bigint;
  flockFh?: number;
}

function nameKey(parent: number, name: Buffer): string {
  // latin1 maps bytes 1:1 to code units: a name that is not UTF-8 keeps its identity.
  return `${parent}/${name.toString('latin1')}`;
}

function holderKey(k: LockKey): string {
  return k.flockFh !== undefined ? `f\0${k.session}\0${k.flockFh}` : `p\0${k.session}\0${k.node}\0${k.owner}`;
}

function isDots(n: Buffer): boolean {
  return n[0] === 0x2e && (n.length === 1 || (n.length === 2 && n[1] === 0x2e));
}

function estale(what: string): FsError {
  return new FsError('ESTALE', `${what}: not found again after the daemon's handoff`);
}

export class StableIdFileTree implements FileTree {
  private readonly nodes = new Map<number, NodeRec>();
  private readonly handles = new Map<number, HandleRec>();
  private readonly sessions = new Map<string, SessionIndex>();
  private nextId = ROOT_ID + 1;
  private nextFh = 1;
  /** The guest's granted locks, one mirror "file" per holder (see the file comment). */
  private readonly lockMirror = new LockManager();
  private readonly lockHolders = new Map<string, LockKey>();
  /** Retakes after a restore still waiting, by holder key. */
  private readonly retakes = new Map<string, { ac: AbortController; done: Promise<void> }>();
  /** Settles when every lock retaken after a restore is held or given up. */
  relocked: Promise<void> = Promise.resolve();

  constructor(readonly inner: FileTree) {}

  /** Ids and handles now in the table (status, tests). */
  get size(): { nodes: number; handles: number } {
    return { nodes: this.nodes.size, handles: this.handles.size };
  }

  // ---- translation ------------------------------------------------------------------------

  private index(session: string): SessionIndex {
    let s = this.sessions.get(session);
    if (!s) {
      s = { byInner: new Map(), byName: new Map() };
      this.sessions.set(session, s);
    }
    return s;
  }

  /** Our id -> the inner id, for this session (ENOENT for an id it was not given). */
  private id(ctx: FsContext, nodeId: number): number {
    if (nodeId === ROOT_ID) return ROOT_ID;
    const n = this.nodes.get(nodeId);
    if (!n || n.session !== ctx.session) throw new FsError('ENOENT', `unknown node id ${nodeId}`);
    if (n.inner === 0) throw estale(`node ${nodeId}`);
    return n.inner;
  }

  private fh(ctx: FsContext, fh: number): number {
    const h = this.handles.get(fh);
    if (!h || h.session !== ctx.session) throw new FsError('EBADF', `unknown handle ${fh}`);
    if (h.stale) throw estale(`handle ${fh}`);
    return h.inner;
  }

  /** Records a lookup-like answer of the inner tree (one lookup of e.nodeId) and rewrites its id. */
  private entry(ctx: FsContext, parent: number, name: Buffer, e: Entry): Entry {
    if (e.nodeId === 0) return e; // a negative entry: nothing looked up
    const idx = this.index(ctx.session);
    let n = idx.byInner.get(e.nodeId);
    if (n) {
      n.lookups++;
      n.held++;
      if (n.name === null) this.setName(idx, n, parent, name);
    } else {
      n = { id: this.nextId++, inner: e.nodeId, session: ctx.session, parent, name: null, ino: e.attr.ino, lookups: 1, held: 1 };
      this.nodes.set(n.id, n);
      idx.byInner.set(e.nodeId, n);
      this.setName(idx, n, parent, name);
    }
    return { ...e, nodeId: n.id };
  }

  private setName(idx: SessionIndex, n: NodeRec, parent: number, name: Buffer | null): void {
    if (n.name !== null) {
      const k = nameKey(n.parent, n.name);
      if (idx.byName.get(k) === n) idx.byName.delete(k);
    }
    n.parent = parent;
    n.name = name === null ? null : Buffer.from(name); // a view of the request frame must not be kept
    if (name !== null) {
      // Whoever had this name before has lost it (replaced behind our back, or a stale record).
      const k = nameKey(parent, name);
      const prev = idx.byName.get(k);
      if (prev && prev !== n) prev.name = null;
      idx.byName.set(k, n);
    }
  }

  /** The record that has (parent, name) in this session, if any. */
  private named(session: string, parent: number, name: Buffer): NodeRec | undefined {
    return this.sessions.get(session)?.byName.get(nameKey(parent, name));
  }

  private dropNode(n: NodeRec): void {
    this.nodes.delete(n.id);
    const idx = this.sessions.get(n.session);
    if (!idx) return;
    if (idx.byInner.get(n.inner) === n) idx.byInner.delete(n.inner);
    if (n.name !== null) {
      const k = nameKey(n.parent, n.name);
      if (idx.byName.get(k) === n) idx.byName.delete(k);
    }
  }

  private newHandle(ctx: FsContext, node: number, r: OpenResult, flags: number, dir: boolean): OpenResult {
    const fh = this.nextFh++;
    this.handles.set(fh, { fh, inner: r.fh, node, session: ctx.session, flags, dir, stale: false });
    return { ...r, fh };
  }

  // ---- snapshot / restore -------------------------------------------------------------------

  /** The table as plain data; take it while no request is in flight (the device is quiesced). */
  snapshot(): StableSnapshot {
    return {
      version: 1,
      nextId: this.nextId,
      nextFh: this.nextFh,
      nodes: [...this.nodes.values()].map((n) => ({
        id: n.id,
        session: n.session,
        parent: n.parent,
        name: n.inner === 0 || n.name === null ? null : n.name.toString('base64'),
        ino: n.ino,
        lookups: n.lookups,
      })),
      locks: [...this.lockHolders].flatMap(([k, h]) =>
        h.flockFh !== undefined
          ? this.lockMirror.flocks(k).map((f) => ({ node: h.node, session: h.session, owner: h.owner.toString(), pid: 0, start: 0, end: LOCK_EOF, type: f.type, flockFh: h.flockFh }))
          : this.lockMirror.posixLocks(k).map((l) => ({ node: h.node, session: h.session, owner: h.owner.toString(), pid: l.pid, start: l.start, end: l.end, type: l.type })),
      ),
      handles: [...this.handles.values()].map((h) => ({
        fh: h.fh,
        node: h.node,
        session: h.session,
        flags: h.flags,
        dir: h.dir,
        ...(h.recent?.length ? { recent: h.recent.map((e): [number, string] => [e.offset, e.name.toString('base64')]) } : {}),
      })),
    };
  }

  /**
   * Rebuilds a snapshot's table over `inner` (a fresh tree of the same directory): every id is
   * looked up again by its path from the root and checked to be the same inode, every handle is
   * opened again. What cannot be found answers ESTALE (see the file comment); the rest works as
   * before. Requests are issued with uid 0 under each record's own session.
   */
  static async restore(inner: FileTree, snap: StableSnapshot): Promise<{ tree: StableIdFileTree; report: RestoreReport }> {
    if (snap?.version !== 1) throw new Error('unknown snapshot version');
    const t = new StableIdFileTree(inner);
    t.nextId = snap.nextId;
    t.nextFh = snap.nextFh;
    const pending = new Map<number, StableSnapshot['nodes'][number]>();
    for (const n of snap.nodes) pending.set(n.id, n);
    let staleNodes = 0;
    // Parents first: resolve an id once its parent is resolved (or found stale).
    const resolveOne = async (s: StableSnapshot['nodes'][number]): Promise<void> => {
      const ctx: FsContext = { uid: 0, gid: 0, pid: 0, session: s.session };
      const rec: NodeRec = { id: s.id, inner: 0, session: s.session, parent: s.parent, name: null, ino: s.ino, lookups: s.lookups, held: 0 };
      t.nodes.set(s.id, rec);
      const idx = t.index(s.session);
      const parent = s.parent === ROOT_ID ? undefined : t.nodes.get(s.parent);
      const parentInner = s.parent === ROOT_ID ? ROOT_ID : parent && parent.session === s.session ? parent.inner : 0;
      if (s.name !== null && parentInner !== 0) {
        const name = Buffer.from(s.name, 'base64');
        try {
          const e = await inner.lookup(ctx, parentInner, name);
          if (e.attr.ino === s.ino && !idx.byInner.has(e.nodeId)) {
            rec.inner = e.nodeId;
            rec.held = 1;
            idx.byInner.set(e.nodeId, rec);
            t.setName(idx, rec, s.parent, name);
            return;
          }
          // Another file has the name now: give its lookup back.
          (inner.forget as SessionForget).call(inner, e.nodeId, 1, s.session);
        } catch {
          /* gone */
        }
      }
      staleNodes++;
    };
    const done = new Set<number>([ROOT_ID]);
    while (pending.size > 0) {
      const ready = [...pending.values()].filter((n) => done.has(n.parent) || !pending.has(n.parent));
      if (ready.length === 0) {
        // A cycle can only come from a corrupt snapshot: those ids are stale.
        for (const n of pending.values()) {
          t.nodes.set(n.id, { id: n.id, inner: 0, session: n.session, parent: n.parent, name: null, ino: n.ino, lookups: n.lookups, held: 0 });
          staleNodes++;
        }
        break;
      }
      for (const n of ready) pending.delete(n.id);
      // Siblings in parallel (a remote tree pays a round trip per lookup).
      await Promise.all(ready.map(resolveOne));
      for (const n of ready) done.add(n.id);
    }
    let staleHandles = 0;
    await Promise.all(
      snap.handles.map(async (h) => {
        const ctx: FsContext = { uid: 0, gid: 0, pid: 0, session: h.session };
        const rec: HandleRec = { fh: h.fh, inner: 0, node: h.node, session: h.session, flags: h.flags, dir: h.dir, stale: true };
        t.handles.set(h.fh, rec);
        const node = h.node === ROOT_ID ? ROOT_ID : t.nodes.get(h.node)?.inner ?? 0;
        if (node !== 0) {
          try {
            const flags = h.flags & ~(O_CREAT | O_EXCL | O_TRUNC);
            const r = h.dir ? await inner.opendir(ctx, node, flags) : await inner.open(ctx, node, flags);
            rec.inner = r.fh;
            rec.stale = false;
            if (h.dir && h.recent?.length) {
              rec.recent = h.recent.map(([offset, name]) => ({ name: Buffer.from(name, 'base64'), ino: 0, type: 0, offset }));
              rec.translate = true;
            }
            return;
          } catch {
            /* gone, or no longer allowed */
          }
        }
        staleHandles++;
      }),
    );
    // Locks: taken again on a handle of the same node and session, waiting for the old process's
    // session to let go of them (not awaited: the handoff commits meanwhile).
    let lostLocks = 0;
    const retakes: Promise<void>[] = [];
    for (const l of snap.locks ?? []) {
      const node = t.nodes.get(l.node);
      const h =
        l.flockFh !== undefined
          ? t.handles.get(l.flockFh)
          : [...t.handles.values()].find((x) => x.node === l.node && x.session === l.session && !x.dir && !x.stale);
      if (!node || node.inner === 0 || !h || h.stale) {
        lostLocks++;
        continue;
      }
      retakes.push(t.retake({ node: l.node, session: l.session, owner: BigInt(l.owner), ...(l.flockFh !== undefined ? { flockFh: l.flockFh } : {}) }, node.inner, h.inner, { start: l.start, end: l.end, type: l.type, pid: l.pid }));
    }
    t.relocked = Promise.all(retakes).then(() => {});
    const report = { nodes: snap.nodes.length, handles: snap.handles.length, staleNodes, staleHandles, locks: retakes.length, lostLocks };
    return { tree: t, report };
  }

  /** One lock taken again after a restore; a lock call of the guest on the same holder cancels it. */
  private retake(k: LockKey, innerNode: number, innerFh: number, lock: FileLock): Promise<void> {
    const key = holderKey(k);
    const ac = new AbortController();
    const ctx: FsContext = { uid: 0, gid: 0, pid: lock.pid, session: k.session };
    const prev = this.retakes.get(key)?.done ?? Promise.resolve();
    const done = prev
      .then(() => this.inner.setlk(ctx, innerNode, innerFh, k.owner, lock, { wait: true, flock: k.flockFh !== undefined, signal: ac.signal }))
      .then(
        () => this.mirror(k, lock),
        () => {
          /* cancelled by the guest, or the file or tree went away */
        },
      )
      .finally(() => {
        if (this.retakes.get(key)?.done === done) this.retakes.delete(key);
      });
    this.retakes.set(key, { ac, done });
    return done;
  }

  /** Before a lock call of the guest on this holder: no retake may be granted after it. */
  private async settleRetake(k: LockKey): Promise<void> {
    const r = this.retakes.get(holderKey(k));
    if (!r) return;
    r.ac.abort();
    await r.done;
  }

  /** Records a lock change granted below (best effort: the mirror never refuses, one holder per entry). */
  private mirror(k: LockKey, lock: FileLock): void {
    const key = holderKey(k);
    this.lockHolders.set(key, k);
    const p =
      k.flockFh !== undefined
        ? this.lockMirror.flock(key, k.session, k.flockFh, lock.type)
        : this.lockMirror.setlk(key, { session: k.session, owner: k.owner, pid: lock.pid }, lock);
    p.catch(() => {});
    this.pruneHolder(key);
  }

  private pruneHolder(key: string): void {
    if (!this.lockMirror.posixLocks(key).length && !this.lockMirror.flocks(key).length) this.lockHolders.delete(key);
  }

  /** close(2) of an owner's descriptor (flush) or the handle's release: what the tree below drops too. */
  private dropLocks(session: string, node: number, owner: bigint | undefined, flockFh: number | undefined): void {
    if (owner !== undefined) {
      const key = holderKey({ node, session, owner });
      if (this.lockHolders.has(key)) {
        this.lockMirror.releaseOwner(key, session, owner);
        this.pruneHolder(key);
      }
    }
    if (flockFh !== undefined) {
      for (const [key, h] of this.lockHolders) {
        if (h.flockFh === flockFh && h.session === session) {
          this.lockMirror.releaseHandle(key, session, flockFh);
          this.pruneHolder(key);
        }
      }
    }
  }

  // ---- FileTree ------------------------------------------------------------------------------

  async lookup(ctx: FsContext, parent: number, name: Buffer): Promise<Entry> {
    return this.entry(ctx, parent, name, await this.inner.lookup(ctx, this.id(ctx, parent), name));
  }

  /** The engine forgets without a session: the record knows whose lookups they are. */
  forget(nodeId: number, nlookup: number): void {
    const n = this.nodes.get(nodeId);
    if (!n || !(nlookup > 0)) return;
    n.lookups -= nlookup;
    if (n.lookups > 0) return;
    this.dropNode(n);
    if (n.inner !== 0 && n.held > 0) (this.inner.forget as SessionForget).call(this.inner, n.inner, n.held, n.session);
  }

  async getattr(ctx: FsContext, nodeId: number, fh?: number): Promise<{ attr: Attr; attrTtlMs?: number }> {
    return this.inner.getattr(ctx, this.id(ctx, nodeId), fh === undefined ? undefined : this.fh(ctx, fh));
  }
  async setattr(ctx: FsContext, nodeId: number, changes: SetAttr, fh?: number): Promise<{ attr: Attr; attrTtlMs?: number }> {
    return this.inner.setattr(ctx, this.id(ctx, nodeId), changes, fh === undefined ? undefined : this.fh(ctx, fh));
  }
  async readlink(ctx: FsContext, nodeId: number): Promise<Buffer> {
    return this.inner.readlink(ctx, this.id(ctx, nodeId));
  }
  async mknod(ctx: FsContext, parent: number, name: Buffer, mode: number, rdev: number): Promise<Entry> {
    return this.entry(ctx, parent, name, await this.inner.mknod(ctx, this.id(ctx, parent), name, mode, rdev));
  }
  async mkdir(ctx: FsContext, parent: number, name: Buffer, mode: number): Promise<Entry> {
    return this.entry(ctx, parent, name, await this.inner.mkdir(ctx, this.id(ctx, parent), name, mode));
  }
  async symlink(ctx: FsContext, parent: number, name: Buffer, target: Buffer): Promise<Entry> {
    return this.entry(ctx, parent, name, await this.inner.symlink(ctx, this.id(ctx, parent), name, target));
  }
  async unlink(ctx: FsContext, parent: number, name: Buffer): Promise<void> {
    await this.inner.unlink(ctx, this.id(ctx, parent), name);
    this.unname(ctx.session, parent, name);
  }
  async rmdir(ctx: FsContext, parent: number, name: Buffer): Promise<void> {
    await this.inner.rmdir(ctx, this.id(ctx, parent), name);
    this.unname(ctx.session, parent, name);
  }

  private unname(session: string, parent: number, name: Buffer): void {
    const n = this.named(session, parent, name);
    if (n) this.setName(this.index(session), n, n.parent, null);
  }

  async rename(ctx: FsContext, parent: number, name: Buffer, newParent: number, newName: Buffer, flags: number): Promise<void> {
    await this.inner.rename(ctx, this.id(ctx, parent), name, this.id(ctx, newParent), newName, flags);
    const idx = this.index(ctx.session);
    const from = this.named(ctx.session, parent, name);
    const to = this.named(ctx.session, newParent, newName);
    if (flags & RENAME_EXCHANGE) {
      if (from) this.setName(idx, from, parent, null);
      if (to) this.setName(idx, to, parent, name);
      if (from) this.setName(idx, from, newParent, newName);
      return;
    }
    if (to && to !== from) this.setName(idx, to, to.parent, null);
    if (from) this.setName(idx, from, newParent, newName);
  }

  async link(ctx: FsContext, nodeId: number, newParent: number, newName: Buffer): Promise<Entry> {
    return this.entry(ctx, newParent, newName, await this.inner.link(ctx, this.id(ctx, nodeId), this.id(ctx, newParent), newName));
  }
  async open(ctx: FsContext, nodeId: number, flags: number): Promise<OpenResult> {
    return this.newHandle(ctx, nodeId, await this.inner.open(ctx, this.id(ctx, nodeId), flags), flags, false);
  }
  async create(ctx: FsContext, parent: number, name: Buffer, mode: number, flags: number): Promise<CreateResult> {
    const r = await this.inner.create(ctx, this.id(ctx, parent), name, mode, flags);
    const entry = this.entry(ctx, parent, name, r.entry);
    return { entry, open: this.newHandle(ctx, entry.nodeId, r.open, flags, false) };
  }
  async read(ctx: FsContext, nodeId: number, fh: number, offset: number, size: number): Promise<Buffer> {
    return this.inner.read(ctx, this.id(ctx, nodeId), this.fh(ctx, fh), offset, size);
  }
  async write(ctx: FsContext, nodeId: number, fh: number, offset: number, data: Buffer): Promise<number> {
    return this.inner.write(ctx, this.id(ctx, nodeId), this.fh(ctx, fh), offset, data);
  }
  async flush(ctx: FsContext, nodeId: number, fh: number, lockOwner: bigint): Promise<void> {
    const k = { node: nodeId, session: ctx.session, owner: lockOwner };
    if (this.retakes.size) await this.settleRetake(k);
    await this.inner.flush(ctx, this.id(ctx, nodeId), this.fh(ctx, fh), lockOwner);
    if (this.lockHolders.size) this.dropLocks(ctx.session, nodeId, lockOwner, undefined);
  }
  async release(ctx: FsContext, nodeId: number, fh: number, lockOwner?: bigint): Promise<void> {
    if (this.retakes.size) await this.settleRetake({ node: nodeId, session: ctx.session, owner: 0n, flockFh: fh });
    if (this.lockHolders.size) this.dropLocks(ctx.session, nodeId, undefined, fh);
    const h = this.handles.get(fh);
    if (h && h.session === ctx.session && h.stale) {
      this.handles.delete(fh); // nothing below to release
      return;
    }
    const inner = this.fh(ctx, fh);
    this.handles.delete(fh);
    await this.inner.release(ctx, this.id(ctx, nodeId), inner, lockOwner);
  }
  async fsync(ctx: FsContext, nodeId: number, fh: number, datasync: boolean): Promise<void> {
    return this.inner.fsync(ctx, this.id(ctx, nodeId), this.fh(ctx, fh), datasync);
  }
  async opendir(ctx: FsContext, nodeId: number, flags: number): Promise<OpenResult> {
    return this.newHandle(ctx, nodeId, await this.inner.opendir(ctx, this.id(ctx, nodeId), flags), flags, true);
  }
  /** The offset to give the inner tree (see HandleRec.translate), and the handle record. */
  private async listing(ctx: FsContext, inner: number, fh: number, offset: number): Promise<{ h: HandleRec; off: number }> {
    const ifh = this.fh(ctx, fh);
    const h = this.handles.get(fh)!;
    if (!h.translate) return { h, off: offset };
    h.translate = false;
    const at = offset === 0 ? undefined : h.recent?.find((e) => e.offset === offset);
    if (!at) return { h, off: offset };
    // Once per restored handle: find where the old listing stopped, by name.
    let off = 0;
    for (;;) {
      const ents = await this.inner.readdir(ctx, inner, ifh, off, 1024);
      if (ents.length === 0) return { h, off: offset }; // the name is gone: the inner tree decides
      for (const e of ents) if (e.name.equals(at.name)) return { h, off: e.offset };
      off = ents[ents.length - 1]!.offset;
    }
  }

  /** Keeps the batch by reference (no copy): the names are the tree's own Buffers. */
  private static remember(h: HandleRec, list: readonly DirEntry[]): void {
    if (list.length) h.recent = list;
  }

  async readdir(ctx: FsContext, nodeId: number, fh: number, offset: number, maxEntries: number): Promise<DirEntry[]> {
    const inner = this.id(ctx, nodeId);
    const { h, off } = await this.listing(ctx, inner, fh, offset);
    const list = await this.inner.readdir(ctx, inner, h.inner, off, maxEntries);
    StableIdFileTree.remember(h, list);
    return list;
  }
  async readdirplus(ctx: FsContext, nodeId: number, fh: number, offset: number, maxEntries: number): Promise<DirEntryPlus[]> {
    const inner = this.id(ctx, nodeId);
    const { h, off } = await this.listing(ctx, inner, fh, offset);
    const list = await this.inner.readdirplus(ctx, inner, h.inner, off, maxEntries);
    StableIdFileTree.remember(h, list);
    return list.map((d) => {
      if (!d.entry || d.entry.nodeId === 0) return d;
      // "." and ".." are not lookups (tree.ts): sent without attributes rather than with an id we never counted.
      if (isDots(d.name)) return { name: d.name, ino: d.ino, type: d.type, offset: d.offset };
      return { ...d, entry: this.entry(ctx, nodeId, d.name, d.entry) };
    });
  }
  async releasedir(ctx: FsContext, nodeId: number, fh: number): Promise<void> {
    const h = this.handles.get(fh);
    if (h && h.session === ctx.session && h.stale) {
      this.handles.delete(fh);
      return;
    }
    const inner = this.fh(ctx, fh);
    this.handles.delete(fh);
    await this.inner.releasedir(ctx, this.id(ctx, nodeId), inner);
  }
  async fsyncdir(ctx: FsContext, nodeId: number, fh: number, datasync: boolean): Promise<void> {
    return this.inner.fsyncdir(ctx, this.id(ctx, nodeId), this.fh(ctx, fh), datasync);
  }
  async statfs(ctx: FsContext, nodeId: number): Promise<StatFs> {
    return this.inner.statfs(ctx, this.id(ctx, nodeId));
  }
  async setxattr(ctx: FsContext, nodeId: number, name: Buffer, value: Buffer, flags: number): Promise<void> {
    return this.inner.setxattr(ctx, this.id(ctx, nodeId), name, value, flags);
  }
  async getxattr(ctx: FsContext, nodeId: number, name: Buffer): Promise<Buffer> {
    return this.inner.getxattr(ctx, this.id(ctx, nodeId), name);
  }
  async listxattr(ctx: FsContext, nodeId: number): Promise<Buffer> {
    return this.inner.listxattr(ctx, this.id(ctx, nodeId));
  }
  async removexattr(ctx: FsContext, nodeId: number, name: Buffer): Promise<void> {
    return this.inner.removexattr(ctx, this.id(ctx, nodeId), name);
  }
  async access(ctx: FsContext, nodeId: number, mask: number): Promise<void> {
    return this.inner.access(ctx, this.id(ctx, nodeId), mask);
  }
  async fallocate(ctx: FsContext, nodeId: number, fh: number, mode: number, offset: number, length: number): Promise<void> {
    return this.inner.fallocate(ctx, this.id(ctx, nodeId), this.fh(ctx, fh), mode, offset, length);
  }
  async lseek(ctx: FsContext, nodeId: number, fh: number, offset: number, whence: number): Promise<number> {
    return this.inner.lseek(ctx, this.id(ctx, nodeId), this.fh(ctx, fh), offset, whence);
  }
  async copyFileRange(
    ctx: FsContext,
    from: { nodeId: number; fh: number; offset: number },
    to: { nodeId: number; fh: number; offset: number },
    length: number,
    flags: number,
  ): Promise<number> {
    return this.inner.copyFileRange(
      ctx,
      { nodeId: this.id(ctx, from.nodeId), fh: this.fh(ctx, from.fh), offset: from.offset },
      { nodeId: this.id(ctx, to.nodeId), fh: this.fh(ctx, to.fh), offset: to.offset },
      length,
      flags,
    );
  }
  async syncfs(ctx: FsContext): Promise<void> {
    return this.inner.syncfs(ctx);
  }
  async getlk(ctx: FsContext, nodeId: number, fh: number, owner: bigint, lock: FileLock): Promise<FileLock> {
    return this.inner.getlk(ctx, this.id(ctx, nodeId), this.fh(ctx, fh), owner, lock);
  }
  async setlk(
    ctx: FsContext,
    nodeId: number,
    fh: number,
    owner: bigint,
    lock: FileLock,
    opts: { wait: boolean; flock: boolean; signal?: AbortSignal },
  ): Promise<void> {
    const k: LockKey = { node: nodeId, session: ctx.session, owner, ...(opts.flock ? { flockFh: fh } : {}) };
    if (this.retakes.size) await this.settleRetake(k);
    await this.inner.setlk(ctx, this.id(ctx, nodeId), this.fh(ctx, fh), owner, lock, opts);
    this.mirror(k, lock);
  }
  /** The session's ids and handles go (the tree below drops its own for the session). */
  async endSession(session: string): Promise<void> {
    for (const [key, h] of this.lockHolders) if (h.session === session) this.lockHolders.delete(key);
    for (const [key, r] of this.retakes) if (key.split('\0')[1] === session) r.ac.abort();
    this.lockMirror.endSession(session);
    for (const h of this.handles.values()) if (h.session === session) this.handles.delete(h.fh);
    for (const n of this.nodes.values()) if (n.session === session) this.nodes.delete(n.id);
    this.sessions.delete(session);
    await this.inner.endSession(session);
  }
  async close(): Promise<void> {
    return this.inner.close();
  }
}
