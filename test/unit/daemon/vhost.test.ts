// The registry's vhost-user-blk side, in-process over MemoryVolumes, the real NbdServer and a
// recording fake vhost server factory: which volume each front end gets, refusals, rollback.
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { MemoryVolume } from '../../../lib/block/memory.js';
import { OrderedVolume } from '../../../lib/block/ordering.js';
import type { Volume } from '../../../lib/block/volume.js';
import { renderStatus } from '../../../lib/cli/status.js';
import { parseDisk, parseVm, type ResolveContext } from '../../../lib/config/schema.js';
import { renderMetrics } from '../../../lib/daemon/control.js';
import { RegistryError, VmRegistry, type RegistryDeps, type VhostServerOptions } from '../../../lib/daemon/registry.js';
import { silentLogger } from '../../../lib/log.js';
import type { NbdExportSpec } from '../../../lib/nbd/api.js';
import { NbdServer } from '../../../lib/nbd/server.js';

let dir: string;
let ctx: ResolveContext;
let registry: VmRegistry;
let vhosts: Array<VhostServerOptions & { closed: boolean }>;
let nbdVolumes: Volume[];
let failVhost: Error | undefined;
const opened = new Map<string, MemoryVolume>();

beforeEach(() => {
  dir = mkdtempSync(path.join(tmpdir(), 'vsu-vu-'));
  ctx = { baseDir: dir, runDir: path.join(dir, 'run') };
  vhosts = [];
  nbdVolumes = [];
  failVhost = undefined;
  opened.clear();
  registry = makeRegistry({
    createVhostServer: async (o) => {
      if (failVhost) throw failVhost;
      const rec = { ...o, closed: false };
      vhosts.push(rec);
      return {
        close: async () => void (rec.closed = true),
        stats: () => ({ connected: false, connections: 3, ok: 5, ioerr: 1, unsupp: 2, dropped: 0 }),
      };
    },
  });
});
/** A registry over MemoryVolumes (recorded in `opened`) whose NBD servers record their exports' volumes in `nbdVolumes`. */
function makeRegistry(extra: Partial<RegistryDeps> = {}): VmRegistry {
  return new VmRegistry({
    logger: silentLogger(),
    openVolume: async (d) => {
      const v = new MemoryVolume({ size: 1024 * 1024 });
      opened.set(d.file, v);
      return v;
    },
    createServer: (o) => {
      const s = new NbdServer(o);
      const add = s.addExport.bind(s);
      s.addExport = (spec: NbdExportSpec) => {
        nbdVolumes.push(spec.volume);
        add(spec);
      };
      return s;
    },
    ...extra,
  });
}

afterEach(async () => {
  await registry.closeAll();
  rmSync(dir, { recursive: true, force: true });
});

describe('vhost-user disks in the registry', () => {
  it('gives both front ends one OrderedVolume over the disk volume, and reports the vhost-user socket and counters', async () => {
    await registry.addVm(parseVm({ name: 'vm', disks: [{ name: 'd', file: 'd.img', vhostUser: { queues: 4, serial: 'S1' } }] }, ctx));
    expect(vhosts).toHaveLength(1);
    const vu = vhosts[0]!;
    expect(vu).toMatchObject({ socket: path.join(ctx.runDir, 'vm-d.vhost.sock'), queues: 4, readOnly: false, serial: 'S1' });
    expect(vu.volume).toBeInstanceOf(OrderedVolume);
    expect((vu.volume as OrderedVolume).below).toBe(opened.get(path.join(dir, 'd.img')));
    expect(nbdVolumes).toEqual([vu.volume]);
    const st = registry.status();
    expect(st[0]!.disks[0]!.vhostUser).toEqual({ socket: vu.socket, queues: 4, connected: false, connections: 3, ok: 5, ioerr: 1, unsupp: 2, dropped: 0 });
    expect(st[0]!.disks[0]!.socket).toBe(path.join(ctx.runDir, 'vm-d.sock'));
    const daemon = { pid: 1, version: 'x', startedAt: '', uptimeSeconds: 0, control: '/c', vms: st };
    expect(renderMetrics(daemon)).toContain('vstore_disk_vhost_user_requests_total{vm="vm",disk="d",status="unsupp"} 2');
    expect(renderMetrics(daemon)).toContain('vstore_disk_vhost_user_connections_total{vm="vm",disk="d"} 3');
    expect(renderStatus(daemon)).toMatch(new RegExp(`${vu.socket.replace(/\./g, '\\.')}\\s+0/3\\s+8\\s+3\\s`));
  });

  it('a disk on its unix socket and on the shared TCP server: both exports get one OrderedVolume (overlapping requests ordered across them)', async () => {
    const tcp = new NbdServer({ logger: silentLogger() });
    const tcpVolumes: Volume[] = [];
    const add = tcp.addExport.bind(tcp);
    tcp.addExport = (spec: NbdExportSpec) => {
      tcpVolumes.push(spec.volume);
      add(spec);
    };
    const reg = makeRegistry({ tcpServer: tcp });
    try {
      await reg.addVm(parseVm({ name: 'vm', disks: [{ name: 'd', file: 'd.img' }] }, ctx));
      expect(nbdVolumes).toHaveLength(1);
      expect(nbdVolumes[0]).toBeInstanceOf(OrderedVolume);
      expect((nbdVolumes[0] as OrderedVolume).below).toBe(opened.get(path.join(dir, 'd.img')));
      expect(tcpVolumes).toEqual(nbdVolumes);
    } finally {
      await reg.closeAll();
      await tcp.close();
    }
  });

  it('an NBD-only disk keeps its plain volume and gets no vhost-user server or columns', async () => {
    await registry.addVm(parseVm({ name: 'vm', disks: [{ name: 'd', file: 'd.img' }] }, ctx));
    expect(vhosts).toHaveLength(0);
    expect(nbdVolumes).toEqual([opened.get(path.join(dir, 'd.img'))]);
    expect(registry.status()[0]!.disks[0]!.vhostUser).toBeUndefined();
    expect(renderStatus({ pid: 1, version: 'x', startedAt: '', uptimeSeconds: 0, control: '/c', vms: registry.status() })).not.toContain('VHOST-USER');
  });

  it('nbd: false serves no NBD socket; remove closes the vhost-user server', async () => {
    await registry.addVm(parseVm({ name: 'vm', disks: [] }, ctx));
    await registry.addDisk('vm', parseDisk('vm', { name: 'd', file: 'd.img', nbd: false, vhostUser: {} }, ctx));
    expect(nbdVolumes).toHaveLength(0);
    expect(existsSync(path.join(ctx.runDir, 'vm-d.sock'))).toBe(false);
    expect(registry.status()[0]!.disks[0]).toMatchObject({ socket: '', export: '' });
    await registry.removeDisk('vm', 'd');
    expect(vhosts[0]!.closed).toBe(true);
  });

  it('refuses a vhost-user socket another disk uses, naming the field', async () => {
    await registry.addVm(parseVm({ name: 'vm', disks: [{ name: 'a', file: 'a.img' }] }, ctx));
    const clash = parseDisk('vm', { name: 'b', file: 'b.img', vhostUser: { socket: 'run/vm-a.sock' } }, ctx);
    await expect(registry.addDisk('vm', clash)).rejects.toThrow(/^vhostUser\.socket: socket .*vm-a\.sock is already used by vm\/a$/);
  });

  it('a failing vhost-user server takes the disk down again (NBD socket removed, no disk left)', async () => {
    await registry.addVm(parseVm({ name: 'vm', disks: [] }, ctx));
    failVhost = new Error('boom');
    const err = await registry.addDisk('vm', parseDisk('vm', { name: 'd', file: 'd.img', vhostUser: {} }, ctx)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RegistryError);
    expect((err as Error).message).toMatch(/^vhostUser\.socket: cannot serve on .*vm-d\.vhost\.sock: boom$/);
    expect(existsSync(path.join(ctx.runDir, 'vm-d.sock'))).toBe(false);
    expect(registry.status()[0]!.disks).toEqual([]);
  });

  it('refuses vhostUser when the daemon has no vhost-user factory', async () => {
    const bare = new VmRegistry({ logger: silentLogger(), openVolume: async () => new MemoryVolume({ size: 4096 }), createServer: (o) => new NbdServer(o) });
    await expect(bare.addVm(parseVm({ name: 'vm', disks: [{ name: 'd', file: 'd.img', vhostUser: {} }] }, ctx))).rejects.toThrow(
      'disks[0].vhostUser: this daemon cannot serve vhost-user-blk',
    );
    await bare.closeAll();
  });
});
