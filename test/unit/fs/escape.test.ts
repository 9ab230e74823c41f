// LocalFileTree confinement: nothing a client sends reaches outside the root. A canary file and
// directory sit next to the share; every test ends by checking they are untouched.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { LocalFileTree } from '../../../lib/fs/local.js';
import { ROOT_ID } from '../../../lib/fs/tree.js';
import { O_CREAT, O_RDONLY, O_RDWR, O_TRUNC, O_WRONLY, S_IFDIR, S_IFLNK, S_IFREG, b, ctx, errno, walk } from './helpers.js';

describe('LocalFileTree: escape attempts', () => {
  let base: string;
  let root: string;
  let outside: string;
  let canary: string;
  let tree: LocalFileTree;
  const c = ctx();
  const CANARY = 'CANARY-outside-the-share';

  function canaryState(): unknown {
    const st = fs.statSync(canary);
    let xattrs: string[] = [];
    try {
      xattrs = fs.readdirSync(outside);
    } catch {}
    return { data: fs.readFileSync(canary, 'utf8'), mode: st.mode, uid: st.uid, nlink: st.nlink, size: st.size, mtimeMs: st.mtimeMs, files: xattrs.sort() };
  }
  let before: unknown;

  beforeEach(async () => {
    base = fs.mkdtempSync(path.join(os.tmpdir(), 'vstore-esc-'));
    root = path.join(base, 'share');
    outside = path.join(base, 'outside');
    fs.mkdirSync(root);
    fs.mkdirSync(outside);
    canary = path.join(outside, 'canary');
    fs.writeFileSync(canary, CANARY, { mode: 0o644 });
    fs.writeFileSync(path.join(root, 'inside'), 'inside');
    before = canaryState();
    tree = await LocalFileTree.open(root);
  });
  afterEach(async () => {
    await tree.close();
    expect(canaryState()).toEqual(before);
    fs.rmSync(base, { recursive: true, force: true });
  });

  it('refuses bad names everywhere and keeps ".." of the root at the root', async () => {
    const bad = [b('a/b'), b('/'), b('\0'), b('x\0y'), Buffer.alloc(0), Buffer.alloc(256, 0x61), b('../outside/canary')];
    for (const name of bad) {
      expect(await errno(tree.lookup(c, ROOT_ID, name))).toMatch(/EINVAL|ENAMETOOLONG/);
      expect(await errno(tree.create(c, ROOT_ID, name, S_IFREG | 0o644, O_RDWR))).toMatch(/EINVAL|ENAMETOOLONG/);
      expect(await errno(tree.mkdir(c, ROOT_ID, name, 0o755))).toMatch(/EINVAL|ENAMETOOLONG/);
      expect(await errno(tree.unlink(c, ROOT_ID, name))).toMatch(/EINVAL|ENAMETOOLONG/);
      expect(await errno(tree.symlink(c, ROOT_ID, name, b('x')))).toMatch(/EINVAL|ENAMETOOLONG/);
    }
    for (const dots of [b('.'), b('..')]) {
      expect(await errno(tree.create(c, ROOT_ID, dots, S_IFREG | 0o644, O_RDWR))).toBe('EINVAL');
      expect(await errno(tree.mkdir(c, ROOT_ID, dots, 0o755))).toBe('EINVAL');
      expect(await errno(tree.rmdir(c, ROOT_ID, dots))).toBe('EINVAL');
      expect(await errno(tree.unlink(c, ROOT_ID, dots))).toBe('EINVAL');
      expect(await errno(tree.rename(c, ROOT_ID, b('inside'), ROOT_ID, dots, 0))).toBe('EINVAL');
      expect(await errno(tree.link(c, await walk(tree, c, 'inside'), ROOT_ID, dots))).toBe('EINVAL');
    }
    const up = await tree.lookup(c, ROOT_ID, b('..'));
    expect(up.nodeId).toBe(ROOT_ID);
    expect((await tree.lookup(c, ROOT_ID, b('.'))).nodeId).toBe(ROOT_ID);
    const sub = (await tree.mkdir(c, ROOT_ID, b('sub'), 0o755)).nodeId;
    expect((await tree.lookup(c, sub, b('..'))).nodeId).toBe(ROOT_ID);
    const deep = (await tree.mkdir(c, sub, b('deep'), 0o755)).nodeId;
    expect((await tree.lookup(c, deep, b('..'))).nodeId).toBe(sub);
    // ".." repeated from the root never leaves it.
    let id = deep;
    for (let i = 0; i < 5; i++) id = (await tree.lookup(c, id, b('..'))).nodeId;
    expect(id).toBe(ROOT_ID);
    const names = (await tree.readdir(c, ROOT_ID, (await tree.opendir(c, ROOT_ID, 0)).fh, 0, 100)).map((e) => e.name.toString());
    expect(names).not.toContain('canary');
  });

  it('symlinks to outside (absolute, relative, /proc) are never followed', async () => {
    fs.symlinkSync('/etc/passwd', path.join(root, 'abs'));
    fs.symlinkSync(canary, path.join(root, 'canary-abs'));
    fs.symlinkSync('../outside/canary', path.join(root, 'canary-rel'));
    fs.symlinkSync('../outside', path.join(root, 'outdir'));
    fs.symlinkSync('/proc/self/root' + outside, path.join(root, 'proc'));
    const dirId = (await tree.mkdir(c, ROOT_ID, b('d'), 0o755)).nodeId;
    for (const name of ['abs', 'canary-abs', 'canary-rel', 'proc']) {
      const e = await tree.lookup(c, ROOT_ID, b(name));
      expect(e.attr.mode & 0o170000).toBe(S_IFLNK);
      const id = e.nodeId;
      expect(await errno(tree.open(c, id, O_RDONLY))).toBe('ELOOP');
      expect(await errno(tree.open(c, id, O_WRONLY | O_TRUNC))).toBe('ELOOP');
      expect(await errno(tree.opendir(c, id, 0))).toBe('ENOTDIR');
      expect(await errno(tree.setattr(c, id, { size: 0 }))).toBe('EINVAL');
      expect(await errno(tree.setattr(c, id, { mode: 0o777 }))).toBe('EOPNOTSUPP');
      expect(await errno(tree.setattr(c, id, { mtime: { sec: 1, nsec: 0 } }))).toBe('EOPNOTSUPP');
      // chown acts on the link itself.
      await tree.setattr(c, id, { uid: 4321 });
      expect(fs.lstatSync(path.join(root, name)).uid).toBe(4321);
      expect(await errno(tree.setxattr(c, id, b('user.x'), b('y'), 0))).toBe('EPERM');
      // A hard link of the symlink links the symlink, not its target.
      const l = await tree.link(c, id, dirId, b(`hl-${name}`));
      expect(l.attr.mode & 0o170000).toBe(S_IFLNK);
      expect(fs.lstatSync(path.join(root, 'd', `hl-${name}`)).isSymbolicLink()).toBe(true);
      // Its target is readable as text only.
      expect((await tree.readlink(c, id)).length).toBeGreaterThan(0);
    }
    // Beneath a symlink to a directory outside: ENOTDIR, never a lookup in the target.
    const od = (await tree.lookup(c, ROOT_ID, b('outdir'))).nodeId;
    expect(await errno(tree.lookup(c, od, b('canary')))).toBe('ENOTDIR');
    expect(await errno(tree.create(c, od, b('pwned'), S_IFREG | 0o644, O_RDWR))).toBe('ENOTDIR');
    expect(await errno(tree.mkdir(c, od, b('pwned'), 0o755))).toBe('ENOTDIR');
    expect(await errno(tree.symlink(c, od, b('pwned'), b('x')))).toBe('ENOTDIR');
    expect(await errno(tree.rename(c, ROOT_ID, b('inside'), od, b('pwned'), 0))).toBe('ENOTDIR');
    expect(await errno(tree.unlink(c, od, b('canary')))).toBe('ENOTDIR');
    // create over a symlink name: no follow (EEXIST without O_EXCL is an open of the link: ELOOP).
    expect(await errno(tree.create(c, ROOT_ID, b('canary-abs'), S_IFREG | 0o644, O_RDWR | O_TRUNC))).toBe('ELOOP');
    expect(await errno(tree.create(c, ROOT_ID, b('canary-rel'), S_IFREG | 0o644, O_RDWR | O_CREAT | 0o200))).toBe('EEXIST');
    // readdirplus of a directory with symlinks returns their own attributes.
    const { fh } = await tree.opendir(c, ROOT_ID, 0);
    const ents = await tree.readdirplus(c, ROOT_ID, fh, 0, 100);
    for (const e of ents) if (e.name.toString().startsWith('canary')) expect(e.entry!.attr.mode & 0o170000).toBe(S_IFLNK);
  });

  it('a directory swapped with a symlink to outside while the tree works beneath it: nothing outside is read or written', async () => {
    // share/d is a directory with its own "canary"; share/lnk points to the outside directory.
    fs.mkdirSync(path.join(root, 'd'));
    fs.writeFileSync(path.join(root, 'd', 'canary'), 'inside-d');
    fs.symlinkSync(outside, path.join(root, 'lnk'));
    // A separate process swaps d and lnk as fast as it can (RENAME_EXCHANGE through python).
    const swapper = spawn('python3', ['-c', `
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
end = time.time() + 30
a = ${JSON.stringify(path.join(root, 'd'))}.encode(); b = ${JSON.stringify(path.join(root, 'lnk'))}.encode()
while time.time() < end:
    libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, 2)
`], { stdio: 'ignore' });
    let readInside = 0;
    let lookedUpLinks = 0;
    const leaked: string[] = [];
    const expectCode = (err: unknown, codes: RegExp) => {
      if (typeof (err as { code?: unknown }).code !== 'string') throw err;
      expect((err as { code: string }).code).toMatch(codes);
    };
    try {
      const deadline = Date.now() + 3000;
      let i = 0;
      while (Date.now() < deadline) {
        i++;
        let dId: number;
        try {
          const e = await tree.lookup(c, ROOT_ID, b('d'));
          dId = e.nodeId;
          if ((e.attr.mode & 0o170000) === S_IFLNK) lookedUpLinks++;
        } catch {
          continue;
        }
        try {
          const e = await tree.lookup(c, dId, b('canary'));
          const { fh } = await tree.open(c, e.nodeId, O_RDWR);
          const data = (await tree.read(c, e.nodeId, fh, 0, 100)).toString();
          if (data.includes('CANARY')) leaked.push(data);
          if (data === 'inside-d') readInside++;
          await tree.write(c, e.nodeId, fh, 0, b('inside-d'));
          await tree.setattr(c, e.nodeId, { mode: 0o600 }, fh);
          await tree.release(c, e.nodeId, fh);
          tree.forget(e.nodeId, 1, c.session);
        } catch (err) {
          expectCode(err, /ENOTDIR|ENOENT|ELOOP/);
        }
        try {
          const cr = await tree.create(c, dId, b(`new${i}`), S_IFREG | 0o644, O_RDWR);
          await tree.release(c, cr.entry.nodeId, cr.open.fh);
        } catch (err) {
          expectCode(err, /ENOTDIR|ENOENT/);
        }
        try {
          await tree.mkdir(c, dId, b(`dir${i}`), 0o755);
        } catch (err) {
          expectCode(err, /ENOTDIR|ENOENT/);
        }
        tree.forget(dId, 1, c.session);
      }
    } finally {
      swapper.kill('SIGKILL');
      await new Promise((r) => swapper.once('exit', r));
    }
    expect(leaked).toEqual([]);
    // The race really happened both ways: the tree saw the directory and the link.
    expect(readInside).toBeGreaterThan(0);
    expect(lookedUpLinks).toBeGreaterThan(0);
    // Nothing was created outside (canaryState in afterEach also checks the listing and data).
    expect(fs.readdirSync(outside)).toEqual(['canary']);
  });

  it('forged node ids and handles: ENOENT / EBADF, never another object', async () => {
    const f = await walk(tree, c, 'inside');
    const other = ctx('other-vm');
    for (const id of [0, 2, 3, 99999, -1, 1.5, Number.NaN, 2 ** 53]) {
      if (id === f) continue;
      expect(await errno(tree.getattr(c, id))).toBe('ENOENT');
      expect(await errno(tree.lookup(c, id, b('inside')))).toBe('ENOENT');
      expect(await errno(tree.open(c, id, O_RDONLY))).toBe('ENOENT');
    }
    // A node id another session looked up is not this session's.
    expect(await errno(tree.getattr(other, f))).toBe('ENOENT');
    expect(await errno(tree.open(other, f, O_RDONLY))).toBe('ENOENT');
    const { fh } = await tree.open(c, f, O_RDONLY);
    for (const bad of [0, fh + 1, 12345, -1]) expect(await errno(tree.read(c, f, bad, 0, 10))).toBe('EBADF');
    // Another session's handle, a handle with the wrong node, a file handle used as a directory.
    await walk(tree, other, 'inside');
    expect(await errno(tree.read(other, f, fh, 0, 10))).toBe('EBADF');
    expect(await errno(tree.read(c, ROOT_ID, fh, 0, 10))).toBe('EBADF');
    expect(await errno(tree.readdir(c, f, fh, 0, 10))).toBe('EBADF');
    await tree.release(c, f, fh);
    expect(await errno(tree.read(c, f, fh, 0, 10))).toBe('EBADF');
    expect(await errno(tree.release(c, f, fh))).toBe('EBADF');
    // A forgotten id is gone for good, even when the same file is looked up again.
    tree.forget(f, 1, c.session);
    tree.forget(f, 1, other.session);
    expect(await errno(tree.getattr(c, f))).toBe('ENOENT');
    const again = await walk(tree, c, 'inside');
    expect(again).not.toBe(f);
  });

  it('a hard link to an outside file cannot be made', async () => {
    // The only source of a link is a node the tree handed out; symlinks link themselves.
    fs.symlinkSync(canary, path.join(root, 'via'));
    const via = await walk(tree, c, 'via');
    await tree.link(c, via, ROOT_ID, b('hl'));
    expect(fs.lstatSync(path.join(root, 'hl')).isSymbolicLink()).toBe(true);
    expect(fs.statSync(canary).nlink).toBe(1);
    // A directory moved out of the share on the host: its ".." is refused.
    fs.mkdirSync(path.join(root, 'm'));
    fs.mkdirSync(path.join(root, 'm', 'n'));
    const m = await walk(tree, c, 'm');
    const n = await walk(tree, c, 'm/n');
    fs.renameSync(path.join(root, 'm'), path.join(base, 'moved'));
    expect(await errno(tree.lookup(c, m, b('..')))).toBe('ENOENT');
    expect(await errno(tree.lookup(c, n, b('..')))).toBe('ENOENT');
    fs.renameSync(path.join(base, 'moved'), path.join(root, 'm'));
    expect((await tree.lookup(c, n, b('..'))).nodeId).toBe(m);
    expect((await tree.lookup(c, m, b('..'))).nodeId).toBe(ROOT_ID);
    expect(S_IFDIR).toBe(0o040000);
  });
});
