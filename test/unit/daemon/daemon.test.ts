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
import { renderMetrics } from '../../../lib/daemon/control.js';
import { Daemon } from '../../../lib/daemon/daemon.js';
import { silentLogger } from '../../../lib/log.js';
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

async function start(doc: unknown): Promise<Daemon> {
  const config = parseConfig(doc, dir);
  daemon = new Daemon(config, {
    logger: silentLogger(),
    createServer: (o) => new NbdServer(o),
    openVolume: async (d) => {
      if (d.file.endsWith('missing.img')) throw new VolumeError('ENOENT', 'no such file or directory');
      const v = new MemoryVolume({ size: d.size ?? 1 << 20 });
      volumes.set(d.file, v);
      return v;
    },
    version: '9.9.9',
    baseDir: dir,
  });
  await daemon.start();
  return daemon;
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
    expect(bad.json.problems).toEqual(['disks[0].file: required', 'disks[1].size: not a size: "lots" (bytes, or a number with K, M, G, T suffix)']);
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
