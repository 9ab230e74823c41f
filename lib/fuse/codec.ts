/**
 * The FUSE wire format (Linux include/uapi/linux/fuse.h, 7.31 and later): pure functions of
 * bytes, as virtiofsd keeps fuse.rs apart from server.rs. No fds, no FileTree here.
 *
 * Decoding is where every length, name and offset is checked, once: the engine and the trees
 * below trust what comes out of `decodeRequest`. A malformed frame throws `FuseDecodeError`
 * (and nothing else): with `unique` set when the header was sound, so the engine can answer that
 * request with `-errno`; without it when not even the header could be trusted (the transport
 * drops the frame).
 *
 * Names, symlink targets, xattr values and WRITE payloads come out as views (`subarray`) of the
 * frame, not copies: the frame must stay untouched until the request is answered.
 */
import type { Attr, Entry, FileLock, SetAttr, StatFs, DirEntry, DirEntryPlus } from '../fs/tree.js';
import {
  FATTR_ATIME,
  FATTR_ATIME_NOW,
  FATTR_CTIME,
  FATTR_FH,
  FATTR_GID,
  FATTR_KILL_SUIDGID,
  FATTR_LOCKOWNER,
  FATTR_MODE,
  FATTR_MTIME,
  FATTR_MTIME_NOW,
  FATTR_SIZE,
  FATTR_UID,
  FUSE_FSYNC_FDATASYNC,
  FUSE_GETATTR_FH,
  FUSE_LK_FLOCK,
  FUSE_RELEASE_FLOCK_UNLOCK,
  FUSE_RELEASE_FLUSH,
  FUSE_WRITE_KILL_SUIDGID,
  FUSE_WRITE_LOCKOWNER,
  FUSE_OPEN_KILL_SUIDGID,
  Init,
  NAME_MAX,
  Op,
  PATH_MAX,
  Size,
  XATTR_NAME_MAX,
  XATTR_SIZE_MAX,
} from './constants.js';

/** A frame that cannot be served. `errno` is the error name the engine answers with. */
export class FuseDecodeError extends Error {
  override readonly name = 'FuseDecodeError';
  constructor(
    readonly errno: string,
    message: string,
    /** Set when the header was sound: the request can be answered with -errno. */
    readonly unique?: bigint,
    readonly opcode?: number,
  ) {
    super(`${errno}: ${message}`);
  }
}

export interface InHeader {
  /** Total frame length, header included (extensions excluded from the body we decode). */
  len: number;
  opcode: number;
  unique: bigint;
  nodeId: number;
  uid: number;
  gid: number;
  pid: number;
}

/** What the decoder needs to know of the session (what INIT negotiated). */
export interface DecodeOptions {
  /** FUSE_SETXATTR_EXT negotiated: fuse_setxattr_in is 16 bytes instead of 8. */
  setxattrExt?: boolean;
  /** Largest WRITE payload accepted (max_write). */
  maxWrite?: number;
  /** Largest READ / READDIR size accepted. */
  maxRead?: number;
}

export const DEFAULT_MAX_WRITE = 1 << 20;

type H = { h: InHeader };
export type FuseRequest = H &
  (
    | { kind: 'INIT'; major: number; minor: number; maxReadahead: number; flags: bigint }
    | { kind: 'DESTROY' }
    | { kind: 'LOOKUP'; name: Buffer }
    | { kind: 'FORGET'; nlookup: number }
    | { kind: 'BATCH_FORGET'; forgets: { nodeId: number; nlookup: number }[] }
    | { kind: 'GETATTR'; fh?: number }
    | { kind: 'SETATTR'; changes: SetAttr; fh?: number; lockOwner?: bigint }
    | { kind: 'READLINK' }
    | { kind: 'SYMLINK'; name: Buffer; target: Buffer }
    | { kind: 'MKNOD'; name: Buffer; mode: number; rdev: number; umask: number }
    | { kind: 'MKDIR'; name: Buffer; mode: number; umask: number }
    | { kind: 'UNLINK'; name: Buffer }
    | { kind: 'RMDIR'; name: Buffer }
    | { kind: 'RENAME'; name: Buffer; newParent: number; newName: Buffer; flags: number }
    | { kind: 'LINK'; oldNodeId: number; newName: Buffer }
    | { kind: 'OPEN'; flags: number; killSuidGid: boolean }
    | { kind: 'OPENDIR'; flags: number }
    | { kind: 'CREATE'; name: Buffer; flags: number; mode: number; umask: number; killSuidGid: boolean }
    | { kind: 'READ'; fh: number; offset: number; size: number; flags: number; lockOwner?: bigint }
    | { kind: 'READDIR' | 'READDIRPLUS'; fh: number; offset: number; size: number }
    | { kind: 'WRITE'; fh: number; offset: number; data: Buffer; flags: number; writeFlags: number; lockOwner?: bigint; killSuidGid: boolean }
    | { kind: 'STATFS' }
    | { kind: 'RELEASE' | 'RELEASEDIR'; fh: number; flags: number; flush: boolean; flockUnlock: boolean; lockOwner: bigint }
    | { kind: 'FLUSH'; fh: number; lockOwner: bigint }
    | { kind: 'FSYNC' | 'FSYNCDIR'; fh: number; datasync: boolean }
    | { kind: 'SETXATTR'; name: Buffer; value: Buffer; flags: number; setxattrFlags: number }
    | { kind: 'GETXATTR'; name: Buffer; size: number }
    | { kind: 'LISTXATTR'; size: number }
    | { kind: 'REMOVEXATTR'; name: Buffer }
    | { kind: 'ACCESS'; mask: number }
    | { kind: 'GETLK' | 'SETLK' | 'SETLKW'; fh: number; owner: bigint; lock: FileLock; flock: boolean }
    | { kind: 'INTERRUPT'; target: bigint }
    | { kind: 'FALLOCATE'; fh: number; offset: number; length: number; mode: number }
    | { kind: 'LSEEK'; fh: number; offset: number; whence: number }
    | { kind: 'COPY_FILE_RANGE'; fhIn: number; offIn: number; nodeIdOut: number; fhOut: number; offOut: number; len: number; flags: number }
    | { kind: 'SYNCFS' }
    /** Any other opcode: answered ENOSYS by the engine. */
    | { kind: 'UNSUPPORTED' }
  );

export type RequestKind = FuseRequest['kind'];

const TWO32 = 2 ** 32;
/** The kernel's OFFSET_MAX: a lock to end of file. */
const OFFSET_MAX = 0x7fffffffffffffffn;

/** u64 as a number; values past 2^53 (never handed out by us) are `undefined`. */
function u64(b: Buffer, off: number): number | undefined {
  const lo = b.readUInt32LE(off);
  const hi = b.readUInt32LE(off + 4);
  if (hi >= 0x200000) return undefined;
  return hi * TWO32 + lo;
}

/** Little-endian u64 of a non-negative safe integer, without a BigInt on the common path. */
function wu64(b: Buffer, off: number, n: number): void {
  if (n >= 0 && n <= Number.MAX_SAFE_INTEGER) {
    b.writeUInt32LE(n >>> 0, off);
    b.writeUInt32LE(Math.floor(n / TWO32), off + 4);
  } else {
    b.writeBigInt64LE(BigInt.asIntN(64, BigInt(Math.trunc(n))), off);
  }
}

class Reader {
  constructor(
    readonly body: Buffer,
    readonly h: InHeader,
  ) {}
  fail(errno: string, msg: string): never {
    throw new FuseDecodeError(errno, msg, this.h.unique, this.h.opcode);
  }
  need(n: number, what: string): void {
    if (this.body.length < n) this.fail('EINVAL', `${what}: ${this.body.length} bytes, need ${n}`);
  }
  u32(off: number): number {
    return this.body.readUInt32LE(off);
  }
  u64(off: number, what: string, errno = 'EINVAL'): number {
    const v = u64(this.body, off);
    if (v === undefined) this.fail(errno, `${what} out of range`);
    return v;
  }
  big(off: number): bigint {
    return this.body.readBigUInt64LE(off);
  }
  /** A handle: ours are small integers, a forged large one is EBADF. */
  fh(off: number): number {
    return this.u64(off, 'fh', 'EBADF');
  }
  nodeId(off: number): number {
    return this.u64(off, 'node id', 'ENOENT');
  }
  /** NUL-terminated strings from `off` to the end of the body, exactly `count` of them. */
  strings(off: number, count: number, what: string): Buffer[] {
    const out: Buffer[] = [];
    let p = off;
    for (let i = 0; i < count; i++) {
      const z = this.body.indexOf(0, p);
      if (z < 0) this.fail('EINVAL', `${what}: not NUL-terminated`);
      out.push(this.body.subarray(p, z));
      p = z + 1;
    }
    return out;
  }
  /** A path component the operation creates, removes or looks up. */
  name(n: Buffer, what: string, dotsAllowed = false): Buffer {
    if (n.length === 0) this.fail('ENOENT', `${what}: empty name`);
    if (n.length > NAME_MAX) this.fail('ENAMETOOLONG', `${what}: ${n.length} bytes`);
    if (n.includes(0x2f)) this.fail('EINVAL', `${what}: '/' in name`);
    if (!dotsAllowed && n[0] === 0x2e && (n.length === 1 || (n.length === 2 && n[1] === 0x2e))) {
      this.fail('EINVAL', `${what}: "." or ".."`);
    }
    return n;
  }
  xattrName(n: Buffer): Buffer {
    if (n.length === 0 || n.length > XATTR_NAME_MAX) this.fail('ERANGE', `xattr name of ${n.length} bytes`);
    return n;
  }
  /** Offset plus length stays within the safe integer range (and loff_t). */
  range(offset: number, length: number, what: string): void {
    if (offset + length > Number.MAX_SAFE_INTEGER) this.fail('EINVAL', `${what}: offset + length out of range`);
  }
  nsec(off: number): number {
    const v = this.u32(off);
    if (v >= 1e9) this.fail('EINVAL', `nanoseconds ${v}`);
    return v;
  }
  sec(off: number): number {
    return Number(this.body.readBigInt64LE(off));
  }
}

/** Decodes just the header (40 bytes): throws without `unique` when it cannot be trusted. */
export function decodeHeader(frame: Buffer): InHeader {
  if (frame.length < Size.IN_HEADER) throw new FuseDecodeError('EINVAL', `frame of ${frame.length} bytes`);
  const len = frame.readUInt32LE(0);
  if (len < Size.IN_HEADER || len > frame.length) throw new FuseDecodeError('EINVAL', `header len ${len}, frame ${frame.length}`);
  const nodeLo = frame.readUInt32LE(16);
  const nodeHi = frame.readUInt32LE(20);
  return {
    len,
    opcode: frame.readUInt32LE(4),
    unique: frame.readBigUInt64LE(8),
    // An id past 2^53 was never handed out: -1 makes every tree answer ENOENT.
    nodeId: nodeHi >= 0x200000 ? -1 : nodeHi * TWO32 + nodeLo,
    uid: frame.readUInt32LE(24),
    gid: frame.readUInt32LE(28),
    pid: frame.readUInt32LE(32),
  };
}

function lockOf(r: Reader, off: number): FileLock {
  const start = r.big(off);
  const endRaw = r.big(off + 8);
  const type = r.u32(off + 16);
  const pid = r.u32(off + 20);
  if (type > 2) r.fail('EINVAL', `lock type ${type}`);
  if (start > OFFSET_MAX || endRaw > OFFSET_MAX && endRaw !== 0xffffffffffffffffn) r.fail('EINVAL', 'lock range out of range');
  const max = BigInt(Number.MAX_SAFE_INTEGER);
  const end = endRaw >= max ? Number.MAX_SAFE_INTEGER : Number(endRaw);
  const s = start >= max ? Number.MAX_SAFE_INTEGER : Number(start);
  if (s > end) r.fail('EINVAL', 'lock start after end');
  return { start: s, end, type, pid };
}

/**
 * Decodes one request frame. Throws only FuseDecodeError. `opts` carries what INIT negotiated
 * (the size of fuse_setxattr_in depends on it).
 */
export function decodeRequest(frame: Buffer, opts: DecodeOptions = {}): FuseRequest {
  const h = decodeHeader(frame);
  // Extensions (security context, supplementary groups) follow the arguments; we never
  // negotiate them, and a frame that carries them anyway has them cut off here.
  const extlen = frame.readUInt16LE(36) * 8;
  if (extlen > h.len - Size.IN_HEADER) throw new FuseDecodeError('EINVAL', `extensions of ${extlen} bytes`, h.unique, h.opcode);
  const body = frame.subarray(Size.IN_HEADER, h.len - extlen);
  const r = new Reader(body, h);
  const maxWrite = opts.maxWrite ?? DEFAULT_MAX_WRITE;
  const maxRead = opts.maxRead ?? maxWrite;
  switch (h.opcode) {
    case Op.INIT: {
      r.need(Size.INIT_IN_COMPAT, 'fuse_init_in');
      let flags = BigInt(r.u32(12));
      if (flags & Init.INIT_EXT && body.length >= Size.INIT_IN) flags |= BigInt(r.u32(16)) << 32n;
      return { h, kind: 'INIT', major: r.u32(0), minor: r.u32(4), maxReadahead: r.u32(8), flags };
    }
    case Op.DESTROY:
      return { h, kind: 'DESTROY' };
    case Op.LOOKUP: {
      const [name] = r.strings(0, 1, 'LOOKUP');
      return { h, kind: 'LOOKUP', name: r.name(name!, 'LOOKUP', true) };
    }
    case Op.FORGET:
      r.need(8, 'fuse_forget_in');
      return { h, kind: 'FORGET', nlookup: r.u64(0, 'nlookup') };
    case Op.BATCH_FORGET: {
      r.need(8, 'fuse_batch_forget_in');
      const count = r.u32(0);
      if (body.length < 8 + count * Size.FORGET_ONE) r.fail('EINVAL', `BATCH_FORGET of ${count} in ${body.length} bytes`);
      const forgets: { nodeId: number; nlookup: number }[] = [];
      for (let i = 0; i < count; i++) {
        const o = 8 + i * Size.FORGET_ONE;
        // A forged id past 2^53 is skipped, not fatal: the rest of the batch still counts.
        const nodeId = u64(body, o);
        const nlookup = u64(body, o + 8);
        if (nodeId !== undefined && nlookup !== undefined) forgets.push({ nodeId, nlookup });
      }
      return { h, kind: 'BATCH_FORGET', forgets };
    }
    case Op.GETATTR: {
      r.need(16, 'fuse_getattr_in');
      const flags = r.u32(0);
      return flags & FUSE_GETATTR_FH ? { h, kind: 'GETATTR', fh: r.fh(8) } : { h, kind: 'GETATTR' };
    }
    case Op.SETATTR: {
      r.need(88, 'fuse_setattr_in');
      const valid = r.u32(0);
      const changes: SetAttr = {};
      if (valid & FATTR_MODE) changes.mode = r.u32(68) & 0o7777;
      if (valid & FATTR_UID) changes.uid = r.u32(76);
      if (valid & FATTR_GID) changes.gid = r.u32(80);
      if (valid & FATTR_SIZE) changes.size = r.u64(16, 'size', 'EFBIG');
      if (valid & FATTR_ATIME_NOW) changes.atime = 'now';
      else if (valid & FATTR_ATIME) changes.atime = { sec: r.sec(32), nsec: r.nsec(56) };
      if (valid & FATTR_MTIME_NOW) changes.mtime = 'now';
      else if (valid & FATTR_MTIME) changes.mtime = { sec: r.sec(40), nsec: r.nsec(60) };
      if (valid & FATTR_CTIME) changes.ctime = { sec: r.sec(48), nsec: r.nsec(64) };
      if (valid & FATTR_KILL_SUIDGID) changes.killSuidGid = true;
      const req: FuseRequest = { h, kind: 'SETATTR', changes };
      if (valid & FATTR_FH) req.fh = r.fh(8);
      if (valid & FATTR_LOCKOWNER) req.lockOwner = r.big(24);
      return req;
    }
    case Op.READLINK:
      return { h, kind: 'READLINK' };
    case Op.SYMLINK: {
      const [name, target] = r.strings(0, 2, 'SYMLINK');
      if (target!.length === 0) r.fail('ENOENT', 'SYMLINK: empty target');
      if (target!.length >= PATH_MAX) r.fail('ENAMETOOLONG', 'SYMLINK: target too long');
      return { h, kind: 'SYMLINK', name: r.name(name!, 'SYMLINK'), target: target! };
    }
    case Op.MKNOD: {
      r.need(16, 'fuse_mknod_in');
      const [name] = r.strings(16, 1, 'MKNOD');
      return { h, kind: 'MKNOD', mode: r.u32(0), rdev: r.u32(4), umask: r.u32(8) & 0o777, name: r.name(name!, 'MKNOD') };
    }
    case Op.MKDIR: {
      r.need(8, 'fuse_mkdir_in');
      const [name] = r.strings(8, 1, 'MKDIR');
      return { h, kind: 'MKDIR', mode: r.u32(0), umask: r.u32(4) & 0o777, name: r.name(name!, 'MKDIR') };
    }
    case Op.UNLINK:
    case Op.RMDIR: {
      const kind = h.opcode === Op.UNLINK ? 'UNLINK' : 'RMDIR';
      const [name] = r.strings(0, 1, kind);
      return { h, kind, name: r.name(name!, kind) };
    }
    case Op.RENAME:
    case Op.RENAME2: {
      const fixed = h.opcode === Op.RENAME ? 8 : 16;
      r.need(fixed, 'fuse_rename_in');
      const newParent = r.nodeId(0);
      const flags = h.opcode === Op.RENAME2 ? r.u32(8) : 0;
      if (flags & ~3 || flags === 3) r.fail('EINVAL', `RENAME2 flags ${flags}`);
      const [name, newName] = r.strings(fixed, 2, 'RENAME');
      return { h, kind: 'RENAME', newParent, flags, name: r.name(name!, 'RENAME'), newName: r.name(newName!, 'RENAME') };
    }
    case Op.LINK: {
      r.need(8, 'fuse_link_in');
      const [newName] = r.strings(8, 1, 'LINK');
      return { h, kind: 'LINK', oldNodeId: r.nodeId(0), newName: r.name(newName!, 'LINK') };
    }
    case Op.OPEN:
    case Op.OPENDIR: {
      r.need(8, 'fuse_open_in');
      if (h.opcode === Op.OPENDIR) return { h, kind: 'OPENDIR', flags: r.u32(0) };
      return { h, kind: 'OPEN', flags: r.u32(0), killSuidGid: (r.u32(4) & FUSE_OPEN_KILL_SUIDGID) !== 0 };
    }
    case Op.CREATE: {
      r.need(16, 'fuse_create_in');
      const [name] = r.strings(16, 1, 'CREATE');
      return {
        h,
        kind: 'CREATE',
        flags: r.u32(0),
        mode: r.u32(4),
        umask: r.u32(8) & 0o777,
        killSuidGid: (r.u32(12) & FUSE_OPEN_KILL_SUIDGID) !== 0,
        name: r.name(name!, 'CREATE'),
      };
    }
    case Op.READ:
    case Op.READDIR:
    case Op.READDIRPLUS: {
      r.need(40, 'fuse_read_in');
      const fh = r.fh(0);
      const offset = r.u64(8, 'offset');
      const size = r.u32(16);
      if (size > maxRead) r.fail('EINVAL', `read of ${size} bytes, at most ${maxRead}`);
      if (h.opcode === Op.READ) {
        r.range(offset, size, 'READ');
        const req: FuseRequest = { h, kind: 'READ', fh, offset, size, flags: r.u32(32) };
        if (r.u32(20) & 2) req.lockOwner = r.big(24);
        return req;
      }
      return { h, kind: h.opcode === Op.READDIR ? 'READDIR' : 'READDIRPLUS', fh, offset, size };
    }
    case Op.WRITE: {
      r.need(40, 'fuse_write_in');
      const fh = r.fh(0);
      const offset = r.u64(8, 'offset', 'EFBIG');
      const size = r.u32(16);
      if (size > maxWrite) r.fail('EINVAL', `write of ${size} bytes, at most ${maxWrite}`);
      if (body.length - 40 !== size) r.fail('EINVAL', `write of ${size} bytes carries ${body.length - 40}`);
      r.range(offset, size, 'WRITE');
      const writeFlags = r.u32(20);
      const req: FuseRequest = {
        h,
        kind: 'WRITE',
        fh,
        offset,
        data: body.subarray(40, 40 + size),
        flags: r.u32(32),
        writeFlags,
        killSuidGid: (writeFlags & FUSE_WRITE_KILL_SUIDGID) !== 0,
      };
      if (writeFlags & FUSE_WRITE_LOCKOWNER) req.lockOwner = r.big(24);
      return req;
    }
    case Op.STATFS:
      return { h, kind: 'STATFS' };
    case Op.RELEASE:
    case Op.RELEASEDIR: {
      r.need(24, 'fuse_release_in');
      const rf = r.u32(12);
      return {
        h,
        kind: h.opcode === Op.RELEASE ? 'RELEASE' : 'RELEASEDIR',
        fh: r.fh(0),
        flags: r.u32(8),
        flush: (rf & FUSE_RELEASE_FLUSH) !== 0,
        flockUnlock: (rf & FUSE_RELEASE_FLOCK_UNLOCK) !== 0,
        lockOwner: r.big(16),
      };
    }
    case Op.FLUSH:
      r.need(24, 'fuse_flush_in');
      return { h, kind: 'FLUSH', fh: r.fh(0), lockOwner: r.big(16) };
    case Op.FSYNC:
    case Op.FSYNCDIR:
      r.need(16, 'fuse_fsync_in');
      return { h, kind: h.opcode === Op.FSYNC ? 'FSYNC' : 'FSYNCDIR', fh: r.fh(0), datasync: (r.u32(8) & FUSE_FSYNC_FDATASYNC) !== 0 };
    case Op.SETXATTR: {
      const fixed = opts.setxattrExt ? Size.SETXATTR_IN : Size.SETXATTR_IN_COMPAT;
      r.need(fixed, 'fuse_setxattr_in');
      const size = r.u32(0);
      if (size > XATTR_SIZE_MAX) r.fail('E2BIG', `xattr value of ${size} bytes`);
      const z = body.indexOf(0, fixed);
      if (z < 0) r.fail('EINVAL', 'SETXATTR: name not NUL-terminated');
      if (body.length - (z + 1) !== size) r.fail('EINVAL', `SETXATTR: value of ${size} bytes carries ${body.length - z - 1}`);
      const flags = r.u32(4);
      if (flags & ~3 || flags === 3) r.fail('EINVAL', `SETXATTR flags ${flags}`);
      return {
        h,
        kind: 'SETXATTR',
        name: r.xattrName(body.subarray(fixed, z)),
        value: body.subarray(z + 1),
        flags,
        setxattrFlags: opts.setxattrExt ? r.u32(8) : 0,
      };
    }
    case Op.GETXATTR: {
      r.need(8, 'fuse_getxattr_in');
      const [name] = r.strings(8, 1, 'GETXATTR');
      return { h, kind: 'GETXATTR', size: r.u32(0), name: r.xattrName(name!) };
    }
    case Op.LISTXATTR:
      r.need(8, 'fuse_getxattr_in');
      return { h, kind: 'LISTXATTR', size: r.u32(0) };
    case Op.REMOVEXATTR: {
      const [name] = r.strings(0, 1, 'REMOVEXATTR');
      return { h, kind: 'REMOVEXATTR', name: r.xattrName(name!) };
    }
    case Op.ACCESS: {
      r.need(8, 'fuse_access_in');
      const mask = r.u32(0);
      if (mask & ~7) r.fail('EINVAL', `access mask ${mask}`);
      return { h, kind: 'ACCESS', mask };
    }
    case Op.GETLK:
    case Op.SETLK:
    case Op.SETLKW: {
      r.need(48, 'fuse_lk_in');
      const kind = h.opcode === Op.GETLK ? 'GETLK' : h.opcode === Op.SETLK ? 'SETLK' : 'SETLKW';
      return { h, kind, fh: r.fh(0), owner: r.big(8), lock: lockOf(r, 16), flock: (r.u32(40) & FUSE_LK_FLOCK) !== 0 };
    }
    case Op.INTERRUPT:
      r.need(8, 'fuse_interrupt_in');
      return { h, kind: 'INTERRUPT', target: r.big(0) };
    case Op.FALLOCATE: {
      r.need(32, 'fuse_fallocate_in');
      const offset = r.u64(8, 'offset', 'EFBIG');
      const length = r.u64(16, 'length', 'EFBIG');
      r.range(offset, length, 'FALLOCATE');
      return { h, kind: 'FALLOCATE', fh: r.fh(0), offset, length, mode: r.u32(24) };
    }
    case Op.LSEEK: {
      r.need(24, 'fuse_lseek_in');
      const whence = r.u32(16);
      if (whence > 4) r.fail('EINVAL', `whence ${whence}`);
      return { h, kind: 'LSEEK', fh: r.fh(0), offset: r.u64(8, 'offset', 'ENXIO'), whence };
    }
    case Op.COPY_FILE_RANGE: {
      r.need(56, 'fuse_copy_file_range_in');
      const offIn = r.u64(8, 'off_in');
      const offOut = r.u64(32, 'off_out', 'EFBIG');
      // len is a size_t; the kernel clamps it, a larger one is cut to what can be addressed.
      const lenBig = r.big(40);
      const len = lenBig > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(lenBig);
      const flags = Number(r.big(48) & 0xffffffffn);
      const clamp = Math.min(len, Number.MAX_SAFE_INTEGER - Math.max(offIn, offOut));
      return { h, kind: 'COPY_FILE_RANGE', fhIn: r.fh(0), offIn, nodeIdOut: r.nodeId(16), fhOut: r.fh(24), offOut, len: clamp, flags };
    }
    case Op.SYNCFS:
      return { h, kind: 'SYNCFS' };
    default:
      return { h, kind: 'UNSUPPORTED' };
  }
}

// ---------------------------------------------------------------- replies

/** fuse_out_header: `len` covers the header and `payloadLength` bytes that follow. */
export function encodeOutHeader(unique: bigint, error: number, payloadLength: number): Buffer {
  const b = Buffer.allocUnsafe(Size.OUT_HEADER);
  b.writeUInt32LE(Size.OUT_HEADER + payloadLength, 0);
  b.writeInt32LE(error, 4);
  b.writeBigUInt64LE(unique, 8);
  return b;
}

/** An error reply: `errno` positive, sent negated. */
export function encodeError(unique: bigint, errno: number): Buffer {
  return encodeOutHeader(unique, -errno, 0);
}

/** A success reply: header + payload pieces (the pieces are not copied). */
export function encodeReply(unique: bigint, payload: readonly Buffer[] = []): Buffer[] {
  let len = 0;
  for (const p of payload) len += p.length;
  return [encodeOutHeader(unique, 0, len), ...payload];
}

function ttl(b: Buffer, secOff: number, nsecOff: number, ms: number): void {
  const m = Math.max(0, ms);
  wu64(b, secOff, Math.floor(m / 1000));
  b.writeUInt32LE(Math.floor((m % 1000) * 1e6), nsecOff);
}

function writeTime(b: Buffer, off: number, sec: number): void {
  b.writeBigInt64LE(BigInt(Math.trunc(sec)), off);
}

/** struct fuse_attr at `off` (88 bytes). */
export function writeAttr(b: Buffer, off: number, a: Attr): void {
  wu64(b, off, a.ino);
  wu64(b, off + 8, a.size);
  wu64(b, off + 16, a.blocks);
  writeTime(b, off + 24, a.atime.sec);
  writeTime(b, off + 32, a.mtime.sec);
  writeTime(b, off + 40, a.ctime.sec);
  b.writeUInt32LE(a.atime.nsec >>> 0, off + 48);
  b.writeUInt32LE(a.mtime.nsec >>> 0, off + 52);
  b.writeUInt32LE(a.ctime.nsec >>> 0, off + 56);
  b.writeUInt32LE(a.mode >>> 0, off + 60);
  b.writeUInt32LE(a.nlink >>> 0, off + 64);
  b.writeUInt32LE(a.uid >>> 0, off + 68);
  b.writeUInt32LE(a.gid >>> 0, off + 72);
  b.writeUInt32LE(a.rdev >>> 0, off + 76);
  b.writeUInt32LE(a.blksize >>> 0, off + 80);
  b.writeUInt32LE(0, off + 84);
}

export function readAttr(b: Buffer, off: number): Attr {
  const n = (o: number): number => Number(b.readBigUInt64LE(off + o));
  const t = (o: number): number => Number(b.readBigInt64LE(off + o));
  return {
    ino: n(0),
    size: n(8),
    blocks: n(16),
    atime: { sec: t(24), nsec: b.readUInt32LE(off + 48) },
    mtime: { sec: t(32), nsec: b.readUInt32LE(off + 52) },
    ctime: { sec: t(40), nsec: b.readUInt32LE(off + 56) },
    mode: b.readUInt32LE(off + 60),
    nlink: b.readUInt32LE(off + 64),
    uid: b.readUInt32LE(off + 68),
    gid: b.readUInt32LE(off + 72),
    rdev: b.readUInt32LE(off + 76),
    blksize: b.readUInt32LE(off + 80),
  };
}

/** Default cache lifetimes when the tree does not give its own. */
export interface Ttls {
  entryTtlMs: number;
  attrTtlMs: number;
}

/** fuse_entry_out at `off` (128 bytes). A negative entry (nodeId 0) caches "no such name". */
export function writeEntryOut(b: Buffer, off: number, e: Entry, t: Ttls): void {
  wu64(b, off, e.nodeId);
  wu64(b, off + 8, e.generation);
  ttl(b, off + 16, off + 32, e.entryTtlMs ?? t.entryTtlMs);
  ttl(b, off + 24, off + 36, e.attrTtlMs ?? t.attrTtlMs);
  writeAttr(b, off + 40, e.attr);
}

export function encodeEntryOut(e: Entry, t: Ttls): Buffer {
  const b = Buffer.allocUnsafe(Size.ENTRY_OUT);
  writeEntryOut(b, 0, e, t);
  return b;
}

export function encodeAttrOut(attr: Attr, attrTtlMs: number): Buffer {
  const b = Buffer.allocUnsafe(Size.ATTR_OUT);
  ttl(b, 0, 8, attrTtlMs);
  b.writeUInt32LE(0, 12);
  writeAttr(b, 16, attr);
  return b;
}

export function encodeOpenOut(fh: number, openFlags: number): Buffer {
  const b = Buffer.alloc(Size.OPEN_OUT);
  wu64(b, 0, fh);
  b.writeUInt32LE(openFlags >>> 0, 8);
  return b;
}

/** CREATE's reply: fuse_entry_out then fuse_open_out. */
export function encodeCreateOut(e: Entry, t: Ttls, fh: number, openFlags: number): Buffer {
  const b = Buffer.alloc(Size.ENTRY_OUT + Size.OPEN_OUT);
  writeEntryOut(b, 0, e, t);
  wu64(b, Size.ENTRY_OUT, fh);
  b.writeUInt32LE(openFlags >>> 0, Size.ENTRY_OUT + 8);
  return b;
}

export function encodeWriteOut(size: number): Buffer {
  const b = Buffer.alloc(Size.WRITE_OUT);
  b.writeUInt32LE(size >>> 0, 0);
  return b;
}

/** fuse_getxattr_out: the size a getxattr/listxattr with size 0 asks for. */
export function encodeGetxattrOut(size: number): Buffer {
  return encodeWriteOut(size);
}

export function encodeStatfsOut(s: StatFs): Buffer {
  const b = Buffer.alloc(Size.STATFS_OUT);
  wu64(b, 0, s.blocks);
  wu64(b, 8, s.bfree);
  wu64(b, 16, s.bavail);
  wu64(b, 24, s.files);
  wu64(b, 32, s.ffree);
  b.writeUInt32LE(s.bsize >>> 0, 40);
  b.writeUInt32LE(s.namelen >>> 0, 44);
  b.writeUInt32LE(s.frsize >>> 0, 48);
  return b;
}

export function encodeLkOut(l: FileLock): Buffer {
  const b = Buffer.alloc(Size.LK_OUT);
  wu64(b, 0, l.start);
  if (l.end >= Number.MAX_SAFE_INTEGER) b.writeBigUInt64LE(OFFSET_MAX, 8);
  else wu64(b, 8, l.end);
  b.writeUInt32LE(l.type >>> 0, 16);
  b.writeUInt32LE(l.pid >>> 0, 20);
  return b;
}

export function encodeLseekOut(offset: number): Buffer {
  const b = Buffer.allocUnsafe(Size.LSEEK_OUT);
  wu64(b, 0, offset);
  return b;
}

export interface InitOut {
  major: number;
  minor: number;
  maxReadahead: number;
  flags: bigint;
  maxBackground: number;
  congestionThreshold: number;
  maxWrite: number;
  timeGran: number;
  maxPages: number;
}

export function encodeInitOut(o: InitOut): Buffer {
  const b = Buffer.alloc(Size.INIT_OUT);
  b.writeUInt32LE(o.major, 0);
  b.writeUInt32LE(o.minor, 4);
  b.writeUInt32LE(o.maxReadahead >>> 0, 8);
  b.writeUInt32LE(Number(o.flags & 0xffffffffn), 12);
  b.writeUInt16LE(o.maxBackground, 16);
  b.writeUInt16LE(o.congestionThreshold, 18);
  b.writeUInt32LE(o.maxWrite >>> 0, 20);
  b.writeUInt32LE(o.timeGran >>> 0, 24);
  b.writeUInt16LE(o.maxPages, 28);
  b.writeUInt16LE(0, 30);
  b.writeUInt32LE(Number((o.flags >> 32n) & 0xffffffffn), 32);
  return b;
}

export function decodeInitOut(b: Buffer): InitOut {
  return {
    major: b.readUInt32LE(0),
    minor: b.readUInt32LE(4),
    maxReadahead: b.readUInt32LE(8),
    flags: BigInt(b.readUInt32LE(12)) | (BigInt(b.readUInt32LE(32)) << 32n),
    maxBackground: b.readUInt16LE(16),
    congestionThreshold: b.readUInt16LE(18),
    maxWrite: b.readUInt32LE(20),
    timeGran: b.readUInt32LE(24),
    maxPages: b.readUInt16LE(28),
  };
}

const align8 = (n: number): number => (n + 7) & ~7;

/** Bytes one entry takes in a READDIR reply. */
export const direntSize = (nameLength: number): number => align8(Size.DIRENT + nameLength);
/** Bytes one entry takes in a READDIRPLUS reply. */
export const direntPlusSize = (nameLength: number): number => align8(Size.DIRENTPLUS + nameLength);

function writeDirent(b: Buffer, off: number, e: DirEntry): number {
  wu64(b, off, e.ino);
  wu64(b, off + 8, e.offset);
  b.writeUInt32LE(e.name.length, off + 16);
  b.writeUInt32LE(e.type >>> 0, off + 20);
  e.name.copy(b, off + 24);
  const end = off + Size.DIRENT + e.name.length;
  const padded = align8(end - off) + off;
  b.fill(0, end, padded);
  return padded;
}

/** How many leading entries fit in `maxSize` bytes, and their size. */
function fit(entries: readonly DirEntry[], maxSize: number, sizeOf: (nameLength: number) => number): { total: number; count: number } {
  let total = 0;
  let count = 0;
  for (const e of entries) {
    const s = sizeOf(e.name.length);
    if (total + s > maxSize) break;
    total += s;
    count++;
  }
  return { total, count };
}

/**
 * Packs READDIR entries into at most `maxSize` bytes (each 8-byte aligned). Returns the buffer
 * and how many entries fit; the rest are for the next call (from the last packed `offset`).
 */
export function packDirents(entries: readonly DirEntry[], maxSize: number): { buf: Buffer; count: number } {
  const { total, count } = fit(entries, maxSize, direntSize);
  const buf = Buffer.allocUnsafe(total);
  let off = 0;
  for (let i = 0; i < count; i++) off = writeDirent(buf, off, entries[i]!);
  return { buf, count };
}

/**
 * Packs READDIRPLUS entries (fuse_entry_out + fuse_dirent). An entry without `entry` ("." and
 * "..") goes out with a zero entry_out, which the kernel skips for lookups.
 */
export function packDirentsPlus(entries: readonly DirEntryPlus[], maxSize: number, t: Ttls): { buf: Buffer; count: number } {
  const { total, count } = fit(entries, maxSize, direntPlusSize);
  const buf = Buffer.allocUnsafe(total);
  let off = 0;
  for (let i = 0; i < count; i++) {
    const e = entries[i]!;
    if (e.entry) writeEntryOut(buf, off, e.entry, t);
    else buf.fill(0, off, off + Size.ENTRY_OUT);
    off = writeDirent(buf, off + Size.ENTRY_OUT, e);
  }
  return { buf, count };
}

/** One fuse_dirent at `off` (the name copied out). */
function readDirent(b: Buffer, off: number): DirEntry {
  const namelen = b.readUInt32LE(off + 16);
  return {
    ino: Number(b.readBigUInt64LE(off)),
    offset: Number(b.readBigUInt64LE(off + 8)),
    type: b.readUInt32LE(off + 20),
    name: Buffer.from(b.subarray(off + 24, off + 24 + namelen)),
  };
}

/** Parses a READDIR reply payload (for tests and front-end drivers). */
export function unpackDirents(b: Buffer): DirEntry[] {
  const out: DirEntry[] = [];
  let off = 0;
  while (off + Size.DIRENT <= b.length) {
    const e = readDirent(b, off);
    out.push(e);
    off += direntSize(e.name.length);
  }
  return out;
}

/** Parses a READDIRPLUS reply payload: entries with their node id (0 for "." / ".."). */
export function unpackDirentsPlus(b: Buffer): (DirEntry & { nodeId: number; attr: Attr })[] {
  const out: (DirEntry & { nodeId: number; attr: Attr })[] = [];
  let off = 0;
  while (off + Size.DIRENTPLUS <= b.length) {
    const e = readDirent(b, off + Size.ENTRY_OUT);
    out.push({ nodeId: Number(b.readBigUInt64LE(off)), attr: readAttr(b, off + 40), ...e });
    off += direntPlusSize(e.name.length);
  }
  return out;
}

// ---------------------------------------------------------------- request encoding

/**
 * Builds a request frame: what a kernel (or a vhost-user-fs front end) sends. Used by tests,
 * the fuzzer's valid corpus and any future front-end driver. Fields not given are 0.
 */
export function encodeRequest(
  opcode: number,
  hdr: { unique: bigint; nodeId?: number; uid?: number; gid?: number; pid?: number },
  ...parts: Buffer[]
): Buffer {
  const body = Buffer.concat(parts);
  const b = Buffer.alloc(Size.IN_HEADER + body.length);
  b.writeUInt32LE(b.length, 0);
  b.writeUInt32LE(opcode, 4);
  b.writeBigUInt64LE(hdr.unique, 8);
  b.writeBigUInt64LE(BigInt(hdr.nodeId ?? 0), 16);
  b.writeUInt32LE(hdr.uid ?? 0, 24);
  b.writeUInt32LE(hdr.gid ?? 0, 28);
  b.writeUInt32LE(hdr.pid ?? 0, 32);
  body.copy(b, Size.IN_HEADER);
  return b;
}

/** A struct of little-endian fields: [bytes, value] pairs (bytes 2, 4 or 8). */
export function struct(...fields: [2 | 4 | 8, number | bigint][]): Buffer {
  const b = Buffer.alloc(fields.reduce((s, [n]) => s + n, 0));
  let off = 0;
  for (const [n, v] of fields) {
    if (n === 2) b.writeUInt16LE(Number(v), off);
    else if (n === 4) b.writeUInt32LE(Number(v) >>> 0, off);
    else b.writeBigUInt64LE(BigInt.asUintN(64, BigInt(v)), off);
    off += n;
  }
  return b;
}

/** A NUL-terminated string. */
export function cstr(s: string | Buffer): Buffer {
  return Buffer.concat([typeof s === 'string' ? Buffer.from(s) : s, Buffer.alloc(1)]);
}
