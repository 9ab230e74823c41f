/**
 * qemu-io against `vstore nbd`: aio writes/reads with patterns, write-zeroes (with and without
 * unmap), discard, unaligned I/O, reads past the end. Every test checks the bytes twice: through
 * NBD (qemu-io's -P pattern checks) and in the image file behind the export.
 */
import { readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { KiB, MiB, requireCommands, run, sparseImage, startNbdServer, tempDir, type NbdServer } from '../helpers/index.js';

const SIZE = 16 * MiB;
let dir: string;
let srv: NbdServer | undefined;
beforeAll(() => {
  requireCommands('qemu-io', 'qemu-img');
  dir = tempDir('vstore-qio-');
});
async function stopCurrent(): Promise<void> {
  const s = srv;
  srv = undefined;
  if (s) await s.stop();
}
afterEach(stopCurrent);

let n = 0;
async function freshExport(): Promise<{ image: string; srv: NbdServer }> {
  const image = path.join(dir, `export${n++}.raw`);
  sparseImage(image, SIZE);
  srv = await startNbdServer({ image });
  return { image, srv };
}

/** Runs qemu-io commands in one session; qemu-io exits non-zero when any command fails. */
async function qio(s: NbdServer, cmds: string[], check = true) {
  const r = await run('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), s.uri], { check });
  if (check) expect(r.stdout).not.toMatch(/Pattern verification failed|failed:/);
  return r;
}

/** qemu-img map of the export: [{start, length, zero, data}]. */
async function map(s: NbdServer): Promise<Array<{ start: number; length: number; zero: boolean; data: boolean }>> {
  return JSON.parse((await run('qemu-img', ['map', '--output=json', '-f', 'raw', s.uri])).stdout);
}

describe('qemu-io with vstore nbd', () => {
  it('aio writes with patterns, aio_flush, reads verify; the file holds the bytes', async () => {
    const { image, srv } = await freshExport();
    await qio(srv, [
      'aio_write -P 0xab 0 64k',
      'aio_write -P 0xcd 64k 64k',
      'aio_write -P 0xef 1M 1M',
      'aio_write -P 0x12 15M 1M',
      'aio_flush',
      'read -P 0xab 0 64k',
      'read -P 0xcd 64k 64k',
      'read -P 0xef 1M 1M',
      'read -P 0x12 15M 1M',
      'read -P 0 128k 896k',
      'aio_read -P 0xef 1M 512k',
      'aio_flush',
    ]);
    const f = readFileSync(image);
    expect(f.subarray(0, 64 * KiB).every((b) => b === 0xab)).toBe(true);
    expect(f.subarray(64 * KiB, 128 * KiB).every((b) => b === 0xcd)).toBe(true);
    expect(f.subarray(128 * KiB, MiB).every((b) => b === 0)).toBe(true);
    expect(f.subarray(MiB, 2 * MiB).every((b) => b === 0xef)).toBe(true);
    expect(f.subarray(15 * MiB, 16 * MiB).every((b) => b === 0x12)).toBe(true);
  });

  it('a wrong pattern is reported (the check can fail)', async () => {
    const { srv } = await freshExport();
    const r = await qio(srv, ['write -P 0xab 0 4k', 'read -P 0xac 0 4k'], false);
    expect(r.code).not.toBe(0);
    expect(r.stdout).toMatch(/Pattern verification failed/);
  });

  it('write -z zeroes data in place; write -z -u may unmap; both read back zeroes', async () => {
    const { image, srv } = await freshExport();
    await qio(srv, [
      'write -P 0x77 0 4M',
      'write -z 64k 64k',
      'write -z -u 1M 1M',
      'write -z 3M 5000', // unaligned zero
      'flush',
      'read -P 0x77 0 64k',
      'read -P 0 64k 64k',
      'read -P 0x77 128k 896k',
      'read -P 0 1M 1M',
      'read -P 0x77 2M 1M',
      'read -P 0 3M 5000',
      `read -P 0x77 ${3 * MiB + 5000} ${MiB - 5000}`,
    ]);
    const f = readFileSync(image);
    expect(f.subarray(64 * KiB, 128 * KiB).every((b) => b === 0)).toBe(true);
    expect(f.subarray(MiB, 2 * MiB).every((b) => b === 0)).toBe(true);
    expect(f.subarray(3 * MiB, 3 * MiB + 5000).every((b) => b === 0)).toBe(true);
    expect(f[3 * MiB + 5000]).toBe(0x77);
    // Block status agrees: the unmapped range reads as zero.
    const m = await map(srv);
    const at = (off: number) => m.find((e) => e.start <= off && off < e.start + e.length)!;
    expect(at(MiB).zero).toBe(true);
    expect(at(2 * MiB).data).toBe(true);
    expect(at(2 * MiB).zero).toBe(false);
  });

  it('discard deallocates: zeroes read back, the file loses its blocks, map shows a hole', async () => {
    const { image, srv } = await freshExport();
    await qio(srv, ['write -P 0x99 0 8M', 'flush']);
    const before = statSync(image).blocks;
    await qio(srv, ['discard 1M 4M', 'flush', 'read -P 0x99 0 1M', 'read -P 0x99 5M 3M']);
    const after = statSync(image).blocks;
    // 4 MiB = 8192 512-byte blocks punched out of the file.
    expect(before - after).toBeGreaterThanOrEqual(8192);
    // A raw file volume reads zeroes after discard (the spec leaves it unspecified; vstore punches).
    await qio(srv, ['read -P 0 1M 4M']);
    const m = await map(srv);
    const at = (off: number) => m.find((e) => e.start <= off && off < e.start + e.length)!;
    expect(at(2 * MiB)).toMatchObject({ zero: true, data: false });
    expect(at(6 * MiB)).toMatchObject({ zero: false, data: true });
  });

  it('unaligned I/O: offsets and lengths not multiples of 512', async () => {
    const { image, srv } = await freshExport();
    await qio(srv, [
      'write -P 0x11 1000 3000',
      'write -P 0x22 4097 1',
      'aio_write -P 0x33 65535 70001',
      'aio_flush',
      'write -P 0x44 16777215 1', // the very last byte
      'read -P 0 0 1000',
      'read -P 0x11 1000 3000',
      'read -P 0 4000 97',
      'read -P 0x22 4097 1',
      'read -P 0 4098 61437',
      'read -P 0x33 65535 70001',
      'read -P 0 135536 1',
      'read -P 0x44 16777215 1',
      'read -v 4095 3', // odd read across the 4k boundary
    ]);
    const expected = Buffer.alloc(SIZE);
    expected.fill(0x11, 1000, 4000);
    expected[4097] = 0x22;
    expected.fill(0x33, 65535, 65535 + 70001);
    expected[SIZE - 1] = 0x44;
    await stopCurrent();
    expect(readFileSync(image).equals(expected)).toBe(true);
  });

  it('reads and writes past the end fail', async () => {
    const { srv } = await freshExport();
    for (const cmd of [`read 0 ${SIZE + 512}`, `read ${SIZE} 512`, `read ${SIZE - 512} 1024`, `write -P 1 ${SIZE - 1} 2`]) {
      const r = await qio(srv, [cmd], false);
      expect(r.code, cmd).not.toBe(0);
      expect(r.stdout + r.stderr, cmd).toMatch(/failed|error/i);
    }
    // The export still works afterwards.
    await qio(srv, [`write -P 0x5 ${SIZE - 512} 512`, `read -P 0x5 ${SIZE - 512} 512`]);
  });
});
