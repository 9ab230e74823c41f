/**
 * The daemon in-process, over MemoryVolumes (injected opener) and the real NbdServer: the
 * control API's answers and codes, rollback of a half-added VM, metrics text, ordered stop.
 */
import { existsSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { MemoryVolume } from '../../../lib/block/memory.js';
import { VolumeError } from '../../../lib/block/errors.js';
import { parseConfig } from '../../../lib/config/schema.js';
import { renderStatus } from '../../../lib/cli/status.js';
import { renderMetrics } from '../../../lib/daemon/control.js';
import { Daemon } from '../../../lib/daemon/daemon.js';
import { silentLogger } from '../../../lib/log.js';
import type { NbdListenAddress } from '../../../lib/nbd/api.js';
import { NbdServer } from '../../../lib/nbd/server.js';

let dir: string;
let daemon: Daemon | undefined;
const volumes = new Map<string, MemoryVolume>();

beforeEach(() => {
  dir = mkdtempSync(path.join(tmpdir(), 'vsu-'));
  volumes.clear();
});
afterEach(async () => {
  await daemon?.stop();
  daemon = undefined;
  rmSync(dir, { recursive: true, force: true });
});

interface MakeOptions {
  /** Awaited before opening a disk's volume (to hold startup at a given disk). */
  beforeOpen?: (file: string) => Promise<void>;
  /** Every NBD server the daemon creates (the shared TCP one first, when configured). */
  servers?: NbdServer[];
  /** Called as a server starts to listen, before it does. */
  onListen?: (server: NbdServer, addr: NbdListenAddress) => void;
}

function make(doc: unknown, o: MakeOptions = {}): Daemon {
  const config = parseConfig(doc, dir);
  daemon = new Daemon(config, {
    logger: silentLogger(),
    createServer: (opts) => {
      const s = new NbdServer(opts);
      o.servers?.push(s);
      const listen = s.listen.bind(s);
      s.listen = (addr) => {
        o.onListen?.(s, addr);
        return listen(addr);
      };
      return s;
    },
    openVolume: async (d) => {
      await o.beforeOpen?.(d.file);
      if (d.file.endsWith('missing.img')) throw new VolumeError('ENOENT', 'no such file or directory');
      const v = new MemoryVolume({ size: d.size ?? 1 << 20 });
      volumes.set(d.file, v);
      return v;
    },
    version: '9.9.9',
    baseDir: dir,
  });
  return daemon;
}

async function start(doc: unknown, o: MakeOptions = {}): Promise<Daemon> {
  const d = make(doc, o);
  await d.start();
  return d;
}

function api(method: string, p: string, body?: unknown): Promise<{ status: number; json: any; text: string }> {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const req = request({ socketPath: path.join(dir, 'run', 'control.sock'), method, path: p, headers: payload ? { 'content-type': 'application/json' } : {} }, (res) => {
      let text = '';
      res.on('data', (c: Buffer) => (text += c.toString()));
      res.on('end', () => {
        let json: unknown;
        try {
          json = JSON.parse(text);
        } catch {
          json = undefined;
        }
        resolve({ status: res.statusCode ?? 0, json, text });
      });
    });
    req.on('error', reject);
    req.end(payload);
  });
}

describe('Daemon control API', () => {
  it('answers status, adds and removes VMs and disks with the right codes', async () => {
    await start({ runDir: 'run', vms: [{ name: 'a', disks: [{ name: 'd', file: 'a.img', size: '2M' }] }] });
    expect(statSync(path.join(dir, 'run', 'control.sock')).mode & 0o777).toBe(0o600);
    const st = await api('GET', '/v1/status');
    expect(st.status).toBe(200);
    expect(st.json).toMatchObject({ version: '9.9.9', vms: [{ name: 'a', disks: [{ name: 'd', size: 2 << 20, export: '', socket: path.join(dir, 'run', 'a-d.sock'), connections: 0 }] }] });

    expect((await api('POST', '/v1/vms', { name: 'b', disks: [{ name: 'x', file: 'b.img' }] })).status).toBe(201);
    expect(existsSync(path.join(dir, 'run', 'b-x.sock'))).toBe(true);
    const dup = await api('POST', '/v1/vms', { name: 'b' });
    expect(dup).toMatchObject({ status: 409, json: { error: 'VM "b" already exists' } });
    const bad = await api('POST', '/v1/vms', { name: 'c', disks: [{ name: 'x' }, { name: 'y', file: 'y', size: 'lots' }] });
    expect(bad.status).toBe(400);
    expect(bad.json.problems).toEqual(['disks[0].file: required (or give volume)', 'disks[1].size: not a size: "lots" (bytes, or a number with K, M, G, T suffix)']);
    const sameSocket = await api('POST', '/v1/vms', { name: 'c', disks: [{ name: 'x', file: 'c.img', nbd: { socket: path.join(dir, 'run', 'a-d.sock') } }] });
    expect(sameSocket.status).toBe(409);
    expect(sameSocket.json.error).toMatch(/^disks\[0\]\.nbd\.socket: socket .* is already used by a\/d$/);
    const notJson = await api('POST', '/v1/vms', undefined);
    expect(notJson.status).toBe(400);

    expect((await api('POST', '/v1/vms/b/disks?base=/elsewhere', { name: 'y', file: 'y.img' })).json).toMatchObject({ name: 'y', file: '/elsewhere/y.img' });
    expect((await api('POST', '/v1/vms/b/disks', { name: 'y', file: 'y.img' })).status).toBe(409);
    expect((await api('POST', '/v1/vms/zz/disks', { name: 'y', file: 'y.img' })).status).toBe(404);
    expect((await api('DELETE', '/v1/vms/b/disks/nope')).status).toBe(404);
    expect((await api('DELETE', '/v1/vms/b/disks/y')).status).toBe(200);
    expect((await api('DELETE', '/v1/vms/b')).status).toBe(200);
    expect(existsSync(path.join(dir, 'run', 'b-x.sock'))).toBe(false);
    expect((await api('DELETE', '/v1/vms/b')).status).toBe(404);
    expect((await api('GET', '/v2/x')).status).toBe(404);
    expect((await api('PUT', '/v1/status')).status).toBe(405);
  });

  it('rolls back a VM whose second disk cannot open', async () => {
    await start({ runDir: 'run' });
    const r = await api('POST', '/v1/vms', { name: 'v', disks: [{ name: 'ok', file: 'ok.img' }, { name: 'bad', file: 'missing.img' }] });
    expect(r.status).toBe(400);
    expect(r.json.error).toMatch(/^disks\[1\]\.file: cannot open .*missing\.img: ENOENT: no such file or directory$/);
    expect(existsSync(path.join(dir, 'run', 'v-ok.sock'))).toBe(false);
    expect((await api('GET', '/v1/status')).json.vms).toEqual([]);
  });

  it('names the config field when a configured disk cannot open', async () => {
    await expect(start({ runDir: 'run', vms: [{ name: 'v', disks: [{ name: 'bad', file: 'missing.img' }] }] })).rejects.toThrow(
      /^vms\[0\]\.disks\[0\]\.file: cannot open/,
    );
    expect(existsSync(path.join(dir, 'run', 'control.sock'))).toBe(false);
  });

  it('stop flushes every disk and removes every socket', async () => {
    const d = await start({ runDir: 'run', vms: [{ name: 'a', disks: [{ name: 'd', file: 'a.img' }, { name: 'e', file: 'e.img' }] }] });
    await d.stop();
    for (const v of volumes.values()) expect(v.stats.flushes).toBeGreaterThanOrEqual(1);
    for (const f of ['control.sock', 'a-d.sock', 'a-e.sock']) expect(existsSync(path.join(dir, 'run', f))).toBe(false);
    await d.stop(); // idempotent
  });

  it('serves /metrics in the Prometheus text format', async () => {
    await start({ runDir: 'run', vms: [{ name: 'a', disks: [{ name: 'd', file: 'a.img' }] }] });
    const m = await api('GET', '/metrics');
    expect(m.status).toBe(200);
    expect(m.text).toContain('# TYPE vstore_disk_reads_total counter\nvstore_disk_reads_total{vm="a",disk="d"} 0\n');
    expect(m.text).toContain('vstore_disk_size_bytes{vm="a",disk="d"} 1048576\n');
  });
});

describe('Daemon startup', () => {
  const twoVms = {
    runDir: 'run',
    tcp: { host: '127.0.0.1', port: 0 },
    vms: [
      { name: 'vm1', disks: [{ name: 'a', file: 'a.img' }, { name: 'b', file: 'b.img', readOnly: true }] },
      { name: 'vm2', disks: [{ name: 'c', file: 'c.img' }] },
    ],
  };

  it('a stop during startup ends it: start() resolves false, and what was started is taken down', async () => {
    let release!: () => void;
    const held = new Promise<void>((r) => (release = r));
    let reached!: () => void;
    const atVm2 = new Promise<void>((r) => (reached = r));
    const d = make(twoVms, {
      beforeOpen: async (f) => {
        if (f.endsWith('c.img')) {
          reached();
          await held;
        }
      },
    });
    const started = d.start();
    await atVm2; // vm1 is up, vm2's disk is opening
    const stopped = d.stop();
    release();
    expect(await started.catch((e: unknown) => e)).toBe(false); // not "vms[1]: the daemon is shutting down"
    await stopped;
    for (const v of volumes.values()) expect(v.stats.flushes).toBeGreaterThanOrEqual(1);
    for (const f of ['control.sock', 'vm1-a.sock', 'vm1-b.sock', 'vm2-c.sock']) expect(existsSync(path.join(dir, 'run', f)), f).toBe(false);
  });

  it('a stop before the control socket is up never leaves it behind', async () => {
    for (let n = 0; n < 12; n++) {
      const d = make({ runDir: 'run', tcp: { host: '127.0.0.1', port: 0 }, vms: [{ name: 'v', disks: [{ name: 'a', file: 'a.img' }] }] });
      const started = d.start();
      // stop at successive points of startup
      for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
      await d.stop();
      expect(typeof (await started.catch((e: unknown) => e))).toBe('boolean');
      expect(existsSync(path.join(dir, 'run', 'control.sock'))).toBe(false);
      expect(existsSync(path.join(dir, 'run', 'v-a.sock'))).toBe(false);
      daemon = undefined;
    }
  });

  it('opens the TCP listener only once every configured disk is exported on it', async () => {
    let exportsAtListen: string[] | undefined;
    await start(twoVms, {
      onListen: (server, addr) => {
        if ('tcp' in addr) exportsAtListen = server.stats().exports.map((e) => e.name);
      },
    });
    expect(exportsAtListen?.sort()).toEqual(['vm1/a', 'vm1/b', 'vm2/c']);
  });

  it('reports the bound TCP port, not the configured port 0', async () => {
    const servers: NbdServer[] = [];
    await start(twoVms, { servers });
    const bound = servers[0]!.addresses.flatMap((a) => ('tcp' in a ? [a.tcp] : []));
    expect(bound).toHaveLength(1);
    expect(bound[0]!.port).toBeGreaterThan(0);
    const st = (await api('GET', '/v1/status')).json;
    expect(st.tcp).toEqual(bound[0]);
    expect(st.tcpAddresses).toEqual(bound);
    expect(renderStatus(st).split('\n')[0]).toContain(`, TCP 127.0.0.1:${bound[0]!.port} (exports VM/DISK)`);
  });
});

describe('renderStatus', () => {
  it('shows every bound TCP address, IPv6 in brackets', () => {
    const base = { pid: 1, version: 'x', startedAt: '', uptimeSeconds: 0, control: '/c', vms: [] };
    expect(renderStatus({ ...base, tcp: { host: '::1', port: 5 }, tcpAddresses: [{ host: '::1', port: 5 }, { host: '127.0.0.1', port: 5 }] })).toBe(
      'daemon pid 1, version x, up 0s, control /c, TCP [::1]:5, 127.0.0.1:5 (exports VM/DISK)\nno VMs\n',
    );
  });
});

describe('renderMetrics', () => {
  it('escapes label values and ends with a newline', () => {
    const text = renderMetrics({
      pid: 1,
      version: 'x',
      startedAt: '',
      uptimeSeconds: 3,
      control: '/c',
      vms: [{ name: 'v"1', disks: [{ name: 'd\\', file: '/f', size: 1, readOnly: true, socket: '/s', export: '', connections: 2, inflight: 1, reads: 3, writes: 4, bytesRead: 5, bytesWritten: 6, errors: 7 }] }],
    });
    expect(text.endsWith('\n')).toBe(true);
    expect(text).toContain('vstore_disk_connections{vm="v\\"1",disk="d\\\\"} 2');
    expect(text).toContain('vstore_disk_read_only{vm="v\\"1",disk="d\\\\"} 1');
    for (const line of text.trim().split('\n')) expect(line).toMatch(/^(# (HELP|TYPE) \w+ .+|\w+(\{.*\})? \d+)$/);
  });
});
