import { describe, expect, it } from 'vitest';
import { ConfigError, parseConfig, parseVm } from '../../../lib/config/schema.js';
import { shareMountCommand, shareQemuArgs } from '../../../lib/config/shares.js';

function problems(fn: () => unknown): string[] {
  try {
    fn();
  } catch (e) {
    if (e instanceof ConfigError) return e.problems;
    throw e;
  }
  throw new Error('no ConfigError');
}

describe('shares in the config', () => {
  it('fills defaults: socket in runDir, one queue, read-write; dir paths resolved against the config', () => {
    const c = parseConfig(
      {
        runDir: '/run/vstore',
        resolver: { url: 'unix:/run/r.sock' },
        vms: [{ name: 'vm1', shares: [{ tag: 'alpha', path: '/projects/alpha', target: '/mnt/a' }, { tag: 'iso', dir: 'iso', target: '/mnt/iso', readOnly: true, queues: 2 }] }],
      },
      '/etc/vstore',
    );
    expect(c.vms[0]!.shares).toEqual([
      { tag: 'alpha', path: '/projects/alpha', target: '/mnt/a', readOnly: false, socket: '/run/vstore/vm1-alpha.fs.sock', queues: 1 },
      { tag: 'iso', dir: '/etc/vstore/iso', target: '/mnt/iso', readOnly: true, socket: '/run/vstore/vm1-iso.fs.sock', queues: 2 },
    ]);
    expect(shareMountCommand(c.vms[0]!.shares[1]!)).toBe('mkdir -p /mnt/iso && mount -t virtiofs iso -o ro /mnt/iso');
    expect(shareQemuArgs(c.vms[0]!.shares[1]!, 1)).toEqual([
      '-chardev',
      'socket,id=vstore-fs1,path=/run/vstore/vm1-iso.fs.sock',
      '-device',
      'vhost-user-fs-pci,chardev=vstore-fs1,tag=iso,num-request-queues=2',
    ]);
  });

  it('names every bad field', () => {
    const p = problems(() =>
      parseConfig(
        {
          vms: [
            {
              name: 'vm1',
              shares: [
                { tag: 'a', path: '/x', dir: '/y', target: '/m' },
                { tag: 'a', dir: '/y', target: 'relative' },
                { tag: 'b', path: '/../etc', target: '/m' },
                { tag: 'x'.repeat(37), dir: '/y', target: '/m' },
                { tag: 'c', target: '/m' },
                { tag: 'd', path: 'projects/x y', target: '/m' },
              ],
            },
          ],
        },
        '/etc',
      ),
    );
    expect(p).toEqual(
      expect.arrayContaining([
        'vms[0].shares[0].path: give either path (a directory on a storage node) or dir (a directory of this host)',
        'vms[0].shares[1].tag: duplicate share tag "a"',
        'vms[0].shares[1].target: an absolute path in the guest',
        'vms[0].shares[2].path: no "." or ".." segments',
        'vms[0].shares[3].tag: at most 36 bytes, no NUL',
        'vms[0].shares[4].path: give either path (a directory on a storage node) or dir (a directory of this host)',
        'vms[0].shares[5].path: an absolute path of [A-Za-z0-9._-] segments, e.g. /projects/alpha',
      ]),
    );
  });

  it('a share on a storage node needs a resolver; sockets are never shared with disks or other shares', () => {
    expect(problems(() => parseConfig({ vms: [{ name: 'v', shares: [{ tag: 't', path: '/p', target: '/m' }] }] }, '/'))).toEqual([
      'vms[0].shares[0].path: a share on a storage node needs a resolver (top-level resolver); or give dir',
    ]);
    const p = problems(() =>
      parseConfig(
        {
          runDir: '/r',
          vms: [
            { name: 'v', disks: [{ name: 'd', file: '/img', nbd: { socket: '/r/same.sock' } }], shares: [{ tag: 't', dir: '/x', target: '/m', socket: '/r/same.sock' }] },
            { name: 'w', shares: [{ tag: 't', dir: '/x', target: '/m', socket: '/r/v-t.fs.sock' }] },
            { name: 'u', shares: [{ tag: 't', dir: '/x', target: '/m', socket: '/r/v-t.fs.sock' }] },
          ],
        },
        '/',
      ),
    );
    expect(p).toEqual([
      'vms[0].shares[0].socket: socket /r/same.sock is also used by v/d',
      'vms[2].shares[0].socket: socket /r/v-t.fs.sock is also used by w share t',
    ]);
  });

  it('a VM added at runtime gets its shares checked too', () => {
    const vm = parseVm({ name: 'v', shares: [{ tag: 't', dir: 'd', target: '/m' }] }, { baseDir: '/base', runDir: '/r' });
    expect(vm.shares[0]).toMatchObject({ dir: '/base/d', socket: '/r/v-t.fs.sock' });
  });
});
