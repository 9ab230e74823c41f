/**
 * nbdcopy (libnbd) both ways through `vstore nbd`: file -> export -> file, checksums equal,
 * with the default settings and with many requests in flight over several connections.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  KiB, MiB, requireCommands, run, sha256, sha256File, sparseImage, startNbdServer, tempDir, type DataRegion, type NbdServer,
} from '../helpers/index.js';

const SIZE = 96 * MiB;
const REGIONS: DataRegion[] = [
  { offset: 0, length: 7 * MiB + 3 * KiB, seed: 11 },
  { offset: 20 * MiB, length: 25 * MiB, seed: 12 },
  { offset: 60 * MiB + 512, length: 1 * MiB, seed: 13 },
  { offset: SIZE - 5 * MiB, length: 5 * MiB, seed: 14 },
];

let dir: string;
let srv: NbdServer | undefined;
beforeAll(() => {
  requireCommands('nbdcopy');
  dir = tempDir('vstore-ncopy-');
});
async function stopCurrent(): Promise<void> {
  const s = srv;
  srv = undefined;
  if (s) await s.stop();
}
afterEach(stopCurrent);

let n = 0;
async function roundTrip(copyArgs: string[]) {
  const src = path.join(dir, `src${n}.raw`);
  sparseImage(src, SIZE, REGIONS);
  const image = path.join(dir, `export${n}.raw`);
  // The export starts dirty, so zeroes of the source's holes must really be written.
  sparseImage(image, SIZE, [{ offset: 0, length: SIZE, seed: 99 }]);
  const out = path.join(dir, `out${n++}.raw`);
  srv = await startNbdServer({ image });
  await run('nbdcopy', [...copyArgs, '--flush', src, srv.uri], { timeoutMs: 90_000 });
  await run('nbdcopy', [...copyArgs, srv.uri, out], { timeoutMs: 90_000 });
  const want = sha256File(src);
  expect(sha256File(out)).toBe(want);
  await stopCurrent();
  expect(sha256(readFileSync(image))).toBe(want);
}

describe('nbdcopy with vstore nbd', () => {
  it('file -> export -> file, default settings', async () => {
    await roundTrip([]);
  });

  it('file -> export -> file, 4 connections x 64 requests of 256 KiB', async () => {
    await roundTrip(['--connections=4', '--requests=64', '--request-size=262144']);
  });

  it('file -> export -> file, single connection, 256 small requests (16 KiB), no sparse detection', async () => {
    await roundTrip(['--connections=1', '--requests=256', '--request-size=16384', '--no-extents']);
  });

  it('export -> export copy between two servers', async () => {
    const src = path.join(dir, 'src-a.raw');
    sparseImage(src, 32 * MiB, REGIONS.slice(0, 1));
    const dst = path.join(dir, 'dst-b.raw');
    sparseImage(dst, 32 * MiB);
    const a = await startNbdServer({ image: src, readOnly: true });
    const b = await startNbdServer({ image: dst });
    try {
      await run('nbdcopy', ['--flush', a.uri, b.uri], { timeoutMs: 60_000 });
    } finally {
      await a.stop();
      await b.stop();
    }
    expect(sha256File(dst)).toBe(sha256File(src));
  });
});
