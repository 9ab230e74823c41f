/**
 * A share survives a daemon restart: a real guest (QEMU TCG, vhost-user-fs-pci) mounts two
 * vstore shares — a directory on a storage node by its path, and a local directory — and runs a
 * loop that writes, reads back, renames and appends through descriptors it keeps open. While it
 * works, the test runs `vstore serve --takeover` on the same config: the old daemon hands the
 * live vhost-user connections over and exits 0, the new one serves on. QEMU never reconnects
 * (vhost-user-fs cannot); the guest's loop sees no error, its open descriptors still append, a
 * flock it took before is still held after, and afterwards every file is right on the host — on
 * the node and in the local directory.
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { spawnProc, startDaemonWith, startResolverService, startStorageNode, type Proc } from '../helpers/cluster.js';
import { runGuest, virtiofsArgs } from '../helpers/guest.js';
import { VSTORE_BIN } from '../helpers/nbd-server.js';
import { requireCommands } from '../helpers/run.js';
import { tempDir } from '../helpers/tmp.js';

const MEM_MIB = 512;

beforeAll(() => requireCommands('qemu-system-x86_64'));

// Runs until the host creates /mnt/proj/stop (after the takeover) or 4000 iterations.
const SCRIPT = String.raw`
mkdir -p /mnt/proj /mnt/loc
mount -t virtiofs proj /mnt/proj
mount -t virtiofs loc /mnt/loc
exec 3>>/mnt/proj/held.log
exec 4>>/mnt/loc/held.log
mkdir -p /mnt/proj/sub /mnt/loc/sub
# a flock held across the handoff, on the node's share
exec 5>/mnt/proj/lk
/usr/bin/flock -x 5 && result locked 1
i=0
errs=0
result started 1
while [ $i -lt 4000 ]; do
  i=$((i+1))
  for d in /mnt/proj /mnt/loc; do
    if ! echo "file $i in $d" > $d/sub/f$i; then errs=$((errs+1)); echo "@@RESULT err write $d $i"; fi
    if [ "$(cat $d/sub/f$i)" != "file $i in $d" ]; then errs=$((errs+1)); echo "@@RESULT err read $d $i"; fi
    if [ $((i % 5)) -eq 0 ]; then
      if ! mv $d/sub/f$i $d/sub/g$i; then errs=$((errs+1)); echo "@@RESULT err mv $d $i"; fi
    fi
  done
  if ! echo "line $i" >&3; then errs=$((errs+1)); echo "@@RESULT err held3 $i"; fi
  if ! echo "line $i" >&4; then errs=$((errs+1)); echo "@@RESULT err held4 $i"; fi
  if [ $((i % 20)) -eq 0 ]; then echo "@@RESULT progress $i"; fi
  if [ -e /mnt/proj/stop ]; then break; fi
done
result iterations $i
result errors $errs
bad=0
j=1
while [ $j -le $i ]; do
  for d in /mnt/proj /mnt/loc; do
    f=$d/sub/f$j
    if [ $((j % 5)) -eq 0 ]; then f=$d/sub/g$j; fi
    if [ "$(cat $f 2>/dev/null)" != "file $j in $d" ]; then bad=$((bad+1)); fi
  done
  j=$((j+1))
done
result bad $bad
result held3 "$(wc -l < /mnt/proj/held.log)"
result held4 "$(wc -l < /mnt/loc/held.log)"
/usr/bin/flock -n /mnt/proj/lk true && result flock-after got || result flock-after busy
exec 5>&-
/usr/bin/flock -n /mnt/proj/lk true && result flock-released got || result flock-released busy
exec 3>&-
exec 4>&-
sync
cd /
umount /mnt/proj && umount /mnt/loc && result umount ok
result done 1
`;

interface ShareSt {
  tag: string;
  connected: boolean;
  connections: number;
  sessions: number;
  requests: number;
}

describe('a share survives a daemon restart (vstore serve --takeover under a working guest)', () => {
  it('hands the live virtiofs connections to a new daemon: the guest loop goes on without an error, the old daemon exits 0, the files are right', async () => {
    const dir = tempDir('vst-e2e-takeover-');
    const resolver = await startResolverService(path.join(dir, 'resolver'));
    const node = await startStorageNode({ id: 'n1', data: path.join(dir, 'n1'), resolver: resolver.url });
    const locDir = path.join(dir, 'loc');
    mkdirSync(locDir);
    const old = await startDaemonWith(path.join(dir, 'host'), {
      resolver: { url: resolver.url },
      vms: [
        {
          name: 'vm1',
          shares: [
            { tag: 'proj', path: '/projects/handoff', target: '/mnt/proj' },
            { tag: 'loc', dir: locDir, target: '/mnt/loc' },
          ],
        },
      ],
    });
    const nodeDir = path.join(node.data, 'dirs', 'projects', 'handoff');
    let fresh: Proc | undefined;
    let progressAtTakeover = 0;
    let lastProgress = 0;
    let oldExit: number | null | undefined;
    let stopped = false;
    let freshExit: number | null | undefined;
    const takeover = { done: Promise.resolve() as Promise<void>, error: undefined as unknown };
    try {
      const sockets = [
        { socket: path.join(old.runDir, 'vm1-proj.fs.sock'), tag: 'proj' },
        { socket: path.join(old.runDir, 'vm1-loc.fs.sock'), tag: 'loc' },
      ];
      const g = await runGuest({
        script: SCRIPT,
        memMiB: MEM_MIB,
        qemuArgs: virtiofsArgs(MEM_MIB, sockets),
        timeoutMs: 240_000,
        onResult: (key, value) => {
          if (key === 'progress') lastProgress = Number(value);
          // Once the guest works (and has done some rounds on the old daemon), restart the daemon under it.
          if (key === 'progress' && Number(value) === 40) {
            progressAtTakeover = lastProgress;
            takeover.done = (async () => {
              const oldGone = new Promise<number | null>((resolve) => old.child.once('exit', (code) => resolve(code)));
              fresh = await spawnProc(process.execPath, [VSTORE_BIN, 'serve', '-c', old.config, '--takeover', '--log-level', 'info'], (log) => log.includes('daemon ready'), 120_000);
              oldExit = await oldGone;
              // Let the guest work on the new daemon for a while, then tell it to stop.
              const at = lastProgress;
              const deadline = Date.now() + 60_000;
              while (lastProgress < at + 40 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 200));
              writeFileSync(path.join(nodeDir, 'stop'), '');
              stopped = true;
            })().catch((e: unknown) => {
              takeover.error = e;
              writeFileSync(path.join(nodeDir, 'stop'), '');
            });
          }
        },
      });
      await takeover.done;
      if (takeover.error) throw takeover.error;
      if (g.exitCode !== 0) throw new Error(`guest failed (exit ${g.exitCode}):\n${g.serial.slice(-5000)}`);
      const r = g.map;
      expect(r.get('done'), g.serial.slice(-3000)).toBe('1');
      expect(stopped).toBe(true);
      const iterations = Number(r.get('iterations'));
      // The loop ran before, across and after the takeover.
      expect(progressAtTakeover).toBe(40);
      expect(iterations).toBeGreaterThanOrEqual(80);
      expect(iterations).toBeLessThan(4000);
      expect(g.results.filter((x) => x.key === 'err')).toEqual([]);
      expect(r.get('errors')).toBe('0');
      expect(r.get('bad')).toBe('0');
      expect(r.get('held3')).toBe(String(iterations));
      expect(r.get('held4')).toBe(String(iterations));
      expect(r.get('umount')).toBe('ok');
      // the lock taken before the handoff is still held after it, and goes with its descriptor
      expect(r.get('locked')).toBe('1');
      expect(r.get('flock-after')).toBe('busy');
      expect(r.get('flock-released')).toBe('got');
      // The old daemon exited 0 after the handoff; the new one serves the same connections.
      if (process.env.HANDOFF_DEBUG) {
        const pick = (log: string) => log.split('\n').filter((l) => /handoff|takeover|restored/.test(l)).join('\n');
        console.log(JSON.stringify({ iterations, progressAtTakeover }), '\nOLD\n', pick(old.log()), '\nNEW\n', pick(fresh!.log()));
      }
      expect(oldExit).toBe(0);
      expect(old.log()).toMatch(/handoff: shares handed over/);
      expect(fresh!.log()).toMatch(/ids and handles restored from the handoff/);
      const st = await old.get<{ pid: number; vms: Array<{ shares: ShareSt[] }> }>('/v1/status');
      expect(st.pid).toBe(fresh!.child.pid);
      const shares = st.vms[0]!.shares;
      expect(shares.map((s) => s.tag)).toEqual(['proj', 'loc']);
      for (const s of shares) {
        // one FUSE session, never re-initialised; the connection was handed over, never re-made
        expect(s.sessions).toBe(1);
        expect(s.connections).toBe(1);
        expect(s.requests).toBeGreaterThan(100);
      }
    } finally {
      if (fresh) freshExit = await fresh.stop(false);
      if (!old.exited) await old.stop(false);
      await node.stop();
      await resolver.stop();
    }
    expect(freshExit).toBe(0); // and the new daemon stops cleanly on SIGTERM
    // What the guest wrote, looked at on the host: on the storage node and in the local directory.
    for (const [root, d] of [
      [nodeDir, '/mnt/proj'],
      [locDir, '/mnt/loc'],
    ] as const) {
      const held = readFileSync(path.join(root, 'held.log'), 'utf8').trim().split('\n');
      expect(held.length).toBeGreaterThanOrEqual(80);
      held.forEach((l, k) => expect(l).toBe(`line ${k + 1}`));
      const n = held.length;
      const names = readdirSync(path.join(root, 'sub'));
      expect(names.length).toBe(n);
      for (let j = 1; j <= n; j++) {
        const f = path.join(root, 'sub', j % 5 === 0 ? `g${j}` : `f${j}`);
        expect(existsSync(f), f).toBe(true);
        expect(readFileSync(f, 'utf8')).toBe(`file ${j} in ${d}\n`);
      }
    }
  }, 300_000);
});
