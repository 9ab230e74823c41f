/**
 * What happens to a VM whose disk has no usable path to any in-sync replica (`vms[].onUnreachable`):
 *
 *   queue — its requests wait in the replicated layer (bounded, `maxWaiting`) for a replica,
 *           up to `failAfterMs` (default: the disk's waitTimeoutMs), then fail with EIO;
 *   fail  — the same with `failAfterMs` as the bound (default 30 s): the guest sees EIO then;
 *   pause — the daemon pauses the VM over its QMP socket (`stop`) and resumes it (`cont`) when
 *           every disk of the VM is reachable again; only a VM it paused itself (a VM the user
 *           paused stays paused).
 *
 * Pausing, and why requests are handed back to QEMU. `stop` halts the vCPUs at once, then QEMU
 * drains its block devices: QMP answers nothing (on any monitor) until every request the VM has
 * in flight here completed. Held requests would therefore freeze QMP for the whole outage. So,
 * once the VM is stopped, SuspendGate fails the VM's outstanding requests with EIO, and every
 * request arriving while paused: with the drive's error policy `werror=stop,rerror=stop` (the
 * libvirt `error_policy='stop'`) QEMU keeps such a request and resubmits it on `cont`, so the
 * guest never sees the error. Without that policy the guest would get EIO: use `queue` then.
 *
 * Safety of handing a request back while it still runs below: the handed-back request stays
 * in flight in the replicated layer (it may still land when a replica returns), and QEMU will
 * send it again after `cont`. Both copies carry the same data to the same range (idempotent);
 * what must not happen is a newer overlapping write landing between them and being overwritten
 * by the older copy. While suspended the gate lets nothing through, and `resume()` waits until
 * every handed-back request settled below before the gate opens and `cont` is sent: no request
 * of the VM overtakes one of its older ones.
 */
import { VolumeError } from '../block/errors.js';
import { VolumeLayer } from '../block/layer.js';
import type { Extent, Volume, WriteOptions, ZeroOptions } from '../block/volume.js';
import type { Logger } from '../log.js';

export type UnreachableAction = 'queue' | 'pause' | 'fail';

/** What `vstore status` shows of a VM that lost its disks' paths. */
export interface SuspendStatus {
  action: UnreachableAction;
  /** When the VM's disks became unreachable (ISO time). */
  since: string;
  /** The disks that have no reachable in-sync replica. */
  disks: string[];
  /** The daemon paused the VM over QMP (action pause). */
  paused: boolean;
  /** Requests handed back to QEMU (action pause). */
  handedBack: number;
}

/** Holds a disk's requests while its VM is paused; pass-through otherwise. */
export class SuspendGate extends VolumeLayer {
  private suspended = false;
  /** Requests below whose callers still wait: a request and how to answer its caller early. */
  private readonly live = new Set<{ done: Promise<unknown>; reject: (e: VolumeError) => void }>();
  /** Requests handed back to QEMU that still run below. */
  private readonly handed = new Set<Promise<unknown>>();
  handedBack = 0;

  constructor(inner: Volume) {
    super(inner);
  }

  /** Fails every outstanding request with EIO (they stay in flight below) and every new one. */
  suspend(): number {
    this.suspended = true;
    const n = this.live.size;
    for (const e of this.live) {
      const settled = e.done.then(
        () => {},
        () => {},
      );
      this.handed.add(settled);
      void settled.then(() => this.handed.delete(settled));
      e.reject(paused());
    }
    this.live.clear();
    this.handedBack += n;
    return n;
  }

  /** Waits for every handed-back request to settle below, then lets requests through again. */
  async resume(): Promise<void> {
    while (this.handed.size > 0) await Promise.all([...this.handed]);
    this.suspended = false;
  }

  get isSuspended(): boolean {
    return this.suspended;
  }

  /** The volume below answers for the replicas (`vstore status`). */
  replicationStatus(): unknown {
    const r = this.inner as { replicationStatus?: () => unknown };
    return r.replicationStatus?.();
  }

  private gate<T>(run: () => Promise<T>): Promise<T> {
    if (this.suspended) return Promise.reject(paused());
    const done = run();
    return new Promise<T>((resolve, reject) => {
      const e = { done, reject };
      this.live.add(e);
      done.then(
        (v) => {
          if (this.live.delete(e)) resolve(v);
        },
        (err: unknown) => {
          if (this.live.delete(e)) reject(err as Error);
        },
      );
    });
  }

  override read(offset: number, buf: Buffer): Promise<void> {
    return this.gate(() => this.inner.read(offset, buf));
  }
  override write(offset: number, buf: Buffer, opts?: WriteOptions): Promise<void> {
    return this.gate(() => this.inner.write(offset, buf, opts));
  }
  override flush(): Promise<void> {
    return this.gate(() => this.inner.flush());
  }
  override trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    return this.gate(() => this.inner.trim(offset, length, opts));
  }
  override writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    return this.gate(() => this.inner.writeZeroes(offset, length, opts));
  }
  override prefetch(offset: number, length: number): Promise<void> {
    return this.gate(() => this.inner.prefetch(offset, length));
  }
  override blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.gate(() => this.inner.blockStatus(offset, length));
  }
}

function paused(): VolumeError {
  return new VolumeError('EIO', 'the VM is paused: its disk has no reachable replica (QEMU resubmits this request on cont with werror/rerror=stop)');
}

/** What the suspender needs of the VM's QMP socket (lib/daemon/qmp.ts, or a fake in tests). */
export interface VmControl {
  /** Whether the VM runs now. */
  running(): Promise<boolean>;
  /** Sends `stop`; resolves when the VM is paused (QEMU's STOP event), not when `stop` is answered. */
  stop(): Promise<void>;
  /** Sends `cont` (only when the VM is paused), resolves when answered. */
  cont(): Promise<void>;
}

export interface DiskReach {
  name: string;
  /** Some in-sync replica of the disk is up. */
  reachable(): boolean;
  gate?: SuspendGate;
}

export interface VmSuspenderOptions {
  vm: string;
  action: UnreachableAction;
  control?: VmControl;
  logger: Logger;
  /** How often reachability is re-evaluated (ms); default 200. */
  pollMs?: number;
}

/**
 * Watches a VM's disks; when one becomes unreachable the VM is suspended (status, and for
 * `pause` a QMP stop and the gates handing requests back), and resumed when all are reachable.
 */
export class VmSuspender {
  private readonly disks = new Map<string, DiskReach>();
  private timer: NodeJS.Timeout | null = null;
  private since: Date | null = null;
  private down: string[] = [];
  private pausedByUs = false;
  private resuming = false;
  /** One transition at a time (stop/cont are slow). */
  private busy: Promise<void> = Promise.resolve();
  private readonly log: Logger;

  constructor(private readonly o: VmSuspenderOptions) {
    this.log = o.logger.child({ vm: o.vm });
  }

  addDisk(d: DiskReach): void {
    this.disks.set(d.name, d);
    if (!this.timer) {
      this.timer = setInterval(() => this.check(), this.o.pollMs ?? 200);
      this.timer.unref();
    }
  }

  removeDisk(name: string): void {
    this.disks.delete(name);
    if (this.disks.size === 0 && this.timer) {
      clearInterval(this.timer);
      this.timer = null;
    }
  }

  get empty(): boolean {
    return this.disks.size === 0;
  }

  status(): SuspendStatus | undefined {
    if (!this.since) return undefined;
    let handed = 0;
    for (const d of this.disks.values()) handed += d.gate?.handedBack ?? 0;
    return { action: this.o.action, since: this.since.toISOString(), disks: this.down, paused: this.pausedByUs, handedBack: handed };
  }

  /** Re-evaluates now (the timer calls it). */
  check(): void {
    const down = [...this.disks.values()].filter((d) => !d.reachable()).map((d) => d.name);
    if (down.length > 0 && !this.since) {
      this.since = new Date();
      this.down = down;
      this.log.warn({ disks: down, action: this.o.action }, 'VM suspended: no reachable replica');
      if (this.o.action === 'pause') this.serial(() => this.pause());
    } else if (down.length > 0) {
      this.down = down;
    } else if (this.since && !this.resuming) {
      this.resuming = true;
      this.log.info({ suspendedMs: Date.now() - this.since.getTime() }, 'VM disks reachable again');
      this.serial(() => this.resume().finally(() => (this.resuming = false)));
    }
  }

  private serial(fn: () => Promise<void>): void {
    this.busy = this.busy.then(fn).catch((e: unknown) => this.log.error({ err: (e as Error).message }, 'VM suspend/resume failed'));
  }

  private async pause(): Promise<void> {
    const c = this.o.control;
    if (!c) return;
    if (!this.since) return; // reachable again meanwhile
    if (!(await c.running())) {
      this.log.info('VM already paused (not by vstore): left as it is, requests queue');
      return;
    }
    await c.stop();
    this.pausedByUs = true;
    let handed = 0;
    for (const d of this.disks.values()) handed += d.gate?.suspend() ?? 0;
    this.log.warn({ handedBack: handed }, 'VM paused over QMP; its outstanding requests handed back to QEMU');
  }

  private async resume(): Promise<void> {
    for (const d of this.disks.values()) await d.gate?.resume();
    this.since = null;
    this.down = [];
    if (this.pausedByUs && this.o.control) {
      this.pausedByUs = false;
      await this.o.control.cont();
      this.log.info('VM resumed over QMP');
    }
  }

  close(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }
}
