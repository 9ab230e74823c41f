// RemoteFileTree against the node's directory RPC served in-process over LocalFileTree on a temp
// directory: every operation round trip (checked on the node's directory with Node's fs), errors
// across the wire, forged and foreign ids and handles, sessions ending with their connections,
// and a "node restart" under open handles.
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { FsError } from '../../../lib/fs/errors.js';
import type { RemoteFileTree } from '../../../lib/fs/remote.js';
import { SESSION_GONE } from '../../../lib/fs/remote-protocol.js';
import { F_RDLCK, F_UNLCK, F_WRLCK, RENAME_EXCHANGE, ROOT_ID } from '../../../lib/fs/tree.js';
import { RpcClient, RpcError } from '../../../lib/rpc/index.js';
import { O_APPEND, O_CREAT, O_RDONLY, O_RDWR, O_WRONLY, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG, b, ctx, errno, listAll, readFile, walk, writeFile } from './helpers.js';
import { remoteTree, startDirServer, type DirServer } from './remote-helpers.js';

const SHARE = '/projects/alpha';
const c = ctx('guest1', 0, 0);
const EOF_ = Number.MAX_SAFE_INTEGER;

let srv: DirServer;
let dir: string;
const cleanups: (() => Promise<unknown> | unknown)[] = [];

beforeEach(async () => {
  srv = await startDirServer();
  await srv.dirs.create(SHARE);
  dir = srv.shareDir(SHARE);
});
afterEach(async () => {
  for (const f of cleanups.splice(0).reverse()) await f();
  await srv.stop();
  fs.rmSync(srv.data, { recursive: true, force: true });
});

function tree(opts: Parameters<typeof remoteTree>[2] = {}): RemoteFileTree {
  const t = remoteTree(srv, SHARE, opts);
  cleanups.push(() => t.close());
  return t;
}

function rawClient(): RpcClient {
  const r = new RpcClient(`unix:${srv.socket}`, { timeoutMs: 5000 });
  cleanups.push(() => r.close());
  return r;
}

async function rpcErr(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    return (e as RpcError).code;
  }
  return 'OK';
}

describe('RemoteFileTree over the node directory RPC', () => {
  it('round trips every operation, and the node directory shows the results', async () => {
    const t = tree();
    // create / write / read / getattr
    const id = await writeFile(t, c, ROOT_ID, 'hello.txt', 'hello world');
    expect(fs.readFileSync(path.join(dir, 'hello.txt'), 'utf8')).toBe('hello world');
    expect((await readFile(t, c, id)).toString()).toBe('hello world');
    const e = await t.lookup(c, ROOT_ID, b('hello.txt'));
    expect(e.nodeId).toBe(id);
    expect(e.attr.size).toBe(11);
    expect(e.attr.mode & 0o170000).toBe(S_IFREG);
    expect(e.attr.ino).toBe(fs.statSync(path.join(dir, 'hello.txt')).ino);
    // binary names (not UTF-8) travel as bytes
    const odd = Buffer.from([0x66, 0xff, 0xfe, 0x01]);
    const oe = await t.create(c, ROOT_ID, odd, S_IFREG | 0o600, O_WRONLY | O_CREAT);
    await t.release(c, oe.entry.nodeId, oe.open.fh);
    expect(fs.readdirSync(dir, { encoding: 'buffer' }).some((n) => n.equals(odd))).toBe(true);
    // setattr: mode, size (truncate), times
    await t.setattr(c, id, { mode: 0o600 });
    expect(fs.statSync(path.join(dir, 'hello.txt')).mode & 0o777).toBe(0o600);
    const tr = await t.setattr(c, id, { size: 5, mtime: { sec: 1_000_000, nsec: 5 } });
    expect(tr.attr.size).toBe(5);
    expect(fs.readFileSync(path.join(dir, 'hello.txt'), 'utf8')).toBe('hello');
    expect(Math.floor(fs.statSync(path.join(dir, 'hello.txt')).mtimeMs)).toBe(1_000_000_000);
    // 1 MiB of binary data both ways, in one call each
    const big = Buffer.alloc(1 << 20);
    for (let i = 0; i < big.length; i++) big[i] = (i * 7 + 3) & 0xff;
    const bigId = await writeFile(t, c, ROOT_ID, 'big.bin', big);
    expect(fs.readFileSync(path.join(dir, 'big.bin')).equals(big)).toBe(true);
    expect((await readFile(t, c, bigId)).equals(big)).toBe(true);
    // O_APPEND
    const ap = await t.open(c, id, O_WRONLY | O_APPEND);
    await t.write(c, id, ap.fh, 0, b('!!'));
    await t.flush(c, id, ap.fh, 1n);
    await t.release(c, id, ap.fh);
    expect(fs.readFileSync(path.join(dir, 'hello.txt'), 'utf8')).toBe('hello!!');
    // mkdir / symlink / readlink / link / mknod(fifo)
    const sub = await t.mkdir(c, ROOT_ID, b('sub'), 0o750);
    expect(sub.attr.mode & 0o170000).toBe(S_IFDIR);
    expect(fs.statSync(path.join(dir, 'sub')).isDirectory()).toBe(true);
    const ln = await t.symlink(c, sub.nodeId, b('to-hello'), b('../hello.txt'));
    expect(ln.attr.mode & 0o170000).toBe(S_IFLNK);
    expect((await t.readlink(c, ln.nodeId)).toString()).toBe('../hello.txt');
    expect(fs.readlinkSync(path.join(dir, 'sub/to-hello'))).toBe('../hello.txt');
    const hl = await t.link(c, id, sub.nodeId, b('hard'));
    expect(hl.nodeId).toBe(id);
    expect(hl.attr.nlink).toBe(2);
    const fifo = await t.mknod(c, ROOT_ID, b('fifo'), S_IFIFO | 0o644, 0);
    expect(fs.statSync(path.join(dir, 'fifo')).isFIFO()).toBe(true);
    t.forget(fifo.nodeId, 1);
    // readdir / readdirplus (cookies continue a listing)
    expect((await listAll(t, c, ROOT_ID, 2)).filter((n) => !n.startsWith('.')).sort()).toEqual(['big.bin', 'f\ufffd\ufffd\u0001', 'fifo', 'hello.txt', 'sub'].sort());
    const dh = await t.opendir(c, sub.nodeId, 0);
    const plus = await t.readdirplus(c, sub.nodeId, dh.fh, 0, 100);
    const hard = plus.find((d) => d.name.toString() === 'hard');
    expect(hard?.entry?.nodeId).toBe(id);
    expect(hard?.entry?.attr.size).toBe(7);
    await t.fsyncdir(c, sub.nodeId, dh.fh, false);
    await t.releasedir(c, sub.nodeId, dh.fh);
    // rename, RENAME_EXCHANGE, unlink, rmdir
    await t.rename(c, sub.nodeId, b('hard'), ROOT_ID, b('moved'), 0);
    expect(fs.existsSync(path.join(dir, 'moved'))).toBe(true);
    await writeFile(t, c, ROOT_ID, 'x', 'X');
    await t.rename(c, ROOT_ID, b('x'), ROOT_ID, b('moved'), RENAME_EXCHANGE);
    expect(fs.readFileSync(path.join(dir, 'x'), 'utf8')).toBe('hello!!');
    expect(fs.readFileSync(path.join(dir, 'moved'), 'utf8')).toBe('X');
    expect(await errno(t.rmdir(c, ROOT_ID, b('sub')))).toBe('ENOTEMPTY');
    await t.unlink(c, sub.nodeId, b('to-hello'));
    await t.rmdir(c, ROOT_ID, b('sub'));
    expect(fs.existsSync(path.join(dir, 'sub'))).toBe(false);
    // statfs, access
    const sf = await t.statfs(c, ROOT_ID);
    expect(sf.bsize).toBeGreaterThan(0);
    expect(sf.blocks).toBeGreaterThan(0);
    await t.access(c, id, 4);
    // xattrs (user.* on the temp directory's filesystem)
    await t.setxattr(c, id, b('user.vstore'), b('v1'), 0);
    expect((await t.getxattr(c, id, b('user.vstore'))).toString()).toBe('v1');
    expect((await t.listxattr(c, id)).toString().split('\0')).toContain('user.vstore');
    await t.removexattr(c, id, b('user.vstore'));
    expect(await errno(t.getxattr(c, id, b('user.vstore')))).toBe('ENODATA');
    // fallocate (punch a hole), lseek SEEK_DATA/SEEK_HOLE, copy_file_range, fsync, syncfs
    const sp = await t.create(c, ROOT_ID, b('sparse'), S_IFREG | 0o644, O_RDWR);
    await t.write(c, sp.entry.nodeId, sp.open.fh, 1 << 20, b('tail'));
    expect(await t.lseek(c, sp.entry.nodeId, sp.open.fh, 0, 3)).toBe(1 << 20);
    expect(await t.lseek(c, sp.entry.nodeId, sp.open.fh, 0, 4)).toBe(0);
    await t.fallocate(c, sp.entry.nodeId, sp.open.fh, 0, 0, 4096);
    const src = await t.open(c, bigId, O_RDONLY);
    expect(await t.copyFileRange(c, { nodeId: bigId, fh: src.fh, offset: 0 }, { nodeId: sp.entry.nodeId, fh: sp.open.fh, offset: 0 }, 8192, 0)).toBe(8192);
    expect(fs.readFileSync(path.join(dir, 'sparse')).subarray(0, 8192).equals(big.subarray(0, 8192))).toBe(true);
    await t.fsync(c, sp.entry.nodeId, sp.open.fh, true);
    await t.syncfs(c);
    // locks: getlk sees nothing from our own owner; setlk then getlk by another owner
    await t.setlk(c, sp.entry.nodeId, sp.open.fh, 7n, { start: 0, end: 99, type: F_WRLCK, pid: 1 }, { wait: false, flock: false });
    const other = await t.getlk(c, sp.entry.nodeId, sp.open.fh, 8n, { start: 50, end: 60, type: F_RDLCK, pid: 2 });
    expect(other.type).toBe(F_WRLCK);
    await t.setlk(c, sp.entry.nodeId, sp.open.fh, 7n, { start: 0, end: EOF_, type: F_UNLCK, pid: 1 }, { wait: false, flock: false });
    expect((await t.getlk(c, sp.entry.nodeId, sp.open.fh, 8n, { start: 50, end: 60, type: F_RDLCK, pid: 2 })).type).toBe(F_UNLCK);
    await t.release(c, bigId, src.fh);
    await t.release(c, sp.entry.nodeId, sp.open.fh);
  });

  it('maps node errors to the same FsError codes', async () => {
    const t = tree();
    expect(await errno(t.lookup(c, ROOT_ID, b('missing')))).toBe('ENOENT');
    await writeFile(t, c, ROOT_ID, 'f', 'x');
    expect(await errno(t.mkdir(c, ROOT_ID, b('f'), 0o755))).toBe('EEXIST');
    const f = await walk(t, c, 'f');
    expect(await errno(t.lookup(c, f, b('x')))).toBe('ENOTDIR');
    expect(await errno(t.mkdir(c, ROOT_ID, b('a/b'), 0o755))).toBe('EINVAL');
    const err = await t.lookup(c, ROOT_ID, b('missing')).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FsError);
    expect((err as FsError).errno).toBe(2);
  });

  it('refuses ids and handles the session was not given: forged, foreign, old session', async () => {
    const t1 = tree();
    const id = await writeFile(t1, c, ROOT_ID, 'secret', 'top secret');
    const r = rawClient();
    const { sid } = await r.call<{ sid: string }>('fs.attach', { path: SHARE });
    const rc = { u: 0, g: 0, p: 1 };
    // This session never looked anything up: every id but the root is unknown to it.
    for (const n of [2, 3, 4, 5, 100, 2 ** 40, -1]) {
      expect(await rpcErr(r.call('fs.getattr', { s: sid, c: rc, n }))).toBe('ENOENT');
    }
    const e = await r.call<{ nodeId: number }>('fs.lookup', { s: sid, c: rc, p: ROOT_ID, name: b('secret') });
    // Handles it was not given (t1 has some open right now) answer EBADF, whatever their number.
    const h1 = await t1.open(c, id, O_RDONLY);
    for (const fh of [0, 1, 2, 3, 10, 99]) {
      expect(await rpcErr(r.call('fs.read', { s: sid, c: rc, n: e.nodeId, fh, off: 0, size: 10 }))).toBe('EBADF');
    }
    const mine = await r.call<{ fh: number }>('fs.open', { s: sid, c: rc, n: e.nodeId, flags: O_RDONLY });
    expect(Buffer.from(await r.call<Buffer>('fs.read', { s: sid, c: rc, n: e.nodeId, fh: mine.fh, off: 0, size: 3 })).toString()).toBe('top');
    // A file handle is not a directory handle.
    expect(await rpcErr(r.call('fs.readdir', { s: sid, c: rc, n: e.nodeId, fh: mine.fh, off: 0, max: 10 }))).toBe('EBADF');
    // A wrong or missing sid is never executed.
    expect(await rpcErr(r.call('fs.getattr', { s: 'f00', c: rc, n: ROOT_ID }))).toBe(SESSION_GONE);
    expect(await rpcErr(r.call('fs.unlink', { c: rc, p: ROOT_ID, name: b('secret') }))).toBe(SESSION_GONE);
    expect(fs.existsSync(path.join(dir, 'secret'))).toBe(true);
    // A new connection gets a new session: the old one's ids and handles mean nothing there.
    const r2 = rawClient();
    const s2 = await r2.call<{ sid: string }>('fs.attach', { path: SHARE });
    expect(await rpcErr(r2.call('fs.getattr', { s: s2.sid, c: rc, n: e.nodeId }))).toBe('ENOENT');
    expect(await rpcErr(r2.call('fs.getattr', { s: sid, c: rc, n: e.nodeId }))).toBe(SESSION_GONE);
    // Bad params are refused at the edge.
    expect(await rpcErr(r.call('fs.lookup', { s: sid, c: rc, p: ROOT_ID, name: 'not-binary' }))).toBe('EINVAL');
    expect(await rpcErr(r.call('fs.lookup', { s: sid, c: { u: -1, g: 0, p: 0 }, p: ROOT_ID, name: b('x') }))).toBe('EINVAL');
    expect(await rpcErr(r.call('fs.read', { s: sid, c: rc, n: e.nodeId, fh: mine.fh, off: 0, size: 1e12 }))).toBe('EINVAL');
    // Shares that do not exist, and paths that are not share names.
    expect(await rpcErr(r.call('fs.attach', { path: '/nope' }))).toBe('ENOENT');
    for (const p of ['/../etc', '/projects/../..', 'relative', '/a//b', '/a/b/', '/']) {
      expect(await rpcErr(r.call('fs.attach', { path: p }))).toBe('EINVAL');
      expect(await rpcErr(r.call('dir.create', { path: p }))).toBe('EINVAL');
    }
    await t1.release(c, id, h1.fh);
  });

  it('stays inside the share: "..", names with "/", symlinks out', async () => {
    const outside = path.join(srv.data, 'canary');
    fs.writeFileSync(outside, 'canary');
    const t = tree();
    // ".." at the root of the share is the root itself.
    const up = await t.lookup(c, ROOT_ID, b('..')).catch((e: unknown) => e);
    if (!(up instanceof FsError)) expect((up as { nodeId: number }).nodeId).toBe(ROOT_ID);
    for (const bad of ['../canary', '../../canary', 'a/../../canary']) {
      expect(await errno(t.lookup(c, ROOT_ID, b(bad)))).toBe('EINVAL');
      expect(await errno(t.create(c, ROOT_ID, b(bad), S_IFREG | 0o644, O_WRONLY))).toBe('EINVAL');
    }
    // Symlinks are stored, never followed by the tree.
    const abs = await t.symlink(c, ROOT_ID, b('abs'), b(outside));
    const rel = await t.symlink(c, ROOT_ID, b('rel'), b('../../../canary'));
    for (const l of [abs, rel]) {
      expect(['ELOOP', 'ENOTDIR', 'EINVAL']).toContain(await errno(t.open(c, l.nodeId, O_RDWR)));
      expect(await errno(t.lookup(c, l.nodeId, b('x')))).toBe('ENOTDIR');
      expect(await errno(t.create(c, l.nodeId, b('x'), S_IFREG | 0o644, O_WRONLY))).toBe('ENOTDIR');
    }
    expect(await errno(t.setattr(c, abs.nodeId, { size: 0 }))).not.toBe('OK');
    // A symlinked directory planted on the node between shares is refused by dir.create.
    fs.symlinkSync(path.dirname(outside), path.join(srv.data, 'dirs', 'evil'));
    await expect(srv.dirs.create('/evil/inside')).rejects.toMatchObject({ code: 'ELOOP' });
    expect(fs.existsSync(path.join(srv.data, 'inside'))).toBe(false);
    expect(fs.readFileSync(outside, 'utf8')).toBe('canary');
  });

  it('ends the session with the connection: its locks go, another host then gets the lock', async () => {
    const t1 = tree();
    const t2 = tree();
    const id = await writeFile(t1, c, ROOT_ID, 'locked', 'data');
    const h1 = await t1.open(c, id, O_RDWR);
    await t1.setlk(c, id, h1.fh, 1n, { start: 0, end: EOF_, type: F_WRLCK, pid: 11 }, { wait: false, flock: false });
    const id2 = await walk(t2, c, 'locked');
    const h2 = await t2.open(c, id2, O_RDWR);
    const lk = { start: 0, end: 10, type: F_WRLCK, pid: 22 };
    expect(await errno(t2.setlk(c, id2, h2.fh, 2n, lk, { wait: false, flock: false }))).toBe('EAGAIN');
    // A waiter on the node is woken when the holder's connection ends.
    const waiting = t2.setlk(c, id2, h2.fh, 2n, lk, { wait: true, flock: false });
    await new Promise((r) => setTimeout(r, 100));
    await t1.close();
    await waiting;
    expect((await t2.getlk(c, id2, h2.fh, 3n, lk)).type).toBe(F_WRLCK);
    await t2.release(c, id2, h2.fh);
  });

  it('a waiting lock is interrupted by its AbortSignal (EINTR)', async () => {
    const t1 = tree();
    const t2 = tree();
    const id = await writeFile(t1, c, ROOT_ID, 'l', 'x');
    const h1 = await t1.open(c, id, O_RDWR);
    await t1.setlk(c, id, h1.fh, 1n, { start: 0, end: EOF_, type: F_WRLCK, pid: 1 }, { wait: false, flock: true });
    const id2 = await walk(t2, c, 'l');
    const h2 = await t2.open(c, id2, O_RDWR);
    const ac = new AbortController();
    const p = t2.setlk(c, id2, h2.fh, 2n, { start: 0, end: EOF_, type: F_WRLCK, pid: 2 }, { wait: true, flock: true, signal: ac.signal });
    setTimeout(() => ac.abort(), 100);
    expect(await errno(p)).toBe('EINTR');
    await t1.release(c, id, h1.fh, 1n);
    await t2.release(c, id2, h2.fh);
  });

  it('host sessions sharing one tree keep their POSIX locks apart; endSession unlocks and releases only its own', async () => {
    const t = tree();
    const g1 = ctx('guest-a');
    const g2 = ctx('guest-b');
    const id = await writeFile(t, g1, ROOT_ID, 'f', 'x');
    const a = await t.open(g1, id, O_RDWR);
    const bb = await t.open(g2, id, O_RDWR);
    const lk = { start: 0, end: 9, type: F_WRLCK, pid: 1 };
    // Equal owner values from two guests are two owners on the node.
    await t.setlk(g1, id, a.fh, 42n, lk, { wait: false, flock: false });
    expect(await errno(t.setlk(g2, id, bb.fh, 42n, lk, { wait: false, flock: false }))).toBe('EAGAIN');
    await t.endSession('guest-a');
    expect(await errno(t.read(g1, id, a.fh, 0, 1))).toBe('EBADF');
    await t.setlk(g2, id, bb.fh, 42n, lk, { wait: false, flock: false });
    expect((await t.read(g2, id, bb.fh, 0, 1)).toString()).toBe('x');
    await t.release(g2, id, bb.fh);
  });

  it('a read-only attach refuses every mutation on the node (EROFS)', async () => {
    await writeFile(tree(), c, ROOT_ID, 'f', 'x');
    const t = tree({ readOnly: true });
    const id = await walk(t, c, 'f');
    expect(await errno(t.open(c, id, O_RDWR))).toBe('EROFS');
    expect(await errno(t.create(c, ROOT_ID, b('g'), S_IFREG | 0o644, O_WRONLY))).toBe('EROFS');
    expect(await errno(t.unlink(c, ROOT_ID, b('f')))).toBe('EROFS');
    expect(await errno(t.setattr(c, id, { size: 0 }))).toBe('EROFS');
    expect((await readFile(t, c, id)).toString()).toBe('x');
  });

  it('survives a node restart: ids re-resolved by path, handles re-opened, in-flight calls fail', async () => {
    const t = tree();
    const sub = await t.mkdir(c, ROOT_ID, b('d'), 0o755);
    const id = await writeFile(t, c, sub.nodeId, 'f', 'before');
    const h = await t.open(c, id, O_RDWR);
    const dh = await t.opendir(c, sub.nodeId, 0);
    await t.rename(c, sub.nodeId, b('f'), sub.nodeId, b('g'), 0); // the tree follows its own renames
    expect(t.sessions).toBe(1);
    await srv.stop();
    // Down: a call waits for the node (reconnectTimeoutMs), then goes on once it is back.
    const pending = t.getattr(c, id);
    await new Promise((r) => setTimeout(r, 300));
    await srv.start();
    expect((await pending).attr.size).toBe(6);
    expect(t.sessions).toBe(2);
    // The open handle was re-opened with its flags: write and read through it.
    await t.write(c, id, h.fh, 0, b('AFTER!'));
    expect((await t.read(c, id, h.fh, 0, 100)).toString()).toBe('AFTER!');
    expect(fs.readFileSync(path.join(dir, 'd/g'), 'utf8')).toBe('AFTER!');
    expect((await t.readdir(c, sub.nodeId, dh.fh, 0, 10)).map((d) => d.name.toString())).toContain('g');
    // Something removed behind our back while the node was away is stale, not another file.
    const gone = await writeFile(t, c, ROOT_ID, 'gone', 'x');
    const replaced = await writeFile(t, c, ROOT_ID, 'replaced', 'old');
    await srv.stop();
    fs.rmSync(path.join(dir, 'gone'));
    fs.writeFileSync(path.join(dir, 'replaced.new'), 'new file');
    fs.renameSync(path.join(dir, 'replaced.new'), path.join(dir, 'replaced'));
    await srv.start();
    expect(await errno(t.getattr(c, gone))).toBe('ESTALE');
    expect(await errno(t.getattr(c, replaced))).toBe('ESTALE');
    expect((await t.lookup(c, ROOT_ID, b('replaced'))).attr.size).toBe(8);
    expect((await t.read(c, id, h.fh, 0, 100)).toString()).toBe('AFTER!');
    // A call in flight when the connection drops fails with EIO (nobody knows if it was done).
    const slow = t.setlk(c, id, h.fh, 5n, { start: 0, end: 1, type: F_WRLCK, pid: 1 }, { wait: false, flock: false });
    const t2 = tree();
    const id2 = await walk(t2, c, 'd/g');
    const h2 = await t2.open(c, id2, O_RDWR);
    await slow;
    const blocked = errno(t2.setlk(c, id2, h2.fh, 6n, { start: 0, end: 1, type: F_WRLCK, pid: 2 }, { wait: true, flock: false }));
    await new Promise((r) => setTimeout(r, 100));
    await srv.stop();
    expect(await blocked).toBe('EIO');
    await srv.start();
    expect((await t2.read(c, id2, h2.fh, 0, 5)).toString()).toBe('AFTER');
    await t.release(c, id, h.fh);
    await t.releasedir(c, sub.nodeId, dh.fh);
    await t2.release(c, id2, h2.fh);
  });

  it('fails with EIO when the node does not come back in time', async () => {
    const t = tree({ reconnectTimeoutMs: 300 });
    await t.connect();
    await srv.stop();
    const t0 = Date.now();
    expect(await errno(t.getattr(c, ROOT_ID))).toBe('EIO');
    expect(Date.now() - t0).toBeLessThan(5000);
    await srv.start();
    expect((await t.getattr(c, ROOT_ID)).attr.mode & 0o170000).toBe(S_IFDIR);
  });

  it('forget gives the node its lookups back (the node drops the id)', async () => {
    const t = tree();
    await writeFile(t, c, ROOT_ID, 'f', 'x');
    const e1 = await t.lookup(c, ROOT_ID, b('f'));
    const e2 = await t.lookup(c, ROOT_ID, b('f'));
    expect(e2.nodeId).toBe(e1.nodeId);
    t.forget(e1.nodeId, 2);
    // writeFile's create counted a lookup too
    expect((await t.getattr(c, e1.nodeId)).attr.size).toBe(1);
    t.forget(e1.nodeId, 1);
    expect(await errno(t.getattr(c, e1.nodeId))).toBe('ENOENT');
  });
});
