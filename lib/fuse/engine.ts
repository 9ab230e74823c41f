/**
 * The FUSE engine: wire requests in, FileTree calls, wire replies out. It knows nothing of
 * where a frame came from — /dev/fuse (devfuse.ts) or a virtqueue (lib/vhost/fs.ts) — so every
 * transport uses the same entry point:
 *
 *   `handle(frame)` -> `Promise<Buffer[] | null>`
 *
 * The reply is a list of pieces to write as one message (writev on /dev/fuse, scattered into the
 * writable descriptors of a virtqueue chain): a 16-byte fuse_out_header, then the payload. `null`
 * means no reply is due (FORGET, BATCH_FORGET, INTERRUPT, or a frame whose header could not be
 * trusted). The promise never rejects: a FileTree error becomes `-errno`, anything unexpected
 * becomes EIO and a log line.
 *
 * Copies: a WRITE payload reaches `tree.write` as a view of the frame (the frame must stay
 * untouched until the reply is out); a READ reply's data piece is the Buffer the tree returned,
 * not copied here. A virtqueue transport that wants READ data placed straight into the guest's
 * descriptors needs a read-into-buffers call on FileTree; the reply shape (header piece + data
 * pieces) already lets it hand those descriptors back as the payload.
 *
 * Concurrency: requests run concurrently, up to `maxInFlight` (default 64); `handle` beyond that
 * waits for a slot, and `saturated` tells a transport to stop reading until a reply goes out.
 * INTERRUPT and FORGET never wait for a slot (an interrupt must reach a SETLKW that holds one).
 */
import { constants as osConstants } from 'node:os';
import type { Logger } from '../log.js';
import type { Entry, FileTree, FsContext, DirEntryPlus } from '../fs/tree.js';
import { FsError } from '../fs/errors.js';
import {
  FuseDecodeError,
  decodeRequest,
  encodeAttrOut,
  encodeCreateOut,
  encodeEntryOut,
  encodeError,
  encodeGetxattrOut,
  encodeInitOut,
  encodeLkOut,
  encodeLseekOut,
  encodeOpenOut,
  encodeReply,
  encodeStatfsOut,
  encodeWriteOut,
  packDirents,
  packDirentsPlus,
  type DecodeOptions,
  type FuseRequest,
  type Ttls,
} from './codec.js';
import {
  FOPEN_DIRECT_IO,
  FOPEN_KEEP_CACHE,
  FUSE_KERNEL_MINOR_VERSION,
  FUSE_KERNEL_VERSION,
  FUSE_MIN_MINOR_VERSION,
  Init,
  OP_NAMES,
  Op,
  Size,
} from './constants.js';

const E = osConstants.errno;
const PAGE = 4096;
/** Linux's MAX_RW_COUNT: the most one read/write/copy moves; fuse_write_out.size is a u32. */
const MAX_RW_COUNT = 0x7ffff000;
const O_ACCMODE = 3;
const O_TRUNC = 0o1000;

/** What we accept of what the kernel offers in INIT (see `negotiate`). */
export const WANTED_FLAGS =
  Init.ASYNC_READ |
  Init.POSIX_LOCKS |
  Init.FLOCK_LOCKS |
  Init.ATOMIC_O_TRUNC |
  Init.EXPORT_SUPPORT |
  Init.BIG_WRITES |
  Init.DONT_MASK |
  Init.AUTO_INVAL_DATA |
  Init.DO_READDIRPLUS |
  Init.READDIRPLUS_AUTO |
  Init.ASYNC_DIO |
  Init.PARALLEL_DIROPS |
  Init.HANDLE_KILLPRIV_V2 |
  Init.MAX_PAGES |
  Init.CACHE_SYMLINKS |
  Init.SETXATTR_EXT |
  Init.ABORT_ERROR |
  Init.INIT_EXT;

/** Requests that change the tree: answered EROFS on a read-only share before they reach it. */
const WRITES = new Set<FuseRequest['kind']>([
  'SETATTR',
  'SYMLINK',
  'MKNOD',
  'MKDIR',
  'UNLINK',
  'RMDIR',
  'RENAME',
  'LINK',
  'CREATE',
  'WRITE',
  'SETXATTR',
  'REMOVEXATTR',
  'FALLOCATE',
  'COPY_FILE_RANGE',
]);

export interface FuseEngineOptions {
  tree: FileTree;
  logger: Logger;
  /** Identifies this client to the tree (locks, handles and lookups are per session). */
  session: string;
  /** Refuse every change with EROFS (the tree may refuse too; this stops it at the edge). */
  readOnly?: boolean;
  /** Largest WRITE (and READ) offered to the kernel; default 1 MiB, at most 256 pages without MAX_PAGES it is 128 KiB. */
  maxWrite?: number;
  /** Default cache lifetimes of names and attributes, when the tree gives none (1 s, as virtiofsd's cache=auto). */
  entryTtlMs?: number;
  attrTtlMs?: number;
  /** Requests served at once; default 64. */
  maxInFlight?: number;
}

/** What INIT settled; `undefined` until then. */
export interface Negotiated {
  major: number;
  minor: number;
  flags: bigint;
  maxWrite: number;
  maxPages: number;
  maxReadahead: number;
}

export class FuseEngine {
  readonly session: string;
  readonly maxInFlight: number;
  private readonly tree: FileTree;
  private readonly log: Logger;
  private readonly readOnly: boolean;
  private readonly wantMaxWrite: number;
  private readonly ttls: Ttls;
  private decodeOpts: DecodeOptions;
  private conn: Negotiated | undefined;
  /**
   * Interruptible requests in flight, by unique. Only a SETLKW waits for something that an
   * INTERRUPT can end (every other request completes on its own, which FUSE allows), so only it
   * pays for an AbortController.
   */
  private readonly inflight = new Map<bigint, AbortController>();
  private running = 0;
  private readonly waiters: (() => void)[] = [];
  private ended = false;
  private readonly idle: (() => void)[] = [];

  constructor(opts: FuseEngineOptions) {
    this.tree = opts.tree;
    this.log = opts.logger;
    this.session = opts.session;
    this.readOnly = opts.readOnly ?? false;
    this.wantMaxWrite = Math.max(PAGE, Math.min(opts.maxWrite ?? 1 << 20, 256 * PAGE));
    this.ttls = { entryTtlMs: opts.entryTtlMs ?? 1000, attrTtlMs: opts.attrTtlMs ?? 1000 };
    this.maxInFlight = Math.max(1, opts.maxInFlight ?? 64);
    this.decodeOpts = { maxWrite: this.wantMaxWrite, maxRead: this.wantMaxWrite };
  }

  /** What INIT negotiated, or undefined before it. */
  get negotiated(): Negotiated | undefined {
    return this.conn;
  }

  /**
   * Continues a session that INIT settled in another process (the daemon's live handoff,
   * lib/daemon/handoff.ts: `negotiated` there, this here): as if INIT had just been answered.
   */
  resumeSession(n: Negotiated): void {
    this.conn = { ...n };
    this.ended = false;
    this.decodeOpts = { setxattrExt: (n.flags & Init.SETXATTR_EXT) !== 0n, maxWrite: n.maxWrite, maxRead: Math.max(n.maxWrite, n.maxPages * PAGE) };
  }

  /** Requests being served now. */
  get inFlight(): number {
    return this.running;
  }

  /** A transport should stop reading new requests until this is false again. */
  get saturated(): boolean {
    return this.running >= this.maxInFlight;
  }

  /**
   * The largest frame a transport must be able to receive: header + fuse_write_in + max_write
   * (the kernel refuses a /dev/fuse read with a smaller buffer), rounded up to a page.
   */
  get frameSize(): number {
    return this.wantMaxWrite + PAGE;
  }

  /** Serves one frame. See the file comment for the reply shape; never rejects. */
  async handle(frame: Buffer): Promise<Buffer[] | null> {
    let req: FuseRequest;
    try {
      req = decodeRequest(frame, this.decodeOpts);
    } catch (e) {
      if (e instanceof FuseDecodeError && e.unique !== undefined) {
        this.log.warn({ op: OP_NAMES.get(e.opcode ?? 0) ?? e.opcode, err: e.message }, 'fuse: malformed request');
        // A malformed INTERRUPT or FORGET expects no reply.
        if (e.opcode === Op.FORGET || e.opcode === Op.BATCH_FORGET || e.opcode === Op.INTERRUPT) return null;
        return [encodeError(e.unique, errnoOf(e.errno))];
      }
      this.log.warn({ err: (e as Error).message }, 'fuse: frame dropped, header unusable');
      return null;
    }
    // No slot for these: they are answered (or not) at once.
    switch (req.kind) {
      case 'FORGET':
        if (this.conn) this.tree.forget(req.h.nodeId, req.nlookup);
        return null;
      case 'BATCH_FORGET':
        if (this.conn) for (const f of req.forgets) this.tree.forget(f.nodeId, f.nlookup);
        return null;
      case 'INTERRUPT':
        this.inflight.get(req.target)?.abort();
        return null;
      case 'INIT':
        return this.init(req);
    }
    if (!this.conn) return [encodeError(req.h.unique, E.EIO)];
    // Registered before waiting for a slot: the kernel sends the INTERRUPT right after the
    // request, and it must find it even while the request waits for a slot.
    let ac: AbortController | undefined;
    if (req.kind === 'SETLKW') {
      ac = new AbortController();
      this.inflight.set(req.h.unique, ac);
    }
    await this.acquire();
    try {
      if (ac?.signal.aborted) return [encodeError(req.h.unique, E.EINTR)];
      return await this.dispatch(req, ac?.signal);
    } catch (e) {
      return [this.errorReply(req, e)];
    } finally {
      if (ac) this.inflight.delete(req.h.unique);
      this.release();
    }
  }

  /** Waits until no request is in flight (for a transport that stops). */
  async drain(): Promise<void> {
    if (this.running === 0) return;
    await new Promise<void>((resolve) => this.idle.push(resolve));
  }

  /**
   * The transport is gone (device reset, /dev/fuse closed, unmounted): in-flight lock waits are
   * interrupted and the session's handles, locks and lookups are dropped. Idempotent. With
   * `drainMs`, requests still running get that long to finish first, so that the tree is not
   * torn down under them (not from DESTROY, which is itself one of them).
   */
  async end(opts: { drainMs?: number } = {}): Promise<void> {
    for (const ac of this.inflight.values()) ac.abort();
    this.conn = undefined;
    if (this.ended) return;
    this.ended = true;
    if (opts.drainMs && this.running > 0) {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([this.drain(), new Promise<void>((r) => (timer = setTimeout(r, opts.drainMs).unref()))]);
      clearTimeout(timer);
    }
    await this.tree.endSession(this.session).catch((e: unknown) => this.log.error({ err: e }, 'fuse: endSession failed'));
  }

  /**
   * A device reset (virtio-fs: the front end reset the device or went away): `end()` without
   * waiting. The next INIT starts a new session under the same name.
   */
  reset(): void {
    void this.end();
  }

  private acquire(): Promise<void> | void {
    if (this.running < this.maxInFlight) {
      this.running++;
      return;
    }
    return new Promise((resolve) =>
      this.waiters.push(() => {
        this.running++;
        resolve();
      }),
    );
  }

  private release(): void {
    this.running--;
    const next = this.waiters.shift();
    if (next) next();
    else if (this.running === 0) for (const r of this.idle.splice(0)) r();
  }

  private errorReply(req: FuseRequest, e: unknown): Buffer {
    if (e instanceof FsError) {
      if (this.log.isLevelEnabled('debug')) this.log.debug({ op: req.kind, errno: e.code }, 'fuse: error reply');
      return encodeError(req.h.unique, e.errno);
    }
    this.log.error({ op: req.kind, err: e }, 'fuse: unexpected error, answered EIO');
    return encodeError(req.h.unique, E.EIO);
  }

  private init(req: Extract<FuseRequest, { kind: 'INIT' }>): Buffer[] {
    const u = req.h.unique;
    if (req.major < FUSE_KERNEL_VERSION) {
      this.log.error({ major: req.major, minor: req.minor }, 'fuse: protocol too old, refused');
      return [encodeError(u, E.EPROTO)];
    }
    if (req.major > FUSE_KERNEL_VERSION) {
      // The kernel retries INIT with our major after this reply (fuse.h, version negotiation).
      return encodeReply(u, [encodeInitOut({ major: FUSE_KERNEL_VERSION, minor: FUSE_KERNEL_MINOR_VERSION, maxReadahead: 0, flags: 0n, maxBackground: 0, congestionThreshold: 0, maxWrite: 0, timeGran: 0, maxPages: 0 })]);
    }
    if (req.minor < FUSE_MIN_MINOR_VERSION) {
      this.log.error({ major: req.major, minor: req.minor }, `fuse: protocol 7.${req.minor} is older than 7.${FUSE_MIN_MINOR_VERSION}, refused`);
      return [encodeError(u, E.EPROTO)];
    }
    let flags = req.flags & WANTED_FLAGS;
    // Without MAX_PAGES the kernel caps requests at 32 pages.
    const maxPages = flags & Init.MAX_PAGES ? Math.ceil(this.wantMaxWrite / PAGE) : 32;
    const maxWrite = Math.min(this.wantMaxWrite, maxPages * PAGE);
    if (!(req.flags & Init.INIT_EXT)) flags &= 0xffffffffn;
    const minor = Math.min(req.minor, FUSE_KERNEL_MINOR_VERSION);
    this.conn = { major: FUSE_KERNEL_VERSION, minor, flags, maxWrite, maxPages, maxReadahead: req.maxReadahead };
    this.ended = false;
    this.decodeOpts = { setxattrExt: (flags & Init.SETXATTR_EXT) !== 0n, maxWrite, maxRead: Math.max(maxWrite, maxPages * PAGE) };
    this.log.info({ session: this.session, kernel: `${req.major}.${req.minor}`, minor, flags: `0x${flags.toString(16)}`, maxWrite }, 'fuse: session initialized');
    return encodeReply(u, [
      encodeInitOut({
        major: FUSE_KERNEL_VERSION,
        minor: FUSE_KERNEL_MINOR_VERSION,
        maxReadahead: req.maxReadahead,
        flags,
        maxBackground: 64,
        congestionThreshold: 48,
        maxWrite,
        timeGran: 1,
        maxPages,
      }),
    ]);
  }

  private entry(u: bigint, e: Entry): Buffer[] {
    return encodeReply(u, [encodeEntryOut(e, this.ttls)]);
  }

  private async dispatch(req: FuseRequest, signal: AbortSignal | undefined): Promise<Buffer[]> {
    const u = req.h.unique;
    const t = this.tree;
    const node = req.h.nodeId;
    if (this.readOnly && WRITES.has(req.kind)) return [encodeError(u, E.EROFS)];
    const ctx: FsContext = { uid: req.h.uid, gid: req.h.gid, pid: req.h.pid, session: this.session };
    switch (req.kind) {
      case 'DESTROY':
        await this.end();
        return encodeReply(u);
      case 'LOOKUP':
        return this.entry(u, await t.lookup(ctx, node, req.name));
      case 'GETATTR': {
        const r = await t.getattr(ctx, node, req.fh);
        return encodeReply(u, [encodeAttrOut(r.attr, r.attrTtlMs ?? this.ttls.attrTtlMs)]);
      }
      case 'SETATTR': {
        const r = await t.setattr(ctx, node, req.changes, req.fh);
        return encodeReply(u, [encodeAttrOut(r.attr, r.attrTtlMs ?? this.ttls.attrTtlMs)]);
      }
      case 'READLINK':
        return encodeReply(u, [await t.readlink(ctx, node)]);
      case 'SYMLINK':
        return this.entry(u, await t.symlink(ctx, node, req.name, req.target));
      // With DONT_MASK the kernel leaves the umask to us; applying it here keeps a tree that
      // ignores ctx.umask right, and one that applies it again gets the same bits.
      case 'MKNOD':
        ctx.umask = req.umask;
        return this.entry(u, await t.mknod(ctx, node, req.name, req.mode & ~req.umask, req.rdev));
      case 'MKDIR':
        ctx.umask = req.umask;
        return this.entry(u, await t.mkdir(ctx, node, req.name, req.mode & ~req.umask));
      case 'UNLINK':
        await t.unlink(ctx, node, req.name);
        return encodeReply(u);
      case 'RMDIR':
        await t.rmdir(ctx, node, req.name);
        return encodeReply(u);
      case 'RENAME':
        await t.rename(ctx, node, req.name, req.newParent, req.newName, req.flags);
        return encodeReply(u);
      case 'LINK':
        return this.entry(u, await t.link(ctx, req.oldNodeId, node, req.newName));
      case 'OPEN': {
        if (this.readOnly && ((req.flags & O_ACCMODE) !== 0 || req.flags & O_TRUNC)) return [encodeError(u, E.EROFS)];
        const r = await t.open(ctx, node, req.flags);
        if (req.killSuidGid && req.flags & O_TRUNC) await t.setattr(ctx, node, { killSuidGid: true }, r.fh);
        return encodeReply(u, [encodeOpenOut(r.fh, openFlags(r))]);
      }
      case 'CREATE': {
        ctx.umask = req.umask;
        const r = await t.create(ctx, node, req.name, req.mode & ~req.umask, req.flags);
        return encodeReply(u, [encodeCreateOut(r.entry, this.ttls, r.open.fh, openFlags(r.open))]);
      }
      case 'READ': {
        const data = await t.read(ctx, node, req.fh, req.offset, req.size);
        // Never more than asked: the kernel would take a longer reply as a protocol error.
        return encodeReply(u, [data.length > req.size ? data.subarray(0, req.size) : data]);
      }
      case 'WRITE': {
        // HANDLE_KILLPRIV_V2: the kernel asks us to drop setuid/setgid as the write happens.
        if (req.killSuidGid) await t.setattr(ctx, node, { killSuidGid: true }, req.fh);
        const n = await t.write(ctx, node, req.fh, req.offset, req.data);
        return encodeReply(u, [encodeWriteOut(n)]);
      }
      case 'STATFS':
        return encodeReply(u, [encodeStatfsOut(await t.statfs(ctx, node))]);
      case 'RELEASE':
        if (req.flush) await t.flush(ctx, node, req.fh, req.lockOwner);
        await t.release(ctx, node, req.fh, req.flockUnlock ? req.lockOwner : undefined);
        return encodeReply(u);
      case 'RELEASEDIR':
        await t.releasedir(ctx, node, req.fh);
        return encodeReply(u);
      case 'FLUSH':
        await t.flush(ctx, node, req.fh, req.lockOwner);
        return encodeReply(u);
      case 'FSYNC':
        await t.fsync(ctx, node, req.fh, req.datasync);
        return encodeReply(u);
      case 'FSYNCDIR':
        await t.fsyncdir(ctx, node, req.fh, req.datasync);
        return encodeReply(u);
      case 'SETXATTR':
        await t.setxattr(ctx, node, req.name, req.value, req.flags);
        return encodeReply(u);
      case 'GETXATTR':
        return this.sized(u, req.size, await t.getxattr(ctx, node, req.name));
      case 'LISTXATTR':
        return this.sized(u, req.size, await t.listxattr(ctx, node));
      case 'REMOVEXATTR':
        await t.removexattr(ctx, node, req.name);
        return encodeReply(u);
      case 'OPENDIR': {
        const r = await t.opendir(ctx, node, req.flags);
        return encodeReply(u, [encodeOpenOut(r.fh, openFlags(r))]);
      }
      case 'READDIR': {
        const entries = await t.readdir(ctx, node, req.fh, req.offset, Math.max(1, Math.floor(req.size / (Size.DIRENT + 8))));
        return encodeReply(u, [packDirents(entries, req.size).buf]);
      }
      case 'READDIRPLUS': {
        // The smallest entry takes 160 bytes: ask for no more than could fit.
        const max = Math.max(1, Math.floor(req.size / (Size.DIRENTPLUS + 8)));
        const entries = await t.readdirplus(ctx, node, req.fh, req.offset, max);
        const { buf, count } = packDirentsPlus(entries, req.size, this.ttls);
        this.forgetUnsent(entries, count);
        return encodeReply(u, [buf]);
      }
      case 'ACCESS':
        await t.access(ctx, node, req.mask);
        return encodeReply(u);
      case 'FALLOCATE':
        await t.fallocate(ctx, node, req.fh, req.mode, req.offset, req.length);
        return encodeReply(u);
      case 'LSEEK':
        return encodeReply(u, [encodeLseekOut(await t.lseek(ctx, node, req.fh, req.offset, req.whence))]);
      case 'COPY_FILE_RANGE': {
        const n = await t.copyFileRange(
          ctx,
          { nodeId: node, fh: req.fhIn, offset: req.offIn },
          { nodeId: req.nodeIdOut, fh: req.fhOut, offset: req.offOut },
          Math.min(req.len, MAX_RW_COUNT),
          req.flags,
        );
        return encodeReply(u, [encodeWriteOut(n)]);
      }
      case 'SYNCFS':
        await t.syncfs(ctx);
        return encodeReply(u);
      case 'GETLK':
        return encodeReply(u, [encodeLkOut(await t.getlk(ctx, node, req.fh, req.owner, req.lock))]);
      case 'SETLK':
      case 'SETLKW':
        await t.setlk(ctx, node, req.fh, req.owner, req.lock, { wait: req.kind === 'SETLKW', flock: req.flock, ...(signal ? { signal } : {}) });
        return encodeReply(u);
      case 'UNSUPPORTED':
        if (this.log.isLevelEnabled('debug')) this.log.debug({ opcode: req.h.opcode, op: OP_NAMES.get(req.h.opcode) }, 'fuse: ENOSYS');
        return [encodeError(u, E.ENOSYS)];
      default:
        // INIT, FORGET, BATCH_FORGET and INTERRUPT never get here.
        return [encodeError(u, E.ENOSYS)];
    }
  }

  /** getxattr/listxattr: size 0 asks for the size; a buffer too small is ERANGE. */
  private sized(u: bigint, size: number, value: Buffer): Buffer[] {
    if (size === 0) return encodeReply(u, [encodeGetxattrOut(value.length)]);
    if (value.length > size) return [encodeError(u, E.ERANGE)];
    return encodeReply(u, [value]);
  }

  /** READDIRPLUS entries the tree looked up but the reply had no room for: the kernel never saw them. */
  private forgetUnsent(entries: readonly DirEntryPlus[], sent: number): void {
    for (let i = sent; i < entries.length; i++) {
      const e = entries[i]!.entry;
      if (e && e.nodeId !== 0) this.tree.forget(e.nodeId, 1);
    }
  }
}

function openFlags(r: { directIo?: boolean; keepCache?: boolean }): number {
  return (r.directIo ? FOPEN_DIRECT_IO : 0) | (r.keepCache ? FOPEN_KEEP_CACHE : 0);
}

function errnoOf(name: string): number {
  return (E as Record<string, number>)[name] ?? E.EIO;
}
