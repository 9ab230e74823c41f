/**
 * The block data plane's one interface. A VM disk is a stack of Volumes, each layer wrapping
 * the next with this same interface (nbdkit filters over a plugin, SPDK bdevs over bdevs):
 * NbdExport(Qos(Cache(Replicated([Remote(A), Remote(B)])))) — or, in a test, any subset.
 *
 * Contract for every method taking (offset, length): the caller (the protocol edge) has already
 * checked 0 <= offset, offset + length <= size, and length within `limits.maximum` where the
 * protocol requires it; layers may assume it. `checkRange` is the shared helper for the edge.
 * Errors are VolumeError (errors.ts), never plain exceptions.
 */
import { VolumeError } from './errors.js';

/** Block-size constraints, in bytes, as NBD_INFO_BLOCK_SIZE and virtio-blk advertise them. */
export interface BlockLimits {
  /** Smallest addressable unit; offsets/lengths that are not multiples are still accepted (read-modify-write below). */
  minimum: number;
  /** Preferred I/O size (alignment for efficient I/O). */
  preferred: number;
  /** Largest payload of one read or write request. */
  maximum: number;
}

/** What a volume can do; protocols advertise exactly this (NBD transmission flags, virtio features). */
export interface VolumeCapabilities {
  readOnly: boolean;
  /** flush() makes completed writes durable (false: writes are durable on completion, flush is a no-op). */
  flush: boolean;
  /** write/trim/writeZeroes honour `fua`. */
  fua: boolean;
  /** trim() deallocates (false: trim is accepted and does nothing, which the NBD spec allows). */
  trim: boolean;
  /** writeZeroes() is efficient (no data payload moves); when false a protocol still offers it, emulated. */
  writeZeroes: boolean;
  /** writeZeroes({fastZero:true}) can succeed (it fails with ENOTSUP when zeroing would be slow). */
  fastZero: boolean;
  /** blockStatus() reports real holes/zeroes (false: everything is reported as data). */
  blockStatus: boolean;
  /** prefetch() does something useful. */
  prefetch: boolean;
  /** Several clients may use the volume at once with consistent results (a flush by one covers writes of all). */
  multiConn: boolean;
}

export interface WriteOptions {
  /** Force unit access: durable before the call resolves. */
  fua?: boolean;
}

export interface ZeroOptions extends WriteOptions {
  /** The range may be deallocated (read back as zeroes) instead of written. */
  mayTrim?: boolean;
  /** Fail with ENOTSUP at once unless zeroing is faster than writing zeroes. */
  fastZero?: boolean;
}

/** One run of a block-status answer. */
export interface Extent {
  offset: number;
  length: number;
  /** Not allocated (reads as zeroes unless `zero` is false, which a volume never reports for holes). */
  hole: boolean;
  /** Reads as zeroes. */
  zero: boolean;
}

export interface Volume {
  /** Size in bytes (a multiple of limits.minimum). */
  readonly size: number;
  readonly limits: BlockLimits;
  readonly caps: VolumeCapabilities;

  /** Fills `buf` with the bytes at [offset, offset + buf.length). The buffer may be a view of guest memory. */
  read(offset: number, buf: Buffer): Promise<void>;
  /** Writes `buf` at offset. */
  write(offset: number, buf: Buffer, opts?: WriteOptions): Promise<void>;
  /** Makes every completed write durable. */
  flush(): Promise<void>;
  /** Discards a range (contents become unspecified; file and memory volumes read zeroes). */
  trim(offset: number, length: number, opts?: WriteOptions): Promise<void>;
  /** Makes a range read as zeroes. */
  writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void>;
  /** Hint: the range will be read soon (NBD_CMD_CACHE). */
  prefetch(offset: number, length: number): Promise<void>;
  /**
   * Describes a prefix of [offset, offset + length): contiguous extents starting at `offset`,
   * at least one, none past the range's end (the answer may cover less than the whole range).
   */
  blockStatus(offset: number, length: number): Promise<Extent[]>;
  /** Releases resources; in-flight calls must have settled first. */
  close(): Promise<void>;
}

/**
 * The range check of the protocol edge: EINVAL for negative or non-integer values, EOVERFLOW
 * for offset+length overflow, ENOSPC for ranges past the end (the NBD spec's choice for writes;
 * callers that must answer EINVAL for reads map it themselves).
 */
export function checkRange(vol: { size: number }, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new VolumeError('EINVAL', `bad range ${offset}+${length}`);
  }
  if (offset + length > Number.MAX_SAFE_INTEGER) throw new VolumeError('EOVERFLOW', `range ${offset}+${length} overflows`);
  if (offset + length > vol.size) {
    throw new VolumeError('ENOSPC', `range ${offset}+${length} past the end (${vol.size})`);
  }
}
