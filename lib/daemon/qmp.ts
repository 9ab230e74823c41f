/**
 * A small QMP client (QEMU Machine Protocol: JSON lines over a unix socket): the greeting,
 * `qmp_capabilities`, commands with ids (answers matched by id, so events in between are fine)
 * and events. What the daemon needs to pause a VM whose disk lost every path (`stop`) and resume
 * it (`cont`), and to tell whether the VM is running (`query-status`).
 *
 * Control plane only. QEMU answers commands one at a time across all its monitors; `stop` is
 * answered only after QEMU drained its block devices, so a caller must not wait for that answer
 * while requests of the VM are held (see lib/paths/suspend.ts).
 */
import { EventEmitter } from 'node:events';
import * as net from 'node:net';

export class QmpError extends Error {
  constructor(
    message: string,
    /** QMP error class (`GenericError`, `CommandNotFound`...), or 'transport'. */
    readonly errorClass: string,
  ) {
    super(message);
    this.name = 'QmpError';
  }
}

export interface QmpStatus {
  running: boolean;
  /** `running`, `paused`, `io-error`, `shutdown`, ... */
  status: string;
  singlestep?: boolean;
}

export interface QmpEvent {
  event: string;
  data?: unknown;
  timestamp?: { seconds: number; microseconds: number };
}

/** Longest line accepted from QEMU (a query-* answer is a few KiB). */
const MAX_LINE = 1024 * 1024;

export class QmpClient extends EventEmitter {
  private buf = '';
  private nextId = 1;
  private readonly pending = new Map<string, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private closedWith: Error | null = null;

  private constructor(private readonly socket: net.Socket) {
    super();
    socket.setEncoding('utf8');
    socket.on('data', (s: string) => this.onData(s));
    socket.on('error', (e) => this.fail(new QmpError(`qmp: ${e.message}`, 'transport')));
    socket.on('close', () => this.fail(new QmpError('qmp: connection closed', 'transport')));
  }

  /** Connects, reads the greeting and leaves capabilities negotiation mode. */
  static async connect(socketPath: string, timeoutMs = 5000): Promise<QmpClient> {
    const socket = net.connect({ path: socketPath });
    const c = new QmpClient(socket);
    const timer = setTimeout(() => c.fail(new QmpError(`qmp ${socketPath}: no greeting in ${timeoutMs} ms`, 'transport')), timeoutMs);
    try {
      await new Promise<void>((resolve, reject) => {
        c.once('greeting', () => resolve());
        c.once('closed', (e: Error) => reject(e));
      });
      await c.execute('qmp_capabilities');
      return c;
    } catch (e) {
      c.close();
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Runs a command; resolves with its `return` value, rejects with QmpError. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closedWith) return Promise.reject(this.closedWith);
    const id = `vstore-${this.nextId++}`;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.socket.write(JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id }) + '\n');
    });
  }

  queryStatus(): Promise<QmpStatus> {
    return this.execute<QmpStatus>('query-status');
  }

  /** Resolves with the next event named `name` (rejects when the connection ends or after timeoutMs). */
  waitEvent(name: string, timeoutMs: number): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      const onEvent = (ev: QmpEvent): void => {
        if (ev.event !== name) return;
        done();
        resolve(ev);
      };
      const onClosed = (e: Error): void => {
        done();
        reject(e);
      };
      const timer = setTimeout(() => {
        done();
        reject(new QmpError(`qmp: no ${name} event in ${timeoutMs} ms`, 'timeout'));
      }, timeoutMs);
      const done = (): void => {
        clearTimeout(timer);
        this.off('event', onEvent);
        this.off('closed', onClosed);
      };
      this.on('event', onEvent);
      this.once('closed', onClosed);
    });
  }

  close(): void {
    this.socket.destroy();
    this.fail(new QmpError('qmp: closed', 'transport'));
  }

  private onData(s: string): void {
    this.buf += s;
    if (this.buf.length > MAX_LINE && !this.buf.includes('\n')) {
      this.fail(new QmpError('qmp: line too long', 'transport'));
      this.socket.destroy();
      return;
    }
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (line) this.onMessage(line);
    }
  }

  private onMessage(line: string): void {
    let m: Record<string, unknown>;
    try {
      m = JSON.parse(line) as Record<string, unknown>;
    } catch {
      this.fail(new QmpError(`qmp: not JSON: ${line.slice(0, 200)}`, 'transport'));
      this.socket.destroy();
      return;
    }
    if ('QMP' in m) {
      this.emit('greeting', m.QMP);
      return;
    }
    if (typeof m.event === 'string') {
      this.emit('event', m as unknown as QmpEvent);
      return;
    }
    const id = typeof m.id === 'string' ? m.id : undefined;
    const p = id !== undefined ? this.pending.get(id) : undefined;
    if (!p) return; // an answer to nothing we sent (or without id): ignored
    this.pending.delete(id!);
    if ('error' in m) {
      const err = m.error as { class?: string; desc?: string };
      p.reject(new QmpError(`qmp: ${err.desc ?? 'error'}`, err.class ?? 'GenericError'));
    } else p.resolve(m.return);
  }

  private fail(e: Error): void {
    if (this.closedWith) return;
    this.closedWith = e;
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
    this.emit('closed', e);
  }
}

/**
 * The VM control the suspender uses (lib/paths/suspend.ts), over one persistent QMP connection
 * (QEMU's QMP socket serves one client at a time), opened when first needed and again after it
 * broke.
 */
export class QmpVmControl {
  private client: QmpClient | null = null;
  private connecting: Promise<QmpClient> | null = null;

  constructor(
    readonly socketPath: string,
    private readonly timeoutMs = 10_000,
  ) {}

  private async get(): Promise<QmpClient> {
    if (this.client) return this.client;
    this.connecting ??= QmpClient.connect(this.socketPath, this.timeoutMs).then(
      (c) => {
        this.client = c;
        this.connecting = null;
        c.once('closed', () => {
          if (this.client === c) this.client = null;
        });
        return c;
      },
      (e: unknown) => {
        this.connecting = null;
        throw e;
      },
    );
    return this.connecting;
  }

  async running(): Promise<boolean> {
    return (await (await this.get()).queryStatus()).running;
  }

  /**
   * Sends `stop` and resolves on the STOP event: QEMU answers `stop` itself only once its block
   * devices are drained, which needs the requests this daemon holds (see lib/paths/suspend.ts).
   */
  async stop(): Promise<void> {
    const c = await this.get();
    const stopped = c.waitEvent('STOP', this.timeoutMs);
    c.execute('stop').catch(() => {}); // answered after the drain; nothing to wait for
    await stopped;
  }

  async cont(): Promise<void> {
    const c = await this.get();
    const s = await c.queryStatus();
    if (s.running) return;
    await c.execute('cont');
  }

  close(): void {
    this.client?.close();
    this.client = null;
  }
}
