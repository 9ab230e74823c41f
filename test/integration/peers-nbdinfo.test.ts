/**
 * nbdinfo (libnbd) against `vstore nbd`: what the handshake advertises (--json), the allocation
 * map of a sparse image (--map), and export listing (--list).
 */
import path from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  KiB, MiB, patterned, requireCommands, run, sparseImage, startNbdServer, startVstoreDaemon, tempDir,
  type DataRegion, type NbdServer,
} from '../helpers/index.js';

const SIZE = 64 * MiB;
let dir: string;
let srv: NbdServer | undefined;
beforeAll(() => {
  requireCommands('nbdinfo');
  dir = tempDir('vstore-ninfo-');
});
async function stopCurrent(): Promise<void> {
  const s = srv;
  srv = undefined;
  if (s) await s.stop();
}
afterEach(stopCurrent);

let n = 0;
async function freshExport(opts: { regions?: DataRegion[]; readOnly?: boolean; exportName?: string } = {}) {
  const image = path.join(dir, `export${n++}.raw`);
  sparseImage(image, SIZE, opts.regions);
  srv = await startNbdServer({ image, readOnly: opts.readOnly, exportName: opts.exportName });
  return { image, srv };
}

interface InfoExport {
  'export-name': string;
  'export-size': number;
  contexts: string[];
  is_read_only: boolean;
  can_cache: boolean;
  can_fast_zero: boolean;
  can_flush: boolean;
  can_fua: boolean;
  can_multi_conn: boolean;
  can_trim: boolean;
  can_zero: boolean;
  block_size_minimum?: number;
  block_size_preferred?: number;
  block_size_maximum?: number;
}

async function info(s: NbdServer, extra: string[] = []): Promise<{ protocol: string; structured: boolean; exports: InfoExport[] }> {
  return JSON.parse((await run('nbdinfo', ['--json', ...extra, s.uri])).stdout);
}

const isPow2 = (x: number) => Number.isInteger(x) && x > 0 && (x & (x - 1)) === 0;

describe('nbdinfo with vstore nbd', () => {
  it('--json: size, flags, block sizes and contexts of a writable raw file export', async () => {
    const { srv } = await freshExport();
    const j = await info(srv);
    expect(j.protocol).toBe('newstyle-fixed');
    expect(j.structured).toBe(true);
    expect(j.exports).toHaveLength(1);
    const e = j.exports[0]!;
    expect(e['export-name']).toBe('');
    expect(e['export-size']).toBe(SIZE);
    expect(e).toMatchObject({
      is_read_only: false,
      can_flush: true,
      can_fua: true,
      can_trim: true,
      can_zero: true,
      // fallocate(ZERO_RANGE) works on this ext4: zeroing is fast, so FAST_ZERO is offered.
      can_fast_zero: true,
      // One file behind every connection: a flush on one covers the writes of all.
      can_multi_conn: true,
      can_cache: true,
    });
    expect(e.contexts).toContain('base:allocation');
    // NBD_INFO_BLOCK_SIZE (nbdkit's file plugin is the one peer that does not send it).
    if (srv.kind !== 'nbdkit') {
      const { block_size_minimum: min, block_size_preferred: pref, block_size_maximum: max } = e;
      expect(min).toBeDefined();
      expect(isPow2(min!) && isPow2(pref!)).toBe(true);
      expect(min!).toBeLessThanOrEqual(512);
      expect(pref!).toBeGreaterThanOrEqual(min!);
      expect(pref!).toBeGreaterThanOrEqual(4096);
      expect(max!).toBeGreaterThanOrEqual(Math.max(pref!, 1 * MiB));
      expect(max! % min!).toBe(0);
    }
  });

  it('--json of a read-only export', async () => {
    const { srv } = await freshExport({ readOnly: true });
    const e = (await info(srv)).exports[0]!;
    expect(e.is_read_only).toBe(true);
    expect(e['export-size']).toBe(SIZE);
    expect(e.contexts).toContain('base:allocation');
  });

  it('--map of a sparse image matches its data and holes', async () => {
    const regions: DataRegion[] = [
      { offset: 0, length: 64 * KiB, seed: 1 },
      { offset: 1 * MiB, length: 1 * MiB, seed: 2 },
      { offset: 2 * MiB, length: 256 * KiB, seed: 3 }, // adjacent to the previous: one data run
      { offset: 10 * MiB + 512 * KiB, length: 4 * MiB, seed: 4 },
      { offset: SIZE - 128 * KiB, length: 128 * KiB, seed: 5 },
    ];
    const { srv } = await freshExport({ regions });
    const raw: Array<{ offset: number; length: number; type: number }> = JSON.parse(
      (await run('nbdinfo', ['--map', '--json', srv.uri])).stdout,
    );
    // Contiguous and covering the export.
    let pos = 0;
    for (const e of raw) {
      expect(e.offset).toBe(pos);
      pos += e.length;
    }
    expect(pos).toBe(SIZE);
    // Merge runs of the same type, then compare with the image's layout.
    const merged: Array<{ offset: number; length: number; type: number }> = [];
    for (const e of raw) {
      const last = merged[merged.length - 1];
      if (last && last.type === e.type) last.length += e.length;
      else merged.push({ offset: e.offset, length: e.length, type: e.type });
    }
    expect(merged).toEqual([
      { offset: 0, length: 64 * KiB, type: 0 },
      { offset: 64 * KiB, length: MiB - 64 * KiB, type: 3 },
      { offset: MiB, length: MiB + 256 * KiB, type: 0 },
      { offset: 2 * MiB + 256 * KiB, length: 8 * MiB + 256 * KiB, type: 3 },
      { offset: 10 * MiB + 512 * KiB, length: 4 * MiB, type: 0 },
      { offset: 14 * MiB + 512 * KiB, length: SIZE - 128 * KiB - (14 * MiB + 512 * KiB), type: 3 },
      { offset: SIZE - 128 * KiB, length: 128 * KiB, type: 0 },
    ]);
    // --map over a sub-range (libnbd asks for block status at a non-zero offset).
    const part = (await run('nbdinfo', ['--map', '--json', '--totals', srv.uri])).stdout;
    const totals: Array<{ size: number; type: number }> = JSON.parse(part);
    const dataBytes = totals.filter((t) => t.type === 0).reduce((a, t) => a + t.size, 0);
    expect(dataBytes).toBe(64 * KiB + MiB + 256 * KiB + 4 * MiB + 128 * KiB);
  });

  it('--list shows the named export', async () => {
    const { srv } = await freshExport({ exportName: 'disk0' });
    const listUri = `nbd+unix://?socket=${srv.socket}`;
    const j = JSON.parse((await run('nbdinfo', ['--list', '--json', listUri])).stdout);
    const names = j.exports.map((e: InfoExport) => e['export-name']);
    expect(names).toEqual(['disk0']);
    expect(j.exports[0]['export-size']).toBe(SIZE);
    // Connecting to the named export works; a wrong name is refused.
    const ok = await run('nbdinfo', ['--size', `nbd+unix:///disk0?socket=${srv.socket}`]);
    expect(ok.stdout.trim()).toBe(String(SIZE));
    const bad = await run('nbdinfo', ['--size', `nbd+unix:///nope?socket=${srv.socket}`], { check: false });
    expect(bad.code).not.toBe(0);
  });

  it('--list of the daemon\'s shared TCP listener shows every disk as VM/DISK', async () => {
    // `vstore serve`, not `vstore nbd`: only the daemon serves several exports on one listener.
    const img = (name: string, seed: number, size: number) => {
      const f = path.join(dir, `${name}.raw`);
      sparseImage(f, size, [{ offset: 0, length: 4096, seed }]);
      return f;
    };
    const disks = [
      { vm: 'vm1', name: 'disk0', size: 16 * MiB, seed: 21, readOnly: false },
      { vm: 'vm1', name: 'disk1', size: 32 * MiB, seed: 22, readOnly: true },
      { vm: 'vm2', name: 'disk0', size: 8 * MiB, seed: 23, readOnly: false },
    ];
    const vms = ['vm1', 'vm2'].map((vm) => ({
      name: vm,
      disks: disks.filter((d) => d.vm === vm).map((d) => ({ name: d.name, file: img(`${d.vm}-${d.name}`, d.seed, d.size), readOnly: d.readOnly })),
    }));
    const daemon = await startVstoreDaemon({ vms });
    try {
      const j = JSON.parse((await run('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${daemon.port}`])).stdout);
      const byName = new Map<string, InfoExport>(j.exports.map((e: InfoExport) => [e['export-name'], e]));
      expect([...byName.keys()].sort()).toEqual(['vm1/disk0', 'vm1/disk1', 'vm2/disk0']);
      for (const d of disks) {
        const e = byName.get(`${d.vm}/${d.name}`)!;
        expect(e['export-size']).toBe(d.size);
        expect(e.is_read_only).toBe(d.readOnly);
        // Each export reaches its own image: the first 4 KiB are that disk's pattern.
        const out = path.join(dir, `list-${d.vm}-${d.name}.bin`);
        await run('nbdcopy', [`nbd://127.0.0.1:${daemon.port}/${d.vm}/${d.name}`, out]);
        const { readFileSync } = await import('node:fs');
        const got = readFileSync(out);
        expect(got.length).toBe(d.size);
        expect(got.subarray(0, 4096).equals(patterned(4096, d.seed))).toBe(true);
      }
    } finally {
      await daemon.stop();
    }
  });
});
