/**
 * The storage node's directory service: shared directories under DATA/dirs/<path>, served to host
 * daemons as FileTrees over the node's framed msgpack RPC (lib/rpc, the same control address as
 * the volumes).
 *
 *   dir.create {path}           mkdir -p of DATA/dirs/<path> (idempotent), durable (the new
 *                               directories and the index fsynced) before the answer
 *   dir.delete {path, force?}   removes the directory and everything in it; EBUSY while a host
 *                               is attached unless `force` (its session then ends)
 *   dir.list                    [{path, sessions}]
 *   dir.stat {path}             {path, sessions, capacity, free}
 *   fs.attach {path, readOnly?} binds this connection to the directory: a session (see
 *                               lib/fs/remote-protocol.ts); answers {sid}
 *   fs.<op>                     one method per FileTree operation, on that session
 *   fs.cancel {w}               aborts a waiting setlk (FUSE_INTERRUPT on the host)
 *
 * Paths are resolver directory names (`/projects/alpha`: absolute, segments of [A-Za-z0-9._-],
 * checked by `checkName`). Which directories are shares is kept in DATA/dirs.json (written
 * atomically), so intermediate directories are not mistaken for shares; shares do not nest on one
 * node (a guest of `/a` could otherwise rename or replace `/a/b` under another guest).
 *
 * Confinement: the path is built from checked segments only; mkdir -p refuses any existing
 * component that is not a real directory (a symlink planted by a guest of another share), and a
 * share is opened only when realpath() of its directory is itself. Beneath a share,
 * `LocalFileTree` (lib/fs/local.ts) confines every operation to its root (openat2 beneath the
 * held fds), so `..`, absolute symlinks and symlink swaps from the RPC stay inside.
 *
 * Sessions: each RPC connection is one FileTree session (`c<conn>`). Node ids and handles the
 * tree hands to a session are also recorded here, and a call with an id or handle the session was
 * not given is refused (ENOENT / EBADF) before it reaches the tree (LocalFileTree checks the same
 * again): one host cannot use another's handles, and a forged id cannot reach a file. When the
 * connection ends, the tree's `endSession` releases the session's handles, drops its locks and
 * forgets its lookups. The trees are shared by every session of a directory, so two hosts see
 * each other's POSIX locks, as two processes on the node would.
 *
 * Backpressure: the RPC server reads no more requests from a connection that has
 * `maxInFlight` of them in progress (lib/rpc).
 */
import { randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { FsError, toFsError } from '../fs/errors.js';
import type { SessionForget } from '../fs/layer.js';
import { ReadOnlyFileTree } from '../fs/readonly.js';
import { decodeCtx, decodeOwner, MAX_IO, SESSION_GONE } from '../fs/remote-protocol.js';
import { ROOT_ID, type DirEntryPlus, type Entry, type FileLock, type FileTree, type FsContext, type SetAttr } from '../fs/tree.js';
import type { Logger } from '../log.js';
import { checkName } from '../resolver/types.js';
import type { RpcContext, RpcHandlers } from '../rpc/index.js';
import { fsyncDir } from './volumes.js';

/** How a node opens the FileTree of one share directory (LocalFileTree; tests may inject another). */
export type OpenTree = (root: string) => Promise<FileTree>;

export interface NodeDirsOptions {
  /** The node's DATA directory (shares live in DATA/dirs). */
  data: string;
  logger: Logger;
  openTree: OpenTree;
}

export interface DirInfo {
  path: string;
  sessions: number;
}

/** A session-local count of something the tree handed out. */
type Counts = Map<number, number>;

interface Session {
  readonly sid: string;
  /** The FileTree session name of the connection. */
  readonly name: string;
  readonly conn: number;
  readonly dir: string;
  readonly tree: FileTree;
  /** Lookups the tree counted for this session, per node id. */
  readonly lookups: Counts;
  /** Open handles: fh -> node id (files and directories apart: a dir handle is not a file handle). */
  readonly files: Map<number, number>;
  readonly dirs: Map<number, number>;
  /** Waiting setlk calls by the host's token (fs.cancel). */
  readonly waits: Map<string, AbortController>;
  ended: boolean;
}

interface OpenShare {
  tree: FileTree;
  sessions: Set<Session>;
}

const INDEX = 'dirs.json';
/** Most entries one readdir answers: 255-byte names (plus attributes) stay far below the RPC frame limit. */
const MAX_DIR_ENTRIES = 4096;

function obj(p: unknown): Record<string, unknown> {
  if (typeof p !== 'object' || p === null || Array.isArray(p)) throw new FsError('EINVAL', 'params must be an object');
  return p as Record<string, unknown>;
}
function int(p: Record<string, unknown>, k: string, max = Number.MAX_SAFE_INTEGER): number {
  const v = p[k];
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0 || v > max) throw new FsError('EINVAL', `${k}: expected an integer 0..${max}`);
  return v;
}
function buf(p: Record<string, unknown>, k: string, max = MAX_IO): Buffer {
  const v = p[k];
  if (!Buffer.isBuffer(v) || v.length > max) throw new FsError('EINVAL', `${k}: expected binary of at most ${max} bytes`);
  return v;
}
function flag(p: Record<string, unknown>, k: string): boolean {
  const v = p[k];
  if (v === undefined || v === null) return false;
  if (typeof v !== 'boolean') throw new FsError('EINVAL', `${k}: expected a boolean`);
  return v;
}
function timespec(v: unknown, k: string): { sec: number; nsec: number } {
  const t = v as { sec?: unknown; nsec?: unknown } | null;
  if (typeof t !== 'object' || t === null || !Number.isSafeInteger(t.sec) || !Number.isInteger(t.nsec) || (t.nsec as number) < 0 || (t.nsec as number) > 999_999_999) {
    throw new FsError('EINVAL', `${k}: expected {sec, nsec}`);
  }
  return { sec: t.sec as number, nsec: t.nsec as number };
}
function setAttrOf(v: unknown): SetAttr {
  const a = obj(v);
  const out: SetAttr = {};
  if (a.mode !== undefined) out.mode = int(a, 'mode', 0o177777);
  if (a.uid !== undefined) out.uid = int(a, 'uid', 0xffffffff);
  if (a.gid !== undefined) out.gid = int(a, 'gid', 0xffffffff);
  if (a.size !== undefined) out.size = int(a, 'size');
  if (a.atime !== undefined) out.atime = a.atime === 'now' ? 'now' : timespec(a.atime, 'atime');
  if (a.mtime !== undefined) out.mtime = a.mtime === 'now' ? 'now' : timespec(a.mtime, 'mtime');
  if (a.ctime !== undefined) out.ctime = timespec(a.ctime, 'ctime');
  if (a.killSuidGid !== undefined) out.killSuidGid = flag(a, 'killSuidGid');
  return out;
}
function lockOf(v: unknown): FileLock {
  const l = obj(v);
  return { start: int(l, 'start'), end: int(l, 'end'), type: int(l, 'type', 2), pid: int(l, 'pid', 0xffffffff) };
}

function add(c: Counts, id: number, n = 1): void {
  c.set(id, (c.get(id) ?? 0) + n);
}

/** The node's directories and the sessions of hosts attached to them. */
export class NodeDirs {
  private readonly root: string;
  private readonly logger: Logger;
  private readonly openTree: OpenTree;
  /** Share paths (as in the index). */
  private index: Set<string> | undefined;
  private readonly shares = new Map<string, OpenShare>();
  private readonly opening = new Map<string, Promise<OpenShare>>();
  private readonly sessions = new Map<number, Session>();
  /** Index changes one at a time. */
  private queue: Promise<unknown> = Promise.resolve();
  private closed = false;

  constructor(private readonly opts: NodeDirsOptions) {
    this.root = path.join(path.resolve(opts.data), 'dirs');
    this.logger = opts.logger;
    this.openTree = opts.openTree;
  }

  /** DATA/dirs/<path> for a checked directory name. */
  dirPath(name: string): string {
    try {
      checkName(name, 'directory');
    } catch (e) {
      throw new FsError('EINVAL', (e as Error).message);
    }
    return path.join(this.root, ...name.slice(1).split('/'));
  }

  // ---- directories --------------------------------------------------------------------------

  /** mkdir -p of the share (confined, durable) and its entry in the index; idempotent. */
  create(name: string): Promise<{ path: string; created: boolean }> {
    const dir = this.dirPath(name);
    return this.serial(async () => {
      const index = await this.loadIndex();
      if (index.has(name)) {
        const there = await fsp.lstat(dir).then(
          () => true,
          () => false,
        );
        if (there) {
          await this.checkReal(name, dir);
          return { path: name, created: false };
        }
        this.logger.warn({ dir: name }, 'dirs: a share in the index has no directory (removed by hand?); creating it empty');
      }
      for (const other of index) {
        if (other === name) continue;
        if (name.startsWith(`${other}/`) || other.startsWith(`${name}/`)) {
          throw new FsError('EEXIST', `${name}: shares do not nest on one node (${other} is a share here)`);
        }
      }
      await fsp.mkdir(this.root, { recursive: true, mode: 0o755 });
      let cur = this.root;
      const touched = new Set<string>();
      for (const seg of name.slice(1).split('/')) {
        const next = path.join(cur, seg);
        try {
          await fsp.mkdir(next, 0o755);
          touched.add(cur);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw toFsError(e);
          const st = await fsp.lstat(next);
          if (st.isSymbolicLink()) throw new FsError('ELOOP', `${name}: ${path.relative(this.root, next)} is a symbolic link`);
          if (!st.isDirectory()) throw new FsError('ENOTDIR', `${name}: ${path.relative(this.root, next)} is not a directory`);
        }
        cur = next;
      }
      await this.checkReal(name, dir);
      for (const d of touched) await fsyncDir(d);
      index.add(name);
      await this.saveIndex(index);
      this.logger.info({ dir: name }, 'dirs: created');
      return { path: name, created: true };
    });
  }

  /** Removes a share and its contents; EBUSY while hosts are attached unless `force` (their sessions end). */
  delete(name: string, opts: { force?: boolean } = {}): Promise<void> {
    const dir = this.dirPath(name);
    return this.serial(async () => {
      const index = await this.loadIndex();
      if (!index.has(name)) throw new FsError('ENOENT', `${name}: no such share on this node`);
      const share = this.shares.get(name);
      if (share && share.sessions.size) {
        if (!opts.force) throw new FsError('EBUSY', `${name}: ${share.sessions.size} host session(s) attached (force to end them)`);
        for (const s of [...share.sessions]) await this.endSession(s);
      }
      await this.closeShare(name);
      await this.checkReal(name, dir);
      index.delete(name);
      await this.saveIndex(index);
      await fsp.rm(dir, { recursive: true, force: true });
      await fsyncDir(path.dirname(dir)).catch(() => {});
      this.logger.info({ dir: name }, 'dirs: deleted');
    });
  }

  async list(): Promise<DirInfo[]> {
    const index = await this.loadIndex();
    return [...index].sort().map((p) => ({ path: p, sessions: this.shares.get(p)?.sessions.size ?? 0 }));
  }

  async stat(name: string): Promise<DirInfo & { capacity: number; free: number }> {
    const dir = this.dirPath(name);
    const index = await this.loadIndex();
    if (!index.has(name)) throw new FsError('ENOENT', `${name}: no such share on this node`);
    const s = await fsp.statfs(dir).catch((e: unknown) => {
      throw toFsError(e);
    });
    return { path: name, sessions: this.shares.get(name)?.sessions.size ?? 0, capacity: s.blocks * s.bsize, free: s.bavail * s.bsize };
  }

  // ---- sessions -----------------------------------------------------------------------------

  /** Binds connection `conn` to a share (ending the session it had). */
  async attach(conn: number, name: string, readOnly: boolean): Promise<{ sid: string }> {
    if (this.closed) throw new FsError('ESHUTDOWN', 'node is stopping');
    const dir = this.dirPath(name);
    const old = this.sessions.get(conn);
    if (old) await this.endSession(old);
    const index = await this.loadIndex();
    if (!index.has(name)) throw new FsError('ENOENT', `${name}: no such share on this node (dir.create it first)`);
    const share = await this.openShare(name, dir);
    const sess: Session = {
      sid: randomBytes(8).toString('hex'),
      name: `c${conn}`,
      conn,
      dir: name,
      tree: readOnly ? new ReadOnlyFileTree(share.tree) : share.tree,
      lookups: new Map(),
      files: new Map(),
      dirs: new Map(),
      waits: new Map(),
      ended: false,
    };
    share.sessions.add(sess);
    this.sessions.set(conn, sess);
    this.logger.debug({ dir: name, conn, readOnly }, 'dirs: session attached');
    return { sid: sess.sid };
  }

  /** The RPC connection ended: its session's handles, locks and lookups go away. */
  disconnect(conn: number): void {
    const s = this.sessions.get(conn);
    if (s) void this.endSession(s);
  }

  /** Ends every session and closes every tree (the node stops). */
  async close(): Promise<void> {
    this.closed = true;
    for (const s of [...this.sessions.values()]) await this.endSession(s);
    await this.queue.catch(() => {});
    for (const name of [...this.shares.keys()]) await this.closeShare(name);
  }

  private async endSession(s: Session): Promise<void> {
    if (s.ended) return;
    s.ended = true;
    if (this.sessions.get(s.conn) === s) this.sessions.delete(s.conn);
    for (const w of s.waits.values()) w.abort();
    // The tree's contract: endSession drops the session's handles, locks and lookups.
    await s.tree.endSession(s.name).catch((e: unknown) => this.logger.warn({ dir: s.dir, err: (e as Error).message }, 'dirs: endSession failed'));
    s.files.clear();
    s.dirs.clear();
    s.lookups.clear();
    const share = this.shares.get(s.dir);
    share?.sessions.delete(s);
    this.logger.debug({ dir: s.dir, conn: s.conn }, 'dirs: session ended');
  }

  private openShare(name: string, dir: string): Promise<OpenShare> {
    const have = this.shares.get(name);
    if (have) return Promise.resolve(have);
    let p = this.opening.get(name);
    if (!p) {
      p = (async () => {
        await this.checkReal(name, dir);
        const share: OpenShare = { tree: await this.openTree(dir), sessions: new Set() };
        this.shares.set(name, share);
        return share;
      })().finally(() => this.opening.delete(name));
      this.opening.set(name, p);
    }
    return p;
  }

  private async closeShare(name: string): Promise<void> {
    const share = this.shares.get(name);
    if (!share) return;
    this.shares.delete(name);
    await share.tree.close().catch((e: unknown) => this.logger.warn({ dir: name, err: (e as Error).message }, 'dirs: tree close failed'));
  }

  /** The share's directory has no symlink in its path (it is its own realpath) and is a directory. */
  private async checkReal(name: string, dir: string): Promise<void> {
    let real: string;
    try {
      real = await fsp.realpath(dir);
    } catch (e) {
      throw toFsError(e);
    }
    const realRoot = await fsp.realpath(this.root);
    if (real !== path.join(realRoot, path.relative(this.root, dir))) throw new FsError('ELOOP', `${name}: its directory is reached through a symbolic link; refusing it`);
    const st = await fsp.lstat(dir);
    if (!st.isDirectory()) throw new FsError('ENOTDIR', `${name}: not a directory`);
  }

  private async loadIndex(): Promise<Set<string>> {
    if (this.index) return this.index;
    try {
      const raw = JSON.parse(await fsp.readFile(path.join(this.opts.data, INDEX), 'utf8')) as { dirs?: unknown };
      const dirs = Array.isArray(raw.dirs) ? raw.dirs.filter((d): d is string => typeof d === 'string') : [];
      this.index = new Set(dirs);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw toFsError(e);
      this.index = new Set();
    }
    return this.index;
  }

  private async saveIndex(index: Set<string>): Promise<void> {
    const file = path.join(this.opts.data, INDEX);
    const tmp = `${file}.tmp-${randomBytes(4).toString('hex')}`;
    const fh = await fsp.open(tmp, 'wx', 0o644);
    try {
      await fh.writeFile(`${JSON.stringify({ dirs: [...index].sort() }, null, 1)}\n`);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await fsp.rename(tmp, file);
    await fsyncDir(this.opts.data);
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    if (this.closed) return Promise.reject(new FsError('ESHUTDOWN', 'node is stopping'));
    const p = this.queue.then(fn, fn);
    this.queue = p.catch(() => {});
    return p;
  }

  // ---- RPC ----------------------------------------------------------------------------------

  /** The session of a call: the connection's, with the sid the call names. */
  private session(conn: number, p: Record<string, unknown>): Session {
    const s = this.sessions.get(conn);
    if (!s || s.ended || p.s !== s.sid) throw Object.assign(new Error('no such session on this connection (attach again)'), { code: SESSION_GONE });
    return s;
  }

  private ctx(s: Session, p: Record<string, unknown>): FsContext {
    return decodeCtx(p.c, s.name);
  }

  private forget(s: Session, id: number, n: number): void {
    (s.tree.forget as SessionForget).call(s.tree, id, n, s.name);
  }

  /** An id this session was given (the root always). */
  private node(s: Session, p: Record<string, unknown>, k = 'n'): number {
    const id = p[k];
    if (id === ROOT_ID) return ROOT_ID;
    if (typeof id !== 'number' || !s.lookups.has(id)) throw new FsError('ENOENT', `${k}: no such node in this session`);
    return id;
  }

  private fh(s: Session, p: Record<string, unknown>, node: number, dir = false, k = 'fh'): number {
    const fh = p[k];
    const owner = typeof fh === 'number' ? (dir ? s.dirs : s.files).get(fh) : undefined;
    if (owner === undefined || owner !== node) throw new FsError('EBADF', `${k}: no such handle in this session`);
    return fh as number;
  }

  /** Counts an entry the tree returned (a lookup) for the session, or forgets it when the session ended meanwhile. */
  private entry<T extends Entry>(s: Session, e: T): T {
    if (s.ended) this.forget(s, e.nodeId, 1);
    else add(s.lookups, e.nodeId);
    return e;
  }

  private opened(s: Session, node: number, fh: number, dir: boolean): void {
    if (s.ended) {
      const ctx: FsContext = { uid: 0, gid: 0, pid: 0, session: s.name };
      void (dir ? s.tree.releasedir(ctx, node, fh) : s.tree.release(ctx, node, fh)).catch(() => {});
    } else (dir ? s.dirs : s.files).set(fh, node);
  }

  handlers(): RpcHandlers {
    type Fn = (s: Session, ctx: FsContext, p: Record<string, unknown>) => Promise<unknown>;
    const fsCall =
      (fn: Fn) =>
      async (params: unknown, rc: RpcContext): Promise<unknown> => {
        try {
          const p = obj(params);
          const s = this.session(rc.conn, p);
          return await fn(s, this.ctx(s, p), p);
        } catch (e) {
          if ((e as { code?: unknown }).code === SESSION_GONE) throw e;
          throw toFsError(e);
        }
      };
    const ctl =
      <T>(fn: (p: Record<string, unknown>, rc: RpcContext) => Promise<T>) =>
      async (params: unknown, rc: RpcContext): Promise<T> => {
        try {
          return await fn(obj(params ?? {}), rc);
        } catch (e) {
          throw toFsError(e);
        }
      };
    const name = (p: Record<string, unknown>, k = 'name'): Buffer => buf(p, k, 255);
    const str = (p: Record<string, unknown>, k: string): string => {
      const v = p[k];
      if (typeof v !== 'string') throw new FsError('EINVAL', `${k}: expected a string`);
      return v;
    };
    return {
      'dir.create': ctl((p) => this.create(str(p, 'path'))),
      'dir.delete': ctl(async (p) => {
        await this.delete(str(p, 'path'), { force: flag(p, 'force') });
        return { deleted: true };
      }),
      'dir.list': ctl(() => this.list()),
      'dir.stat': ctl((p) => this.stat(str(p, 'path'))),
      'fs.attach': ctl((p, rc) => this.attach(rc.conn, str(p, 'path'), flag(p, 'readOnly'))),
      'fs.cancel': ctl(async (p, rc) => {
        this.sessions.get(rc.conn)?.waits.get(str(p, 'w'))?.abort();
        return null;
      }),
      'fs.lookup': fsCall(async (s, ctx, p) => this.entry(s, await s.tree.lookup(ctx, this.node(s, p, 'p'), name(p)))),
      'fs.forget': fsCall(async (s, _ctx, p) => {
        const id = this.node(s, p);
        if (id === ROOT_ID) return null;
        const have = s.lookups.get(id)!;
        const n = Math.min(int(p, 'nl'), have);
        if (n === have) s.lookups.delete(id);
        else s.lookups.set(id, have - n);
        this.forget(s, id, n);
        return null;
      }),
      'fs.getattr': fsCall(async (s, ctx, p) => {
        const n = this.node(s, p);
        return s.tree.getattr(ctx, n, p.fh === undefined || p.fh === null ? undefined : this.fh(s, p, n));
      }),
      'fs.setattr': fsCall(async (s, ctx, p) => {
        const n = this.node(s, p);
        return s.tree.setattr(ctx, n, setAttrOf(p.a), p.fh === undefined || p.fh === null ? undefined : this.fh(s, p, n));
      }),
      'fs.readlink': fsCall(async (s, ctx, p) => s.tree.readlink(ctx, this.node(s, p))),
      'fs.mknod': fsCall(async (s, ctx, p) =>
        this.entry(s, await s.tree.mknod(ctx, this.node(s, p, 'p'), name(p), int(p, 'mode', 0o177777), int(p, 'rdev', 0xffffffff))),
      ),
      'fs.mkdir': fsCall(async (s, ctx, p) => this.entry(s, await s.tree.mkdir(ctx, this.node(s, p, 'p'), name(p), int(p, 'mode', 0o177777)))),
      'fs.symlink': fsCall(async (s, ctx, p) => this.entry(s, await s.tree.symlink(ctx, this.node(s, p, 'p'), name(p), buf(p, 'target', 4096)))),
      'fs.unlink': fsCall(async (s, ctx, p) => s.tree.unlink(ctx, this.node(s, p, 'p'), name(p))),
      'fs.rmdir': fsCall(async (s, ctx, p) => s.tree.rmdir(ctx, this.node(s, p, 'p'), name(p))),
      'fs.rename': fsCall(async (s, ctx, p) =>
        s.tree.rename(ctx, this.node(s, p, 'p'), name(p), this.node(s, p, 'np'), name(p, 'nname'), int(p, 'flags', 0xffffffff)),
      ),
      'fs.link': fsCall(async (s, ctx, p) => this.entry(s, await s.tree.link(ctx, this.node(s, p), this.node(s, p, 'np'), name(p, 'nname')))),
      'fs.open': fsCall(async (s, ctx, p) => {
        const n = this.node(s, p);
        const r = await s.tree.open(ctx, n, int(p, 'flags', 0xffffffff));
        this.opened(s, n, r.fh, false);
        return r;
      }),
      'fs.create': fsCall(async (s, ctx, p) => {
        const r = await s.tree.create(ctx, this.node(s, p, 'p'), name(p), int(p, 'mode', 0o177777), int(p, 'flags', 0xffffffff));
        this.entry(s, r.entry);
        this.opened(s, r.entry.nodeId, r.open.fh, false);
        return r;
      }),
      'fs.read': fsCall(async (s, ctx, p) => {
        const n = this.node(s, p);
        return s.tree.read(ctx, n, this.fh(s, p, n), int(p, 'off'), int(p, 'size', MAX_IO));
      }),
      'fs.write': fsCall(async (s, ctx, p) => {
        const n = this.node(s, p);
        return s.tree.write(ctx, n, this.fh(s, p, n), int(p, 'off'), buf(p, 'data'));
      }),
      'fs.flush': fsCall(async (s, ctx, p) => {
        const n = this.node(s, p);
        return s.tree.flush(ctx, n, this.fh(s, p, n), decodeOwner(p.owner));
      }),
      'fs.release': fsCall(async (s, ctx, p) => {
        const n = this.node(s, p);
        const fh = this.fh(s, p, n);
        s.files.delete(fh);
        return s.tree.release(ctx, n, fh, p.owner === undefined || p.owner === null ? undefined : decodeOwner(p.owner));
      }),
      'fs.fsync': fsCall(async (s, ctx, p) => {
        const n = this.node(s, p);
        return s.tree.fsync(ctx, n, this.fh(s, p, n), flag(p, 'datasync'));
      }),
      'fs.opendir': fsCall(async (s, ctx, p) => {
        const n = this.node(s, p);
        const r = await s.tree.opendir(ctx, n, int(p, 'flags', 0xffffffff));
        this.opened(s, n, r.fh, true);
        return r;
      }),
      'fs.readdir': fsCall(async (s, ctx, p) => {
        const n = this.node(s, p);
        return s.tree.readdir(ctx, n, this.fh(s, p, n, true), int(p, 'off'), int(p, 'max', MAX_DIR_ENTRIES));
      }),
      'fs.readdirplus': fsCall(async (s, ctx, p) => {
        const n = this.node(s, p);
        const list: DirEntryPlus[] = await s.tree.readdirplus(ctx, n, this.fh(s, p, n, true), int(p, 'off'), int(p, 'max', MAX_DIR_ENTRIES));
        for (const d of list) if (d.entry) this.entry(s, d.entry);
        return list;
      }),
      'fs.releasedir': fsCall(async (s, ctx, p) => {
        const n = this.node(s, p);
        const fh = this.fh(s, p, n, true);
        s.dirs.delete(fh);
        return s.tree.releasedir(ctx, n, fh);
      }),
      'fs.fsyncdir': fsCall(async (s, ctx, p) => {
        const n = this.node(s, p);
        return s.tree.fsyncdir(ctx, n, this.fh(s, p, n, true), flag(p, 'datasync'));
      }),
      'fs.statfs': fsCall(async (s, ctx, p) => s.tree.statfs(ctx, this.node(s, p))),
      'fs.setxattr': fsCall(async (s, ctx, p) => s.tree.setxattr(ctx, this.node(s, p), name(p), buf(p, 'value', 65536), int(p, 'flags', 3))),
      'fs.getxattr': fsCall(async (s, ctx, p) => s.tree.getxattr(ctx, this.node(s, p), name(p))),
      'fs.listxattr': fsCall(async (s, ctx, p) => s.tree.listxattr(ctx, this.node(s, p))),
      'fs.removexattr': fsCall(async (s, ctx, p) => s.tree.removexattr(ctx, this.node(s, p), name(p))),
      'fs.access': fsCall(async (s, ctx, p) => s.tree.access(ctx, this.node(s, p), int(p, 'mask', 7))),
      'fs.fallocate': fsCall(async (s, ctx, p) => {
        const n = this.node(s, p);
        return s.tree.fallocate(ctx, n, this.fh(s, p, n), int(p, 'mode', 0xffffffff), int(p, 'off'), int(p, 'len'));
      }),
      'fs.lseek': fsCall(async (s, ctx, p) => {
        const n = this.node(s, p);
        return s.tree.lseek(ctx, n, this.fh(s, p, n), int(p, 'off'), int(p, 'whence', 4));
      }),
      'fs.copyFileRange': fsCall(async (s, ctx, p) => {
        const from = obj(p.from);
        const to = obj(p.to);
        const fn = this.node(s, from);
        const tn = this.node(s, to);
        return s.tree.copyFileRange(
          ctx,
          { nodeId: fn, fh: this.fh(s, from, fn), offset: int(from, 'off') },
          { nodeId: tn, fh: this.fh(s, to, tn), offset: int(to, 'off') },
          int(p, 'len'),
          int(p, 'flags', 0xffffffff),
        );
      }),
      'fs.syncfs': fsCall(async (s, ctx) => s.tree.syncfs(ctx)),
      'fs.getlk': fsCall(async (s, ctx, p) => {
        const n = this.node(s, p);
        return s.tree.getlk(ctx, n, this.fh(s, p, n), decodeOwner(p.owner), lockOf(p.lock));
      }),
      'fs.setlk': fsCall(async (s, ctx, p) => {
        const n = this.node(s, p);
        const fh = this.fh(s, p, n);
        const wait = flag(p, 'wait');
        const token = typeof p.w === 'string' && p.w.length <= 64 ? p.w : undefined;
        const ac = wait ? new AbortController() : undefined;
        if (ac && token) s.waits.set(token, ac);
        try {
          await s.tree.setlk(ctx, n, fh, decodeOwner(p.owner), lockOf(p.lock), { wait, flock: flag(p, 'flock'), ...(ac ? { signal: ac.signal } : {}) });
          return null;
        } finally {
          if (token) s.waits.delete(token);
        }
      }),
    };
  }
}
