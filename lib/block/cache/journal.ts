/**
 * The cache device's metadata codec (pure: bytes in, values out). Everything on the device
 * that describes data is a sequence of 4 KiB blocks, each self-checking:
 *
 *   block  = magic u32 | stream u32 | seq u64 | used u16 | count u16 | crc32 u32 | records...
 *   record = type u8 | length u16 | payload
 *
 * `crc32` covers the whole block with the crc field zeroed. A torn or stale block fails its
 * magic, stream, seq or crc check and ends replay there: the journal is a ring addressed by
 * seq (block seq s lives at ring position s mod N), so replay reads seq after seq until one does
 * not check. A commit only ever writes fresh blocks (never rewrites a committed one), so a torn
 * commit loses only itself. Records of one cache line are never split across blocks (see
 * `packBlocks`), so a line's records apply all or none.
 *
 * The superblock (block 0) has its own layout (`encodeSuper`/`decodeSuper`).
 */
import { crc32 } from 'node:zlib';

export const BLOCK = 4096;
const BLOCK_MAGIC = 0x4a435356; // 'VSCJ'
const SUPER_MAGIC = 0x53435356; // 'VSCS'
export const HEADER = 28;
/** Stream of journal blocks; checkpoint blocks carry their checkpoint's generation (>= 1). */
export const JOURNAL_STREAM = 0;

export const enum RecordType {
  /** A disk's key (which backing volume it caches) and size: disk ids are per device. */
  Disk = 1,
  /** Every slot of the disk written before this record is dropped (invalidate). */
  DiskDrop = 2,
  /** Every dirty sector of the disk with epoch <= `epoch` has reached the backing volume (and it was flushed). */
  EpochDone = 3,
  /** A slot's state: which disk line it holds, its epoch and valid sectors; disk 0xffff = free. */
  Slot = 4,
  /** Checkpoint header: the journal seq replay continues from, and how many body blocks follow. */
  Checkpoint = 5,
}

export const FREE_DISK = 0xffff;

export type MetaRecord =
  | { type: RecordType.Disk; disk: number; key: string; size: number }
  | { type: RecordType.DiskDrop; disk: number }
  | { type: RecordType.EpochDone; disk: number; epoch: number }
  | { type: RecordType.Slot; slot: number; disk: number; line: number; epoch: number; valid: Uint32Array }
  | { type: RecordType.Checkpoint; nextSeq: number; blocks: number };

export class JournalError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'JournalError';
  }
}

/** Encoded size of a record (header included). */
export function recordSize(r: MetaRecord): number {
  switch (r.type) {
    case RecordType.Disk:
      return 3 + 2 + 8 + 2 + Buffer.byteLength(r.key);
    case RecordType.DiskDrop:
      return 3 + 2;
    case RecordType.EpochDone:
      return 3 + 2 + 8;
    case RecordType.Slot:
      return 3 + 4 + 2 + 8 + 8 + 1 + r.valid.length * 4;
    case RecordType.Checkpoint:
      return 3 + 8 + 4;
  }
}

function encodeRecord(r: MetaRecord, b: Buffer, at: number): number {
  const len = recordSize(r) - 3;
  b.writeUInt8(r.type, at);
  b.writeUInt16LE(len, at + 1);
  let p = at + 3;
  switch (r.type) {
    case RecordType.Disk: {
      const k = Buffer.from(r.key);
      b.writeUInt16LE(r.disk, p);
      b.writeDoubleLE(r.size, p + 2);
      b.writeUInt16LE(k.length, p + 10);
      k.copy(b, p + 12);
      break;
    }
    case RecordType.DiskDrop:
      b.writeUInt16LE(r.disk, p);
      break;
    case RecordType.EpochDone:
      b.writeUInt16LE(r.disk, p);
      b.writeDoubleLE(r.epoch, p + 2);
      break;
    case RecordType.Slot:
      b.writeUInt32LE(r.slot, p);
      b.writeUInt16LE(r.disk, p + 4);
      b.writeDoubleLE(r.line, p + 6);
      b.writeDoubleLE(r.epoch, p + 14);
      b.writeUInt8(r.valid.length, p + 22);
      p += 23;
      for (let i = 0; i < r.valid.length; i++) b.writeUInt32LE(r.valid[i]! >>> 0, p + i * 4);
      break;
    case RecordType.Checkpoint:
      b.writeDoubleLE(r.nextSeq, p);
      b.writeUInt32LE(r.blocks, p + 8);
      break;
  }
  return at + 3 + len;
}

function decodeRecord(b: Buffer, at: number, end: number): { rec: MetaRecord; next: number } {
  if (at + 3 > end) throw new JournalError('record header past the block');
  const type = b.readUInt8(at);
  const len = b.readUInt16LE(at + 1);
  const p = at + 3;
  if (p + len > end) throw new JournalError('record past the block');
  const need = (n: number): void => {
    if (len < n) throw new JournalError(`record type ${type} too short (${len} < ${n})`);
  };
  let rec: MetaRecord;
  switch (type) {
    case RecordType.Disk: {
      need(12);
      const klen = b.readUInt16LE(p + 10);
      need(12 + klen);
      rec = { type, disk: b.readUInt16LE(p), size: b.readDoubleLE(p + 2), key: b.toString('utf8', p + 12, p + 12 + klen) };
      break;
    }
    case RecordType.DiskDrop:
      need(2);
      rec = { type, disk: b.readUInt16LE(p) };
      break;
    case RecordType.EpochDone:
      need(10);
      rec = { type, disk: b.readUInt16LE(p), epoch: b.readDoubleLE(p + 2) };
      break;
    case RecordType.Slot: {
      need(23);
      const words = b.readUInt8(p + 22);
      need(23 + words * 4);
      const valid = new Uint32Array(words);
      for (let i = 0; i < words; i++) valid[i] = b.readUInt32LE(p + 23 + i * 4);
      rec = { type, slot: b.readUInt32LE(p), disk: b.readUInt16LE(p + 4), line: b.readDoubleLE(p + 6), epoch: b.readDoubleLE(p + 14), valid };
      break;
    }
    case RecordType.Checkpoint:
      need(12);
      rec = { type, nextSeq: b.readDoubleLE(p), blocks: b.readUInt32LE(p + 8) };
      break;
    default:
      throw new JournalError(`unknown record type ${type}`);
  }
  return { rec, next: p + len };
}

/** One block holding `records` (which must fit: see packBlocks). */
export function encodeBlock(stream: number, seq: number, records: MetaRecord[]): Buffer {
  const b = Buffer.alloc(BLOCK);
  let p = HEADER;
  for (const r of records) {
    if (p + recordSize(r) > BLOCK) throw new JournalError('records do not fit in one block');
    p = encodeRecord(r, b, p);
  }
  b.writeUInt32LE(BLOCK_MAGIC, 0);
  b.writeUInt32LE(stream, 4);
  b.writeBigUInt64LE(BigInt(seq), 8);
  b.writeUInt16LE(p, 16);
  b.writeUInt16LE(records.length, 18);
  b.writeUInt32LE(0, 20);
  b.writeUInt32LE(0, 24);
  b.writeUInt32LE(crc32(b.subarray(0, p)), 20);
  return b;
}

/**
 * The records of a block, or null when the block is not a valid block of `stream` with `seq`
 * (never written, stale from an earlier lap of the ring, torn, or corrupt).
 */
export function decodeBlock(b: Buffer, stream: number, seq: number): MetaRecord[] | null {
  if (b.length < BLOCK || b.readUInt32LE(0) !== BLOCK_MAGIC) return null;
  if (b.readUInt32LE(4) !== stream || b.readBigUInt64LE(8) !== BigInt(seq)) return null;
  const used = b.readUInt16LE(16);
  const count = b.readUInt16LE(18);
  if (used < HEADER || used > BLOCK) return null;
  const want = b.readUInt32LE(20);
  const copy = Buffer.from(b.subarray(0, used));
  copy.writeUInt32LE(0, 20);
  if (crc32(copy) !== want) return null;
  const out: MetaRecord[] = [];
  let p = HEADER;
  try {
    for (let i = 0; i < count; i++) {
      const { rec, next } = decodeRecord(b, p, used);
      out.push(rec);
      p = next;
    }
  } catch {
    return null; // a block whose crc matches but does not parse: written by someone else
  }
  return p === used ? out : null;
}

/**
 * Packs groups of records into as few blocks as possible without splitting a group (a cache
 * line's records must apply all or none). A group larger than a block is split (cannot happen
 * with the record sizes used: a line has a few slots of < 200 bytes each).
 */
export function packBlocks(groups: MetaRecord[][]): MetaRecord[][] {
  const blocks: MetaRecord[][] = [];
  let cur: MetaRecord[] = [];
  let used = HEADER;
  for (const g of groups) {
    const size = g.reduce((n, r) => n + recordSize(r), 0);
    if (used + size > BLOCK && cur.length) {
      blocks.push(cur);
      cur = [];
      used = HEADER;
    }
    for (const r of g) {
      const s = recordSize(r);
      if (used + s > BLOCK) {
        blocks.push(cur);
        cur = [];
        used = HEADER;
      }
      cur.push(r);
      used += s;
    }
  }
  if (cur.length) blocks.push(cur);
  return blocks;
}

export interface Superblock {
  version: number;
  lineSize: number;
  sectorSize: number;
  slots: number;
  /** Block offsets (in BLOCK units) of the regions. */
  journalStart: number;
  journalBlocks: number;
  checkpointStart: [number, number];
  checkpointBlocks: number;
  /** Byte offset of slot 0's data. */
  dataStart: number;
  /** Random id of this format (logs, and to tell two devices apart). */
  uuid: string;
}

export function encodeSuper(s: Superblock): Buffer {
  const b = Buffer.alloc(BLOCK);
  b.writeUInt32LE(SUPER_MAGIC, 0);
  b.writeUInt32LE(s.version, 4);
  b.writeUInt32LE(s.lineSize, 8);
  b.writeUInt32LE(s.sectorSize, 12);
  b.writeUInt32LE(s.slots, 16);
  b.writeUInt32LE(s.journalStart, 20);
  b.writeUInt32LE(s.journalBlocks, 24);
  b.writeUInt32LE(s.checkpointStart[0], 28);
  b.writeUInt32LE(s.checkpointStart[1], 32);
  b.writeUInt32LE(s.checkpointBlocks, 36);
  b.writeDoubleLE(s.dataStart, 40);
  Buffer.from(s.uuid.replace(/-/g, ''), 'hex').copy(b, 48, 0, 16);
  b.writeUInt32LE(crc32(b.subarray(0, 64)), 64);
  return b;
}

/** The superblock, or null when the block is not one (a fresh device). Throws on a damaged one. */
export function decodeSuper(b: Buffer): Superblock | null {
  if (b.length < BLOCK || b.readUInt32LE(0) !== SUPER_MAGIC) return null;
  if (crc32(b.subarray(0, 64)) !== b.readUInt32LE(64)) throw new JournalError('superblock checksum mismatch');
  const hex = b.toString('hex', 48, 64);
  return {
    version: b.readUInt32LE(4),
    lineSize: b.readUInt32LE(8),
    sectorSize: b.readUInt32LE(12),
    slots: b.readUInt32LE(16),
    journalStart: b.readUInt32LE(20),
    journalBlocks: b.readUInt32LE(24),
    checkpointStart: [b.readUInt32LE(28), b.readUInt32LE(32)],
    checkpointBlocks: b.readUInt32LE(36),
    dataStart: b.readDoubleLE(40),
    uuid: `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`,
  };
}

/**
 * The layout of a device of `deviceSize` bytes with lines of `lineSize`: superblock, two
 * checkpoint areas (each can hold every slot's record), the journal ring, then the slots.
 * Null when the device is too small for even a handful of lines.
 */
export function computeLayout(deviceSize: number, lineSize: number, sectorSize = 4096): Omit<Superblock, 'uuid' | 'version'> | null {
  const words = Math.max(1, Math.ceil(lineSize / sectorSize / 32));
  const slotRec = 3 + 23 + words * 4;
  const perBlock = Math.floor((BLOCK - HEADER) / slotRec);
  let slots = Math.floor(deviceSize / lineSize);
  for (let i = 0; i < 8; i++) {
    // disks' records (keys up to ~300 bytes, 65535 disks at most but a few in practice): 16 blocks of slack
    const checkpointBlocks = Math.ceil(slots / perBlock) + 16 + 1;
    const journalBlocks = Math.max(64, Math.min(8192, Math.ceil(slots / 4)));
    const metaBlocks = 1 + 2 * checkpointBlocks + journalBlocks;
    const dataStart = Math.ceil((metaBlocks * BLOCK) / lineSize) * lineSize;
    const fit = Math.floor((deviceSize - dataStart) / lineSize);
    if (fit === slots || i === 7) {
      if (fit < 4) return null;
      return {
        lineSize,
        sectorSize,
        slots: Math.min(fit, slots),
        checkpointStart: [1, 1 + checkpointBlocks],
        checkpointBlocks,
        journalStart: 1 + 2 * checkpointBlocks,
        journalBlocks,
        dataStart,
      };
    }
    slots = fit;
  }
  return null;
}
