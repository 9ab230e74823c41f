/**
 * A real guest on vstore's vhost-user-blk back end: QEMU (TCG) with shared memfd RAM attaches
 * the socket as vhost-user-blk-pci (two queues); the guest kernel's virtio-blk driver sees the
 * disk's size, serial, discard limits; it makes an ext2 filesystem, writes and checksums files,
 * discards, unmounts. On the host e2fsck finds the image clean and debugfs extracts files whose
 * checksums match the guest's; the guest's read of the whole raw disk equals the image file.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { FileVolume } from '../../lib/block/file.js';
import { silentLogger } from '../../lib/log.js';
import { VirtioBlkDevice } from '../../lib/vhost/blk.js';
import { VhostUserServer } from '../../lib/vhost/server.js';
import { MiB, requireCommands, run, runGuest, sha256, sha256File, sparseImage, tempDir, type GuestRunResult } from '../helpers/index.js';

const SIZE = 64 * MiB;
const MEM_MIB = 512;

let dir: string;
beforeAll(() => {
  requireCommands('qemu-system-x86_64', 'e2fsck', 'debugfs');
  dir = tempDir('vst-e2e-vu-');
});

function expectGuestOk(g: GuestRunResult): void {
  if (g.exitCode !== 0) {
    throw new Error(`guest script failed (exit ${g.exitCode}, qemu ${g.qemu.code}${g.qemu.timedOut ? ', timed out' : ''}):\n${g.serial.slice(-6000)}\n${g.qemu.stderr}`);
  }
}

const SCRIPT = String.raw`
result size "$(cat /sys/block/vda/size)"
result serial "$(cat /sys/block/vda/serial 2>/dev/null || echo none)"
result mq "$(ls /sys/block/vda/mq | wc -l)"
result discard_max "$(cat /sys/block/vda/queue/discard_max_bytes)"
/sbin/mke2fs -q -F -t ext2 -b 4096 -L vstore /dev/vda
mount -t ext2 /dev/vda /target
dd if=/dev/urandom of=/target/random1 bs=1M count=4 2>/dev/null
dd if=/dev/urandom of=/target/random2 bs=4096 count=777 2>/dev/null
mkdir -p /target/dir
i=0
while [ $i -lt 50 ]; do echo "line $i" >> /target/dir/text.txt; i=$((i+1)); done
sync
cd /target && sha256sum random1 random2 dir/text.txt > /target/SUMS && cd /
while read h f; do result sum "$f" "$h"; done < /target/SUMS
# Drop the page cache and read back through the device.
echo 3 > /proc/sys/vm/drop_caches
cd /target
if sha256sum -c SUMS >/tmp/check 2>&1; then result verify ok; else result verify FAILED; cat /tmp/check; fi
cd /
umount /target
sync
result disk "$(dd if=/dev/vda bs=1M 2>/dev/null | sha256sum | cut -d' ' -f1)"
result done 1
`;

describe('guest on a vstore vhost-user-blk disk (QEMU TCG, vhost-user-blk-pci)', () => {
  it('mkfs.ext2 + files in the guest; e2fsck clean and checksums match on the host', async () => {
    const image = path.join(dir, 'disk.raw');
    sparseImage(image, SIZE);
    const vol = await FileVolume.open(image);
    const device = new VirtioBlkDevice({ volume: vol, logger: silentLogger(), numQueues: 2, serial: 'vstore-e2e' });
    const socket = path.join(dir, 'vu.sock');
    const server = await VhostUserServer.listen({ path: socket, device, logger: silentLogger() });
    let g: GuestRunResult;
    try {
      g = await runGuest({
        script: SCRIPT,
        memMiB: MEM_MIB,
        qemuArgs: [
          '-object', `memory-backend-memfd,id=mem,size=${MEM_MIB}M,share=on`,
          '-numa', 'node,memdev=mem',
          // Two vCPUs: Linux's virtio-blk uses at most one queue per CPU.
          '-smp', '2',
          '-chardev', `socket,id=vb0,path=${socket}`,
          '-device', 'vhost-user-blk-pci,chardev=vb0,num-queues=2',
        ],
      });
      expectGuestOk(g);
      expect(server.connections).toBe(1);
    } finally {
      await server.close();
      await vol.close();
    }
    expect(g.map.get('done')).toBe('1');
    expect(g.map.get('size')).toBe(String(SIZE / 512));
    expect(g.map.get('serial')).toBe('vstore-e2e');
    expect(Number(g.map.get('mq'))).toBe(2);
    expect(Number(g.map.get('discard_max'))).toBeGreaterThan(0);
    expect(g.map.get('verify'), g.serial.slice(-3000)).toBe('ok');
    expect(device.stats.ioerr + device.stats.unsupp + device.stats.dropped).toBe(0);
    expect(device.stats.ok).toBeGreaterThan(100);

    const fsck = await run('e2fsck', ['-fn', image], { check: false });
    expect(fsck.code, fsck.stdout + fsck.stderr).toBe(0);
    const sums = g.results.filter((r) => r.key === 'sum').map((r) => r.value.split(' ') as [string, string]);
    expect(sums.map(([f]) => f).sort()).toEqual(['dir/text.txt', 'random1', 'random2']);
    for (const [file, hash] of sums) {
      const out = path.join(dir, `extract-${file.replace(/\//g, '_')}`);
      await run('debugfs', ['-R', `dump /${file} ${out}`, image]);
      expect(sha256File(out), file).toBe(hash);
    }
    expect(g.map.get('disk')).toBe(sha256(readFileSync(image)));
  });
});
