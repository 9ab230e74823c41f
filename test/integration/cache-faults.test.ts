/**
 * The cache device fails under a running daemon: the device is a file served by nbdkit with its
 * error filter (writes fail with EIO once a trigger file exists), attached through vstore's NBD
 * client. The write-back disk must degrade to pass-through with one clear log line, say so in
 * stats, status and metrics, write back the dirty data it can still read, and lose nothing that
 * was acknowledged: every block reads back through the daemon and is on the backing file.
 */
import { existsSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { call, getText } from '../../lib/cli/client.js';
import { NbdClientConnection } from '../../lib/nbd/client.js';
import { silentLogger } from '../../lib/log.js';
import { spawnProc } from '../helpers/cluster.js';
import { VSTORE_BIN } from '../helpers/nbd-server.js';
import { requireCommands, run } from '../helpers/run.js';
import { tempDir } from '../helpers/tmp.js';

const BS = 4096;

function blockOf(i: number, gen: number): Buffer {
  const b = Buffer.alloc(BS, (i * 7 + gen) & 0xff);
  b.writeUInt32LE(i, 0);
  b.writeUInt32LE(gen, 4);
  return b;
}

describe('cache device faults (nbdkit error filter under a real vstore serve)', () => {
  it('a write-back disk whose cache device starts failing goes pass-through and loses no acknowledged write', async () => {
    requireCommands('nbdkit');
    const dir = tempDir('vstore-cache-faults-');
    const devImg = path.join(dir, 'cache.img');
    const image = path.join(dir, 'disk.img');
    writeFileSync(devImg, '');
    truncateSync(devImg, 32 * 1024 * 1024);
    writeFileSync(image, '');
    truncateSync(image, 16 * 1024 * 1024);
    const devSock = path.join(dir, 'cachedev.sock');
    const trigger = path.join(dir, 'fail-writes');
    const nbdkit = await spawnProc('nbdkit', ['-f', '-U', devSock, '--filter=error', 'file', devImg, 'error-pwrite=EIO', 'error-pwrite-rate=100%', `error-pwrite-file=${trigger}`], () => existsSync(devSock), 30_000);

    const control = path.join(dir, 'control.sock');
    const sock = path.join(dir, 'run', 'vm-d0.sock');
    const cfgFile = path.join(dir, 'config.json');
    writeFileSync(
      cfgFile,
      JSON.stringify({
        runDir: path.join(dir, 'run'),
        control,
        cache: { device: `nbd+unix:///?socket=${devSock}`, lineSize: '64K' },
        vms: [{ name: 'vm', disks: [{ name: 'd0', file: image, cache: { mode: 'write-back' } }] }],
      }),
    );
    rmSync(sock, { force: true });
    const daemon = await spawnProc(process.execPath, [VSTORE_BIN, 'serve', '-c', cfgFile, '--log-level', 'info'], () => existsSync(control), 30_000);

    const c = await NbdClientConnection.connect({ address: `unix:${sock}`, logger: silentLogger() });
    const latest = new Map<number, number>();
    const write = async (i: number, gen: number): Promise<void> => {
      await c.write(i * BS, blockOf(i, gen));
      latest.set(i, gen);
    };
    // Dirty data on the device: flushed, and some not flushed.
    for (let i = 0; i < 256; i++) await write(i, 1);
    await c.flush();
    await Promise.all(Array.from({ length: 172 }, (_, k) => write(128 + k, 2))); // not flushed, still dirty
    // (in-process, not the CLI: a node start-up would give write-back the time to finish)
    const before = JSON.parse(JSON.stringify(await call(control, 'GET', '/v1/vms/vm/disks/d0/cache'))) as { dirtyBytes: number; degraded: boolean };
    expect(before.degraded).toBe(false);
    expect(before.dirtyBytes).toBeGreaterThan(0);

    // The device starts failing every write.
    writeFileSync(trigger, '');
    for (let i = 290; i < 400; i++) await write(i, 3); // acknowledged: through pass-through after the failure
    await c.flush();

    const stats = JSON.parse((await run(process.execPath, [VSTORE_BIN, 'cache', 'stats', 'vm/d0', '--json', '--control', control])).stdout) as { degraded: boolean; mode: string; lostBytes: number };
    expect(stats.degraded).toBe(true);
    expect(stats.mode).toBe('pass-through');
    expect(stats.lostBytes).toBe(0);
    const status = (await run(process.execPath, [VSTORE_BIN, 'status', '--control', control])).stdout;
    expect(status).toMatch(/vm\/d0\s+pass-through.*DEGRADED/);
    const metrics = await getText(control, '/metrics');
    expect(metrics).toMatch(/vstore_cache_degraded\{vm="vm",disk="d0"\} 1/);
    const failLines = daemon.log().split('\n').filter((l) => l.includes('disk degraded to pass-through'));
    expect(failLines.length).toBe(1);

    // Nothing acknowledged is lost: through the daemon, and on the backing file after a clean stop.
    const back = Buffer.alloc(BS);
    for (const [i, gen] of latest) {
      await c.read(i * BS, back);
      expect(back.equals(blockOf(i, gen)), `block ${i} through the daemon`).toBe(true);
    }
    await c.close();
    expect(await daemon.stop(false)).toBe(0);
    const file = readFileSync(image);
    for (const [i, gen] of latest) expect(file.subarray(i * BS, (i + 1) * BS).equals(blockOf(i, gen)), `block ${i} on the backing file`).toBe(true);
    await nbdkit.stop(false);
  }, 120_000);
});
