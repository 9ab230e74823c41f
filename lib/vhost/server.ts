/**
 * A vhost-user socket serving one device: listens on a unix socket (QEMU connects to it with
 * `-chardev socket,path=...`), serves one front end at a time, and accepts the next connection
 * once the current one has ended (QEMU's `reconnect=N`). A second front end while one is
 * connected is refused (its connection is closed at once).
 */
import { chmod, rm } from 'node:fs/promises';
import { prepareSocket } from '../net/address.js';
import type { Logger } from '../log.js';
import { native, type NativeAddon, type NativeFdWatcher } from '../native/index.js';
import { VhostUserBackend, type VhostUserDevice } from './backend.js';
import { closeQuietly } from './channel.js';

export interface VhostUserServerOptions {
  /** Unix socket path; a stale socket is replaced, a live one refused. */
  path: string;
  device: VhostUserDevice;
  logger: Logger;
  native?: NativeAddon;
}

export class VhostUserServer {
  readonly path: string;
  private readonly n: NativeAddon;
  private readonly log: Logger;
  private readonly device: VhostUserDevice;
  private readonly lfd: number;
  private watcher: NativeFdWatcher | null;
  private backend: VhostUserBackend | null = null;
  private closedWaiters: (() => void)[] = [];
  private stopped = false;
  /** Connections served so far (tests of reconnection). */
  connections = 0;

  private constructor(o: VhostUserServerOptions, n: NativeAddon, lfd: number) {
    this.path = o.path;
    this.n = n;
    this.log = o.logger;
    this.device = o.device;
    this.lfd = lfd;
    this.watcher = new n.FdWatcher(lfd, () => this.onAcceptable());
    this.watcher.start();
  }

  static async listen(o: VhostUserServerOptions): Promise<VhostUserServer> {
    const n = o.native ?? native();
    await prepareSocket(o.path, 'vhost-user socket');
    const lfd = n.unixListen(o.path, 4);
    try {
      await chmod(o.path, 0o600);
    } catch (e) {
      closeQuietly(n, lfd);
      throw e;
    }
    const s = new VhostUserServer(o, n, lfd);
    s.log.info({ socket: o.path }, 'vhost-user: listening');
    return s;
  }

  get connected(): boolean {
    return this.backend !== null;
  }

  /** Resolves when no front end is connected. */
  idle(): Promise<void> {
    if (this.backend === null) return Promise.resolve();
    return new Promise((resolve) => this.closedWaiters.push(resolve));
  }

  private onAcceptable(): void {
    for (;;) {
      let fd: number;
      try {
        fd = this.n.unixAccept(this.lfd);
      } catch (e) {
        this.log.error({ err: e }, 'vhost-user: accept failed');
        return;
      }
      if (fd < 0) return;
      if (this.backend !== null || this.stopped) {
        this.log.warn({ socket: this.path }, 'vhost-user: refusing a second front end');
        closeQuietly(this.n, fd);
        continue;
      }
      this.connections++;
      this.log.info({ socket: this.path }, 'vhost-user: front end connected');
      try {
        this.backend = new VhostUserBackend(fd, this.device, {
          logger: this.log,
          native: this.n,
          onClose: () => {
            this.backend = null;
            this.log.info({ socket: this.path }, 'vhost-user: front end disconnected');
            for (const w of this.closedWaiters.splice(0)) w();
          },
        });
      } catch (e) {
        this.log.error({ err: e }, 'vhost-user: cannot serve the connection');
        closeQuietly(this.n, fd);
      }
    }
  }

  /**
   * Drops the current front end's connection (as a crash of the back end would look to it);
   * the next connection is accepted. Requests in flight finish, unanswered.
   */
  disconnect(): Promise<void> {
    const b = this.backend;
    if (b === null) return Promise.resolve();
    const gone = this.idle();
    b.close(new Error('disconnected by the server'));
    return gone;
  }

  /** Stops listening, disconnects the front end and removes the socket. */
  async close(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    this.watcher?.close();
    this.watcher = null;
    closeQuietly(this.n, this.lfd);
    const b = this.backend;
    if (b !== null) {
      const gone = this.idle();
      b.close();
      await gone;
    }
    await rm(this.path, { force: true });
  }
}
