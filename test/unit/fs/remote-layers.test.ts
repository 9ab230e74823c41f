// The host-side layers of a share (read-only, uid/gid map), the per-connection bound of requests
// in flight on the node's RPC, and openShare through a resolver with two in-process nodes.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { openShare } from '../../../lib/daemon/shares.js';
import { IdMapFileTree } from '../../../lib/fs/idmap.js';
import { LocalFileTree } from '../../../lib/fs/local.js';
import { ReadOnlyFileTree } from '../../../lib/fs/readonly.js';
import { ROOT_ID } from '../../../lib/fs/tree.js';
import { silentLogger } from '../../../lib/log.js';
import { StorageNode } from '../../../lib/node/node.js';
import { EmbeddedStore } from '../../../lib/resolver/embedded.js';
import { RpcClient, RpcServer } from '../../../lib/rpc/index.js';
import { O_RDONLY, O_RDWR, O_TRUNC, O_WRONLY, S_IFREG, b, ctx, errno, readFile, walk, writeFile } from './helpers.js';

const cleanups: (() => Promise<unknown> | unknown)[] = [];
afterEach(async () => {
  for (const f of cleanups.splice(0).reverse()) await f();
});
function tmp(): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'vstore-layers-'));
  cleanups.push(() => fs.rmSync(d, { recursive: true, force: true }));
  return d;
}

describe('ReadOnlyFileTree', () => {
  it('refuses every mutation with EROFS and lets reads through', async () => {
    const d = tmp();
    fs.writeFileSync(path.join(d, 'f'), 'data');
    fs.mkdirSync(path.join(d, 'sub'));
    const local = await LocalFileTree.open(d);
    cleanups.push(() => local.close());
    const t = new ReadOnlyFileTree(local);
    const c = ctx();
    const id = await walk(t, c, 'f');
    const sub = await walk(t, c, 'sub');
    const refused = [
      t.setattr(c, id, { size: 0 }),
      t.mknod(c, ROOT_ID, b('n'), S_IFREG | 0o644, 0),
      t.mkdir(c, ROOT_ID, b('m'), 0o755),
      t.symlink(c, ROOT_ID, b('s'), b('f')),
      t.unlink(c, ROOT_ID, b('f')),
      t.rmdir(c, ROOT_ID, b('sub')),
      t.rename(c, ROOT_ID, b('f'), sub, b('g'), 0),
      t.link(c, id, sub, b('h')),
      t.create(c, ROOT_ID, b('new'), S_IFREG | 0o644, O_WRONLY),
      t.open(c, id, O_WRONLY),
      t.open(c, id, O_RDWR),
      t.open(c, id, O_RDONLY | O_TRUNC),
      t.setxattr(c, id, b('user.x'), b('1'), 0),
      t.removexattr(c, id, b('user.x')),
      t.access(c, id, 2),
    ];
    for (const p of refused) expect(await errno(p)).toBe('EROFS');
    const h = await local.open(c, id, O_RDWR);
    expect(await errno(t.write(c, id, h.fh, 0, b('x')))).toBe('EROFS');
    expect(await errno(t.fallocate(c, id, h.fh, 0, 0, 10))).toBe('EROFS');
    expect(await errno(t.copyFileRange(c, { nodeId: id, fh: h.fh, offset: 0 }, { nodeId: id, fh: h.fh, offset: 10 }, 2, 0))).toBe('EROFS');
    await local.release(c, id, h.fh);
    expect((await readFile(t, c, id)).toString()).toBe('data');
    await t.access(c, id, 4);
    expect(fs.readFileSync(path.join(d, 'f'), 'utf8')).toBe('data');
    expect(fs.readdirSync(d).sort()).toEqual(['f', 'sub']);
  });
});

describe('IdMapFileTree', () => {
  it('maps the caller down and the attributes up; unmapped ids become the overflow id', async () => {
    const d = tmp();
    const local = await LocalFileTree.open(d);
    cleanups.push(() => local.close());
    const t = new IdMapFileTree(local, [{ guest: 1000, host: 201000, count: 10 }], [{ guest: 100, host: 300100, count: 1 }]);
    const g = ctx('s1', 1003, 100);
    const id = await writeFile(t, g, ROOT_ID, 'mine', 'x');
    const st = fs.statSync(path.join(d, 'mine'));
    expect([st.uid, st.gid]).toEqual([201003, 300100]);
    const e = await t.lookup(g, ROOT_ID, b('mine'));
    expect([e.attr.uid, e.attr.gid]).toEqual([1003, 100]);
    await t.setattr(g, id, { uid: 1009 });
    expect(fs.statSync(path.join(d, 'mine')).uid).toBe(201009);
    expect((await t.getattr(g, id)).attr.uid).toBe(1009);
    fs.writeFileSync(path.join(d, 'root-owned'), 'x');
    expect((await t.lookup(g, ROOT_ID, b('root-owned'))).attr.uid).toBe(65534);
    expect(() => new IdMapFileTree(local, [{ guest: 0, host: 10, count: 5 }, { guest: 3, host: 100, count: 1 }], [])).toThrow(/overlap/);
  });
});

describe('RPC bound on requests in flight per connection', () => {
  it('stops reading a connection at maxInFlight and resumes as they complete', async () => {
    let active = 0;
    let peak = 0;
    const server = new RpcServer({
      logger: silentLogger(),
      maxInFlight: 4,
      handlers: {
        slow: async () => {
          active++;
          peak = Math.max(peak, active);
          await new Promise((r) => setTimeout(r, 20));
          active--;
          return 1;
        },
      },
    });
    const sock = path.join(tmp(), 'rpc.sock');
    await server.listen(`unix:${sock}`);
    cleanups.push(() => server.close());
    const client = new RpcClient(`unix:${sock}`);
    cleanups.push(() => client.close());
    const calls: Promise<unknown>[] = [];
    for (let i = 0; i < 40; i++) calls.push(client.call('slow'));
    expect((await Promise.all(calls)).length).toBe(40);
    expect(peak).toBe(4);
  });
});

describe('openShare', () => {
  it('places a new directory on the node with the most free space, creates it there, and serves it', async () => {
    const d = tmp();
    const resolver = await EmbeddedStore.open(path.join(d, 'resolver.json'), { logger: silentLogger() });
    cleanups.push(() => resolver.close());
    const nodes: StorageNode[] = [];
    for (const id of ['n1', 'n2']) {
      const data = path.join(d, id);
      const node = await StorageNode.start({ data, id, nbd: [`unix:${path.join(data, 'nbd.sock')}`], control: [`unix:${path.join(data, 'c.sock')}`], resolver, leaseTtlMs: 600_000, logger: silentLogger() });
      nodes.push(node);
      cleanups.push(() => node.stop());
    }
    // Both nodes share one filesystem: make n2 the roomier one in the resolver's eyes.
    const n1 = (await resolver.getNode('n1'))!;
    await resolver.registerNode({ ...n1, free: 1 }, 60_000);
    const share = await openShare({ path: '/projects/alpha', resolver, logger: silentLogger() });
    cleanups.push(() => share.close());
    expect(share.node).toBe('n2');
    expect(share.created).toBe(true);
    expect(fs.statSync(path.join(d, 'n2', 'dirs', 'projects', 'alpha')).isDirectory()).toBe(true);
    expect(fs.existsSync(path.join(d, 'n1', 'dirs'))).toBe(false);
    const c = ctx('vm1');
    await writeFile(share.tree, c, ROOT_ID, 'hello', 'from the host');
    expect(fs.readFileSync(path.join(d, 'n2', 'dirs', 'projects', 'alpha', 'hello'), 'utf8')).toBe('from the host');
    expect((await nodes[1]!.info()).dirs).toBe(1);
    // Opened again (another VM, read-only): the same record and node, not a new placement.
    const ro = await openShare({ path: '/projects/alpha', resolver, logger: silentLogger(), readOnly: true });
    cleanups.push(() => ro.close());
    expect([ro.node, ro.created]).toEqual(['n2', false]);
    const id = await walk(ro.tree, c, 'hello');
    expect((await readFile(ro.tree, c, id)).toString()).toBe('from the host');
    expect(await errno(ro.tree.unlink(c, ROOT_ID, b('hello')))).toBe('EROFS');
    await expect(openShare({ path: 'projects/alpha', resolver, logger: silentLogger() })).rejects.toMatchObject({ code: 'EINVAL' });
  });
});
