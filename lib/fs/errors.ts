/**
 * Errors of the file stack: a Linux errno, which the FUSE engine sends negated. Filesystems
 * produce far more errno values than the block stack (ENOTEMPTY, EXDEV, ELOOP, EMLINK, ERANGE,
 * E2BIG, EDEADLK, EINTR, ...), so the code is any name of `os.constants.errno`.
 */
import { constants } from 'node:os';

const ERRNOS = constants.errno as Record<string, number>;

export class FsError extends Error {
  /** errno name, e.g. 'ENOENT'. */
  readonly code: string;
  /** Positive errno value. */
  readonly errno: number;
  constructor(code: string, message?: string, options?: { cause?: unknown }) {
    super(message ? `${code}: ${message}` : code, options);
    this.name = 'FsError';
    const n = ERRNOS[code];
    this.code = n === undefined ? 'EIO' : code;
    this.errno = n === undefined ? ERRNOS.EIO! : n;
  }
}

export function isFsError(e: unknown): e is FsError {
  return e instanceof FsError;
}

/**
 * Turns anything thrown below a tree (a Node system error with `code`, an FsError, a bug) into
 * an FsError. Unknown errors become EIO: the guest sees an I/O error, never a crash.
 */
export function toFsError(e: unknown): FsError {
  if (e instanceof FsError) return e;
  const code = (e as { code?: unknown } | null)?.code;
  if (typeof code === 'string' && ERRNOS[code] !== undefined) {
    return new FsError(code, (e as Error).message, { cause: e });
  }
  return new FsError('EIO', e instanceof Error ? e.message : String(e), { cause: e });
}
