/**
 * RemoteVolume: a Volume served by an NBD server elsewhere (a storage node, qemu-nbd, nbdkit),
 * through one or more NbdClientConnections. The replicated layer holds one per replica.
 *
 * Multipath (lib/paths): the node is reached over several paths (its NBD addresses × local
 * source addresses), whose health is shared by every volume on that node (NodePaths). There is
 * one connection per path (more, spread over the paths, when `connections` asks for more), and
 * a request goes to the path the node's selector picks (per-VM home path, priority, round-robin
 * / least-pending / service-time), then to the least busy connection on it.
 *
 * Failover: a request whose connection breaks (server gone, socket error, no reply within the
 * path's request timeout) is retried on another path of the same node, and only when every path
 * was tried does it fail (EIO) — then the replicated layer above demotes the replica as before.
 * An error the node answered (ENOSPC, EIO from its disk...) is not a path's fault: no retry.
 *
 * Why a retried write cannot land after a later overlapping write. NBD writes, trims and zeroes
 * are idempotent, so sending one twice is harmless by itself; the danger is the first copy
 * landing late, after a newer write to the same bytes. (1) Nothing newer is sent meanwhile:
 * OrderedVolume above (the daemon's export) holds every overlapping request until this one
 * completed — and it completes only after the retry succeeded (checked in lib/block/ordering.ts:
 * write-like operations wait for every earlier unfinished overlapping operation). (2) The first
 * copy is never sent again: the connection is destroyed before its requests are rejected (the
 * client's fail() destroys the socket first), so the kernel drops what it had not sent and never
 * retransmits. (3) A copy the node already received is in the node's own OrderedVolume (shared
 * by all its connections) before the retry arrives, so the retry, and every later overlapping
 * write, waits for it there. The remaining window is a first copy sitting unread in the node's
 * socket buffer for longer than the request timeout (a node stalled that long) while the retry
 * arrives on another path: the node's export ordering cannot see it yet. The timeout (seconds)
 * against a read latency of microseconds keeps that window theoretical; a node-side fence (the
 * node dropping a dead connection's requests) would close it.
 *
 * Without CAN_MULTI_CONN the server promises nothing across connections, so the paths are used
 * active/passive: every request goes to one path until it fails.
 *
 * - `open()` must reach the server once: size, limits and caps come from that first handshake.
 * - `up` is true while at least one connection is established. While it is false every new
 *   request fails at once with ESHUTDOWN (nothing is queued: the layer above decides whether to
 *   wait or to go degraded).
 * - A broken connection is re-established in the background with exponential backoff until
 *   close(); a server that comes back with another size, or with fewer capabilities than the
 *   volume advertised, is logged and treated as still down. 'down' is emitted when the last
 *   connection breaks (once per outage), 'up' when one is back. When the node's paths mark a
 *   path down (probes), this volume's connections on it are dropped, so that requests stuck on a
 *   blackholed path are retried elsewhere without waiting for their timeout.
 * - Short-circuit local reads (shortcircuit.ts; HDFS's precedent): when the node is reached over
 *   a unix socket P and offers `P.sc`, the volume asks it for a read-only descriptor of the
 *   volume's file and serves reads with pread on it (page cache first, on the event loop) instead
 *   of an NBD round trip; writes still go over NBD to the node, which writes the same file through
 *   the page cache, so a read after an acknowledged write sees it. The descriptor is dropped when
 *   the node ends its lease, when any NBD connection breaks (asked for again once connected), on
 *   close(), and while the replicated layer says the replica is not in sync (setShortCircuit).
 * - Short-circuit local writes (`shortCircuitWrites`, on by default with short-circuit reads):
 *   the descriptor is asked for read-write, and while it is held a write is pwrite on it (FUA:
 *   pwrite + fdatasync) and FLUSH is fdatasync of it (plus an NBD FLUSH when something went over
 *   NBD since the last one: trims, zeroes, writes made while no descriptor was held), with no NBD
 *   round trip and no copy through the node. The node keeps no state about the data (why that is
 *   so, and what would break it: lib/node/shortcircuit.ts). A local write that fails with the
 *   disk's error (EIO, ENOSPC) fails as the node's error reply would (the replicated layer
 *   demotes the replica); one whose lease ended before it was known to be done (ESHUTDOWN, see
 *   lib/block/shortcircuit.ts) is treated as a write whose connection broke: it is sent again
 *   over NBD (writes are idempotent and the local copy is complete before the NBD one is sent),
 *   and fails when NBD is down too, so the replicated layer marks and demotes exactly as for NBD.
 * - Requests larger than the server accepts are split; writeZeroes is emulated by writes of
 *   zeroes when the server lacks WRITE_ZEROES; FUA is emulated by a flush when the server lacks
 *   SEND_FUA; unaligned requests on a server with a minimum block size are read-modify-written.
 */
import { EventEmitter } from 'node:events';
import { VolumeError, toVolumeError } from './errors.js';
import type { BlockLimits, Extent, Volume, VolumeCapabilities, WriteOptions, ZeroOptions } from './volume.js';
import type { Logger } from '../log.js';
import * as C from '../nbd/constants.js';
import { NbdClientConnection, parseNbdUri } from '../nbd/client.js';
import { NodePaths } from '../paths/node-paths.js';
import type { Path, PathChangeEvent, RequestKind } from '../paths/index.js';
import { DEFAULT_PATH_POLICY, pathPolicy } from '../paths/policy.js';
import type { Cursor } from '../paths/select.js';
import { ShortCircuitReader } from './shortcircuit.js';

export interface RemoteVolumeOptions {
  /** Replica id for logs and events, e.g. the node id. */
  id: string;
  /** One or more paths to the same server (lib/net syntax or nbd URIs), tried in order. */
  addresses: string[];
  /** Export name. */
  export: string;
  /** Connections when the server advertises CAN_MULTI_CONN (default 1). */
  connections?: number;
  /** Per-request timeout (ms); default 30000. */
  timeoutMs?: number;
  /** Connect + handshake timeout per address (ms); default 5000. */
  connectTimeoutMs?: number;
  /** Reconnect backoff: initialMs (default 100) doubling up to maxMs (default 5000). */
  reconnect?: { initialMs?: number; maxMs?: number };
  /** Requests on the wire per connection (default 64). */
  maxInflightPerConnection?: number;
  /** The node's paths, shared with the daemon's other volumes on it; default: built from `addresses` with the default policy. */
  paths?: NodePaths;
  /** The VM this volume serves: it gets a home path (affinity) on the node. */
  vm?: string;
  /** High-priority VMs take the least-loaded path instead of their home. */
  priority?: 'normal' | 'high';
  /** Short-circuit local reads when the node offers them (default true). */
  shortCircuit?: boolean;
  /** Short-circuit local writes too: ask for a read-write descriptor (default: as shortCircuit). */
  shortCircuitWrites?: boolean;
  logger: Logger;
}

/** Short-circuit state of a replica (status, metrics). */
export interface ShortCircuitStatus {
  /** A descriptor is held and used now. */
  active: boolean;
  /** Reads served from the descriptor so far. */
  reads: number;
  /** Descriptors received so far. */
  grants: number;
  /** Writes (and FUA writes) served by the descriptor so far. */
  writes: number;
  /** The descriptor held now is read-write. */
  writable: boolean;
}

export interface RemoteDownEvent {
  id: string;
  reason: string;
}
export interface RemoteUpEvent {
  id: string;
  address: string;
}

/** Default block limits when the server sends no NBD_INFO_BLOCK_SIZE. */
export const REMOTE_DEFAULT_LIMITS: Readonly<BlockLimits> = Object.freeze({ minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 });
/** Bytes one emulated write-zeroes request writes at most. */
const ZERO_CHUNK = 1024 * 1024;
/** Split pieces of one call in flight at once. */
const SPLIT_CONCURRENCY = 8;
/** A short-circuit descriptor refused for a passing reason (timeout, busy node) is asked for again after this. */
const SC_RETRY_MS = 2000;
/** Largest length sent in one TRIM / fast WRITE_ZEROES / BLOCK_STATUS (the wire length is 32 bits). */
const BIG_OP = 1 << 30;

interface Slot {
  index: number;
  path: Path;
  conn: NbdClientConnection | null;
  connecting: boolean;
  timer: NodeJS.Timeout | null;
  backoff: number;
}

export class RemoteVolume extends EventEmitter implements Volume {
  readonly id: string;
  readonly size: number;
  readonly limits: BlockLimits;
  readonly caps: VolumeCapabilities;
  private readonly flags: number;
  private readonly blockStatusNegotiated: boolean;
  private readonly slots: Slot[];
  private readonly log: Logger;
  private readonly initialMs: number;
  private readonly maxMs: number;
  private closed = false;
  private wasUp = true;
  private zeroBuf: Buffer | null = null;
  /** Serializes read-modify-write of partial blocks (only with a minimum block size > 1). */
  private rmwTail: Promise<void> = Promise.resolve();
  readonly nodePaths: NodePaths;
  private readonly home: Path | undefined;
  private readonly high: boolean;
  private readonly cursor: Cursor = { next: 0 };
  /** Without multi-conn: the one path in use (active/passive). */
  private active: Slot | null = null;
  /** Requests retried on another path after their path failed. */
  failovers = 0;
  private keepalive: NodeJS.Timeout | null = null;
  /** The node's short-circuit socket (`<unix nbd socket>.sc`), or null (TCP node, switched off). */
  private readonly scSocket: string | null;
  private sc: ShortCircuitReader | null = null;
  private scAcquiring = false;
  /** The replicated layer allows it (the replica is in sync). */
  private scAllowed = true;
  /** A descriptor was refused (ENOENT: a plain NBD server, no such socket): not asked again until reconnect. */
  private scRefused = false;
  /** Reads served by the short-circuit descriptor. */
  shortCircuitReads = 0;
  /** Writes served by the short-circuit descriptor. */
  shortCircuitWrites = 0;
  /** Ask for a read-write descriptor. */
  private readonly scWrite: boolean;
  /** Something was written over NBD since the last flush (the flush then goes over NBD too). */
  private nbdDirty = false;
  private scGrants = 0;
  private readonly onPathHealthy = (p: Path): void => {
    for (const s of this.slots) {
      if (s.path !== p || s.conn || s.connecting || !s.timer) continue;
      clearTimeout(s.timer);
      s.timer = null;
      void this.reconnectNow(s);
    }
  };
  private readonly onPathChange = (e: PathChangeEvent): void => {
    if (e.path.state !== 'down') return;
    for (const s of this.slots) if (s.path.id === e.path.id && s.conn) s.conn.destroy(`path ${e.path.id} is down: ${e.path.reason ?? ''}`);
  };

  private constructor(private readonly opts: RemoteVolumeOptions, paths: NodePaths, first: NbdClientConnection, firstPath: Path, log: Logger) {
    super();
    this.id = opts.id;
    this.log = log;
    this.size = first.size;
    this.flags = first.flags;
    const f = first.flags;
    const bs = first.info.blockSize;
    const minimum = bs?.minimum ?? REMOTE_DEFAULT_LIMITS.minimum;
    const preferred = Math.max(bs?.preferred ?? REMOTE_DEFAULT_LIMITS.preferred, minimum);
    let maximum = Math.min(REMOTE_DEFAULT_LIMITS.maximum, bs?.maximum ?? REMOTE_DEFAULT_LIMITS.maximum);
    maximum = Math.max(minimum, Math.floor(maximum / minimum) * minimum);
    this.limits = Object.freeze({ minimum, preferred, maximum });
    this.blockStatusNegotiated = first.info.baseAllocationId !== null;
    const readOnly = (f & C.NBD_FLAG_READ_ONLY) !== 0;
    const writeZeroes = !readOnly && (f & C.NBD_FLAG_SEND_WRITE_ZEROES) !== 0;
    this.caps = Object.freeze({
      readOnly,
      flush: (f & C.NBD_FLAG_SEND_FLUSH) !== 0,
      fua: !readOnly && (f & C.NBD_FLAG_SEND_FUA) !== 0,
      trim: !readOnly && (f & C.NBD_FLAG_SEND_TRIM) !== 0,
      writeZeroes,
      fastZero: writeZeroes && (f & C.NBD_FLAG_SEND_FAST_ZERO) !== 0,
      blockStatus: this.blockStatusNegotiated,
      prefetch: (f & C.NBD_FLAG_SEND_CACHE) !== 0,
      multiConn: (f & C.NBD_FLAG_CAN_MULTI_CONN) !== 0,
    });
    this.initialMs = opts.reconnect?.initialMs ?? 100;
    this.maxMs = Math.max(this.initialMs, opts.reconnect?.maxMs ?? 5000);
    this.nodePaths = paths;
    const ps = paths.paths;
    // One connection per path at least; more (multi-conn only) spread over the paths, the first
    // on the path that answered the first handshake.
    const n = this.caps.multiConn ? Math.max(ps.length, Math.floor(opts.connections ?? 1)) : ps.length;
    const at = ps.indexOf(firstPath);
    this.slots = Array.from({ length: n }, (_, index) => ({
      index, path: ps[(at + index) % ps.length]!, conn: null, connecting: false, timer: null, backoff: this.initialMs,
    }));
    this.home = opts.vm !== undefined ? paths.assignHome(opts.vm) : undefined;
    this.high = opts.priority === 'high';
    paths.acquire();
    paths.on('change', this.onPathChange);
    paths.on('healthy', this.onPathHealthy);
    this.scSocket = opts.shortCircuit === false ? null : shortCircuitSocket(paths.paths.map((p) => p.address));
    this.scWrite = !readOnly && (opts.shortCircuitWrites ?? opts.shortCircuit ?? true);
    this.attach(this.slots[0]!, first);
    const every = paths.policy.healthIntervalMs;
    if (every > 0) {
      this.keepalive = setInterval(() => this.keepaliveReads(), every);
      this.keepalive.unref();
    }
  }

  /**
   * The NOP-like health check of up paths: a small read on every idle connection. A path that
   * swallows requests (blackholed, the connection still open) fails it by the request timeout,
   * which breaks the connection and takes the path down before a guest request is stuck there.
   */
  private keepaliveReads(): void {
    const len = Math.min(this.size, this.limits.minimum > 1 ? this.limits.minimum : 512);
    if (len === 0) return;
    for (const s of this.slots) {
      const c = s.conn;
      if (!c || !c.ready || c.pending > 0) continue;
      const path = s.path;
      const t0 = performance.now();
      path.begin();
      c.read(0, Buffer.allocUnsafe(len)).then(
        () => path.succeeded(performance.now() - t0, 'other', 0),
        (e: unknown) => path.failed(!c.ready, (e as Error).message),
      );
    }
  }

  /** Connects (the first connection must succeed) and opens the other connections of multi-conn. */
  static async open(opts: RemoteVolumeOptions): Promise<RemoteVolume> {
    if (!Array.isArray(opts.addresses) || opts.addresses.length === 0) throw new VolumeError('EINVAL', `remote ${opts.id}: no address`);
    for (const a of opts.addresses) {
      let t;
      try {
        t = parseNbdUri(a);
      } catch (e) {
        throw new VolumeError('EINVAL', `remote ${opts.id}: ${(e as Error).message}`);
      }
      if (t.export !== undefined && t.export !== '' && t.export !== opts.export) {
        throw new VolumeError('EINVAL', `remote ${opts.id}: address ${a} names export '${t.export}', not '${opts.export}'`);
      }
    }
    const log = opts.logger.child({ replica: opts.id, export: opts.export });
    // Alone (no daemon table): no probes or keepalives, failures are seen by requests.
    const paths = opts.paths ?? new NodePaths({ node: opts.id, addresses: opts.addresses, policy: pathPolicy({ healthIntervalMs: 0 }), logger: log });
    const { conn, path } = await connectAny(opts, paths, log);
    const vol = new RemoteVolume(opts, paths, conn, path, log);
    await Promise.all(vol.slots.slice(1).map((s) => vol.reconnectNow(s)));
    log.info({ size: vol.size, caps: vol.caps, limits: vol.limits, connections: vol.connectionCount, paths: paths.paths.map((p) => p.id), home: vol.home?.id }, 'remote: open');
    return vol;
  }

  /** At least one connection is established. */
  get up(): boolean {
    return this.slots.some((s) => s.conn !== null && s.conn.ready);
  }

  /** Established connections. */
  get connectionCount(): number {
    return this.slots.filter((s) => s.conn !== null && s.conn.ready).length;
  }

  // ------------------------------------------------------------------ connections

  private attach(slot: Slot, conn: NbdClientConnection): void {
    slot.conn = conn;
    slot.backoff = this.initialMs;
    slot.path.healthy();
    conn.once('close', (reason: string, error: boolean) => {
      if (slot.conn !== conn) return;
      slot.conn = null;
      // The node may be restarting or the volume changing: no local reads until connected again.
      this.dropShortCircuit(`connection lost: ${reason}`);
      this.scRefused = false;
      if (this.closed) return;
      if (error) slot.path.connectionLost(reason);
      this.log.warn({ slot: slot.index, path: slot.path.id, reason }, 'remote: connection lost');
      if (!this.up && this.wasUp) {
        this.wasUp = false;
        this.emit('down', { id: this.id, reason } satisfies RemoteDownEvent);
      }
      this.schedule(slot);
    });
    if (!this.wasUp) {
      this.wasUp = true;
      this.log.info({ address: conn.address }, 'remote: up again');
      this.emit('up', { id: this.id, address: conn.address } satisfies RemoteUpEvent);
    }
    this.acquireShortCircuit();
  }

  // ------------------------------------------------------------------ short-circuit reads

  /**
   * The replicated layer's switch: short-circuit reads only while the replica is in sync (an
   * out-of-sync replica's file lacks writes). false drops the descriptor at once.
   */
  setShortCircuit(allowed: boolean): void {
    this.scAllowed = allowed;
    if (!allowed) this.dropShortCircuit('replica not in sync');
    else this.acquireShortCircuit();
  }

  shortCircuitStatus(): ShortCircuitStatus {
    return { active: this.sc !== null, reads: this.shortCircuitReads, grants: this.scGrants, writes: this.shortCircuitWrites, writable: this.sc?.writable ?? false };
  }

  /** Asks the node for a descriptor, in the background, when allowed and none is held. */
  private acquireShortCircuit(): void {
    if (this.scSocket === null || this.sc !== null || this.scAcquiring || !this.scAllowed || this.scRefused || this.closed || !this.up) return;
    this.scAcquiring = true;
    ShortCircuitReader.open({ socket: this.scSocket, volume: this.opts.export, write: this.scWrite }).then(
      (r) => {
        this.scAcquiring = false;
        // Checked again now: the replica may have left in-sync, or a connection broken, meanwhile.
        if (this.closed || !this.scAllowed || !this.up || !r.usable || r.size < this.size) {
          if (r.usable && r.size < this.size) this.log.warn({ size: r.size, want: this.size }, 'remote: short-circuit descriptor of a smaller file; not used');
          r.invalidate('not wanted any more');
          return;
        }
        this.sc = r;
        this.scGrants++;
        r.once('invalid', (why: string) => {
          if (this.sc !== r) return;
          this.sc = null;
          this.log.info({ why }, 'remote: short-circuit reads stopped');
          // The node ended the lease while connected (grow, re-create): ask again shortly.
          const t = setTimeout(() => this.acquireShortCircuit(), 200);
          t.unref();
        });
        this.log.info({ socket: this.scSocket, generation: r.generation, writable: r.writable }, r.writable ? 'remote: short-circuit reads and writes on the local file' : 'remote: short-circuit reads from the local file');
      },
      (e: unknown) => {
        this.scAcquiring = false;
        const code = (e as VolumeError).code;
        this.log[code === 'ENOENT' ? 'debug' : 'info']({ err: (e as Error).message }, 'remote: no short-circuit reads; reading over NBD');
        if (code === 'ENOENT' || code === 'ENOTSUP' || code === 'EACCES') {
          // No socket (nbdkit, qemu-nbd, a node with it off), or a volume it will not hand out: not again until reconnect.
          this.scRefused = true;
        } else {
          // A timeout or a race with a grow: again a little later.
          const t = setTimeout(() => this.acquireShortCircuit(), SC_RETRY_MS);
          t.unref();
        }
      },
    );
  }

  private dropShortCircuit(why: string): void {
    const r = this.sc;
    if (!r) return;
    this.sc = null;
    r.invalidate(why);
    this.log.info({ why }, 'remote: short-circuit reads stopped');
  }

  /**
   * A read served now from the page cache through the short-circuit descriptor (no promise):
   * true when buf was filled. The replicated layer's fast path.
   */
  readLocal(offset: number, buf: Buffer): boolean {
    const r = this.sc;
    if (r === null || buf.length === 0 || offset + buf.length > this.size || !r.readSync(offset, buf)) return false;
    this.shortCircuitReads++;
    return true;
  }

  private schedule(slot: Slot): void {
    if (this.closed || slot.timer || slot.connecting) return;
    const delay = slot.backoff;
    slot.backoff = Math.min(slot.backoff * 2, this.maxMs);
    slot.timer = setTimeout(() => {
      slot.timer = null;
      void this.reconnectNow(slot);
    }, delay);
    slot.timer.unref();
  }

  /** One reconnection attempt for a slot; on failure, schedules the next one. */
  private async reconnectNow(slot: Slot): Promise<void> {
    if (this.closed || slot.connecting || slot.conn) return;
    slot.connecting = true;
    let conn: NbdClientConnection | null = null;
    try {
      conn = await connectPath(this.opts, slot.path, this.log);
    } catch (e) {
      if ((e as VolumeError).code !== 'ENOENT') slot.path.transportError(`connect: ${(e as Error).message}`);
      this.log.debug({ slot: slot.index, path: slot.path.id, err: (e as Error).message, retryMs: slot.backoff }, 'remote: reconnect failed');
    }
    slot.connecting = false;
    if (this.closed) {
      if (conn) await conn.close().catch(() => {});
      return;
    }
    if (conn) {
      const why = this.incompatible(conn);
      if (why) {
        this.log.error({ slot: slot.index, address: conn.address, why }, 'remote: the server came back changed; treated as down');
        conn.destroy('incompatible export');
        conn = null;
      }
    }
    if (conn) this.attach(slot, conn);
    else this.schedule(slot);
  }

  /** Why a new connection cannot serve this volume (changed size, lost capabilities), or null. */
  private incompatible(conn: NbdClientConnection): string | null {
    if (conn.size !== this.size) return `export size is ${conn.size}, was ${this.size}`;
    const mask = C.NBD_FLAG_READ_ONLY | C.NBD_FLAG_SEND_FLUSH | C.NBD_FLAG_SEND_FUA | C.NBD_FLAG_SEND_TRIM | C.NBD_FLAG_SEND_WRITE_ZEROES |
      C.NBD_FLAG_SEND_FAST_ZERO | C.NBD_FLAG_CAN_MULTI_CONN | C.NBD_FLAG_SEND_CACHE;
    const was = this.flags & mask;
    const now = conn.flags & mask;
    if ((was & C.NBD_FLAG_READ_ONLY) !== (now & C.NBD_FLAG_READ_ONLY)) return 'read-only flag changed';
    const lost = was & ~now & ~C.NBD_FLAG_READ_ONLY;
    if (lost) return `transmission flags lost: 0x${lost.toString(16)}`;
    if (this.blockStatusNegotiated && conn.info.baseAllocationId === null) return 'base:allocation no longer offered';
    const bs = conn.info.blockSize;
    if (bs && (bs.minimum > this.limits.minimum || this.limits.minimum % bs.minimum !== 0 || bs.maximum < this.limits.maximum)) {
      return `block sizes changed to ${bs.minimum}/${bs.preferred}/${bs.maximum}`;
    }
    return null;
  }

  /** Fails at once (ESHUTDOWN) when closed or no connection is established. */
  private pick(): void {
    if (this.closed) throw new VolumeError('ESHUTDOWN', `remote ${this.id}: closed`);
    if (!this.slots.some((s) => s.conn !== null && s.conn.ready)) throw new VolumeError('ESHUTDOWN', `remote ${this.id}: not connected`);
  }

  /**
   * The connection for the next request: the path the node's selector picks among the paths
   * this volume has a ready connection on (except `tried`), then the least busy connection on
   * it. Without multi-conn, the active path while it is not down. Null when none is left.
   */
  private choose(tried: ReadonlySet<Path> | null): Slot | null {
    if (this.nodePaths.paths.length === 1) {
      // One path (a unix socket, a single address): no selection, no allocation.
      if (tried) return null;
      let best: Slot | null = null;
      for (const s of this.slots) if (s.conn !== null && s.conn.ready && (!best || s.conn.pending < best.conn!.pending)) best = s;
      return best;
    }
    // A few small arrays per request (slots are a handful): cheaper than keeping them in sync.
    const ready = this.slots.filter((s) => s.conn !== null && s.conn.ready && !(tried?.has(s.path) ?? false));
    if (ready.length === 0) return null;
    if (!this.caps.multiConn) {
      const a = this.active;
      if (a && ready.includes(a) && a.path.state !== 'down') return a;
    }
    const usable: Path[] = [];
    for (const s of ready) if (!usable.includes(s.path)) usable.push(s.path);
    const path = this.nodePaths.select(usable, this.cursor, { home: this.home, high: this.high }) ?? usable[0]!;
    let best: Slot | null = null;
    for (const s of ready) if (s.path === path && (!best || s.conn!.pending < best.conn!.pending)) best = s;
    if (!this.caps.multiConn && best !== this.active) {
      if (this.active) this.log.info({ from: this.active.path.id, to: best!.path.id }, 'remote: active path changed');
      this.active = best;
    }
    return best;
  }

  /**
   * Runs one wire request with failover: on a broken connection (the path's fault) it is retried
   * on another path until every path of the node was tried; an error the server answered is
   * thrown as is. Per-path counters and service time are kept here. Errors are VolumeErrors.
   */
  private async call<T>(
    fn: (c: NbdClientConnection) => Promise<T>, kind: RequestKind = 'other', bytes = 0, tried: Set<Path> | null = null, last: VolumeError | null = null,
  ): Promise<T> {
    if (this.closed) throw new VolumeError('ESHUTDOWN', `remote ${this.id}: closed`);
    for (;;) {
      const slot = this.choose(tried);
      if (!slot) throw last ?? new VolumeError('ESHUTDOWN', `remote ${this.id}: not connected`);
      const c = slot.conn!;
      const path = slot.path;
      const t0 = performance.now();
      path.begin();
      try {
        const v = await fn(c);
        path.succeeded(performance.now() - t0, kind, bytes);
        return v;
      } catch (e) {
        last = this.failOver(c, path, e);
        (tried ??= new Set()).add(path);
      }
    }
  }

  /**
   * Accounts a failed attempt on its path and returns the error to go on with when the request
   * may be retried on another path; throws it when not (the server answered it, or closed).
   */
  private failOver(c: NbdClientConnection, path: Path, e: unknown): VolumeError {
    const err = toVolumeError(e);
    // The connection is gone: the path failed, not the request (the node never answered it).
    const transport = !c.ready;
    path.failed(transport, err.message);
    if (!transport || this.closed) throw err;
    path.failovers++;
    this.failovers++;
    this.log.debug({ path: path.id, err: err.message }, 'remote: request failed over to another path');
    return err;
  }

  /**
   * call() for the common case, without an async frame: the first attempt's promise is the
   * client's own, with the path's accounting chained on it; only a broken connection goes on
   * to call()'s failover loop.
   */
  private callFast(fn: (c: NbdClientConnection) => Promise<void>, kind: RequestKind, bytes: number): Promise<void> {
    const slot = this.closed ? null : this.choose(null);
    if (!slot) return this.call(fn, kind, bytes);
    const c = slot.conn!;
    const path = slot.path;
    const t0 = performance.now();
    path.begin();
    return fn(c).then(
      () => path.succeeded(performance.now() - t0, kind, bytes),
      (e: unknown) => this.call(fn, kind, bytes, new Set([path]), this.failOver(c, path, e)),
    );
  }

  // ------------------------------------------------------------------ Volume

  read(offset: number, buf: Buffer): Promise<void> {
    if (buf.length === 0) return Promise.resolve();
    const r = this.sc;
    if (r !== null && offset + buf.length <= this.size) {
      if (r.readSync(offset, buf)) {
        this.shortCircuitReads++;
        return Promise.resolve();
      }
      return r.read(offset, buf).then(
        () => void this.shortCircuitReads++,
        (e: unknown) => {
          this.log.debug({ err: (e as Error).message }, 'remote: short-circuit read failed; over NBD');
          return this.readNbd(offset, buf);
        },
      );
    }
    return this.readNbd(offset, buf);
  }

  private readNbd(offset: number, buf: Buffer): Promise<void> {
    const m = this.limits.minimum;
    if (m > 1 && (offset % m !== 0 || buf.length % m !== 0)) return this.readUnaligned(offset, buf);
    try {
      return this.readAligned(offset, buf);
    } catch (e) {
      return Promise.reject(e);
    }
  }

  private async readUnaligned(offset: number, buf: Buffer): Promise<void> {
    const m = this.limits.minimum;
    const start = offset - (offset % m);
    const end = roundUp(offset + buf.length, m, this.size);
    const tmp = Buffer.allocUnsafe(end - start);
    await this.readAligned(start, tmp);
    tmp.copy(buf, 0, offset - start, offset - start + buf.length);
  }

  private readAligned(offset: number, buf: Buffer): Promise<void> {
    this.pick(); // fail at once when down
    if (buf.length <= this.limits.maximum) return this.callFast((c) => c.read(offset, buf), 'read', buf.length);
    return split(offset, buf.length, this.limits.maximum, (o, l) =>
      this.call((c) => c.read(o, buf.subarray(o - offset, o - offset + l)), 'read', l));
  }

  write(offset: number, buf: Buffer, opts?: WriteOptions): Promise<void> {
    const r = this.sc;
    if (r !== null && r.writable && buf.length > 0 && offset + buf.length <= this.size) return this.writeLocal(r, offset, buf, opts);
    return this.writeNbd(offset, buf, opts);
  }

  private writeNbd(offset: number, buf: Buffer, opts?: WriteOptions): Promise<void> {
    this.nbdDirty = true;
    // The common case without an async frame: aligned, one wire request, FUA native or absent.
    if (buf.length > 0 && buf.length <= this.limits.maximum && !this.caps.readOnly && !this.closed && (this.limits.minimum === 1 || (offset % this.limits.minimum === 0 && buf.length % this.limits.minimum === 0))) {
      const fua = opts?.fua === true;
      if (!fua || this.caps.fua) {
        try {
          this.pick();
        } catch (e) {
          return Promise.reject(e);
        }
        return this.callFast((c) => c.write(offset, buf, { fua }), 'write', buf.length);
      }
    }
    return this.writeSlow(offset, buf, opts);
  }

  /**
   * A short-circuit write: pwrite on the node's file (+ fdatasync for FUA). A lease that ended
   * meanwhile (ESHUTDOWN) is a broken path: the write goes over NBD instead (see the header).
   */
  private writeLocal(r: ShortCircuitReader, offset: number, buf: Buffer, opts?: WriteOptions): Promise<void> {
    const fua = opts?.fua === true;
    return r.write(offset, buf).then(() => (fua ? r.datasync() : undefined)).then(
      () => void this.shortCircuitWrites++,
      (e: unknown) => {
        const err = toVolumeError(e);
        if (err.code !== 'ESHUTDOWN' || this.closed) throw err;
        this.log.debug({ err: err.message }, 'remote: short-circuit write lost its lease; over NBD');
        return this.writeNbd(offset, buf, opts);
      },
    );
  }

  private async writeSlow(offset: number, buf: Buffer, opts?: WriteOptions): Promise<void> {
    this.writable();
    if (buf.length === 0) return;
    const m = this.limits.minimum;
    if (m > 1 && (offset % m !== 0 || buf.length % m !== 0)) {
      await this.rmw(offset, buf.length, (tmp, at) => buf.copy(tmp, at), opts);
      return;
    }
    await this.writeAligned(offset, buf, opts);
  }

  private async writeAligned(offset: number, buf: Buffer, opts?: WriteOptions): Promise<void> {
    this.pick();
    const { fua, emulate } = this.fua(opts);
    await split(offset, buf.length, this.limits.maximum, (o, l) =>
      this.call((c) => c.write(o, buf.subarray(o - offset, o - offset + l), { fua }), 'write', l));
    if (emulate) await this.flush();
  }

  /**
   * Read-modify-write of the blocks covering [offset, offset + length): reads them, lets `fill`
   * change the bytes at `at` in the bounce buffer, writes them back. One at a time.
   */
  private rmw(offset: number, length: number, fill: (tmp: Buffer, at: number) => void, opts?: WriteOptions): Promise<void> {
    const m = this.limits.minimum;
    const run = async (): Promise<void> => {
      const start = offset - (offset % m);
      const end = roundUp(offset + length, m, this.size);
      const tmp = Buffer.alloc(end - start);
      const headLen = Math.min(m, end - start);
      if (offset !== start || offset + length < start + headLen) await this.readAligned(start, tmp.subarray(0, headLen));
      if ((offset + length) % m !== 0 && end - m >= start + headLen) await this.readAligned(end - m, tmp.subarray(end - m - start));
      fill(tmp, offset - start);
      await this.writeAligned(start, tmp, opts);
    };
    const p = this.rmwTail.then(run, run);
    this.rmwTail = p.then(() => {}, () => {});
    return p;
  }

  async flush(): Promise<void> {
    if (!this.caps.flush) {
      this.pick();
      return;
    }
    const r = this.sc;
    if (r !== null && r.writable) {
      // fdatasync of the file covers every page of the inode (ours and the node's); NBD FLUSH
      // as well for what went over NBD since the last flush.
      const nbd = this.nbdDirty;
      this.nbdDirty = false;
      try {
        await Promise.all([r.datasync(), nbd ? this.flushNbd() : undefined]);
        return;
      } catch (e) {
        if (nbd) this.nbdDirty = true;
        if (toVolumeError(e).code !== 'ESHUTDOWN' || this.closed) throw toVolumeError(e);
        // The lease ended (or NBD broke): the node's own flush decides.
      }
    }
    await this.flushNbd();
  }

  private async flushNbd(): Promise<void> {
    // Every connection: with multi-conn one flush covers all, but a connection's own flush is
    // the portable guarantee for writes that it carried.
    const conns = this.liveConnections();
    if (this.caps.multiConn) await this.call((c) => c.flush());
    else await Promise.all(conns.map((c) => c.flush().catch((e) => Promise.reject(toVolumeError(e)))));
  }

  private liveConnections(): NbdClientConnection[] {
    this.pick();
    return this.slots.map((s) => s.conn).filter((c): c is NbdClientConnection => c !== null && c.ready);
  }

  async trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    this.writable();
    this.nbdDirty = true;
    this.pick();
    if (!this.caps.trim || length === 0) return;
    const m = this.limits.minimum;
    // Trim is advisory: an unaligned edge is simply not trimmed.
    const start = roundUp(offset, m, Infinity);
    const end = (offset + length) - ((offset + length) % m);
    if (end <= start) return;
    const { fua, emulate } = this.fua(opts);
    await split(start, end - start, alignDown(BIG_OP, m), (o, l) => this.call((c) => c.trim(o, l, { fua })));
    if (emulate) await this.flush();
  }

  async writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    this.writable();
    this.nbdDirty = true;
    if (opts?.fastZero && !this.caps.fastZero) throw new VolumeError('ENOTSUP', `remote ${this.id}: the server offers no fast zero`);
    this.pick();
    if (length === 0) return;
    const m = this.limits.minimum;
    const start = roundUp(offset, m, Infinity);
    const end = (offset + length) - ((offset + length) % m);
    const edges: Promise<void>[] = [];
    if (m > 1 && (start !== offset || end !== offset + length)) {
      if (opts?.fastZero) throw new VolumeError('ENOTSUP', `remote ${this.id}: unaligned fast zero`);
      const zeroEdge = (o: number, l: number): Promise<void> => this.rmw(o, l, (tmp, at) => tmp.fill(0, at, at + l), opts);
      if (end <= start) return zeroEdge(offset, length);
      if (start > offset) edges.push(zeroEdge(offset, start - offset));
      if (end < offset + length) edges.push(zeroEdge(end, offset + length - end));
    }
    if (end > start) edges.push(this.zeroAligned(start, end - start, opts));
    const results = await Promise.allSettled(edges);
    for (const r of results) if (r.status === 'rejected') throw toVolumeError(r.reason);
  }

  private async zeroAligned(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    const { fua, emulate } = this.fua(opts);
    if (!this.caps.writeZeroes) {
      const chunk = alignDown(Math.min(this.limits.maximum, ZERO_CHUNK), this.limits.minimum) || this.limits.minimum;
      if (!this.zeroBuf || this.zeroBuf.length < chunk) this.zeroBuf = Buffer.alloc(chunk);
      const z = this.zeroBuf;
      await split(offset, length, chunk, (o, l) => this.call((c) => c.write(o, z.subarray(0, l), { fua }), 'write', l));
    } else {
      const fast = Boolean(opts?.fastZero);
      const max = fast ? alignDown(BIG_OP, this.limits.minimum) : this.limits.maximum;
      await split(offset, length, max, (o, l) =>
        this.call((c) => c.writeZeroes(o, l, { fua, noHole: !opts?.mayTrim, fastZero: fast })));
    }
    if (emulate) await this.flush();
  }

  async prefetch(offset: number, length: number): Promise<void> {
    this.pick();
    if (!this.caps.prefetch || length === 0) return;
    const m = this.limits.minimum;
    const start = offset - (offset % m);
    const end = roundUp(offset + length, m, this.size);
    await split(start, end - start, this.limits.maximum, (o, l) => this.call((c) => c.cache(o, l)));
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    this.pick();
    if (length === 0) return [{ offset, length: 0, hole: false, zero: false }];
    if (!this.caps.blockStatus) return [{ offset, length, hole: false, zero: false }];
    const m = this.limits.minimum;
    const start = offset - (offset % m);
    const end = Math.min(roundUp(offset + length, m, this.size), start + alignDown(BIG_OP, m));
    const extents = await this.call((c) => c.blockStatus(start, end - start));
    // Clip to [offset, offset + length).
    const out: Extent[] = [];
    const stop = offset + length;
    for (const e of extents) {
      const s = Math.max(e.offset, offset);
      const t = Math.min(e.offset + e.length, stop);
      if (t > s) out.push({ offset: s, length: t - s, hole: e.hole, zero: e.zero });
    }
    if (out.length === 0) return [{ offset, length: Math.min(length, m), hole: false, zero: false }];
    return out;
  }

  /** Sends NBD_CMD_DISC on every connection and stops reconnecting. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.nodePaths.off('change', this.onPathChange);
    this.nodePaths.off('healthy', this.onPathHealthy);
    if (this.keepalive) clearInterval(this.keepalive);
    this.dropShortCircuit('closed');
    if (this.opts.vm !== undefined) this.nodePaths.releaseHome(this.opts.vm);
    this.nodePaths.release();
    for (const s of this.slots) {
      if (s.timer) clearTimeout(s.timer);
      s.timer = null;
    }
    await Promise.all(this.slots.map((s) => s.conn?.close().catch(() => {})));
    this.log.info('remote: closed');
  }

  // ------------------------------------------------------------------ helpers

  private writable(): void {
    if (this.caps.readOnly) throw new VolumeError('EPERM', `remote ${this.id}: export is read-only`);
  }

  /** FUA on the wire when the server has it, else a flush afterwards when it has flush. */
  private fua(opts?: WriteOptions): { fua: boolean; emulate: boolean } {
    if (!opts?.fua) return { fua: false, emulate: false };
    if (this.caps.fua) return { fua: true, emulate: false };
    return { fua: false, emulate: this.caps.flush };
  }
}

/** `<path>.sc` of the first unix-socket address (a node on this host), or null. */
function shortCircuitSocket(addresses: string[]): string | null {
  for (const a of addresses) {
    try {
      const t = parseNbdUri(a).address;
      if ('unix' in t) return `${t.unix}.sc`;
    } catch {
      /* checked at open */
    }
  }
  return null;
}

/** One connection over one path (its address, bound to its source address). */
function connectPath(opts: RemoteVolumeOptions, path: Path, log: Logger): Promise<NbdClientConnection> {
  return NbdClientConnection.connect({
    address: path.address,
    export: opts.export,
    logger: log,
    // A blackholed path must not keep a slot busy connecting for longer than a request may take.
    connectTimeoutMs: opts.connectTimeoutMs ?? Math.min(5000, (opts.paths?.policy ?? DEFAULT_PATH_POLICY).requestTimeoutMs),
    timeoutMs: opts.timeoutMs ?? (opts.paths?.policy ?? DEFAULT_PATH_POLICY).requestTimeoutMs,
    maxInflight: opts.maxInflightPerConnection ?? 64,
    ...(path.source !== undefined ? { localAddress: path.source } : {}),
  });
}

/** Tries each path in order; resolves with the first connection, rejects with the last error. */
async function connectAny(opts: RemoteVolumeOptions, paths: NodePaths, log: Logger): Promise<{ conn: NbdClientConnection; path: Path }> {
  const errors: string[] = [];
  let last: VolumeError | null = null;
  for (const path of paths.paths) {
    try {
      return { conn: await connectPath(opts, path, log), path };
    } catch (e) {
      last = toVolumeError(e);
      if (last.code !== 'ENOENT') path.transportError(`connect: ${last.message}`);
      errors.push(`${path.id}: ${last.message}`);
    }
  }
  // ENOENT (no such export) and the like are more telling than the generic EIO of a dead path.
  throw new VolumeError(last?.code ?? 'EIO', `remote ${opts.id}: cannot reach export '${opts.export}': ${errors.join('; ')}`);
}

/** Calls fn on consecutive pieces of at most `max` bytes, a few at once; the first error wins. */
async function split(offset: number, length: number, max: number, fn: (o: number, l: number) => Promise<void>): Promise<void> {
  if (length <= max) return fn(offset, length);
  let next = offset;
  const end = offset + length;
  let error: unknown = null;
  const worker = async (): Promise<void> => {
    while (next < end && error === null) {
      const o = next;
      const l = Math.min(max, end - o);
      next += l;
      try {
        await fn(o, l);
      } catch (e) {
        if (error === null) error = e;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(SPLIT_CONCURRENCY, Math.ceil(length / max)) }, worker));
  if (error !== null) throw toVolumeError(error);
}

function roundUp(n: number, m: number, cap: number): number {
  const r = n % m === 0 ? n : n + (m - (n % m));
  return Math.min(r, cap);
}

function alignDown(n: number, m: number): number {
  return n - (n % m);
}
