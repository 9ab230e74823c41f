// The engine over a real tree (LocalFileTree in a temp dir), without a kernel: two sessions on
// one tree, as two guests on one share — data, listings, locks between them, handles that are
// per session, and nothing left behind once both sessions end.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { LocalFileTree } from '../../../lib/fs/local.js';
import { FuseEngine } from '../../../lib/fuse/engine.js';
import { unpackDirentsPlus } from '../../../lib/fuse/codec.js';
import { Op } from '../../../lib/fuse/constants.js';
import { silentLogger } from '../../../lib/log.js';
import { F } from './frames.js';

const dirs: string[] = [];
afterAll(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })));

let u = 1n;
const h = (nodeId = 1) => ({ unique: u++, nodeId, uid: 0, gid: 0, pid: 11 });
async function call(e: FuseEngine, f: Buffer): Promise<{ error: number; body: Buffer }> {
  const r = Buffer.concat((await e.handle(f))!);
  return { error: r.readInt32LE(4), body: r.subarray(16) };
}
const nodeOf = (r: { body: Buffer }) => Number(r.body.readBigUInt64LE(0));

describe('FuseEngine over LocalFileTree: two sessions on one share', () => {
  it('data, listings, locks across sessions, per-session handles, nothing leaked at the end', async () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'vfuse-tree-'));
    dirs.push(dir);
    const tree = await LocalFileTree.open(dir);
    const a = new FuseEngine({ tree, logger: silentLogger(), session: 'a' });
    const b = new FuseEngine({ tree, logger: silentLogger(), session: 'b' });
    expect((await call(a, F.init(h()))).error).toBe(0);
    expect((await call(b, F.init(h()))).error).toBe(0);

    const d = nodeOf(await call(a, F.mkdir(h(1), 'd', 0o755, 0)));
    const created = await call(a, F.create(h(d), 'f', 0o2, 0o100644, 0));
    expect(created.error).toBe(0);
    const f = nodeOf(created);
    const fh = Number(created.body.readBigUInt64LE(128));
    expect((await call(a, F.write(h(f), fh, 0, Buffer.from('hello world')))).body.readUInt32LE(0)).toBe(11);
    expect((await call(a, F.read(h(f), fh, 6, 100))).body.toString()).toBe('world');

    // Session b sees it through its own lookups and handles.
    const bd = nodeOf(await call(b, F.lookup(h(1), 'd')));
    const bf = nodeOf(await call(b, F.lookup(h(bd), 'f')));
    const bo = await call(b, F.open(h(bf), 0o2));
    const bfh = Number(bo.body.readBigUInt64LE(0));
    expect((await call(b, F.read(h(bf), bfh, 0, 5))).body.toString()).toBe('hello');
    // a's handle is not b's: EBADF, not a's file.
    expect((await call(b, F.read(h(bf), fh, 0, 5))).error).toBe(-9);

    // A listing with room for two entries only: ".", ".." or "f" — whatever did not fit is
    // forgotten again by the engine, so the tree's count of live nodes does not grow.
    const od = await call(b, F.opendir(h(bd), 0));
    const dfh = Number(od.body.readBigUInt64LE(0));
    const nodesBefore = tree.stats.nodes;
    const first = unpackDirentsPlus((await call(b, F.read(h(bd), dfh, 0, 330, Op.READDIRPLUS))).body);
    expect(first.length).toBe(2);
    const rest = unpackDirentsPlus((await call(b, F.read(h(bd), dfh, first[1]!.offset, 4096, Op.READDIRPLUS))).body);
    expect([...first, ...rest].map((e) => e.name.toString()).sort()).toEqual(['.', '..', 'f']);
    const fEntry = [...first, ...rest].find((e) => e.name.toString() === 'f')!;
    expect(fEntry.nodeId).toBe(bf);
    expect(fEntry.attr.size).toBe(11);
    expect(tree.stats.nodes).toBe(nodesBefore);
    // The kernel forgets the one readdirplus lookup it got.
    await b.handle(F.forget(h(bf), 1));
    await call(b, F.release(h(bd), dfh, 0, 0n, Op.RELEASEDIR));

    // Locks between the sessions: a holds bytes 0..9, b conflicts, then waits and is granted
    // when a's owner closes (FLUSH releases its POSIX locks).
    expect((await call(a, F.lk(Op.SETLK, h(f), fh, 1n, 0, 9, 1, 100))).error).toBe(0);
    expect((await call(b, F.lk(Op.SETLK, h(bf), bfh, 2n, 5, 5, 1, 200))).error).toBe(-11);
    const conflict = await call(b, F.lk(Op.GETLK, h(bf), bfh, 2n, 0, 100, 1, 200));
    expect(conflict.body.readUInt32LE(16)).toBe(1); // F_WRLCK held ...
    expect(Number(conflict.body.readBigUInt64LE(8))).toBe(9); // ... up to byte 9
    const waiting = call(b, F.lk(Op.SETLKW, h(bf), bfh, 2n, 5, 5, 1, 200));
    let granted = false;
    void waiting.then(() => (granted = true));
    await new Promise((r) => setTimeout(r, 50));
    expect(granted).toBe(false);
    expect((await call(a, F.flush(h(f), fh, 1n))).error).toBe(0);
    expect((await waiting).error).toBe(0);

    // Ending a session drops its handles and lookups (and its locks); then the tree is empty.
    await a.end();
    await b.end();
    expect(tree.stats).toEqual({ nodes: 1, handles: 0 });
    await tree.close();
  });
});
