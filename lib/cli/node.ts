/**
 * `vstore node --data DIR --listen ADDR ...`: a storage node in the foreground. Serves the
 * volumes under DIR/volumes over NBD on every --listen address, answers control RPCs on every
 * --control address (default unix:DIR/control.sock), and registers in the resolver (--resolver)
 * with a lease it refreshes. SIGTERM/SIGINT: deregister, drain, flush, exit 0.
 */
import path from 'node:path';
import { Command, Option } from 'commander';
import { LOG_LEVELS, MAX_SOCKET_PATH } from '../config/schema.js';
import { createLogger } from '../log.js';
import { parseAddress } from '../net/address.js';
import { DEFAULT_LEASE_TTL_MS, StorageNode } from '../node/node.js';
import { openResolver } from '../resolver/open.js';
import type { ResolverStore } from '../resolver/types.js';
import { exitAfterLogs, stopOnSignals } from './signals.js';

interface NodeOpts {
  data: string;
  listen?: string[];
  control?: string[];
  resolver?: string;
  id?: string;
  zone?: string;
  leaseTtl?: string;
  engine?: 'threadpool' | 'uring' | 'auto';
  logLevel: string;
}

function collect(v: string, prev: string[] | undefined): string[] {
  return [...(prev ?? []), v];
}

function checkAddress(flag: string, a: string): string {
  const parsed = parseAddress(a, flag); // throws with the flag's name on a bad address
  if ('unix' in parsed) {
    const abs = path.resolve(parsed.unix);
    if (Buffer.byteLength(abs) > MAX_SOCKET_PATH) throw new Error(`${flag}: socket path ${abs} is longer than ${MAX_SOCKET_PATH} bytes`);
    return `unix:${abs}`;
  }
  return a;
}

/** Userinfo (passwords) out of a URL before it is logged. */
function redact(url: string): string {
  return url.replace(/\/\/[^/@]*@/, '//***@');
}

export function nodeCommand(): Command {
  return new Command('node')
    .summary('run a storage node: volumes over NBD, control over RPC, registered in the resolver')
    .description(
      'run a storage node in the foreground until SIGTERM/SIGINT: every volume under DIR/volumes (sparse raw files, DIR/volumes/NAME.img) is an NBD export named NAME on every --listen address; volumes are created, grown, listed and deleted over the RPC control addresses; with --resolver the node registers its addresses, capacity and free space with a lease it refreshes every lease/3 (a resolver that cannot be reached is retried while the node keeps serving). FLUSH and FUA writes are answered only after fdatasync. Shared directories live under DIR/dirs/<path> and are served to host daemons as file trees over the same control RPC (dir.create/delete/list/stat and one fs.* method per file operation; each connection is a session, confined to its directory). On a signal the node deregisters, drains in-flight requests, flushes the volumes, removes its sockets and exits 0. Two nodes cannot serve the same DIR (DIR/lock).',
    )
    .requiredOption('--data <dir>', 'directory of the node: volumes/, node-id, lock (created if missing)')
    .option('--listen <addr>', 'NBD listen address, repeatable: unix:/path/sock or HOST:PORT (port 0 picks one; see the log)', collect)
    .option('--control <addr>', 'RPC control address, repeatable (default unix:DIR/control.sock)', collect)
    .option('--resolver <url>', 'resolver to register in: unix:/path (a `vstore resolver serve`), HOST:PORT, vstore://HOST:PORT, file:/path (embedded store file), etcd://HOST:PORT')
    .option('--id <id>', 'node id, 1-64 of A-Z a-z 0-9 . _ - (default: generated once and kept in DIR/node-id)')
    .option('--zone <zone>', 'failure domain label (replicas go to distinct zones)')
    .option('--lease-ttl <ms>', `registration lease in ms; refreshed every third of it (default ${DEFAULT_LEASE_TTL_MS})`)
    .addOption(new Option('--engine <engine>', 'how misses, large reads, writes and fdatasync reach the kernel (advanced)').choices(['threadpool', 'uring', 'auto']).hideHelp())
    .addOption(new Option('--log-level <level>', 'log level (logs are JSON lines on stderr)').choices([...LOG_LEVELS]).default('info'))
    .addHelpText(
      'after',
      `
Examples:
  $ vstore node --data /var/lib/vstore/node1 --listen unix:/run/vstore/node1.sock --listen 0.0.0.0:10809
  $ vstore node --data /srv/n2 --listen 127.0.0.1:0 --control 127.0.0.1:7001 --resolver unix:/run/vstore/resolver.sock --zone rack2
  $ vstore node --data /tmp/n3 --listen unix:/tmp/n3.sock --id n3 --lease-ttl 5000

The log line "node: serving" gives the bound addresses. Control methods (framed msgpack RPC):
node.info, volume.create {name, size}, volume.grow {name, size}, volume.delete {name, force?},
volume.list, volume.stat {name}; directories: dir.create {path}, dir.delete {path, force?},
dir.list, dir.stat {path}, fs.attach {path, readOnly?} then fs.lookup, fs.read, ... A volume is reached as nbd+unix:///NAME?socket=SOCK or
nbd://HOST:PORT/NAME, e.g.
  $ nbdinfo 'nbd+unix:///vm1/disk0?socket=/run/vstore/node1.sock'`,
    )
    .action(async (opts: NodeOpts) => {
      const data = path.resolve(opts.data);
      if (!opts.listen?.length) throw new Error('nothing to listen on: give --listen ADDR (unix:/path or HOST:PORT), repeatable');
      const listen = opts.listen.map((a) => checkAddress('--listen', a));
      const control = (opts.control?.length ? opts.control : [`unix:${path.join(data, 'control.sock')}`]).map((a) => checkAddress('--control', a));
      let leaseTtlMs: number | undefined;
      if (opts.leaseTtl !== undefined) {
        leaseTtlMs = Number(opts.leaseTtl);
        if (!Number.isSafeInteger(leaseTtlMs) || leaseTtlMs < 3) throw new Error(`--lease-ttl: expected milliseconds (an integer >= 3), got "${opts.leaseTtl}"`);
      }
      const logger = createLogger({ level: opts.logLevel });
      let resolver: ResolverStore | undefined;
      if (opts.resolver) {
        try {
          resolver = await openResolver(opts.resolver, { logger });
        } catch (e) {
          throw new Error(`--resolver ${redact(opts.resolver)}: ${(e as Error).message}`);
        }
      }
      let node: StorageNode;
      try {
        node = await StorageNode.start({
          data,
          nbd: listen,
          control,
          logger,
          ...(opts.id !== undefined ? { id: opts.id } : {}),
          ...(opts.zone !== undefined ? { zone: opts.zone } : {}),
          ...(resolver ? { resolver } : {}),
          ...(leaseTtlMs !== undefined ? { leaseTtlMs } : {}),
          ...(opts.engine ? { engine: opts.engine } : {}),
        });
      } catch (e) {
        await resolver?.close().catch(() => {});
        throw new Error(`cannot start the node: ${(e as Error).message}`);
      }
      const exited = stopOnSignals(logger, async () => {
        try {
          await node.stop();
        } finally {
          await resolver?.close().catch(() => {});
        }
      });
      logger.info(
        {
          id: node.id,
          data,
          nbd: node.nbdAddresses,
          control: node.controlAddresses,
          zone: opts.zone,
          exports: node.exports,
          resolver: opts.resolver ? redact(opts.resolver) : undefined,
        },
        'node: serving',
      );
      exitAfterLogs(logger, await exited);
    });
}
