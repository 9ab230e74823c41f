/**
 * A vhost-user socket: whole messages with their fds, in and out, over a non-blocking unix
 * socket watched in the event loop. Frames only — what a message means is the caller's business
 * (back end: backend.ts; front end: test/helpers/vhost-frontend.ts).
 */
import type { NativeAddon, NativeFdWatcher } from '../native/index.js';
import { prepareSocket } from '../net/address.js';
import { encodeMessage, MessageReader, type Message } from './protocol.js';

export interface ChannelHandlers {
  /** One complete message; the handler owns msg.fds. Must not throw. */
  onMessage(msg: Message): void;
  /** The connection ended: `err` is undefined at a clean end of stream. Called once. */
  onClose(err?: Error): void;
}

export class Channel {
  readonly fd: number;
  private readonly n: NativeAddon;
  private readonly reader = new MessageReader();
  private watcher: NativeFdWatcher | null;
  private closed = false;
  private paused = false;
  private handlers: ChannelHandlers;

  constructor(n: NativeAddon, fd: number, handlers: ChannelHandlers) {
    this.n = n;
    this.fd = fd;
    this.handlers = handlers;
    this.watcher = new n.FdWatcher(fd, (status, events) => this.onReady(status, events));
    this.watcher.start();
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /**
   * Sends one message (header + payload) with fds attached to its first byte. `waitMs`: how
   * long to wait for room in a full socket (0: a peer that does not read is an error).
   */
  send(request: number, flags: number, payload?: Uint8Array, fds?: number[], waitMs = 0): void {
    if (this.closed) throw new Error('vhost-user channel closed');
    this.n.sendMsg(this.fd, encodeMessage(request, flags, payload), fds, waitMs);
  }

  /** Stops reading (backpressure: the receiver has too many messages queued). */
  pause(): void {
    if (!this.closed && !this.paused) {
      this.paused = true;
      this.watcher?.stop();
    }
  }

  resume(): void {
    if (!this.closed && this.paused) {
      this.paused = false;
      this.watcher?.start();
    }
  }

  /** Stops reading, closes the socket and any fds of a partial message; calls onClose(err). */
  close(err?: Error): void {
    if (this.closed) return;
    this.closed = true;
    this.watcher?.close();
    this.watcher = null;
    for (const f of this.reader.takePendingFds()) closeQuietly(this.n, f);
    closeQuietly(this.n, this.fd);
    this.handlers.onClose(err);
  }

  private onReady(status: number, _events: number): void {
    if (this.closed) return;
    if (status < 0) {
      // libuv reports POLLERR as EBADF (-9): on a unix socket that is the peer resetting the
      // connection (it closed with our messages unread).
      this.close(new Error(status === -9 ? 'vhost-user connection reset by peer' : `vhost-user socket error (libuv status ${status})`));
      return;
    }
    try {
      // Read until the socket is empty (or a bounded number of messages, to stay fair).
      for (let i = 0; i < 256 && !this.closed && !this.paused; i++) {
        const fds: number[] = [];
        const r = this.n.recvMsg(this.fd, this.reader.want(), fds);
        if (r < 0) return;
        if (r === 0) {
          for (const f of fds) closeQuietly(this.n, f);
          this.close(this.reader.midMessage ? new Error('vhost-user socket closed inside a message') : undefined);
          return;
        }
        // advance() owns the fds from here (close() releases those of a partial message).
        const msg = this.reader.advance(r, fds);
        if (msg !== null) this.handlers.onMessage(msg);
      }
    } catch (e) {
      this.close(e instanceof Error ? e : new Error(String(e)));
    }
  }
}

/**
 * A listening unix socket of mode 0600 for the addon's fd servers (vhost-user, handoff,
 * short-circuit): the path made usable first (prepareSocket), and created under umask 0177 so it
 * never exists with wider permissions, even for a moment.
 */
export async function listenPrivateSocket(n: NativeAddon, p: string, what: string, backlog: number): Promise<number> {
  await prepareSocket(p, what);
  const old = process.umask(0o177);
  try {
    return n.unixListen(p, backlog);
  } finally {
    process.umask(old);
  }
}

export function closeQuietly(n: NativeAddon, fd: number): void {
  if (fd < 0) return;
  try {
    n.closeFd(fd);
  } catch {
    /* already closed */
  }
}
