import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { constants } from 'node:os';
import { pino } from 'pino';
import { Writable } from 'node:stream';
import { FuseEngine, WANTED_FLAGS } from '../../../lib/fuse/engine.js';
import { decodeInitOut, unpackDirentsPlus } from '../../../lib/fuse/codec.js';
import { Init, Op } from '../../../lib/fuse/constants.js';
import { FsError } from '../../../lib/fs/errors.js';
import type { Attr, DirEntryPlus, Entry, FileTree, FsContext } from '../../../lib/fs/tree.js';
import { silentLogger } from '../../../lib/log.js';
import { F, corpus } from './frames.js';

const E = constants.errno;
const attr = (ino: number, mode = 0o100644): Attr => ({
  ino,
  size: 0,
  blocks: 0,
  atime: { sec: 1, nsec: 0 },
  mtime: { sec: 1, nsec: 0 },
  ctime: { sec: 1, nsec: 0 },
  mode,
  nlink: 1,
  uid: 0,
  gid: 0,
  rdev: 0,
  blksize: 4096,
});
const entry = (nodeId: number): Entry => ({ nodeId, generation: 0, attr: attr(nodeId) });

type Call = [string, ...unknown[]];

/**
 * A FileTree that records every call and answers from `impl` (or a plain default): the engine's
 * job is to turn frames into the right calls and results into the right bytes, which this checks
 * exactly. What a real tree does with them is the integration test's business (the kernel).
 */
function stubTree(impl: Partial<Record<keyof FileTree, (...a: any[]) => unknown>> = {}): FileTree & { calls: Call[] } {
  const calls: Call[] = [];
  const defaults: Record<string, (...a: any[]) => unknown> = {
    lookup: async () => entry(10),
    forget: () => undefined,
    getattr: async (_c, n: number) => ({ attr: attr(n) }),
    setattr: async (_c, n: number) => ({ attr: attr(n) }),
    readlink: async () => Buffer.from('target'),
    mknod: async () => entry(11),
    mkdir: async () => entry(12),
    symlink: async () => entry(13),
    link: async () => entry(14),
    open: async () => ({ fh: 3 }),
    create: async () => ({ entry: entry(15), open: { fh: 4, directIo: true } }),
    read: async (_c, _n, _f, _o, size: number) => Buffer.alloc(Math.min(size, 5), 0x61),
    write: async (_c, _n, _f, _o, d: Buffer) => d.length,
    opendir: async () => ({ fh: 5 }),
    readdir: async () => [],
    readdirplus: async () => [],
    statfs: async () => ({ blocks: 1, bfree: 1, bavail: 1, files: 1, ffree: 1, bsize: 4096, namelen: 255, frsize: 4096 }),
    getxattr: async () => Buffer.from('value'),
    listxattr: async () => Buffer.from('user.a\0user.b\0'),
    lseek: async () => 4096,
    copyFileRange: async (_c, _f, _t, len: number) => len,
    getlk: async () => ({ start: 0, end: 0, type: 2, pid: 0 }),
  };
  return new Proxy({ calls } as FileTree & { calls: Call[] }, {
    get(target, prop: string) {
      if (prop === 'calls') return calls;
      if (prop === 'then') return undefined;
      return (...args: unknown[]) => {
        calls.push([prop, ...args]);
        const f = impl[prop as keyof FileTree] ?? defaults[prop];
        return f ? f(...args) : prop === 'forget' ? undefined : Promise.resolve(undefined);
      };
    },
  });
}

interface Reply {
  len: number;
  error: number;
  unique: bigint;
  payload: Buffer;
  pieces: Buffer[];
}
function parse(pieces: Buffer[] | null): Reply {
  expect(pieces).not.toBeNull();
  const b = Buffer.concat(pieces!);
  const len = b.readUInt32LE(0);
  expect(len).toBe(b.length);
  return { len, error: b.readInt32LE(4), unique: b.readBigUInt64LE(8), payload: b.subarray(16), pieces: pieces! };
}

let u = 1000n;
const h = (nodeId = 1, uid = 1000) => ({ unique: u++, nodeId, uid, gid: 1000, pid: 7 });

async function started(tree: FileTree, opts: Partial<ConstructorParameters<typeof FuseEngine>[0]> = {}): Promise<FuseEngine> {
  const e = new FuseEngine({ tree, logger: silentLogger(), session: 's1', ...opts });
  const r = parse(await e.handle(F.init(h(), 38, (1n << 40n) - 1n)));
  expect(r.error).toBe(0);
  return e;
}

describe('FuseEngine', () => {
  it('answers EIO before INIT, negotiates flags, protocol and sizes at INIT', async () => {
    const tree = stubTree();
    const e = new FuseEngine({ tree, logger: silentLogger(), session: 's1', maxWrite: 512 * 1024 });
    expect(parse(await e.handle(F.getattr(h()))).error).toBe(-E.EIO);
    expect(tree.calls).toEqual([]);
    const offered = Init.ASYNC_READ | Init.POSIX_LOCKS | Init.WRITEBACK_CACHE | Init.POSIX_ACL | Init.MAX_PAGES | Init.SETXATTR_EXT | Init.INIT_EXT | Init.SECURITY_CTX | Init.HANDLE_KILLPRIV_V2 | Init.FLOCK_LOCKS | Init.DO_READDIRPLUS;
    const hdr = h();
    const r = parse(await e.handle(F.init(hdr, 36, offered)));
    expect(r.unique).toBe(hdr.unique);
    expect(r.error).toBe(0);
    const out = decodeInitOut(r.payload);
    expect(out.major).toBe(7);
    // Only what was offered and wanted: no writeback cache, no ACLs, no security contexts.
    expect(out.flags).toBe(offered & WANTED_FLAGS);
    expect(out.flags & Init.WRITEBACK_CACHE).toBe(0n);
    expect(out.flags & Init.SECURITY_CTX).toBe(0n);
    expect(out.maxWrite).toBe(512 * 1024);
    expect(out.maxPages).toBe(128);
    expect(e.negotiated).toMatchObject({ minor: 36, maxWrite: 512 * 1024 });
    expect(parse(await e.handle(F.getattr(h(5)))).error).toBe(0);
  });

  it('refuses old protocols, answers a newer major with its own', async () => {
    const e = new FuseEngine({ tree: stubTree(), logger: silentLogger(), session: 's' });
    expect(parse(await e.handle(F.init(h(), 30))).error).toBe(-E.EPROTO);
    const f = F.init(h());
    f.writeUInt32LE(6, 40);
    expect(parse(await e.handle(f)).error).toBe(-E.EPROTO);
    f.writeUInt32LE(8, 40);
    const r = parse(await e.handle(f));
    expect(decodeInitOut(r.payload).major).toBe(7);
    expect(e.negotiated).toBeUndefined();
    // Without MAX_PAGES the kernel sends at most 32 pages.
    parse(await e.handle(F.init(h(), 38, Init.ASYNC_READ)));
    expect(e.negotiated!.maxWrite).toBe(128 * 1024);
  });

  it('turns frames into tree calls: context, names, umask applied, fh and lock owners passed', async () => {
    const tree = stubTree();
    const e = await started(tree);
    tree.calls.length = 0;
    const lk = parse(await e.handle(F.lookup(h(1, 33), 'x')));
    expect(lk.payload.readBigUInt64LE(0)).toBe(10n);
    expect(lk.payload.length).toBe(128);
    await e.handle(F.mkdir(h(1), 'd', 0o777, 0o027));
    await e.handle(F.create(h(1), 'c', 0o100, 0o100666, 0o022));
    await e.handle(F.release(h(9), 4, 2, 77n));
    await e.handle(F.flush(h(9), 4, 78n));
    await e.handle(F.rename2(h(1), 'a', 6, 'b', 1));
    const ctx = (c: Call): FsContext => c[1] as FsContext;
    expect(tree.calls[0]).toEqual(['lookup', { uid: 33, gid: 1000, pid: 7, session: 's1' }, 1, Buffer.from('x')]);
    expect(tree.calls[1]!.slice(2)).toEqual([1, Buffer.from('d'), 0o750]);
    expect(ctx(tree.calls[1]!).umask).toBe(0o027);
    expect(tree.calls[2]!.slice(2)).toEqual([1, Buffer.from('c'), 0o100644, 0o100]);
    expect(tree.calls[3]!.slice(2)).toEqual([9, 4, 77n]);
    expect(tree.calls[4]!.slice(2)).toEqual([9, 4, 78n]);
    expect(tree.calls[5]!.slice(2)).toEqual([1, Buffer.from('a'), 6, Buffer.from('b'), 1]);
  });

  it('READ data and WRITE payloads pass by reference; KILL_SUIDGID writes drop the bits first', async () => {
    const data = Buffer.from('0123456789');
    let written: Buffer | undefined;
    const tree = stubTree({ read: async () => data, write: async (_c, _n, _f, _o, d: Buffer) => ((written = d), d.length) });
    const e = await started(tree);
    const r = parse(await e.handle(F.read(h(5), 3, 0, 4096)));
    expect(r.pieces[1]).toBe(data);
    // A tree that returns more than asked is cut to the size (never a longer reply).
    expect(parse(await e.handle(F.read(h(5), 3, 0, 4))).payload.toString()).toBe('0123');
    const frame = F.write(h(5), 3, 0, Buffer.from('abc'), 4);
    tree.calls.length = 0;
    const w = parse(await e.handle(frame));
    expect(w.payload.readUInt32LE(0)).toBe(3);
    expect(written!.buffer).toBe(frame.buffer);
    expect(tree.calls.map((c) => c[0])).toEqual(['setattr', 'write']);
    expect(tree.calls[0]![3]).toEqual({ killSuidGid: true });
  });

  it('errors: FsError -> -errno, an unexpected throw -> EIO and a log line, ENOSYS for the unknown', async () => {
    const lines: string[] = [];
    const logger = pino({ level: 'info' }, new Writable({ write: (c, _e, cb) => (lines.push(String(c)), cb()) }));
    const tree = stubTree({
      lookup: async () => {
        throw new FsError('ENOENT');
      },
      getattr: async () => {
        throw new TypeError('boom');
      },
      statfs: () => {
        throw new RangeError('sync throw');
      },
    });
    const e = new FuseEngine({ tree, logger, session: 's' });
    await e.handle(F.init(h()));
    expect(parse(await e.handle(F.lookup(h(), 'nope'))).error).toBe(-E.ENOENT);
    expect(parse(await e.handle(F.getattr(h()))).error).toBe(-E.EIO);
    expect(parse(await e.handle(F.statfs(h()))).error).toBe(-E.EIO);
    expect(lines.some((l) => l.includes('boom') && l.includes('unexpected'))).toBe(true);
    expect(parse(await e.handle(F.bmap(h()))).error).toBe(-E.ENOSYS);
    // A malformed body: answered with the decoder's errno; a broken header: no reply.
    expect(parse(await e.handle(F.mkdir(h(), 'a/b', 0o755, 0))).error).toBe(-E.EINVAL);
    expect(await e.handle(Buffer.alloc(20))).toBeNull();
  });

  it('getxattr / listxattr: size 0 asks the size, too small is ERANGE', async () => {
    const e = await started(stubTree());
    expect(parse(await e.handle(F.getxattr(h(5), 'user.a', 0))).payload.readUInt32LE(0)).toBe(5);
    expect(parse(await e.handle(F.getxattr(h(5), 'user.a', 4))).error).toBe(-E.ERANGE);
    expect(parse(await e.handle(F.getxattr(h(5), 'user.a', 5))).payload.toString()).toBe('value');
    expect(parse(await e.handle(F.listxattr(h(5), 0))).payload.readUInt32LE(0)).toBe(14);
    expect(parse(await e.handle(F.listxattr(h(5), 13))).error).toBe(-E.ERANGE);
    expect(parse(await e.handle(F.listxattr(h(5), 100))).payload.toString()).toBe('user.a\0user.b\0');
  });

  it('read-only: every change is EROFS before the tree sees it; reads pass', async () => {
    const tree = stubTree();
    const e = await started(tree, { readOnly: true });
    tree.calls.length = 0;
    for (const f of [
      F.mkdir(h(), 'd', 0o755, 0),
      F.create(h(), 'c', 0o101, 0o100644, 0),
      F.write(h(5), 3, 0, Buffer.from('x')),
      F.setattr(h(5), { valid: 8, size: 0 }),
      F.unlink(h(), 'f'),
      F.rename(h(), 'a', 1, 'b'),
      F.setxattr(h(5), 'user.a', Buffer.from('v'), 0),
      F.open(h(5), 2),
      F.open(h(5), 0o1000),
      F.fallocate(h(5), 3, 0, 1, 0),
      F.symlink(h(), 'l', 't'),
      F.link(h(), 5, 'l'),
    ]) {
      expect(parse(await e.handle(f)).error).toBe(-E.EROFS);
    }
    expect(tree.calls).toEqual([]);
    expect(parse(await e.handle(F.open(h(5), 0))).error).toBe(0);
    expect(parse(await e.handle(F.read(h(5), 3, 0, 10))).error).toBe(0);
  });

  it('READDIRPLUS: packs to the size and forgets the looked-up entries that did not fit', async () => {
    const many: DirEntryPlus[] = Array.from({ length: 30 }, (_, i) => ({ name: Buffer.from(`name-${i}`.padEnd(40, 'x')), ino: 100 + i, type: 8, offset: i + 1, entry: entry(100 + i) }));
    const tree = stubTree({ readdirplus: async () => many });
    const e = await started(tree);
    tree.calls.length = 0;
    const r = parse(await e.handle(F.read(h(1), 5, 0, 4096, Op.READDIRPLUS)));
    const got = unpackDirentsPlus(r.payload);
    expect(r.payload.length).toBeLessThanOrEqual(4096);
    expect(got.length).toBe(Math.floor(4096 / 192)); // 152 + 40 bytes each
    const asked = tree.calls.find((c) => c[0] === 'readdirplus')!;
    expect(asked[5]).toBe(Math.floor(4096 / 160));
    const forgotten = tree.calls.filter((c) => c[0] === 'forget').map((c) => c[1]);
    expect(forgotten).toEqual(many.slice(got.length).map((m) => m.entry!.nodeId));
  });

  it('INTERRUPT aborts a waiting SETLKW (EINTR); FORGET and INTERRUPT get no reply', async () => {
    const tree = stubTree({
      setlk: (_c, _n, _f, _o, _l, opts: { wait: boolean; signal?: AbortSignal }) =>
        new Promise<void>((resolve, reject) => {
          if (!opts.wait) return resolve();
          opts.signal!.addEventListener('abort', () => reject(new FsError('EINTR')));
        }),
    });
    const e = await started(tree, { maxInFlight: 1 });
    const hdr = h(5);
    const pending = e.handle(F.lk(Op.SETLKW, hdr, 3, 1n, 0, 10, 1, 7));
    await new Promise((r) => setImmediate(r));
    // The one slot is taken by the wait, and still INTERRUPT gets through.
    expect(e.saturated).toBe(true);
    expect(await e.handle(F.interrupt({ unique: u++ }, hdr.unique))).toBeNull();
    // A second SETLKW waits for the slot; interrupted there, it never reaches the tree.
    const hdr2 = h(5);
    const queued = e.handle(F.lk(Op.SETLKW, hdr2, 3, 2n, 0, 10, 1, 8));
    expect(await e.handle(F.interrupt({ unique: u++ }, hdr2.unique))).toBeNull();
    const r = parse(await pending);
    expect(r.unique).toBe(hdr.unique);
    expect(r.error).toBe(-E.EINTR);
    const r2 = parse(await queued);
    expect([r2.unique, r2.error]).toEqual([hdr2.unique, -E.EINTR]);
    expect(tree.calls.filter((c) => c[0] === 'setlk').length).toBe(1);
    expect(await e.handle(F.forget(h(5), 2))).toBeNull();
    expect(await e.handle(F.batchForget(h(), [[6, 1], [7, 3]]))).toBeNull();
    expect(tree.calls.filter((c) => c[0] === 'forget').map((c) => c.slice(1))).toEqual([[5, 2], [6, 1], [7, 3]]);
    expect(tree.calls.find((c) => c[0] === 'setlk')![6]).toMatchObject({ wait: true, flock: false });
  });

  it('bounds requests in flight; DESTROY and end() end the session once', async () => {
    const gates: (() => void)[] = [];
    const tree = stubTree({ getattr: (_c, n: number) => new Promise((r) => gates.push(() => r({ attr: attr(n) }))) });
    const e = await started(tree, { maxInFlight: 2 });
    const ps = [1, 2, 3].map(() => e.handle(F.getattr(h(5))));
    await new Promise((r) => setImmediate(r));
    expect(gates.length).toBe(2);
    expect(e.inFlight).toBe(2);
    gates.shift()!();
    await new Promise((r) => setImmediate(r));
    expect(gates.length).toBe(2);
    gates.splice(0).forEach((g) => g());
    for (const p of ps) expect(parse(await p).error).toBe(0);
    await e.drain();
    expect(parse(await e.handle(F.destroy(h()))).error).toBe(0);
    expect(parse(await e.handle(F.getattr(h(5)))).error).toBe(-E.EIO);
    await e.end();
    expect(tree.calls.filter((c) => c[0] === 'endSession')).toEqual([['endSession', 's1']]);
  });

  it('reset() (a virtio-fs device reset) ends the session; a new INIT starts another', async () => {
    const tree = stubTree();
    const e = await started(tree);
    e.reset();
    await new Promise((r) => setImmediate(r));
    expect(tree.calls.filter((c) => c[0] === 'endSession').length).toBe(1);
    expect(parse(await e.handle(F.getattr(h(5)))).error).toBe(-E.EIO);
    expect(parse(await e.handle(F.init(h()))).error).toBe(0);
    expect(parse(await e.handle(F.getattr(h(5)))).error).toBe(0);
    e.reset();
    await new Promise((r) => setImmediate(r));
    expect(tree.calls.filter((c) => c[0] === 'endSession').length).toBe(2);
  });

  it('end({drainMs}) lets running requests finish before the session is dropped', async () => {
    let finish!: () => void;
    const tree = stubTree({ read: () => new Promise((r) => (finish = () => r(Buffer.from('late')))) });
    const e = await started(tree);
    const reading = e.handle(F.read(h(5), 3, 0, 10));
    await new Promise((r) => setImmediate(r));
    const ending = e.end({ drainMs: 5000 });
    await new Promise((r) => setTimeout(r, 20));
    expect(tree.calls.some((c) => c[0] === 'endSession')).toBe(false);
    finish();
    expect(parse(await reading).payload.toString()).toBe('late');
    await ending;
    expect(tree.calls.at(-1)![0]).toBe('endSession');
  });

  it('fuzz: mutated frames never make handle() reject, and every reply is well formed for its unique', async () => {
    const e = await started(stubTree());
    const seeds = corpus();
    await fc.assert(
      fc.asyncProperty(
        fc.nat(seeds.length - 1),
        fc.array(fc.tuple(fc.nat(200), fc.integer({ min: 0, max: 255 })), { maxLength: 6 }),
        fc.integer({ min: -40, max: 40 }),
        async (i, flips, grow) => {
          let b = Buffer.from(seeds[i]!);
          b = grow >= 0 ? Buffer.concat([b, Buffer.alloc(grow)]) : b.subarray(0, Math.max(0, b.length + grow));
          for (const [p, v] of flips) if (p < b.length) b[p] = v;
          if (b.length >= 4) b.writeUInt32LE(b.length, 0);
          if (b.length >= 8 && b.readUInt32LE(4) === Op.INIT) return; // renegotiation is its own test
          const reply = await e.handle(b);
          if (reply) {
            const r = parse(reply);
            expect(r.unique).toBe(b.readBigUInt64LE(8));
            expect(r.error).toBeLessThanOrEqual(0);
          }
        },
      ),
      { numRuns: 3000 },
    );
  });
});
