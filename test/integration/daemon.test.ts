/**
 * The daemon as users run it: `node bin/vstore.js serve --config FILE` in a child process,
 * driven by real peers (nbdinfo, qemu-io, fio's nbd engine) on the disk sockets and by the
 * `vstore` commands on the control socket.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MiB, REPO_ROOT, VSTORE_BIN, freePort, requireCommands, run, sparseImage, tempDir } from '../helpers/index.js';

interface Daemon {
  child: ChildProcess;
  control: string;
  out(): string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

const live = new Set<ChildProcess>();
afterAll(() => {
  for (const c of live) c.kill('SIGKILL');
});

beforeAll(() => {
  requireCommands('nbdinfo', 'qemu-io', 'fio');
  if (!existsSync(path.join(REPO_ROOT, 'dist/lib/cli/index.js'))) throw new Error('vstore is not built: run scripts/setup.sh');
});

function canConnect(p: string): Promise<boolean> {
  return new Promise((resolve) => {
    const c = net.connect(p);
    c.once('connect', () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
}

function canConnectTcp(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const c = net.connect(port, '127.0.0.1');
    c.once('connect', () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
}

async function startDaemon(config: string, control: string): Promise<Daemon> {
  const child = spawn(process.execPath, [VSTORE_BIN, 'serve', '--config', config], { stdio: ['ignore', 'pipe', 'pipe'] });
  live.add(child);
  let out = '';
  child.stdout!.on('data', (b: Buffer) => (out += b.toString()));
  child.stderr!.on('data', (b: Buffer) => (out += b.toString()));
  let done = false;
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.on('exit', (code, signal) => {
      done = true;
      live.delete(child);
      resolve({ code, signal });
    }),
  );
  const deadline = Date.now() + 15_000;
  while (!(await canConnect(control))) {
    if (done) throw new Error(`daemon exited before it was ready:\n${out}`);
    if (Date.now() > deadline) throw new Error(`daemon not ready after 15 s:\n${out}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return { child, control, out: () => out, exited };
}

async function stopDaemon(d: Daemon, timeoutMs = 15_000): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  d.child.kill('SIGTERM');
  const timer = setTimeout(() => d.child.kill('SIGKILL'), timeoutMs);
  const r = await d.exited;
  clearTimeout(timer);
  return r;
}

function vstore(args: string[], input?: string) {
  return run(process.execPath, [VSTORE_BIN, ...args], { check: false, timeoutMs: 30_000, ...(input !== undefined ? { input } : {}) });
}

function httpGet(socketPath: string, p: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, path: p }, (res) => {
      let body = '';
      res.on('data', (c: Buffer) => (body += c.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

describe('vstore serve', () => {
  it('serves disks, takes VMs and disks at runtime, reports status and metrics, stops cleanly', async () => {
    const dir = tempDir('vsd-');
    const img0 = path.join(dir, 'vm1-d0.img');
    sparseImage(img0, 32 * MiB);
    const control = path.join(dir, 'run', 'control.sock');
    const config = path.join(dir, 'vstore.yaml');
    writeFileSync(
      config,
      [
        'runDir: run',
        'vms:',
        '  - name: vm1',
        '    disks:',
        '      - { name: d0, file: vm1-d0.img }',
        '      - { name: d1, file: vm1-d1.img, size: 16M, readOnly: false, nbd: { export: data } }',
        '',
      ].join('\n'),
    );
    const d = await startDaemon(config, control);
    const sock0 = path.join(dir, 'run', 'vm1-d0.sock');
    const sock1 = path.join(dir, 'run', 'vm1-d1.sock');
    expect(statSync(control).mode & 0o777).toBe(0o600);
    expect(statSync(sock0).mode & 0o777).toBe(0o600);
    // the second disk was created sparse
    expect(statSync(path.join(dir, 'vm1-d1.img')).size).toBe(16 * MiB);

    // a real client on each socket
    const info = JSON.parse((await run('nbdinfo', ['--json', `nbd+unix:///?socket=${sock0}`])).stdout) as { exports: Array<{ 'export-size': number }> };
    expect(info.exports[0]!['export-size']).toBe(32 * MiB);
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 1M 2M', '-c', 'flush', '-c', 'read -P 0x3c 1M 2M', `nbd+unix:///data?socket=${sock1}`]);
    const img1 = readFileSync(path.join(dir, 'vm1-d1.img'));
    expect(img1.subarray(1 * MiB, 3 * MiB).every((x) => x === 0x3c)).toBe(true);

    // status, as a table and as JSON, with the counters of what qemu-io did
    const table = await vstore(['status', '--control', control]);
    expect(table.code).toBe(0);
    expect(table.stdout).toMatch(/vm1\s+d0\s+32M\s+rw/);
    const st = JSON.parse((await vstore(['status', '--control', control, '--json'])).stdout) as {
      vms: Array<{ name: string; disks: Array<{ name: string; socket: string; export: string; writes: number; bytesWritten: number; reads: number; size: number }> }>;
    };
    const d1 = st.vms[0]!.disks.find((x) => x.name === 'd1')!;
    expect(d1).toMatchObject({ socket: sock1, export: 'data', size: 16 * MiB, bytesWritten: 2 * MiB });
    expect(d1.writes).toBeGreaterThanOrEqual(1);

    // a VM added from a file with a relative path, and from stdin
    const img2 = path.join(dir, 'vm2.img');
    writeFileSync(path.join(dir, 'vm2.yaml'), 'name: vm2\ndisks:\n  - { name: root, file: vm2.img, size: 8M }\n');
    const added = await vstore(['vm', 'add', path.join(dir, 'vm2.yaml'), '--control', control]);
    expect(added.stderr).toBe('');
    expect(added.code).toBe(0);
    expect(added.stdout).toContain('VM vm2 added');
    expect(statSync(img2).size).toBe(8 * MiB);
    const sock2 = path.join(dir, 'run', 'vm2-root.sock');
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 0 64k', `nbd+unix:///?socket=${sock2}`]);
    // duplicates: 409, one line
    const dup = await vstore(['vm', 'add', '-', '--control', control], JSON.stringify({ name: 'vm2' }));
    expect(dup.code).toBe(1);
    expect(dup.stderr).toBe('vstore: VM "vm2" already exists\n');
    // a bad VM object: the field is named, before and by the daemon
    const bad = await vstore(['vm', 'add', '-', '--control', control], 'name: vm3\ndisks:\n  - { name: x }\n');
    expect(bad.code).toBe(1);
    expect(bad.stderr).toBe('vstore: stdin: disks[0].file: required (or give volume)\n');
    // a disk added at runtime, then removed
    const dadd = await vstore(['disk', 'add', 'vm2', '-', '--control', control], JSON.stringify({ name: 'extra', file: path.join(dir, 'extra.img'), size: '4M' }));
    expect(dadd.code).toBe(0);
    expect(existsSync(path.join(dir, 'run', 'vm2-extra.sock'))).toBe(true);
    const drm = await vstore(['disk', 'remove', 'vm2', 'extra', '--control', control]);
    expect(drm.code).toBe(0);
    expect(existsSync(path.join(dir, 'run', 'vm2-extra.sock'))).toBe(false);
    const drm2 = await vstore(['disk', 'remove', 'vm2', 'extra', '--control', control]);
    expect(drm2.stderr).toBe('vstore: VM "vm2" has no disk "extra"\n');

    // metrics
    const m = await httpGet(control, '/metrics');
    expect(m.status).toBe(200);
    expect(m.body).toMatch(/^# TYPE vstore_disk_written_bytes_total counter$/m);
    expect(m.body).toContain('vstore_disk_written_bytes_total{vm="vm1",disk="d1"} 2097152');
    expect(m.body).toContain('vstore_disk_size_bytes{vm="vm2",disk="root"} 8388608');
    expect(m.body).toContain('vstore_vms 2');

    // remove a VM: its socket goes, its data stays
    const vrm = await vstore(['vm', 'remove', 'vm2', '--control', control]);
    expect(vrm.code).toBe(0);
    expect(existsSync(sock2)).toBe(false);
    expect(readFileSync(img2).subarray(0, 65536).every((x) => x === 0x77)).toBe(true);
    const st2 = JSON.parse((await vstore(['status', '--control', control, '--json'])).stdout) as { vms: Array<{ name: string }> };
    expect(st2.vms.map((v) => v.name)).toEqual(['vm1']);

    const r = await stopDaemon(d);
    expect(r).toEqual({ code: 0, signal: null });
    for (const p of [control, sock0, sock1]) expect(existsSync(p)).toBe(false);
    expect(d.out()).toMatch(/"msg":"stopped: every disk flushed, sockets removed"/);

    // and the commands say so when the daemon is gone
    const gone = await vstore(['status', '--control', control]);
    expect(gone.code).toBe(1);
    expect(gone.stderr).toMatch(/^vstore: the daemon is not running \(no control socket at .*\)\n$/);
  });

  it('refuses a bad config with one line naming the field', async () => {
    const dir = tempDir('vsd-');
    const config = path.join(dir, 'bad.yaml');
    writeFileSync(config, 'runDir: run\nvms:\n  - name: vm1\n    disks:\n      - { name: a, file: a.img, size: 1M }\n      - { name: b }\n');
    const r = await vstore(['serve', '--config', config]);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(`vstore: ${config}: vms[0].disks[1].file: required (or give volume)\n`);
    const missing = await vstore(['serve', '--config', path.join(dir, 'nope.yaml')]);
    expect(missing.stderr).toBe(`vstore: ${path.join(dir, 'nope.yaml')}: no such file\n`);
    const noImage = path.join(dir, 'noimg.yaml');
    writeFileSync(noImage, 'runDir: run\nvms:\n  - name: vm1\n    disks:\n      - { name: a, file: missing.img }\n');
    // the second VM's disk is missing: the first VM was started, and is taken down again
    writeFileSync(
      noImage,
      'runDir: run\ntcp: { host: 127.0.0.1, port: 0 }\nvms:\n  - name: vm0\n    disks:\n      - { name: a, file: a.img, size: 1M }\n      - { name: b, file: b.img, size: 1M }\n  - name: vm1\n    disks:\n      - { name: a, file: missing.img }\n',
    );
    for (let i = 0; i < 3; i++) {
      const r2 = await vstore(['serve', '--config', noImage]);
      expect(r2.code).toBe(1);
      // stderr also carries the JSON log lines of the aborted start; the error is one plain
      // line, and the last one
      const lines = r2.stderr.split('\n');
      expect(lines.pop()).toBe('');
      expect(lines.filter((l) => !l.startsWith('{'))).toHaveLength(1);
      expect(lines.at(-1)).toMatch(/^vstore: vms\[1\]\.disks\[0\]\.file: cannot open .*missing\.img: ENOENT: no such file or directory/);
      expect(r2.stderr).toMatch(/"msg":"stopped: every disk flushed, sockets removed"/);
      expect(existsSync(path.join(dir, 'run', 'vm0-a.sock'))).toBe(false);
    }
  });

  it('on SIGTERM during startup: stops what was started, removes the sockets, exits 0', async () => {
    const dir = tempDir('vsd-');
    const port = await freePort();
    const control = path.join(dir, 'control.sock');
    const config = path.join(dir, 'start.json');
    writeFileSync(path.join(dir, 'b.raw'), Buffer.alloc(0));
    writeFileSync(
      config,
      JSON.stringify({
        runDir: path.join(dir, 'run'),
        control,
        tcp: { host: '127.0.0.1', port },
        vms: [
          { name: 'vm1', disks: [{ name: 'disk0', file: 'a.raw', size: '64M' }, { name: 'disk1', file: 'b.raw', readOnly: true }] },
          { name: 'vm2', disks: [{ name: 'disk0', file: 'c.raw', size: '64M' }] },
        ],
      }),
    );
    const sockets = ['vm1-disk0.sock', 'vm1-disk1.sock', 'vm2-disk0.sock'].map((f) => path.join(dir, 'run', f));
    // SIGTERM at a few points: as the first disk's socket appears, and as the TCP port opens
    const triggers: Array<() => Promise<boolean>> = [async () => existsSync(sockets[0]!), async () => existsSync(sockets[0]!), () => canConnectTcp(port)];
    for (const ready of triggers) {
      const child = spawn(process.execPath, [VSTORE_BIN, 'serve', '--config', config], { stdio: ['ignore', 'pipe', 'pipe'] });
      live.add(child);
      let err = '';
      child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
      const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
      const deadline = Date.now() + 15_000;
      while (!(await ready())) {
        if (Date.now() > deadline) throw new Error(`not started after 15 s:\n${err}`);
        await new Promise((r) => setTimeout(r, 1));
      }
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 15_000);
      const res = await exited;
      clearTimeout(timer);
      live.delete(child);
      expect(res, err).toEqual({ code: 0, signal: null });
      expect(err.split('\n').filter((l) => l && !l.startsWith('{')), err).toEqual([]);
      expect(err).toMatch(/"msg":"exiting 0"/);
      for (const p of [control, ...sockets]) expect(existsSync(p), p).toBe(false);
    }
  });

  it('lists every configured export on TCP as soon as the port accepts', async () => {
    const dir = tempDir('vsd-');
    const port = await freePort();
    const config = path.join(dir, 'list.json');
    const vms = Array.from({ length: 4 }, (_, i) => ({ name: `vm${i}`, disks: [{ name: 'd0', file: `vm${i}-0.raw`, size: '8M' }, { name: 'd1', file: `vm${i}-1.raw`, size: '8M' }] }));
    writeFileSync(config, JSON.stringify({ runDir: path.join(dir, 'run'), control: path.join(dir, 'control.sock'), tcp: { host: '127.0.0.1', port }, vms }));
    const child = spawn(process.execPath, [VSTORE_BIN, 'serve', '--config', config], { stdio: ['ignore', 'pipe', 'pipe'] });
    live.add(child);
    let err = '';
    child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
    const deadline = Date.now() + 15_000;
    while (!(await canConnectTcp(port))) {
      if (Date.now() > deadline) throw new Error(`TCP port not open after 15 s:\n${err}`);
      await new Promise((r) => setTimeout(r, 1));
    }
    const list = await run('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${port}`], { check: false });
    child.kill('SIGTERM');
    const res = await exited;
    live.delete(child);
    expect(list.code, list.stderr).toBe(0);
    const names = (JSON.parse(list.stdout) as { exports: Array<{ 'export-name': string }> }).exports.map((e) => e['export-name']);
    expect(names.sort()).toEqual(vms.flatMap((vm) => [`${vm.name}/d0`, `${vm.name}/d1`]).sort());
    expect(res).toEqual({ code: 0, signal: null });
  });

  it('with TCP port 0, prints and reports the port it bound', async () => {
    const dir = tempDir('vsd-');
    const control = path.join(dir, 'run', 'control.sock');
    const config = path.join(dir, 'p0.yaml');
    writeFileSync(config, 'runDir: run\ntcp: { host: 127.0.0.1, port: 0 }\nvms:\n  - name: vm\n    disks:\n      - { name: d, file: d.img, size: 1M }\n');
    const d = await startDaemon(config, control);
    const st = JSON.parse((await vstore(['status', '--control', control, '--json'])).stdout) as { tcp: { host: string; port: number } };
    expect(st.tcp.host).toBe('127.0.0.1');
    expect(st.tcp.port).toBeGreaterThan(0);
    expect(await canConnectTcp(st.tcp.port)).toBe(true);
    const table = await vstore(['status', '--control', control]);
    expect(table.stdout.split('\n')[0]).toContain(`, TCP 127.0.0.1:${st.tcp.port} (exports VM/DISK)`);
    expect(d.out()).toContain(`vstore: control socket ${control}, TCP 127.0.0.1:${st.tcp.port}\n`);
    expect(await stopDaemon(d)).toEqual({ code: 0, signal: null });
  });

  it('on SIGTERM during writes: drains, flushes, exits 0, and every acknowledged write is in the file', async () => {
    const dir = tempDir('vsd-');
    const img = path.join(dir, 'w.img');
    const control = path.join(dir, 'run', 'control.sock');
    const config = path.join(dir, 'w.yaml');
    writeFileSync(config, `runDir: run\nvms:\n  - name: vm\n    disks:\n      - { name: d, file: w.img, size: 64M }\n`);
    const d = await startDaemon(config, control);
    const sock = path.join(dir, 'run', 'vm-d.sock');

    // fio keeps 16 requests in flight the whole time
    const fio = spawn(
      'fio',
      ['--name=w', '--ioengine=nbd', `--uri=nbd+unix:///?socket=${sock}`, '--rw=randwrite', '--bs=4k', '--iodepth=16', '--size=32M', '--time_based', '--runtime=30'],
      { stdio: 'ignore' },
    );
    live.add(fio);
    // qemu-io writes 256 KiB blocks, each with its own pattern, one after another
    const cmds: string[] = [];
    const N = 128;
    for (let i = 0; i < N; i++) cmds.push('-c', `write -P ${(i % 250) + 1} ${32 * MiB + i * 256 * 1024} 256k`);
    const qio = spawn('qemu-io', ['-f', 'raw', ...cmds, `nbd+unix:///?socket=${sock}`], { stdio: ['ignore', 'pipe', 'pipe'] });
    live.add(qio);
    let qout = '';
    qio.stdout!.on('data', (b: Buffer) => (qout += b.toString()));
    const qdone = new Promise<void>((resolve) => qio.on('exit', () => resolve()));
    const fdone = new Promise<void>((resolve) => fio.on('exit', () => resolve()));
    // SIGTERM once both clients are writing
    const deadline = Date.now() + 10_000;
    while (!/wrote/.test(qout) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
    await new Promise((r) => setTimeout(r, 300));
    const res = await stopDaemon(d);
    await Promise.all([qdone, fdone]);
    live.delete(fio);
    live.delete(qio);
    expect(res).toEqual({ code: 0, signal: null });
    expect(d.out()).toMatch(/"msg":"disk flushed"/);
    expect(existsSync(sock)).toBe(false);

    const acked = [...qout.matchAll(/wrote 262144\/262144 bytes at offset (\d+)/g)].map((m) => Number(m[1]));
    expect(acked.length).toBeGreaterThan(0);
    const data = readFileSync(img);
    for (const off of acked) {
      const i = (off - 32 * MiB) / (256 * 1024);
      const want = (i % 250) + 1;
      expect(data.subarray(off, off + 256 * 1024).every((x) => x === want), `write #${i} at ${off}`).toBe(true);
    }
  });
});

describe('vstore nbd', () => {
  it('makes its socket 0600, exits 0 on SIGTERM after flushing, and removes the socket', async () => {
    const dir = tempDir('vsn-');
    const img = path.join(dir, 'n.img');
    const sock = path.join(dir, 'n.sock');
    const child = spawn(process.execPath, [VSTORE_BIN, 'nbd', img, '--size', '8M', '--socket', sock], { stdio: ['ignore', 'pipe', 'pipe'] });
    live.add(child);
    let out = '';
    child.stdout!.on('data', (b: Buffer) => (out += b.toString()));
    child.stderr!.on('data', (b: Buffer) => (out += b.toString()));
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
    const deadline = Date.now() + 15_000;
    while (!(await canConnect(sock))) {
      if (Date.now() > deadline) throw new Error(`not listening:\n${out}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    expect(statSync(sock).mode & 0o777).toBe(0o600);
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x42 4096 8192', `nbd+unix:///?socket=${sock}`]);
    expect(out).toContain(`on nbd+unix:///?socket=${sock}`); // printed once listening
    child.kill('SIGTERM');
    expect(await exited).toEqual({ code: 0, signal: null });
    live.delete(child);
    expect(existsSync(sock)).toBe(false);
    expect(readFileSync(img).subarray(4096, 12288).every((x) => x === 0x42)).toBe(true);
    expect(out).toMatch(/"msg":"flushed"/);
  });

  it('gives one-line errors for user mistakes', async () => {
    const dir = tempDir('vsn-');
    const r = await vstore(['nbd', path.join(dir, 'missing.img'), '--socket', path.join(dir, 's.sock')]);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(`vstore: ${path.join(dir, 'missing.img')}: no such file (give --size SIZE to create it)\n`);
    const r2 = await vstore(['nbd', path.join(dir, 'x.img')]);
    expect(r2.stderr).toBe('vstore: nothing to listen on: give --socket PATH and/or --tcp HOST:PORT\n');
    const r3 = await vstore(['nbd', path.join(dir, 'x.img'), '--size', '12Q', '--socket', path.join(dir, 's.sock')]);
    expect(r3.stderr).toBe('vstore: --size: not a size: "12Q" (bytes, or a number with K, M, G, T suffix)\n');
  });
});
