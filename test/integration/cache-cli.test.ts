/**
 * `vstore cache ...` and the cache parts of `vstore status` and /metrics against a real
 * `vstore serve` with a cache device: modes, warm with progress, flush, invalidate, the write-back
 * of a disk's dirty cache before it is removed.
 */
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { call, getText } from '../../lib/cli/client.js';
import { NbdClientConnection } from '../../lib/nbd/client.js';
import { silentLogger } from '../../lib/log.js';
import { startVstoreDaemon, VSTORE_BIN } from '../helpers/nbd-server.js';
import { run } from '../helpers/run.js';
import { tempDir } from '../helpers/tmp.js';

describe('vstore cache (CLI and control API)', () => {
  it('mode, warm, stats, status, metrics, invalidate, and write-back before a disk is removed', async () => {
    const dir = tempDir('vstore-cache-cli-');
    const image = path.join(dir, 'disk.img');
    writeFileSync(image, '');
    truncateSync(image, 16 * 1024 * 1024);
    writeFileSync(image, Buffer.alloc(1024 * 1024, 0x5a), { flag: 'r+' });
    const control = path.join(dir, 'control.sock');
    const sock = path.join(dir, 'd0.sock');
    const d = await startVstoreDaemon({
      control,
      cache: { device: path.join(dir, 'cache.img'), size: '32M' },
      vms: [{ name: 'vm', disks: [{ name: 'd0', file: image, nbd: { socket: sock } }] }],
    });
    const cli = (...args: string[]) => run(process.execPath, [VSTORE_BIN, ...args, '--control', control], { check: false, timeoutMs: 60_000 });

    expect((await cli('cache', 'mode', 'vm/d0')).stdout).toBe('vm/d0: write-through\n'); // the default
    const warm = await cli('cache', 'warm', 'vm/d0', '--range', '0:1M');
    expect(warm.code, warm.stderr).toBe(0);
    expect(warm.stderr).toMatch(/warm \[#+\] 100%/);
    let stats = JSON.parse((await cli('cache', 'stats', 'vm/d0', '--json')).stdout) as { usedBytes: number; hitRatio: number };
    expect(stats.usedBytes).toBeGreaterThanOrEqual(1024 * 1024);

    const c = await NbdClientConnection.connect({ address: `unix:${sock}`, logger: silentLogger() });
    const b = Buffer.alloc(65536);
    await c.read(0, b);
    expect(b.every((x) => x === 0x5a)).toBe(true);
    stats = JSON.parse((await cli('cache', 'stats', 'vm/d0', '--json')).stdout) as { usedBytes: number; hitRatio: number };
    expect(stats.hitRatio).toBeGreaterThan(0);

    const status = (await cli('status')).stdout;
    expect(status).toMatch(/CACHE\s+MODE\s+HIT%/);
    expect(status).toMatch(/vm\/d0\s+write-through/);
    const metrics = await getText(control, '/metrics');
    expect(metrics).toMatch(/vstore_cache_hit_ratio\{vm="vm",disk="d0"\} [0-9.]+/);
    expect(metrics).toMatch(/vstore_cache_mode\{vm="vm",disk="d0",mode="write-through"\} 1/);

    // a VM's share changed at runtime: the scheduler's view shows it
    const shares = await cli('cache', 'shares', 'vm', '3', '--min', '1M');
    expect(shares.code, shares.stderr).toBe(0);
    const balloon = JSON.parse((await cli('cache', 'balloon', '--json')).stdout) as { vms: Array<{ vm: string; shares: number; minBytes?: number }> };
    expect(balloon.vms.find((v) => v.vm === 'vm')).toMatchObject({ shares: 3 });
    const badShares = await cli('cache', 'shares', 'nope', '2');
    expect(badShares.code).toBe(1);
    expect(badShares.stderr).toMatch(/VM nope has no cached disk/);

    expect((await cli('cache', 'mode', 'vm/d0', 'write-back')).stdout).toBe('vm/d0: write-back\n');
    const bad = await cli('cache', 'mode', 'vm/d0', 'sideways');
    expect(bad.code).toBe(1);
    expect(bad.stderr).toMatch(/mode: one of write-back, write-through, write-around, pass-through/);
    const noForce = await cli('cache', 'invalidate', 'vm/d0');
    expect(noForce.code).toBe(1);
    expect(noForce.stderr).toMatch(/--force is required/);

    // dirty data, then the disk is removed: it is written back first
    await c.write(2 * 1024 * 1024, Buffer.alloc(65536, 0x77));
    await c.flush();
    await c.close();
    const rm = await cli('disk', 'remove', 'vm', 'd0');
    expect(rm.code, rm.stderr).toBe(0);
    const onFile = readFileSync(image).subarray(2 * 1024 * 1024, 2 * 1024 * 1024 + 65536);
    expect(onFile.every((x) => x === 0x77)).toBe(true);
    await d.stop();
  }, 120_000);
});
