// The node's directory management (lib/node/dirs.ts): dir.create/delete/list/stat over the RPC,
// the index across a restart, nesting refused, deletion while hosts are attached.
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ROOT_ID } from '../../../lib/fs/tree.js';
import { RpcClient, type RpcError } from '../../../lib/rpc/index.js';
import { ctx, errno, writeFile } from './helpers.js';
import { remoteTree, startDirServer, type DirServer } from './remote-helpers.js';

let srv: DirServer;
let rpc: RpcClient;
beforeEach(async () => {
  srv = await startDirServer();
  rpc = new RpcClient(`unix:${srv.socket}`, { timeoutMs: 5000 });
});
afterEach(async () => {
  rpc.close();
  await srv.stop();
  fs.rmSync(srv.data, { recursive: true, force: true });
});

const code = (p: Promise<unknown>): Promise<string> => p.then(() => 'OK', (e: RpcError) => e.code);

describe('node directories', () => {
  it('creates idempotently and durably, lists, stats, and keeps the index across a restart', async () => {
    expect(await rpc.call('dir.create', { path: '/projects/alpha' })).toEqual({ path: '/projects/alpha', created: true });
    expect(await rpc.call('dir.create', { path: '/projects/alpha' })).toEqual({ path: '/projects/alpha', created: false });
    await rpc.call('dir.create', { path: '/home/u1' });
    expect(fs.statSync(srv.shareDir('/projects/alpha')).isDirectory()).toBe(true);
    expect(JSON.parse(fs.readFileSync(path.join(srv.data, 'dirs.json'), 'utf8')).dirs).toEqual(['/home/u1', '/projects/alpha']);
    // Intermediate directories are not shares.
    expect(await code(rpc.call('fs.attach', { path: '/projects' }))).toBe('ENOENT');
    const st = await rpc.call<{ path: string; sessions: number; capacity: number; free: number }>('dir.stat', { path: '/home/u1' });
    expect(st.sessions).toBe(0);
    expect(st.capacity).toBeGreaterThan(st.free);
    expect(await code(rpc.call('dir.stat', { path: '/home/u2' }))).toBe('ENOENT');
    rpc.close();
    await srv.stop();
    await srv.start();
    rpc = new RpcClient(`unix:${srv.socket}`, { timeoutMs: 5000 });
    expect(await rpc.call('dir.list')).toEqual([
      { path: '/home/u1', sessions: 0 },
      { path: '/projects/alpha', sessions: 0 },
    ]);
  });

  it('refuses shares nested in shares on one node', async () => {
    await rpc.call('dir.create', { path: '/a/b' });
    expect(await code(rpc.call('dir.create', { path: '/a/b/c' }))).toBe('EEXIST');
    expect(await code(rpc.call('dir.create', { path: '/a' }))).toBe('EEXIST');
    expect(await code(rpc.call('dir.create', { path: '/a/bc' }))).toBe('OK');
  });

  it('deletes a share: EBUSY while a host is attached, unless forced (the host then gets ENOENT)', async () => {
    await rpc.call('dir.create', { path: '/s' });
    const t = remoteTree(srv, '/s');
    await writeFile(t, ctx(), ROOT_ID, 'f', 'x');
    expect((await rpc.call<{ sessions: number }[]>('dir.list'))[0]!.sessions).toBe(1);
    expect(await code(rpc.call('dir.delete', { path: '/s' }))).toBe('EBUSY');
    expect(fs.existsSync(path.join(srv.shareDir('/s'), 'f'))).toBe(true);
    await rpc.call('dir.delete', { path: '/s', force: true });
    expect(fs.existsSync(srv.shareDir('/s'))).toBe(false);
    expect(await errno(t.getattr(ctx(), ROOT_ID))).toBe('ENOENT');
    expect(await code(rpc.call('dir.delete', { path: '/s' }))).toBe('ENOENT');
    await t.close();
    // Once the host is gone, a plain delete works.
    await rpc.call('dir.create', { path: '/s2' });
    const t2 = remoteTree(srv, '/s2');
    await t2.connect();
    await t2.close();
    for (let i = 0; i < 50 && (await rpc.call<{ sessions: number }[]>('dir.list'))[0]!.sessions; i++) await new Promise((r) => setTimeout(r, 20));
    await rpc.call('dir.delete', { path: '/s2' });
    expect(await rpc.call('dir.list')).toEqual([]);
  });
});
