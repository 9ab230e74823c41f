/**
 * Typed errno-like errors of the block and file stacks. Every layer throws `VolumeError`;
 * each protocol maps the code to its own wire value (NBD error numbers, virtio status, FUSE
 * negative errno) at its edge.
 */
export const ERRNO = {
  EPERM: 1,
  ENOENT: 2,
  EIO: 5,
  EBADF: 9,
  EAGAIN: 11,
  ENOMEM: 12,
  EACCES: 13,
  EBUSY: 16,
  EEXIST: 17,
  EXDEV: 18,
  ENOTDIR: 20,
  EISDIR: 21,
  EINVAL: 22,
  EFBIG: 27,
  ENOSPC: 28,
  EROFS: 30,
  ENAMETOOLONG: 36,
  ENOSYS: 38,
  ENOTEMPTY: 39,
  ELOOP: 40,
  ENODATA: 61,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
  ETIMEDOUT: 110,
} as const;

export type ErrnoCode = keyof typeof ERRNO;

export class VolumeError extends Error {
  readonly code: ErrnoCode;
  constructor(code: ErrnoCode, message?: string, options?: { cause?: unknown }) {
    super(message ? `${code}: ${message}` : code, options);
    this.name = 'VolumeError';
    this.code = code;
  }
  /** The positive Linux errno value of this error. */
  get errno(): number {
    return ERRNO[this.code];
  }
}

export function isVolumeError(e: unknown): e is VolumeError {
  return e instanceof VolumeError;
}

/**
 * Turns anything thrown below a layer (a Node system error, a VolumeError, a bug) into a
 * VolumeError. Unknown errors become EIO: the client sees an I/O error, never a crash.
 */
export function toVolumeError(e: unknown): VolumeError {
  if (e instanceof VolumeError) return e;
  const code = (e as { code?: unknown } | null)?.code;
  if (typeof code === 'string' && code in ERRNO) {
    return new VolumeError(code as ErrnoCode, (e as Error).message, { cause: e });
  }
  if (code === 'EOPNOTSUPP') return new VolumeError('ENOTSUP', (e as Error).message, { cause: e });
  if (code === 'EDQUOT') return new VolumeError('ENOSPC', (e as Error).message, { cause: e });
  return new VolumeError('EIO', e instanceof Error ? e.message : String(e), { cause: e });
}
