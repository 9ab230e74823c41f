import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import {
  FuseDecodeError,
  decodeInitOut,
  decodeRequest,
  encodeAttrOut,
  encodeEntryOut,
  encodeInitOut,
  encodeLkOut,
  encodeOutHeader,
  encodeStatfsOut,
  packDirents,
  packDirentsPlus,
  unpackDirents,
  unpackDirentsPlus,
  type FuseRequest,
} from '../../../lib/fuse/codec.js';
import { Init, Op, Size } from '../../../lib/fuse/constants.js';
import type { Attr, Entry } from '../../../lib/fs/tree.js';
import { F, corpus } from './frames.js';

const H = { unique: 7n, nodeId: 5, uid: 1000, gid: 100, pid: 42 };
const dec = (b: Buffer, ext = true): FuseRequest => decodeRequest(b, { setxattrExt: ext });
function decErr(b: Buffer, opts = {}): FuseDecodeError {
  try {
    decodeRequest(b, opts);
  } catch (e) {
    expect(e).toBeInstanceOf(FuseDecodeError);
    return e as FuseDecodeError;
  }
  throw new Error('decoded a frame that should fail');
}

const attr: Attr = {
  ino: 0x1_0000_0002,
  size: 12345,
  blocks: 24,
  atime: { sec: 1_700_000_000, nsec: 5 },
  mtime: { sec: 1_700_000_001, nsec: 6 },
  ctime: { sec: -1, nsec: 7 },
  mode: 0o100644,
  nlink: 2,
  uid: 1000,
  gid: 100,
  rdev: 0,
  blksize: 4096,
};

describe('FUSE codec: decoding every request (round trip from the struct layouts)', () => {
  it('header fields', () => {
    const r = dec(F.getattr(H));
    expect(r.h).toEqual({ len: 56, opcode: Op.GETATTR, unique: 7n, nodeId: 5, uid: 1000, gid: 100, pid: 42 });
    expect(r).toMatchObject({ kind: 'GETATTR' });
    expect('fh' in r).toBe(false);
    expect(dec(F.getattr(H, 9))).toMatchObject({ kind: 'GETATTR', fh: 9 });
  });

  it('INIT with flags2 (INIT_EXT) and without', () => {
    const r = dec(F.init(H));
    expect(r).toMatchObject({ kind: 'INIT', major: 7, minor: 38, maxReadahead: 131072 });
    expect((r as { flags: bigint }).flags & Init.SECURITY_CTX).toBe(Init.SECURITY_CTX);
    const old = dec(F.init(H, 31, Init.ASYNC_READ | Init.SECURITY_CTX));
    // Without INIT_EXT the second word is not flags.
    expect((old as { flags: bigint }).flags).toBe(Init.ASYNC_READ);
  });

  it('names, modes, umask', () => {
    expect(dec(F.lookup(H, 'a b'))).toMatchObject({ kind: 'LOOKUP', name: Buffer.from('a b') });
    expect(dec(F.lookup(H, '..'))).toMatchObject({ kind: 'LOOKUP', name: Buffer.from('..') });
    expect(dec(F.mkdir(H, 'd', 0o777, 0o22))).toMatchObject({ kind: 'MKDIR', name: Buffer.from('d'), mode: 0o777, umask: 0o22 });
    expect(dec(F.mknod(H, 'p', 0o10640, 0x0801, 0o2))).toMatchObject({ kind: 'MKNOD', mode: 0o10640, rdev: 0x801, umask: 0o2 });
    expect(dec(F.create(H, 'n', 0o1101, 0o100600, 0o77))).toMatchObject({ kind: 'CREATE', name: Buffer.from('n'), flags: 0o1101, mode: 0o100600, umask: 0o77, killSuidGid: false });
    expect(dec(F.symlink(H, 'l', '../x/y'))).toMatchObject({ kind: 'SYMLINK', name: Buffer.from('l'), target: Buffer.from('../x/y') });
    expect(dec(F.unlink(H, 'f'))).toMatchObject({ kind: 'UNLINK', name: Buffer.from('f') });
    expect(dec(F.rmdir(H, 'd'))).toMatchObject({ kind: 'RMDIR', name: Buffer.from('d') });
    expect(dec(F.rename(H, 'a', 9, 'b'))).toMatchObject({ kind: 'RENAME', name: Buffer.from('a'), newParent: 9, newName: Buffer.from('b'), flags: 0 });
    expect(dec(F.rename2(H, 'a', 9, 'b', 2))).toMatchObject({ kind: 'RENAME', flags: 2 });
    expect(dec(F.link(H, 12, 'h'))).toMatchObject({ kind: 'LINK', oldNodeId: 12, newName: Buffer.from('h') });
    // Non-UTF-8 names are bytes, kept as they are.
    const latin = Buffer.from([0xe9, 0x74, 0xe9]);
    expect((dec(F.lookup(H, latin)) as { name: Buffer }).name).toEqual(latin);
  });

  it('SETATTR: only the valid fields', () => {
    const r = dec(F.setattr(H, { valid: 1 | 8 | 16 | 0x100 | 0x40, mode: 0o104755, size: 2 ** 40, atime: 5, atimensec: 9, fh: 4 }));
    expect(r).toEqual({ h: expect.anything(), kind: 'SETATTR', changes: { mode: 0o4755, size: 2 ** 40, atime: { sec: 5, nsec: 9 }, mtime: 'now' }, fh: 4 });
    const r2 = dec(F.setattr(H, { valid: 2 | 4 | 0x400 | 0x800 | 0x200, uid: 7, gid: 8, ctime: 3, ctimensec: 4, lockOwner: 0xffff_ffff_ffff_fff0n }));
    expect(r2).toMatchObject({ changes: { uid: 7, gid: 8, ctime: { sec: 3, nsec: 4 }, killSuidGid: true }, lockOwner: 0xffff_ffff_ffff_fff0n });
  });

  it('file I/O', () => {
    expect(dec(F.open(H, 0o1002, 1))).toMatchObject({ kind: 'OPEN', flags: 0o1002, killSuidGid: true });
    expect(dec(F.opendir(H, 0o200000))).toMatchObject({ kind: 'OPENDIR', flags: 0o200000 });
    expect(dec(F.read(H, 3, 2 ** 40, 65536))).toMatchObject({ kind: 'READ', fh: 3, offset: 2 ** 40, size: 65536 });
    expect(dec(F.read(H, 3, 77, 4096, Op.READDIR))).toMatchObject({ kind: 'READDIR', fh: 3, offset: 77, size: 4096 });
    expect(dec(F.read(H, 3, 77, 4096, Op.READDIRPLUS))).toMatchObject({ kind: 'READDIRPLUS' });
    const frame = F.write(H, 3, 100, Buffer.from('payload'), 2 | 4, 99n);
    const w = dec(frame) as Extract<FuseRequest, { kind: 'WRITE' }>;
    expect(w).toMatchObject({ kind: 'WRITE', fh: 3, offset: 100, lockOwner: 99n, killSuidGid: true, flags: 0o2 });
    expect(w.data.toString()).toBe('payload');
    // The payload is a view of the frame, not a copy.
    expect(w.data.buffer).toBe(frame.buffer);
    expect(dec(F.release(H, 3, 2, 5n))).toMatchObject({ kind: 'RELEASE', fh: 3, flush: false, flockUnlock: true, lockOwner: 5n });
    expect(dec(F.release(H, 3, 0, 0n, Op.RELEASEDIR))).toMatchObject({ kind: 'RELEASEDIR', fh: 3 });
    expect(dec(F.flush(H, 3, 11n))).toMatchObject({ kind: 'FLUSH', fh: 3, lockOwner: 11n });
    expect(dec(F.fsync(H, 3, true))).toMatchObject({ kind: 'FSYNC', datasync: true });
    expect(dec(F.fsync(H, 3, false, Op.FSYNCDIR))).toMatchObject({ kind: 'FSYNCDIR', datasync: false });
    expect(dec(F.fallocate(H, 3, 4096, 8192, 3))).toMatchObject({ kind: 'FALLOCATE', fh: 3, offset: 4096, length: 8192, mode: 3 });
    expect(dec(F.lseek(H, 3, 10, 4))).toMatchObject({ kind: 'LSEEK', fh: 3, offset: 10, whence: 4 });
    expect(dec(F.copyFileRange(H, 3, 1, 6, 4, 2, 1000))).toMatchObject({ kind: 'COPY_FILE_RANGE', fhIn: 3, offIn: 1, nodeIdOut: 6, fhOut: 4, offOut: 2, len: 1000 });
  });

  it('xattrs: SETXATTR in both layouts', () => {
    expect(dec(F.setxattr(H, 'user.k', Buffer.from([0, 1, 2]), 1))).toMatchObject({ kind: 'SETXATTR', name: Buffer.from('user.k'), value: Buffer.from([0, 1, 2]), flags: 1 });
    expect(dec(F.setxattr(H, 'user.k', Buffer.from('v'), 2, false), false)).toMatchObject({ kind: 'SETXATTR', value: Buffer.from('v'), flags: 2 });
    // The compat layout read as the extended one is malformed (the value length disagrees).
    expect(decErr(F.setxattr(H, 'user.k', Buffer.from('v'), 0, false), { setxattrExt: true }).errno).toBe('EINVAL');
    expect(dec(F.getxattr(H, 'user.k', 0))).toMatchObject({ kind: 'GETXATTR', size: 0, name: Buffer.from('user.k') });
    expect(dec(F.listxattr(H, 64))).toMatchObject({ kind: 'LISTXATTR', size: 64 });
    expect(dec(F.removexattr(H, 'user.k'))).toMatchObject({ kind: 'REMOVEXATTR', name: Buffer.from('user.k') });
  });

  it('locks, interrupt, forget, the rest', () => {
    expect(dec(F.lk(Op.SETLKW, H, 3, 0xdeadn, 10, 0x7fffffffffffffffn, 1, 42, 1))).toMatchObject({
      kind: 'SETLKW',
      fh: 3,
      owner: 0xdeadn,
      lock: { start: 10, end: Number.MAX_SAFE_INTEGER, type: 1, pid: 42 },
      flock: true,
    });
    expect(dec(F.lk(Op.GETLK, H, 3, 1n, 0, 99, 0, 1))).toMatchObject({ kind: 'GETLK', lock: { start: 0, end: 99, type: 0 } });
    expect(dec(F.interrupt({ unique: 9n }, 123n))).toMatchObject({ kind: 'INTERRUPT', target: 123n });
    expect(dec(F.forget(H, 3))).toMatchObject({ kind: 'FORGET', nlookup: 3 });
    expect(dec(F.batchForget(H, [[5, 1], [6, 2]]))).toMatchObject({ kind: 'BATCH_FORGET', forgets: [{ nodeId: 5, nlookup: 1 }, { nodeId: 6, nlookup: 2 }] });
    expect(dec(F.access(H, 6))).toMatchObject({ kind: 'ACCESS', mask: 6 });
    for (const [f, k] of [
      [F.statfs(H), 'STATFS'],
      [F.readlink(H), 'READLINK'],
      [F.destroy(H), 'DESTROY'],
      [F.syncfs(H), 'SYNCFS'],
      [F.bmap(H), 'UNSUPPORTED'],
    ] as const)
      expect(dec(f).kind).toBe(k);
  });
});

describe('FUSE codec: bad input is a typed error, checked once here', () => {
  it('a short or lying header has no unique (nothing to answer)', () => {
    expect(decErr(Buffer.alloc(10)).unique).toBeUndefined();
    const f = F.getattr(H);
    f.writeUInt32LE(f.length + 1, 0);
    expect(decErr(f).unique).toBeUndefined();
    f.writeUInt32LE(12, 0);
    expect(decErr(f).unique).toBeUndefined();
  });

  it('names: empty, too long, with "/", "." and ".." where created or removed', () => {
    expect(decErr(F.mkdir(H, '', 0o755, 0)).errno).toBe('ENOENT');
    expect(decErr(F.mkdir(H, 'x'.repeat(256), 0o755, 0)).errno).toBe('ENAMETOOLONG');
    expect(dec(F.mkdir(H, 'x'.repeat(255), 0o755, 0)).kind).toBe('MKDIR');
    expect(decErr(F.mkdir(H, 'a/b', 0o755, 0)).errno).toBe('EINVAL');
    expect(decErr(F.lookup(H, '../etc')).errno).toBe('EINVAL');
    for (const dot of ['.', '..']) {
      expect(decErr(F.mkdir(H, dot, 0o755, 0)).unique).toBe(7n);
      expect(decErr(F.unlink(H, dot)).errno).toBe('EINVAL');
      expect(decErr(F.rename(H, dot, 1, 'x')).errno).toBe('EINVAL');
      expect(decErr(F.rename(H, 'x', 1, dot)).errno).toBe('EINVAL');
      expect(decErr(F.link(H, 5, dot)).errno).toBe('EINVAL');
      expect(decErr(F.symlink(H, dot, 't')).errno).toBe('EINVAL');
    }
    expect(decErr(F.symlink(H, 'l', '')).errno).toBe('ENOENT');
    // A name without its NUL.
    const f = F.unlink(H, 'abc');
    expect(decErr(fixLen(f.subarray(0, f.length - 1))).errno).toBe('EINVAL');
  });

  it('lengths and offsets', () => {
    // WRITE's size must be what it carries.
    const w = F.write(H, 3, 0, Buffer.from('abcd'));
    w.writeUInt32LE(5, 40 + 16);
    expect(decErr(w).errno).toBe('EINVAL');
    expect(decErr(F.write(H, 3, 0, Buffer.alloc(8192)), { maxWrite: 4096 }).errno).toBe('EINVAL');
    expect(decErr(F.read(H, 3, 0, 1 << 21)).errno).toBe('EINVAL');
    // Offsets past 2^53 cannot be served exactly.
    expect(decErr(F.read(H, 3, 2 ** 53, 10)).errno).toBe('EINVAL');
    expect(decErr(F.fallocate(H, 3, 2 ** 53 - 10, 100, 0)).errno).toBe('EINVAL');
    // A truncated struct.
    expect(decErr(fixLen(F.read(H, 3, 0, 10).subarray(0, 60))).errno).toBe('EINVAL');
    // A forged handle or node id past 2^53: EBADF / ENOENT.
    const r = F.read(H, 3, 0, 10);
    r.writeBigUInt64LE(1n << 60n, 40);
    expect(decErr(r).errno).toBe('EBADF');
    expect(decErr(F.link(H, 2 ** 53 + 2, 'h')).errno).toBe('ENOENT');
    const g = F.getattr(H);
    g.writeBigUInt64LE(1n << 63n, 16);
    expect(dec(g).h.nodeId).toBe(-1);
  });

  it('flags and lock fields', () => {
    expect(decErr(F.rename2(H, 'a', 1, 'b', 3)).errno).toBe('EINVAL');
    expect(decErr(F.rename2(H, 'a', 1, 'b', 8)).errno).toBe('EINVAL');
    expect(decErr(F.lk(Op.SETLK, H, 3, 1n, 0, 10, 3, 1)).errno).toBe('EINVAL');
    expect(decErr(F.lk(Op.SETLK, H, 3, 1n, 20, 10, 1, 1)).errno).toBe('EINVAL');
    expect(decErr(F.access(H, 8)).errno).toBe('EINVAL');
    expect(decErr(F.lseek(H, 3, 0, 9)).errno).toBe('EINVAL');
    expect(decErr(F.setxattr(H, 'user.a', Buffer.from('v'), 3)).errno).toBe('EINVAL');
    expect(decErr(F.setxattr(H, 'user.a', Buffer.alloc(65537), 0)).errno).toBe('E2BIG');
    expect(decErr(F.getxattr(H, 'u'.repeat(256), 0)).errno).toBe('ERANGE');
    expect(decErr(F.setattr(H, { valid: 16, atimensec: 1e9 })).errno).toBe('EINVAL');
  });

  it('fuzz: random bytes decode to a request or a FuseDecodeError, nothing else', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 0, maxLength: 300 }), fc.boolean(), (bytes, ext) => {
        const b = Buffer.from(bytes);
        if (b.length >= 4 && bytes[0]! & 1) b.writeUInt32LE(b.length, 0);
        try {
          decodeRequest(b, { setxattrExt: ext });
        } catch (e) {
          if (!(e instanceof FuseDecodeError)) throw e;
        }
      }),
      { numRuns: 5000 },
    );
  });

  it('fuzz: mutated valid frames (flipped bytes, truncation, growth, any opcode) decode or fail typed', () => {
    const seeds = corpus();
    fc.assert(
      fc.property(
        fc.nat(seeds.length - 1),
        fc.array(fc.tuple(fc.nat(400), fc.integer({ min: 0, max: 255 })), { maxLength: 8 }),
        fc.integer({ min: -60, max: 60 }),
        fc.option(fc.integer({ min: 0, max: 60 })),
        fc.boolean(),
        (i, flips, grow, opcode, keepLen) => {
          const seed = seeds[i]!;
          let b = grow >= 0 ? Buffer.concat([seed, Buffer.alloc(grow, 0x41)]) : Buffer.from(seed.subarray(0, Math.max(0, seed.length + grow)));
          b = Buffer.from(b);
          for (const [pos, v] of flips) if (pos < b.length) b[pos] = v;
          if (b.length >= 8 && opcode !== null) b.writeUInt32LE(opcode, 4);
          if (b.length >= 4 && keepLen) b.writeUInt32LE(b.length, 0);
          try {
            const r = decodeRequest(b, { setxattrExt: true, maxWrite: 1 << 20 });
            // What decodes is sane: the names it hands out are real components.
            for (const k of ['name', 'newName'] as const) {
              const n = (r as Record<string, unknown>)[k];
              if (n instanceof Buffer) {
                expect(n.length).toBeGreaterThan(0);
                expect(n.length).toBeLessThanOrEqual(255);
                if (!r.kind.endsWith('XATTR')) expect(n.includes(0x2f)).toBe(false);
                expect(n.includes(0)).toBe(false);
              }
            }
          } catch (e) {
            if (!(e instanceof FuseDecodeError)) throw e;
          }
        },
      ),
      { numRuns: 20000 },
    );
  });
});

function fixLen(b: Buffer): Buffer {
  const c = Buffer.from(b);
  c.writeUInt32LE(c.length, 0);
  return c;
}

describe('FUSE codec: replies (golden bytes from the struct layouts)', () => {
  it('fuse_out_header', () => {
    expect(encodeOutHeader(0x0102030405060708n, -2, 8).toString('hex')).toBe('18000000' + 'feffffff' + '0807060504030201');
  });

  it('fuse_attr_out and fuse_entry_out', () => {
    const a = encodeAttrOut(attr, 1500);
    expect(a.length).toBe(Size.ATTR_OUT);
    expect(a.readBigUInt64LE(0)).toBe(1n); // attr_valid seconds
    expect(a.readUInt32LE(8)).toBe(500_000_000); // attr_valid_nsec
    expect(a.readBigUInt64LE(16)).toBe(0x1_0000_0002n); // ino
    expect(a.readBigUInt64LE(24)).toBe(12345n); // size
    expect(a.readBigInt64LE(16 + 40)).toBe(-1n); // ctime, before the epoch
    expect(a.readUInt32LE(16 + 60)).toBe(0o100644); // mode
    expect(a.readUInt32LE(16 + 80)).toBe(4096); // blksize
    const entry: Entry = { nodeId: 77, generation: 3, attr, entryTtlMs: 250 };
    const e = encodeEntryOut(entry, { entryTtlMs: 1000, attrTtlMs: 2000 });
    expect(e.length).toBe(128);
    expect([e.readBigUInt64LE(0), e.readBigUInt64LE(8), e.readBigUInt64LE(16), e.readBigUInt64LE(24)]).toEqual([77n, 3n, 0n, 2n]);
    expect([e.readUInt32LE(32), e.readUInt32LE(36)]).toEqual([250_000_000, 0]);
  });

  it('fuse_kstatfs, fuse_file_lock (to EOF is OFFSET_MAX), fuse_init_out with flags2', () => {
    const s = encodeStatfsOut({ blocks: 10, bfree: 5, bavail: 4, files: 3, ffree: 2, bsize: 4096, namelen: 255, frsize: 4096 });
    expect(s.length).toBe(80);
    expect(s.subarray(0, 56).toString('hex')).toBe(
      '0a00000000000000' + '0500000000000000' + '0400000000000000' + '0300000000000000' + '0200000000000000' + '00100000' + 'ff000000' + '00100000' + '00000000',
    );
    const l = encodeLkOut({ start: 5, end: Number.MAX_SAFE_INTEGER, type: 1, pid: 9 });
    expect(l.toString('hex')).toBe('0500000000000000' + 'ffffffffffffff7f' + '01000000' + '09000000');
    const init = { major: 7, minor: 38, maxReadahead: 131072, flags: Init.ASYNC_READ | Init.INIT_EXT | Init.HAS_INODE_DAX, maxBackground: 64, congestionThreshold: 48, maxWrite: 1 << 20, timeGran: 1, maxPages: 256 };
    const b = encodeInitOut(init);
    expect(b.length).toBe(64);
    expect(b.subarray(0, 36).toString('hex')).toBe('07000000' + '26000000' + '00000200' + '01000040' + '4000' + '3000' + '00001000' + '01000000' + '0001' + '0000' + '02000000');
    expect(decodeInitOut(b)).toEqual(init);
  });

  it('dirents: 8-byte alignment, zeroed padding, the size limit', () => {
    const entries = ['a', 'bbbbbbbbb', 'c'.repeat(255)].map((n, i) => ({ name: Buffer.from(n), ino: 10 + i, type: 8, offset: i + 1 }));
    const { buf, count } = packDirents(entries, 4096);
    expect(count).toBe(3);
    expect(buf.length).toBe(32 + 40 + 280);
    expect(buf.subarray(0, 32).toString('hex')).toBe('0a00000000000000' + '0100000000000000' + '01000000' + '08000000' + '61' + '00000000000000');
    expect(unpackDirents(buf)).toEqual(entries);
    // 72 bytes hold the first two, not the third; 71 only the first.
    expect(packDirents(entries, 72).count).toBe(2);
    expect(packDirents(entries, 71).count).toBe(1);
    expect(packDirents(entries, 10).count).toBe(0);
    const plus = entries.map((e, i) => ({ ...e, entry: i === 0 ? undefined : { nodeId: 100 + i, generation: 0, attr } }));
    const p = packDirentsPlus(plus, 4096, { entryTtlMs: 1000, attrTtlMs: 1000 });
    expect(p.count).toBe(3);
    expect(p.buf.length).toBe(160 + 168 + 408);
    const back = unpackDirentsPlus(p.buf);
    expect(back.map((e) => [e.nodeId, e.name.toString().length, e.offset])).toEqual([
      [0, 1, 1],
      [101, 9, 2],
      [102, 255, 3],
    ]);
    expect(back[1]!.attr).toEqual(attr);
    expect(packDirentsPlus(plus, 160 + 168 + 407, { entryTtlMs: 0, attrTtlMs: 0 }).count).toBe(2);
  });

  it('property: any listing packs within the limit and unpacks to a prefix of itself', () => {
    fc.assert(
      fc.property(
        fc.array(fc.record({ name: fc.uint8Array({ minLength: 1, maxLength: 255 }), ino: fc.nat(), type: fc.nat(15), offset: fc.nat() }), { maxLength: 40 }),
        fc.integer({ min: 0, max: 8192 }),
        (raw, max) => {
          const entries = raw.map((e) => ({ ...e, name: Buffer.from(e.name) }));
          const { buf, count } = packDirents(entries, max);
          expect(buf.length).toBeLessThanOrEqual(max);
          expect(buf.length % 8).toBe(0);
          expect(unpackDirents(buf)).toEqual(entries.slice(0, count));
          if (count < entries.length) expect(buf.length + ((Size.DIRENT + entries[count]!.name.length + 7) & ~7)).toBeGreaterThan(max);
        },
      ),
    );
  });
});
