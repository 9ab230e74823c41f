/**
 * fio's nbd engine (libnbd) against `vstore nbd`: several jobs (one connection each) at QD 16
 * doing random writes, then reading everything back with crc32c verification. Zero errors.
 */
import path from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { MiB, requireCommands, run, sparseImage, startNbdServer, tempDir, type NbdServer } from '../helpers/index.js';

const SIZE = 256 * MiB;
let dir: string;
let srv: NbdServer | undefined;
beforeAll(() => {
  requireCommands('fio', 'qemu-io');
  dir = tempDir('vstore-fio-');
});
async function stopCurrent(): Promise<void> {
  const s = srv;
  srv = undefined;
  if (s) await s.stop();
}
afterEach(stopCurrent);

let n = 0;
async function freshExport(): Promise<NbdServer> {
  const image = path.join(dir, `export${n++}.raw`);
  sparseImage(image, SIZE);
  srv = await startNbdServer({ image });
  return srv;
}

interface FioJob {
  jobname: string;
  error: number;
  read: { total_ios: number; io_bytes: number; iops: number };
  write: { total_ios: number; io_bytes: number; iops: number };
}

/** Runs fio with JSON output; returns the exit code, the parsed jobs and the raw text. */
async function fio(args: string[], check = true) {
  const r = await run('fio', ['--output-format=json', ...args], { timeoutMs: 120_000, check });
  // The nbd engine prints "fio: connected to NBD server" lines before the JSON document.
  const start = r.stdout.indexOf('{\n');
  let jobs: FioJob[] = [];
  if (start >= 0) {
    try {
      jobs = JSON.parse(r.stdout.slice(start)).jobs;
    } catch {
      jobs = [];
    }
  }
  return { code: r.code, jobs, text: r.stdout + r.stderr };
}

describe('fio nbd engine with vstore nbd', () => {
  it('4 jobs x QD16 4k randwrite + crc32c verify, zero errors', async () => {
    const s = await freshExport();
    const { code, jobs, text } = await fio([
      '--name=randwrite-verify', '--ioengine=nbd', `--uri=${s.uri}`,
      '--rw=randwrite', '--bs=4k', '--iodepth=16', '--numjobs=4',
      '--size=32M', '--offset_increment=32M',
      '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_dump=0',
    ]);
    expect(code, text).toBe(0);
    expect(jobs).toHaveLength(4);
    for (const j of jobs) {
      expect(j.error, text).toBe(0);
      expect(j.write.total_ios).toBe((32 * MiB) / 4096);
      // Every block written was read back and verified.
      expect(j.read.io_bytes).toBe(32 * MiB);
    }
  });

  it('2 jobs, QD16, unaligned mixed sizes (512 B .. 128 KiB) randwrite + verify', async () => {
    const s = await freshExport();
    const { code, jobs, text } = await fio([
      '--name=mixed-verify', '--ioengine=nbd', `--uri=${s.uri}`,
      '--rw=randwrite', '--bsrange=512-128k', '--bs_unaligned', '--iodepth=16', '--numjobs=2',
      '--size=48M', '--offset_increment=64M',
      '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_dump=0',
    ]);
    expect(code, text).toBe(0);
    for (const j of jobs) {
      expect(j.error, text).toBe(0);
      // Variable block sizes cannot tile the region exactly: most of it is written...
      expect(j.write.io_bytes).toBeGreaterThan(40 * MiB);
      // ...and every byte written is read back and verified.
      expect(j.read.io_bytes).toBe(j.write.io_bytes);
    }
  });

  it('time-based random read/write mix with verify backlog, 4 jobs, 3 s', async () => {
    const s = await freshExport();
    const { code, jobs, text } = await fio([
      '--name=rw-backlog', '--ioengine=nbd', `--uri=${s.uri}`,
      '--rw=randwrite', '--bs=8k', '--iodepth=16', '--numjobs=4',
      '--size=16M', '--offset_increment=16M', '--time_based', '--runtime=3',
      '--verify=crc32c', '--verify_backlog=256', '--verify_fatal=1', '--verify_dump=0',
    ]);
    expect(code, text).toBe(0);
    for (const j of jobs) {
      expect(j.error, text).toBe(0);
      expect(j.write.total_ios).toBeGreaterThan(0);
      expect(j.read.total_ios).toBeGreaterThan(0);
    }
  });

  it('verification catches a corrupted block (the check can fail)', async () => {
    const s = await freshExport();
    const common = ['--name=corrupt', '--ioengine=nbd', `--uri=${s.uri}`, '--rw=write', '--bs=64k', '--iodepth=4', '--size=8M', '--verify=crc32c', '--verify_dump=0'];
    const w = await fio([...common, '--do_verify=0']);
    expect(w.code, w.text).toBe(0);
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x42 1M 4k', s.uri]);
    const v = await fio([...common, '--verify_only'], false);
    expect(v.code).not.toBe(0);
    expect(v.text).toMatch(/verify|crc32c/i);
  });
});
