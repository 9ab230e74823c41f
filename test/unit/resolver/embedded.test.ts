import { spawn } from 'node:child_process';
import { readFile, writeFile, readdir } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { tempDir } from '../../helpers/index.js';
import { silentLogger } from '../../../lib/log.js';
import { EmbeddedStore } from '../../../lib/resolver/embedded.js';
import { ResolverError, type NameRecord, type NodeRecord } from '../../../lib/resolver/types.js';

const G = 1024 ** 3;
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

function nodeRec(id: string, free: number, extra: Partial<NodeRecord> = {}): NodeRecord {
  return { id, nbd: [`unix:/run/${id}.sock`], control: [`unix:/run/${id}.ctl`], capacity: 100 * G, free, ...extra };
}

/** A clock the test moves. */
function clock(start = 1_000_000): { now: () => number; advance: (ms: number) => void } {
  let t = start;
  return { now: () => t, advance: (ms) => void (t += ms) };
}

async function codeOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(ResolverError);
    return (e as ResolverError).code;
  }
  throw new Error('did not throw');
}

describe('EmbeddedStore', () => {
  it('registers nodes; a node that stops heartbeating turns dead after its ttl; deregister ends liveness at once', async () => {
    const dir = tempDir('vstore-emb-');
    const c = clock();
    const s = await EmbeddedStore.open(path.join(dir, 'r.json'), { logger: silentLogger(), now: c.now });
    await s.registerNode(nodeRec('n1', 10 * G), 5000);
    await s.registerNode(nodeRec('n2', 20 * G), 5000);
    await s.registerNode(nodeRec('nbdkit1', 0, { static: true, control: [], capacity: 0 }));
    expect((await s.listNodes()).map((n) => [n.id, n.alive])).toEqual([
      ['n1', true],
      ['n2', true],
      ['nbdkit1', true],
    ]);
    c.advance(3000);
    await s.registerNode(nodeRec('n2', 19 * G), 5000); // heartbeat
    c.advance(2500); // n1: 5.5 s since its registration
    expect(await s.getNode('n1')).toMatchObject({ alive: false, seen: 1_000_000 });
    expect(await s.getNode('n2')).toMatchObject({ alive: true, free: 19 * G, seen: 1_003_000 });
    expect(await s.getNode('nbdkit1')).toMatchObject({ alive: true, static: true });
    c.advance(100_000);
    expect(await s.getNode('nbdkit1')).toMatchObject({ alive: true });
    // a dead node comes back with a heartbeat
    await s.registerNode(nodeRec('n1', 10 * G), 5000);
    expect(await s.getNode('n1')).toMatchObject({ alive: true });
    await s.deregisterNode('n1');
    expect(await s.getNode('n1')).toMatchObject({ alive: false });
    await s.deregisterNode('n1', { forget: true });
    expect(await s.getNode('n1')).toBeNull();
    expect(await codeOf(s.deregisterNode('n1'))).toBe('ENOENT');
    expect(await s.getNode('ghost')).toBeNull();
    await s.close();
  });

  it('refuses bad records and an id held by another live node or of the other kind', async () => {
    const s = await EmbeddedStore.open(path.join(tempDir('vstore-emb-'), 'r.json'), { logger: silentLogger() });
    expect(await codeOf(s.registerNode(nodeRec('bad id', 1)))).toBe('EINVAL');
    expect(await codeOf(s.registerNode({ ...nodeRec('n1', 1), free: -1 }))).toBe('EINVAL');
    expect(await codeOf(s.registerNode({ ...nodeRec('n1', 1), nbd: 'unix:/x' as never }))).toBe('EINVAL');
    expect(await codeOf(s.registerNode(nodeRec('n1', 1), 0))).toBe('EINVAL');
    await s.registerNode(nodeRec('n1', 1), 10_000);
    expect(await codeOf(s.registerNode(nodeRec('n1', 1, { control: ['127.0.0.1:9'] }), 10_000))).toBe('EEXIST');
    expect(await codeOf(s.registerNode(nodeRec('n1', 1, { static: true })))).toBe('EEXIST');
    await s.registerNode(nodeRec('st', 0, { static: true, control: [] }));
    expect(await codeOf(s.registerNode(nodeRec('st', 0), 10_000))).toBe('EEXIST');
    // once the holder deregistered, the id can move to another address
    await s.deregisterNode('n1');
    await s.registerNode(nodeRec('n1', 1, { control: ['127.0.0.1:9'] }), 10_000);
    expect((await s.getNode('n1'))!.control).toEqual(['127.0.0.1:9']);
    await s.close();
  });

  it('places on the most free live nodes; 20 placements of one name at once create it once', async () => {
    const s = await EmbeddedStore.open(path.join(tempDir('vstore-emb-'), 'r.json'), { logger: silentLogger() });
    await s.registerNode(nodeRec('a', 10 * G, { zone: 'z1' }), 10_000);
    await s.registerNode(nodeRec('b', 50 * G, { zone: 'z1' }), 10_000);
    await s.registerNode(nodeRec('c', 5 * G, { zone: 'z2' }), 10_000);
    await s.registerNode(nodeRec('d', 90 * G, { zone: 'z3' }), 10_000);
    await s.deregisterNode('d'); // dead: never chosen
    const results = await Promise.all(Array.from({ length: 20 }, () => s.placeName({ name: 'vm1/disk0', kind: 'volume', size: G, replicas: 2 })));
    expect(results.filter((r) => r.created)).toHaveLength(1);
    for (const r of results) expect(r.record).toEqual(results[0]!.record);
    expect(results[0]!.record.replicas.map((r) => r.node)).toEqual(['b', 'c']); // zones z1 and z2
    expect(await codeOf(s.placeName({ name: 'vm1/disk1', kind: 'volume', size: 20 * G, replicas: 2 }))).toBe('ENOSPC');
    expect(await s.getName('vm1/disk1')).toBeNull();
    expect((await s.chooseNodes(1, { exclude: ['b', 'c'] })).map((n) => n.id)).toEqual(['a']);
    await s.close();
  });

  it('putName is compare-and-set on the version; deleteName too; watchers see every change', async () => {
    const s = await EmbeddedStore.open(path.join(tempDir('vstore-emb-'), 'r.json'), { logger: silentLogger() });
    await s.registerNode(nodeRec('a', 10 * G), 10_000);
    await s.registerNode(nodeRec('b', 10 * G), 10_000);
    const seen: (NameRecord | null)[] = [];
    const stop = s.watchName('vm1/disk0', (r) => seen.push(r));
    const { record } = await s.placeName({ name: 'vm1/disk0', kind: 'volume', size: G, replicas: 1 });
    expect(record.version).toBe(1);
    const v2 = await s.putName({ ...record, replicas: [{ node: 'b', state: 'rebuilding' }], dirtyHost: 'host1' });
    expect(v2).toMatchObject({ version: 2, dirtyHost: 'host1', created: record.created });
    expect(await codeOf(s.putName({ ...record, dirtyHost: 'host2' }))).toBe('ESTALE');
    expect(await s.getName('vm1/disk0')).toEqual(v2);
    expect(await codeOf(s.putName({ ...v2, name: 'vm1/none' }))).toBe('ENOENT');
    expect(await codeOf(s.putName({ ...v2, replicas: [{ node: 'a', state: 'gone' as never }] }))).toBe('EINVAL');
    expect(await codeOf(s.deleteName('vm1/disk0', 1))).toBe('ESTALE');
    await s.deleteName('vm1/disk0', 2);
    expect(await codeOf(s.deleteName('vm1/disk0'))).toBe('ENOENT');
    await new Promise((r) => setTimeout(r, 0));
    expect(seen.map((r) => r?.version ?? null)).toEqual([1, 2, null]);
    stop();
    await s.placeName({ name: 'vm1/disk0', kind: 'volume', size: G, replicas: 1 });
    await new Promise((r) => setTimeout(r, 0));
    expect(seen).toHaveLength(3);
    await s.close();
  });

  it('keeps records across a reopen; liveness is not kept (non-static nodes dead until they heartbeat)', async () => {
    const file = path.join(tempDir('vstore-emb-'), 'r.json');
    const s = await EmbeddedStore.open(file, { logger: silentLogger() });
    await s.registerNode(nodeRec('a', 10 * G, { zone: 'z1' }), 60_000);
    await s.registerNode(nodeRec('st', 0, { static: true, control: [] }));
    await s.placeName({ name: 'vm1/disk0', kind: 'volume', size: G, replicas: 1 });
    await s.placeName({ name: '/projects/alpha', kind: 'directory', replicas: 1 });
    const before = await s.listNames();
    await s.close();
    expect(await codeOf(s.listNames())).toBe('EUNAVAIL');

    const s2 = await EmbeddedStore.open(file, { logger: silentLogger() });
    expect(await s2.listNames()).toEqual(before);
    expect(await s2.listNames('vm1/')).toEqual(before.filter((r) => r.name.startsWith('vm1/')));
    expect((await s2.listNodes()).map((n) => [n.id, n.alive, n.zone])).toEqual([
      ['a', false, 'z1'],
      ['st', true, undefined],
    ]);
    await s2.close();
  });

  it('ignores a torn temp file left by a crash, and refuses a store file that is not one', async () => {
    const dir = tempDir('vstore-emb-');
    const file = path.join(dir, 'r.json');
    const s = await EmbeddedStore.open(file, { logger: silentLogger() });
    await s.registerNode(nodeRec('st', 0, { static: true, control: [] }));
    await s.placeName({ name: 'v', kind: 'volume', size: G, replicas: 1, nodes: [{ node: 'st' }] });
    await s.close();
    const good = await readFile(file, 'utf8');
    // a crash in the middle of writing the next version: half a file under the temp name
    await writeFile(file + '.tmp', good.slice(0, good.length / 2));
    const s2 = await EmbeddedStore.open(file, { logger: silentLogger() });
    expect((await s2.getName('v'))?.replicas).toEqual([{ node: 'st', state: 'in-sync' }]);
    await s2.close();
    expect(await readdir(dir)).toEqual(['r.json']);
    // the main file torn (it never is, but a disk can lie): refuse rather than start empty
    await writeFile(file, good.slice(0, 40));
    expect(await codeOf(EmbeddedStore.open(file, { logger: silentLogger() }))).toBe('EINVAL');
    await writeFile(file, '{"hello": 1}');
    expect(await codeOf(EmbeddedStore.open(file, { logger: silentLogger() }))).toBe('EINVAL');
  });

  it('a process killed (SIGKILL) while placing names loses none it acknowledged, and its file is never torn', async () => {
    const dir = tempDir('vstore-emb-');
    const file = path.join(dir, 'r.json');
    const script = path.join(dir, 'child.ts');
    await writeFile(
      script,
      `import { EmbeddedStore } from ${JSON.stringify(path.join(ROOT, 'lib/resolver/embedded.js'))};
import { silentLogger } from ${JSON.stringify(path.join(ROOT, 'lib/log.js'))};
const s = await EmbeddedStore.open(${JSON.stringify(file)}, { logger: silentLogger() });
await s.registerNode({ id: 'a', nbd: ['unix:/a'], control: ['unix:/a.ctl'], capacity: 1e12, free: 1e12 }, 600000);
const start = (await s.listNames()).length;
process.stdout.write('ready ' + start + '\\n');
for (let i = start; ; i++) {
  await s.placeName({ name: 'vol/' + i, kind: 'volume', size: 4096, replicas: 1 });
  process.stdout.write('ok ' + i + '\\n');
}
`,
    );
    let acked = -1;
    for (const killAfterMs of [150, 40, 300]) {
      const child = spawn(path.join(ROOT, 'node_modules/.bin/vite-node'), [script], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      let err = '';
      child.stderr.on('data', (b) => (err += b));
      const exited = new Promise<NodeJS.Signals | null>((r) => child.on('exit', (_c, sig) => r(sig)));
      await new Promise<void>((resolve, reject) => {
        child.stdout.on('data', (b) => {
          out += b;
          if (/^ready /m.test(out)) resolve();
        });
        child.on('exit', () => reject(new Error(`child exited early: ${err}`)));
      });
      await new Promise((r) => setTimeout(r, killAfterMs));
      child.kill('SIGKILL');
      expect(await exited).toBe('SIGKILL');
      const oks = [...out.matchAll(/^ok (\d+)$/gm)].map((m) => Number(m[1]));
      expect(oks.length).toBeGreaterThan(0);
      acked = Math.max(acked, ...oks);
      // the file parses, and every acknowledged name is there (one more may be: written, not yet acknowledged)
      JSON.parse(await readFile(file, 'utf8'));
      const s = await EmbeddedStore.open(file, { logger: silentLogger() });
      const names = (await s.listNames('vol/')).map((r) => Number(r.name.slice(4))).sort((a, b) => a - b);
      await s.close();
      for (let i = 0; i <= acked; i++) expect(names[i]).toBe(i);
      expect(names.length - 1 - acked).toBeLessThanOrEqual(1);
      acked = names.length - 1;
    }
  });
});
