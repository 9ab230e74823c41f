// The addon's sparse-file primitives against a real file on the host filesystem.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { native } from '../../../lib/native/index.js';

describe('native file primitives', () => {
  let dir: string;
  let fd: number;
  const MiB = 1 << 20;

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vstore-native-'));
    fd = fs.openSync(path.join(dir, 'img'), 'w+');
    fs.ftruncateSync(fd, 4 * MiB);
  });
  afterEach(() => {
    fs.closeSync(fd);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('finds data and holes with SEEK_DATA / SEEK_HOLE', () => {
    const n = native();
    expect(n.seekData(fd, 0)).toBe(-1); // all hole
    fs.writeSync(fd, Buffer.alloc(64 * 1024, 0xab), 0, 64 * 1024, MiB);
    expect(n.seekData(fd, 0)).toBe(MiB);
    expect(n.seekHole(fd, MiB)).toBe(MiB + 64 * 1024);
    expect(n.seekData(fd, MiB + 64 * 1024)).toBe(-1);
    expect(n.seekHole(fd, 3 * MiB)).toBe(3 * MiB);
  });

  it('punches holes that read back as zeroes and keep the size', async () => {
    const n = native();
    fs.writeSync(fd, Buffer.alloc(MiB, 0x5a), 0, MiB, 0);
    await n.punchHole(fd, 256 * 1024, 512 * 1024);
    const back = Buffer.alloc(MiB);
    fs.readSync(fd, back, 0, MiB, 0);
    expect(back.subarray(0, 256 * 1024).every((b) => b === 0x5a)).toBe(true);
    expect(back.subarray(256 * 1024, 768 * 1024).every((b) => b === 0)).toBe(true);
    expect(back.subarray(768 * 1024).every((b) => b === 0x5a)).toBe(true);
    expect(n.seekHole(fd, 0)).toBe(256 * 1024);
    expect(fs.fstatSync(fd).size).toBe(4 * MiB);
  });

  it('zeroes ranges without changing the size', async () => {
    const n = native();
    fs.writeSync(fd, Buffer.alloc(8192, 0x11), 0, 8192, 0);
    await n.zeroRange(fd, 4096, 4096);
    const back = Buffer.alloc(8192);
    fs.readSync(fd, back, 0, 8192, 0);
    expect(back.subarray(0, 4096).every((b) => b === 0x11)).toBe(true);
    expect(back.subarray(4096).every((b) => b === 0)).toBe(true);
  });

  it('reads cached data without blocking, and reports errors as system errors', async () => {
    const n = native();
    const data = Buffer.alloc(4096, 0x77);
    fs.writeSync(fd, data, 0, 4096, 8192);
    const out = Buffer.alloc(4096);
    const r = n.readNowait(fd, out, 8192);
    // Just written, so in the page cache: served without the thread pool.
    expect(r).toBe(4096);
    expect(out.equals(data)).toBe(true);
    // A view into a larger buffer lands at the view's offset.
    const big = Buffer.alloc(8192, 1);
    expect(n.readNowait(fd, big.subarray(4096), 8192)).toBe(4096);
    expect(big.subarray(0, 4096).every((b) => b === 1)).toBe(true);
    expect(big.subarray(4096).equals(data)).toBe(true);

    expect(() => n.seekData(fd, -1)).toThrow(/non-negative/);
    await expect(n.punchHole(987654, 0, 4096)).rejects.toMatchObject({ code: 'EBADF' });
  });

  it('refuses BLKGETSIZE64 on a regular file with a clear code', () => {
    expect(() => native().blockDeviceSize(fd)).toThrow(/ioctl\(BLKGETSIZE64\)/);
  });
});
