import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { loadConfig, parseDocument } from '../../../lib/config/load.js';
import { ConfigError, parseConfig, parseDisk, parseSize, parseVm } from '../../../lib/config/schema.js';

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(path.join(tmpdir(), 'vstore-config-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function problems(fn: () => unknown): string[] {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(ConfigError);
    return (e as ConfigError).problems;
  }
  throw new Error('expected a ConfigError');
}

describe('parseSize', () => {
  it.each([
    [512, 512],
    ['512', 512],
    ['64K', 65536],
    ['1G', 2 ** 30],
    ['1GiB', 2 ** 30],
    ['1.5m', 1.5 * 2 ** 20],
    ['2T', 2 * 2 ** 40],
  ])('%s -> %d', (input, bytes) => expect(parseSize(input)).toBe(bytes));
  it.each(['', 'x', '1X', '-1', '0', '1.3', 0, -5, 1.5])('rejects %s', (input) => expect(parseSize(input)).toBeUndefined());
});

describe('parseConfig', () => {
  it('fills defaults and resolves paths', () => {
    const c = parseConfig({ vms: [{ name: 'vm1', disks: [{ name: 'disk0', file: 'img/d0.raw', size: '1G' }] }] }, '/etc/vstore');
    expect(c).toEqual({
      runDir: '/run/vstore',
      stateDir: '/run/vstore/state',
      nodes: [],
      control: '/run/vstore/control.sock',
      log: { level: 'info' },
      vms: [
        {
          name: 'vm1',
          disks: [
            {
              name: 'disk0',
              file: '/etc/vstore/img/d0.raw',
              size: 2 ** 30,
              readOnly: false,
              direct: false,
              nbd: { socket: '/run/vstore/vm1-disk0.sock', export: '' },
            },
          ],
          shares: [],
        },
      ],
    });
  });

  it('accepts an empty document', () => {
    expect(parseConfig(null, '/x').vms).toEqual([]);
  });

  it('takes explicit sockets, tcp and tls', () => {
    const c = parseConfig(
      {
        runDir: 'run',
        control: '/tmp/c.sock',
        log: { level: 'debug' },
        tcp: { port: 10810 },
        tls: { cert: 'c.pem', key: 'k.pem' },
        vms: [{ name: 'a', disks: [{ name: 'd', file: '/x', readOnly: true, nbd: { socket: 's.sock', export: 'e' } }] }],
      },
      '/base',
    );
    expect(c.runDir).toBe('/base/run');
    expect(c.control).toBe('/tmp/c.sock');
    expect(c.tcp).toEqual({ host: '127.0.0.1', port: 10810 });
    expect(c.tls).toEqual({ cert: '/base/c.pem', key: '/base/k.pem', mode: 'require' });
    expect(c.vms[0]!.disks[0]!.nbd).toEqual({ socket: '/base/s.sock', export: 'e' });
    expect(c.vms[0]!.disks[0]!.readOnly).toBe(true);
  });

  it('names the bad field', () => {
    expect(problems(() => parseConfig({ vms: [{ name: 'vm1', disks: [{ name: 'a', file: '/a' }, { name: 'b' }] }] }, '/'))).toEqual([
      'vms[0].disks[1].file: required (or give volume)',
    ]);
    expect(problems(() => parseConfig({ vms: [{ name: 'vm1', disks: [{ name: 'a', file: '/a', size: '12Q' }] }] }, '/'))[0]).toMatch(
      /^vms\[0\]\.disks\[0\]\.size: not a size/,
    );
    expect(problems(() => parseConfig({ tcp: { port: 'x' } }, '/'))).toEqual(['tcp.port: expected number, got string "x"']);
    expect(problems(() => parseConfig({ log: { level: 'loud' } }, '/'))[0]).toMatch(/^log\.level: /);
    expect(problems(() => parseConfig({ vms: [{ name: 'v', dsks: [] }] }, '/'))).toEqual(['vms[0].dsks: unknown field']);
    expect(problems(() => parseConfig({ vms: {} }, '/'))).toEqual(['vms: expected array, got an object']);
  });

  it('rejects bad names', () => {
    for (const name of ['a/b', '..', '.hidden', '', 'x'.repeat(65), 'a b']) {
      expect(problems(() => parseConfig({ vms: [{ name }] }, '/'))[0]).toMatch(/^vms\[0\]\.name: /);
    }
    expect(problems(() => parseConfig({ vms: [{ name: 'v', disks: [{ name: '../x', file: '/a' }] }] }, '/'))[0]).toMatch(
      /^vms\[0\]\.disks\[0\]\.name: /,
    );
  });

  it('rejects duplicate VM and disk names', () => {
    expect(problems(() => parseConfig({ vms: [{ name: 'a' }, { name: 'b' }, { name: 'a' }] }, '/'))).toEqual([
      'vms[2].name: duplicate VM name "a"',
    ]);
    expect(
      problems(() => parseConfig({ vms: [{ name: 'a', disks: [{ name: 'd', file: '/1' }, { name: 'd', file: '/2' }] }] }, '/')),
    ).toEqual(['vms[0].disks[1].name: duplicate disk name "d"']);
  });

  it('rejects shared and overlong sockets, and tls without tcp', () => {
    const shared = { socket: '/tmp/s.sock' };
    expect(
      problems(() => parseConfig({ vms: [{ name: 'a', disks: [{ name: 'd', file: '/1', nbd: shared }] }, { name: 'b', disks: [{ name: 'd', file: '/2', nbd: shared }] }] }, '/')),
    ).toEqual(['vms[1].disks[0].nbd.socket: socket /tmp/s.sock is also used by a/d']);
    expect(problems(() => parseConfig({ runDir: '/' + 'r'.repeat(100), vms: [{ name: 'a', disks: [{ name: 'd', file: '/1' }] }] }, '/'))[0]).toMatch(
      /^vms\[0\]\.disks\[0\]\.nbd\.socket: socket path .* longer than 107 bytes/,
    );
    expect(problems(() => parseConfig({ tls: { cert: 'c', key: 'k' } }, '/'))).toEqual(['tls: needs tcp (TLS is offered on the TCP listener only)']);
  });
});

describe('parseVm / parseDisk', () => {
  const ctx = { baseDir: '/b', runDir: '/r' };
  it('resolves one VM with paths relative to the request', () => {
    expect(parseVm({ name: 'v', disks: [{ name: 'd', file: 'x.img' }] }, ctx).disks[0]).toMatchObject({ file: '/b/x.img', nbd: { socket: '/r/v-d.sock', export: '' } });
    expect(parseVm({ name: 'v' }, ctx).disks).toEqual([]);
  });
  it('names fields relative to the object', () => {
    expect(problems(() => parseVm({ name: 'v', disks: [{ name: 'd' }] }, ctx))).toEqual(['disks[0].file: required (or give volume)']);
    expect(problems(() => parseDisk('v', { file: '/x' }, ctx))).toEqual(['name: required']);
    expect(problems(() => parseVm([], ctx))).toEqual(['(top level): expected object, got a list']);
  });
});

describe('loadConfig', () => {
  const write = (name: string, text: string): string => {
    const p = path.join(dir, name);
    writeFileSync(p, text);
    return p;
  };

  it('reads YAML with relative paths against the file', async () => {
    const p = write('a.yaml', 'runDir: run\nvms:\n  - name: vm1\n    disks:\n      - { name: disk0, file: d0.img, size: 1G }\n');
    const c = await loadConfig(p);
    expect(c.runDir).toBe(path.join(dir, 'run'));
    expect(c.vms[0]!.disks[0]!.file).toBe(path.join(dir, 'd0.img'));
    expect(c.vms[0]!.disks[0]!.nbd.socket).toBe(path.join(dir, 'run', 'vm1-disk0.sock'));
  });

  it('reads JSON by extension and by content', async () => {
    expect((await loadConfig(write('b.json', '{"vms":[{"name":"x"}]}'))).vms[0]!.name).toBe('x');
    expect((await loadConfig(write('b.conf', ' {"vms":[{"name":"y"}]}'))).vms[0]!.name).toBe('y');
  });

  it('names the file and the field', async () => {
    const p = write('bad.yaml', 'vms:\n  - name: vm1\n    disks:\n      - name: a\n        file: /a\n      - name: b\n');
    await expect(loadConfig(p)).rejects.toThrow(`${p}: vms[0].disks[1].file: required`);
  });

  it('reports syntax errors and missing files in one line', async () => {
    await expect(loadConfig(write('s.yaml', 'vms: [\n'))).rejects.toThrow(/s\.yaml: not valid YAML: /);
    await expect(loadConfig(write('s.json', '{'))).rejects.toThrow(/s\.json: not valid JSON: /);
    await expect(loadConfig(path.join(dir, 'none.yaml'))).rejects.toThrow(/none\.yaml: no such file/);
    await expect(loadConfig(write('dup.yaml', 'runDir: a\nrunDir: b\n'))).rejects.toThrow(/not valid YAML/);
  });

  it('parseDocument handles both formats', () => {
    expect(parseDocument('a: 1')).toEqual({ a: 1 });
    expect(parseDocument('{"a": 1}')).toEqual({ a: 1 });
  });
});

describe('remote volumes, resolver and embedded nodes', () => {
  it('a volume disk gets its defaults; the resolver and nodes resolve their paths', () => {
    const c = parseConfig(
      {
        resolver: { store: 'state/resolver.json', listen: ['unix:state/resolver.sock'] },
        nodes: [{ id: 'n1', data: 'n1', listen: ['unix:n1/nbd.sock', '127.0.0.1:0'] }],
        vms: [{ name: 'vm1', disks: [{ name: 'disk0', volume: { size: '1G' } }] }],
      },
      '/srv',
    );
    expect(c.resolver).toEqual({ store: '/srv/state/resolver.json', listen: ['unix:/srv/state/resolver.sock'] });
    expect(c.nodes).toEqual([{ id: 'n1', data: '/srv/n1', listen: ['unix:/srv/n1/nbd.sock', '127.0.0.1:0'], control: ['unix:/srv/n1/control.sock'] }]);
    expect(c.vms[0]!.disks[0]!.volume).toEqual({ name: 'vm1/disk0', size: 2 ** 30, replicas: 2, waitTimeoutMs: 60_000, rebuildAfterMs: 600_000, connections: 2, shortCircuit: true, shortCircuitWrites: true });
    expect(c.vms[0]!.disks[0]!.file).toBeUndefined();
  });

  it('refuses a volume without a resolver, file and volume together, nodes without a resolver, two resolvers', () => {
    expect(problems(() => parseConfig({ vms: [{ name: 'v', disks: [{ name: 'd', volume: { size: '1G' } }] }] }, '/'))).toEqual([
      'vms[0].disks[0].volume: a volume disk needs a resolver (top-level resolver)',
    ]);
    expect(problems(() => parseConfig({ resolver: { url: 'etcd://127.0.0.1:2379' }, vms: [{ name: 'v', disks: [{ name: 'd', file: 'x', volume: { size: '1G' } }] }] }, '/'))).toEqual([
      'vms[0].disks[0].volume: give either file or volume, not both',
    ]);
    expect(problems(() => parseConfig({ nodes: [{ id: 'a', data: 'd', listen: ['unix:s'] }] }, '/'))).toEqual(['nodes: storage nodes need a resolver to register in']);
    expect(problems(() => parseConfig({ resolver: { url: 'x:1', store: 'y' } }, '/'))).toEqual(['resolver.url: give either url (an external resolver) or store (an embedded one)']);
    expect(problems(() => parseConfig({ resolver: { store: 'y' }, vms: [{ name: 'v', disks: [{ name: 'd', volume: { size: '1G', replicas: 9 } }] }] }, '/'))).toEqual([
      'vms[0].disks[0].volume.replicas: at most 5',
    ]);
  });
});
