/**
 * A real guest (QEMU TCG) paused when every path to its disk is gone, and resumed when one
 * returns. The disk is a volume on a real `vstore node`, reached only over two TCP proxies
 * (127.0.0.2, 127.0.0.3) that the test cuts; the VM has `onUnreachable: {action: pause}` and its
 * QMP socket in the daemon's config; the drive has `werror=stop,rerror=stop` (QEMU keeps the
 * requests the daemon hands back and resubmits them on `cont`). The guest writes, re-reads and
 * compares blocks in a loop across the outage. While the paths are cut, QEMU's own query-status
 * (on a second QMP monitor, the test's) says paused and `vstore status` says suspended and
 * paused by vstore; when a path returns the VM runs again, and the guest saw no I/O error and no
 * mismatch. A VM that the user paused is left paused (checked on the same VM afterwards).
 */
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { QmpClient } from '../../lib/daemon/qmp.js';
import { requireCommands, runGuest, tempDir } from '../helpers/index.js';
import { startPathCluster } from '../unit/paths/cluster.js';
import { waitFor } from '../unit/paths/wait.js';

beforeAll(() => requireCommands('qemu-system-x86_64'));

const SCRIPT = String.raw`
echo 3 > /proc/sys/vm/drop_caches
i=0
while [ $i -lt 48 ]; do
  dd if=/dev/urandom of=/tmp/b$i bs=64k count=1 2>/dev/null
  dd if=/tmp/b$i of=/dev/vda bs=64k seek=$i count=1 conv=fsync 2>/dev/null || result ioerr "write $i"
  echo 3 > /proc/sys/vm/drop_caches
  dd if=/dev/vda of=/tmp/c bs=64k skip=$i count=1 2>/dev/null || result ioerr "read $i"
  cmp -s /tmp/b$i /tmp/c || result mismatch "$i"
  [ $i -eq 8 ] && result phase cut
  [ $i -eq 30 ] && result phase userpause
  i=$((i+1))
done
echo 3 > /proc/sys/vm/drop_caches
i=0
while [ $i -lt 48 ]; do
  dd if=/dev/vda of=/tmp/c bs=64k skip=$i count=1 2>/dev/null || result ioerr "reread $i"
  cmp -s /tmp/b$i /tmp/c || result mismatch "final $i"
  i=$((i+1))
done
if dmesg | grep -qiE 'I/O error|blk_update_request|Buffer I/O'; then result dmesg ioerr; else result dmesg clean; fi
result done 1
`;

interface VmView {
  name: string;
  suspended?: { paused: boolean; action: string; handedBack: number };
}

async function connectWhenThere(sock: string): Promise<QmpClient> {
  const end = Date.now() + 30_000;
  for (;;) {
    try {
      return await QmpClient.connect(sock, 5000);
    } catch (e) {
      if (Date.now() > end) throw e;
      await new Promise((r) => setTimeout(r, 200));
    }
  }
}

describe('guest paused over QMP while its disk has no path', () => {
  it('every path cut: QEMU paused (query-status), vstore status suspended; a path back: resumed, the guest saw no I/O error', async () => {
    const dir = tempDir('vst-susp-');
    const cluster = await startPathCluster(dir, { id: 'mp', hosts: ['127.0.0.2', '127.0.0.3'], volumes: ['vm1/disk0'], size: 64 * 1024 * 1024 });
    const proxies = cluster.proxies;
    const daemonQmp = path.join(dir, 'qmp-vstore.sock');
    const testQmp = path.join(dir, 'qmp-test.sock');
    try {
      const d = await cluster.daemon({
        paths: { requestTimeoutMs: 1000, healthIntervalMs: 300, probeTimeoutMs: 300 },
        vms: [{ name: 'vm1', qmp: daemonQmp, onUnreachable: { action: 'pause' }, disks: [{ name: 'disk0', volume: { size: '64M', replicas: 1 } }] }],
      });
      const vmStatus = async () => (await d.get<{ vms: VmView[] }>('/v1/status')).vms[0]!;

      let scenario: Promise<void> | null = null;
      let userPause: Promise<void> | null = null;
      const seen: Record<string, unknown> = {};
      let qmp: QmpClient | null = null;
      const g = runGuest({
        script: SCRIPT,
        timeoutMs: 240_000,
        qemuArgs: [
          '-drive', `file=nbd:unix:${d.diskSocket('vm1', 'disk0')},format=raw,if=virtio,cache=none,werror=stop,rerror=stop`,
          '-qmp', `unix:${daemonQmp},server=on,wait=off`,
          '-qmp', `unix:${testQmp},server=on,wait=off`,
        ],
        onResult: (key, value) => {
          if (key === 'phase' && value === 'cut' && !scenario) {
            scenario = (async () => {
              qmp = await connectWhenThere(testQmp);
              // Replies stop first, long enough for guest requests to be caught in flight (they
              // time out on both paths), then the links die.
              for (const p of proxies) p.blackhole();
              await new Promise((r) => setTimeout(r, 1500));
              for (const p of proxies) await p.cut();
              // QEMU itself says the VM is paused; vstore says why.
              seen.paused = await waitFor('QEMU paused', async () => {
                const s = await qmp!.queryStatus();
                return s.status === 'paused' && s;
              }, 30_000, d.log);
              seen.vstore = await waitFor('vstore status: suspended, paused by vstore', async () => {
                const v = await vmStatus();
                return v.suspended?.paused && v.suspended;
              }, 10_000, d.log);
              // Stays paused while the paths are gone.
              await new Promise((r) => setTimeout(r, 2000));
              seen.stillPaused = (await qmp!.queryStatus()).status;
              await proxies[1]!.restore();
              seen.running = await waitFor('QEMU running again', async () => {
                const s = await qmp!.queryStatus();
                return s.running && s;
              }, 30_000, d.log);
              seen.cleared = await waitFor('vstore status: not suspended', async () => !(await vmStatus()).suspended, 10_000, d.log);
              await proxies[0]!.restore();
            })();
            scenario.catch(() => {});
          }
          if (key === 'phase' && value === 'userpause' && scenario && !userPause) {
            // The user pauses the VM, then the paths go: vstore must not resume it by itself.
            userPause = (async () => {
              await scenario;
              await qmp!.execute('stop');
              for (const p of proxies) await p.cut();
              await waitFor('vstore status: suspended', async () => (await vmStatus()).suspended, 10_000, d.log);
              await new Promise((r) => setTimeout(r, 1000));
              seen.userPausedSuspend = (await vmStatus()).suspended;
              for (const p of proxies) await p.restore();
              await waitFor('vstore status: not suspended', async () => !(await vmStatus()).suspended, 10_000, d.log);
              await new Promise((r) => setTimeout(r, 1500));
              seen.afterUserPause = (await qmp!.queryStatus()).status;
              await qmp!.execute('cont');
            })();
            userPause.catch(() => {});
          }
        },
      });
      const guest = await g;
      expect(scenario, guest.serial.slice(-3000)).not.toBeNull();
      await scenario;
      await userPause;
      (qmp as QmpClient | null)?.close();
      if (guest.exitCode !== 0) throw new Error(`guest failed (exit ${guest.exitCode}):\n${guest.serial.slice(-5000)}`);
      expect(guest.map.get('done'), guest.serial.slice(-3000)).toBe('1');
      expect(guest.results.filter((r) => r.key === 'ioerr' || r.key === 'mismatch'), guest.serial.slice(-3000)).toEqual([]);
      expect(guest.map.get('dmesg'), guest.serial.slice(-3000)).toBe('clean');
      expect(seen.paused).toMatchObject({ status: 'paused', running: false });
      expect(seen.vstore).toMatchObject({ paused: true, action: 'pause' });
      // Guest requests were outstanding when the VM was paused: QEMU got them back and
      // resubmitted them after cont (the guest's compare loop proves they landed).
      expect((seen.vstore as { handedBack: number }).handedBack, d.log().slice(-3000)).toBeGreaterThan(0);
      expect(seen.stillPaused).toBe('paused');
      expect(seen.running).toMatchObject({ status: 'running', running: true });
      // The user's pause: vstore saw the disk unreachable but neither paused nor resumed the VM.
      expect(seen.userPausedSuspend).toMatchObject({ paused: false, action: 'pause' });
      expect(seen.afterUserPause).toBe('paused');
      expect(d.log()).toMatch(/VM paused over QMP/);
      expect(d.log()).toMatch(/VM resumed over QMP/);
      expect(d.log()).toMatch(/already paused \(not by vstore\)/);
      await d.stop();
    } finally {
      await cluster.stop();
    }
  }, 300_000);
});

