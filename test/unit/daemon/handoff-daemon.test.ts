// `vstore serve --takeover` between two real daemon processes (no guest: see
// test/e2e/guest-virtiofs-restart.test.ts for one): a takeover the new config cannot honour is
// refused before the commit and the old daemon keeps serving; a good one moves the shares'
// listening sockets (a front end connecting afterwards reaches the new daemon), the old daemon
// exits 0 and the new one owns the control socket; a config with an embedded resolver is refused.
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { native } from '../../../lib/native/index.js';
import { spawnProc, startDaemonWith } from '../../helpers/cluster.js';
import { VSTORE_BIN } from '../../helpers/nbd-server.js';
import { run } from '../../helpers/run.js';
import { tempDir } from '../../helpers/tmp.js';

interface Status {
  pid: number;
  vms: Array<{ name: string; shares: Array<{ tag: string; connections: number }> }>;
}

describe('vstore serve --takeover (two daemon processes)', () => {
  it('refuses a takeover its config cannot honour (the old daemon serves on), then takes over for real', async () => {
    const dir = tempDir('vst-takeover-');
    const a = path.join(dir, 'a');
    const b = path.join(dir, 'b');
    mkdirSync(a);
    mkdirSync(b);
    const old = await startDaemonWith(path.join(dir, 'host'), {
      vms: [{ name: 'vm1', shares: [{ tag: 'a', dir: a, target: '/mnt/a' }, { tag: 'b', dir: b, target: '/mnt/b' }] }],
    });
    try {
      const st0 = await old.get<Status>('/v1/status');
      expect(existsSync(`${old.control}.handoff`)).toBe(true);
      // A config without share b: the new daemon refuses, exits 1, the old one is untouched.
      const bad = path.join(dir, 'bad.json');
      writeFileSync(bad, JSON.stringify({ runDir: old.runDir, stateDir: path.join(dir, 'host', 'state'), control: old.control, vms: [{ name: 'vm1', shares: [{ tag: 'a', dir: a, target: '/mnt/a' }] }] }));
      const r = await run(process.execPath, [VSTORE_BIN, 'serve', '-c', bad, '--takeover'], { check: false, timeoutMs: 60_000 });
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(/share vm1\/b of the running daemon is not in this config/);
      expect(old.exited).toBe(false);
      expect(old.log()).toMatch(/handoff: not done; serving the shares here again/);
      const st1 = await old.get<Status>('/v1/status');
      expect(st1.pid).toBe(st0.pid);
      // still accepting on the share sockets
      const n = native();
      const c1 = n.unixConnect(path.join(old.runDir, 'vm1-a.fs.sock'));
      await waitFor(async () => (await old.get<Status>('/v1/status')).vms[0]!.shares[0]!.connections === 1);
      n.closeFd(c1);

      // Same config: the takeover happens; the old daemon exits 0.
      const oldExit = new Promise<number | null>((resolve) => old.child.once('exit', (code) => resolve(code)));
      const fresh = await spawnProc(process.execPath, [VSTORE_BIN, 'serve', '-c', old.config, '--takeover'], (log) => log.includes('daemon ready'), 60_000);
      try {
        expect(await oldExit).toBe(0);
        const st2 = await old.get<Status>('/v1/status');
        expect(st2.pid).toBe(fresh.child.pid);
        expect(st2.vms[0]!.shares.map((s) => [s.tag, s.connections])).toEqual([
          ['a', 1],
          ['b', 0],
        ]);
        // The listening sockets moved: a front end connecting now is accepted by the new daemon.
        const c2 = n.unixConnect(path.join(old.runDir, 'vm1-b.fs.sock'));
        await waitFor(async () => (await old.get<Status>('/v1/status')).vms[0]!.shares[1]!.connections === 1);
        n.closeFd(c2);
        expect(existsSync(`${old.control}.handoff`)).toBe(true); // the new daemon can be taken over in turn
      } finally {
        expect(await fresh.stop()).toBe(0);
      }
      expect(existsSync(path.join(old.runDir, 'vm1-a.fs.sock'))).toBe(false);
    } finally {
      if (!old.exited) await old.stop(false);
    }
  }, 120_000);

  it('refuses --takeover with an embedded resolver or storage nodes, and without a running daemon', async () => {
    const dir = tempDir('vst-takeover-cfg-');
    const cfg = path.join(dir, 'c.json');
    writeFileSync(cfg, JSON.stringify({ runDir: path.join(dir, 'run'), control: path.join(dir, 'control.sock'), resolver: { store: path.join(dir, 'r.json') }, vms: [] }));
    const r = await run(process.execPath, [VSTORE_BIN, 'serve', '-c', cfg, '--takeover'], { check: false, timeoutMs: 30_000 });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/--takeover: the config embeds a resolver or storage nodes/);
    writeFileSync(cfg, JSON.stringify({ runDir: path.join(dir, 'run'), control: path.join(dir, 'control.sock'), vms: [] }));
    const r2 = await run(process.execPath, [VSTORE_BIN, 'serve', '-c', cfg, '--takeover'], { check: false, timeoutMs: 30_000 });
    expect(r2.code).toBe(1);
    expect(r2.stderr).toMatch(/--takeover: no running daemon answers on .*control\.sock\.handoff/);
  }, 60_000);
});

async function waitFor(cond: () => Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 50));
  }
}
