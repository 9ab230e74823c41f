/**
 * VolumeStore: volumes as sparse files under DATA/volumes, names confined there, idempotent
 * create, grow that never shrinks, delete that respects connected clients, statfs space, and the
 * DATA lock (a second store is refused; a stale lock of a dead process is taken over).
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { VolumeError } from '../../../lib/block/errors.js';
import { silentLogger } from '../../../lib/log.js';
import { VolumeStore, type VolumeExporter } from '../../../lib/node/volumes.js';
import { tempDir } from '../../helpers/index.js';

const MiB = 1024 * 1024;
const logger = silentLogger();
const open: VolumeStore[] = [];
afterEach(async () => {
  for (const s of open.splice(0)) await s.close().catch(() => {});
});

async function store(data = tempDir('vstore-vs-'), exporter?: VolumeExporter): Promise<VolumeStore> {
  const s = await VolumeStore.open(data, { logger, ...(exporter ? { exporter } : {}) });
  open.push(s);
  return s;
}

async function code(p: Promise<unknown> | (() => unknown)): Promise<string> {
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (e) {
    expect(e).toBeInstanceOf(VolumeError);
    return (e as VolumeError).code;
  }
  throw new Error('expected an error');
}

/** Every path under a directory, relative. */
function tree(dir: string): string[] {
  return (readdirSync(dir, { recursive: true }) as string[]).sort();
}

describe('VolumeStore', () => {
  it('creates sparse volumes at DATA/volumes/NAME.img, lists and stats them', async () => {
    const data = tempDir('vstore-vs-');
    const s = await store(data);
    const r = await s.create('vm1/disk0', 64 * MiB);
    expect(r.created).toBe(true);
    expect(r.info).toMatchObject({ name: 'vm1/disk0', size: 64 * MiB });
    const file = path.join(data, 'volumes/vm1/disk0.img');
    const st = statSync(file);
    expect(st.size).toBe(64 * MiB);
    expect(st.blocks * 512).toBeLessThan(MiB); // sparse
    await s.create('b', 1 * MiB);
    await s.create('vm1/disk1', 2 * MiB);
    expect((await s.list()).map((v) => [v.name, v.size])).toEqual([
      ['b', MiB],
      ['vm1/disk0', 64 * MiB],
      ['vm1/disk1', 2 * MiB],
    ]);
    // Allocated bytes follow what is written.
    const vol = await s.open('b');
    await vol.write(0, Buffer.alloc(256 * 1024, 7));
    await vol.flush();
    const info = await s.stat('b');
    expect(info.size).toBe(MiB);
    expect(info.allocated).toBeGreaterThanOrEqual(256 * 1024);
    expect(await code(s.stat('nope'))).toBe('ENOENT');
  });

  it('create is idempotent for the same size, EEXIST for another unless grow', async () => {
    const s = await store();
    expect((await s.create('v', MiB)).created).toBe(true);
    expect((await s.create('v', MiB)).created).toBe(false);
    expect(await code(s.create('v', 2 * MiB))).toBe('EEXIST');
    expect((await s.stat('v')).size).toBe(MiB);
    const g = await s.create('v', 4 * MiB, { grow: true });
    expect(g).toMatchObject({ created: false, info: { size: 4 * MiB } });
    expect(await code(s.create('v', MiB, { grow: true }))).toBe('EINVAL'); // never shrinks
    expect((await s.stat('v')).size).toBe(4 * MiB);
  });

  it('concurrent creates of one name: one creates, the other finds it', async () => {
    const s = await store();
    const rs = await Promise.all([s.create('x/y', MiB), s.create('x/y', MiB), s.create('x/y', MiB)]);
    expect(rs.filter((r) => r.created)).toHaveLength(1);
  });

  it('grow grows (data kept), refuses to shrink, same size is a no-op', async () => {
    const data = tempDir('vstore-vs-');
    const s = await store(data);
    await s.create('g', MiB);
    const v = await s.open('g');
    await v.write(4096, Buffer.alloc(4096, 0x5a));
    await v.flush();
    expect((await s.grow('g', 8 * MiB)).size).toBe(8 * MiB);
    expect(s.isOpen('g')).toBe(false); // closed so the exporter reopens it with the new size
    const v2 = await s.open('g');
    expect(v2.size).toBe(8 * MiB);
    const b = Buffer.alloc(4096);
    await v2.read(4096, b);
    expect(b.every((x) => x === 0x5a)).toBe(true);
    expect(await code(s.grow('g', MiB))).toBe('EINVAL');
    expect((await s.grow('g', 8 * MiB)).size).toBe(8 * MiB);
    expect(await code(s.grow('missing', MiB))).toBe('ENOENT');
    expect(statSync(path.join(data, 'volumes/g.img')).size).toBe(8 * MiB);
  });

  it('bad sizes are EINVAL', async () => {
    const s = await store();
    for (const sz of [0, -512, 1000, 1.5 * 512, Number.NaN, 2 ** 60]) expect(await code(() => s.create('v', sz))).toBe('EINVAL');
    expect(await s.list()).toEqual([]);
  });

  it('hostile names are EINVAL and touch nothing outside DATA/volumes', async () => {
    const parent = tempDir('vstore-vs-');
    const data = path.join(parent, 'data');
    mkdirSync(data);
    const s = await store(data);
    const before = tree(parent);
    const bad = ['../x', 'a/../../b', '/abs', '/etc/passwd', 'a\0b', 'x'.repeat(256), '', '.', '..', 'a//b', 'a/', '/', 'a/./b', 'a b', 'a\\..\\b', 'é'];
    for (const name of bad) {
      for (const op of [() => s.create(name, MiB), () => s.grow(name, MiB), () => s.delete(name), () => s.stat(name), () => s.open(name)]) {
        expect(await code(op), JSON.stringify(name)).toBe('EINVAL');
      }
    }
    expect(tree(parent)).toEqual(before);
    // The longest valid name still works (255 bytes).
    const long = `${'a'.repeat(127)}/${'b'.repeat(127)}`;
    expect(long.length).toBe(255);
    await s.create(long, MiB);
    expect(existsSync(path.join(data, 'volumes', `${long}.img`))).toBe(true);
  });

  it('a name that would need a volume file as a directory fails cleanly', async () => {
    const s = await store();
    await s.create('a', MiB);
    expect(await code(s.create('a.img/b', MiB))).toBe('ENOTDIR');
    expect((await s.list()).map((v) => v.name)).toEqual(['a']);
  });

  it('delete removes the file and empty directories; EBUSY while clients are connected unless force', async () => {
    const data = tempDir('vstore-vs-');
    let conns = 0;
    const unexported: string[] = [];
    const s = await store(data, {
      connections: () => conns,
      unexport: async (n) => {
        unexported.push(n);
        conns = 0;
      },
    });
    await s.create('vm/d0', MiB);
    await s.create('vm/d1', MiB);
    await s.open('vm/d0');
    conns = 2;
    expect(await code(s.delete('vm/d0'))).toBe('EBUSY');
    expect(existsSync(path.join(data, 'volumes/vm/d0.img'))).toBe(true);
    await s.delete('vm/d0', { force: true });
    expect(unexported).toEqual(['vm/d0']);
    expect(s.isOpen('vm/d0')).toBe(false);
    expect(existsSync(path.join(data, 'volumes/vm/d0.img'))).toBe(false);
    expect(existsSync(path.join(data, 'volumes/vm'))).toBe(true); // d1 still there
    await s.delete('vm/d1');
    expect(existsSync(path.join(data, 'volumes/vm'))).toBe(false);
    expect(existsSync(path.join(data, 'volumes'))).toBe(true);
    expect(await code(s.delete('vm/d1'))).toBe('ENOENT');
    expect(await s.list()).toEqual([]);
  });

  it('list ignores foreign files; a half-created volume left by a crash is removed at open', async () => {
    const data = tempDir('vstore-vs-');
    mkdirSync(path.join(data, 'volumes/vm'), { recursive: true });
    writeFileSync(path.join(data, 'volumes/notes.txt'), 'x');
    writeFileSync(path.join(data, 'volumes/vm/d.img.tmp-0123456789ab'), 'x');
    writeFileSync(path.join(data, 'volumes/vm/ok.img'), Buffer.alloc(512));
    const s = await store(data);
    expect((await s.list()).map((v) => v.name)).toEqual(['vm/ok']);
    expect(existsSync(path.join(data, 'volumes/vm/d.img.tmp-0123456789ab'))).toBe(false);
  });

  it('space() is the statfs of DATA (as df reports it)', async () => {
    const data = tempDir('vstore-vs-');
    const s = await store(data);
    const sp = await s.space();
    const df = spawnSync('df', ['-B1', '--output=size,avail', data], { encoding: 'utf8' });
    const [size, avail] = df.stdout.trim().split('\n')[1]!.trim().split(/\s+/).map(Number);
    expect(sp.capacity).toBe(size);
    expect(Math.abs(sp.free - avail!)).toBeLessThan(256 * MiB); // others write to the disk meanwhile
    expect(sp.free).toBeLessThanOrEqual(sp.capacity);
  });

  it('open returns the same FileVolume while open; writes reach the file', async () => {
    const data = tempDir('vstore-vs-');
    const s = await store(data);
    await s.create('o', MiB);
    const [a, b] = await Promise.all([s.open('o'), s.open('o')]);
    expect(a).toBe(b);
    await a.write(512, Buffer.from('hello'));
    await s.closeVolume('o');
    const f = await fsp.readFile(path.join(data, 'volumes/o.img'));
    expect(f.subarray(512, 517).toString()).toBe('hello');
    expect(await code(s.open('missing'))).toBe('ENOENT');
  });
});

describe('the DATA lock', () => {
  it('a second store on the same DATA is EBUSY until the first closes', async () => {
    const data = tempDir('vstore-lock-');
    const a = await store(data);
    expect(await code(VolumeStore.open(data, { logger }))).toBe('EBUSY');
    await a.close();
    expect(existsSync(path.join(data, 'lock'))).toBe(false);
    const b = await store(data);
    await b.create('v', MiB);
  });

  it('another live process holding DATA is EBUSY', async () => {
    const data = tempDir('vstore-lock-');
    // A child process takes the lock with the real code, reports, and waits.
    const child = spawn(process.execPath, [
      '--input-type=module',
      '-e',
      `const {VolumeStore} = await import(${JSON.stringify(path.resolve('dist/lib/node/volumes.js'))});
       const {silentLogger} = await import(${JSON.stringify(path.resolve('dist/lib/log.js'))});
       await VolumeStore.open(${JSON.stringify(data)}, {logger: silentLogger()});
       console.log('locked'); setInterval(() => {}, 1000);`,
    ], { stdio: ['ignore', 'pipe', 'inherit'] });
    try {
      await new Promise<void>((resolve, reject) => {
        child.stdout!.on('data', (b: Buffer) => b.toString().includes('locked') && resolve());
        child.once('exit', (c) => reject(new Error(`child exited ${c}`)));
      });
      expect(await code(VolumeStore.open(data, { logger }))).toBe('EBUSY');
      // kill -9: the lock file stays, with a dead pid in it; it is then stale.
      child.kill('SIGKILL');
      await new Promise((r) => child.once('exit', r));
      expect(existsSync(path.join(data, 'lock'))).toBe(true);
      const s = await store(data);
      expect((await fsp.readFile(path.join(data, 'lock'), 'utf8')).startsWith(`${process.pid} `)).toBe(true);
      await s.close();
    } finally {
      child.kill('SIGKILL');
    }
  });

  it('a lock whose pid now belongs to another process (reused pid) is stale', async () => {
    const data = tempDir('vstore-lock-');
    // Our own pid, but a start time that is not ours: the holder is gone and the pid reused.
    writeFileSync(path.join(data, 'lock'), `${process.pid} 1 00ff00ff00ff00ff\n`);
    const s = await store(data);
    await s.create('v', MiB);
  });

  it('an unreadable lock file is broken only once it is old', async () => {
    const data = tempDir('vstore-lock-');
    const lock = path.join(data, 'lock');
    writeFileSync(lock, 'garbage');
    expect(await code(VolumeStore.open(data, { logger }))).toBe('EBUSY'); // fresh: perhaps being written
    const old = new Date(Date.now() - 60_000);
    await fsp.utimes(lock, old, old);
    await store(data);
  });
});
