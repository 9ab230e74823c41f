/**
 * Short-circuit local reads, node side: the precedent is HDFS's "short-circuit local reads"
 * (a DataNode passes the block file's descriptor over a unix domain socket to a DFSClient on the
 * same host, which then reads the file itself instead of streaming it through the DataNode).
 *
 * Next to each unix NBD listen socket `P`, the node listens on `P.sc` (mode 0600). A daemon on
 * this host connects, sends one request line `{"v":1,"volume":NAME}\n` and gets back one reply
 * line — `{"ok":true,"generation":G,"size":S,"writable":false}\n` with a read-only descriptor of the volume's file
 * attached (SCM_RIGHTS), or `{"ok":false,"code":...,"message":...}\n` — and keeps the connection
 * open: it is the lease of that descriptor. The node ends it (the daemon sees end of stream and
 * drops the descriptor) whenever the descriptor may stop showing what the volume holds: the
 * volume is grown, deleted or re-created (the generation changes), unexported, or the node stops.
 * A node that dies closes it too (the kernel does). The daemon drops it as well when its NBD
 * connections to the node break, and when the replica is no longer in sync (lib/block/remote.ts,
 * lib/block/replicated.ts).
 *
 * Peer check: SO_PEERCRED (the addon's peerCred) — only a peer with the node's own uid (or root)
 * gets a descriptor; without the addon function, the socket's mode 0600 is the check.
 *
 * Why a read through the descriptor never returns data older than an acknowledged write: the
 * node writes the volume through the page cache (FileVolume without O_DIRECT — buffered pwrite,
 * io_uring buffered writes, or RWF_NOWAIT inline writes, all of which copy into the page cache
 * before they complete), and acknowledges a write only after that. The daemon's pread on another
 * descriptor of the same inode reads the same page cache, so once the node acknowledged, every
 * later pread sees the data. A node volume opened with O_DIRECT would write around the page
 * cache of the file the daemon reads (pages it cached earlier would be stale), so `open` refuses
 * short-circuit for such a volume (checked on the node's own descriptor, /proc/self/fdinfo).
 *
 * Short-circuit local writes: a request `{"v":1,"volume":NAME,"write":true}` gets a read-write
 * descriptor (the reply says `"writable":true`; a node that predates writes ignores the field and
 * hands a read-only one, which the daemon then uses for reads only). Same peer check, same
 * O_DIRECT refusal, same lease. The daemon then pwrites an in-sync replica's file itself and
 * fdatasyncs it for FLUSH and FUA (lib/block/shortcircuit.ts, lib/block/remote.ts).
 *
 * Why writing the node's file behind its back is safe: the node keeps no state about the data
 * of a volume, only the file does. Checked in lib/node: VolumeStore keeps an open FileVolume per
 * exported volume, whose only cached facts are its size (fixed while the lease lasts: grow and
 * delete unexport first, which ends the lease, and grow only extends the same inode) and timing
 * state of inline writes; allocation (`allocated`, block status) is asked of the filesystem
 * (stat, SEEK_DATA/SEEK_HOLE) at each call; the node's writes go through the page cache and its
 * FLUSH is fdatasync of the same inode, which also covers pages the daemon dirtied. The node's
 * OrderedVolume orders only what arrives over NBD: the daemon's own OrderedVolume orders every
 * overlapping guest request before either path is taken, and the replicated layer's resync of a
 * replica goes over NBD only (short-circuit is off while a replica is not in sync). The
 * generations here number leases, not data. What would break it: a node that caches or buffers
 * data itself (a write-back cache, checksums or a log-structured or copy-on-write format,
 * snapshots), opens volumes O_DIRECT (refused below), keeps allocation maps in memory, or
 * shrinks/replaces a file without ending the leases first.
 */
import { closeSync, constants as FS, openSync, readFileSync, rmSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import type { Logger } from '../log.js';
import { native, type NativeAddon, type NativeFdWatcher } from '../native/index.js';
import { listenPrivateSocket } from '../vhost/channel.js';
import { VolumeError, toVolumeError } from '../block/errors.js';

/** The short-circuit socket that belongs to a unix NBD socket. */
export function shortCircuitSocketOf(nbdSocket: string): string {
  return `${nbdSocket}.sc`;
}

/** Longest request line accepted. */
const MAX_REQUEST = 4096;
/** O_DIRECT as /proc/self/fdinfo shows it (octal flags), x86-64/arm64 value. */
const O_DIRECT_FLAG = FS.O_DIRECT;

export interface ShortCircuitVolume {
  /** The volume's file (opened read-only for the peer, read-write when it asked for writes). */
  file: string;
  size: number;
  /** The node's own descriptor of the volume, to check that it is not O_DIRECT. */
  nodeFd?: number;
}

export interface ShortCircuitServerOptions {
  path: string;
  /** Resolves the volume by name (ENOENT when not exported here). */
  lookup(name: string): Promise<ShortCircuitVolume>;
  logger: Logger;
  native?: NativeAddon;
}

interface Conn {
  fd: number;
  watcher: NativeFdWatcher;
  buf: Buffer;
  len: number;
  volume: string | null;
  /** The peer asked for a read-write descriptor. */
  write: boolean;
  closed: boolean;
}

/** Whether an open descriptor of this process carries O_DIRECT (from /proc/self/fdinfo). */
export function fdIsDirect(fd: number): boolean {
  try {
    const m = /^flags:\s*([0-7]+)$/m.exec(readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'));
    return m !== null && (parseInt(m[1]!, 8) & O_DIRECT_FLAG) !== 0;
  } catch {
    return false;
  }
}

export class ShortCircuitServer {
  readonly path: string;
  private readonly n: NativeAddon;
  private readonly lfd: number;
  private readonly watcher: NativeFdWatcher;
  private readonly log: Logger;
  private readonly lookup: ShortCircuitServerOptions['lookup'];
  private readonly conns = new Set<Conn>();
  /** Per volume: bumped at every invalidation; the epoch makes a restarted node's differ. */
  private readonly gens = new Map<string, number>();
  private readonly epoch = randomBytes(4).readUInt32BE(0);
  private closed = false;
  /** Descriptors handed out (tests, logs). */
  granted = 0;
  /** Of those, read-write (short-circuit writes). */
  grantedWritable = 0;
  refused = 0;

  private constructor(o: ShortCircuitServerOptions, n: NativeAddon, lfd: number) {
    this.path = o.path;
    this.n = n;
    this.lfd = lfd;
    this.log = o.logger;
    this.lookup = o.lookup;
    this.watcher = new n.FdWatcher(lfd, () => this.onAcceptable());
    this.watcher.start();
  }

  static async listen(o: ShortCircuitServerOptions): Promise<ShortCircuitServer> {
    const n = o.native ?? native();
    return new ShortCircuitServer(o, n, await listenPrivateSocket(n, o.path, 'short-circuit socket', 16));
  }

  /** The generation a descriptor of `name` handed out now carries. */
  generation(name: string): number {
    return this.epoch * 65536 + (this.gens.get(name) ?? 0);
  }

  /**
   * Ends every lease on `name` (the daemons drop their descriptors) and moves its generation:
   * call before the volume's file stops being what the descriptors show (grow, delete, re-create,
   * unexport).
   */
  invalidate(name: string, why: string): void {
    this.gens.set(name, ((this.gens.get(name) ?? 0) + 1) % 65536);
    let n = 0;
    for (const c of [...this.conns]) {
      if (c.volume !== name) continue;
      this.end(c);
      n++;
    }
    if (n > 0) this.log.info({ volume: name, leases: n, why }, 'short-circuit: descriptors invalidated');
  }

  /** Leases held now for `name` (tests); `writable` counts only read-write ones. */
  leases(name?: string, writable?: boolean): number {
    let k = 0;
    for (const c of this.conns) if (c.volume !== null && (name === undefined || c.volume === name) && (writable === undefined || c.write === writable)) k++;
    return k;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.watcher.close();
    try {
      this.n.closeFd(this.lfd);
    } catch {
      /* already closed */
    }
    for (const c of [...this.conns]) this.end(c);
    rmSync(this.path, { force: true }); // a clean stop leaves no socket behind, as the NBD sockets
  }

  private onAcceptable(): void {
    for (;;) {
      let fd: number;
      try {
        fd = this.n.unixAccept(this.lfd);
      } catch (e) {
        this.log.warn({ err: (e as Error).message }, 'short-circuit: accept failed');
        return;
      }
      if (fd < 0) return;
      if (!this.peerAllowed(fd)) {
        this.refused++;
        try {
          this.n.sendMsg(fd, Buffer.from(JSON.stringify({ ok: false, code: 'EACCES', message: 'peer of another uid' }) + '\n'), [], 0);
        } catch {
          /* the peer is gone or its socket full: closing says enough */
        }
        this.n.closeFd(fd);
        continue;
      }
      const c: Conn = { fd, watcher: null as unknown as NativeFdWatcher, buf: Buffer.allocUnsafe(MAX_REQUEST), len: 0, volume: null, write: false, closed: false };
      c.watcher = new this.n.FdWatcher(fd, (status) => this.onReadable(c, status));
      this.conns.add(c);
      c.watcher.start();
    }
  }

  private peerAllowed(fd: number): boolean {
    if (typeof this.n.peerCred !== 'function' || typeof process.getuid !== 'function') return true; // the socket's 0600 mode
    try {
      const [pid, uid] = this.n.peerCred(fd);
      const me = process.getuid();
      if (uid === me || uid === 0) return true;
      this.log.warn({ pid, uid }, 'short-circuit: refused a peer of another uid');
      return false;
    } catch (e) {
      this.log.warn({ err: (e as Error).message }, 'short-circuit: cannot check the peer');
      return false;
    }
  }

  private onReadable(c: Conn, status: number): void {
    if (c.closed) return;
    if (status < 0) return this.end(c);
    let got: number;
    const fds: number[] = [];
    try {
      got = this.n.recvMsg(c.fd, c.buf.subarray(c.len), fds);
    } catch {
      return this.end(c);
    }
    for (const f of fds) this.n.closeFd(f); // nothing is expected from the peer
    if (got < 0) return;
    if (got === 0) return this.end(c); // the daemon let go
    if (c.volume !== null) return; // one request per connection; later bytes are ignored
    c.len += got;
    const nl = c.buf.subarray(0, c.len).indexOf(10);
    if (nl < 0) {
      if (c.len >= MAX_REQUEST) this.end(c);
      return;
    }
    let name: string;
    try {
      const req = JSON.parse(c.buf.subarray(0, nl).toString('utf8')) as { v?: unknown; volume?: unknown; write?: unknown };
      if (req.v !== 1 || typeof req.volume !== 'string' || (req.write !== undefined && typeof req.write !== 'boolean')) throw new Error('bad request');
      name = req.volume;
      c.write = req.write === true;
    } catch {
      this.reply(c, { ok: false, code: 'EINVAL', message: 'bad short-circuit request' });
      return this.end(c);
    }
    c.volume = name;
    void this.grant(c, name);
  }

  private async grant(c: Conn, name: string): Promise<void> {
    const gen = this.generation(name);
    let fd = -1;
    try {
      const v = await this.lookup(name);
      if (c.closed) return;
      if (this.generation(name) !== gen) throw new VolumeError('EAGAIN', `volume ${name} changed while it was being opened`);
      if (v.nodeFd !== undefined && fdIsDirect(v.nodeFd)) throw new VolumeError('ENOTSUP', `volume ${name} is written with O_DIRECT: the page cache would not be coherent`);
      // Node opens with O_CLOEXEC. Never O_CREAT/O_TRUNC: the file must exist as exported.
      fd = openSync(v.file, c.write ? FS.O_RDWR : FS.O_RDONLY);
      this.reply(c, { ok: true, generation: gen, size: v.size, writable: c.write }, fd);
      this.granted++;
      if (c.write) this.grantedWritable++;
      this.log.debug({ volume: name, generation: gen, writable: c.write }, 'short-circuit: descriptor granted');
    } catch (e) {
      const err = toVolumeError(e);
      this.reply(c, { ok: false, code: err.code, message: err.message });
      this.end(c);
    } finally {
      if (fd >= 0) closeSync(fd); // the peer has its own copy now
    }
  }

  private reply(c: Conn, msg: object, fd?: number): void {
    if (c.closed) return;
    try {
      this.n.sendMsg(c.fd, Buffer.from(JSON.stringify(msg) + '\n'), fd !== undefined ? [fd] : [], 1000);
    } catch (e) {
      this.log.debug({ err: (e as Error).message }, 'short-circuit: reply failed');
      this.end(c);
    }
  }

  private end(c: Conn): void {
    if (c.closed) return;
    c.closed = true;
    this.conns.delete(c);
    c.watcher.close();
    try {
      this.n.closeFd(c.fd);
    } catch {
      /* already closed */
    }
  }
}
