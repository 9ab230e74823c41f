// Shared directories on real `vstore node` processes, registered in a real `vstore resolver
// serve`: a share opened by path lands on the node with the most free space (the other node's
// DATA is a 32 MiB tmpfs), data written through host A is read through host B after close/open,
// the share survives `kill -9` and a restart of its node (open handles re-opened), and path
// escapes through the RPC stay inside the node's DATA/dirs/<path>.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openShare, type Share } from '../../lib/daemon/shares.js';
import { ROOT_ID } from '../../lib/fs/tree.js';
import { silentLogger } from '../../lib/log.js';
import { openResolver } from '../../lib/resolver/open.js';
import type { ResolverStore } from '../../lib/resolver/types.js';
import { RpcClient, type RpcError } from '../../lib/rpc/index.js';
import { startResolverService, startStorageNode, type NodeProc, type Proc } from '../helpers/cluster.js';
import { tempDir } from '../helpers/tmp.js';

const O_RDONLY = 0;
const O_WRONLY = 1;
const O_RDWR = 2;
const O_TRUNC = 0o1000;
const S_IFREG = 0o100000;
const b = (s: string): Buffer => Buffer.from(s);
const ctxA = { uid: 0, gid: 0, pid: 1, session: 'host-a' };
const ctxB = { uid: 0, gid: 0, pid: 1, session: 'host-b' };

async function errno(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    return (e as { code?: string }).code ?? String(e);
  }
  return 'OK';
}

describe('shared directories on storage nodes', () => {
  const dir = tempDir('vstore-ndirs-');
  const small = path.join(dir, 'small');
  let mounted = false;
  let resolverProc: Proc & { url: string };
  let resolver: ResolverStore;
  let nSmall: NodeProc;
  let nBig: NodeProc;
  const shares: Share[] = [];

  beforeAll(async () => {
    fs.mkdirSync(small);
    // A node with little free space: its DATA on a 32 MiB tmpfs (the test runs as root, as npm test does).
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=32m', 'tmpfs', small]);
    mounted = true;
    resolverProc = await startResolverService(path.join(dir, 'resolver'));
    // Ids chosen so that a tie would go to the small node: only free space can pick the big one.
    nSmall = await startStorageNode({ id: 'a-small', data: path.join(small, 'data'), resolver: resolverProc.url });
    nBig = await startStorageNode({ id: 'b-big', data: path.join(dir, 'big'), resolver: resolverProc.url });
    resolver = await openResolver(resolverProc.url, { logger: silentLogger() });
  }, 60_000);

  afterAll(async () => {
    for (const s of shares) await s.close().catch(() => {});
    await resolver?.close().catch(() => {});
    await nBig?.stop(false).catch(() => {});
    await nSmall?.stop(false).catch(() => {});
    await resolverProc?.stop(false).catch(() => {});
    if (mounted) execFileSync('umount', [small]);
  }, 60_000);

  const open = async (readOnly = false): Promise<Share> => {
    const s = await openShare({ path: '/projects/alpha', resolver, logger: silentLogger(), readOnly, reconnectTimeoutMs: 30_000 });
    shares.push(s);
    return s;
  };

  it('places the share on the node with the most free space and creates it there', async () => {
    const nodes = await resolver.listNodes();
    const free = Object.fromEntries(nodes.map((n) => [n.id, n.free]));
    expect(free['a-small']!).toBeLessThan(free['b-big']!);
    const a = await open();
    expect(a.node).toBe('b-big');
    expect(a.created).toBe(true);
    expect(fs.statSync(path.join(nBig.data, 'dirs/projects/alpha')).isDirectory()).toBe(true);
    expect(fs.existsSync(path.join(nSmall.data, 'dirs'))).toBe(false);
    expect((await resolver.getName('/projects/alpha'))?.replicas.map((r) => r.node)).toEqual(['b-big']);
  });

  it('data written and closed through host A is read through host B after it opens the file again', async () => {
    const [a, hb] = [shares[0]!, await open()];
    expect(hb.created).toBe(false);
    const cr = await a.tree.create(ctxA, ROOT_ID, b('report.txt'), S_IFREG | 0o644, O_RDWR);
    await a.tree.write(ctxA, cr.entry.nodeId, cr.open.fh, 0, b('draft 1'));
    await a.tree.flush(ctxA, cr.entry.nodeId, cr.open.fh, 1n);
    await a.tree.release(ctxA, cr.entry.nodeId, cr.open.fh);
    expect(fs.readFileSync(path.join(nBig.data, 'dirs/projects/alpha/report.txt'), 'utf8')).toBe('draft 1');
    const idB = (await hb.tree.lookup(ctxB, ROOT_ID, b('report.txt'))).nodeId;
    const readB = async (): Promise<string> => {
      const h = await hb.tree.open(ctxB, idB, O_RDONLY);
      try {
        return (await hb.tree.read(ctxB, idB, h.fh, 0, 1000)).toString();
      } finally {
        await hb.tree.release(ctxB, idB, h.fh);
      }
    };
    expect(await readB()).toBe('draft 1');
    // A replaces the content; B has it cached (attributes for a second), yet its next open sees the new data.
    const h = await a.tree.open(ctxA, cr.entry.nodeId, O_WRONLY | O_TRUNC);
    await a.tree.write(ctxA, cr.entry.nodeId, h.fh, 0, b('final version'));
    await a.tree.flush(ctxA, cr.entry.nodeId, h.fh, 1n);
    await a.tree.release(ctxA, cr.entry.nodeId, h.fh);
    expect(await readB()).toBe('final version');
  });

  it('keeps working across kill -9 and a restart of the node: ids found again, open handles re-opened', async () => {
    const a = shares[0]!;
    const sub = await a.tree.mkdir(ctxA, ROOT_ID, b('logs'), 0o755);
    const cr = await a.tree.create(ctxA, sub.nodeId, b('app.log'), S_IFREG | 0o644, O_RDWR);
    const id = cr.entry.nodeId;
    const fh = cr.open.fh;
    await a.tree.write(ctxA, id, fh, 0, b('line 1\n'));
    await a.tree.fsync(ctxA, id, fh, false);
    const before = a.remote.sessions;
    await nBig.kill();
    for (let i = 0; i < 100 && a.remote.connected; i++) await new Promise((r) => setTimeout(r, 20));
    expect(a.remote.connected).toBe(false);
    // A call made while the node is down waits for it (reconnectTimeoutMs) and then succeeds.
    const during = a.tree.write(ctxA, id, fh, 7, b('line 2\n'));
    nBig = await startStorageNode({ id: 'b-big', data: nBig.data, resolver: resolverProc.url });
    expect(await during).toBe(7);
    expect(a.remote.sessions).toBe(before + 1);
    await a.tree.write(ctxA, id, fh, 14, b('line 3\n'));
    await a.tree.flush(ctxA, id, fh, 1n);
    expect((await a.tree.read(ctxA, id, fh, 0, 100)).toString()).toBe('line 1\nline 2\nline 3\n');
    await a.tree.release(ctxA, id, fh);
    expect(fs.readFileSync(path.join(nBig.data, 'dirs/projects/alpha/logs/app.log'), 'utf8')).toBe('line 1\nline 2\nline 3\n');
    // Host B, idle during the restart, reconnects on its next call and sees the file.
    const hb = shares[1]!;
    const logs = (await hb.tree.lookup(ctxB, ROOT_ID, b('logs'))).nodeId;
    const idB = (await hb.tree.lookup(ctxB, logs, b('app.log'))).nodeId;
    const h = await hb.tree.open(ctxB, idB, O_RDONLY);
    expect((await hb.tree.read(ctxB, idB, h.fh, 0, 100)).toString()).toBe('line 1\nline 2\nline 3\n');
    await hb.tree.release(ctxB, idB, h.fh);
  }, 60_000);

  it('path escapes through the RPC stay inside DATA/dirs/<path>', async () => {
    const a = shares[0]!;
    const canary = path.join(nBig.data, 'canary');
    fs.writeFileSync(canary, 'canary');
    const outsideDir = path.join(dir, 'outside');
    fs.mkdirSync(outsideDir, { recursive: true });
    // Through the share: names with '..' or '/' are refused; symlinks out are stored, never followed.
    for (const name of ['..', '../canary', '../../canary', 'x/../../canary']) {
      expect(['EINVAL', 'EEXIST']).toContain(await errno(a.tree.create(ctxA, ROOT_ID, b(name), S_IFREG | 0o644, O_WRONLY)));
    }
    const abs = await a.tree.symlink(ctxA, ROOT_ID, b('abs'), b(outsideDir));
    const rel = await a.tree.symlink(ctxA, ROOT_ID, b('rel'), b('../../../outside'));
    for (const l of [abs, rel]) {
      expect(await errno(a.tree.create(ctxA, l.nodeId, b('planted'), S_IFREG | 0o644, O_WRONLY))).toBe('ENOTDIR');
      expect(await errno(a.tree.lookup(ctxA, l.nodeId, b('x')))).toBe('ENOTDIR');
      expect(await errno(a.tree.open(ctxA, l.nodeId, O_RDWR))).not.toBe('OK');
    }
    expect(fs.readdirSync(outsideDir)).toEqual([]);
    // Raw RPC to the node: bad share paths, a symlink planted among the shares, forged ids.
    const rpc = new RpcClient(`unix:${path.join(nBig.data, 'control.sock')}`);
    try {
      const code = (p: Promise<unknown>): Promise<string> => p.then(() => 'OK', (e: RpcError) => e.code);
      for (const p of ['/../canary', '/projects/alpha/../../..', '/projects/./alpha', 'projects', '/a/b/', '/']) {
        expect(await code(rpc.call('dir.create', { path: p }))).toBe('EINVAL');
        expect(await code(rpc.call('fs.attach', { path: p }))).toBe('EINVAL');
      }
      fs.symlinkSync(outsideDir, path.join(nBig.data, 'dirs', 'evil'));
      expect(await code(rpc.call('dir.create', { path: '/evil/inside' }))).toBe('ELOOP');
      expect(fs.readdirSync(outsideDir)).toEqual([]);
      const { sid } = await rpc.call<{ sid: string }>('fs.attach', { path: '/projects/alpha' });
      for (const n of [2, 3, 7, 1000]) expect(await code(rpc.call('fs.getattr', { s: sid, c: { u: 0, g: 0, p: 0 }, n }))).toBe('ENOENT');
      expect(await code(rpc.call('fs.read', { s: sid, c: { u: 0, g: 0, p: 0 }, n: ROOT_ID, fh: 1, off: 0, size: 10 }))).toBe('EBADF');
    } finally {
      rpc.close();
    }
    expect(fs.readFileSync(canary, 'utf8')).toBe('canary');
  });

  it('a read-only share refuses writes on the host and on the node', async () => {
    const ro = await open(true);
    expect(await errno(ro.tree.create(ctxA, ROOT_ID, b('nope'), S_IFREG | 0o644, O_WRONLY))).toBe('EROFS');
    // Below the host's read-only layer, the node's read-only session refuses too.
    expect(await errno(ro.remote.mkdir(ctxA, ROOT_ID, b('nope'), 0o755))).toBe('EROFS');
    expect(fs.existsSync(path.join(nBig.data, 'dirs/projects/alpha/nope'))).toBe(false);
  });
});
