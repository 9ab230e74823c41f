/**
 * Boots the test guest (scripts/build-guest.sh) under QEMU/TCG with a per-test shell script and
 * returns what it printed. The script becomes /test.sh via a second cpio archive appended to the
 * base initramfs; it runs under `sh -e` after the virtio/ext4 modules are loaded, and reports
 * with lines `@@RESULT key value...` on the serial console. The guest prints `@@EXIT <status>`
 * and powers off.
 *
 * In the guest: busybox (call e2fsprogs' mke2fs as /sbin/mke2fs), /dev/vd* for -drive if=virtio,
 * /target as a mount point, `result KEY VALUE` as a shell helper.
 */
import { createHash } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { gzipSync } from 'node:zlib';
import { REPO_ROOT } from './nbd-server.js';
import { requireCommands, run, type RunResult } from './run.js';
import { tempDir } from './tmp.js';

export const GUEST_DIR = process.env.GUEST_DIR ?? path.join(REPO_ROOT, '.cache/guest');

export interface GuestRunOptions {
  /** Shell script run as /test.sh (sh -e) inside the guest. */
  script: string;
  /** Extra QEMU arguments: drives, devices, chardevs. */
  qemuArgs?: string[];
  /** Guest RAM in MiB (default 512). */
  memMiB?: number;
  /** Kill QEMU after this long (default 120 s). */
  timeoutMs?: number;
  /** Extra kernel command line. */
  append?: string;
  /** Called with each `@@RESULT key value` line as the guest prints it (to act on the host mid-run). */
  onResult?: (key: string, value: string) => void;
}

export interface GuestRunResult {
  /** `@@RESULT key value...` lines in order. */
  results: Array<{ key: string; value: string }>;
  /** The last value of each key. */
  map: Map<string, string>;
  /** The test script's exit status (null: the guest never got there). */
  exitCode: number | null;
  /** The whole serial console (kernel messages, script output). */
  serial: string;
  qemu: RunResult;
}

/** Builds the guest when needed (no-op in ~1 s when up to date); throws when it cannot. */
export async function ensureGuest(): Promise<{ kernel: string; initrd: string }> {
  requireCommands('qemu-system-x86_64');
  const kernelElf = path.join(GUEST_DIR, 'vmlinux');
  const initrd = path.join(GUEST_DIR, 'initrd.img');
  if (!existsSync(initrd) || !existsSync(path.join(GUEST_DIR, 'vmlinuz'))) {
    const r = spawnSync('bash', [path.join(REPO_ROOT, 'scripts/build-guest.sh')], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    if (r.status !== 0) throw new Error(`scripts/build-guest.sh failed:\n${r.stdout}\n${r.stderr}`);
  }
  const kernel = existsSync(kernelElf) ? kernelElf : path.join(GUEST_DIR, 'vmlinuz');
  return { kernel, initrd };
}

/**
 * `result KEY VALUE...` prints `@@RESULTC SEQ MD5 KEY VALUE` three times: a sequence number and
 * the first 8 hex digits of md5("KEY VALUE"). The serial console has dropped characters of long
 * lines under load (a truncated hash then failed a test that had passed), so the host keeps the
 * first copy whose checksum matches and ignores damaged ones (the checksum leads the line, so a
 * damaged line can never pass for an unchecked one). Lines a script echoes itself
 * (`@@RESULT KEY VALUE`) are taken as they come.
 */
const PRELUDE = `# prelude (test/helpers/guest.ts)
_rn=0
result() { k="$1"; shift; v="$*"; _rn=$((_rn+1)); c=$(printf '%s %s' "$k" "$v" | md5sum | cut -c1-8); for _i in 1 2 3; do echo "@@RESULTC $_rn $c $k $v"; done; }
`;

/** Parses one console line: a result (checked when it carries a checksum) or null. */
export function parseResultLine(line: string, seen: Set<number>): { key: string; value: string } | null {
  // Only the start is trimmed before the check: a value may end in spaces (`$(ls | tr '\n' ' ')`).
  const c = /^@@RESULTC (\d+) ([0-9a-f]{8}) (\S+) ?(.*)$/.exec(line.replace(/\r/g, '').trimStart());
  if (c) {
    const seq = Number(c[1]);
    const key = c[3]!;
    const value = c[4]!;
    if (seen.has(seq)) return null; // another copy of one already taken
    if (createHash('md5').update(`${key} ${value}`).digest('hex').slice(0, 8) !== c[2]) return null; // damaged on the console
    seen.add(seq);
    return { key, value: value.trimEnd() }; // as unchecked lines always were
  }
  const t = line.trim();
  if (/^@@RESULT \d+ [0-9a-f]{8} /.test(t)) return null; // a checked line that lost its 'C'
  const m = /^@@RESULT (\S+) ?(.*)$/.exec(t);
  return m ? { key: m[1]!, value: m[2]! } : null;
}

export async function runGuest(opts: GuestRunOptions): Promise<GuestRunResult> {
  const { kernel, initrd } = await ensureGuest();
  const dir = tempDir('vstore-guest-');
  const script = PRELUDE + opts.script;
  const combined = path.join(dir, 'initrd.img');
  writeFileSync(combined, Buffer.concat([readFileSync(initrd), gzipSync(cpioNewc([{ name: 'test.sh', data: Buffer.from(script), mode: 0o100755 }]))]));
  const args = [
    '-accel', 'tcg', '-cpu', 'max', '-m', String(opts.memMiB ?? 512),
    '-nographic', '-no-reboot', '-nodefaults', '-serial', 'stdio', '-display', 'none',
    '-kernel', kernel, '-initrd', combined,
    '-append', `console=ttyS0 panic=-1 quiet ${opts.append ?? ''}`.trim(),
    ...(opts.qemuArgs ?? []),
  ];
  let pending = '';
  const liveSeen = new Set<number>();
  const onStdout = opts.onResult
    ? (chunk: string) => {
        pending += chunk.replace(/\r/g, '');
        const lines = pending.split('\n');
        pending = lines.pop()!;
        for (const l of lines) {
          const r = parseResultLine(l, liveSeen);
          if (r) opts.onResult!(r.key, r.value);
        }
      }
    : undefined;
  const qemu = await run('qemu-system-x86_64', args, { timeoutMs: opts.timeoutMs ?? 120_000, check: false, ...(onStdout ? { onStdout } : {}) });
  const serial = qemu.stdout.replace(/\r/g, '');
  const results: Array<{ key: string; value: string }> = [];
  const map = new Map<string, string>();
  let exitCode: number | null = null;
  const seen = new Set<number>();
  for (const line of serial.split('\n')) {
    const r = parseResultLine(line, seen);
    if (r) {
      results.push(r);
      map.set(r.key, r.value);
    }
    const e = /^@@EXIT (\d+)/.exec(line.trim());
    if (e) exitCode = Number(e[1]);
  }
  return { results, map, exitCode, serial, qemu };
}

/** A newc ("070701") cpio archive of regular files at the root. */
export function cpioNewc(files: Array<{ name: string; data: Buffer; mode?: number }>): Buffer {
  const parts: Buffer[] = [];
  let ino = 1000;
  const pad4 = (n: number) => Buffer.alloc((4 - (n % 4)) % 4);
  const entry = (name: string, data: Buffer, mode: number) => {
    const nameBuf = Buffer.from(`${name}\0`);
    const fields = [ino++, mode, 0, 0, 1, 0, data.length, 0, 0, 0, 0, nameBuf.length, 0];
    const hdr = Buffer.from(`070701${fields.map((f) => f.toString(16).padStart(8, '0')).join('')}`);
    parts.push(hdr, nameBuf, pad4(hdr.length + nameBuf.length), data, pad4(data.length));
  };
  for (const f of files) entry(f.name, f.data, f.mode ?? 0o100644);
  entry('TRAILER!!!', Buffer.alloc(0), 0);
  return Buffer.concat(parts);
}

/**
 * QEMU arguments for virtiofs shares: guest RAM as shared memfd (vhost-user needs it) and one
 * vhost-user-fs-pci device per share.
 */
export function virtiofsArgs(memMiB: number, shares: Array<{ socket: string; tag: string }>): string[] {
  return [
    '-object', `memory-backend-memfd,id=mem,size=${memMiB}M,share=on`,
    '-numa', 'node,memdev=mem',
    ...shares.flatMap((s, i) => ['-chardev', `socket,id=fs${i},path=${s.socket}`, '-device', `vhost-user-fs-pci,chardev=fs${i},tag=${s.tag}`]),
  ];
}
