// `vstore mount` against the real Linux FUSE client: a directory served through /dev/fuse by the
// engine over LocalFileTree, driven by real programs (cp, mv, ln, stat, setfattr/getfattr, flock,
// python3's fcntl, truncate, fallocate, dd, cmp) and by Node's fs from this process. Every result
// is checked through the mount and, where it must have landed, in the directory on the host.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { REPO_ROOT, requireCommands, run, tempDir } from '../helpers/index.js';
import { LocalFileTree } from '../../lib/fs/local.js';
import { FuseEngine } from '../../lib/fuse/engine.js';
import { silentLogger } from '../../lib/log.js';
import { F } from '../unit/fuse/frames.js';
import { Op } from '../../lib/fuse/constants.js';

const VSTORE = path.join(REPO_ROOT, 'bin/vstore.js');

interface Mounted {
  child: ChildProcess;
  mnt: string;
  stderr: () => string;
  /** SIGTERM, then the exit code. */
  stop(): Promise<number | null>;
  exited: Promise<number | null>;
}

function isMounted(mnt: string): boolean {
  return fs.readFileSync('/proc/mounts', 'utf8').split('\n').some((l) => l.split(' ')[1] === mnt && l.split(' ')[2] === 'fuse.vstore');
}

async function mount(src: string, mnt: string, ...args: string[]): Promise<Mounted> {
  if (!fs.existsSync(path.join(REPO_ROOT, 'dist/lib/cli/mount.js'))) throw new Error('vstore is not built: run `npx tsc -p tsconfig.json`');
  const child = spawn(process.execPath, [VSTORE, 'mount', src, mnt, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stderr!.on('data', (b: Buffer) => (err += b));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  await new Promise<void>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`vstore mount did not start:\n${err}`)), 15_000);
    child.stdout!.on('data', (b: Buffer) => {
      out += b;
      if (out.includes('vstore: serving')) {
        clearTimeout(t);
        resolve();
      }
    });
    void exited.then((code) => {
      clearTimeout(t);
      reject(new Error(`vstore mount exited ${code}:\n${err}`));
    });
  });
  return {
    child,
    mnt,
    exited,
    stderr: () => err,
    async stop() {
      child.kill('SIGTERM');
      return exited;
    },
  };
}

/** A temp dir with `src` (the shared directory) and `mnt` (the mountpoint). */
function shareDirs(prefix: string): { dir: string; src: string; mnt: string } {
  const dir = tempDir(prefix);
  const src = path.join(dir, 'src');
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(src);
  fs.mkdirSync(mnt);
  return { dir, src, mnt };
}

const sh = (script: string, opts: { check?: boolean; cwd?: string } = {}) => run('sh', ['-c', script], { timeoutMs: 60_000, ...opts });
const py = (code: string, ...args: string[]) => run('python3', ['-c', code, ...args], { timeoutMs: 30_000, check: false });
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('vstore mount: POSIX semantics through the kernel', () => {
  let dir: string;
  let src: string;
  let mnt: string;
  let m: Mounted;

  beforeAll(async () => {
    requireCommands('cp', 'mv', 'ln', 'stat', 'setfattr', 'getfattr', 'flock', 'python3', 'truncate', 'fallocate', 'dd', 'cmp', 'du', 'touch');
    ({ dir, src, mnt } = shareDirs('vfuse-'));
    m = await mount(src, mnt);
    expect(isMounted(mnt)).toBe(true);
  }, 30_000);

  afterAll(async () => {
    if (!m) return;
    const code = await m.stop();
    // Leave nothing mounted even when the server misbehaved.
    if (isMounted(mnt)) await run('umount', ['-l', mnt], { check: false });
    expect(code).toBe(0);
    expect(isMounted(mnt)).toBe(false);
    expect(m.stderr()).not.toMatch(/"level":50/);
  });

  it('create, write, read: the host directory holds the same bytes', () => {
    fs.writeFileSync(path.join(mnt, 'hello.txt'), 'hello, fuse\n');
    expect(fs.readFileSync(path.join(mnt, 'hello.txt'), 'utf8')).toBe('hello, fuse\n');
    expect(fs.readFileSync(path.join(src, 'hello.txt'), 'utf8')).toBe('hello, fuse\n');
    // And the other way round: a file made on the host shows up.
    fs.writeFileSync(path.join(src, 'from-host'), 'h');
    expect(fs.readFileSync(path.join(mnt, 'from-host'), 'utf8')).toBe('h');
  });

  it('cp, dd, cmp and mv of a 16 MiB file', async () => {
    const orig = path.join(dir, 'random.bin');
    await run('dd', ['if=/dev/urandom', `of=${orig}`, 'bs=1M', 'count=16', 'status=none']);
    await run('cp', [orig, path.join(mnt, 'r.bin')]);
    await run('cmp', [orig, path.join(mnt, 'r.bin')]);
    await run('dd', [`if=${orig}`, `of=${path.join(mnt, 'dd.bin')}`, 'bs=256k', 'status=none', 'conv=fsync']);
    await run('cmp', [orig, path.join(src, 'dd.bin')]);
    await run('mv', [path.join(mnt, 'r.bin'), path.join(mnt, 'moved.bin')]);
    expect(fs.existsSync(path.join(src, 'r.bin'))).toBe(false);
    await run('cmp', [orig, path.join(src, 'moved.bin')]);
    // A mismatch is caught (the check can fail).
    fs.appendFileSync(path.join(mnt, 'moved.bin'), 'x');
    expect((await run('cmp', [orig, path.join(mnt, 'moved.bin')], { check: false })).code).toBe(1);
  });

  it('O_TRUNC on open, O_DIRECT writes, and a shared writable mmap reach the host', async () => {
    const p = path.join(mnt, 'overwrite');
    fs.writeFileSync(p, 'a long first version');
    fs.writeFileSync(p, 'short');
    expect(fs.readFileSync(path.join(src, 'overwrite'), 'utf8')).toBe('short');
    const d = path.join(mnt, 'direct');
    await run('dd', ['if=/dev/urandom', `of=${path.join(dir, 'direct.src')}`, 'bs=64k', 'count=16', 'status=none']);
    await run('dd', [`if=${path.join(dir, 'direct.src')}`, `of=${d}`, 'bs=64k', 'oflag=direct', 'status=none']);
    await run('cmp', [path.join(dir, 'direct.src'), path.join(src, 'direct')]);
    const mm = path.join(mnt, 'mapped');
    fs.writeFileSync(mm, Buffer.alloc(8192));
    const r = await py('import mmap,os,sys\nfd=os.open(sys.argv[1],os.O_RDWR)\nm=mmap.mmap(fd,8192)\nm[4096:4101]=b"hello"\nm.flush()\nm.close()\nos.close(fd)\nprint("ok")', mm);
    expect(r.stdout.trim()).toBe('ok');
    expect(fs.readFileSync(path.join(src, 'mapped')).subarray(4096, 4101).toString()).toBe('hello');
  });

  it('rename over an existing file replaces it atomically; RENAME_NOREPLACE-like mv -n keeps it', async () => {
    fs.writeFileSync(path.join(mnt, 'a'), 'A');
    fs.writeFileSync(path.join(mnt, 'b'), 'B');
    const inoA = fs.statSync(path.join(mnt, 'a')).ino;
    fs.renameSync(path.join(mnt, 'a'), path.join(mnt, 'b'));
    expect(fs.existsSync(path.join(mnt, 'a'))).toBe(false);
    expect(fs.readFileSync(path.join(mnt, 'b'), 'utf8')).toBe('A');
    expect(fs.statSync(path.join(mnt, 'b')).ino).toBe(inoA);
    expect(fs.readFileSync(path.join(src, 'b'), 'utf8')).toBe('A');
    fs.writeFileSync(path.join(mnt, 'c'), 'C');
    await run('mv', ['-n', path.join(mnt, 'c'), path.join(mnt, 'b')], { check: false });
    expect(fs.readFileSync(path.join(mnt, 'b'), 'utf8')).toBe('A');
    // A directory over a non-empty directory is refused.
    fs.mkdirSync(path.join(mnt, 'd1'));
    fs.mkdirSync(path.join(mnt, 'd2'));
    fs.writeFileSync(path.join(mnt, 'd2', 'f'), '');
    expect(() => fs.renameSync(path.join(mnt, 'd1'), path.join(mnt, 'd2'))).toThrow(/ENOTEMPTY|EEXIST/);
  });

  it('unlink of an open file: the name goes, the open file lives on', () => {
    const p = path.join(mnt, 'open-unlinked');
    const fd = fs.openSync(p, 'w+');
    fs.writeSync(fd, 'before');
    fs.unlinkSync(p);
    expect(fs.existsSync(p)).toBe(false);
    expect(fs.existsSync(path.join(src, 'open-unlinked'))).toBe(false);
    fs.writeSync(fd, '+after');
    const buf = Buffer.alloc(32);
    const n = fs.readSync(fd, buf, 0, 32, 0);
    expect(buf.subarray(0, n).toString()).toBe('before+after');
    expect(fs.fstatSync(fd).nlink).toBe(0);
    fs.closeSync(fd);
  });

  it('hard links: one inode, two names, nlink counted', async () => {
    fs.writeFileSync(path.join(mnt, 'orig'), 'shared');
    await run('ln', [path.join(mnt, 'orig'), path.join(mnt, 'hard')]);
    const a = fs.statSync(path.join(mnt, 'orig'));
    const b = fs.statSync(path.join(mnt, 'hard'));
    expect(b.ino).toBe(a.ino);
    expect(a.nlink).toBe(2);
    fs.appendFileSync(path.join(mnt, 'hard'), '!');
    expect(fs.readFileSync(path.join(mnt, 'orig'), 'utf8')).toBe('shared!');
    expect(fs.statSync(path.join(src, 'orig')).ino).toBe(fs.statSync(path.join(src, 'hard')).ino);
    fs.unlinkSync(path.join(mnt, 'orig'));
    expect(fs.statSync(path.join(mnt, 'hard')).nlink).toBe(1);
  });

  it('O_APPEND: writes from two descriptors land at the end, in order', async () => {
    const p = path.join(mnt, 'log');
    fs.writeFileSync(p, 'start\n');
    const fd1 = fs.openSync(p, 'a');
    const fd2 = fs.openSync(p, 'a');
    fs.writeSync(fd1, 'one\n');
    fs.writeSync(fd2, 'two\n');
    fs.writeSync(fd1, 'three\n');
    fs.closeSync(fd1);
    fs.closeSync(fd2);
    await sh(`echo four >> '${p}'`);
    expect(fs.readFileSync(path.join(src, 'log'), 'utf8')).toBe('start\none\ntwo\nthree\nfour\n');
  });

  it('truncate, sparse files, fallocate, SEEK_DATA/SEEK_HOLE', async () => {
    const p = path.join(mnt, 'sparse');
    fs.writeFileSync(p, 'abcdefghij');
    await run('truncate', ['-s', '4', p]);
    expect(fs.readFileSync(p, 'utf8')).toBe('abcd');
    await run('truncate', ['-s', '1G', p]);
    expect(fs.statSync(p).size).toBe(2 ** 30);
    await run('dd', ['if=/dev/zero', `of=${p}`, 'bs=4k', 'count=1', 'seek=131072', 'conv=notrunc', 'status=none']);
    // Still sparse on both sides: a few blocks, not a gigabyte.
    expect(fs.statSync(p).blocks * 512).toBeLessThan(1 << 20);
    expect(fs.statSync(path.join(src, 'sparse')).blocks * 512).toBeLessThan(1 << 20);
    const seek = await py(
      `import os,sys\nfd=os.open(sys.argv[1],os.O_RDONLY)\nprint(os.lseek(fd,0,os.SEEK_HOLE), os.lseek(fd,4096,os.SEEK_DATA))`,
      p,
    );
    expect(seek.stdout.trim()).toBe(`4096 ${131072 * 4096}`);
    const q = path.join(mnt, 'falloc');
    await run('fallocate', ['-l', '1M', q]);
    expect(fs.statSync(q).size).toBe(1 << 20);
    expect(fs.statSync(path.join(src, 'falloc')).blocks * 512).toBeGreaterThanOrEqual(1 << 20);
    await run('fallocate', ['-p', '-o', '0', '-l', '512K', q]);
    expect(fs.statSync(path.join(src, 'falloc')).blocks * 512).toBeLessThan(1 << 20);
    expect(fs.statSync(q).size).toBe(1 << 20);
  });

  it('mode bits (with the umask), ownership and nanosecond timestamps', async () => {
    const umask = process.umask();
    const p = path.join(mnt, 'modes');
    fs.closeSync(fs.openSync(p, 'w', 0o666));
    expect(fs.statSync(p).mode & 0o7777).toBe(0o666 & ~umask);
    fs.mkdirSync(path.join(mnt, 'dmode'), 0o777);
    expect(fs.statSync(path.join(src, 'dmode')).mode & 0o777).toBe(0o777 & ~umask);
    fs.chmodSync(p, 0o4751);
    expect(fs.statSync(p).mode & 0o7777).toBe(0o4751);
    expect(fs.statSync(path.join(src, 'modes')).mode & 0o7777).toBe(0o4751);
    fs.chownSync(p, 1234, 5678);
    expect([fs.statSync(p).uid, fs.statSync(p).gid]).toEqual([1234, 5678]);
    expect(fs.statSync(path.join(src, 'modes')).uid).toBe(1234);
    await run('touch', ['-d', '2001-02-03 04:05:06.123456789 UTC', p]);
    const viaMount = (await run('stat', ['-c', '%y|%x', p])).stdout;
    const onHost = (await run('stat', ['-c', '%y|%x', path.join(src, 'modes')])).stdout;
    expect(viaMount).toBe(onHost);
    expect(viaMount).toMatch(/2001-02-03 \d\d:05:06\.123456789/);
    // A write updates mtime.
    const before = fs.statSync(p).mtimeMs;
    fs.appendFileSync(p, 'x');
    expect(fs.statSync(p).mtimeMs).toBeGreaterThan(before);
  });

  it('an unprivileged write drops setuid (HANDLE_KILLPRIV_V2), and permission checks apply to other users', async () => {
    fs.chmodSync(dir, 0o755);
    const p = path.join(mnt, 'suid');
    fs.writeFileSync(p, '#!/bin/sh\n');
    fs.chownSync(p, 1000, 1000);
    fs.chmodSync(p, 0o4755);
    const asUser = (cmd: string) => run('setpriv', ['--reuid=1000', '--regid=1000', '--clear-groups', 'sh', '-c', cmd], { check: false });
    expect((await asUser(`echo more >> '${p}'`)).code).toBe(0);
    expect(fs.statSync(path.join(src, 'suid')).mode & 0o7777).toBe(0o755);
    // Another user may not write a file it does not own (default_permissions: the kernel checks).
    fs.writeFileSync(path.join(mnt, 'roots'), 'r');
    const denied = await asUser(`echo x >> '${path.join(mnt, 'roots')}'`);
    expect(denied.code).not.toBe(0);
    expect(denied.stderr).toMatch(/Permission denied/);
    expect(fs.readFileSync(path.join(src, 'roots'), 'utf8')).toBe('r');
  });

  it('xattrs: set, get, list, remove, size queries, missing names', async () => {
    const p = path.join(mnt, 'attrs');
    fs.writeFileSync(p, '');
    await run('setfattr', ['-n', 'user.color', '-v', 'blue', p]);
    const big = 'v'.repeat(3000);
    await run('setfattr', ['-n', 'user.big', '-v', big, p]);
    expect((await run('getfattr', ['--only-values', '-n', 'user.color', p])).stdout).toBe('blue');
    expect((await run('getfattr', ['--only-values', '-n', 'user.big', p])).stdout).toBe(big);
    expect((await run('getfattr', ['--only-values', '-n', 'user.color', path.join(src, 'attrs')])).stdout).toBe('blue');
    const listed = (await run('getfattr', ['-d', '-m', '^user\\.', p])).stdout;
    expect(listed).toContain('user.color="blue"');
    expect(listed).toContain('user.big=');
    await run('setfattr', ['-x', 'user.color', p]);
    const missing = await run('getfattr', ['-n', 'user.color', p], { check: false });
    expect(missing.code).not.toBe(0);
    expect(missing.stderr).toMatch(/No such attribute/);
    expect((await run('getfattr', ['-d', path.join(src, 'attrs')])).stdout).not.toContain('user.color');
  });

  it('readdir of 10,000 entries, also while entries come and go', async () => {
    const big = path.join(src, 'big');
    fs.mkdirSync(big);
    const stable = new Set<string>();
    for (let i = 0; i < 10_000; i++) {
      const n = `f-${String(i).padStart(5, '0')}-${'x'.repeat(i % 50)}`;
      fs.writeFileSync(path.join(big, n), '');
      stable.add(n);
    }
    for (let i = 0; i < 500; i++) fs.writeFileSync(path.join(big, `gone-${i}`), '');
    const listed = fs.readdirSync(path.join(mnt, 'big'));
    expect(listed.length).toBe(10_500);
    expect((await sh(`ls '${path.join(mnt, 'big')}' | wc -l`)).stdout.trim()).toBe('10500');
    // Now list slowly while other names are created and removed through the mount.
    const d = fs.opendirSync(path.join(mnt, 'big'), { bufferSize: 32 });
    const seen: string[] = [];
    let i = 0;
    for (let e = d.readSync(); e; e = d.readSync()) {
      seen.push(e.name);
      if (i < 500) {
        fs.writeFileSync(path.join(mnt, 'big', `new-${i}`), '');
        fs.unlinkSync(path.join(mnt, 'big', `gone-${i}`));
      }
      i++;
    }
    d.closeSync();
    const counts = new Map<string, number>();
    for (const n of seen) counts.set(n, (counts.get(n) ?? 0) + 1);
    expect([...counts.values()].every((c) => c === 1)).toBe(true);
    for (const n of stable) expect(counts.has(n)).toBe(true);
    expect(fs.readdirSync(path.join(mnt, 'big')).filter((n) => n.startsWith('new-')).length).toBe(500);
    expect(fs.readdirSync(path.join(src, 'big')).filter((n) => n.startsWith('gone-')).length).toBe(0);
  }, 120_000);

  it('POSIX record locks between two processes (lockf), waits, and an interrupted wait', async () => {
    const p = path.join(mnt, 'locked');
    fs.writeFileSync(p, Buffer.alloc(1000));
    const holder = spawn('python3', ['-c', 'import fcntl,os,sys\nfd=os.open(sys.argv[1],os.O_RDWR)\nfcntl.lockf(fd,fcntl.LOCK_EX,100,0)\nprint("locked",flush=True)\nsys.stdin.read()', p], {
      stdio: ['pipe', 'pipe', 'inherit'],
    });
    await new Promise<void>((resolve) => holder.stdout!.on('data', (b: Buffer) => b.toString().includes('locked') && resolve()));
    const tryLock = (start: number, len: number) =>
      py(
        'import fcntl,os,sys,errno\nfd=os.open(sys.argv[1],os.O_RDWR)\ntry:\n  fcntl.lockf(fd,fcntl.LOCK_EX|fcntl.LOCK_NB,int(sys.argv[3]),int(sys.argv[2]))\n  print("got")\nexcept OSError as e:\n  print(errno.errorcode[e.errno])',
        p,
        String(start),
        String(len),
      );
    expect((await tryLock(50, 10)).stdout.trim()).toMatch(/EAGAIN|EACCES/);
    expect((await tryLock(100, 100)).stdout.trim()).toBe('got');
    // A blocked wait interrupted by a signal: the engine aborts the SETLKW (EINTR in the waiter).
    const interrupted = await py(
      'import fcntl,os,sys,signal\nclass A(Exception): pass\ndef h(*a): raise A()\nsignal.signal(signal.SIGALRM,h)\nfd=os.open(sys.argv[1],os.O_RDWR)\nsignal.alarm(1)\ntry:\n  fcntl.lockf(fd,fcntl.LOCK_EX,10,0)\n  print("granted")\nexcept A:\n  print("interrupted")',
      p,
    );
    expect(interrupted.stdout.trim()).toBe('interrupted');
    // A waiter that is granted when the holder goes away.
    const waiter = py('import fcntl,os,sys\nfd=os.open(sys.argv[1],os.O_RDWR)\nfcntl.lockf(fd,fcntl.LOCK_EX,10,0)\nprint("granted")', p);
    await sleep(500);
    holder.stdin!.end();
    expect((await waiter).stdout.trim()).toBe('granted');
    expect((await tryLock(0, 1000)).stdout.trim()).toBe('got');
  }, 30_000);

  it('flock between two processes', async () => {
    const p = path.join(mnt, 'flocked');
    fs.writeFileSync(p, '');
    const holder = spawn('flock', [p, 'sh', '-c', 'echo held; cat'], { stdio: ['pipe', 'pipe', 'inherit'] });
    await new Promise<void>((resolve) => holder.stdout!.on('data', (b: Buffer) => b.toString().includes('held') && resolve()));
    expect((await run('flock', ['-n', p, 'true'], { check: false })).code).toBe(1);
    expect((await run('flock', ['-n', '-s', p, 'true'], { check: false })).code).toBe(1);
    holder.stdin!.end();
    await new Promise((r) => holder.on('exit', r));
    expect((await run('flock', ['-n', p, 'true'], { check: false })).code).toBe(0);
  });

  it('escape attempts stay inside: symlinks are stored verbatim, links to outside files fail, .. is the mount\'s', async () => {
    await run('ln', ['-s', '../../../../../etc/passwd', path.join(mnt, 'rel')]);
    await run('ln', ['-s', '/', path.join(mnt, 'root')]);
    expect(fs.readlinkSync(path.join(mnt, 'rel'))).toBe('../../../../../etc/passwd');
    expect(fs.readlinkSync(path.join(src, 'rel'))).toBe('../../../../../etc/passwd');
    expect(fs.lstatSync(path.join(mnt, 'root')).isSymbolicLink()).toBe(true);
    // A hard link of the symlink links the symlink, not what it names.
    await run('ln', [path.join(mnt, 'rel'), path.join(mnt, 'rel-hard')]);
    expect(fs.lstatSync(path.join(src, 'rel-hard')).isSymbolicLink()).toBe(true);
    // O_NOFOLLOW on a symlink is ELOOP: the server never opens what it points to.
    expect(() => fs.openSync(path.join(mnt, 'rel'), fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW)).toThrow(/ELOOP/);
    // Hard links to files outside the share cross devices.
    const outside = path.join(dir, 'outside');
    fs.writeFileSync(outside, 'secret');
    const ln = await run('ln', [outside, path.join(mnt, 'stolen')], { check: false });
    expect(ln.code).not.toBe(0);
    expect(ln.stderr).toMatch(/cross-device/i);
    expect(fs.existsSync(path.join(src, 'stolen'))).toBe(false);
    expect(fs.statSync(path.join(mnt, '..')).ino).toBe(fs.statSync(dir).ino);
  });

  it('statfs reports the host filesystem of the directory', async () => {
    const viaMount = fs.statfsSync(mnt);
    const onHost = fs.statfsSync(src);
    expect(viaMount.bsize).toBe(onHost.bsize);
    expect(viaMount.blocks).toBe(onHost.blocks);
  });
});

describe('vstore mount --read-only, and the end of a mount', () => {
  it('refuses every write with EROFS, reads work; an external umount ends the process with 0', async () => {
    const { src, mnt } = shareDirs('vfuse-ro-');
    fs.writeFileSync(path.join(src, 'keep'), 'keep');
    const m = await mount(src, mnt, '--read-only');
    try {
      expect(fs.readFileSync(path.join(mnt, 'keep'), 'utf8')).toBe('keep');
      for (const f of [
        () => fs.writeFileSync(path.join(mnt, 'new'), 'x'),
        () => fs.appendFileSync(path.join(mnt, 'keep'), 'x'),
        () => fs.mkdirSync(path.join(mnt, 'd')),
        () => fs.unlinkSync(path.join(mnt, 'keep')),
        () => fs.renameSync(path.join(mnt, 'keep'), path.join(mnt, 'k2')),
        () => fs.chmodSync(path.join(mnt, 'keep'), 0o600),
        () => fs.symlinkSync('x', path.join(mnt, 'l')),
      ]) {
        expect(f).toThrow(/EROFS/);
      }
      const attr = await run('setfattr', ['-n', 'user.a', '-v', '1', path.join(mnt, 'keep')], { check: false });
      expect(attr.stderr).toMatch(/Read-only file system/);
      expect(fs.readdirSync(src)).toEqual(['keep']);
      expect(fs.readFileSync(path.join(src, 'keep'), 'utf8')).toBe('keep');
      await run('umount', [mnt]);
      expect(await m.exited).toBe(0);
      expect(isMounted(mnt)).toBe(false);
    } finally {
      if (isMounted(mnt)) await run('umount', ['-l', mnt], { check: false });
      m.child.kill('SIGKILL');
    }
  }, 30_000);

  it('SIGTERM while a file is open: detached lazily, exit 0, the open file then fails ENOTCONN', async () => {
    const { src, mnt } = shareDirs('vfuse-busy-');
    fs.writeFileSync(path.join(src, 'f'), 'data');
    const m = await mount(src, mnt);
    const fd = fs.openSync(path.join(mnt, 'f'), 'r');
    try {
      expect(await m.stop()).toBe(0);
      expect(isMounted(mnt)).toBe(false);
      expect(() => fs.readSync(fd, Buffer.alloc(4), 0, 4, 0)).toThrow(/ENOTCONN/);
    } finally {
      // close(2) of a file on an aborted connection reports ENOTCONN too (its FLUSH fails).
      expect(() => fs.closeSync(fd)).toThrow(/ENOTCONN/);
      if (isMounted(mnt)) await run('umount', ['-l', mnt], { check: false });
    }
  }, 30_000);
});

describe('vstore mount --uid-map/--gid-map', () => {
  it('ids in the mount are mapped ids on the host, both ways; unmapped ones are 65534', async () => {
    const { src, mnt } = shareDirs('vfuse-map-');
    fs.writeFileSync(path.join(src, 'owned'), '');
    fs.chownSync(path.join(src, 'owned'), 2005, 3007);
    const m = await mount(src, mnt, '--uid-map', '1000:2000:10', '--gid-map', '1000:3000:10');
    try {
      const st = fs.statSync(path.join(mnt, 'owned'));
      expect([st.uid, st.gid]).toEqual([1005, 1007]);
      fs.writeFileSync(path.join(mnt, 'made'), '');
      fs.chownSync(path.join(mnt, 'made'), 1001, 1002);
      const host = fs.statSync(path.join(src, 'made'));
      expect([host.uid, host.gid]).toEqual([2001, 3002]);
      expect(fs.statSync(path.join(mnt, 'made')).uid).toBe(1001);
      // A host id in no range shows as nobody.
      fs.chownSync(path.join(src, 'made'), 4242, 4242);
      await sleep(1100); // the attribute cache lifetime
      expect(fs.statSync(path.join(mnt, 'made')).uid).toBe(65534);
    } finally {
      expect(await m.stop()).toBe(0);
    }
  }, 30_000);
});

describe('vstore mount through fusermount3 (the way for users other than root)', () => {
  it('mounts with the fd fusermount3 hands back over _FUSE_COMMFD, serves, unmounts with fusermount3 -u', async () => {
    requireCommands('fusermount3');
    const { dir, mnt } = shareDirs('vfuse-fm-');
    // A source path with the characters fusermount3's option syntax escapes.
    const src = path.join(dir, 'a,b\\c');
    fs.mkdirSync(src);
    const m = await mount(src, mnt, '--mount-with', 'fusermount');
    try {
      const line = fs.readFileSync('/proc/mounts', 'utf8').split('\n').find((l) => l.split(' ')[1] === mnt)!;
      expect(line.split(' ')[2]).toBe('fuse.vstore');
      expect(line.split(' ')[0]).toBe(src.replace(/\\/g, '\\134'));
      fs.writeFileSync(path.join(mnt, 'f'), 'via fusermount3');
      expect(fs.readFileSync(path.join(src, 'f'), 'utf8')).toBe('via fusermount3');
    } finally {
      expect(await m.stop()).toBe(0);
    }
    expect(isMounted(mnt)).toBe(false);
    expect(m.stderr()).not.toMatch(/from outside/);
  }, 30_000);
});

describe('vstore mount: bad arguments', () => {
  it('exits 1 with one line naming the problem, and leaves nothing mounted', async () => {
    const { src, mnt } = shareDirs('vfuse-bad-');
    const cases: [string[], RegExp][] = [
      [[path.join(src, 'missing'), mnt], /missing: .*ENOENT/],
      [[src, path.join(mnt, 'missing')], /cannot mount on .*missing: .*ENOENT/],
      [[src, mnt, '--uid-map', '1000'], /--uid-map: expected/],
    ];
    for (const [args, re] of cases) {
      const r = await run(process.execPath, [VSTORE, 'mount', ...args], { check: false, timeoutMs: 15_000 });
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(re);
    }
    expect(isMounted(mnt)).toBe(false);
  });
});

describe('the engine over LocalFileTree, with frames no kernel would send', () => {
  it('".." of the root is the root, a symlink is never walked through, forged ids and handles fail', async () => {
    const dir = tempDir('vfuse-hostile-');
    fs.mkdirSync(path.join(dir, 'share'));
    fs.symlinkSync('/', path.join(dir, 'share', 'up'));
    const tree = await LocalFileTree.open(path.join(dir, 'share'));
    const e = new FuseEngine({ tree, logger: silentLogger(), session: 'hostile' });
    let u = 1n;
    const h = (nodeId = 1) => ({ unique: u++, nodeId, uid: 0, gid: 0, pid: 1 });
    const call = async (f: Buffer) => {
      const r = Buffer.concat((await e.handle(f))!);
      return { error: r.readInt32LE(4), body: r.subarray(16) };
    };
    await call(F.init(h()));
    const root = await call(F.getattr(h(1)));
    const dotdot = await call(F.lookup(h(1), '..'));
    expect(dotdot.error).toBe(0);
    // entry_out.attr.ino == the root's ino (attr_out.attr.ino)
    expect(dotdot.body.readBigUInt64LE(40)).toBe(root.body.readBigUInt64LE(16));
    const up = await call(F.lookup(h(1), 'up'));
    expect(up.error).toBe(0);
    const upId = Number(up.body.readBigUInt64LE(0));
    // MKDIR "beneath" the symlink: ENOTDIR, nothing made in the host's /.
    const mk = await call(F.mkdir(h(upId), 'vstore-escape-test', 0o755, 0));
    expect(mk.error).toBeLessThan(0);
    expect(fs.existsSync('/vstore-escape-test')).toBe(false);
    expect((await call(F.lookup(h(upId), 'etc'))).error).toBeLessThan(0);
    // Forged node ids and handles.
    expect((await call(F.getattr(h(987654)))).error).toBe(-2);
    expect((await call(F.read(h(1), 4242, 0, 10))).error).toBe(-9);
    expect((await call(F.read(h(1), 4242, 0, 10, Op.READDIR))).error).toBe(-9);
    await e.end();
    await tree.close();
  });
});
