/**
 * The /dev/fuse transport: a FileTree mounted on the host through the kernel's FUSE driver, as
 * virtiofsd's vhost_user.rs is only a transport around its server. Frames read from /dev/fuse go
 * to a FuseEngine; its replies are written back, one writev each.
 *
 * - Mounting: /dev/fuse is opened here (O_NONBLOCK) and handed to mount(2) as `fd=N` (the addon's
 *   fuseMount; root only). fusermount3 is not needed, and the fd is ours, non-blocking from the
 *   start.
 * - Reading never blocks the event loop: an FdWatcher (uv_poll) reports readiness, and reads go
 *   on until EAGAIN. While the engine is saturated the watcher is stopped (the kernel keeps the
 *   requests queued) and restarted when a reply frees a slot.
 * - Buffers: the kernel needs room for the largest request (header + fuse_write_in + max_write)
 *   in every read. A small request (the common case: LOOKUP, GETATTR, ...) is copied out of the
 *   shared read buffer so the buffer is reused at once; a large one (a WRITE) keeps the buffer
 *   until it is answered — its payload goes to the tree as a view, without a copy — and the next
 *   read takes a buffer from a small pool.
 * - End: an external `umount` aborts the connection (reads fail ENODEV); `unmount()` detaches the
 *   mount (lazily when it is busy) and closes /dev/fuse, which aborts whatever the kernel still
 *   waits for. Either way the engine's session ends (tree.endSession) and `closed` resolves.
 */
import { closeSync, openSync, readSync, statSync, writevSync, constants as fsConstants } from 'node:fs';
import path from 'node:path';
import type { Logger } from '../log.js';
import { native, type NativeFdWatcher } from '../native/index.js';
import type { FuseEngine } from './engine.js';

const MS_RDONLY = 1;
const MS_NOSUID = 2;
const MS_NODEV = 4;
const MNT_DETACH = 2;
/** Requests up to this size are copied out of the read buffer (cheaper than holding 1 MiB). */
const COPY_BELOW = 16 * 1024;
/** Large read buffers kept for reuse. */
const POOL_MAX = 4;

export interface DevFuseOptions {
  engine: FuseEngine;
  logger: Logger;
  mountpoint: string;
  /** Shown as the mount's source in /proc/mounts (the shared directory). */
  source: string;
  readOnly?: boolean;
  /** Kernel-side permission checks from the mode bits (mount option default_permissions). Default true. */
  defaultPermissions?: boolean;
  /** Other users may use the mount (allow_other). Default true. */
  allowOther?: boolean;
}

export type EndReason = 'unmounted' | 'stopped' | 'error';

export class DevFuseMount {
  readonly mountpoint: string;
  /** Resolves once the session is over and /dev/fuse is closed. */
  readonly closed: Promise<EndReason>;
  private resolveClosed!: (r: EndReason) => void;
  private readonly engine: FuseEngine;
  private readonly log: Logger;
  private readonly fd: number;
  private watcher: NativeFdWatcher | undefined;
  private watching = false;
  private ending = false;
  private mounted = true;
  private readBuf: Buffer;
  private readonly pool: Buffer[] = [];
  private readonly frameSize: number;

  private constructor(opts: DevFuseOptions, fd: number) {
    this.engine = opts.engine;
    this.log = opts.logger;
    this.mountpoint = opts.mountpoint;
    this.fd = fd;
    this.frameSize = opts.engine.frameSize;
    this.readBuf = Buffer.allocUnsafeSlow(this.frameSize);
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
  }

  /** Mounts and starts serving. Throws (with nothing left mounted) when mount(2) fails. */
  static mount(opts: DevFuseOptions): DevFuseMount {
    const mountpoint = path.resolve(opts.mountpoint);
    const st = statSync(mountpoint);
    if (!st.isDirectory()) throw new Error(`${mountpoint}: not a directory`);
    const fd = openSync('/dev/fuse', fsConstants.O_RDWR | fsConstants.O_NONBLOCK);
    const uid = process.getuid?.() ?? 0;
    const gid = process.getgid?.() ?? 0;
    const data = [
      `fd=${fd}`,
      `rootmode=${(st.mode & fsConstants.S_IFMT).toString(8)}`,
      `user_id=${uid}`,
      `group_id=${gid}`,
      ...(opts.defaultPermissions === false ? [] : ['default_permissions']),
      ...(opts.allowOther === false ? [] : ['allow_other']),
    ].join(',');
    const flags = MS_NOSUID | MS_NODEV | (opts.readOnly ? MS_RDONLY : 0);
    try {
      native().fuseMount(opts.source, mountpoint, 'fuse.vstore', flags, data);
    } catch (e) {
      closeSync(fd);
      throw e;
    }
    const m = new DevFuseMount({ ...opts, mountpoint }, fd);
    m.log.info({ mountpoint, source: opts.source, options: data }, 'fuse: mounted');
    m.watcher = new (native().FdWatcher)(fd, (status, events) => m.onReady(status, events));
    m.startWatching();
    return m;
  }

  /**
   * Unmounts: umount2, lazily (MNT_DETACH) when the mount is busy, then closes /dev/fuse.
   * Idempotent; resolves when the session has ended.
   */
  async unmount(): Promise<EndReason> {
    if (!this.ending && this.mounted) {
      try {
        native().fuseUnmount(this.mountpoint, 0);
        this.log.info({ mountpoint: this.mountpoint }, 'fuse: unmounted');
      } catch (e) {
        const code = (e as { code?: string }).code;
        if (code === 'EBUSY') {
          this.log.warn({ mountpoint: this.mountpoint }, 'fuse: mount busy, detached lazily');
          try {
            native().fuseUnmount(this.mountpoint, MNT_DETACH);
          } catch (e2) {
            this.log.error({ err: e2 }, 'fuse: lazy unmount failed');
          }
        } else if (code !== 'EINVAL') {
          // EINVAL: no longer mounted (someone ran umount first).
          this.log.error({ err: e }, 'fuse: unmount failed');
        }
      }
      this.mounted = false;
      void this.finish('stopped');
    }
    return this.closed;
  }

  private startWatching(): void {
    if (this.watching || this.ending) return;
    this.watching = true;
    this.watcher!.start();
  }

  private stopWatching(): void {
    if (!this.watching) return;
    this.watching = false;
    this.watcher!.stop();
  }

  private onReady(status: number, _events: number): void {
    this.pump();
    if (status < 0 && !this.ending) {
      // libuv reports POLLERR as an error status: after an unmount the read above failed
      // ENODEV and ended the session; anything else is a real error.
      this.log.error({ status }, 'fuse: poll error on /dev/fuse');
      void this.finish('error');
    }
  }

  /**
   * Reads one request per readiness callback. uv_poll is level-triggered, so a queue of requests
   * brings the callback back once per loop turn; reading on until EAGAIN would instead cost a
   * thrown EAGAIN error (a Node exception with a stack, ~10 us) after nearly every request.
   */
  private pump(): void {
    if (!this.ending) {
      if (this.engine.saturated) {
        this.stopWatching();
        return;
      }
      let n: number;
      try {
        n = readSync(this.fd, this.readBuf, 0, this.readBuf.length, null);
      } catch (e) {
        const code = (e as { code?: string }).code;
        if (code === 'EAGAIN' || code === 'EWOULDBLOCK') return;
        // EINTR; ENOENT: the request was interrupted before we read it.
        if (code === 'EINTR' || code === 'ENOENT') return;
        if (code === 'ENODEV' || code === 'ECONNABORTED') {
          this.log.info({ mountpoint: this.mountpoint }, 'fuse: unmounted from outside, session over');
          this.mounted = false;
          void this.finish('unmounted');
        } else {
          this.log.error({ err: e }, 'fuse: reading /dev/fuse failed');
          void this.finish('error');
        }
        return;
      }
      if (n === 0) {
        void this.finish('unmounted');
        return;
      }
      let frame: Buffer;
      let owned: Buffer | undefined;
      if (n < COPY_BELOW) {
        // Copied (n bytes, small) so the 1 MiB read buffer serves the next read at once.
        frame = Buffer.from(this.readBuf.subarray(0, n));
      } else {
        owned = this.readBuf;
        frame = owned.subarray(0, n);
        this.readBuf = this.pool.pop() ?? Buffer.allocUnsafeSlow(this.frameSize);
      }
      this.serve(frame, owned);
    }
  }

  private serve(frame: Buffer, owned: Buffer | undefined): void {
    this.engine.handle(frame).then((reply) => {
      if (owned && this.pool.length < POOL_MAX) this.pool.push(owned);
      if (reply && !this.ending) this.write(reply);
      if (!this.watching && !this.ending && !this.engine.saturated) {
        this.startWatching();
        this.pump();
      }
    });
  }

  private write(reply: Buffer[]): void {
    try {
      writevSync(this.fd, reply);
    } catch (e) {
      const code = (e as { code?: string }).code;
      // ENOENT: the request was interrupted and is gone; the kernel wants no answer any more.
      if (code === 'ENOENT') return;
      if (code === 'ENODEV' || code === 'ECONNABORTED') {
        this.mounted = false;
        void this.finish('unmounted');
        return;
      }
      this.log.error({ err: e, len: reply.reduce((s, b) => s + b.length, 0) }, 'fuse: reply refused by the kernel');
    }
  }

  private async finish(reason: EndReason): Promise<void> {
    if (this.ending) return;
    this.ending = true;
    this.stopWatching();
    this.watcher?.close();
    // Closing /dev/fuse aborts the connection: requests the kernel still waits for fail ENOTCONN.
    try {
      closeSync(this.fd);
    } catch {
      /* already closed */
    }
    await this.engine.end();
    this.log.info({ mountpoint: this.mountpoint, reason }, 'fuse: session ended');
    this.resolveClosed(reason);
  }
}
