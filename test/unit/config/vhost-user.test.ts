// The per-disk vhost-user-blk socket and `nbd: false`: defaults, resolution and the errors,
// each naming its field.
import { describe, expect, it } from 'vitest';
import { parseDocument } from '../../../lib/config/load.js';
import { ConfigError, parseConfig, parseDisk, parseVm } from '../../../lib/config/schema.js';

function problems(fn: () => unknown): string[] {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(ConfigError);
    return (e as ConfigError).problems;
  }
  throw new Error('expected a ConfigError');
}

const ctx = { baseDir: '/etc/vstore', runDir: '/run/vs' };
const disk = (extra: Record<string, unknown>) => ({ vms: [{ name: 'vm1', disks: [{ name: 'd0', file: 'd0.img', ...extra }] }] });

describe('disk vhostUser and nbd: false', () => {
  it('a disk without vhostUser has none, and NBD as before', () => {
    const d = parseConfig(disk({}), '/etc/vstore').vms[0]!.disks[0]!;
    expect(d.vhostUser).toBeUndefined();
    expect(d.nbd).toEqual({ socket: '/run/vstore/vm1-d0.sock', export: '' });
  });

  it('fills the vhost-user defaults: <runDir>/<vm>-<disk>.vhost.sock, 1 queue, no serial', () => {
    const d = parseConfig({ runDir: 'run', ...disk({ vhostUser: {} }) }, '/etc/vstore').vms[0]!.disks[0]!;
    expect(d.vhostUser).toEqual({ socket: '/etc/vstore/run/vm1-d0.vhost.sock', queues: 1 });
    expect(d.nbd).toEqual({ socket: '/etc/vstore/run/vm1-d0.sock', export: '' });
  });

  it('takes socket (relative to the file), queues and serial; nbd: false leaves only vhost-user', () => {
    const d = parseConfig(disk({ nbd: false, vhostUser: { socket: 's/vu.sock', queues: 16, serial: 'SER-01' } }), '/etc/vstore').vms[0]!.disks[0]!;
    expect(d.nbd).toBeUndefined();
    expect(d.vhostUser).toEqual({ socket: '/etc/vstore/s/vu.sock', queues: 16, serial: 'SER-01' });
  });

  it('parses from YAML as in fixtures/demo.yaml', () => {
    const data = parseDocument('vms:\n  - name: demo\n    disks:\n      - name: disk0\n        file: d.img\n        vhostUser: {}\n', { format: 'yaml' });
    expect(parseConfig(data, '/x').vms[0]!.disks[0]!.vhostUser?.socket).toBe('/run/vstore/demo-disk0.vhost.sock');
  });

  it('refuses a disk with neither front end, naming nbd', () => {
    expect(problems(() => parseConfig(disk({ nbd: false }), '/'))).toEqual([
      'vms[0].disks[0].nbd: false leaves the disk with no socket: serve NBD, or add vhostUser',
    ]);
    expect(problems(() => parseDisk('vm1', { name: 'd', file: '/d', nbd: false }, ctx))[0]).toMatch(/^nbd: false leaves/);
  });

  it('names bad vhostUser fields', () => {
    expect(problems(() => parseConfig(disk({ vhostUser: { queues: 17 } }), '/'))).toEqual(['vms[0].disks[0].vhostUser.queues: at most 16']);
    expect(problems(() => parseConfig(disk({ vhostUser: { queues: 0 } }), '/'))).toEqual(['vms[0].disks[0].vhostUser.queues: at least 1']);
    expect(problems(() => parseConfig(disk({ vhostUser: { queues: 1.5 } }), '/'))[0]).toMatch(/^vms\[0\]\.disks\[0\]\.vhostUser\.queues: /);
    expect(problems(() => parseConfig(disk({ vhostUser: { queues: '2' } }), '/'))).toEqual([
      'vms[0].disks[0].vhostUser.queues: expected number, got string "2"',
    ]);
    expect(problems(() => parseConfig(disk({ vhostUser: { serial: 'x'.repeat(21) } }), '/'))[0]).toMatch(
      /^vms\[0\]\.disks\[0\]\.vhostUser\.serial: at most 20 bytes/,
    );
    expect(problems(() => parseConfig(disk({ vhostUser: { sockt: '/a' } }), '/'))).toEqual(['vms[0].disks[0].vhostUser.sockt: unknown field']);
    expect(problems(() => parseConfig(disk({ vhostUser: { socket: '/' + 'a'.repeat(120) } }), '/'))[0]).toMatch(
      /^vms\[0\]\.disks\[0\]\.vhostUser\.socket: unix socket paths are at most 107 bytes/,
    );
    expect(problems(() => parseConfig(disk({ vhostUser: true }), '/'))).toEqual(['vms[0].disks[0].vhostUser: expected object, got boolean true']);
  });

  it('names bad nbd values: true, and a misspelt field inside the object', () => {
    expect(problems(() => parseConfig(disk({ nbd: true }), '/'))).toHaveLength(1);
    expect(problems(() => parseConfig(disk({ nbd: true }), '/'))[0]).toMatch(/^vms\[0\]\.disks\[0\]\.nbd: /);
    expect(problems(() => parseConfig(disk({ nbd: { sockt: '/a' } }), '/'))).toEqual(['vms[0].disks[0].nbd.sockt: unknown field']);
  });

  it('refuses a vhost-user socket shared with an NBD socket, of this disk or another', () => {
    expect(problems(() => parseConfig(disk({ nbd: { socket: '/s/x' }, vhostUser: { socket: '/s/x' } }), '/'))).toEqual([
      'vms[0].disks[0].vhostUser.socket: socket /s/x is also used by vm1/d0',
    ]);
    const two = { vms: [{ name: 'v', disks: [{ name: 'a', file: '/a', vhostUser: { socket: '/s/y' } }, { name: 'b', file: '/b', nbd: { socket: '/s/y' } }] }] };
    expect(problems(() => parseConfig(two, '/'))).toEqual(['vms[0].disks[1].nbd.socket: socket /s/y is also used by v/a (vhostUser.socket)']);
    expect(problems(() => parseVm({ name: 'v', disks: [{ name: 'a', file: '/a', vhostUser: { socket: '/s/z' } }, { name: 'b', file: '/b', vhostUser: { socket: '/s/z' } }] }, ctx))).toEqual([
      'disks[1].vhostUser.socket: socket /s/z is also used by v/a (vhostUser.socket)',
    ]);
  });

  it('refuses a default vhost-user socket path that does not fit sun_path, naming the field', () => {
    const long = '/' + 'r'.repeat(90);
    expect(problems(() => parseDisk('vm1', { name: 'disk-with-a-long-name', file: '/d', nbd: false, vhostUser: {} }, { baseDir: '/', runDir: long }))[0]).toMatch(
      /^vhostUser\.socket: socket path .* is longer than 107 bytes \(set vhostUser\.socket or a shorter runDir\)/,
    );
  });
});
