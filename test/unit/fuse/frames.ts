/**
 * Valid request frames of every opcode the engine serves, built from the struct layouts of
 * Linux's fuse.h: the round-trip tests, the engine tests and the fuzzer's seed corpus use them.
 */
import { cstr, encodeRequest, struct } from '../../../lib/fuse/codec.js';
import { Init, Op } from '../../../lib/fuse/constants.js';

export interface Hdr {
  unique: bigint;
  nodeId?: number;
  uid?: number;
  gid?: number;
  pid?: number;
}

const u32 = (v: number): [4, number] => [4, v];
const u64 = (v: number | bigint): [8, number | bigint] => [8, v];

export const F = {
  init: (h: Hdr, minor = 38, flags: bigint = Init.ASYNC_READ | Init.POSIX_LOCKS | Init.FLOCK_LOCKS | Init.MAX_PAGES | Init.SETXATTR_EXT | Init.DO_READDIRPLUS | Init.INIT_EXT | Init.SECURITY_CTX, maxReadahead = 131072) =>
    encodeRequest(
      Op.INIT,
      h,
      struct(u32(7), u32(minor), u32(maxReadahead), u32(Number(flags & 0xffffffffn)), u32(Number(flags >> 32n))),
      Buffer.alloc(44),
    ),
  destroy: (h: Hdr) => encodeRequest(Op.DESTROY, h),
  lookup: (h: Hdr, name: string | Buffer) => encodeRequest(Op.LOOKUP, h, cstr(name)),
  forget: (h: Hdr, nlookup: number) => encodeRequest(Op.FORGET, h, struct(u64(nlookup))),
  batchForget: (h: Hdr, list: [number, number][]) =>
    encodeRequest(Op.BATCH_FORGET, h, struct(u32(list.length), u32(0)), ...list.map(([n, c]) => struct(u64(n), u64(c)))),
  getattr: (h: Hdr, fh?: number) => encodeRequest(Op.GETATTR, h, struct(u32(fh === undefined ? 0 : 1), u32(0), u64(fh ?? 0))),
  setattr: (
    h: Hdr,
    s: { valid: number; fh?: number; size?: number; lockOwner?: bigint; atime?: number; mtime?: number; ctime?: number; atimensec?: number; mtimensec?: number; ctimensec?: number; mode?: number; uid?: number; gid?: number },
  ) =>
    encodeRequest(
      Op.SETATTR,
      h,
      struct(
        u32(s.valid),
        u32(0),
        u64(s.fh ?? 0),
        u64(s.size ?? 0),
        u64(s.lockOwner ?? 0n),
        u64(s.atime ?? 0),
        u64(s.mtime ?? 0),
        u64(s.ctime ?? 0),
        u32(s.atimensec ?? 0),
        u32(s.mtimensec ?? 0),
        u32(s.ctimensec ?? 0),
        u32(s.mode ?? 0),
        u32(0),
        u32(s.uid ?? 0),
        u32(s.gid ?? 0),
        u32(0),
      ),
    ),
  readlink: (h: Hdr) => encodeRequest(Op.READLINK, h),
  symlink: (h: Hdr, name: string, target: string) => encodeRequest(Op.SYMLINK, h, cstr(name), cstr(target)),
  mknod: (h: Hdr, name: string, mode: number, rdev: number, umask: number) => encodeRequest(Op.MKNOD, h, struct(u32(mode), u32(rdev), u32(umask), u32(0)), cstr(name)),
  mkdir: (h: Hdr, name: string | Buffer, mode: number, umask: number) => encodeRequest(Op.MKDIR, h, struct(u32(mode), u32(umask)), cstr(name)),
  unlink: (h: Hdr, name: string | Buffer) => encodeRequest(Op.UNLINK, h, cstr(name)),
  rmdir: (h: Hdr, name: string) => encodeRequest(Op.RMDIR, h, cstr(name)),
  rename: (h: Hdr, name: string, newDir: number, newName: string) => encodeRequest(Op.RENAME, h, struct(u64(newDir)), cstr(name), cstr(newName)),
  rename2: (h: Hdr, name: string, newDir: number, newName: string, flags: number) =>
    encodeRequest(Op.RENAME2, h, struct(u64(newDir), u32(flags), u32(0)), cstr(name), cstr(newName)),
  link: (h: Hdr, oldNode: number, newName: string) => encodeRequest(Op.LINK, h, struct(u64(oldNode)), cstr(newName)),
  open: (h: Hdr, flags: number, openFlags = 0) => encodeRequest(Op.OPEN, h, struct(u32(flags), u32(openFlags))),
  opendir: (h: Hdr, flags: number) => encodeRequest(Op.OPENDIR, h, struct(u32(flags), u32(0))),
  create: (h: Hdr, name: string, flags: number, mode: number, umask: number) =>
    encodeRequest(Op.CREATE, h, struct(u32(flags), u32(mode), u32(umask), u32(0)), cstr(name)),
  read: (h: Hdr, fh: number, offset: number, size: number, op: number = Op.READ) =>
    encodeRequest(op, h, struct(u64(fh), u64(offset), u32(size), u32(0), u64(0), u32(0), u32(0))),
  write: (h: Hdr, fh: number, offset: number, data: Buffer, writeFlags = 0, lockOwner = 0n) =>
    encodeRequest(Op.WRITE, h, struct(u64(fh), u64(offset), u32(data.length), u32(writeFlags), u64(lockOwner), u32(0o2), u32(0)), data),
  statfs: (h: Hdr) => encodeRequest(Op.STATFS, h),
  release: (h: Hdr, fh: number, releaseFlags: number, lockOwner: bigint, op: number = Op.RELEASE) =>
    encodeRequest(op, h, struct(u64(fh), u32(0o2), u32(releaseFlags), u64(lockOwner))),
  flush: (h: Hdr, fh: number, lockOwner: bigint) => encodeRequest(Op.FLUSH, h, struct(u64(fh), u32(0), u32(0), u64(lockOwner))),
  fsync: (h: Hdr, fh: number, datasync: boolean, op: number = Op.FSYNC) => encodeRequest(op, h, struct(u64(fh), u32(datasync ? 1 : 0), u32(0))),
  setxattr: (h: Hdr, name: string, value: Buffer, flags: number, ext = true) =>
    encodeRequest(Op.SETXATTR, h, ext ? struct(u32(value.length), u32(flags), u32(0), u32(0)) : struct(u32(value.length), u32(flags)), cstr(name), value),
  getxattr: (h: Hdr, name: string, size: number) => encodeRequest(Op.GETXATTR, h, struct(u32(size), u32(0)), cstr(name)),
  listxattr: (h: Hdr, size: number) => encodeRequest(Op.LISTXATTR, h, struct(u32(size), u32(0))),
  removexattr: (h: Hdr, name: string) => encodeRequest(Op.REMOVEXATTR, h, cstr(name)),
  access: (h: Hdr, mask: number) => encodeRequest(Op.ACCESS, h, struct(u32(mask), u32(0))),
  lk: (op: number, h: Hdr, fh: number, owner: bigint, start: number | bigint, end: number | bigint, type: number, pid: number, lkFlags = 0) =>
    encodeRequest(op, h, struct(u64(fh), u64(owner), u64(start), u64(end), u32(type), u32(pid), u32(lkFlags), u32(0))),
  interrupt: (h: Hdr, target: bigint) => encodeRequest(Op.INTERRUPT, h, struct(u64(target))),
  fallocate: (h: Hdr, fh: number, offset: number, length: number, mode: number) =>
    encodeRequest(Op.FALLOCATE, h, struct(u64(fh), u64(offset), u64(length), u32(mode), u32(0))),
  lseek: (h: Hdr, fh: number, offset: number, whence: number) => encodeRequest(Op.LSEEK, h, struct(u64(fh), u64(offset), u32(whence), u32(0))),
  copyFileRange: (h: Hdr, fhIn: number, offIn: number, nodeOut: number, fhOut: number, offOut: number, len: number, flags = 0) =>
    encodeRequest(Op.COPY_FILE_RANGE, h, struct(u64(fhIn), u64(offIn), u64(nodeOut), u64(fhOut), u64(offOut), u64(len), u64(flags))),
  syncfs: (h: Hdr) => encodeRequest(Op.SYNCFS, h, struct(u64(0))),
  bmap: (h: Hdr) => encodeRequest(Op.BMAP, h, struct(u64(0), u32(4096), u32(0))),
};

/** One valid frame of every opcode (the fuzzer's seeds). */
export function corpus(): Buffer[] {
  let u = 100n;
  const h = (nodeId = 1): Hdr => ({ unique: u++, nodeId, uid: 1000, gid: 1000, pid: 42 });
  return [
    F.init(h()),
    F.destroy(h()),
    F.lookup(h(), 'file'),
    F.forget(h(5), 2),
    F.batchForget(h(), [
      [5, 1],
      [6, 2],
    ]),
    F.getattr(h(5), 3),
    F.setattr(h(5), { valid: 0x7ff, fh: 3, size: 100, mode: 0o644, atime: 1, mtime: 2, ctime: 3 }),
    F.readlink(h(5)),
    F.symlink(h(), 'l', '/target'),
    F.mknod(h(), 'fifo', 0o10644, 0, 0o22),
    F.mkdir(h(), 'dir', 0o755, 0o22),
    F.unlink(h(), 'file'),
    F.rmdir(h(), 'dir'),
    F.rename(h(), 'a', 1, 'b'),
    F.rename2(h(), 'a', 1, 'b', 1),
    F.link(h(), 5, 'hard'),
    F.open(h(5), 2),
    F.opendir(h(), 0),
    F.create(h(), 'new', 0o102, 0o100644, 0o22),
    F.read(h(5), 3, 0, 4096),
    F.read(h(), 3, 0, 4096, Op.READDIR),
    F.read(h(), 3, 0, 4096, Op.READDIRPLUS),
    F.write(h(5), 3, 10, Buffer.from('hello')),
    F.statfs(h()),
    F.release(h(5), 3, 2, 7n),
    F.release(h(), 3, 0, 0n, Op.RELEASEDIR),
    F.flush(h(5), 3, 7n),
    F.fsync(h(5), 3, true),
    F.fsync(h(), 3, false, Op.FSYNCDIR),
    F.setxattr(h(5), 'user.a', Buffer.from('v'), 0),
    F.getxattr(h(5), 'user.a', 0),
    F.listxattr(h(5), 100),
    F.removexattr(h(5), 'user.a'),
    F.access(h(5), 4),
    F.lk(Op.GETLK, h(5), 3, 9n, 0, 0x7fffffffffffffffn, 1, 42),
    F.lk(Op.SETLK, h(5), 3, 9n, 0, 99, 0, 42),
    F.lk(Op.SETLKW, h(5), 3, 9n, 0, 0x7fffffffffffffffn, 1, 42, 1),
    F.interrupt({ unique: u++ | 1n }, 120n),
    F.fallocate(h(5), 3, 0, 4096, 0),
    F.lseek(h(5), 3, 0, 3),
    F.copyFileRange(h(5), 3, 0, 6, 4, 0, 100),
    F.syncfs(h()),
    F.bmap(h(5)),
  ];
}
