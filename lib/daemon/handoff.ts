/**
 * Live handoff of virtiofs shares to a new daemon process, so that a restart or an upgrade of
 * vstore does not break a share a guest has mounted: QEMU's vhost-user-fs has no reconnect, so
 * the connection itself — and everything QEMU set up on it — must move to the new process.
 *
 *   vstore serve -c CONFIG --takeover            (the new daemon, same config)
 *     └─ connects to the running daemon's handoff socket, CONTROL.handoff
 *
 *   new ── hello ───────────────────────────────►  old: quiesce every share (no new ring entries
 *                                                       taken, requests in flight completed)
 *   new ◄── share (JSON + SCM_RIGHTS fds) × N ──   listening socket, vhost-user connection,
 *   new ◄── offered ────────────────────────────   guest memory, kick/call/err eventfds, inflight
 *       restore each share (trees opened,           area; FUSE session; id/handle table
 *       ids looked up, handles re-opened)
 *   new ── ready ───────────────────────────────►
 *   new ◄── commit ─────────────────────────────   COMMIT POINT: old no longer serves the shares
 *       start: rings run, a kick of its own             let go of its fd copies, drains and
 *       picks up what the guest queued                  closes its disks, stops
 *   new ◄── stopped ────────────────────────────   old exits 0
 *       disks, TCP listener, control socket and handoff socket (the paths are free now)
 *
 * Any failure before the commit point (a share the new config lacks, a tree that cannot be
 * opened, a request still in flight after the quiesce timeout, either side dying) leaves the old
 * daemon serving: it resumes its rings and nothing is lost — the guest saw a pause. After it, the
 * new daemon serves; if it dies then, the share is gone with it, as with any daemon crash.
 *
 * Wire: frames of [u32 payload length, u32 fd count] + JSON, the fds (at most FDS_PER_FRAME)
 * attached to the header; a message with more fds continues in frames without payload. Disks
 * are not handed over: NBD and vhost-user-blk front ends reconnect (QEMU's reconnect options),
 * and the new daemon opens them once the old one has closed them.
 */
import { rm } from 'node:fs/promises';
import type { Logger } from '../log.js';
import { native, type NativeAddon, type NativeFdWatcher } from '../native/index.js';
import { closeQuietly, listenPrivateSocket } from '../vhost/channel.js';
import type { AdoptedShare, RunningShare, ShareHandoffState } from './virtiofs.js';

export const HANDOFF_VERSION = 1;
const HEADER = 8;
/** Largest JSON payload of one message (an id table of a busy share is a few MB). */
const MAX_PAYLOAD = 256 * 1024 * 1024;
/** Below the addon's limit of fds per sendmsg. */
const FDS_PER_FRAME = 16;
/** How long a send may wait for room in the socket (the peer is reading). */
const SEND_WAIT_MS = 30_000;

/** The handoff socket of a daemon whose control socket is `control`. */
export function handoffSocketPath(control: string): string {
  return `${control}.handoff`;
}

export class HandoffError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'HandoffError';
  }
}

export interface HandoffMessage {
  type: string;
  [k: string]: unknown;
}

/**
 * Messages with fds over a connected unix stream socket, read in the event loop. Received fds
 * belong to whoever takes the message.
 */
export class HandoffChannel {
  private readonly n: NativeAddon;
  private watcher: NativeFdWatcher | null;
  private readonly header = Buffer.alloc(HEADER);
  private payload: Buffer | null = null;
  private got = 0;
  private frameFds: number[] = [];
  /** The message being assembled, waiting for its remaining fds. */
  private partial: { msg: HandoffMessage; fds: number[]; want: number } | null = null;
  private readonly inbox: Array<{ msg: HandoffMessage; fds: number[] }> = [];
  private waiter: { resolve: () => void } | null = null;
  private ended: Error | null = null;

  constructor(
    readonly fd: number,
    n?: NativeAddon,
  ) {
    this.n = n ?? native();
    this.watcher = new this.n.FdWatcher(fd, (status) => this.onReadable(status));
    this.watcher.start();
  }

  /** Sends one message; `fds` stay the caller's (the peer gets its own copies). */
  send(msg: HandoffMessage, fds: number[] = []): void {
    if (this.ended) throw new HandoffError(`handoff connection closed: ${this.ended.message}`);
    const body = Buffer.from(JSON.stringify({ ...msg, fdCount: fds.length }));
    if (body.length > MAX_PAYLOAD) throw new HandoffError(`handoff message of ${body.length} bytes`);
    const first = fds.slice(0, FDS_PER_FRAME);
    this.sendFrame(body, first);
    for (let i = FDS_PER_FRAME; i < fds.length; i += FDS_PER_FRAME) this.sendFrame(Buffer.alloc(0), fds.slice(i, i + FDS_PER_FRAME));
  }

  private sendFrame(body: Buffer, fds: number[]): void {
    const h = Buffer.alloc(HEADER);
    h.writeUInt32LE(body.length, 0);
    h.writeUInt32LE(fds.length, 4);
    // The fds ride on the header's first byte; the receiver reads the header alone first.
    this.n.sendMsg(this.fd, h, fds, SEND_WAIT_MS);
    if (body.length) this.n.sendMsg(this.fd, body, [], SEND_WAIT_MS);
  }

  /** The next message, or HandoffError at end of stream or after `timeoutMs`. */
  async receive(timeoutMs: number, what = 'the other daemon'): Promise<{ msg: HandoffMessage; fds: number[] }> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = this.inbox.shift();
      if (m) return m;
      if (this.ended) throw new HandoffError(`${what} closed the handoff connection (${this.ended.message})`);
      const left = deadline - Date.now();
      if (left <= 0) throw new HandoffError(`no answer from ${what} within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiter = {
          resolve: () => {
            clearTimeout(t);
            resolve();
          },
        };
      });
      this.waiter = null;
    }
  }

  close(): void {
    if (!this.ended) this.end(new Error('closed'));
    for (const m of this.inbox.splice(0)) for (const f of m.fds) closeQuietly(this.n, f);
  }

  private end(err: Error): void {
    if (this.ended) return;
    this.ended = err;
    this.watcher?.close();
    this.watcher = null;
    for (const f of [...this.frameFds, ...(this.partial?.fds ?? [])]) closeQuietly(this.n, f);
    this.frameFds = [];
    this.partial = null;
    closeQuietly(this.n, this.fd);
    this.waiter?.resolve();
  }

  private onReadable(status: number): void {
    if (this.ended) return;
    if (status < 0) {
      this.end(new Error(`socket error (libuv status ${status})`));
      return;
    }
    try {
      for (;;) {
        const buf = this.payload === null ? this.header.subarray(this.got) : this.payload.subarray(this.got);
        const fds: number[] = [];
        const r = this.n.recvMsg(this.fd, buf, fds);
        this.frameFds.push(...fds);
        if (r < 0) return;
        if (r === 0) {
          this.end(new Error('end of stream'));
          return;
        }
        this.got += r;
        if (this.payload === null) {
          if (this.got < HEADER) continue;
          const len = this.header.readUInt32LE(0);
          if (len > MAX_PAYLOAD) throw new HandoffError(`frame of ${len} bytes`);
          this.payload = Buffer.alloc(len);
          this.got = 0;
          if (len > 0) continue;
        } else if (this.got < this.payload.length) {
          continue;
        }
        this.frame(this.payload, this.header.readUInt32LE(4));
        this.payload = null;
        this.got = 0;
      }
    } catch (e) {
      this.end(e instanceof Error ? e : new Error(String(e)));
    }
  }

  private frame(body: Buffer, fdCount: number): void {
    const fds = this.frameFds.splice(0);
    if (fds.length !== fdCount) {
      for (const f of fds) closeQuietly(this.n, f);
      throw new HandoffError(`frame with ${fds.length} fds, header says ${fdCount}`);
    }
    if (this.partial === null) {
      if (body.length === 0) throw new HandoffError('fds without a message');
      const msg = JSON.parse(body.toString()) as HandoffMessage & { fdCount?: unknown };
      const want = typeof msg.fdCount === 'number' ? msg.fdCount : 0;
      delete msg.fdCount;
      this.partial = { msg, fds, want };
    } else {
      if (body.length !== 0) throw new HandoffError('a message began before the last one had its fds');
      this.partial.fds.push(...fds);
    }
    if (this.partial.fds.length > this.partial.want) throw new HandoffError('more fds than the message said');
    if (this.partial.fds.length === this.partial.want) {
      this.inbox.push({ msg: this.partial.msg, fds: this.partial.fds });
      this.partial = null;
      this.waiter?.resolve();
    }
  }
}

// ---- the running daemon's side --------------------------------------------------------------

/** What the old daemon offers (lib/daemon/daemon.ts wires it to the registry). */
export interface HandoffSource {
  /**
   * Runs `fn` with every share being served, while no VM is added or removed; `fn` returns the
   * shares to forget (handed over: neither closed nor served here any more).
   */
  withShares(fn: (shares: Array<{ vm: string; share: RunningShare }>) => Promise<Array<{ vm: string; share: RunningShare }>>): Promise<void>;
  /** After a committed handoff: stop the daemon (disks drained and closed) — then the process exits. */
  stop(): Promise<void>;
}

export interface HandoffServerOptions {
  path: string;
  source: HandoffSource;
  logger: Logger;
  /** How long a share may take to quiesce (requests in flight) before the handoff is refused. */
  quiesceTimeoutMs?: number;
  /** How long the new daemon may take to restore the shares. */
  restoreTimeoutMs?: number;
  native?: NativeAddon;
}

/** Listens on the handoff socket of a running daemon and hands its shares to whoever asks. */
export class HandoffServer {
  private readonly n: NativeAddon;
  private watcher: NativeFdWatcher | null;
  private busy = false;
  private closed = false;
  /** Resolves once the daemon has handed over and stopped. */
  readonly done: Promise<void>;
  private markDone!: () => void;

  private constructor(
    private readonly o: HandoffServerOptions,
    private readonly lfd: number,
  ) {
    this.n = o.native ?? native();
    this.done = new Promise((resolve) => (this.markDone = resolve));
    this.watcher = new this.n.FdWatcher(lfd, () => this.onAcceptable());
    this.watcher.start();
  }

  static async listen(o: HandoffServerOptions): Promise<HandoffServer> {
    const n = o.native ?? native();
    return new HandoffServer(o, await listenPrivateSocket(n, o.path, 'handoff socket', 2));
  }

  /** Stops listening and removes the socket (a handoff under way goes on). */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.watcher?.close();
    this.watcher = null;
    closeQuietly(this.n, this.lfd);
    await rm(this.o.path, { force: true });
  }

  private onAcceptable(): void {
    for (;;) {
      let fd: number;
      try {
        fd = this.n.unixAccept(this.lfd);
      } catch (e) {
        this.o.logger.error({ err: e }, 'handoff: accept failed');
        return;
      }
      if (fd < 0) return;
      const ch = new HandoffChannel(fd, this.n);
      void this.serve(ch).catch((e: unknown) => {
        this.o.logger.error({ err: e }, 'handoff: failed');
        ch.close();
      });
    }
  }

  private async serve(ch: HandoffChannel): Promise<void> {
    const log = this.o.logger;
    const { msg: hello, fds } = await ch.receive(10_000, 'the new daemon');
    for (const f of fds) closeQuietly(this.n, f);
    if (hello.type !== 'hello' || hello.version !== HANDOFF_VERSION) {
      ch.send({ type: 'refused', error: `expected hello version ${HANDOFF_VERSION}` });
      ch.close();
      return;
    }
    if (this.busy || this.closed) {
      ch.send({ type: 'refused', error: this.closed ? 'the daemon is stopping' : 'another handoff is under way' });
      ch.close();
      return;
    }
    this.busy = true;
    log.info({ peer: hello.pid }, 'handoff: a new daemon asks for the shares');
    let committed = false;
    try {
      await this.o.source.withShares(async (shares) => {
        committed = await this.handOver(ch, shares);
        return committed ? shares : [];
      });
    } finally {
      this.busy = false;
    }
    if (!committed) {
      ch.close();
      return;
    }
    log.info('handoff: committed; stopping (disks are drained and closed, then the process exits)');
    try {
      await this.o.source.stop();
      ch.send({ type: 'stopped' });
    } catch (e) {
      log.error({ err: e }, 'handoff: stopping after the handoff failed');
    } finally {
      ch.close();
      this.markDone();
    }
  }

  /** Quiesce, export, wait for ready, commit; false (shares resumed) when anything fails before the commit. */
  private async handOver(ch: HandoffChannel, shares: Array<{ vm: string; share: RunningShare }>): Promise<boolean> {
    const log = this.o.logger;
    const quiesced: RunningShare[] = [];
    const t0 = Date.now();
    try {
      for (const { vm, share } of shares) {
        if (!share.handoff) throw new HandoffError(`share ${vm}/${share.config.tag} cannot be handed over`);
        await share.handoff.quiesce(this.o.quiesceTimeoutMs ?? 10_000);
        quiesced.push(share);
      }
      for (const { share } of shares) {
        const { state, fds } = share.handoff!.exportState();
        ch.send({ type: 'share', state }, fds);
      }
      ch.send({ type: 'offered', count: shares.length });
      const { msg, fds } = await ch.receive(this.o.restoreTimeoutMs ?? 120_000, 'the new daemon');
      for (const f of fds) closeQuietly(this.n, f);
      if (msg.type !== 'ready') throw new HandoffError(`the new daemon did not take the shares: ${String(msg.error ?? msg.type)}`);
      // The commit point: once this is sent the new daemon serves; we never touch the rings again.
      ch.send({ type: 'commit' });
    } catch (e) {
      for (const s of quiesced) s.handoff!.resume();
      log.warn({ err: e, shares: shares.length }, 'handoff: not done; serving the shares here again');
      try {
        ch.send({ type: 'abort', error: (e as Error).message });
      } catch {
        /* the new daemon is gone */
      }
      return false;
    }
    for (const { vm, share } of shares) {
      await share.handoff!.detach().catch((e: unknown) => log.error({ err: e, vm, share: share.config.tag }, 'handoff: letting go of a share failed'));
    }
    log.info({ shares: shares.length, pausedMs: Date.now() - t0 }, 'handoff: shares handed over');
    return true;
  }
}

// ---- the new daemon's side ------------------------------------------------------------------

export interface TakeoverOptions {
  /** The running daemon's handoff socket. */
  path: string;
  logger: Logger;
  /** Rebuilds one offered share (takes its fds); throws to refuse the handoff. */
  adopt: (state: ShareHandoffState, fds: number[]) => Promise<AdoptedShare>;
  /** How long to wait for each message of the old daemon (its quiesce included). */
  timeoutMs?: number;
  /** How long the old daemon may take to stop after the commit (its disks drain). */
  stopTimeoutMs?: number;
  native?: NativeAddon;
}

/**
 * Takes the shares of the daemon listening at `o.path`. Resolves once they are served here and
 * the old daemon has stopped (or `stopTimeoutMs` passed); throws HandoffError when the handoff
 * did not happen (then the old daemon still serves, and nothing here holds any of it).
 */
export async function takeOver(o: TakeoverOptions): Promise<AdoptedShare[]> {
  const n = o.native ?? native();
  const log = o.logger;
  const timeoutMs = o.timeoutMs ?? 60_000;
  let fd: number;
  try {
    fd = n.unixConnect(o.path);
  } catch (e) {
    throw new HandoffError(`--takeover: no running daemon answers on ${o.path} (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
  }
  const ch = new HandoffChannel(fd, n);
  const adopted: AdoptedShare[] = [];
  try {
    ch.send({ type: 'hello', version: HANDOFF_VERSION, pid: process.pid });
    for (;;) {
      const { msg, fds } = await ch.receive(timeoutMs, 'the running daemon');
      if (msg.type === 'share') {
        adopted.push(await o.adopt(msg.state as ShareHandoffState, fds));
        continue;
      }
      for (const f of fds) closeQuietly(n, f);
      if (msg.type === 'offered') break;
      throw new HandoffError(`the running daemon refused: ${String(msg.error ?? msg.type)}`);
    }
    ch.send({ type: 'ready' });
    const { msg, fds } = await ch.receive(timeoutMs, 'the running daemon');
    for (const f of fds) closeQuietly(n, f);
    if (msg.type !== 'commit') throw new HandoffError(`the running daemon did not commit: ${String(msg.error ?? msg.type)}`);
  } catch (e) {
    try {
      ch.send({ type: 'abort', error: (e as Error).message });
    } catch {
      /* gone */
    }
    ch.close();
    for (const a of adopted) await a.abandon().catch(() => {});
    throw e instanceof HandoffError ? e : new HandoffError((e as Error).message);
  }
  for (const a of adopted) a.start();
  log.info({ shares: adopted.length }, 'handoff: shares taken over; waiting for the old daemon to stop');
  try {
    const { msg, fds } = await ch.receive(o.stopTimeoutMs ?? 120_000, 'the old daemon');
    for (const f of fds) closeQuietly(n, f);
    if (msg.type !== 'stopped') log.warn({ type: msg.type }, 'handoff: unexpected message after the commit');
  } catch (e) {
    // Closed without "stopped" (it exited) or too slow: go on; its sockets may still be in use.
    log.info({ why: (e as Error).message }, 'handoff: the old daemon is gone');
  }
  ch.close();
  return adopted;
}
