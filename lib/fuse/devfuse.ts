/**
 * The /dev/fuse transport: a FileTree mounted on the host through the kernel's FUSE driver, as
 * virtiofsd's vhost_user.rs is only a transport around its server. Frames read from /dev/fuse go
 * to a FuseEngine; its replies are written back, one writev each.
 *
 * - Mounting, as root: /dev/fuse is opened here (O_NONBLOCK) and handed to mount(2) as `fd=N`
 *   (the addon's fuseMount). As any other user: fusermount3 (setuid root, Debian's fuse3) mounts
 *   and hands the /dev/fuse fd back over the _FUSE_COMMFD socket (SCM_RIGHTS), as libfuse does;
 *   it is made non-blocking here. Unmounting is umount2 or `fusermount3 -u` accordingly.
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
import { spawn } from 'node:child_process';
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
  /** Other users may use the mount (allow_other). Default true as root; for others fusermount3 allows it only with user_allow_other in /etc/fuse.conf. */
  allowOther?: boolean;
  /** 'mount': mount(2), root only; 'fusermount': fusermount3; 'auto' (default): mount(2) as root, else fusermount3. */
  method?: 'auto' | 'mount' | 'fusermount';
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

  private constructor(
    opts: DevFuseOptions,
    fd: number,
    private readonly method: 'mount' | 'fusermount',
  ) {
    this.engine = opts.engine;
    this.log = opts.logger;
    this.mountpoint = opts.mountpoint;
    this.fd = fd;
    this.frameSize = opts.engine.frameSize;
    this.readBuf = Buffer.allocUnsafeSlow(this.frameSize);
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
  }

  /** Mounts and starts serving. Throws (with nothing left mounted) when mounting fails. */
  static async mount(opts: DevFuseOptions): Promise<DevFuseMount> {
    const mountpoint = path.resolve(opts.mountpoint);
    const st = statSync(mountpoint);
    if (!st.isDirectory()) throw new Error(`${mountpoint}: not a directory`);
    const root = (process.getuid?.() ?? 0) === 0;
    const method = opts.method === 'fusermount' || (opts.method !== 'mount' && !root) ? 'fusermount' : 'mount';
    const common = [
      ...(opts.defaultPermissions === false ? [] : ['default_permissions']),
      ...((opts.allowOther ?? root) ? ['allow_other'] : []),
    ];
    let fd: number;
    let shown: string;
    if (method === 'mount') {
      fd = openSync('/dev/fuse', fsConstants.O_RDWR | fsConstants.O_NONBLOCK);
      const uid = process.getuid?.() ?? 0;
      const gid = process.getgid?.() ?? 0;
      shown = [`fd=${fd}`, `rootmode=${(st.mode & fsConstants.S_IFMT).toString(8)}`, `user_id=${uid}`, `group_id=${gid}`, ...common].join(',');
      const flags = MS_NOSUID | MS_NODEV | (opts.readOnly ? MS_RDONLY : 0);
      try {
        native().fuseMount(opts.source, mountpoint, 'fuse.vstore', flags, shown);
      } catch (e) {
        closeSync(fd);
        throw e;
      }
    } else {
      // fusermount3 adds fd=, rootmode=, user_id= and group_id= itself.
      shown = [`fsname=${escapeOpt(opts.source)}`, 'subtype=vstore', 'nosuid', 'nodev', ...common, ...(opts.readOnly ? ['ro'] : [])].join(',');
      fd = await fusermount(mountpoint, shown);
    }
    const m = new DevFuseMount({ ...opts, mountpoint }, fd, method);
    m.log.info({ mountpoint, source: opts.source, method, options: shown }, 'fuse: mounted');
    m.watcher = new (native().FdWatcher)(fd, (status, events) => m.onReady(status, events));
    m.startWatching();
    return m;
  }

  /**
   * Unmounts: umount2 (or fusermount3 -u), lazily when the mount is busy, then closes /dev/fuse.
   * Idempotent; resolves when the session has ended.
   */
  async unmount(): Promise<EndReason> {
    if (!this.ending && this.mounted) {
      this.mounted = false;
      const busy = this.method === 'mount' ? await this.umount2() : await this.fusermountU();
      if (busy) {
        this.log.warn({ mountpoint: this.mountpoint }, 'fuse: mount busy, detached lazily');
        if (this.method === 'mount') await this.umount2(MNT_DETACH);
        else await this.fusermountU(true);
      } else {
        this.log.info({ mountpoint: this.mountpoint }, 'fuse: unmounted');
      }
      void this.finish('stopped');
    }
    return this.closed;
  }

  /** umount2 (off the event loop, which serves the unmount's own requests); true when busy. Not mounted any more (EINVAL) is fine. */
  private async umount2(flags = 0): Promise<boolean> {
    try {
      await native().fuseUnmount(this.mountpoint, flags);
    } catch (e) {
      const code = (e as { code?: string }).code;
      if (code === 'EBUSY' && flags === 0) return true;
      if (code !== 'EINVAL') this.log.error({ err: e }, 'fuse: unmount failed');
    }
    return false;
  }

  /** `fusermount3 -u [-z]`; true when the mount is busy. */
  private async fusermountU(lazy = false): Promise<boolean> {
    const r = await runFusermount(['-u', ...(lazy ? ['-z'] : []), '--', this.mountpoint]);
    if (r.code === 0) return false;
    if (!lazy && /busy/i.test(r.stderr)) return true;
    if (!/not found|not mounted|entry for .* not found/i.test(r.stderr)) this.log.error({ stderr: r.stderr.trim() }, 'fuse: fusermount3 -u failed');
    return false;
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
          // Still `mounted`: someone else unmounted; otherwise it is our own unmount() under way.
          const outside = this.mounted;
          this.mounted = false;
          if (outside) this.log.info({ mountpoint: this.mountpoint }, 'fuse: unmounted from outside, session over');
          void this.finish(outside ? 'unmounted' : 'stopped');
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
    await this.engine.end({ drainMs: 5000 });
    this.log.info({ mountpoint: this.mountpoint, reason }, 'fuse: session ended');
    this.resolveClosed(reason);
  }
}

/** fusermount3's option syntax: commas and backslashes in a value are backslash-escaped. */
function escapeOpt(v: string): string {
  return v.replace(/[\\,]/g, (c) => `\\${c}`);
}

function runFusermount(args: string[], extraFd?: number): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn('fusermount3', args, {
      stdio: ['ignore', 'ignore', 'pipe', ...(extraFd === undefined ? [] : [extraFd])],
      env: extraFd === undefined ? process.env : { ...process.env, _FUSE_COMMFD: '3' },
    });
    let stderr = '';
    child.stderr!.on('data', (b: Buffer) => (stderr += b.toString()));
    child.on('error', (e: NodeJS.ErrnoException) =>
      reject(e.code === 'ENOENT' ? new Error('fusermount3 not found: install Debian\'s fuse3 (or run as root)') : e),
    );
    child.on('close', (code) => resolve({ code, stderr }));
  });
}

/** Mounts through fusermount3 and returns the /dev/fuse fd it sends back, non-blocking. */
async function fusermount(mountpoint: string, options: string): Promise<number> {
  const n = native();
  const [ours, theirs] = n.fuseSocketPair();
  try {
    const r = await runFusermount(['-o', options, '--', mountpoint], theirs);
    if (r.code !== 0) throw new Error(`fusermount3: ${r.stderr.trim() || `exit ${r.code}`}`);
    const fds: number[] = [];
    n.recvMsg(ours, Buffer.alloc(16), fds);
    if (fds.length !== 1) {
      for (const f of fds) n.closeFd(f);
      await runFusermount(['-u', '-z', '--', mountpoint]);
      throw new Error('fusermount3 mounted but sent no /dev/fuse fd');
    }
    n.fuseSetNonBlocking(fds[0]!);
    return fds[0]!;
  } finally {
    n.closeFd(ours);
    n.closeFd(theirs);
  }
}
