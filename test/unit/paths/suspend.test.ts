/**
 * SuspendGate and VmSuspender with a fake VM control; the QMP client against a small QMP server
 * speaking QEMU's protocol (greeting, capabilities, ids, events, a `stop` answered late as QEMU
 * does after its drain); and the config of paths and onUnreachable.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { VolumeError } from '../../../lib/block/errors.js';
import { MemoryVolume } from '../../../lib/block/memory.js';
import { VolumeLayer } from '../../../lib/block/layer.js';
import { ConfigError, parseConfig } from '../../../lib/config/schema.js';
import { QmpClient, QmpVmControl } from '../../../lib/daemon/qmp.js';
import { silentLogger } from '../../../lib/log.js';
import { SuspendGate, VmSuspender, type VmControl } from '../../../lib/paths/suspend.js';
import { pattern, sleep } from '../nbd/setup.js';

const log = silentLogger();
const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const f of cleanups.splice(0).reverse()) await f();
});

/** A volume whose requests wait while `held` (as the replicated layer waits for a replica). */
class HeldVolume extends VolumeLayer {
  held = false;
  private waiters: Array<() => void> = [];
  release(): void {
    this.held = false;
    for (const w of this.waiters.splice(0)) w();
  }
  private async hold(): Promise<void> {
    if (this.held) await new Promise<void>((r) => this.waiters.push(r));
  }
  override async write(offset: number, buf: Buffer): Promise<void> {
    await this.hold();
    return this.inner.write(offset, buf);
  }
  override async read(offset: number, buf: Buffer): Promise<void> {
    await this.hold();
    return this.inner.read(offset, buf);
  }
}

function fakeVm(running = true) {
  const calls: string[] = [];
  const vm: { running: boolean; calls: string[]; control: VmControl } = {
    running,
    calls,
    control: {
      running: async () => vm.running,
      stop: async () => {
        calls.push('stop');
        vm.running = false;
      },
      cont: async () => {
        calls.push('cont');
        vm.running = true;
      },
    },
  };
  return vm;
}

describe('SuspendGate', () => {
  it('hands outstanding requests back with EIO, refuses new ones while suspended, and opens only after those settled below', async () => {
    const mem = new MemoryVolume({ size: 1 << 20 });
    const held = new HeldVolume(mem);
    const gate = new SuspendGate(held);
    held.held = true;
    const w1 = gate.write(0, pattern(4096, 1));
    const r1 = gate.read(4096, Buffer.alloc(4096));
    expect(gate.suspend()).toBe(2);
    await expect(w1).rejects.toMatchObject({ code: 'EIO' });
    await expect(r1).rejects.toBeInstanceOf(VolumeError);
    await expect(gate.write(0, pattern(4096, 2))).rejects.toMatchObject({ code: 'EIO' });
    let opened = false;
    const resumed = gate.resume().then(() => (opened = true));
    await sleep(20);
    expect(opened).toBe(false); // the handed-back write still runs below
    held.release();
    await resumed;
    // The old write landed before anything new could pass: a newer write to the same block wins.
    await gate.write(0, pattern(4096, 3));
    const b = Buffer.alloc(4096);
    await mem.read(0, b);
    expect(b.equals(pattern(4096, 3))).toBe(true);
    expect(gate.handedBack).toBe(2);
  });
});

describe('VmSuspender', () => {
  it('pause: stops a running VM, hands its requests back, resumes (cont) once every disk is reachable', async () => {
    const vm = fakeVm();
    const gate = new SuspendGate(new MemoryVolume({ size: 1 << 20 }));
    let reach = true;
    const s = new VmSuspender({ vm: 'vm1', action: 'pause', control: vm.control, logger: log, pollMs: 10 });
    cleanups.push(() => s.close());
    s.addDisk({ name: 'd0', reachable: () => reach, gate });
    await sleep(30);
    expect(s.status()).toBeUndefined();
    reach = false;
    await sleep(50);
    expect(vm.calls).toEqual(['stop']);
    expect(s.status()).toMatchObject({ action: 'pause', paused: true, disks: ['d0'] });
    expect(gate.isSuspended).toBe(true);
    reach = true;
    await sleep(50);
    expect(vm.calls).toEqual(['stop', 'cont']);
    expect(s.status()).toBeUndefined();
    expect(gate.isSuspended).toBe(false);
  });

  it('a VM the user paused is neither paused nor resumed', async () => {
    const vm = fakeVm(false);
    let reach = false;
    const s = new VmSuspender({ vm: 'vm1', action: 'pause', control: vm.control, logger: log, pollMs: 10 });
    cleanups.push(() => s.close());
    s.addDisk({ name: 'd0', reachable: () => reach, gate: new SuspendGate(new MemoryVolume({ size: 4096 })) });
    await sleep(50);
    expect(s.status()).toMatchObject({ paused: false });
    reach = true;
    await sleep(50);
    expect(vm.calls).toEqual([]);
    expect(vm.running).toBe(false);
  });

  it('queue: only reports the suspension (the replicated layer queues)', async () => {
    let reach = false;
    const s = new VmSuspender({ vm: 'vm1', action: 'queue', logger: log, pollMs: 10 });
    cleanups.push(() => s.close());
    s.addDisk({ name: 'a', reachable: () => true });
    s.addDisk({ name: 'b', reachable: () => reach });
    await sleep(40);
    expect(s.status()).toMatchObject({ action: 'queue', disks: ['b'], paused: false });
    reach = true;
    await sleep(40);
    expect(s.status()).toBeUndefined();
  });
});

/** A QMP server as QEMU speaks it; `stop` is answered only when `drained()` is called. */
async function fakeQemu(sock: string) {
  const state = { status: 'running', commands: [] as string[], drain: null as (() => void) | null };
  const server = net.createServer((c) => {
    c.write(JSON.stringify({ QMP: { version: { qemu: { major: 7, minor: 2, micro: 0 } }, capabilities: ['oob'] } }) + '\r\n');
    let buf = '';
    c.on('data', (b) => {
      buf += b.toString();
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const m = JSON.parse(buf.slice(0, nl)) as { execute: string; id?: string };
        buf = buf.slice(nl + 1);
        state.commands.push(m.execute);
        const reply = (ret: unknown) => c.write(JSON.stringify({ return: ret, id: m.id }) + '\r\n');
        if (m.execute === 'qmp_capabilities') reply({});
        else if (m.execute === 'query-status') reply({ status: state.status, running: state.status === 'running', singlestep: false });
        else if (m.execute === 'stop') {
          state.status = 'paused';
          c.write(JSON.stringify({ event: 'STOP', timestamp: { seconds: 1, microseconds: 0 } }) + '\r\n');
          state.drain = () => reply({});
        } else if (m.execute === 'cont') {
          state.status = 'running';
          c.write(JSON.stringify({ event: 'RESUME', timestamp: { seconds: 2, microseconds: 0 } }) + '\r\n');
          reply({});
        } else c.write(JSON.stringify({ error: { class: 'CommandNotFound', desc: `The command ${m.execute} has not been found` }, id: m.id }) + '\r\n');
      }
    });
  });
  await new Promise<void>((r) => server.listen(sock, r));
  cleanups.push(() => new Promise<void>((r) => server.close(() => r())));
  return state;
}

describe('QMP client', () => {
  it('greeting, capabilities, commands by id, errors, and stop resolved on the STOP event before QEMU answers it', async () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'vst-qmp-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const sock = path.join(dir, 'qmp.sock');
    const q = await fakeQemu(sock);
    const c = await QmpClient.connect(sock);
    cleanups.push(() => c.close());
    expect(await c.queryStatus()).toMatchObject({ running: true, status: 'running' });
    await expect(c.execute('nope')).rejects.toMatchObject({ errorClass: 'CommandNotFound' });
    c.close();

    const ctl = new QmpVmControl(sock, 2000);
    cleanups.push(() => ctl.close());
    expect(await ctl.running()).toBe(true);
    await ctl.stop(); // resolves although `stop` is not answered yet (QEMU drains first)
    expect(q.status).toBe('paused');
    expect(await ctl.running()).toBe(false); // the client does not wait for the pending answer to stop
    q.drain!();
    await ctl.cont();
    expect(q.status).toBe('running');
    await ctl.cont(); // running already: no second cont
    expect(q.commands.filter((x) => x === 'cont')).toHaveLength(1);
  });
});

describe('config', () => {
  it('paths policy and per-VM multipath and suspend settings', () => {
    const c = parseConfig(
      {
        paths: { selector: 'round-robin', failback: { delayMs: 5000 }, damping: { holdMs: 100 }, sources: ['127.0.0.2'] },
        vms: [{ name: 'vm1', qmp: 'q.sock', onUnreachable: { action: 'fail' }, pathPriority: 'high', disks: [] }],
      },
      '/etc/vstore',
    );
    expect(c.paths).toMatchObject({ selector: 'round-robin', failback: { mode: 'delayed', ms: 5000 }, damping: { holdMs: 100, maxHoldMs: 60_000 }, sources: ['127.0.0.2'], requestTimeoutMs: 10_000 });
    expect(c.vms[0]).toMatchObject({ qmp: '/etc/vstore/q.sock', onUnreachable: { action: 'fail', failAfterMs: 30_000 }, pathPriority: 'high' });
    expect(parseConfig({ paths: { failback: 'manual' } }, '/').paths!.failback).toEqual({ mode: 'manual' });
    expect(() => parseConfig({ paths: { selector: 'fastest' } }, '/')).toThrow(ConfigError);
    expect(() => parseConfig({ vms: [{ name: 'v', onUnreachable: { action: 'hibernate' } }] }, '/')).toThrow(/vms\[0\]\.onUnreachable\.action/);
  });
});
