/**
 * `vstore mount DIR MOUNTPOINT`: serves DIR (a LocalFileTree, confined to it) as a FUSE
 * filesystem on MOUNTPOINT in the foreground, like `bindfs` or virtiofsd on the host side — the
 * same engine as a virtiofs share, so an operator can look into a share, and the kernel's own
 * FUSE client is the judge of the engine in tests. As root it mounts with mount(2); as another
 * user through fusermount3 (Debian's fuse3), for that user only unless --allow-other. Ends on SIGTERM/SIGINT (unmount, lazily if
 * busy) or when someone runs `umount MOUNTPOINT`; either way the exit code is 0.
 */
import path from 'node:path';
import { Option, type Command } from 'commander';
import { LOG_LEVELS } from '../config/schema.js';
import { createLogger } from '../log.js';
import { LocalFileTree, type IdMapRange } from '../fs/local.js';
import { FuseEngine } from '../fuse/engine.js';
import { DevFuseMount } from '../fuse/devfuse.js';
import { exitAfterLogs, stopOnSignals } from './signals.js';

interface MountOpts {
  readOnly?: boolean;
  uidMap?: IdMapRange[];
  gidMap?: IdMapRange[];
  maxWrite: string;
  allowOther?: boolean;
  mountWith: 'auto' | 'mount' | 'fusermount';
  logLevel: string;
}

/** `GUEST:HOST[:COUNT]` -> a map range (COUNT defaults to 1); repeatable. */
function parseRange(flag: string) {
  return (v: string, prev: IdMapRange[] | undefined): IdMapRange[] => {
    const m = /^(\d+):(\d+)(?::(\d+))?$/.exec(v);
    const r = m ? { guest: Number(m[1]), host: Number(m[2]), count: m[3] === undefined ? 1 : Number(m[3]) } : undefined;
    if (!r || r.count < 1 || r.guest + r.count > 2 ** 32 || r.host + r.count > 2 ** 32) {
      throw new Error(`${flag}: expected MOUNT_ID:HOST_ID[:COUNT] of 32-bit ids, got "${v}"`);
    }
    return [...(prev ?? []), r];
  };
}

export function registerMount(program: Command): void {
  program
    .command('mount')
    .summary('mount a directory through vstore\'s FUSE engine on the host (like bindfs)')
    .description(
      'serve DIR through /dev/fuse on MOUNTPOINT in the foreground (as root with mount(2) and default_permissions,allow_other; as another user through fusermount3, for that user only), with the FUSE engine that serves virtiofs shares; every access stays inside DIR. Ends on SIGTERM/SIGINT (unmounts, lazily when busy) or when MOUNTPOINT is unmounted from outside; exit code 0',
    )
    .argument('<dir>', 'directory to serve')
    .argument('<mountpoint>', 'an existing directory to mount it on')
    .option('-r, --read-only', 'refuse every change with EROFS (and mount read-only)', false)
    .option('--allow-other', 'let other users in (the default as root; otherwise fusermount3 needs user_allow_other in /etc/fuse.conf)')
    .option('--uid-map <m:h[:n]>', 'ids m..m+n-1 seen in the mount are host ids h..h+n-1 (repeatable); unmapped ids become 65534', parseRange('--uid-map'))
    .option('--gid-map <m:h[:n]>', 'the same for group ids', parseRange('--gid-map'))
    .addOption(new Option('--mount-with <how>', 'mount(2) (root) or fusermount3 (anyone); auto picks by uid').choices(['auto', 'mount', 'fusermount']).default('auto').hideHelp())
    .addOption(new Option('--max-write <bytes>', 'largest read/write request offered to the kernel').default('1048576').hideHelp())
    .addOption(new Option('--log-level <level>', 'log level (logs are JSON lines on stderr)').choices([...LOG_LEVELS]).default('info'))
    .addHelpText(
      'after',
      `
Examples:
  $ vstore mount /srv/share /mnt/share
  $ vstore mount --read-only /srv/share /mnt/look
  $ vstore mount --uid-map 1000:100000:1000 --gid-map 1000:100000:1000 /srv/share /mnt/share
  $ umount /mnt/share          (or SIGTERM) ends it`,
    )
    .action(async (dir: string, mountpoint: string, opts: MountOpts) => {
      const logger = createLogger({ level: opts.logLevel });
      const maxWrite = Number(opts.maxWrite);
      if (!Number.isInteger(maxWrite) || maxWrite < 4096) throw new Error(`--max-write: not a size of at least 4096: "${opts.maxWrite}"`);
      const root = path.resolve(dir);
      let tree: LocalFileTree;
      try {
        tree = await LocalFileTree.open(root, {
          readOnly: opts.readOnly ?? false,
          ...(opts.uidMap ? { uidMap: opts.uidMap } : {}),
          ...(opts.gidMap ? { gidMap: opts.gidMap } : {}),
        });
      } catch (e) {
        throw new Error(`${dir}: ${(e as Error).message}`);
      }
      const engine = new FuseEngine({ tree, logger, session: `mount:${path.resolve(mountpoint)}`, readOnly: opts.readOnly ?? false, maxWrite });
      let mount: DevFuseMount;
      try {
        mount = await DevFuseMount.mount({
          engine,
          logger,
          mountpoint,
          source: root,
          readOnly: opts.readOnly ?? false,
          method: opts.mountWith,
          ...(opts.allowOther !== undefined ? { allowOther: opts.allowOther } : {}),
        });
      } catch (e) {
        await tree.close().catch(() => {});
        const code = (e as { code?: string }).code;
        const hint = code === 'EPERM' ? ' (mount(2) needs root; others mount through fusermount3)' : code === 'ENOENT' ? ' (no such mountpoint, or no /dev/fuse: modprobe fuse)' : '';
        throw new Error(`cannot mount on ${mountpoint}: ${(e as Error).message}${hint}`);
      }
      const stop = async (): Promise<void> => {
        await mount.unmount();
        await tree.close();
      };
      const exited = stopOnSignals(logger, stop);
      process.stdout.write(`vstore: serving ${root} on ${mount.mountpoint}${opts.readOnly ? ' (read-only)' : ''}\n`);
      const code = await Promise.race([
        exited,
        mount.closed.then(async (reason) => {
          await tree.close();
          return reason === 'error' ? 1 : 0;
        }),
      ]);
      exitAfterLogs(logger, code);
    });
}
