/**
 * Reconnect with a real QEMU: the guest writes 24 MiB to a vhost-user-blk disk served by a
 * `vstore vhost-blk` process; in the middle of it the process is killed with SIGKILL and
 * started again. QEMU (`-chardev socket,...,reconnect=1`) reconnects and hands back the
 * inflight area; the guest sees no I/O error, and what it reads back — and what the image
 * holds — is what it wrote.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, openSync, readSync, closeSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { MiB, REPO_ROOT, requireCommands, runGuest, sha256, sparseImage, tempDir } from '../helpers/index.js';

const MEM_MIB = 512;
const MARK = 'VSTORE-START';

let dir: string;
beforeAll(() => {
  requireCommands('qemu-system-x86_64');
  dir = tempDir('vst-e2e-rc-');
});

const SCRIPT = String.raw`
dd if=/dev/urandom of=/tmp/src bs=1M count=24 2>/dev/null
result src "$(sha256sum /tmp/src | cut -d' ' -f1)"
printf '${MARK}' | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null
sleep 1
if dd if=/tmp/src of=/dev/vda bs=64k seek=16 oflag=direct 2>/tmp/dd.err; then result write ok; else result write FAILED; cat /tmp/dd.err; fi
sync
echo 3 > /proc/sys/vm/drop_caches
result back "$(dd if=/dev/vda bs=64k skip=16 count=384 2>/dev/null | sha256sum | cut -d' ' -f1)"
if dmesg | grep -qi 'I/O error'; then result ioerr yes; else result ioerr no; fi
result done 1
`;

interface Served {
  child: ChildProcess;
  log: () => string;
  exited: Promise<void>;
}

function serve(image: string, socket: string): Promise<Served> {
  const cli = path.join(REPO_ROOT, 'dist/lib/vhost/cli.js');
  if (!existsSync(cli)) throw new Error('vstore is not built (dist/lib/vhost/cli.js missing): run `npm run build`');
  const code = `import { vhostBlkCommand } from ${JSON.stringify(cli)}; await vhostBlkCommand().parseAsync(process.argv.slice(1), { from: "user" });`;
  const child = spawn(process.execPath, ['--input-type=module', '-e', code, image, '--socket', socket], { stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  child.stderr!.on('data', (b: Buffer) => (log += b));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  return (async () => {
    const deadline = Date.now() + 15_000;
    while (!log.includes('vhost-blk: serving')) {
      if (child.exitCode !== null || Date.now() > deadline) throw new Error(`vstore vhost-blk did not start:\n${log}`);
      await new Promise((r) => setTimeout(r, 20));
    }
    return { child, log: () => log, exited };
  })();
}

function readAt(image: string, offset: number, length: number): Buffer {
  const fd = openSync(image, 'r');
  try {
    const b = Buffer.alloc(length);
    readSync(fd, b, 0, length, offset);
    return b;
  } finally {
    closeSync(fd);
  }
}

const written = (image: string, offset: number): boolean => readAt(image, offset, 4096).some((x) => x !== 0);

describe('guest on a vhost-user-blk disk whose back end is killed and restarted (QEMU reconnect=1)', () => {
  it('the guest sees no error and no lost write', async () => {
    const image = path.join(dir, 'disk.raw');
    sparseImage(image, 64 * MiB);
    const socket = path.join(dir, 'vu.sock');
    const first = await serve(image, socket);
    let second: Served | undefined;
    const guest = runGuest({
      script: SCRIPT,
      memMiB: MEM_MIB,
      timeoutMs: 180_000,
      qemuArgs: [
        '-object', `memory-backend-memfd,id=mem,size=${MEM_MIB}M,share=on`,
        '-numa', 'node,memdev=mem',
        '-chardev', `socket,id=vb0,path=${socket},reconnect=1`,
        '-device', 'vhost-user-blk-pci,chardev=vb0',
      ],
    });
    try {
      // Kill as soon as the big write has reached the disk, and check it was not done yet.
      const deadline = Date.now() + 120_000;
      while (readAt(image, 0, MARK.length).toString() !== MARK || !written(image, MiB)) {
        if (Date.now() > deadline) throw new Error(`the guest never started writing:\n${first.log()}`);
        await new Promise((r) => setTimeout(r, 5));
      }
      first.child.kill('SIGKILL');
      await first.exited;
      expect(written(image, 25 * MiB - 4096), 'the write finished before the kill').toBe(false);
      await new Promise((r) => setTimeout(r, 300));
      second = await serve(image, socket);
      const g = await guest;
      if (g.exitCode !== 0) throw new Error(`guest failed (exit ${g.exitCode}):\n${g.serial.slice(-5000)}\n${g.qemu.stderr}`);
      expect(g.map.get('done')).toBe('1');
      expect(g.map.get('write'), g.serial.slice(-3000)).toBe('ok');
      expect(g.map.get('ioerr'), g.serial.slice(-3000)).toBe('no');
      expect(g.map.get('back')).toBe(g.map.get('src'));
      // The restarted back end served QEMU's new connection.
      expect(second.log()).toContain('front end connected');
      const img = readFileSync(image);
      expect(sha256(img.subarray(MiB, 25 * MiB))).toBe(g.map.get('src'));
    } finally {
      first.child.kill('SIGKILL');
      if (second) {
        second.child.kill('SIGTERM');
        await second.exited;
      }
      await guest.catch(() => undefined);
    }
    // Longer than the guest's own 180 s limit, so a slow run ends with the guest's console, not
    // a bare vitest timeout (one full run at load 10 hit 120 s).
  }, 240_000);
});
