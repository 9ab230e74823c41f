/**
 * qemu-img against `vstore nbd`: info, convert into and out of the export (raw and qcow2
 * sources), compare. QEMU's NBD client is the judge.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  MiB, expectedImage, requireCommands, run, sha256, sha256File, sparseImage, startNbdServer, tempDir,
  type DataRegion, type NbdServer,
} from '../helpers/index.js';

const SIZE = 64 * MiB;
const REGIONS: DataRegion[] = [
  { offset: 0, length: 1 * MiB, seed: 1 },
  { offset: 5 * MiB + 4096, length: 300 * 1024, seed: 2 },
  { offset: 40 * MiB, length: 3 * MiB, seed: 3 },
  { offset: SIZE - 64 * 1024, length: 64 * 1024, seed: 4 },
];

let dir: string;
let srv: NbdServer | undefined;
beforeAll(() => {
  requireCommands('qemu-img', 'qemu-io');
  dir = tempDir('vstore-qimg-');
});
/** Stops the current server; exit status 0 on SIGTERM is part of every test. */
async function stopCurrent(): Promise<void> {
  const s = srv;
  srv = undefined;
  if (s) await s.stop();
}
afterEach(stopCurrent);

let n = 0;
async function freshExport(size = SIZE): Promise<{ image: string; srv: NbdServer }> {
  const image = path.join(dir, `export${n++}.raw`);
  sparseImage(image, size);
  srv = await startNbdServer({ image });
  return { image, srv };
}

describe('qemu-img with vstore nbd', () => {
  it('info reports the virtual size', async () => {
    const { srv } = await freshExport();
    const r = await run('qemu-img', ['info', '--output=json', srv.uri]);
    const info = JSON.parse(r.stdout);
    expect(info['virtual-size']).toBe(SIZE);
    expect(info.format).toBe('raw');
  });

  it('convert qcow2 -> export -> raw and qcow2, checksums equal, compare clean', async () => {
    const src = path.join(dir, 'src.raw');
    sparseImage(src, SIZE, REGIONS);
    const srcQcow = path.join(dir, 'src.qcow2');
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', src, srcQcow]);
    const { image, srv } = await freshExport();

    // Into the export (-n: the target exists), from qcow2.
    await run('qemu-img', ['convert', '-n', '-p', '-f', 'qcow2', '-O', 'raw', srcQcow, srv.uri], { timeoutMs: 60_000 });
    // Compare through NBD against the raw source: exit 0 = identical.
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, srv.uri]);
    expect(cmp.stdout).toMatch(/Images are identical/);

    // Out of the export, to raw and to qcow2.
    const outRaw = path.join(dir, 'out.raw');
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', srv.uri, outRaw]);
    expect(sha256File(outRaw)).toBe(sha256File(src));
    const outQcow = path.join(dir, 'out.qcow2');
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', srv.uri, outQcow]);
    await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', outQcow, src]);

    // The image file behind the export holds exactly the source bytes.
    expect(sha256File(image)).toBe(sha256(expectedImage(SIZE, REGIONS)));
  });

  it('convert raw -> export overwrites old data (zeroes where the source has holes)', async () => {
    const src = path.join(dir, 'src2.raw');
    sparseImage(src, SIZE, REGIONS.slice(0, 2));
    const { image, srv } = await freshExport();
    // Dirty the whole export first, so holes in the source must really be zeroed.
    await run('qemu-io', ['-f', 'raw', '-c', `write -P 0x5a 0 ${SIZE}`, srv.uri]);
    await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, srv.uri]);
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, srv.uri]);
    await stopCurrent();
    expect(sha256(readFileSync(image))).toBe(sha256File(src));
  });

  it('compare notices a one-byte difference (the check can fail)', async () => {
    const src = path.join(dir, 'src3.raw');
    sparseImage(src, SIZE, REGIONS);
    const { srv } = await freshExport();
    await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, srv.uri]);
    await run('qemu-io', ['-f', 'raw', '-c', `write -P 0x00 ${40 * MiB + 777} 1`, srv.uri]);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, srv.uri], { check: false });
    expect(cmp.code).toBe(1);
    // qemu-img reports the first differing 512-byte sector.
    expect(cmp.stdout).toMatch(new RegExp(`Content mismatch at offset ${40 * MiB + 512}!`));
  });
});
