/**
 * A real guest on a `vstore nbd` disk: QEMU (TCG) attaches the export as a virtio-blk drive,
 * the guest kernel makes an ext2 filesystem on /dev/vda, writes files and checksums them,
 * unmounts and powers off. On the host, e2fsck finds the filesystem clean and debugfs extracts
 * files whose checksums match what the guest computed. A second boot mounts and verifies,
 * and reads the whole raw disk, which must match the image file byte for byte.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  MiB, requireCommands, run, runGuest, sha256, sha256File, sparseImage, startNbdServer, tempDir, type GuestRunResult, type NbdServer,
} from '../helpers/index.js';

const SIZE = 64 * MiB;
let dir: string;
let srv: NbdServer | undefined;
beforeAll(() => {
  requireCommands('qemu-system-x86_64', 'e2fsck', 'debugfs');
  dir = tempDir('vstore-e2e-');
});
async function stopCurrent(): Promise<void> {
  const s = srv;
  srv = undefined;
  if (s) await s.stop();
}
afterEach(stopCurrent);

function drive(s: NbdServer): string[] {
  return ['-drive', `file=${s.qemuFilename},format=raw,if=virtio,cache=none`];
}

function expectGuestOk(g: GuestRunResult): void {
  if (g.exitCode !== 0) {
    throw new Error(`guest script failed (exit ${g.exitCode}, qemu ${g.qemu.code}${g.qemu.timedOut ? ', timed out' : ''}):\n${g.serial.slice(-6000)}\n${g.qemu.stderr}`);
  }
}

const WRITE_SCRIPT = String.raw`
/sbin/mke2fs -q -F -t ext2 -b 4096 -L vstore /dev/vda
mount -t ext2 /dev/vda /target
dd if=/dev/urandom of=/target/random1 bs=1M count=4 2>/dev/null
dd if=/dev/urandom of=/target/random2 bs=4096 count=777 2>/dev/null
mkdir -p /target/dir/sub
i=0
while [ $i -lt 50 ]; do echo "line $i of a small file" >> /target/dir/sub/text.txt; i=$((i+1)); done
# A patterned file: 3 MiB of 0xa5 written in odd-sized pieces.
dd if=/dev/zero bs=65536 count=48 2>/dev/null | tr '\000' '\245' > /target/pattern
sync
cd /target && sha256sum random1 random2 dir/sub/text.txt pattern > /target/SUMS && cd /
while read h f; do result sum "$f" "$h"; done < /target/SUMS
result df "$(df -k /target | tail -1)"
umount /target
sync
result done 1
`;

const VERIFY_SCRIPT = String.raw`
mount -t ext2 /dev/vda /target
cd /target
if sha256sum -c SUMS >/tmp/check 2>&1; then result verify ok; else result verify FAILED; cat /tmp/check; fi
cd /
dd if=/dev/urandom of=/target/second-boot bs=1M count=2 2>/dev/null
result second "$(sha256sum /target/second-boot | cut -d' ' -f1)"
umount /target
sync
result disk "$(dd if=/dev/vda bs=1M 2>/dev/null | sha256sum | cut -d' ' -f1)"
`;

describe('guest on a vstore nbd disk (QEMU TCG, virtio-blk)', () => {
  it('mkfs.ext2 + files in the guest; e2fsck clean and checksums match on the host; second boot verifies', async () => {
    const image = path.join(dir, 'disk.raw');
    sparseImage(image, SIZE);

    // Boot 1: make the filesystem and write files.
    srv = await startNbdServer({ image });
    const g1 = await runGuest({ script: WRITE_SCRIPT, qemuArgs: drive(srv) });
    expectGuestOk(g1);
    await stopCurrent();
    expect(g1.map.get('done')).toBe('1');
    const sums = new Map(g1.results.filter((r) => r.key === 'sum').map((r) => {
      const [file, hash] = r.value.split(' ');
      return [file!, hash!] as const;
    }));
    expect([...sums.keys()].sort()).toEqual(['dir/sub/text.txt', 'pattern', 'random1', 'random2']);

    // On the host: the filesystem is clean...
    const fsck = await run('e2fsck', ['-fn', image], { check: false });
    expect(fsck.code, fsck.stdout + fsck.stderr).toBe(0);
    // ...and every file extracted with debugfs has the guest's checksum.
    for (const [file, hash] of sums) {
      const out = path.join(dir, `extract-${file.replace(/\//g, '_')}`);
      await run('debugfs', ['-R', `dump /${file} ${out}`, image]);
      expect(sha256File(out), file).toBe(hash);
    }
    const pattern = readFileSync(path.join(dir, 'extract-pattern'));
    expect(pattern.length).toBe(3 * MiB);
    expect(pattern.every((b) => b === 0xa5)).toBe(true);
    const text = readFileSync(path.join(dir, 'extract-dir_sub_text.txt'), 'utf8');
    expect(text.split('\n')[49]).toBe('line 49 of a small file');

    // Boot 2: mount, verify, write more, read the raw disk.
    srv = await startNbdServer({ image });
    const g2 = await runGuest({ script: VERIFY_SCRIPT, qemuArgs: drive(srv) });
    expectGuestOk(g2);
    await stopCurrent();
    expect(g2.map.get('verify'), g2.serial.slice(-3000)).toBe('ok');
    const fsck2 = await run('e2fsck', ['-fn', image], { check: false });
    expect(fsck2.code, fsck2.stdout + fsck2.stderr).toBe(0);
    const second = path.join(dir, 'extract-second');
    await run('debugfs', ['-R', `dump /second-boot ${second}`, image]);
    expect(sha256File(second)).toBe(g2.map.get('second'));
    // The guest's view of the whole raw disk equals the image file.
    expect(g2.map.get('disk')).toBe(sha256(readFileSync(image)));
  });
});
