// StableIdFileTree over LocalFileTree on a temp dir: the guest's ids and open handles keep working
// after snapshot() in one tree instance and restore() over a new one (what a live handoff does
// between two daemon processes); ESTALE for what cannot be found again.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { FileTreeLayer } from '../../../lib/fs/layer.js';
import { LocalFileTree } from '../../../lib/fs/local.js';
import { LOCK_EOF, LockManager } from '../../../lib/fs/locks.js';
import { StableIdFileTree, type StableSnapshot } from '../../../lib/fs/stable.js';
import { F_RDLCK, F_UNLCK, F_WRLCK, RENAME_EXCHANGE, ROOT_ID, type FileTree, type FsContext } from '../../../lib/fs/tree.js';
import { O_APPEND, O_RDONLY, O_RDWR, O_WRONLY, S_IFREG, b, ctx, errno, listAll, readFile, walk, writeFile } from '../fs/helpers.js';

const c = ctx('vm1/s#1');

/** What a storage node does: each host connection is a session of its own (same guest session name, other lock owners). */
class NodeSession extends FileTreeLayer {
  constructor(
    inner: FileTree,
    private readonly conn: string,
  ) {
    super(inner);
  }
  protected override mapCtx(x: FsContext): FsContext {
    return { ...x, session: `${this.conn}:${x.session}` };
  }
  override forget(nodeId: number, nlookup: number, session?: string): void {
    super.forget(nodeId, nlookup, session === undefined ? undefined : `${this.conn}:${session}`);
  }
  override endSession(session: string): Promise<void> {
    return super.endSession(`${this.conn}:${session}`);
  }
}

describe('StableIdFileTree', () => {
  let dir: string;
  const trees: StableIdFileTree[] = [];
  const open = async (): Promise<StableIdFileTree> => {
    const t = new StableIdFileTree(await LocalFileTree.open(dir));
    trees.push(t);
    return t;
  };
  /** Snapshot through JSON (what crosses the process boundary), restore over a fresh LocalFileTree. */
  const handoff = async (old: StableIdFileTree) => {
    const snap = JSON.parse(JSON.stringify(old.snapshot())) as StableSnapshot;
    const r = await StableIdFileTree.restore(await LocalFileTree.open(dir), snap);
    trees.push(r.tree);
    return r;
  };

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vstore-stable-'));
  });
  afterEach(async () => {
    for (const t of trees.splice(0)) await t.close().catch(() => {});
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('hands out its own ids and handles, one id per inode, and forwards what it is asked', async () => {
    const t = await open();
    const id = await writeFile(t, c, ROOT_ID, 'a', 'hello');
    expect((await readFile(t, c, id)).toString()).toBe('hello');
    expect((await t.lookup(c, ROOT_ID, b('a'))).nodeId).toBe(id);
    const l = await t.link(c, id, ROOT_ID, b('a2'));
    expect(l.nodeId).toBe(id);
    expect(await errno(t.getattr(c, 9999))).toBe('ENOENT');
    expect(await errno(t.read(c, id, 9999, 0, 10))).toBe('EBADF');
    // another session cannot use this session's ids
    expect(await errno(t.getattr(ctx('other'), id))).toBe('ENOENT');
    // forget down to zero drops the record (lookups: create 1 + lookup 1 + link 1)
    t.forget(id, 3);
    expect(await errno(t.getattr(c, id))).toBe('ENOENT');
  });

  it('after restore in a new tree instance, ids and open handles still work (reads, writes, appends, listings)', async () => {
    fs.mkdirSync(path.join(dir, 'd/e'), { recursive: true });
    fs.writeFileSync(path.join(dir, 'd/e/f'), 'deep');
    const big = Buffer.alloc(100_000, 7);
    fs.writeFileSync(path.join(dir, 'big'), big);
    for (let i = 0; i < 50; i++) fs.writeFileSync(path.join(dir, 'd', `n${i}`), String(i));
    const t = await open();
    const f = await walk(t, c, 'd/e/f');
    const d = await walk(t, c, 'd');
    const bigId = await walk(t, c, 'big');
    const rfh = (await t.open(c, bigId, O_RDONLY)).fh;
    const { entry: logE, open: logO } = await t.create(c, ROOT_ID, b('log'), S_IFREG | 0o644, O_WRONLY | O_APPEND);
    await t.write(c, logE.nodeId, logO.fh, 0, b('one\n'));
    // a directory listing half done
    const dfh = (await t.opendir(c, d, 0)).fh;
    const first = await t.readdir(c, d, dfh, 0, 20);
    // a directory renamed through the layer: its child's path follows
    await t.rename(c, ROOT_ID, b('d'), ROOT_ID, b('dd'), 0);

    const { tree: t2, report } = await handoff(t);
    await t.close(); // the old process goes away: its fds close
    expect(report.staleNodes).toBe(0);
    expect(report.staleHandles).toBe(0);
    expect((await readFile(t2, c, f)).toString()).toBe('deep');
    expect((await t2.read(c, bigId, rfh, 90_000, 20_000)).equals(big.subarray(90_000))).toBe(true);
    // O_APPEND survives: the offset given is ignored
    await t2.write(c, logE.nodeId, logO.fh, 0, b('two\n'));
    await t2.release(c, logE.nodeId, logO.fh);
    expect(fs.readFileSync(path.join(dir, 'log'), 'utf8')).toBe('one\ntwo\n');
    // the kernel continues at any entry of the last batch (READDIRPLUS may have sent only part of it)
    const sent = first.slice(0, 10);
    const rest: string[] = [];
    let off = sent[sent.length - 1]!.offset;
    for (;;) {
      const ents = await t2.readdir(c, d, dfh, off, 20);
      if (!ents.length) break;
      rest.push(...ents.map((e) => e.name.toString()));
      off = ents[ents.length - 1]!.offset;
    }
    expect(rest.length).toBeGreaterThan(0);
    const all = [...sent.map((e) => e.name.toString()), ...rest].filter((n) => n !== '.' && n !== '..').sort();
    expect(all).toEqual([...Array.from({ length: 50 }, (_, i) => `n${i}`), 'e'].sort());
    await t2.releasedir(c, d, dfh);
    // new work after the handoff: lookups of known names give the same ids, new ones new ids
    expect((await t2.lookup(c, d, b('e'))).nodeId).toBe(await walk(t2, c, 'dd/e'));
    const g = await writeFile(t2, c, d, 'g', 'new');
    expect(g).toBeGreaterThan(bigId);
    expect(fs.readFileSync(path.join(dir, 'dd/g'), 'utf8')).toBe('new');
    expect(await listAll(t2, c, ROOT_ID)).toEqual(expect.arrayContaining(['dd', 'big', 'log']));
    // handles released after the handoff are gone
    await t2.release(c, bigId, rfh);
    expect(await errno(t2.read(c, bigId, rfh, 0, 1))).toBe('EBADF');
    // and a second handoff of the restored table works the same
    const { tree: t3, report: r3 } = await handoff(t2);
    await t2.close();
    expect(r3.staleNodes).toBe(0);
    expect((await readFile(t3, c, f)).toString()).toBe('deep');
  });

  it('ESTALE after restore for an unlinked open file and for a name changed by someone else; the rest still works', async () => {
    fs.writeFileSync(path.join(dir, 'gone'), 'bye');
    fs.writeFileSync(path.join(dir, 'swapped'), 'first');
    fs.writeFileSync(path.join(dir, 'stays'), 'here');
    const t = await open();
    const gone = await walk(t, c, 'gone');
    const gfh = (await t.open(c, gone, O_RDWR)).fh;
    await t.unlink(c, ROOT_ID, b('gone')); // open, unlinked: still readable in this process
    expect((await t.read(c, gone, gfh, 0, 10)).toString()).toBe('bye');
    const swapped = await walk(t, c, 'swapped');
    const stays = await walk(t, c, 'stays');
    const sfh = (await t.open(c, stays, O_RDONLY)).fh;
    // someone else replaces "swapped" behind the layer's back
    fs.renameSync(path.join(dir, 'stays'), path.join(dir, 'tmp'));
    fs.writeFileSync(path.join(dir, 'swapped.new'), 'second');
    fs.renameSync(path.join(dir, 'swapped.new'), path.join(dir, 'swapped'));
    fs.renameSync(path.join(dir, 'tmp'), path.join(dir, 'stays'));

    const { tree: t2, report } = await handoff(t);
    expect(report).toEqual({ nodes: 3, handles: 2, staleNodes: 2, staleHandles: 1, locks: 0, lostLocks: 0 });
    expect(await errno(t2.getattr(c, gone))).toBe('ESTALE');
    expect(await errno(t2.read(c, gone, gfh, 0, 10))).toBe('ESTALE');
    expect(await errno(t2.getattr(c, swapped))).toBe('ESTALE');
    // a fresh lookup of the name gets a new id for the new file
    const again = await t2.lookup(c, ROOT_ID, b('swapped'));
    expect(again.nodeId).not.toBe(swapped);
    expect((await readFile(t2, c, again.nodeId)).toString()).toBe('second');
    // the file moved away and back is the same inode: found again
    expect((await t2.read(c, stays, sfh, 0, 10)).toString()).toBe('here');
    // releasing a stale handle and forgetting stale ids is quiet
    await t2.release(c, gone, gfh);
    t2.forget(gone, 1);
    expect(await errno(t2.getattr(c, gone))).toBe('ENOENT');
  });

  it('keeps names right through exchange, rename over an existing name, rmdir and readdirplus', async () => {
    fs.writeFileSync(path.join(dir, 'x'), 'X');
    fs.writeFileSync(path.join(dir, 'y'), 'Y');
    fs.mkdirSync(path.join(dir, 'sub'));
    fs.writeFileSync(path.join(dir, 'sub/p'), 'P');
    const t = await open();
    const x = await walk(t, c, 'x');
    const y = await walk(t, c, 'y');
    await t.rename(c, ROOT_ID, b('x'), ROOT_ID, b('y'), RENAME_EXCHANGE);
    const sub = await walk(t, c, 'sub');
    const dfh = (await t.opendir(c, sub, 0)).fh;
    const plus = await t.readdirplus(c, sub, dfh, 0, 10);
    const p = plus.find((e) => e.name.toString() === 'p')!.entry!.nodeId;
    await t.releasedir(c, sub, dfh);
    await t.rename(c, sub, b('p'), ROOT_ID, b('x'), 0); // p replaces x (which holds Y's file)
    const { tree: t2, report } = await handoff(t);
    expect(report.staleNodes).toBe(1); // y's old file, replaced
    expect((await readFile(t2, c, x)).toString()).toBe('X'); // x's file is now named y
    expect((await readFile(t2, c, p)).toString()).toBe('P'); // found under its new name
    expect(await errno(t2.getattr(c, y))).toBe('ESTALE');
  });

  it('takes the guest\'s POSIX locks and flocks again after a restore (a fresh lock table: at once)', async () => {
    fs.writeFileSync(path.join(dir, 'l'), 'x'.repeat(1000));
    const t = await open();
    const id = await walk(t, c, 'l');
    const fh = (await t.open(c, id, O_RDWR)).fh;
    const fh2 = (await t.open(c, id, O_RDONLY)).fh;
    await t.setlk(c, id, fh, 7n, { start: 0, end: 99, type: F_WRLCK, pid: 70 }, { wait: false, flock: false });
    await t.setlk(c, id, fh, 7n, { start: 50, end: 59, type: F_UNLCK, pid: 70 }, { wait: false, flock: false }); // split in two
    await t.setlk(c, id, fh2, 9n, { start: 0, end: LOCK_EOF, type: F_RDLCK, pid: 90 }, { wait: false, flock: true });
    // a lock taken and given back is not carried
    await t.setlk(c, id, fh, 8n, { start: 500, end: 600, type: F_WRLCK, pid: 80 }, { wait: false, flock: false });
    await t.flush(c, id, fh, 8n);
    const { tree: t2, report } = await handoff(t);
    expect([report.locks, report.lostLocks]).toEqual([3, 0]);
    await t2.relocked;
    const other = { start: 0, end: LOCK_EOF, type: F_WRLCK, pid: 1 };
    expect(await t2.getlk(c, id, fh, 99n, other)).toEqual({ start: 0, end: 49, type: F_WRLCK, pid: 70 });
    expect(await t2.getlk(c, id, fh, 99n, { ...other, start: 50, end: 59 })).toMatchObject({ type: F_UNLCK });
    expect(await t2.getlk(c, id, fh, 99n, { ...other, start: 60, end: 99 })).toMatchObject({ start: 60, end: 99, type: F_WRLCK });
    expect(await t2.getlk(c, id, fh, 99n, { ...other, start: 500, end: 600 })).toMatchObject({ type: F_UNLCK });
    const fh3 = (await t2.open(c, id, O_RDONLY)).fh;
    expect(await errno(t2.setlk(c, id, fh3, 1n, { start: 0, end: LOCK_EOF, type: F_WRLCK, pid: 1 }, { wait: false, flock: true }))).toBe('EAGAIN');
    // the owner's close gives them up, after the handoff as before
    await t2.flush(c, id, fh, 7n);
    await t2.release(c, id, fh2);
    expect(await t2.getlk(c, id, fh, 99n, other)).toMatchObject({ type: F_UNLCK });
    await t2.setlk(c, id, fh3, 1n, { start: 0, end: LOCK_EOF, type: F_WRLCK, pid: 1 }, { wait: false, flock: true });
  });

  it('with a lock table shared with the old tree (a storage node), waits for the old session to let go; a guest unlock meanwhile wins', async () => {
    fs.writeFileSync(path.join(dir, 'l'), 'x');
    const shared = new LockManager();
    const oldTree = new StableIdFileTree(new NodeSession(await LocalFileTree.open(dir, { locks: shared }), 'old'));
    trees.push(oldTree);
    const id = await walk(oldTree, c, 'l');
    const fh = (await oldTree.open(c, id, O_RDWR)).fh;
    await oldTree.setlk(c, id, fh, 7n, { start: 0, end: 9, type: F_WRLCK, pid: 70 }, { wait: false, flock: false });
    await oldTree.setlk(c, id, fh, 8n, { start: 20, end: 29, type: F_WRLCK, pid: 80 }, { wait: false, flock: false });
    const snap = JSON.parse(JSON.stringify(oldTree.snapshot())) as StableSnapshot;
    const { tree: t2 } = await StableIdFileTree.restore(new NodeSession(await LocalFileTree.open(dir, { locks: shared }), 'new'), snap);
    trees.push(t2);
    let relocked = false;
    void t2.relocked.then(() => (relocked = true));
    await new Promise((r) => setTimeout(r, 50));
    expect(relocked).toBe(false); // the old session still holds them
    // the guest gives up owner 8's lock before the old session is gone: it must not come back
    await t2.setlk(c, id, fh, 8n, { start: 20, end: 29, type: F_UNLCK, pid: 80 }, { wait: false, flock: false });
    await oldTree.inner.endSession(c.session); // the old process lets go (its node session ends)
    await t2.relocked;
    const probe = (await t2.open(ctx('probe'), await walk(t2, ctx('probe'), 'l'), O_RDWR)).fh;
    const pid = await walk(t2, ctx('probe'), 'l');
    expect(await errno(t2.setlk(ctx('probe'), pid, probe, 1n, { start: 0, end: 9, type: F_WRLCK, pid: 1 }, { wait: false, flock: false }))).toBe('EAGAIN');
    await t2.setlk(ctx('probe'), pid, probe, 1n, { start: 20, end: 29, type: F_WRLCK, pid: 1 }, { wait: false, flock: false });
  });
});
