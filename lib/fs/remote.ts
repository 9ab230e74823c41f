/**
 * `RemoteFileTree`: a FileTree whose directory lives on a storage node, spoken over the node's
 * directory RPC (lib/node/dirs.ts; wire in ./remote-protocol.ts). Errors come back as the node's
 * errno names (FsError); a call the node never answered (connection lost, timeout, node down) is
 * EIO.
 *
 * Surviving the node: ids and handles the node gives are valid only in one session (one RPC
 * connection), and a restarted node hands out other ids. So this tree gives its callers ids and
 * handles of its own and keeps, for each, the node's current one plus how to find it again: the
 * parent and name it was looked up by (kept up to date by this tree's renames and unlinks), and
 * the flags an open handle was opened with. When the connection drops, the calls in flight fail
 * (EIO: nobody knows whether the node did them), the next call reconnects (waiting up to
 * `reconnectTimeoutMs` for the node to come back), attaches a new session, re-resolves every live
 * id by lookups from the root (parents first) and re-opens every handle with its flags (without
 * O_CREAT/O_EXCL/O_TRUNC); only then does the call go on. An id whose name is gone (renamed or
 * removed by another host meanwhile, or an unlinked open file) or is another file now (its inode
 * number differs) answers ESTALE from then on, as NFS does. POSIX locks die with the node's session and are not taken again: a lock holder across
 * a node restart has lost its lock (the node cannot know it was held).
 *
 * Host sessions: the node sees one session per connection, so the host-side sessions that share
 * this tree (a guest's virtiofs device, a host mount) share its ids and handles; their POSIX lock
 * owners are salted with the session name (the kernels of two guests may use equal owner values)
 * and `endSession` unlocks what that session locked and releases the handles it opened.
 *
 * A call made with the id of an old session is never executed by the node (it answers
 * SESSION_GONE, see remote-protocol.ts): ids are translated to the current session right before
 * each send, and a call that raced a reconnect is translated again and resent.
 */
import { constants } from 'node:fs';
import type { Logger } from '../log.js';
import { RpcClient, RpcError } from '../rpc/index.js';
import { FsError, toFsError } from './errors.js';
import { encodeCtx, encodeOwner, SESSION_GONE } from './remote-protocol.js';
import {
  F_UNLCK,
  RENAME_EXCHANGE,
  ROOT_ID,
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

export interface RemoteFileTreeOptions {
  /** The node's control (RPC) addresses, or a function that finds them now (asked at every reconnect). */
  addresses: string[] | (() => Promise<string[]>);
  /** The share on the node (`/projects/alpha`). */
  path: string;
  /** Attach read-only: the node refuses every mutation with EROFS too. */
  readOnly?: boolean;
  logger: Logger;
  /** Per-call timeout (ms; a waiting setlk has none). Default 30 s. */
  timeoutMs?: number;
  /** How long a call waits for an unreachable node before it fails with EIO. Default 30 s. */
  reconnectTimeoutMs?: number;
}

interface RNode {
  /** Parent's local id and name this node was found by; parent -1: no name (unlinked). */
  parent: number;
  name: Buffer;
  /** Lookups the caller holds (forget subtracts). */
  nlookup: number;
  /** The node's id in session `gen`; -1: stale (not found again). */
  remote: number;
  /** Lookups the node counted for `remote` in this session. */
  remoteLookups: number;
  gen: number;
  /** Inode number: a name found again must still be the same file (else the id is stale). */
  ino: number;
  /** Live children (they need this node's name to be found again). */
  children: number;
}

interface RHandle {
  node: number;
  flags: number;
  dir: boolean;
  /** The node's handle in session `gen`; -1: could not be re-opened. */
  remote: number;
  gen: number;
  ctx: FsContext;
}

const REOPEN_MASK = ~(constants.O_CREAT | constants.O_EXCL | constants.O_TRUNC);
/** Re-resolutions in flight at once after a reconnect. */
const RESOLVE_CONCURRENCY = 32;

function nameKey(parent: number, name: Buffer): string {
  return `${parent}/${name.toString('latin1')}`;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export class RemoteFileTree implements FileTree {
  private rpc: RpcClient | null = null;
  private sid: string | null = null;
  private gen = 0;
  private establishing: Promise<string> | null = null;
  private readonly nodes = new Map<number, RNode>();
  /** The node's id -> our id, for the current session. */
  private readonly byRemote = new Map<number, number>();
  /** parent/name -> our id. */
  private readonly names = new Map<string, number>();
  private readonly handles = new Map<number, RHandle>();
  private nextId = ROOT_ID + 1;
  private nextFh = 1;
  private nextWait = 1;
  /** POSIX lock owners (salted, hex) each host session used, per handle: endSession unlocks them. */
  private readonly lockUse = new Map<string, Map<number, Set<string>>>();
  private closed = false;
  private readonly timeoutMs: number;
  private readonly reconnectTimeoutMs: number;
  private readonly logger: Logger;

  constructor(private readonly opts: RemoteFileTreeOptions) {
    this.timeoutMs = opts.timeoutMs ?? 30_000;
    this.reconnectTimeoutMs = opts.reconnectTimeoutMs ?? 30_000;
    this.logger = opts.logger;
  }

  /** Connects and attaches now (otherwise the first call does); throws what the node answered (ENOENT: no such share). */
  async connect(): Promise<void> {
    await this.session();
  }

  /** A session is attached and its connection has not been seen to drop. */
  get connected(): boolean {
    return this.sid !== null;
  }

  /** Number of sessions attached so far (1 after the first connect; +1 per reconnect). */
  get sessions(): number {
    return this.gen;
  }

  // ---- session ------------------------------------------------------------------------------

  private session(): Promise<string> {
    if (this.closed) return Promise.reject(new FsError('ESHUTDOWN', 'remote tree closed'));
    if (this.sid) return Promise.resolve(this.sid);
    this.establishing ??= this.establish().finally(() => {
      this.establishing = null;
    });
    return this.establishing;
  }

  private async addresses(): Promise<string[]> {
    const a = this.opts.addresses;
    return typeof a === 'function' ? a() : a;
  }

  private client(address: string): RpcClient {
    if (this.rpc && this.rpcAddress === address) return this.rpc;
    this.rpc?.close();
    const rpc = new RpcClient(address, { timeoutMs: this.timeoutMs, connectTimeoutMs: 5_000 });
    rpc.on('close', () => {
      if (this.rpc === rpc) this.sid = null;
    });
    this.rpc = rpc;
    this.rpcAddress = address;
    return rpc;
  }
  private rpcAddress = '';

  /** Attaches a session (retrying while the node is unreachable), then re-resolves ids and re-opens handles. */
  private async establish(): Promise<string> {
    const deadline = Date.now() + this.reconnectTimeoutMs;
    let delay = 50;
    let last: unknown;
    for (;;) {
      if (this.closed) throw new FsError('ESHUTDOWN', 'remote tree closed');
      let addrs: string[] = [];
      try {
        addrs = await this.addresses();
      } catch (e) {
        last = e;
      }
      for (const addr of addrs) {
        const rpc = this.client(addr);
        try {
          const r = await rpc.call<{ sid: string }>('fs.attach', { path: this.opts.path, readOnly: this.opts.readOnly ?? false });
          const sid = r.sid;
          this.gen++;
          await this.restore(rpc, sid);
          if (this.rpc !== rpc) continue; // replaced meanwhile
          this.sid = sid;
          return sid;
        } catch (e) {
          if (e instanceof RpcError && !e.transport && e.code !== SESSION_GONE) throw new FsError(e.code, `${this.opts.path} on ${addr}: ${e.message}`);
          if (e instanceof FsError) throw e;
          last = e;
        }
      }
      if (Date.now() + delay > deadline) {
        throw new FsError('EIO', `${this.opts.path}: node unreachable for ${this.reconnectTimeoutMs} ms (${(last as Error)?.message ?? 'no address'})`);
      }
      await sleep(delay);
      delay = Math.min(delay * 2, 1000);
    }
  }

  /** After a new attach: every live id found again by its name (parents first), every handle re-opened. */
  private async restore(rpc: RpcClient, sid: string): Promise<void> {
    this.byRemote.clear();
    if (this.gen === 1 || (this.nodes.size === 0 && this.handles.size === 0)) return;
    const depth = new Map<number, number>();
    const depthOf = (id: number): number => {
      if (id === ROOT_ID) return 0;
      const known = depth.get(id);
      if (known !== undefined) return known;
      const n = this.nodes.get(id);
      const d = !n || n.parent < 0 ? -1 : depthOf(n.parent);
      const r = d < 0 ? -1 : d + 1;
      depth.set(id, r);
      return r;
    };
    const levels: number[][] = [];
    for (const [id, n] of this.nodes) {
      const d = depthOf(id);
      n.remote = -1;
      n.remoteLookups = 0;
      n.gen = this.gen;
      if (d > 0) (levels[d] ??= []).push(id);
    }
    let stale = 0;
    const rootCtx = { u: 0, g: 0, p: 0 };
    for (const level of levels) {
      if (!level) continue;
      for (let i = 0; i < level.length; i += RESOLVE_CONCURRENCY) {
        await Promise.all(
          level.slice(i, i + RESOLVE_CONCURRENCY).map(async (id) => {
            const n = this.nodes.get(id)!;
            const parent = n.parent === ROOT_ID ? ROOT_ID : this.nodes.get(n.parent)?.remote ?? -1;
            if (parent < 0) {
              stale++;
              return;
            }
            try {
              const e = await rpc.call<Entry>('fs.lookup', { s: sid, c: rootCtx, p: parent, name: n.name });
              if (e.attr.ino !== n.ino) {
                // Another file by that name now (replaced while we were away): not ours.
                rpc.call('fs.forget', { s: sid, c: rootCtx, n: e.nodeId, nl: 1 }).catch(() => {});
                stale++;
                return;
              }
              n.remote = e.nodeId;
              n.remoteLookups = 1;
              if (!this.byRemote.has(e.nodeId)) this.byRemote.set(e.nodeId, id);
            } catch (e) {
              if (e instanceof RpcError && (e.transport || e.code === SESSION_GONE)) throw e;
              stale++;
            }
          }),
        );
      }
    }
    let reopened = 0;
    for (const h of this.handles.values()) {
      h.gen = this.gen;
      h.remote = -1;
      const remote = h.node === ROOT_ID ? ROOT_ID : this.nodes.get(h.node)?.remote ?? -1;
      if (remote < 0) continue;
      try {
        const r = await rpc.call<OpenResult>(h.dir ? 'fs.opendir' : 'fs.open', { s: sid, c: encodeCtx(h.ctx), n: remote, flags: h.flags & REOPEN_MASK });
        h.remote = r.fh;
        reopened++;
      } catch (e) {
        if (e instanceof RpcError && (e.transport || e.code === SESSION_GONE)) throw e;
      }
    }
    this.logger.info(
      { path: this.opts.path, session: this.gen, nodes: this.nodes.size, stale, handles: this.handles.size, reopened },
      'remote tree: re-attached to the node; ids re-resolved and handles re-opened',
    );
  }

  // ---- translation --------------------------------------------------------------------------

  private remoteOf(id: number): number {
    if (id === ROOT_ID) return ROOT_ID;
    const n = this.nodes.get(id);
    if (!n || n.nlookup <= 0) throw new FsError('ENOENT', `no such node id ${id}`);
    if (n.remote < 0 || n.gen !== this.gen) throw new FsError('ESTALE', `node id ${id} was not found again after the node reconnected`);
    return n.remote;
  }

  private remoteFh(fh: number, node: number, dir: boolean): number {
    const h = this.handles.get(fh);
    if (!h || h.dir !== dir || h.node !== node) throw new FsError('EBADF', `no such ${dir ? 'directory' : 'file'} handle ${fh}`);
    if (h.remote < 0 || h.gen !== this.gen) throw new FsError('ESTALE', `handle ${fh} could not be re-opened after the node reconnected`);
    return h.remote;
  }

  /** Takes an entry the node returned for `parent/name` (a lookup it counted) into our ids. */
  private adopt(parent: number, name: Buffer, e: Entry): Entry {
    if (e.nodeId === ROOT_ID) return e;
    const known = this.byRemote.get(e.nodeId);
    const kn = known !== undefined ? this.nodes.get(known) : undefined;
    if (kn && known !== undefined) {
      kn.nlookup++;
      kn.remoteLookups++;
      return { ...e, nodeId: known };
    }
    const id = this.nextId++;
    // A copy: the name may be a view of a whole RPC frame, which it would keep alive.
    const n: RNode = { parent: -1, name: Buffer.from(name), nlookup: 1, remote: e.nodeId, remoteLookups: 1, gen: this.gen, ino: e.attr.ino, children: 0 };
    this.nodes.set(id, n);
    this.byRemote.set(e.nodeId, id);
    this.setName(id, n, parent, n.name);
    return { ...e, nodeId: id };
  }

  private setName(id: number, n: RNode, parent: number, name: Buffer): void {
    if (n.parent >= 0 && this.names.get(nameKey(n.parent, n.name)) === id) this.names.delete(nameKey(n.parent, n.name));
    if (n.parent > ROOT_ID) this.dropChild(n.parent);
    n.parent = parent;
    n.name = name;
    if (parent < 0) return;
    const prev = this.names.get(nameKey(parent, name));
    if (prev !== undefined && prev !== id) {
      const p = this.nodes.get(prev);
      if (p) this.setName(prev, p, -1, p.name);
    }
    this.names.set(nameKey(parent, name), id);
    const pn = this.nodes.get(parent);
    if (pn) pn.children++;
  }

  /** One child of `id` is gone; the node goes too once nothing holds it. */
  private dropChild(id: number): void {
    const n = this.nodes.get(id);
    if (!n) return;
    n.children = Math.max(0, n.children - 1);
    this.reap(id, n);
  }

  private reap(id: number, n: RNode): void {
    if (n.nlookup > 0 || n.children > 0) return;
    for (const h of this.handles.values()) if (h.node === id) return;
    this.forgetRemote(id, n);
    this.nodes.delete(id);
    if (this.names.get(nameKey(n.parent, n.name)) === id) this.names.delete(nameKey(n.parent, n.name));
    if (n.parent > ROOT_ID) this.dropChild(n.parent);
  }

  /** Gives the node back the lookups it counted for `n` in this session. */
  private forgetRemote(id: number, n: RNode): void {
    if (n.gen !== this.gen || n.remote < 0) return;
    if (this.byRemote.get(n.remote) === id) this.byRemote.delete(n.remote);
    if (this.sid && this.rpc && n.remoteLookups > 0) {
      // Fire and forget (forget has no answer in FUSE either); a lost one dies with the session.
      this.rpc.call('fs.forget', { s: this.sid, c: { u: 0, g: 0, p: 0 }, n: n.remote, nl: n.remoteLookups }).catch(() => {});
    }
    n.remote = -1;
    n.remoteLookups = 0;
  }

  private detachName(parent: number, name: Buffer): void {
    const id = this.names.get(nameKey(parent, name));
    if (id === undefined) return;
    const n = this.nodes.get(id);
    if (n) this.setName(id, n, -1, n.name);
  }

  /**
   * A host session's lock owner as the node sees it: XOR with a 64-bit FNV-1a hash of the session
   * name, so equal owners of two guests do not meet on the node.
   */
  private owner(session: string, owner: bigint): string {
    let h = 0xcbf29ce484222325n;
    for (let i = 0; i < session.length; i++) h = BigInt.asUintN(64, (h ^ BigInt(session.charCodeAt(i))) * 0x100000001b3n);
    return encodeOwner(owner ^ h);
  }

  // ---- calls --------------------------------------------------------------------------------

  private async call<T>(method: string, ctx: FsContext | null, params: () => Record<string, unknown>, timeoutMs?: number): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      const sid = await this.session();
      const rpc = this.rpc!;
      const p = params(); // ids of the current session
      p.s = sid;
      if (ctx) p.c = encodeCtx(ctx);
      try {
        return await rpc.call<T>(method, p, timeoutMs !== undefined ? { timeoutMs } : {});
      } catch (e) {
        if (!(e instanceof RpcError)) throw toFsError(e);
        if (e.code === SESSION_GONE) {
          if (this.sid === sid) this.sid = null;
          if (attempt < 3) continue;
          throw new FsError('EIO', `${method}: the node keeps losing the session`);
        }
        if (e.transport) throw new FsError('EIO', `${method}: ${e.message}`);
        throw new FsError(e.code, e.message);
      }
    }
  }

  async lookup(ctx: FsContext, parent: number, name: Buffer): Promise<Entry> {
    const e = await this.call<Entry>('fs.lookup', ctx, () => ({ p: this.remoteOf(parent), name }));
    return this.adopt(parent, name, e);
  }

  forget(nodeId: number, nlookup: number): void {
    const n = this.nodes.get(nodeId);
    if (!n || nlookup <= 0) return;
    n.nlookup = Math.max(0, n.nlookup - nlookup);
    if (n.nlookup > 0) return;
    this.reap(nodeId, n);
  }

  getattr(ctx: FsContext, nodeId: number, fh?: number): Promise<{ attr: Attr; attrTtlMs?: number }> {
    return this.call('fs.getattr', ctx, () => ({ n: this.remoteOf(nodeId), ...(fh !== undefined ? { fh: this.remoteFh(fh, nodeId, false) } : {}) }));
  }

  setattr(ctx: FsContext, nodeId: number, changes: SetAttr, fh?: number): Promise<{ attr: Attr; attrTtlMs?: number }> {
    return this.call('fs.setattr', ctx, () => ({ n: this.remoteOf(nodeId), a: changes, ...(fh !== undefined ? { fh: this.remoteFh(fh, nodeId, false) } : {}) }));
  }

  readlink(ctx: FsContext, nodeId: number): Promise<Buffer> {
    return this.call('fs.readlink', ctx, () => ({ n: this.remoteOf(nodeId) }));
  }

  async mknod(ctx: FsContext, parent: number, name: Buffer, mode: number, rdev: number): Promise<Entry> {
    return this.adopt(parent, name, await this.call<Entry>('fs.mknod', ctx, () => ({ p: this.remoteOf(parent), name, mode, rdev })));
  }

  async mkdir(ctx: FsContext, parent: number, name: Buffer, mode: number): Promise<Entry> {
    return this.adopt(parent, name, await this.call<Entry>('fs.mkdir', ctx, () => ({ p: this.remoteOf(parent), name, mode })));
  }

  async symlink(ctx: FsContext, parent: number, name: Buffer, target: Buffer): Promise<Entry> {
    return this.adopt(parent, name, await this.call<Entry>('fs.symlink', ctx, () => ({ p: this.remoteOf(parent), name, target })));
  }

  async unlink(ctx: FsContext, parent: number, name: Buffer): Promise<void> {
    await this.call('fs.unlink', ctx, () => ({ p: this.remoteOf(parent), name }));
    this.detachName(parent, name);
  }

  async rmdir(ctx: FsContext, parent: number, name: Buffer): Promise<void> {
    await this.call('fs.rmdir', ctx, () => ({ p: this.remoteOf(parent), name }));
    this.detachName(parent, name);
  }

  async rename(ctx: FsContext, parent: number, name: Buffer, newParent: number, newName: Buffer, flags: number): Promise<void> {
    await this.call('fs.rename', ctx, () => ({ p: this.remoteOf(parent), name, np: this.remoteOf(newParent), nname: newName, flags }));
    const from = this.names.get(nameKey(parent, name));
    const to = this.names.get(nameKey(newParent, newName));
    const fromNode = from !== undefined ? this.nodes.get(from) : undefined;
    const toNode = to !== undefined ? this.nodes.get(to) : undefined;
    // Exchange: the two swap names; otherwise the target (if any) loses its name and the source takes it.
    if (toNode && to !== undefined) this.setName(to, toNode, -1, toNode.name);
    if (fromNode && from !== undefined) this.setName(from, fromNode, newParent, Buffer.from(newName));
    if (flags === RENAME_EXCHANGE && toNode && to !== undefined) this.setName(to, toNode, parent, Buffer.from(name));
  }

  async link(ctx: FsContext, nodeId: number, newParent: number, newName: Buffer): Promise<Entry> {
    const e = await this.call<Entry>('fs.link', ctx, () => ({ n: this.remoteOf(nodeId), np: this.remoteOf(newParent), nname: newName }));
    return this.adopt(newParent, newName, e);
  }

  private addHandle(ctx: FsContext, node: number, flags: number, dir: boolean, remote: number): number {
    const fh = this.nextFh++;
    this.handles.set(fh, { node, flags, dir, remote, gen: this.gen, ctx: { ...ctx } });
    return fh;
  }

  async open(ctx: FsContext, nodeId: number, flags: number): Promise<OpenResult> {
    const r = await this.call<OpenResult>('fs.open', ctx, () => ({ n: this.remoteOf(nodeId), flags }));
    return { ...r, fh: this.addHandle(ctx, nodeId, flags, false, r.fh) };
  }

  async create(ctx: FsContext, parent: number, name: Buffer, mode: number, flags: number): Promise<CreateResult> {
    const r = await this.call<CreateResult>('fs.create', ctx, () => ({ p: this.remoteOf(parent), name, mode, flags }));
    const entry = this.adopt(parent, name, r.entry);
    return { entry, open: { ...r.open, fh: this.addHandle(ctx, entry.nodeId, flags, false, r.open.fh) } };
  }

  read(ctx: FsContext, nodeId: number, fh: number, offset: number, size: number): Promise<Buffer> {
    return this.call('fs.read', ctx, () => ({ n: this.remoteOf(nodeId), fh: this.remoteFh(fh, nodeId, false), off: offset, size }));
  }

  write(ctx: FsContext, nodeId: number, fh: number, offset: number, data: Buffer): Promise<number> {
    return this.call('fs.write', ctx, () => ({ n: this.remoteOf(nodeId), fh: this.remoteFh(fh, nodeId, false), off: offset, data }));
  }

  async flush(ctx: FsContext, nodeId: number, fh: number, lockOwner: bigint): Promise<void> {
    const owner = this.owner(ctx.session, lockOwner);
    await this.call('fs.flush', ctx, () => ({ n: this.remoteOf(nodeId), fh: this.remoteFh(fh, nodeId, false), owner }));
    this.lockUse.get(ctx.session)?.get(fh)?.delete(owner);
  }

  async release(ctx: FsContext, nodeId: number, fh: number, lockOwner?: bigint): Promise<void> {
    const h = this.handles.get(fh);
    if (!h || h.dir || h.node !== nodeId) throw new FsError('EBADF', `no such file handle ${fh}`);
    try {
      // The handle stays in the table during the call: a reconnect meanwhile re-opens it, and the
      // release then closes the new one.
      await this.call('fs.release', ctx, () => ({
        n: this.remoteOf(nodeId),
        fh: this.remoteFh(fh, nodeId, false),
        ...(lockOwner !== undefined ? { owner: this.owner(ctx.session, lockOwner) } : {}),
      }));
    } catch (e) {
      if (!(e instanceof FsError && e.code === 'ESTALE')) throw e; // nothing left to close on the node
    } finally {
      this.handles.delete(fh);
      for (const m of this.lockUse.values()) m.delete(fh);
      const n = this.nodes.get(nodeId);
      if (n) this.reap(nodeId, n);
    }
  }

  async fsync(ctx: FsContext, nodeId: number, fh: number, datasync: boolean): Promise<void> {
    await this.call('fs.fsync', ctx, () => ({ n: this.remoteOf(nodeId), fh: this.remoteFh(fh, nodeId, false), datasync }));
  }

  async opendir(ctx: FsContext, nodeId: number, flags: number): Promise<OpenResult> {
    const r = await this.call<OpenResult>('fs.opendir', ctx, () => ({ n: this.remoteOf(nodeId), flags }));
    return { ...r, fh: this.addHandle(ctx, nodeId, flags, true, r.fh) };
  }

  readdir(ctx: FsContext, nodeId: number, fh: number, offset: number, maxEntries: number): Promise<DirEntry[]> {
    return this.call('fs.readdir', ctx, () => ({ n: this.remoteOf(nodeId), fh: this.remoteFh(fh, nodeId, true), off: offset, max: maxEntries }));
  }

  async readdirplus(ctx: FsContext, nodeId: number, fh: number, offset: number, maxEntries: number): Promise<DirEntryPlus[]> {
    const list = await this.call<DirEntryPlus[]>('fs.readdirplus', ctx, () => ({ n: this.remoteOf(nodeId), fh: this.remoteFh(fh, nodeId, true), off: offset, max: maxEntries }));
    return list.map((d) => (d.entry ? { ...d, entry: this.adopt(nodeId, d.name, d.entry) } : d));
  }

  async releasedir(ctx: FsContext, nodeId: number, fh: number): Promise<void> {
    const h = this.handles.get(fh);
    if (!h || !h.dir || h.node !== nodeId) throw new FsError('EBADF', `no such directory handle ${fh}`);
    try {
      await this.call('fs.releasedir', ctx, () => ({ n: this.remoteOf(nodeId), fh: this.remoteFh(fh, nodeId, true) }));
    } catch (e) {
      if (!(e instanceof FsError && e.code === 'ESTALE')) throw e;
    } finally {
      this.handles.delete(fh);
      const n = this.nodes.get(nodeId);
      if (n) this.reap(nodeId, n);
    }
  }

  async fsyncdir(ctx: FsContext, nodeId: number, fh: number, datasync: boolean): Promise<void> {
    await this.call('fs.fsyncdir', ctx, () => ({ n: this.remoteOf(nodeId), fh: this.remoteFh(fh, nodeId, true), datasync }));
  }

  statfs(ctx: FsContext, nodeId: number): Promise<StatFs> {
    return this.call('fs.statfs', ctx, () => ({ n: this.remoteOf(nodeId) }));
  }

  async setxattr(ctx: FsContext, nodeId: number, name: Buffer, value: Buffer, flags: number): Promise<void> {
    await this.call('fs.setxattr', ctx, () => ({ n: this.remoteOf(nodeId), name, value, flags }));
  }

  getxattr(ctx: FsContext, nodeId: number, name: Buffer): Promise<Buffer> {
    return this.call('fs.getxattr', ctx, () => ({ n: this.remoteOf(nodeId), name }));
  }

  listxattr(ctx: FsContext, nodeId: number): Promise<Buffer> {
    return this.call('fs.listxattr', ctx, () => ({ n: this.remoteOf(nodeId) }));
  }

  async removexattr(ctx: FsContext, nodeId: number, name: Buffer): Promise<void> {
    await this.call('fs.removexattr', ctx, () => ({ n: this.remoteOf(nodeId), name }));
  }

  async access(ctx: FsContext, nodeId: number, mask: number): Promise<void> {
    await this.call('fs.access', ctx, () => ({ n: this.remoteOf(nodeId), mask }));
  }

  async fallocate(ctx: FsContext, nodeId: number, fh: number, mode: number, offset: number, length: number): Promise<void> {
    await this.call('fs.fallocate', ctx, () => ({ n: this.remoteOf(nodeId), fh: this.remoteFh(fh, nodeId, false), mode, off: offset, len: length }));
  }

  lseek(ctx: FsContext, nodeId: number, fh: number, offset: number, whence: number): Promise<number> {
    return this.call('fs.lseek', ctx, () => ({ n: this.remoteOf(nodeId), fh: this.remoteFh(fh, nodeId, false), off: offset, whence }));
  }

  copyFileRange(
    ctx: FsContext,
    from: { nodeId: number; fh: number; offset: number },
    to: { nodeId: number; fh: number; offset: number },
    length: number,
    flags: number,
  ): Promise<number> {
    return this.call('fs.copyFileRange', ctx, () => ({
      from: { n: this.remoteOf(from.nodeId), fh: this.remoteFh(from.fh, from.nodeId, false), off: from.offset },
      to: { n: this.remoteOf(to.nodeId), fh: this.remoteFh(to.fh, to.nodeId, false), off: to.offset },
      len: length,
      flags,
    }));
  }

  async syncfs(ctx: FsContext): Promise<void> {
    await this.call('fs.syncfs', ctx, () => ({}));
  }

  getlk(ctx: FsContext, nodeId: number, fh: number, owner: bigint, lock: FileLock): Promise<FileLock> {
    return this.call('fs.getlk', ctx, () => ({ n: this.remoteOf(nodeId), fh: this.remoteFh(fh, nodeId, false), owner: this.owner(ctx.session, owner), lock }));
  }

  async setlk(
    ctx: FsContext,
    nodeId: number,
    fh: number,
    owner: bigint,
    lock: FileLock,
    opts: { wait: boolean; flock: boolean; signal?: AbortSignal },
  ): Promise<void> {
    const w = opts.wait ? `w${this.nextWait++}` : undefined;
    const salted = this.owner(ctx.session, owner);
    const p = { n: 0, fh: 0, owner: salted, lock, wait: opts.wait, flock: opts.flock, ...(w ? { w } : {}) };
    let sid: string | null = null;
    const cancel = (): void => {
      if (w && sid && this.rpc) this.rpc.call('fs.cancel', { w }).catch(() => {});
    };
    opts.signal?.addEventListener('abort', cancel, { once: true });
    try {
      if (opts.signal?.aborted) throw new FsError('EINTR', 'setlk interrupted');
      // A waiting lock may wait for as long as its holder keeps it (2^31-1 ms is setTimeout's limit).
      await this.call(
        'fs.setlk',
        ctx,
        () => {
          sid = this.sid;
          return { ...p, n: this.remoteOf(nodeId), fh: this.remoteFh(fh, nodeId, false) };
        },
        opts.wait ? 0x7fffffff : undefined,
      );
      if (!opts.flock && lock.type !== F_UNLCK) {
        let m = this.lockUse.get(ctx.session);
        if (!m) this.lockUse.set(ctx.session, (m = new Map()));
        let set = m.get(fh);
        if (!set) m.set(fh, (set = new Set()));
        set.add(salted);
      }
    } finally {
      opts.signal?.removeEventListener('abort', cancel);
    }
  }

  /** A host-side session ended: its POSIX locks are unlocked (a flush per owner and file) and its handles released (with their flocks). */
  async endSession(session: string): Promise<void> {
    const used = this.lockUse.get(session);
    this.lockUse.delete(session);
    for (const [fh, owners] of used ?? []) {
      const h = this.handles.get(fh);
      if (!h || h.dir) continue;
      for (const owner of owners) {
        await this.call('fs.flush', h.ctx, () => ({ n: this.remoteOf(h.node), fh: this.remoteFh(fh, h.node, false), owner })).catch(() => {});
      }
    }
    for (const [fh, h] of [...this.handles]) {
      if (h.ctx.session !== session) continue;
      await (h.dir ? this.releasedir(h.ctx, h.node, fh) : this.release(h.ctx, h.node, fh)).catch(() => {});
    }
  }

  /** Disconnects: the node ends the session (handles released, locks dropped, lookups forgotten). */
  async close(): Promise<void> {
    this.closed = true;
    this.sid = null;
    this.rpc?.close();
    this.rpc = null;
    this.nodes.clear();
    this.handles.clear();
    this.byRemote.clear();
    this.names.clear();
  }
}
