// The FileTree contract, run against LocalFileTree (a real directory) and MemoryFileTree alike:
// the in-memory tree other layers test with must answer as the real one does.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { LocalFileTree } from '../../../lib/fs/local.js';
import { MemoryFileTree } from '../../../lib/fs/memory.js';
import { F_RDLCK, F_UNLCK, F_WRLCK, RENAME_EXCHANGE, RENAME_NOREPLACE, ROOT_ID, type FileTree } from '../../../lib/fs/tree.js';
import { LOCK_EOF } from '../../../lib/fs/locks.js';
import { O_APPEND, O_EXCL, O_RDONLY, O_RDWR, O_TRUNC, O_WRONLY, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG, b, ctx, errno, listAll, readFile, walk, writeFile } from './helpers.js';

interface Made {
  tree: FileTree;
  cleanup(): Promise<void>;
}

const factories: [string, (opts: { readOnly?: boolean }) => Promise<Made>][] = [
  ['LocalFileTree', async (opts) => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vstore-ct-'));
    // A read-only tree gets a prepared directory from a writable one first.
    if (opts.readOnly) {
      const w = await LocalFileTree.open(dir);
      await prepare(w);
      await w.close();
    }
    const tree = await LocalFileTree.open(dir, opts);
    return { tree, cleanup: async () => { await tree.close(); fs.rmSync(dir, { recursive: true, force: true }); } };
  }],
  ['MemoryFileTree', async (opts) => {
    if (opts.readOnly) {
      // Memory trees are prepared while writable, then made read-only through the option object.
      const o = { readOnly: false };
      const tree = new MemoryFileTree(o);
      await prepare(tree);
      o.readOnly = true;
      return { tree, cleanup: () => tree.close() };
    }
    const tree = new MemoryFileTree();
    return { tree, cleanup: () => tree.close() };
  }],
];

async function prepare(t: FileTree): Promise<void> {
  const c = ctx('prep');
  await writeFile(t, c, ROOT_ID, 'f', 'content');
  await t.mkdir(c, ROOT_ID, b('d'), 0o755);
  await t.endSession('prep');
}

describe.each(factories)('FileTree contract: %s', (_name, make) => {
  let m: Made;
  let t: FileTree;
  const c = ctx();
  beforeEach(async () => {
    m = await make({});
    t = m.tree;
  });
  afterEach(() => m.cleanup());

  it('create, write, read, getattr, O_EXCL, O_APPEND, O_TRUNC', async () => {
    const id = await writeFile(t, c, ROOT_ID, 'a', 'hello');
    expect((await readFile(t, c, id)).toString()).toBe('hello');
    const { attr } = await t.getattr(c, id);
    expect([attr.size, attr.mode & 0o170000, attr.nlink]).toEqual([5, S_IFREG, 1]);
    expect(await errno(t.create(c, ROOT_ID, b('a'), S_IFREG | 0o644, O_RDWR | O_EXCL))).toBe('EEXIST');
    const ap = await t.open(c, id, O_WRONLY | O_APPEND);
    await t.write(c, id, ap.fh, 0, b('!!'));
    await t.release(c, id, ap.fh);
    expect((await readFile(t, c, id)).toString()).toBe('hello!!');
    const tr = await t.open(c, id, O_RDWR | O_TRUNC);
    expect((await t.read(c, id, tr.fh, 0, 10)).length).toBe(0);
    await t.write(c, id, tr.fh, 3, b('x'));
    expect(await t.read(c, id, tr.fh, 0, 10)).toEqual(Buffer.from('\0\0\0x'));
    await t.release(c, id, tr.fh);
    await t.setattr(c, id, { size: 2 });
    expect((await t.getattr(c, id)).attr.size).toBe(2);
    const umasked = await t.create({ ...c, umask: 0o077 }, ROOT_ID, b('u'), S_IFREG | 0o666, O_RDWR);
    expect(umasked.entry.attr.mode & 0o777).toBe(0o600);
    await t.release(c, umasked.entry.nodeId, umasked.open.fh);
  });

  it('rename (over, NOREPLACE, EXCHANGE, errors), unlink, rmdir, link', async () => {
    await writeFile(t, c, ROOT_ID, 'a', 'A');
    await writeFile(t, c, ROOT_ID, 'b', 'B');
    const d = (await t.mkdir(c, ROOT_ID, b('d'), 0o755)).nodeId;
    expect(await errno(t.rename(c, ROOT_ID, b('a'), ROOT_ID, b('b'), RENAME_NOREPLACE))).toBe('EEXIST');
    await t.rename(c, ROOT_ID, b('a'), ROOT_ID, b('b'), 0);
    expect(await errno(t.lookup(c, ROOT_ID, b('a')))).toBe('ENOENT');
    expect((await readFile(t, c, await walk(t, c, 'b'))).toString()).toBe('A');
    await writeFile(t, c, d, 'x', 'X');
    await t.rename(c, ROOT_ID, b('b'), d, b('x'), RENAME_EXCHANGE);
    expect((await readFile(t, c, await walk(t, c, 'b'))).toString()).toBe('X');
    expect((await readFile(t, c, await walk(t, c, 'd/x'))).toString()).toBe('A');
    expect(await errno(t.rename(c, ROOT_ID, b('nope'), ROOT_ID, b('b'), RENAME_EXCHANGE))).toBe('ENOENT');
    expect(await errno(t.rename(c, ROOT_ID, b('d'), d, b('inside'), 0))).toBe('EINVAL');
    expect(await errno(t.rename(c, ROOT_ID, b('d'), ROOT_ID, b('b'), 0))).toBe('ENOTDIR');
    expect(await errno(t.rename(c, ROOT_ID, b('b'), ROOT_ID, b('d'), 0))).toBe('EISDIR');
    expect(await errno(t.rmdir(c, ROOT_ID, b('d')))).toBe('ENOTEMPTY');
    expect(await errno(t.unlink(c, ROOT_ID, b('d')))).toBe('EISDIR');
    expect(await errno(t.rmdir(c, ROOT_ID, b('b')))).toBe('ENOTDIR');
    const bid = await walk(t, c, 'b');
    const l = await t.link(c, bid, d, b('hard'));
    expect(l.nodeId).toBe(bid);
    expect(l.attr.nlink).toBe(2);
    expect(await errno(t.link(c, d, ROOT_ID, b('dl')))).toBe('EPERM');
    // Unlink of an open file: still readable through the handle.
    const h = await t.open(c, bid, O_RDONLY);
    await t.unlink(c, ROOT_ID, b('b'));
    await t.unlink(c, d, b('hard'));
    expect((await t.read(c, bid, h.fh, 0, 10)).toString()).toBe('X');
    expect((await t.getattr(c, bid, h.fh)).attr.nlink).toBe(0);
    await t.release(c, bid, h.fh);
    expect((await t.getattr(c, d)).attr.nlink).toBe(2);
    await t.mkdir(c, d, b('sub'), 0o700);
    expect((await t.getattr(c, d)).attr.nlink).toBe(3);
  });

  it('symlinks, mknod, readlink, open of special files', async () => {
    const s = await t.symlink(c, ROOT_ID, b('s'), b('/etc/passwd'));
    expect(s.attr.mode & 0o170000).toBe(S_IFLNK);
    expect((await t.readlink(c, s.nodeId)).toString()).toBe('/etc/passwd');
    expect(await errno(t.open(c, s.nodeId, O_RDONLY))).toBe('ELOOP');
    expect(await errno(t.lookup(c, s.nodeId, b('x')))).toBe('ENOTDIR');
    const f = await t.mknod(c, ROOT_ID, b('p'), S_IFIFO | 0o644, 0);
    expect(f.attr.mode & 0o170000).toBe(S_IFIFO);
    expect(await errno(t.open(c, f.nodeId, O_RDONLY))).toBe('ENXIO');
    expect(await errno(t.create(c, ROOT_ID, b('p'), S_IFREG | 0o644, O_RDONLY))).toBe('ENXIO');
    expect(await errno(t.create(c, ROOT_ID, b('s'), S_IFREG | 0o644, O_RDONLY))).toBe('ELOOP');
    expect(await errno(t.mknod(c, ROOT_ID, b('dev'), 0o020000 | 0o644, 259))).toBe('EPERM');
    expect(await errno(t.open(c, ROOT_ID, O_RDONLY))).toBe('EISDIR');
    expect(await errno(t.opendir(c, f.nodeId, 0))).toBe('ENOTDIR');
  });

  it('readdir: cookies survive concurrent creates and deletes, readdirplus counts lookups', async () => {
    const d = (await t.mkdir(c, ROOT_ID, b('d'), 0o755)).nodeId;
    for (let i = 0; i < 500; i++) {
      const e = await t.mknod(c, d, b(`s${i}`), S_IFREG | 0o644, 0);
      t.forget(e.nodeId, 1, c.session);
    }
    const { fh } = await t.opendir(c, d, 0);
    const seen = new Map<string, number>();
    let off = 0;
    let round = 0;
    for (;;) {
      const ents = await t.readdir(c, d, fh, off, 23);
      if (ents.length === 0) break;
      for (const e of ents) seen.set(e.name.toString(), (seen.get(e.name.toString()) ?? 0) + 1);
      off = ents[ents.length - 1]!.offset;
      // New entries may or may not be listed (POSIX); stop adding so the listing ends.
      for (let k = 0; k < 5 && round < 20; k++) {
        const e = await t.mknod(c, d, b(`n${round}-${k}`), S_IFREG | 0o644, 0);
        t.forget(e.nodeId, 1, c.session);
        await t.unlink(c, d, b(`s${(round * 10 + 2 * k + 1) % 500}`)).catch(() => {});
      }
      round++;
    }
    await t.releasedir(c, d, fh);
    const survivors = (await listAll(t, c, d, 1000)).filter((n) => n.startsWith('s'));
    expect(survivors.length).toBeGreaterThan(200);
    for (const s of survivors) expect(seen.get(s), s).toBe(1);
    for (const [, n] of seen) expect(n).toBe(1);
    const p = await t.opendir(c, d, 0);
    const plus = await t.readdirplus(c, d, p.fh, 0, 5);
    expect(plus.map((e) => e.name.toString()).slice(0, 2).sort()).toEqual(['.', '..'].sort());
    const withEntry = plus.filter((e) => e.entry);
    expect(withEntry.length).toBe(plus.length - 2);
    for (const e of withEntry) {
      expect(e.entry!.nodeId).toBeGreaterThan(ROOT_ID);
      expect((await t.getattr(c, e.entry!.nodeId)).attr.ino).toBe(e.entry!.attr.ino);
      t.forget(e.entry!.nodeId, 1, c.session);
      expect(await errno(t.getattr(c, e.entry!.nodeId))).toBe('ENOENT');
    }
    await t.releasedir(c, d, p.fh);
  });

  it('xattrs', async () => {
    const id = await writeFile(t, c, ROOT_ID, 'x', '');
    await t.setxattr(c, id, b('user.k'), b('v1'), 0);
    expect((await t.getxattr(c, id, b('user.k'))).toString()).toBe('v1');
    expect(await errno(t.setxattr(c, id, b('user.k'), b('v2'), 1))).toBe('EEXIST');
    expect(await errno(t.setxattr(c, id, b('user.n'), b('v2'), 2))).toBe('ENODATA');
    expect((await t.listxattr(c, id)).toString()).toContain('user.k\0');
    await t.removexattr(c, id, b('user.k'));
    expect(await errno(t.getxattr(c, id, b('user.k')))).toBe('ENODATA');
    expect(await errno(t.removexattr(c, id, b('user.k')))).toBe('ENODATA');
  });

  it('forged ids and handles, sessions', async () => {
    const id = await writeFile(t, c, ROOT_ID, 'f', 'x');
    const other = ctx('other');
    expect(await errno(t.getattr(other, id))).toBe('ENOENT');
    expect(await errno(t.getattr(c, 424242))).toBe('ENOENT');
    expect(await errno(t.lookup(c, ROOT_ID, b('a/b')))).toBe('EINVAL');
    expect(await errno(t.mkdir(c, ROOT_ID, b('..'), 0o755))).toBe('EINVAL');
    expect((await t.lookup(c, ROOT_ID, b('..'))).nodeId).toBe(ROOT_ID);
    const { fh } = await t.open(c, id, O_RDWR);
    expect(await errno(t.read(c, id, fh + 100, 0, 1))).toBe('EBADF');
    await walk(t, other, 'f');
    expect(await errno(t.read(other, id, fh, 0, 1))).toBe('EBADF');
    await t.release(c, id, fh);
    expect(await errno(t.read(c, id, fh, 0, 1))).toBe('EBADF');
    await t.endSession('other');
    expect(await errno(t.getattr(other, id))).toBe('ENOENT');
    expect((await t.getattr(c, id)).attr.size).toBe(1);
  });

  it('locks between two sessions', async () => {
    const id = await writeFile(t, c, ROOT_ID, 'f', 'x');
    const c2 = ctx('s2');
    await walk(t, c2, 'f');
    const h1 = await t.open(c, id, O_RDWR);
    const h2 = await t.open(c2, id, O_RDWR);
    const lk = (type: number, start = 0, end = LOCK_EOF) => ({ start, end, type, pid: 1 });
    await t.setlk(c, id, h1.fh, 5n, lk(F_WRLCK, 0, 9), { wait: false, flock: false });
    expect(await errno(t.setlk(c2, id, h2.fh, 5n, lk(F_RDLCK, 9, 9), { wait: false, flock: false }))).toBe('EAGAIN');
    expect((await t.getlk(c2, id, h2.fh, 5n, lk(F_RDLCK))).type).toBe(F_WRLCK);
    const waiting = t.setlk(c2, id, h2.fh, 5n, lk(F_RDLCK, 9, 9), { wait: true, flock: false });
    await t.flush(c, id, h1.fh, 5n);
    await waiting;
    expect((await t.getlk(c, id, h1.fh, 5n, lk(F_RDLCK))).type).toBe(F_UNLCK);
    await t.release(c, id, h1.fh);
    await t.endSession('s2');
  });

  it('statfs, access, fallocate, lseek, copy_file_range, fsync', async () => {
    const s = await t.statfs(c, ROOT_ID);
    expect(s.namelen).toBe(255);
    expect(s.blocks).toBeGreaterThan(0);
    const id = await writeFile(t, c, ROOT_ID, 'f', 'abcdef', 0o600);
    expect(await errno(t.access(ctx('s1', 4242, 4242), id, 4))).toBe('EACCES');
    expect(await errno(t.access(c, id, 6))).toBe('OK');
    const h = await t.open(c, id, O_RDWR);
    await t.fallocate(c, id, h.fh, 0, 0, 100);
    expect((await t.getattr(c, id)).attr.size).toBe(100);
    await t.fallocate(c, id, h.fh, 3, 0, 3); // punch hole | keep size
    expect((await t.read(c, id, h.fh, 0, 6)).toString()).toBe('\0\0\0def');
    expect(await t.lseek(c, id, h.fh, 0, 4)).toBeGreaterThanOrEqual(0);
    expect(await errno(t.lseek(c, id, h.fh, 200, 3))).toBe('ENXIO');
    const g = await t.create(c, ROOT_ID, b('g'), S_IFREG | 0o644, O_RDWR);
    expect(await t.copyFileRange(c, { nodeId: id, fh: h.fh, offset: 3 }, { nodeId: g.entry.nodeId, fh: g.open.fh, offset: 0 }, 3, 0)).toBe(3);
    expect((await t.read(c, g.entry.nodeId, g.open.fh, 0, 10)).toString()).toBe('def');
    await t.fsync(c, id, h.fh, true);
    await t.release(c, id, h.fh);
    await t.release(c, g.entry.nodeId, g.open.fh);
    await t.syncfs(c);
    expect((await t.getattr(c, ROOT_ID)).attr.mode & 0o170000).toBe(S_IFDIR);
  });
});

describe.each(factories)('FileTree contract, read-only: %s', (_name, make) => {
  it('every mutation is EROFS', async () => {
    const m = await make({ readOnly: true });
    const t = m.tree;
    const c = ctx();
    try {
      const f = await walk(t, c, 'f');
      const d = await walk(t, c, 'd');
      const ro = await t.open(c, f, O_RDONLY);
      const codes = await Promise.all([
        t.setattr(c, f, { mode: 0o600 }), t.mkdir(c, ROOT_ID, b('n'), 0o755), t.mknod(c, ROOT_ID, b('n'), S_IFREG, 0),
        t.symlink(c, ROOT_ID, b('n'), b('f')), t.unlink(c, ROOT_ID, b('f')), t.rmdir(c, ROOT_ID, b('d')),
        t.rename(c, ROOT_ID, b('f'), ROOT_ID, b('g'), 0), t.link(c, f, d, b('l')), t.open(c, f, O_RDWR),
        t.create(c, ROOT_ID, b('n'), S_IFREG | 0o644, O_RDWR), t.write(c, f, ro.fh, 0, b('x')),
        t.setxattr(c, f, b('user.a'), b('b'), 0), t.removexattr(c, f, b('user.a')), t.fallocate(c, f, ro.fh, 0, 0, 1),
      ].map(errno));
      expect(new Set(codes)).toEqual(new Set(['EROFS']));
      expect((await t.read(c, f, ro.fh, 0, 100)).toString()).toBe('content');
      await t.release(c, f, ro.fh);
    } finally {
      await m.cleanup();
    }
  });
});
