/**
 * QoS in the config (validation, defaults), in the daemon's disk stack (requests over NBD reach
 * the VM's flow, and a limit holds for them), through the control API (GET/PUT, codes), in
 * `vstore status` and /metrics, and the CLI's flag merging. In-process, over MemoryVolumes.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { MemoryVolume } from '../../../lib/block/memory.js';
import { OrderedVolume } from '../../../lib/block/ordering.js';
import { applyQosFlags } from '../../../lib/cli/qos.js';
import { renderStatus } from '../../../lib/cli/status.js';
import { ConfigError, parseConfig, parseQos, parseVm } from '../../../lib/config/schema.js';
import { renderMetrics } from '../../../lib/daemon/control.js';
import { Daemon } from '../../../lib/daemon/daemon.js';
import { silentLogger } from '../../../lib/log.js';
import { NbdClientConnection } from '../../../lib/nbd/client.js';
import { NbdServer } from '../../../lib/nbd/server.js';
import { QosScheduler } from '../../../lib/qos/scheduler.js';
import { DEFAULT_QOS } from '../../../lib/qos/settings.js';
import { QosVolume } from '../../../lib/qos/volume.js';

describe('qos config', () => {
  const ctx = { baseDir: '/x', runDir: '/run/x' };
  it('resolves defaults, sizes and the host block', () => {
    const c = parseConfig({ qos: { depth: 8 }, vms: [{ name: 'a', qos: { limit: { bps: '100M', iops: 500 }, reservation: { iops: 100 }, priority: 'high' } }, { name: 'b' }] }, '/x');
    expect(c.qos).toEqual({ enabled: true, depth: 8, costUnit: 65536, adviseAfterSeconds: 30 });
    expect(c.vms[0]!.qos).toEqual({ reservation: { iops: 100 }, limit: { iops: 500, bps: 100 << 20, burstSeconds: 0 }, weight: 1, priority: 'high' });
    expect(c.vms[1]!.qos).toBeUndefined();
    expect(parseQos({})).toEqual(DEFAULT_QOS);
  });

  it('names the bad field', () => {
    const problems = (doc: unknown): string[] => {
      try {
        parseVm(doc, ctx);
      } catch (e) {
        return (e as ConfigError).problems;
      }
      return [];
    };
    expect(problems({ name: 'a', qos: { reservation: { iops: 600 }, limit: { iops: 500 } } })).toEqual(['qos.reservation.iops: must not exceed limit.iops (500)']);
    expect(problems({ name: 'a', qos: { limit: { burstSeconds: 2 } } })).toEqual(['qos.limit.burstSeconds: needs limit.iops or limit.bps']);
    expect(problems({ name: 'a', qos: { weight: 0 } })).toEqual(['qos.weight: must be > 0']);
    expect(problems({ name: 'a', qos: { priority: 'urgent' } })[0]).toMatch(/^qos.priority: /);
    expect(problems({ name: 'a', qos: { limit: { bps: 'fast' } } })[0]).toMatch(/^qos.limit.bps: not a size/);
    expect(problems({ name: 'a', qos: { limits: {} } })).toEqual(['qos.limits: unknown field']);
    expect(() => parseConfig({ qos: { enabled: false }, vms: [{ name: 'a', qos: { weight: 2 } }] }, '/x')).toThrow('vms[0].qos: QoS is disabled');
    expect(() => parseConfig({ qos: { depth: 0 } }, '/x')).toThrow('qos.depth: at least 1');
  });

  it('the CLI merges flags into the current settings; 0 removes a rate', () => {
    const cur = parseQos({ reservation: { iops: 100 }, limit: { iops: 500, burstSeconds: 1 }, weight: 3 });
    expect(parseQos(applyQosFlags(cur, { reset: false, limitIops: '0', weight: '5' }))).toEqual({ reservation: { iops: 100 }, limit: { burstSeconds: 0 }, weight: 5, priority: 'normal' });
    expect(parseQos(applyQosFlags(cur, { reset: true, limitBps: '10M' }))).toEqual({ reservation: {}, limit: { bps: 10 << 20, burstSeconds: 0 }, weight: 1, priority: 'normal' });
    expect(() => applyQosFlags(cur, { reset: false, limitIops: 'lots' })).toThrow('--limit-iops: not a positive number');
  });
});

describe('QosVolume', () => {
  it('passes data through and counts by operation', async () => {
    const sched = new QosScheduler({ depth: 2 });
    const flow = sched.addFlow('a', DEFAULT_QOS);
    const v = new OrderedVolume(new QosVolume(new MemoryVolume({ size: 1 << 20 }), flow));
    await Promise.all(Array.from({ length: 10 }, (_, i) => v.write(i * 4096, Buffer.alloc(4096, i + 1), { fua: i === 3 })));
    await v.flush();
    await v.trim(0, 4096);
    await v.writeZeroes(4096, 4096);
    const b = Buffer.alloc(4096);
    await v.read(2 * 4096, b);
    expect(b.every((x) => x === 3)).toBe(true);
    await v.read(4096, b);
    expect(b.every((x) => x === 0)).toBe(true);
    expect(await v.blockStatus(0, 4096)).toHaveLength(1); // not scheduled, still answered
    const st = flow.status(sched.clock.now());
    expect(st).toMatchObject({ reads: 2, writes: 10, others: 3, bytesRead: 8192, bytesWritten: 40960, queued: 0, outstanding: 0 });
    expect(sched.outstanding).toBe(0);
  });
});

describe('ordering through Ordered(Qos(volume))', () => {
  it('a flush waits for the writes it covers even while they wait for their limit; overlapping writes keep their order', async () => {
    const log: string[] = [];
    const mem = new MemoryVolume({ size: 1 << 20, hook: (op, off) => void log.push(`${op}@${off}`) });
    const sched = new QosScheduler({ depth: 4 });
    const flow = sched.addFlow('a', { ...DEFAULT_QOS, limit: { iops: 200, burstSeconds: 0 } });
    const v = new OrderedVolume(new QosVolume(mem, flow));
    const done: string[] = [];
    const writes = Array.from({ length: 8 }, (_, i) => v.write((i % 4) * 4096, Buffer.alloc(4096, i + 1), { fua: true }).then(() => void done.push(`w${i}`)));
    const flush = v.flush().then(() => void done.push('flush'));
    // a later write may pass the flush (NBD allows it) but not the earlier writes it overlaps
    const after = v.write(0, Buffer.alloc(4096, 0xee)).then(() => void done.push('after'));
    await Promise.all([...writes, flush, after]);
    const iFlush = log.indexOf('flush@0');
    expect(log.slice(0, iFlush).filter((x) => x.startsWith('write')).length).toBeGreaterThanOrEqual(8); // the flush ran after every earlier write
    expect(done.indexOf('flush')).toBeGreaterThan(Math.max(...Array.from({ length: 8 }, (_, i) => done.indexOf(`w${i}`))));
    expect(done.indexOf('after')).toBeGreaterThan(Math.max(done.indexOf('w0'), done.indexOf('w4')));
    const b = Buffer.alloc(4096);
    await v.read(4096, b);
    expect(b[0]).toBe(6); // writes 2 and 6 overlap at 4096: the later one wins
    await v.read(0, b);
    expect(b[0]).toBe(0xee);
    // and they were paced by the limit: 10 requests at 200/s, the first 20 ms of slack free
    expect(flow.status(sched.clock.now()).throttledSeconds).toBeGreaterThan(0.05);
  });
});

let dir: string;
let daemon: Daemon | undefined;
beforeEach(() => {
  dir = mkdtempSync(path.join(tmpdir(), 'vsq-'));
});
afterEach(async () => {
  await daemon?.stop();
  daemon = undefined;
  rmSync(dir, { recursive: true, force: true });
});

async function start(doc: Record<string, unknown>): Promise<Daemon> {
  daemon = new Daemon(parseConfig({ runDir: 'run', ...doc }, dir), {
    logger: silentLogger(),
    createServer: (opts) => new NbdServer(opts),
    openVolume: async (d) => new MemoryVolume({ size: d.size ?? 1 << 20 }),
    baseDir: dir,
  });
  await daemon.start();
  return daemon;
}

function api(method: string, p: string, body?: unknown): Promise<{ status: number; json: any }> {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const req = request({ socketPath: path.join(dir, 'run', 'control.sock'), method, path: p, headers: payload ? { 'content-type': 'application/json' } : {} }, (res) => {
      let text = '';
      res.on('data', (c: Buffer) => (text += c.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, json: JSON.parse(text || 'null') }));
    });
    req.on('error', reject);
    req.end(payload);
  });
}

describe('daemon with QoS', () => {
  it('NBD requests go through the VM flow; a runtime limit applies to them', async () => {
    await start({ vms: [{ name: 'a', disks: [{ name: 'd', file: 'a.img', size: '1M' }] }] });
    const c = await NbdClientConnection.connect({ address: `unix:${path.join(dir, 'run', 'a-d.sock')}`, logger: silentLogger() });
    try {
      const buf = Buffer.alloc(4096);
      await Promise.all(Array.from({ length: 20 }, (_, i) => c.read(i * 4096, buf)));
      let q = await api('GET', '/v1/vms/a/qos');
      expect(q.status).toBe(200);
      expect(q.json).toMatchObject({ reads: 20, settings: { weight: 1, priority: 'normal' } });

      // 50 IOPS (the first 20 ms of slack and 1 request are free): 30 reads take >= ~0.5 s
      const put = await api('PUT', '/v1/vms/a/qos', { limit: { iops: 50 } });
      expect(put).toMatchObject({ status: 200, json: { settings: { limit: { iops: 50, burstSeconds: 0 } } } });
      const t0 = performance.now();
      await Promise.all(Array.from({ length: 30 }, (_, i) => c.read(i * 4096, Buffer.alloc(4096))));
      const took = (performance.now() - t0) / 1000;
      expect(took).toBeGreaterThan(0.5);
      q = await api('GET', '/v1/vms/a/qos');
      expect(q.json.throttledSeconds).toBeGreaterThan(1);

      // back to unconstrained: fast again
      await api('PUT', '/v1/vms/a/qos', {});
      const t1 = performance.now();
      await Promise.all(Array.from({ length: 30 }, (_, i) => c.read(i * 4096, Buffer.alloc(4096))));
      expect((performance.now() - t1) / 1000).toBeLessThan(0.4);
    } finally {
      await c.close();
    }
  });

  it('answers the control API with the right codes; status and metrics show QoS', async () => {
    await start({ qos: { depth: 7 }, vms: [{ name: 'a', qos: { weight: 3, reservation: { iops: 10 } }, disks: [{ name: 'd', file: 'a.img' }] }] });
    expect((await api('PUT', '/v1/vms/nope/qos', {})).status).toBe(404);
    expect((await api('GET', '/v1/vms/nope/qos')).status).toBe(404);
    const bad = await api('PUT', '/v1/vms/a/qos', { weight: -1 });
    expect(bad).toMatchObject({ status: 400, json: { error: 'weight: must be > 0' } });
    expect((await api('POST', '/v1/vms/a/qos', {})).status).toBe(405);
    expect((await api('GET', '/v1/vms/a/qos')).json.settings.weight).toBe(3); // unchanged by the bad PUT
    // a VM added at runtime with its own qos
    expect((await api('POST', '/v1/vms', { name: 'b', qos: { limit: { iops: 100 }, priority: 'low' }, disks: [{ name: 'd', file: 'b.img' }] })).status).toBe(201);
    const st = (await api('GET', '/v1/status')).json;
    expect(st.qos).toMatchObject({ depth: 7, outstanding: 0, queued: 0 });
    const text = renderStatus(st);
    expect(text).toContain('QoS: device depth 7');
    expect(text).toMatch(/^a\s+R 10\/s W 3 normal/m);
    expect(text).toMatch(/^b\s+L 100\/s W 1 low/m);
    const m = renderMetrics(st);
    expect(m).toContain('vstore_qos_device_depth 7');
    expect(m).toContain('vstore_vm_qos_weight{vm="a"} 3');
    expect(m).toContain('vstore_vm_qos_limit_iops{vm="b"} 100');
    expect(m).toContain('vstore_vm_qos_priority{vm="b",class="low"} 1');
    expect(m).toContain('vstore_vm_qos_migrate_advised{vm="a"} 0');
    expect(m).toContain('# TYPE vstore_vm_qos_latency_seconds summary');
    // removing a VM removes its rows
    expect((await api('DELETE', '/v1/vms/b')).status).toBe(200);
    expect(renderMetrics((await api('GET', '/v1/status')).json)).not.toContain('vm="b"');
  });

  it('with qos.enabled false there is no QoS layer, and per-VM qos is refused', async () => {
    await start({ qos: { enabled: false }, vms: [{ name: 'a', disks: [{ name: 'd', file: 'a.img' }] }] });
    const st = (await api('GET', '/v1/status')).json;
    expect(st.qos).toBeUndefined();
    expect(st.vms[0].qos).toBeUndefined();
    expect(renderStatus(st)).not.toContain('QoS');
    expect(await api('PUT', '/v1/vms/a/qos', {})).toMatchObject({ status: 400, json: { error: expect.stringContaining('QoS is disabled') } });
    expect(await api('POST', '/v1/vms', { name: 'b', qos: { weight: 2 }, disks: [] })).toMatchObject({ status: 400, json: { error: expect.stringContaining('QoS is disabled') } });
  });
});
