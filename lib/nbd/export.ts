/**
 * One served export: the volume (wrapped once in an OrderedVolume shared by every connection,
 * so ordering and flush hold across connections, unless it already is one), what it
 * advertises, and its counters.
 */
import { OrderedVolume } from '../block/ordering.js';
import type { Volume } from '../block/volume.js';
import type { NbdExportSpec } from './api.js';
import * as C from './constants.js';

export interface ExportCounters {
  reads: number;
  writes: number;
  bytesRead: number;
  bytesWritten: number;
  errors: number;
}

/** Block-size constraints as advertised (NBD_INFO_BLOCK_SIZE), made valid for the spec. */
export interface AdvertisedLimits {
  minimum: number;
  preferred: number;
  maximum: number;
}

function isPow2(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

/**
 * Block sizes from the volume's limits, bent to the spec's rules: minimum a power of two <= 64 KiB,
 * preferred a power of two >= max(minimum, 512), maximum a multiple of minimum, at least
 * min(preferred, size), at most the server's payload cap.
 */
export function advertisedLimits(vol: Volume, maxPayload: number): AdvertisedLimits {
  const l = vol.limits;
  const minimum = isPow2(l.minimum) && l.minimum <= 65536 ? l.minimum : 1;
  let preferred = isPow2(l.preferred) ? l.preferred : 4096;
  preferred = Math.max(preferred, minimum, 512);
  let maximum = Math.min(Number.isSafeInteger(l.maximum) && l.maximum > 0 ? l.maximum : maxPayload, maxPayload, 0xffffffff);
  maximum = Math.floor(maximum / minimum) * minimum;
  maximum = Math.max(maximum, Math.min(preferred, vol.size), minimum);
  return { minimum, preferred, maximum };
}

export class ServedExport {
  readonly name: string;
  readonly description: string;
  readonly volume: OrderedVolume;
  readonly readOnly: boolean;
  readonly limits: AdvertisedLimits;
  readonly counters: ExportCounters = { reads: 0, writes: 0, bytesRead: 0, bytesWritten: 0, errors: 0 };
  /** Connections in transmission phase on this export. */
  readonly connections = new Set<{ drain(): Promise<void>; terminate(): Promise<void> }>();
  inflight = 0;
  /** Set by removeExport / server close: no new connections, new requests get ESHUTDOWN. */
  closing = false;
  private idleWaiters: Array<() => void> = [];

  constructor(spec: NbdExportSpec, maxPayload: number) {
    this.name = spec.name;
    this.description = spec.description ?? '';
    // A volume that is already ordered (the daemon's, shared with a vhost-user-blk device) is
    // used as it is: one ordering point per disk, whatever the front ends.
    this.volume = spec.volume instanceof OrderedVolume ? spec.volume : new OrderedVolume(spec.volume);
    this.readOnly = Boolean(spec.readOnly) || spec.volume.caps.readOnly;
    this.limits = advertisedLimits(spec.volume, maxPayload);
  }

  get size(): number {
    return this.volume.size;
  }

  /** Transmission flags for a connection (SEND_DF only when it negotiated structured replies). */
  transmissionFlags(structured: boolean): number {
    const caps = this.volume.caps;
    let f = C.NBD_FLAG_HAS_FLAGS | C.NBD_FLAG_SEND_CACHE;
    if (this.readOnly) f |= C.NBD_FLAG_READ_ONLY;
    if (caps.flush) f |= C.NBD_FLAG_SEND_FLUSH;
    if (!this.readOnly) {
      // FUA is honoured by the volume, or emulated by a flush after the write.
      if (caps.fua || caps.flush) f |= C.NBD_FLAG_SEND_FUA;
      if (caps.trim) f |= C.NBD_FLAG_SEND_TRIM;
      // Always offered: a volume without efficient zeroing still zeroes (emulated below it).
      f |= C.NBD_FLAG_SEND_WRITE_ZEROES;
      if (caps.fastZero) f |= C.NBD_FLAG_SEND_FAST_ZERO;
    }
    if (structured) f |= C.NBD_FLAG_SEND_DF;
    if (caps.multiConn) f |= C.NBD_FLAG_CAN_MULTI_CONN;
    return f;
  }

  begin(): void {
    this.inflight++;
  }

  end(): void {
    if (--this.inflight === 0 && this.idleWaiters.length > 0) {
      const w = this.idleWaiters;
      this.idleWaiters = [];
      for (const f of w) f();
    }
  }

  /** Resolves when no request of any connection is in flight on this export. */
  idle(): Promise<void> {
    if (this.inflight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }
}
