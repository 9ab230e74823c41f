import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { buildRecord, chooseNodes, placeRecord } from '../../../lib/resolver/placement.js';
import { ResolverError, type NodeStatus } from '../../../lib/resolver/types.js';

const G = 1024 ** 3;

function node(id: string, free: number, extra: Partial<NodeStatus> = {}): NodeStatus {
  return { id, nbd: [`unix:/run/${id}.sock`], control: [`unix:/run/${id}.ctl`], capacity: 100 * G, free, alive: true, seen: 1, ...extra };
}

function thrown(fn: () => unknown): ResolverError {
  try {
    fn();
  } catch (e) {
    return e as ResolverError;
  }
  throw new Error('did not throw');
}

describe('chooseNodes', () => {
  it('picks the nodes with the most free space first', () => {
    const nodes = [node('a', 10 * G), node('b', 50 * G), node('c', 30 * G), node('d', 40 * G)];
    expect(chooseNodes(nodes, 2, {}).map((n) => n.id)).toEqual(['b', 'd']);
    expect(chooseNodes(nodes, 4, {}).map((n) => n.id)).toEqual(['b', 'd', 'c', 'a']);
  });

  it('skips dead nodes, static nodes, nodes without a control address, excluded and too-full ones', () => {
    const nodes = [
      node('dead', 90 * G, { alive: false }),
      node('static', 80 * G, { static: true, control: [] }),
      node('noctl', 70 * G, { control: [] }),
      node('excluded', 60 * G),
      node('small', 1 * G),
      node('ok1', 5 * G),
      node('ok2', 4 * G),
    ];
    expect(chooseNodes(nodes, 2, { size: 2 * G, exclude: ['excluded'] }).map((n) => n.id)).toEqual(['ok1', 'ok2']);
    const e = thrown(() => chooseNodes(nodes, 3, { size: 2 * G, exclude: ['excluded'] }));
    expect(e).toBeInstanceOf(ResolverError);
    expect(e.code).toBe('ENOSPC');
    expect(e.message).toContain('need 3 live node(s) with 2147483648 bytes free, found 2');
    expect(e.message).toContain('1 dead');
    expect(e.message).toContain('1 static');
    expect(e.message).toContain('1 excluded');
  });

  it('prefers a node in a new zone over more free space, and falls back to distinct nodes', () => {
    const nodes = [node('a1', 90 * G, { zone: 'a' }), node('a2', 80 * G, { zone: 'a' }), node('b1', 10 * G, { zone: 'b' }), node('c1', 5 * G, { zone: 'c' })];
    expect(chooseNodes(nodes, 2, {}).map((n) => n.id)).toEqual(['a1', 'b1']);
    expect(chooseNodes(nodes, 3, {}).map((n) => n.id)).toEqual(['a1', 'b1', 'c1']);
    // four replicas, three zones: the fourth goes to the most free node left
    expect(chooseNodes(nodes, 4, {}).map((n) => n.id)).toEqual(['a1', 'b1', 'c1', 'a2']);
  });

  it('fails with ENOSPC when there are no nodes at all, and returns nothing for count 0', () => {
    expect(thrown(() => chooseNodes([], 1, {})).code).toBe('ENOSPC');
    expect(chooseNodes([], 0, {})).toEqual([]);
    expect(thrown(() => chooseNodes([], -1, {})).code).toBe('EINVAL');
  });

  const arbNode = fc.record({
    id: fc.constantFrom('n0', 'n1', 'n2', 'n3', 'n4', 'n5', 'n6', 'n7', 'n8', 'n9'),
    free: fc.integer({ min: 0, max: 100 }),
    // mostly placeable nodes, so that the interesting choices happen often
    alive: fc.constantFrom(true, true, true, false),
    isStatic: fc.constantFrom(false, false, false, false, true),
    hasControl: fc.constantFrom(true, true, true, true, false),
    zone: fc.option(fc.constantFrom('z1', 'z2', 'z3'), { nil: undefined, freq: 4 }),
  });
  const arbNodes = fc.array(arbNode, { maxLength: 12 }).map((xs) =>
    xs.map((x) =>
      node(x.id, x.free, {
        alive: x.alive,
        ...(x.isStatic ? { static: true } : {}),
        control: x.hasControl ? ['127.0.0.1:1'] : [],
        ...(x.zone ? { zone: x.zone } : {}),
      }),
    ),
  );

  it('property: distinct live placeable nodes with the space, spread over as many zones as possible, or ENOSPC', () => {
    fc.assert(
      fc.property(arbNodes, fc.integer({ min: 0, max: 6 }), fc.integer({ min: 0, max: 100 }), fc.subarray(['n0', 'n1', 'n2']), (nodes, count, size, exclude) => {
        // the first occurrence of an id is the node (later duplicates are ignored)
        const firstById = new Map<string, NodeStatus>();
        for (const n of nodes) if (!firstById.has(n.id)) firstById.set(n.id, n);
        const eligible = [...firstById.values()].filter((n) => n.alive && !n.static && n.control.length > 0 && n.free >= size && !exclude.includes(n.id));
        let chosen: NodeStatus[];
        try {
          chosen = chooseNodes(nodes, count, { size, exclude });
        } catch (e) {
          expect((e as ResolverError).code).toBe('ENOSPC');
          expect(eligible.length).toBeLessThan(count);
          return;
        }
        expect(chosen).toHaveLength(count);
        expect(new Set(chosen.map((n) => n.id)).size).toBe(count); // never the same node twice
        for (const n of chosen) {
          expect(n.alive).toBe(true); // never a dead node
          expect(n.static).toBeFalsy();
          expect(n.free).toBeGreaterThanOrEqual(size);
          expect(exclude).not.toContain(n.id);
          expect(eligible).toContain(n);
        }
        // zone spread maximal: as many distinct domains as the eligible nodes allow
        const dom = (n: NodeStatus): string => n.zone ?? `node:${n.id}`;
        const available = new Set(eligible.map(dom)).size;
        expect(new Set(chosen.map(dom)).size).toBe(Math.min(count, available));
        // within that, the first pick is the node with the most free space
        if (count > 0) expect(chosen[0]!.free).toBe(Math.max(...eligible.map((n) => n.free)));
      }),
      { numRuns: 2000 },
    );
  });
});

describe('placeRecord / buildRecord', () => {
  const nodes = [node('big', 50 * G), node('mid', 20 * G), node('nbdkit1', 0, { static: true, control: [], capacity: 0 })];

  it('builds version 1, every replica in sync, created now', () => {
    const rec = placeRecord({ name: 'vm1/disk0', kind: 'volume', size: G, replicas: 2 }, nodes, 1234);
    expect(rec).toEqual({
      name: 'vm1/disk0',
      kind: 'volume',
      size: G,
      version: 1,
      created: 1234,
      replicas: [
        { node: 'big', state: 'in-sync' },
        { node: 'mid', state: 'in-sync' },
      ],
    });
  });

  it('pins replicas first (static nodes only this way) and chooses the rest elsewhere', () => {
    const rec = placeRecord({ name: 'vm1/disk0', kind: 'volume', size: G, replicas: 2, nodes: [{ node: 'nbdkit1', export: 'disk0' }] }, nodes, 1);
    expect(rec.replicas).toEqual([
      { node: 'nbdkit1', export: 'disk0', state: 'in-sync' },
      { node: 'big', state: 'in-sync' },
    ]);
    expect(buildRecord({ name: '/projects/a', kind: 'directory', replicas: 1 }, [{ node: 'x' }], 5)).toEqual({
      name: '/projects/a',
      kind: 'directory',
      replicas: [{ node: 'x', state: 'in-sync' }],
      version: 1,
      created: 5,
    });
  });

  it('rejects bad requests', () => {
    const place = (req: object): ResolverError => thrown(() => placeRecord(req as never, nodes, 1));
    expect(place({ name: 'vm1/../x', kind: 'volume', size: G, replicas: 1 }).code).toBe('EINVAL');
    expect(place({ name: 'vm1/disk0', kind: 'volume', replicas: 1 }).code).toBe('EINVAL'); // no size
    expect(place({ name: 'vm1/disk0', kind: 'volume', size: G, replicas: 0 }).code).toBe('EINVAL');
    expect(place({ name: 'vm1/disk0', kind: 'volume', size: G, replicas: 1.5 }).code).toBe('EINVAL');
    expect(place({ name: 'projects', kind: 'directory', replicas: 1 }).code).toBe('EINVAL');
    expect(place({ name: 'vm1/disk0', kind: 'blob', size: G, replicas: 1 }).code).toBe('EINVAL');
    expect(place({ name: 'v', kind: 'volume', size: G, replicas: 1, nodes: [{ node: 'big' }, { node: 'big' }] }).code).toBe('EINVAL');
    expect(place({ name: 'v', kind: 'volume', size: G, replicas: 1, nodes: [{ node: 'big' }, { node: 'mid' }] }).code).toBe('EINVAL');
    expect(place({ name: 'v', kind: 'volume', size: G, replicas: 1, nodes: [{ node: 'ghost' }] }).code).toBe('ENOENT');
    expect(place({ name: 'v', kind: 'volume', size: 30 * G, replicas: 1, nodes: [{ node: 'mid' }] }).code).toBe('ENOSPC');
    expect(place({ name: 'v', kind: 'volume', size: 30 * G, replicas: 2 }).code).toBe('ENOSPC');
  });
});
