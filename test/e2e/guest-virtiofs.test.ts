/**
 * A real guest mounts vstore shares over virtiofs (QEMU TCG, vhost-user-fs-pci, shared memfd RAM):
 *  - `proj`: a directory on a storage node found through the resolver by its path
 *    (`/projects/alpha`, created on the node when new), read-write;
 *  - `ro`: a directory of this host, read-only.
 * The guest writes, reads, renames, links, sets xattrs, takes locks and removes files; the host
 * then looks at the node's directory and finds exactly what the guest did. Then the same busybox
 * script runs on a vstore share and on a share of Debian's virtiofsd over an equal directory, and
 * both print the same output.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, lstatSync, mkdirSync, readFileSync, readlinkSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { startDaemonWith, startResolverService, startStorageNode, spawnProc } from '../helpers/cluster.js';
import { runGuest, virtiofsArgs, type GuestRunResult } from '../helpers/guest.js';
import { requireCommands } from '../helpers/run.js';
import { tempDir } from '../helpers/tmp.js';

const MEM_MIB = 512;
const VIRTIOFSD = '/usr/lib/qemu/virtiofsd';

beforeAll(() => requireCommands('qemu-system-x86_64', 'getfattr', VIRTIOFSD));

const WORK_SCRIPT = String.raw`
mkdir -p /mnt/proj /mnt/ro
mount -t virtiofs proj /mnt/proj && result mounted proj
mount -t virtiofs ro /mnt/ro && result mounted ro  # not -o ro: the daemon itself must refuse changes
cd /mnt/proj
echo hello > a.txt
dd if=/dev/urandom of=big bs=64k count=40 2>/dev/null
result bigsum "$(sha256sum big | cut -d' ' -f1)"
mv a.txt b.txt
ln b.txt hard.txt
ln -s b.txt soft
mkdir -p d/e && echo deep > d/e/f
echo old > victim && echo new > winner && mv winner victim
/usr/bin/setfattr -n user.color -v blue b.txt && result xattr "$(/usr/bin/getfattr --only-values -n user.color b.txt)"
result nlink "$(stat -c %h b.txt)"
result link "$(readlink soft)"
result cat "$(cat soft)"
# flock between two processes of the guest: the second cannot take it while the first holds it
/usr/bin/flock -n lk -c '/usr/bin/flock -n lk true && echo "@@RESULT flock2 got" || echo "@@RESULT flock2 busy"'
/usr/bin/flock -n lk true && result flock3 got
# unlink of an open file: still readable through the descriptor
echo keep > open.txt
exec 3< open.txt
rm open.txt
result unlinked "$(cat <&3)"
exec 3<&-
rmdir d 2>/dev/null && result rmdir-nonempty allowed || result rmdir-nonempty refused
touch gone && rm gone
result listing "$(ls | tr '\n' ' ')"
# the read-only share: reads work, every change is refused
result rofile "$(cat /mnt/ro/hello.txt)"
touch /mnt/ro/new 2>/dev/null && result ro-write allowed || result ro-write refused
rm -f /mnt/ro/hello.txt 2>/dev/null && result ro-rm allowed || result ro-rm refused
cd /
sync
umount /mnt/proj && umount /mnt/ro && result umount ok
result done 1
`;

describe('guest with virtiofs shares served by the vstore daemon (QEMU TCG, vhost-user-fs-pci)', () => {
  it('a share on a storage node (by path) and a read-only local share: what the guest does lands on the node', async () => {
    const dir = tempDir('vst-e2e-fs-');
    const resolver = await startResolverService(path.join(dir, 'resolver'));
    const node = await startStorageNode({ id: 'n1', data: path.join(dir, 'n1'), resolver: resolver.url });
    const roDir = path.join(dir, 'ro-src');
    mkdirSync(roDir);
    writeFileSync(path.join(roDir, 'hello.txt'), 'from the host\n');
    const daemon = await startDaemonWith(path.join(dir, 'host'), {
      resolver: { url: resolver.url },
      vms: [
        {
          name: 'vm1',
          shares: [
            { tag: 'proj', path: '/projects/alpha', target: '/mnt/proj' },
            { tag: 'ro', dir: roDir, target: '/mnt/ro', readOnly: true },
          ],
        },
      ],
    });
    let g: GuestRunResult;
    try {
      const sockets = [
        { socket: path.join(daemon.runDir, 'vm1-proj.fs.sock'), tag: 'proj' },
        { socket: path.join(daemon.runDir, 'vm1-ro.fs.sock'), tag: 'ro' },
      ];
      const st = await daemon.get<{ vms: Array<{ shares: Array<{ tag: string; source: string; mount: string }> }> }>('/v1/status');
      expect(st.vms[0]!.shares.map((s) => s.tag)).toEqual(['proj', 'ro']);
      expect(st.vms[0]!.shares[0]!.source).toBe('path /projects/alpha on n1');
      expect(st.vms[0]!.shares[1]!.mount).toBe('mkdir -p /mnt/ro && mount -t virtiofs ro -o ro /mnt/ro');
      // `vstore serve` prints each share's mount command and the VM's QEMU arguments at startup
      expect(daemon.log()).toContain('vstore: vm1 share proj: path /projects/alpha on n1 on ');
      expect(daemon.log()).toContain('in the guest: mkdir -p /mnt/proj && mount -t virtiofs proj /mnt/proj');
      expect(daemon.log()).toMatch(/vstore: vm1 QEMU arguments for its shares: -object memory-backend-memfd,id=mem,size=<RAM size>,share=on -numa node,memdev=mem -chardev socket,id=vstore-fs0,path=\S+vm1-proj\.fs\.sock -device vhost-user-fs-pci,chardev=vstore-fs0,tag=proj/);
      g = await runGuest({ script: WORK_SCRIPT, memMiB: MEM_MIB, qemuArgs: virtiofsArgs(MEM_MIB, sockets), timeoutMs: 90_000 });
      if (g.exitCode !== 0) throw new Error(`guest failed (exit ${g.exitCode}):\n${g.serial.slice(-5000)}`);
      const r = g.map;
      expect(r.get('done'), g.serial.slice(-3000)).toBe('1');
      expect(r.get('mounted')).toBe('ro');
      expect(r.get('xattr')).toBe('blue');
      expect(r.get('nlink')).toBe('2');
      expect(r.get('link')).toBe('b.txt');
      expect(r.get('cat')).toBe('hello');
      expect(r.get('flock2')).toBe('busy');
      expect(r.get('flock3')).toBe('got');
      expect(r.get('unlinked')).toBe('keep');
      expect(r.get('rmdir-nonempty')).toBe('refused');
      expect(r.get('listing')?.trim().split(' ').sort()).toEqual(['b.txt', 'big', 'd', 'hard.txt', 'lk', 'soft', 'victim']);
      expect(r.get('rofile')).toBe('from the host');
      expect(r.get('ro-write')).toBe('refused');
      expect(r.get('ro-rm')).toBe('refused');
      expect(r.get('umount')).toBe('ok');
      const metrics = await daemon.text('/metrics');
      const served = Number(/^vstore_share_requests_total\{vm="vm1",share="proj"\} (\d+)$/m.exec(metrics)?.[1] ?? 0);
      expect(served, metrics).toBeGreaterThan(50);
      expect(metrics).toMatch(/^vstore_share_sessions_total\{vm="vm1",share="ro"\} 1$/m);
    } finally {
      await daemon.stop();
      await node.stop();
      await resolver.stop();
    }
    // What the node holds, looked at directly on the host.
    const share = path.join(node.data, 'dirs', 'projects', 'alpha');
    expect(existsSync(share), `no ${share}`).toBe(true);
    expect(readFileSync(path.join(share, 'b.txt'), 'utf8')).toBe('hello\n');
    expect(statSync(path.join(share, 'b.txt')).ino).toBe(statSync(path.join(share, 'hard.txt')).ino);
    expect(lstatSync(path.join(share, 'soft')).isSymbolicLink()).toBe(true);
    expect(readlinkSync(path.join(share, 'soft'))).toBe('b.txt');
    expect(readFileSync(path.join(share, 'd/e/f'), 'utf8')).toBe('deep\n');
    expect(readFileSync(path.join(share, 'victim'), 'utf8')).toBe('new\n');
    expect(existsSync(path.join(share, 'a.txt'))).toBe(false);
    expect(existsSync(path.join(share, 'open.txt'))).toBe(false);
    const bigSum = execFileSync('sha256sum', [path.join(share, 'big')], { encoding: 'utf8' }).split(' ')[0];
    if (/^[0-9a-f]{64}$/.test(g.map.get('bigsum') ?? '')) expect(bigSum).toBe(g.map.get('bigsum'));
    expect(statSync(path.join(share, 'big')).size).toBe(40 * 65536);
    expect(execFileSync('getfattr', ['--only-values', '-n', 'user.color', path.join(share, 'b.txt')], { encoding: 'utf8' })).toBe('blue');
    expect(existsSync(path.join(roDir, 'new'))).toBe(false);
    expect(readFileSync(path.join(roDir, 'hello.txt'), 'utf8')).toBe('from the host\n');
  }, 180_000);

  it('the same busybox script prints the same on a vstore share and on a virtiofsd share of an equal directory', async () => {
    const dir = tempDir('vst-e2e-fscmp-');
    // Deterministic content and a script whose output depends only on file-system semantics.
    const seed = (root: string): void => {
      mkdirSync(path.join(root, 'sub/deeper'), { recursive: true });
      writeFileSync(path.join(root, 'one.txt'), 'one\n');
      writeFileSync(path.join(root, 'sub/two.txt'), 'two\n'.repeat(1000));
      writeFileSync(path.join(root, 'sub/deeper/three.bin'), Buffer.alloc(70_000, 7));
    };
    const script = String.raw`
mkdir -p /mnt/s && mount -t virtiofs s /mnt/s && cd /mnt/s
echo "@@RESULT ls1 $(find . | sort | tr '\n' ' ')"
echo "@@RESULT sum1 $(cat one.txt sub/two.txt sub/deeper/three.bin | sha256sum | cut -d' ' -f1)"
mkdir made && echo x > made/x && ln made/x made/y && ln -s ../one.txt made/z
mv sub/two.txt sub/renamed.txt
truncate -s 100000 sub/deeper/three.bin
dd if=/dev/zero of=sparse bs=1 count=1 seek=1048575 2>/dev/null
echo tail >> one.txt
chmod 600 one.txt
rm -f sub/deeper/nothing 2>/dev/null; mkdir made 2>/dev/null || echo "@@RESULT mkdir-exists refused"
rmdir sub 2>/dev/null || echo "@@RESULT rmdir-nonempty refused"
cat made/nothing 2>/dev/null || echo "@@RESULT cat-missing refused"
echo "@@RESULT ls2 $(find . | sort | tr '\n' ' ')"
echo "@@RESULT stat $(stat -c '%n:%s:%h:%a:%F' one.txt made/x made/y made/z sparse sub/deeper/three.bin | tr '\n' ' ')"
echo "@@RESULT cat $(cat made/z one.txt | tr '\n' ' ')"
echo "@@RESULT sum2 $(cat sub/renamed.txt sub/deeper/three.bin sparse | sha256sum | cut -d' ' -f1)"
rm -r made && rm sparse
echo "@@RESULT ls3 $(find . | sort | tr '\n' ' ')"
cd / && umount /mnt/s && echo "@@RESULT done 1"
`;
    const outputs: Record<string, Array<{ key: string; value: string }>> = {};
    // vstore: a local-directory share in the daemon
    const a = path.join(dir, 'a');
    mkdirSync(a);
    seed(a);
    const daemon = await startDaemonWith(path.join(dir, 'host'), { vms: [{ name: 'vm1', shares: [{ tag: 's', dir: a, target: '/mnt/s' }] }] });
    try {
      const g = await runGuest({ script, memMiB: MEM_MIB, qemuArgs: virtiofsArgs(MEM_MIB, [{ socket: path.join(daemon.runDir, 'vm1-s.fs.sock'), tag: 's' }]) });
      expect(g.map.get('done'), g.serial.slice(-3000)).toBe('1');
      outputs.vstore = g.results;
    } finally {
      await daemon.stop();
    }
    // virtiofsd over an equal directory
    const b = path.join(dir, 'b');
    mkdirSync(b);
    seed(b);
    const sock = path.join(dir, 'virtiofsd.sock');
    const vfsd = await spawnProc(VIRTIOFSD, [`--socket-path=${sock}`, '-o', `source=${b}`, '-o', 'cache=auto', '-o', 'sandbox=chroot', '-f'], () => existsSync(sock));
    try {
      const g = await runGuest({ script, memMiB: MEM_MIB, qemuArgs: virtiofsArgs(MEM_MIB, [{ socket: sock, tag: 's' }]) });
      expect(g.map.get('done'), g.serial.slice(-3000)).toBe('1');
      outputs.virtiofsd = g.results;
    } finally {
      await vfsd.kill().catch(() => {});
    }
    expect(outputs.vstore!.length).toBeGreaterThan(8);
    expect(outputs.vstore).toEqual(outputs.virtiofsd);
  });
});
