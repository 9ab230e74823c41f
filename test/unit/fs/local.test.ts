// LocalFileTree: POSIX semantics through the FileTree API on a real directory, checked against
// what the host sees with Node's own fs.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { LocalFileTree } from '../../../lib/fs/local.js';
import { F_RDLCK, F_UNLCK, F_WRLCK, RENAME_EXCHANGE, RENAME_NOREPLACE, ROOT_ID } from '../../../lib/fs/tree.js';
import { LOCK_EOF } from '../../../lib/fs/locks.js';
import {
  O_APPEND, O_CREAT, O_EXCL, O_RDONLY, O_RDWR, O_TRUNC, O_WRONLY, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG,
  b, ctx, errno, listAll, readFile, walk, writeFile,
} from './helpers.js';

describe('LocalFileTree: POSIX semantics', () => {
  let dir: string;
  let tree: LocalFileTree;
  const c = ctx();

  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vstore-fs-'));
    tree = await LocalFileTree.open(dir);
  });
  afterEach(async () => {
    await tree.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('creates, reads and writes files the host sees', async () => {
    const id = await writeFile(tree, c, ROOT_ID, 'hello', 'hello world');
    expect(fs.readFileSync(path.join(dir, 'hello'), 'utf8')).toBe('hello world');
    expect((await readFile(tree, c, id)).toString()).toBe('hello world');
    const e = await tree.lookup(c, ROOT_ID, b('hello'));
    expect(e.nodeId).toBe(id);
    expect(e.attr.size).toBe(11);
    expect(e.attr.mode & 0o170000).toBe(S_IFREG);
    expect(e.attr.ino).toBe(fs.statSync(path.join(dir, 'hello')).ino);
    expect(await errno(tree.lookup(c, ROOT_ID, b('nope')))).toBe('ENOENT');
    // O_EXCL on an existing name.
    expect(await errno(tree.create(c, ROOT_ID, b('hello'), S_IFREG | 0o644, O_RDWR | O_EXCL))).toBe('EEXIST');
  });

  it('rename over an existing file, RENAME_NOREPLACE and RENAME_EXCHANGE', async () => {
    await writeFile(tree, c, ROOT_ID, 'a', 'AAA');
    await writeFile(tree, c, ROOT_ID, 'b', 'BBB');
    await tree.rename(c, ROOT_ID, b('a'), ROOT_ID, b('b'), 0);
    expect(fs.existsSync(path.join(dir, 'a'))).toBe(false);
    expect(fs.readFileSync(path.join(dir, 'b'), 'utf8')).toBe('AAA');

    await writeFile(tree, c, ROOT_ID, 'c', 'CCC');
    expect(await errno(tree.rename(c, ROOT_ID, b('c'), ROOT_ID, b('b'), RENAME_NOREPLACE))).toBe('EEXIST');
    expect(fs.readFileSync(path.join(dir, 'b'), 'utf8')).toBe('AAA');
    await tree.rename(c, ROOT_ID, b('c'), ROOT_ID, b('d'), RENAME_NOREPLACE);
    expect(fs.readFileSync(path.join(dir, 'd'), 'utf8')).toBe('CCC');

    const sub = (await tree.mkdir(c, ROOT_ID, b('sub'), 0o755)).nodeId;
    await writeFile(tree, c, sub, 'x', 'XXX');
    await tree.rename(c, ROOT_ID, b('d'), sub, b('x'), RENAME_EXCHANGE);
    expect(fs.readFileSync(path.join(dir, 'd'), 'utf8')).toBe('XXX');
    expect(fs.readFileSync(path.join(dir, 'sub/x'), 'utf8')).toBe('CCC');
    expect(await errno(tree.rename(c, ROOT_ID, b('zz'), ROOT_ID, b('d'), RENAME_EXCHANGE))).toBe('ENOENT');
    expect(await errno(tree.rename(c, ROOT_ID, b('d'), ROOT_ID, b('e'), 3))).toBe('EINVAL');
    // A directory over a non-empty directory.
    await tree.mkdir(c, ROOT_ID, b('sub2'), 0o755);
    expect(await errno(tree.rename(c, ROOT_ID, b('sub2'), ROOT_ID, b('sub'), 0))).toBe('ENOTEMPTY');
  });

  it('an unlinked open file stays readable and writable through its handle', async () => {
    const id = await writeFile(tree, c, ROOT_ID, 'gone', 'still here');
    const { fh } = await tree.open(c, id, O_RDWR);
    await tree.unlink(c, ROOT_ID, b('gone'));
    expect(fs.existsSync(path.join(dir, 'gone'))).toBe(false);
    expect(await errno(tree.lookup(c, ROOT_ID, b('gone')))).toBe('ENOENT');
    expect((await tree.read(c, id, fh, 0, 100)).toString()).toBe('still here');
    await tree.write(c, id, fh, 0, b('STILL'));
    expect((await tree.read(c, id, fh, 0, 100)).toString()).toBe('STILL here');
    expect((await tree.getattr(c, id, fh)).attr.nlink).toBe(0);
    await tree.release(c, id, fh);
    expect(await errno(tree.read(c, id, fh, 0, 1))).toBe('EBADF');
  });

  it('hard links share the inode and count nlink', async () => {
    const id = await writeFile(tree, c, ROOT_ID, 'orig', 'data');
    const sub = (await tree.mkdir(c, ROOT_ID, b('d'), 0o755)).nodeId;
    const e = await tree.link(c, id, sub, b('alias'));
    expect(e.nodeId).toBe(id);
    expect(e.attr.nlink).toBe(2);
    expect(fs.statSync(path.join(dir, 'd/alias')).ino).toBe(fs.statSync(path.join(dir, 'orig')).ino);
    await tree.unlink(c, ROOT_ID, b('orig'));
    expect((await tree.getattr(c, id)).attr.nlink).toBe(1);
    expect(fs.readFileSync(path.join(dir, 'd/alias'), 'utf8')).toBe('data');
    expect(await errno(tree.link(c, sub, ROOT_ID, b('dirlink')))).toBe('EPERM');
    expect(await errno(tree.link(c, id, sub, b('alias')))).toBe('EEXIST');
  });

  it('O_APPEND appends whatever the offset, O_TRUNC empties', async () => {
    const id = await writeFile(tree, c, ROOT_ID, 'log', '0123');
    const { fh } = await tree.open(c, id, O_WRONLY | O_APPEND);
    await tree.write(c, id, fh, 0, b('ab'));
    await tree.write(c, id, fh, 1, b('cd'));
    await tree.release(c, id, fh);
    expect(fs.readFileSync(path.join(dir, 'log'), 'utf8')).toBe('0123abcd');
    const t = await tree.open(c, id, O_WRONLY | O_TRUNC);
    expect(fs.statSync(path.join(dir, 'log')).size).toBe(0);
    // A read on a write-only handle is refused.
    expect(await errno(tree.read(c, id, t.fh, 0, 1))).toBe('EBADF');
    await tree.release(c, id, t.fh);
  });

  it('truncate through setattr (node and handle), sparse files and SEEK_DATA / SEEK_HOLE', async () => {
    const id = await writeFile(tree, c, ROOT_ID, 'sparse', 'x');
    const MiB = 1 << 20;
    let { attr } = await tree.setattr(c, id, { size: 8 * MiB });
    expect(attr.size).toBe(8 * MiB);
    expect(fs.statSync(path.join(dir, 'sparse')).size).toBe(8 * MiB);
    const { fh } = await tree.open(c, id, O_RDWR);
    await tree.write(c, id, fh, 4 * MiB, Buffer.alloc(64 * 1024, 7));
    expect(await tree.lseek(c, id, fh, 1, 3)).toBe(1); // SEEK_DATA inside the first block's data
    expect(await tree.lseek(c, id, fh, 64 * 1024, 3)).toBe(4 * MiB);
    expect(await tree.lseek(c, id, fh, 4 * MiB, 4)).toBe(4 * MiB + 64 * 1024); // SEEK_HOLE
    expect(await errno(tree.lseek(c, id, fh, 5 * MiB, 3))).toBe('ENXIO');
    expect(fs.statSync(path.join(dir, 'sparse')).blocks * 512).toBeLessThan(MiB);
    // Punch the data out again (PUNCH_HOLE | KEEP_SIZE).
    await tree.fallocate(c, id, fh, 0x02 | 0x01, 4 * MiB, 64 * 1024);
    expect(await errno(tree.lseek(c, id, fh, 64 * 1024, 3))).toBe('ENXIO');
    // Preallocate past the end (mode 0 grows the file).
    await tree.fallocate(c, id, fh, 0, 8 * MiB, MiB);
    expect(fs.statSync(path.join(dir, 'sparse')).size).toBe(9 * MiB);
    ({ attr } = await tree.setattr(c, id, { size: 10 }, fh));
    expect(attr.size).toBe(10);
    expect(fs.statSync(path.join(dir, 'sparse')).size).toBe(10);
    await tree.release(c, id, fh);
    const d = (await tree.mkdir(c, ROOT_ID, b('dd'), 0o755)).nodeId;
    expect(await errno(tree.setattr(c, d, { size: 0 }))).toBe('EISDIR');
  });

  it('copy_file_range between two handles', async () => {
    const a = await writeFile(tree, c, ROOT_ID, 'src', 'abcdefghij');
    const bId = await writeFile(tree, c, ROOT_ID, 'dst', '');
    const ha = await tree.open(c, a, O_RDONLY);
    const hb = await tree.open(c, bId, O_WRONLY);
    expect(await tree.copyFileRange(c, { nodeId: a, fh: ha.fh, offset: 2 }, { nodeId: bId, fh: hb.fh, offset: 3 }, 5, 0)).toBe(5);
    expect(fs.readFileSync(path.join(dir, 'dst'))).toEqual(Buffer.from('\0\0\0cdefg'));
    expect(await errno(tree.copyFileRange(c, { nodeId: bId, fh: hb.fh, offset: 0 }, { nodeId: a, fh: ha.fh, offset: 0 }, 1, 0))).toBe('EBADF');
    await tree.release(c, a, ha.fh);
    await tree.release(c, bId, hb.fh);
  });

  it('mode bits, ownership, umask and timestamps', async () => {
    const u = { ...ctx('s1', 1000, 1000), umask: 0o027 };
    const e = await tree.create(u, ROOT_ID, b('f'), S_IFREG | 0o666, O_RDWR);
    await tree.release(u, e.entry.nodeId, e.open.fh);
    let st = fs.statSync(path.join(dir, 'f'));
    expect(st.mode & 0o7777).toBe(0o640);
    expect([st.uid, st.gid]).toEqual([1000, 1000]);
    // The daemon's umask (022) does not leak into the result.
    const d = await tree.mkdir({ ...u, umask: 0 }, ROOT_ID, b('d'), 0o777);
    expect(fs.statSync(path.join(dir, 'd')).mode & 0o7777).toBe(0o777);
    expect(d.attr.uid).toBe(1000);
    const sl = await tree.symlink(u, ROOT_ID, b('l'), b('f'));
    expect(fs.lstatSync(path.join(dir, 'l')).uid).toBe(1000);
    expect(sl.attr.mode & 0o170000).toBe(S_IFLNK);
    expect((await tree.readlink(u, sl.nodeId)).toString()).toBe('f');
    expect(await errno(tree.readlink(u, e.entry.nodeId))).toBe('EINVAL');

    await tree.setattr(c, e.entry.nodeId, { mode: 0o4755, uid: 5, gid: 6 });
    st = fs.statSync(path.join(dir, 'f'));
    expect([st.mode & 0o7777, st.uid, st.gid]).toEqual([0o4755, 5, 6]);
    const { attr } = await tree.setattr(c, e.entry.nodeId, { killSuidGid: true });
    expect(attr.mode & 0o7777).toBe(0o755);

    await tree.setattr(c, e.entry.nodeId, { atime: { sec: 1000, nsec: 5 }, mtime: { sec: 2000, nsec: 123456789 } });
    const ns = fs.statSync(path.join(dir, 'f'), { bigint: true });
    expect(ns.atimeNs).toBe(1000_000_000_005n);
    expect(ns.mtimeNs).toBe(2000_123_456_789n);
    const before = Date.now() / 1000 - 5;
    const r = await tree.setattr(c, e.entry.nodeId, { mtime: 'now' });
    expect(r.attr.mtime.sec).toBeGreaterThan(before);
    expect(r.attr.atime.sec).toBe(1000); // untouched
    // setgid directory: new entries take its group, new directories inherit S_ISGID.
    fs.chownSync(path.join(dir, 'd'), 0, 77);
    fs.chmodSync(path.join(dir, 'd'), 0o2777);
    const sd = await tree.mkdir({ ...u, umask: 0 }, d.nodeId, b('inner'), 0o755);
    expect(sd.attr.gid).toBe(77);
    expect(sd.attr.mode & 0o7777).toBe(0o2755);
    // mknod: fifo yes, device no (default).
    const fifo = await tree.mknod(u, ROOT_ID, b('fifo'), S_IFIFO | 0o600, 0);
    expect(fs.statSync(path.join(dir, 'fifo')).isFIFO()).toBe(true);
    expect(await errno(tree.open(u, fifo.nodeId, O_RDONLY))).toBe('ENXIO');
    expect(await errno(tree.mknod(c, ROOT_ID, b('null'), S_IFCHR | 0o666, (1 << 8) | 3))).toBe('EPERM');
    expect(fs.existsSync(path.join(dir, 'null'))).toBe(false);
    // create (without O_EXCL) over an existing FIFO neither blocks nor opens it.
    expect(await errno(tree.create(u, ROOT_ID, b('fifo'), S_IFREG | 0o644, O_RDONLY))).toBe('ENXIO');
    expect(await errno(tree.create(u, ROOT_ID, b('d'), S_IFREG | 0o644, O_RDONLY))).toBe('EISDIR');
    const reg = await tree.mknod(u, ROOT_ID, b('reg'), S_IFREG | 0o600, 0);
    expect(reg.attr.mode).toBe(S_IFREG | 0o600);
  });

  it('device nodes only with allowDevices, owned by the caller, never opened', async () => {
    const t = await LocalFileTree.open(dir, { allowDevices: true });
    try {
      const u = ctx('dev', 1000, 1000);
      const e = await t.mknod(u, ROOT_ID, b('null'), S_IFCHR | 0o666, (1 << 8) | 3);
      const st = fs.statSync(path.join(dir, 'null'));
      expect(st.isCharacterDevice()).toBe(true);
      expect([st.rdev, st.uid, e.attr.rdev]).toEqual([(1 << 8) | 3, 1000, (1 << 8) | 3]);
      expect(await errno(t.open(u, e.nodeId, O_RDWR))).toBe('ENXIO');
    } finally {
      await t.close();
    }
  });

  it('access checks mode bits of the guest view', async () => {
    const id = await writeFile(tree, c, ROOT_ID, 'f', 'x', 0o640);
    fs.chownSync(path.join(dir, 'f'), 1000, 2000);
    expect(await errno(tree.access(ctx('s1', 1000, 1), id, 6))).toBe('OK');
    expect(await errno(tree.access(ctx('s1', 1000, 1), id, 1))).toBe('EACCES');
    expect(await errno(tree.access(ctx('s1', 5, 2000), id, 4))).toBe('OK');
    expect(await errno(tree.access(ctx('s1', 5, 2000), id, 2))).toBe('EACCES');
    expect(await errno(tree.access(ctx('s1', 5, 5), id, 4))).toBe('EACCES');
    expect(await errno(tree.access(c, id, 6))).toBe('OK');
  });

  it('user.* xattrs: set, get, list, remove, create/replace flags', async () => {
    const id = await writeFile(tree, c, ROOT_ID, 'x', '');
    await tree.setxattr(c, id, b('user.a'), b('one'), 0);
    await tree.setxattr(c, id, b('user.b'), Buffer.alloc(3000, 1), 0);
    expect((await tree.getxattr(c, id, b('user.a'))).toString()).toBe('one');
    expect((await tree.getxattr(c, id, b('user.b'))).length).toBe(3000);
    const names = (await tree.listxattr(c, id)).toString().split('\0').filter(Boolean).sort();
    expect(names).toEqual(['user.a', 'user.b']);
    expect(await errno(tree.setxattr(c, id, b('user.a'), b('x'), 1))).toBe('EEXIST');
    expect(await errno(tree.setxattr(c, id, b('user.c'), b('x'), 2))).toBe('ENODATA');
    await tree.removexattr(c, id, b('user.a'));
    expect(await errno(tree.getxattr(c, id, b('user.a')))).toBe('ENODATA');
    expect(await errno(tree.getxattr(c, id, b('user.a\0evil')))).toBe('EINVAL');
    const d = (await tree.mkdir(c, ROOT_ID, b('d'), 0o755)).nodeId;
    await tree.setxattr(c, d, b('user.dir'), b('v'), 0);
    expect((await tree.getxattr(c, d, b('user.dir'))).toString()).toBe('v');
  });

  it('statfs, fsync, fsyncdir, syncfs', async () => {
    const s = await tree.statfs(c, ROOT_ID);
    const host = fs.statfsSync(dir);
    expect(s.blocks).toBe(host.blocks);
    expect(s.namelen).toBe(255);
    const id = await writeFile(tree, c, ROOT_ID, 'f', 'x');
    const { fh } = await tree.open(c, id, O_RDWR);
    await tree.fsync(c, id, fh, true);
    await tree.fsync(c, id, fh, false);
    await tree.release(c, id, fh);
    const dh = await tree.opendir(c, ROOT_ID, 0);
    await tree.fsyncdir(c, ROOT_ID, dh.fh, false);
    await tree.releasedir(c, ROOT_ID, dh.fh);
    await tree.syncfs(c);
  });

  it('rmdir and unlink errors', async () => {
    const d = (await tree.mkdir(c, ROOT_ID, b('d'), 0o755)).nodeId;
    await writeFile(tree, c, d, 'f', '');
    expect(await errno(tree.rmdir(c, ROOT_ID, b('d')))).toBe('ENOTEMPTY');
    expect(await errno(tree.unlink(c, ROOT_ID, b('d')))).toBe('EISDIR');
    expect(await errno(tree.rmdir(c, d, b('f')))).toBe('ENOTDIR');
    await tree.unlink(c, d, b('f'));
    await tree.rmdir(c, ROOT_ID, b('d'));
    expect(fs.existsSync(path.join(dir, 'd'))).toBe(false);
    expect(await errno(tree.mkdir(c, ROOT_ID, b('d'), 0o755).then(() => tree.mkdir(c, ROOT_ID, b('d'), 0o755)))).toBe('EEXIST');
  });

  it('readdir and readdirplus list everything once, with types, and count lookups', async () => {
    for (let i = 0; i < 300; i++) fs.writeFileSync(path.join(dir, `f${i}`), '');
    fs.mkdirSync(path.join(dir, 'sub'));
    fs.symlinkSync('/etc/passwd', path.join(dir, 'ln'));
    const names = await listAll(tree, c, ROOT_ID, 7);
    expect(names.length).toBe(304);
    expect(new Set(names).size).toBe(304);
    expect(names).toContain('.');
    expect(names).toContain('..');

    const before = tree.stats.nodes;
    const { fh } = await tree.opendir(c, ROOT_ID, 0);
    const all = [];
    let off = 0;
    for (;;) {
      const ents = await tree.readdirplus(c, ROOT_ID, fh, off, 50);
      if (ents.length === 0) break;
      all.push(...ents);
      off = ents[ents.length - 1]!.offset;
    }
    await tree.releasedir(c, ROOT_ID, fh);
    expect(all.length).toBe(304);
    const sub = all.find((e) => e.name.toString() === 'sub')!;
    expect(sub.type).toBe(4); // DT_DIR
    expect(sub.entry!.attr.mode & 0o170000).toBe(S_IFDIR);
    const ln = all.find((e) => e.name.toString() === 'ln')!;
    expect(ln.type).toBe(10); // DT_LNK
    expect(all.find((e) => e.name.toString() === '..')!.entry).toBeUndefined();
    expect(tree.stats.nodes).toBe(before + 302);
    // Each readdirplus entry counted one lookup: forgetting once frees it.
    for (const e of all) if (e.entry) tree.forget(e.entry.nodeId, 1, c.session);
    expect(tree.stats.nodes).toBe(before);
    // Continuing from a cookie of an earlier listing gives the same rest.
    const h2 = await tree.opendir(c, ROOT_ID, 0);
    const first = await tree.readdir(c, ROOT_ID, h2.fh, 0, 10);
    const restA = await tree.readdir(c, ROOT_ID, h2.fh, first[4]!.offset, 5);
    expect(restA.map((e) => e.name.toString())).toEqual(first.slice(5).map((e) => e.name.toString()));
    await tree.releasedir(c, ROOT_ID, h2.fh);
  });

  it('readdir of 10,000 entries while entries are created and removed: no survivor skipped or repeated', async () => {
    const sub = (await tree.mkdir(c, ROOT_ID, b('big'), 0o755)).nodeId;
    const big = path.join(dir, 'big');
    for (let i = 0; i < 10000; i++) fs.writeFileSync(path.join(big, `s${i}`), '');
    const { fh } = await tree.opendir(c, sub, 0);
    const seen = new Map<string, number>();
    let off = 0;
    let round = 0;
    for (;;) {
      const ents = await tree.readdir(c, sub, fh, off, 97);
      if (ents.length === 0) break;
      for (const e of ents) seen.set(e.name.toString(), (seen.get(e.name.toString()) ?? 0) + 1);
      off = ents[ents.length - 1]!.offset;
      // Between chunks: new entries appear and odd-numbered old ones go (new ones only for a
      // while: on a filesystem whose offsets grow in creation order the listing would not end).
      for (let k = 0; k < 20 && round < 100; k++) fs.writeFileSync(path.join(big, `n${round}-${k}`), '');
      for (let k = 0; k < 20; k++) {
        const victim = path.join(big, `s${(round * 40 + 2 * k + 1) % 10000}`);
        fs.rmSync(victim, { force: true });
      }
      round++;
    }
    await tree.releasedir(c, sub, fh);
    const survivors = fs.readdirSync(big).filter((n) => n.startsWith('s'));
    expect(survivors.length).toBeGreaterThan(5000);
    for (const s of survivors) expect(seen.get(s), s).toBe(1);
    for (const [, count] of seen) expect(count).toBe(1);
  });

  it('uid/gid maps translate both ways', async () => {
    const t = await LocalFileTree.open(dir, {
      uidMap: [{ guest: 1000, host: 2000, count: 10 }, { guest: 0, host: 0, count: 1 }],
      gidMap: [{ guest: 100, host: 300, count: 1 }],
    });
    try {
      const u = ctx('m', 1003, 100);
      const e = await t.create(u, ROOT_ID, b('mapped'), S_IFREG | 0o644, O_RDWR);
      await t.release(u, e.entry.nodeId, e.open.fh);
      const st = fs.statSync(path.join(dir, 'mapped'));
      expect([st.uid, st.gid]).toEqual([2003, 300]);
      expect([e.entry.attr.uid, e.entry.attr.gid]).toEqual([1003, 100]);
      await t.setattr(u, e.entry.nodeId, { uid: 1009 });
      expect(fs.statSync(path.join(dir, 'mapped')).uid).toBe(2009);
      fs.chownSync(path.join(dir, 'mapped'), 4242, 0);
      const a = await t.getattr(u, e.entry.nodeId);
      expect([a.attr.uid, a.attr.gid]).toEqual([65534, 65534]); // unmapped host ids
      expect(await errno(LocalFileTree.open(dir, { uidMap: [{ guest: -1, host: 0, count: 1 }] }))).toBe('EINVAL');
    } finally {
      await t.close();
    }
  });

  it('POSIX locks between two sessions; flocks; release on flush, release and endSession', async () => {
    const id1 = await writeFile(tree, c, ROOT_ID, 'lk', 'x'.repeat(100));
    const c2 = ctx('s2');
    const id2 = await walk(tree, c2, 'lk');
    expect(id2).toBe(id1);
    const h1 = await tree.open(c, id1, O_RDWR);
    const h2 = await tree.open(c2, id2, O_RDWR);
    await tree.setlk(c, id1, h1.fh, 1n, { start: 0, end: 49, type: F_WRLCK, pid: 11 }, { wait: false, flock: false });
    expect(await errno(tree.setlk(c2, id2, h2.fh, 1n, { start: 40, end: 60, type: F_RDLCK, pid: 22 }, { wait: false, flock: false }))).toBe('EAGAIN');
    expect(await tree.getlk(c2, id2, h2.fh, 1n, { start: 40, end: 60, type: F_RDLCK, pid: 22 })).toEqual({ start: 0, end: 49, type: F_WRLCK, pid: 11 });
    await tree.setlk(c2, id2, h2.fh, 1n, { start: 50, end: LOCK_EOF, type: F_WRLCK, pid: 22 }, { wait: false, flock: false });
    // A waiter in session 2 is woken when session 1 flushes (close) its owner.
    let granted = false;
    const wait = tree.setlk(c2, id2, h2.fh, 1n, { start: 0, end: 10, type: F_WRLCK, pid: 22 }, { wait: true, flock: false }).then(() => (granted = true));
    await new Promise((r) => setTimeout(r, 20));
    expect(granted).toBe(false);
    // Session 1 waiting for session 2's range would deadlock.
    expect(await errno(tree.setlk(c, id1, h1.fh, 1n, { start: 60, end: 70, type: F_WRLCK, pid: 11 }, { wait: true, flock: false }))).toBe('EDEADLK');
    await tree.flush(c, id1, h1.fh, 1n);
    await wait;
    expect(granted).toBe(true);
    // An interrupted wait answers EINTR.
    const ac = new AbortController();
    const w2 = tree.setlk(c, id1, h1.fh, 7n, { start: 0, end: 0, type: F_RDLCK, pid: 11 }, { wait: true, flock: false, signal: ac.signal });
    ac.abort();
    expect(await errno(w2)).toBe('EINTR');
    // Read-only handle cannot take a write lock.
    const ro = await tree.open(c, id1, O_RDONLY);
    expect(await errno(tree.setlk(c, id1, ro.fh, 9n, { start: 0, end: 0, type: F_WRLCK, pid: 1 }, { wait: false, flock: false }))).toBe('EBADF');
    // flock: exclusive vs shared across sessions; released with the handle.
    await tree.setlk(c, id1, ro.fh, 9n, { start: 0, end: LOCK_EOF, type: F_WRLCK, pid: 1 }, { wait: false, flock: true });
    expect(await errno(tree.setlk(c2, id2, h2.fh, 1n, { start: 0, end: LOCK_EOF, type: F_RDLCK, pid: 2 }, { wait: false, flock: true }))).toBe('EAGAIN');
    await tree.release(c, id1, ro.fh);
    await tree.setlk(c2, id2, h2.fh, 1n, { start: 0, end: LOCK_EOF, type: F_RDLCK, pid: 2 }, { wait: false, flock: true });
    // Session 2 ends: its POSIX locks and flock go.
    await tree.endSession('s2');
    expect(await tree.getlk(c, id1, h1.fh, 1n, { start: 0, end: LOCK_EOF, type: F_WRLCK, pid: 11 })).toMatchObject({ type: F_UNLCK });
    expect(tree.locks.fileCount).toBe(0);
    expect(await errno(tree.read(c2, id2, h2.fh, 0, 1))).toBe('EBADF');
    await tree.release(c, id1, h1.fh);
  });

  it('forget drops nodes; endSession drops a session\'s lookups and handles; nothing leaks', async () => {
    await writeFile(tree, c, ROOT_ID, 'f', 'x');
    const c2 = ctx('other');
    const e1 = await tree.lookup(c2, ROOT_ID, b('f'));
    await tree.lookup(c2, ROOT_ID, b('f'));
    expect(tree.stats.nodes).toBe(2);
    tree.forget(e1.nodeId, 1, 'other');
    expect(tree.stats.nodes).toBe(2);
    // Session s1's lookup (from create) still holds it; "other" still holds one.
    tree.forget(e1.nodeId, 1, 's1');
    expect((await tree.getattr(c2, e1.nodeId)).attr.size).toBe(1);
    expect(await errno(tree.getattr(c, e1.nodeId))).toBe('ENOENT'); // s1 no longer holds it
    const h = await tree.open(c2, e1.nodeId, O_RDONLY);
    await tree.endSession('other');
    expect(tree.stats).toEqual({ nodes: 1, handles: 0 });
    expect(await errno(tree.read(c2, e1.nodeId, h.fh, 0, 1))).toBe('EBADF');
    expect(await errno(tree.getattr(c2, e1.nodeId))).toBe('ENOENT');
  });
});

describe('LocalFileTree: read-only', () => {
  it('refuses every mutation with EROFS and still reads', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vstore-fsro-'));
    fs.writeFileSync(path.join(dir, 'f'), 'content');
    fs.mkdirSync(path.join(dir, 'd'));
    const before = fs.readdirSync(dir).sort();
    const tree = await LocalFileTree.open(dir, { readOnly: true });
    const c = ctx();
    try {
      const f = await walk(tree, c, 'f');
      const d = await walk(tree, c, 'd');
      expect((await readFile(tree, c, f)).toString()).toBe('content');
      const ro = await tree.open(c, f, O_RDONLY);
      const attempts: [string, Promise<unknown>][] = [
        ['setattr', tree.setattr(c, f, { mode: 0o777 })],
        ['truncate', tree.setattr(c, f, { size: 0 })],
        ['mknod', tree.mknod(c, ROOT_ID, b('n'), S_IFREG | 0o644, 0)],
        ['mkdir', tree.mkdir(c, ROOT_ID, b('n'), 0o755)],
        ['symlink', tree.symlink(c, ROOT_ID, b('n'), b('f'))],
        ['unlink', tree.unlink(c, ROOT_ID, b('f'))],
        ['rmdir', tree.rmdir(c, ROOT_ID, b('d'))],
        ['rename', tree.rename(c, ROOT_ID, b('f'), ROOT_ID, b('g'), 0)],
        ['link', tree.link(c, f, d, b('h'))],
        ['open-w', tree.open(c, f, O_WRONLY)],
        ['open-rw', tree.open(c, f, O_RDWR)],
        ['open-trunc', tree.open(c, f, O_RDONLY | O_TRUNC)],
        ['create', tree.create(c, ROOT_ID, b('n'), S_IFREG | 0o644, O_RDWR | O_CREAT)],
        ['write', tree.write(c, f, ro.fh, 0, b('x'))],
        ['setxattr', tree.setxattr(c, f, b('user.x'), b('y'), 0)],
        ['removexattr', tree.removexattr(c, f, b('user.x'))],
        ['fallocate', tree.fallocate(c, f, ro.fh, 0, 0, 10)],
        ['copy', tree.copyFileRange(c, { nodeId: f, fh: ro.fh, offset: 0 }, { nodeId: f, fh: ro.fh, offset: 10 }, 1, 0)],
        ['access-w', tree.access(c, f, 2)],
      ];
      for (const [what, p] of attempts) expect([what, await errno(p)]).toEqual([what, 'EROFS']);
      // Locks are advisory: allowed on a read-only share.
      await tree.setlk(c, f, ro.fh, 1n, { start: 0, end: 0, type: F_RDLCK, pid: 1 }, { wait: false, flock: false });
      await tree.release(c, f, ro.fh);
      expect(fs.readdirSync(dir).sort()).toEqual(before);
      expect(fs.readFileSync(path.join(dir, 'f'), 'utf8')).toBe('content');
    } finally {
      await tree.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
