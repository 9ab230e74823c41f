/**
 * The virtio-blk device (virtio 1.2 §5.2) over a Volume, for the vhost-user transport.
 *
 * A request is a descriptor chain: a 16-byte device-readable header (u32 type, u32 reserved,
 * u64 sector), data (device-readable for OUT, DISCARD and WRITE_ZEROES segments;
 * device-writable for IN and GET_ID), and a 1-byte device-writable status at the very end.
 * The header and status are located by bytes, not by descriptors, so any split the driver
 * chose is accepted. Data buffers are views of guest memory handed to the Volume as they are:
 * the guest's pages are read into and written from without a copy.
 *
 * Every malformed request is answered with a status (IOERR for bad ranges, sizes or buffers,
 * UNSUPP for unknown types and flags) as long as there is a writable byte to carry it; a chain
 * without one is returned with nothing written.
 */
import type { Logger } from '../log.js';
import { toVolumeError } from '../block/errors.js';
import type { Volume } from '../block/volume.js';
import { bit, ProtocolFeature } from './protocol.js';
import { VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, type VhostUserDevice } from './backend.js';
import type { Element } from './virtqueue.js';

export const SECTOR = 512;

/** VIRTIO_BLK_F_* bit numbers. */
export const BlkFeature = {
  SIZE_MAX: 1,
  SEG_MAX: 2,
  GEOMETRY: 4,
  RO: 5,
  BLK_SIZE: 6,
  FLUSH: 9,
  TOPOLOGY: 10,
  CONFIG_WCE: 11,
  MQ: 12,
  DISCARD: 13,
  WRITE_ZEROES: 14,
} as const;

export const BlkType = {
  IN: 0,
  OUT: 1,
  FLUSH: 4,
  GET_ID: 8,
  GET_LIFETIME: 10,
  DISCARD: 11,
  WRITE_ZEROES: 13,
  SECURE_ERASE: 14,
} as const;

export const BlkStatus = { OK: 0, IOERR: 1, UNSUPP: 2 } as const;

export const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1;
export const VIRTIO_BLK_ID_BYTES = 20;
export const REQ_HEADER_SIZE = 16;
export const DISCARD_SEG_SIZE = 16;
/** Size of struct virtio_blk_config up to write_zeroes_may_unmap and its padding. */
export const BLK_CONFIG_SIZE = 60;

export interface BlkConfig {
  /** In 512-byte sectors. */
  capacity: bigint;
  segMax: number;
  blkSize: number;
  physicalBlockExp: number;
  alignmentOffset: number;
  minIoSize: number;
  optIoSize: number;
  numQueues: number;
  maxDiscardSectors: number;
  maxDiscardSeg: number;
  discardSectorAlignment: number;
  maxWriteZeroesSectors: number;
  maxWriteZeroesSeg: number;
  writeZeroesMayUnmap: boolean;
}

/** struct virtio_blk_config, little-endian (virtio 1.x). */
export function encodeBlkConfig(c: BlkConfig): Buffer {
  const b = Buffer.alloc(BLK_CONFIG_SIZE);
  b.writeBigUInt64LE(c.capacity, 0);
  b.writeUInt32LE(0, 8); // size_max (not offered)
  b.writeUInt32LE(c.segMax, 12);
  // geometry (16..19) not offered
  b.writeUInt32LE(c.blkSize, 20);
  b.writeUInt8(c.physicalBlockExp, 24);
  b.writeUInt8(c.alignmentOffset, 25);
  b.writeUInt16LE(c.minIoSize, 26);
  b.writeUInt32LE(c.optIoSize, 28);
  b.writeUInt8(0, 32); // writeback (CONFIG_WCE not offered)
  b.writeUInt16LE(c.numQueues, 34);
  b.writeUInt32LE(c.maxDiscardSectors, 36);
  b.writeUInt32LE(c.maxDiscardSeg, 40);
  b.writeUInt32LE(c.discardSectorAlignment, 44);
  b.writeUInt32LE(c.maxWriteZeroesSectors, 48);
  b.writeUInt32LE(c.maxWriteZeroesSeg, 52);
  b.writeUInt8(c.writeZeroesMayUnmap ? 1 : 0, 56);
  return b;
}

export function decodeBlkConfig(b: Buffer): BlkConfig {
  return {
    capacity: b.readBigUInt64LE(0),
    segMax: b.readUInt32LE(12),
    blkSize: b.readUInt32LE(20),
    physicalBlockExp: b.readUInt8(24),
    alignmentOffset: b.readUInt8(25),
    minIoSize: b.readUInt16LE(26),
    optIoSize: b.readUInt32LE(28),
    numQueues: b.readUInt16LE(34),
    maxDiscardSectors: b.readUInt32LE(36),
    maxDiscardSeg: b.readUInt32LE(40),
    discardSectorAlignment: b.readUInt32LE(44),
    maxWriteZeroesSectors: b.readUInt32LE(48),
    maxWriteZeroesSeg: b.readUInt32LE(52),
    writeZeroesMayUnmap: b.readUInt8(56) !== 0,
  };
}

/** Views of bytes [skip, skip + len) of a list of buffers (no copy). */
export function sliceViews(segs: Buffer[], skip: number, len: number): Buffer[] {
  const out: Buffer[] = [];
  for (const s of segs) {
    if (len <= 0) break;
    if (skip >= s.length) {
      skip -= s.length;
      continue;
    }
    const n = Math.min(s.length - skip, len);
    out.push(s.subarray(skip, skip + n));
    skip = 0;
    len -= n;
  }
  return out;
}

/** Copies bytes [skip, skip + len) of a list of buffers (small headers only). */
function gather(segs: Buffer[], skip: number, len: number): Buffer {
  const views = sliceViews(segs, skip, len);
  return views.length === 1 ? views[0]! : Buffer.concat(views, len);
}

export interface VirtioBlkOptions {
  volume: Volume;
  logger: Logger;
  numQueues?: number;
  readOnly?: boolean;
  /** GET_ID answer (at most 20 bytes, zero-padded). */
  serial?: string;
  /** Segments per request advertised (seg_max); default 126, as QEMU for 128-entry queues. */
  segMax?: number;
}

const MAX_DISCARD_SEG = 16;
/** Largest discard / write-zeroes range advertised, in sectors (1 GiB). */
const MAX_DISCARD_SECTORS = (1 << 30) / SECTOR;

export class VirtioBlkDevice implements VhostUserDevice {
  readonly features: bigint;
  readonly protocolFeatures = bit(ProtocolFeature.CONFIG);
  readonly numQueues: number;
  readonly readOnly: boolean;
  readonly config: BlkConfig;
  /** Requests answered, per status (tests and metrics). */
  readonly stats = { ok: 0, ioerr: 0, unsupp: 0, dropped: 0 };

  private readonly vol: Volume;
  private readonly log: Logger;
  private readonly id: Buffer;
  private readonly capacityBytes: number;
  private readonly maxIo: number;
  private acked = 0n;

  constructor(o: VirtioBlkOptions) {
    this.vol = o.volume;
    this.log = o.logger;
    this.numQueues = o.numQueues ?? 1;
    if (!Number.isInteger(this.numQueues) || this.numQueues < 1 || this.numQueues > 64) {
      throw new Error(`virtio-blk: bad queue count ${this.numQueues}`);
    }
    this.readOnly = (o.readOnly ?? false) || o.volume.caps.readOnly;
    this.id = Buffer.alloc(VIRTIO_BLK_ID_BYTES);
    Buffer.from(o.serial ?? 'vstore', 'utf8').copy(this.id, 0, 0, VIRTIO_BLK_ID_BYTES);
    const lim = o.volume.limits;
    const blkSize = lim.minimum >= SECTOR && (lim.minimum & (lim.minimum - 1)) === 0 ? lim.minimum : SECTOR;
    const pref = Math.max(blkSize, lim.preferred & (lim.preferred - 1) ? blkSize : lim.preferred);
    const capacity = Math.floor(o.volume.size / SECTOR);
    this.capacityBytes = capacity * SECTOR;
    this.maxIo = Math.max(SECTOR, lim.maximum);
    const alignSectors = blkSize / SECTOR;
    this.config = {
      capacity: BigInt(capacity),
      segMax: o.segMax ?? 126,
      blkSize,
      physicalBlockExp: Math.min(15, Math.log2(pref / blkSize)),
      alignmentOffset: 0,
      minIoSize: Math.min(0xffff, pref / blkSize),
      optIoSize: 0,
      numQueues: this.numQueues,
      maxDiscardSectors: MAX_DISCARD_SECTORS,
      maxDiscardSeg: MAX_DISCARD_SEG,
      discardSectorAlignment: alignSectors,
      maxWriteZeroesSectors: MAX_DISCARD_SECTORS,
      maxWriteZeroesSeg: MAX_DISCARD_SEG,
      writeZeroesMayUnmap: o.volume.caps.trim,
    };
    let f =
      bit(VIRTIO_F_VERSION_1) |
      bit(VIRTIO_RING_F_INDIRECT_DESC) |
      bit(VIRTIO_RING_F_EVENT_IDX) |
      bit(BlkFeature.SEG_MAX) |
      bit(BlkFeature.BLK_SIZE) |
      bit(BlkFeature.FLUSH) |
      bit(BlkFeature.TOPOLOGY) |
      bit(BlkFeature.MQ);
    if (this.readOnly) f |= bit(BlkFeature.RO);
    else f |= bit(BlkFeature.DISCARD) | bit(BlkFeature.WRITE_ZEROES);
    this.features = f;
  }

  getConfig(offset: number, size: number): Buffer {
    const cfg = encodeBlkConfig(this.config);
    const out = Buffer.alloc(size);
    if (offset < cfg.length) cfg.copy(out, 0, offset, Math.min(cfg.length, offset + size));
    return out;
  }

  setConfig(_offset: number, _data: Buffer): void {
    // Only `writeback` is writable, and only with CONFIG_WCE, which is not offered.
    throw new Error('virtio-blk config space is read-only');
  }

  setFeatures(f: bigint): void {
    this.acked = f;
  }

  get ackedFeatures(): bigint {
    return this.acked;
  }

  reset(): void {
    this.acked = 0n;
  }

  handle(_queue: number, el: Element): Promise<number> | number {
    // The status is the chain's last device-writable byte: without one (or when a writable
    // buffer is unmapped, so that the last byte is unknown) the request cannot be answered.
    if (el.writableLen < 1 || !el.writableMapped) {
      this.stats.dropped++;
      this.log.warn({ head: el.head, error: el.error }, 'virtio-blk: request without a usable status byte');
      return 0;
    }
    if (el.error !== undefined || el.readableLen < REQ_HEADER_SIZE) {
      this.log.debug({ head: el.head, error: el.error }, 'virtio-blk: malformed request');
      return this.finish(el, BlkStatus.IOERR, 0);
    }
    const hdr = gather(el.readable, 0, REQ_HEADER_SIZE);
    const type = hdr.readUInt32LE(0);
    const sector = hdr.readBigUInt64LE(8);
    switch (type) {
      case BlkType.IN:
        return this.rw(el, sector, false);
      case BlkType.OUT:
        return this.rw(el, sector, true);
      case BlkType.FLUSH:
        return this.op(el, () => this.vol.flush(), 0);
      case BlkType.GET_ID: {
        const data = sliceViews(el.writable, 0, el.writableLen - 1);
        let n = 0;
        for (const d of data) {
          const k = Math.min(d.length, VIRTIO_BLK_ID_BYTES - n);
          this.id.copy(d, 0, n, n + k);
          n += k;
        }
        return this.finish(el, BlkStatus.OK, n);
      }
      case BlkType.DISCARD:
      case BlkType.WRITE_ZEROES:
        return this.discard(el, type);
      default:
        return this.finish(el, BlkStatus.UNSUPP, 0);
    }
  }

  /** Writes the status byte; returns the used length (data bytes written + the status). */
  private finish(el: Element, status: number, written: number): number {
    const s = el.writable[el.writable.length - 1]!;
    s[s.length - 1] = status;
    if (status === BlkStatus.OK) this.stats.ok++;
    else if (status === BlkStatus.IOERR) this.stats.ioerr++;
    else this.stats.unsupp++;
    return written + 1;
  }

  private async op(el: Element, f: () => Promise<void>, written: number): Promise<number> {
    try {
      await f();
      return this.finish(el, BlkStatus.OK, written);
    } catch (e) {
      const ve = toVolumeError(e);
      this.log.debug({ err: ve }, 'virtio-blk: request failed');
      return this.finish(el, ve.code === 'ENOTSUP' ? BlkStatus.UNSUPP : BlkStatus.IOERR, 0);
    }
  }

  /** Byte offset of [sector, sector + len) when it lies inside the disk, else -1. */
  private range(sector: bigint, len: number): number {
    if (sector > BigInt(this.capacityBytes / SECTOR)) return -1;
    const off = Number(sector) * SECTOR;
    return off + len <= this.capacityBytes ? off : -1;
  }

  private rw(el: Element, sector: bigint, write: boolean): Promise<number> | number {
    const len = write ? el.readableLen - REQ_HEADER_SIZE : el.writableLen - 1;
    if (write && this.readOnly) return this.finish(el, BlkStatus.IOERR, 0);
    if (len % SECTOR !== 0) return this.finish(el, BlkStatus.IOERR, 0);
    const off = this.range(sector, len);
    if (off < 0) return this.finish(el, BlkStatus.IOERR, 0);
    if (len === 0) return this.finish(el, BlkStatus.OK, 0);
    const segs = write ? sliceViews(el.readable, REQ_HEADER_SIZE, len) : sliceViews(el.writable, 0, len);
    return this.op(
      el,
      async () => {
        const ios: Promise<void>[] = [];
        let at = off;
        for (const seg of segs) {
          for (let o = 0; o < seg.length; o += this.maxIo) {
            const part = o === 0 && seg.length <= this.maxIo ? seg : seg.subarray(o, Math.min(seg.length, o + this.maxIo));
            ios.push(write ? this.vol.write(at, part) : this.vol.read(at, part));
            at += part.length;
          }
        }
        await Promise.all(ios);
      },
      write ? 0 : len,
    );
  }

  private discard(el: Element, type: number): Promise<number> | number {
    if (this.readOnly) return this.finish(el, BlkStatus.IOERR, 0);
    const bytes = el.readableLen - REQ_HEADER_SIZE;
    const n = bytes / DISCARD_SEG_SIZE;
    if (bytes === 0 || !Number.isInteger(n)) return this.finish(el, BlkStatus.IOERR, 0);
    if (n > MAX_DISCARD_SEG) return this.finish(el, BlkStatus.UNSUPP, 0);
    const raw = gather(el.readable, REQ_HEADER_SIZE, bytes);
    const ranges: { off: number; len: number; unmap: boolean }[] = [];
    for (let i = 0; i < n; i++) {
      const sector = raw.readBigUInt64LE(i * 16);
      const num = raw.readUInt32LE(i * 16 + 8);
      const flags = raw.readUInt32LE(i * 16 + 12);
      const unmap = (flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0;
      // Unknown flags, and UNMAP on a discard, are unsupported (virtio 1.2 §5.2.6.2).
      if (flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP || (type === BlkType.DISCARD && unmap)) {
        return this.finish(el, BlkStatus.UNSUPP, 0);
      }
      if (num > MAX_DISCARD_SECTORS) return this.finish(el, BlkStatus.IOERR, 0);
      const off = this.range(sector, num * SECTOR);
      if (off < 0) return this.finish(el, BlkStatus.IOERR, 0);
      ranges.push({ off, len: num * SECTOR, unmap });
    }
    return this.op(
      el,
      async () => {
        for (const r of ranges) {
          if (r.len === 0) continue;
          if (type === BlkType.DISCARD) await this.vol.trim(r.off, r.len);
          else await this.vol.writeZeroes(r.off, r.len, { mayTrim: r.unmap });
        }
      },
      0,
    );
  }
}
