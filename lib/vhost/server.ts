/**
 * A vhost-user socket serving one device: listens on a unix socket (QEMU connects to it with
 * `-chardev socket,path=...`), serves one front end at a time, and accepts the next connection
 * once the current one has ended (QEMU's `reconnect=N`). A second front end while one is
 * connected is refused (its connection is closed at once).
 */
import { rm } from 'node:fs/promises';
import type { Logger } from '../log.js';
import { native, type NativeAddon, type NativeFdWatcher } from '../native/index.js';
import { VhostUserBackend, type BackendState, type VhostUserDevice } from './backend.js';
import { closeQuietly, listenPrivateSocket } from './channel.js';

export interface VhostUserServerOptions {
  /** Unix socket path; a stale socket is replaced, a live one refused. */
  path: string;
  device: VhostUserDevice;
  logger: Logger;
  native?: NativeAddon;
}

/** A server's state for a live handoff: its listening socket and its connection, if any. */
export interface ServerState {
  version: 1;
  /** Index of the listening socket in the fds. */
  listen: number;
  connections: number;
  connection: BackendState | null;
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
  /** detach(): the connection ends here but lives on in another process. */
  private detaching = false;
  /** Connections served so far (tests of reconnection). */
  connections = 0;

  private constructor(o: VhostUserServerOptions, n: NativeAddon, lfd: number, paused = false) {
    this.path = o.path;
    this.n = n;
    this.log = o.logger;
    this.device = o.device;
    this.lfd = lfd;
    this.watcher = new n.FdWatcher(lfd, () => this.onAcceptable());
    if (!paused) this.watcher.start();
  }

  // ---- live handoff (lib/daemon/handoff.ts) ------------------------------------------------

  /** Stops accepting and quiesces the connection (see VhostUserBackend.quiesce); resume() undoes it. */
  async quiesce(timeoutMs?: number): Promise<void> {
    if (this.stopped) throw new Error('the server is closed');
    this.watcher?.stop();
    try {
      await this.backend?.quiesce(timeoutMs);
    } catch (e) {
      if (!this.stopped) this.watcher?.start();
      throw e;
    }
  }

  /** After a failed handoff: accepting and serving again. */
  resume(): void {
    if (this.stopped) return;
    this.watcher?.start();
    this.backend?.resume();
  }

  /** The listening socket, the connection's state and the fds they name (still this server's). */
  exportState(): { state: ServerState; fds: number[] } {
    const conn = this.backend?.exportState();
    // One fd list: the listening socket first, then the connection's (indices shifted by one).
    return {
      state: { version: 1, listen: 0, connections: this.connections, connection: conn ? shiftFds(conn.state, 1) : null },
      fds: [this.lfd, ...(conn?.fds ?? [])],
    };
  }

  /**
   * The new process serves the socket now: close this process's copies of the listening socket
   * and the connection, tell the front end nothing, and leave the socket file in place.
   */
  async detach(): Promise<void> {
    this.detaching = true;
    await this.stopServing((b) => b.detach());
  }

  /** Stops listening and ends the connection with `end`; false when already stopped. */
  private async stopServing(end: (b: VhostUserBackend) => void): Promise<boolean> {
    if (this.stopped) return false;
    this.stopped = true;
    this.watcher?.close();
    this.watcher = null;
    closeQuietly(this.n, this.lfd);
    const b = this.backend;
    if (b !== null) {
      const gone = this.idle();
      end(b);
      await gone;
    }
    return true;
  }

  /**
   * A server from a handed-over state: the listening socket and, when one was connected, the
   * front end's connection, quiesced until start(). Takes every fd of `fds` (closed on failure).
   */
  static adopt(o: VhostUserServerOptions, state: ServerState, fds: number[]): VhostUserServer {
    const n = o.native ?? native();
    const lfd = fds[state.listen];
    if (state.version !== 1 || lfd === undefined || state.listen !== 0) {
      for (const f of fds) closeQuietly(n, f);
      throw new Error('bad vhost-user server state');
    }
    const s = new VhostUserServer(o, n, lfd, true);
    s.connections = state.connections;
    if (state.connection) {
      try {
        s.backend = VhostUserBackend.restore(shiftFds(state.connection, -1), fds.slice(1), o.device, { logger: s.log, native: n, onClose: () => s.onBackendClosed() });
      } catch (e) {
        s.watcher?.close();
        closeQuietly(n, lfd);
        throw e;
      }
    } else {
      for (const f of fds.slice(1)) closeQuietly(n, f);
    }
    return s;
  }

  /** An adopted server starts accepting and serving (the old process has let go). */
  start(): void {
    if (this.stopped) return;
    this.watcher?.start();
    this.backend?.start();
    this.log.info({ socket: this.path, connected: this.backend !== null }, 'vhost-user: serving a handed-over socket');
  }

  private onBackendClosed(): void {
    this.backend = null;
    if (!this.detaching) this.log.info({ socket: this.path }, 'vhost-user: front end disconnected');
    for (const w of this.closedWaiters.splice(0)) w();
  }

  static async listen(o: VhostUserServerOptions): Promise<VhostUserServer> {
    const n = o.native ?? native();
    const lfd = await listenPrivateSocket(n, o.path, 'vhost-user socket', 4);
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
          onClose: () => this.onBackendClosed(),
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
    if (!(await this.stopServing((b) => b.close()))) return;
    await rm(this.path, { force: true });
  }
}

/** The state with every fd index moved by `d` (absent fds, -1, stay). */
function shiftFds(c: BackendState, d: number): BackendState {
  const m = (i: number): number => (i < 0 ? i : i + d);
  return {
    ...c,
    conn: m(c.conn),
    regions: c.regions.map((r) => ({ ...r, fd: m(r.fd) })),
    inflight: c.inflight ? { ...c.inflight, fd: m(c.inflight.fd) } : null,
    queues: c.queues.map((q) => ({ ...q, kick: m(q.kick), call: m(q.call), err: m(q.err) })),
  };
}
