/**
 * Short-circuit local reads, daemon side (the node side, and why it is safe, is in
 * lib/node/shortcircuit.ts; HDFS's "short-circuit local reads" is the precedent): a read-only
 * descriptor of a replica's volume file, received from a storage node on this host over its
 * `.sc` unix socket, read with pread instead of an NBD round trip.
 *
 * The connection the descriptor came on stays open: it is the lease. When the node ends it
 * (volume grown, deleted, re-created, unexported; node stopped or dead) the reader becomes
 * invalid at once (the watcher sees end of stream) and emits 'invalid'; RemoteVolume then reads
 * over NBD again and asks for a new descriptor when its connections are back.
 *
 * Reads: `readSync` tries preadv2(RWF_NOWAIT) on the event loop (the page cache; no thread hop,
 * no promise), `read` goes through libuv's thread pool for what is not cached. A short read
 * (end of file before the end of the range: the file is not what the lease said) fails with EIO
 * and invalidates the reader; the caller falls back to NBD.
 *
 * Writes (short-circuit local writes, asked for with `write: true`; the node says whether the
 * descriptor is read-write): `write` is pwrite through the thread pool, `datasync` fdatasync.
 * Each of them checks the lease when it completes, synchronously, by a non-blocking receive on
 * the lease socket (end of stream or any byte: ended) before it resolves, so an operation that
 * completed while the node was ending the lease is never reported done: it fails with ESHUTDOWN,
 * as an NBD write whose connection broke fails (the caller, RemoteVolume, then tries NBD, and
 * the replicated layer demotes the replica when that fails too). The node ends the lease before
 * it changes the file, so an operation that completed before the check saw the lease still
 * held landed in the file the lease was for. Errors of the local disk (EIO, ENOSPC) are the
 * replica's answer, as the node's NBD error reply would be: they are passed up, not retried.
 */
import { EventEmitter } from 'node:events';
import { fdatasync as fsDatasync, read as fsRead, write as fsWrite } from 'node:fs';
import { native, type NativeAddon, type NativeFdWatcher } from '../native/index.js';
import { VolumeError, toVolumeError } from './errors.js';

export interface ShortCircuitOpenOptions {
  /** The node's short-circuit socket (`<nbd socket>.sc`). */
  socket: string;
  /** Export (volume) name on the node. */
  volume: string;
  /** Ask for a read-write descriptor (short-circuit writes). */
  write?: boolean;
  /** The reply must come within this (ms). Default 2000. */
  timeoutMs?: number;
  native?: NativeAddon;
}

/** Largest read tried on the event loop from the page cache (a 1 MiB copy is ~50-100 µs). */
const NOWAIT_MAX = 1024 * 1024;
const MAX_REPLY = 4096;

export class ShortCircuitReader extends EventEmitter {
  readonly generation: number;
  readonly size: number;
  /** The descriptor is read-write (the node granted short-circuit writes). */
  readonly writable: boolean;
  private readonly n: NativeAddon;
  private fd: number;
  private readonly sock: number;
  private readonly watcher: NativeFdWatcher;
  private valid = true;
  /** Thread-pool reads in progress: the descriptor is closed only after them. */
  private busy = 0;
  private reason: string | null = null;

  private constructor(n: NativeAddon, sock: number, watcher: NativeFdWatcher, fd: number, generation: number, size: number, writable: boolean) {
    super();
    this.n = n;
    this.writable = writable;
    this.sock = sock;
    this.fd = fd;
    this.generation = generation;
    this.size = size;
    // The watcher of the request stays (one uv_poll per fd); from now on anything on the lease
    // connection (end of stream, an error, a message) ends the lease.
    this.watcher = watcher;
  }

  /** Asks the node for a descriptor of `volume`; rejects (ENOENT, ENOTSUP, EIO...) when it will not give one. */
  static open(o: ShortCircuitOpenOptions): Promise<ShortCircuitReader> {
    const n = o.native ?? native();
    return new Promise<ShortCircuitReader>((resolve, reject) => {
      let sock: number;
      try {
        sock = n.unixConnect(o.socket);
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        reject(new VolumeError(code === 'ENOENT' || code === 'ECONNREFUSED' ? 'ENOENT' : code === 'EACCES' ? 'EACCES' : 'EIO', `short-circuit ${o.socket}: ${(e as Error).message}`));
        return;
      }
      const buf = Buffer.allocUnsafe(MAX_REPLY);
      let len = 0;
      const fds: number[] = [];
      let done = false;
      let reader: ShortCircuitReader | null = null;
      const finish = (err: VolumeError | null, r?: ShortCircuitReader): void => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        if (err) {
          w.close();
          for (const f of fds) closeQuietly(n, f);
          closeQuietly(n, sock);
          reject(err);
        } else resolve(r!);
      };
      const w = new n.FdWatcher(sock, (status) => {
        if (reader) return reader.invalidate('the node ended the lease');
        if (done) return;
        // An error (libuv reports POLLERR as a status; a node that refuses closes at once, which
        // resets the connection) may come with the reply still to be read: read first.
        let got: number;
        try {
          got = n.recvMsg(sock, buf.subarray(len), fds);
        } catch (e) {
          return finish(new VolumeError('EIO', `short-circuit ${o.socket}: ${(e as Error).message}`));
        }
        if (got < 0) {
          if (status < 0) finish(new VolumeError('EIO', `short-circuit ${o.socket}: socket error ${status}`));
          return;
        }
        if (got === 0) return finish(new VolumeError('EIO', `short-circuit ${o.socket}: closed before a reply`));
        len += got;
        const nl = buf.subarray(0, len).indexOf(10);
        if (nl < 0) {
          if (len >= MAX_REPLY) finish(new VolumeError('EIO', `short-circuit ${o.socket}: reply too long`));
          return;
        }
        let rep: { ok?: unknown; generation?: unknown; size?: unknown; writable?: unknown; code?: unknown; message?: unknown };
        try {
          rep = JSON.parse(buf.subarray(0, nl).toString('utf8')) as typeof rep;
        } catch {
          return finish(new VolumeError('EIO', `short-circuit ${o.socket}: bad reply`));
        }
        if (rep.ok !== true) {
          const code = typeof rep.code === 'string' && /^E[A-Z]+$/.test(rep.code) ? rep.code : 'EIO';
          return finish(new VolumeError(code as 'EIO', `short-circuit ${o.socket}: ${String(rep.message ?? 'refused')}`));
        }
        if (fds.length !== 1 || typeof rep.generation !== 'number' || typeof rep.size !== 'number') {
          return finish(new VolumeError('EIO', `short-circuit ${o.socket}: reply without one descriptor`));
        }
        // The lease is also over if the node closed right behind its reply: the watcher sees it next.
        reader = new ShortCircuitReader(n, sock, w, fds[0]!, rep.generation, rep.size, o.write === true && rep.writable === true);
        finish(null, reader);
      });
      const timer = setTimeout(() => finish(new VolumeError('ETIMEDOUT', `short-circuit ${o.socket}: no reply in ${o.timeoutMs ?? 2000} ms`)), o.timeoutMs ?? 2000);
      timer.unref();
      try {
        n.sendMsg(sock, Buffer.from(JSON.stringify(o.write ? { v: 1, volume: o.volume, write: true } : { v: 1, volume: o.volume }) + '\n'), [], 1000);
      } catch (e) {
        finish(new VolumeError('EIO', `short-circuit ${o.socket}: ${(e as Error).message}`));
        return;
      }
      w.start();
    });
  }

  /** The lease holds (the descriptor shows the volume). */
  get usable(): boolean {
    return this.valid;
  }

  /** Why it was invalidated (null while valid). */
  get invalidReason(): string | null {
    return this.reason;
  }

  /**
   * Fills buf from the page cache without blocking: true when every byte was there. False (buf
   * partly written or not at all) when the caller must use `read`.
   */
  readSync(offset: number, buf: Buffer): boolean {
    if (!this.valid || buf.length > NOWAIT_MAX) return false;
    return this.n.readNowait(this.fd, buf, offset) === buf.length;
  }

  /** pread through the thread pool until buf is full; EIO on end of file or a lost lease. */
  read(offset: number, buf: Buffer): Promise<void> {
    if (!this.valid) return Promise.reject(new VolumeError('ESHUTDOWN', `short-circuit: ${this.reason ?? 'invalid'}`));
    return this.transfer(fsRead, offset, buf, (err, pos) => {
      const e = new VolumeError('EIO', `short-circuit pread at ${offset + pos}: ${err ? err.message : 'end of file'}`);
      this.invalidate(e.message);
      return e;
    });
  }

  /**
   * pwrite of all of buf at offset through the thread pool. Resolves only when every byte was
   * written and the lease still held afterwards (see the header): ESHUTDOWN when it ended before
   * or during the write, the local error (EIO, ENOSPC...) when the write failed.
   */
  write(offset: number, buf: Buffer): Promise<void> {
    if (!this.valid || !this.writable) return Promise.reject(new VolumeError('ESHUTDOWN', `short-circuit: ${this.reason ?? 'read-only descriptor'}`));
    return this.transfer(fsWrite, offset, buf, (err, pos) =>
      err ? toVolumeError(err) : new VolumeError('EIO', `short-circuit pwrite at ${offset + pos}: nothing written`),
    ).then(() => new Promise<void>((resolve, reject) => this.settle(resolve, reject, 'pwrite')));
  }

  /**
   * pread/pwrite through the thread pool until all of buf is done, the descriptor kept open
   * meanwhile; `fail` makes the error of a failed or empty (end of file, nothing written) step.
   */
  private transfer(
    op: (fd: number, b: Buffer, off: number, len: number, pos: number, cb: (err: NodeJS.ErrnoException | null, n: number) => void) => void,
    offset: number,
    buf: Buffer,
    fail: (err: NodeJS.ErrnoException | null, pos: number) => VolumeError,
  ): Promise<void> {
    this.busy++;
    return new Promise<void>((resolve, reject) => {
      const step = (pos: number): void => {
        op(this.fd, buf, pos, buf.length - pos, offset + pos, (err, n) => {
          if (err || n === 0) {
            this.release();
            reject(fail(err, pos));
            return;
          }
          if (pos + n < buf.length) return step(pos + n);
          this.release();
          resolve();
        });
      };
      step(0);
    });
  }

  /** fdatasync of the file (every page of the inode, whoever dirtied it); ESHUTDOWN when the lease ended meanwhile. */
  datasync(): Promise<void> {
    if (!this.valid) return Promise.reject(new VolumeError('ESHUTDOWN', `short-circuit: ${this.reason ?? 'invalid'}`));
    this.busy++;
    return new Promise<void>((resolve, reject) => {
      fsDatasync(this.fd, (err) => {
        this.release();
        if (err) reject(toVolumeError(err));
        else this.settle(resolve, reject, 'fdatasync');
      });
    });
  }

  /** Resolves when the lease still holds now, else rejects with ESHUTDOWN (and invalidates). */
  private settle(resolve: () => void, reject: (e: unknown) => void, what: string): void {
    if (this.leaseHolds()) resolve();
    else reject(new VolumeError('ESHUTDOWN', `short-circuit ${what}: the lease ended (${this.reason ?? 'ended'})`));
  }

  /**
   * The lease holds now: checked on the socket itself (a non-blocking receive), not only by the
   * watcher, whose end-of-stream event may still be queued behind this completion in the loop.
   */
  leaseHolds(): boolean {
    if (!this.valid) return false;
    let got: number;
    const fds: number[] = [];
    try {
      got = this.n.recvMsg(this.sock, leaseScratch, fds);
      for (const f of fds) closeQuietly(this.n, f);
    } catch (e) {
      this.invalidate(`lease socket: ${(e as Error).message}`);
      return false;
    }
    if (got < 0) return true; // nothing to read: still open
    this.invalidate(got === 0 ? 'the node ended the lease' : 'the node sent on the lease');
    return false;
  }

  /** Drops the descriptor (idempotent); emits 'invalid' (reason) the first time. */
  invalidate(reason: string): void {
    if (!this.valid) return;
    this.valid = false;
    this.reason = reason;
    this.watcher.close();
    closeQuietly(this.n, this.sock);
    if (this.busy === 0) this.closeFd();
    this.emit('invalid', reason);
  }

  private release(): void {
    this.busy--;
    if (this.busy === 0 && !this.valid) this.closeFd();
  }

  private closeFd(): void {
    if (this.fd < 0) return;
    closeQuietly(this.n, this.fd);
    this.fd = -1;
  }
}

/** Receive buffer of the lease checks (nothing is expected; anything ends the lease). */
const leaseScratch = Buffer.allocUnsafe(64);

function closeQuietly(n: NativeAddon, fd: number): void {
  try {
    n.closeFd(fd);
  } catch {
    /* already closed */
  }
}
