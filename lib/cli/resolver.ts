/**
 * `vstore resolver ...`: run the resolver service, and look at or change what a resolver holds
 * (nodes, names, static NBD servers registered by hand, placements).
 */
import { Command, Option } from 'commander';
import { LOG_LEVELS, parseSize } from '../config/schema.js';
import { createLogger, type Logger } from '../log.js';
import { parseAddress } from '../net/address.js';
import { EmbeddedStore } from '../resolver/embedded.js';
import { openResolver } from '../resolver/open.js';
import { ResolverService } from '../resolver/service.js';
import { checkNodeId, type NameKind, type NameRecord, type NodeStatus, type ResolverStore } from '../resolver/types.js';
import { exitAfterLogs, stopOnSignals } from './signals.js';

const collect = (v: string, prev: string[]): string[] => [...prev, v];

function resolverOption(): Option {
  return new Option('--resolver <url>', 'the resolver: etcd://HOST:PORT[,HOST:PORT...], unix:/PATH (a resolver service), HOST:PORT, or file:PATH (a store file, opened in this process)')
    .env('VSTORE_RESOLVER')
    .makeOptionMandatory();
}

/** Opens the store, runs `fn`, closes it. */
async function withStore<T>(url: string, fn: (s: ResolverStore) => Promise<T>): Promise<T> {
  const logger = createLogger({ level: 'warn' });
  const store = await openResolver(url, { logger });
  try {
    return await fn(store);
  } finally {
    await store.close();
  }
}

export function formatSize(n: number): string {
  const units = ['B', 'K', 'M', 'G', 'T', 'P'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${n}B` : `${Number.isInteger(v) ? v : v.toFixed(1)}${units[i]}`;
}

function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  return rows.map((r) => r.map((cell, c) => (c === r.length - 1 ? cell : cell.padEnd(widths[c]!))).join('  ')).join('\n') + '\n';
}

function sizeArg(flag: string, v: string): number {
  const n = parseSize(v);
  if (n === undefined) throw new Error(`${flag}: not a size: "${v}" (bytes, or a number with K, M, G, T suffix)`);
  return n;
}

/** The NBD URI of `exportName` behind one listen address. */
export function nbdUri(address: string, exportName: string): string {
  const a = parseAddress(address);
  const exp = exportName.split('/').map(encodeURIComponent).join('/');
  if ('unix' in a) return `nbd+unix:///${exp}?socket=${a.unix}`;
  const host = a.host.includes(':') ? `[${a.host}]` : a.host;
  return `nbd://${host}:${a.port}/${exp}`;
}

function ago(ms: number, now: number): string {
  if (!ms) return 'never';
  const s = Math.max(0, Math.round((now - ms) / 1000));
  return `${s}s ago`;
}

export function renderNodes(nodes: NodeStatus[], now = Date.now()): string {
  if (nodes.length === 0) return 'no nodes\n';
  const rows = [['ID', 'ALIVE', 'KIND', 'ZONE', 'CAPACITY', 'FREE', 'SEEN', 'NBD']];
  for (const n of nodes) {
    rows.push([
      n.id,
      n.alive ? 'yes' : 'no',
      n.static ? 'static' : 'node',
      n.zone ?? '-',
      n.capacity ? formatSize(n.capacity) : '-',
      n.capacity ? formatSize(n.free) : '-',
      n.static ? '-' : ago(n.seen, now),
      n.nbd.join(', ') || '-',
    ]);
  }
  return table(rows);
}

export function renderNames(names: NameRecord[]): string {
  if (names.length === 0) return 'no names\n';
  const rows = [['NAME', 'KIND', 'SIZE', 'REPLICAS', 'VERSION', 'NODES']];
  for (const r of names) {
    rows.push([
      r.name,
      r.kind,
      r.size !== undefined ? formatSize(r.size) : '-',
      String(r.replicas.length),
      String(r.version),
      r.replicas.map((x) => `${x.node}${x.state === 'in-sync' ? '' : `(${x.state})`}`).join(', '),
    ]);
  }
  return table(rows);
}

export interface ShownReplica {
  node: string;
  export: string;
  state: string;
  /** null when the node is not registered. */
  alive: boolean | null;
  nbd: string[];
  uris: string[];
}

export function describeReplicas(rec: NameRecord, nodes: NodeStatus[]): ShownReplica[] {
  const byId = new Map(nodes.map((n) => [n.id, n]));
  return rec.replicas.map((r) => {
    const n = byId.get(r.node);
    const exp = r.export ?? rec.name;
    const nbd = n?.nbd ?? [];
    return { node: r.node, export: exp, state: r.state, alive: n ? n.alive : null, nbd, uris: nbd.map((a) => nbdUri(a, exp)) };
  });
}

export function renderShow(rec: NameRecord, replicas: ShownReplica[]): string {
  let out = `${rec.name}: ${rec.kind}${rec.size !== undefined ? `, ${formatSize(rec.size)} (${rec.size} bytes)` : ''}, ${rec.replicas.length} replica(s), version ${rec.version}, created ${new Date(rec.created).toISOString()}`;
  if (rec.dirtyHost) out += `, dirty cache on ${rec.dirtyHost}`;
  if (rec.lastWriter) out += `, last opened writable on ${rec.lastWriter}`;
  out += '\n';
  const rows = [['NODE', 'STATE', 'ALIVE', 'EXPORT', 'NBD']];
  for (const r of replicas) {
    rows.push([r.node, r.state, r.alive === null ? 'unknown node' : r.alive ? 'yes' : 'no', JSON.stringify(r.export), r.uris.join(', ') || '-']);
  }
  return out + table(rows);
}

function parsePin(v: string): { node: string; export?: string } {
  const i = v.indexOf(':');
  const node = i < 0 ? v : v.slice(0, i);
  checkNodeId(node);
  if (i < 0) return { node };
  return { node, export: v.slice(i + 1) };
}

function serveCommand(): Command {
  return new Command('serve')
    .summary('run the resolver service (an embedded store in a file) in the foreground')
    .description(
      'run the resolver service in the foreground until SIGTERM/SIGINT: the embedded store (a JSON file, rewritten atomically on every change) served over RPC on every --listen address; storage nodes and daemons reach it with --resolver ADDRESS. Node liveness is kept in memory: after a restart every node counts dead until its next heartbeat',
    )
    .requiredOption('--store <file>', 'the store file (created at the first change)')
    .requiredOption('--listen <addr>', 'listen address, repeatable: unix:/PATH or HOST:PORT (HOST:0 picks a port)', collect, [])
    .addOption(new Option('--log-level <level>', 'log level (logs are JSON lines on stderr)').choices([...LOG_LEVELS]).default('info'))
    .addHelpText(
      'after',
      `
Examples:
  $ vstore resolver serve --store /var/lib/vstore/resolver.json --listen unix:/run/vstore/resolver.sock
  $ vstore resolver serve --store resolver.json --listen 0.0.0.0:7010 --listen unix:/tmp/resolver.sock`,
    )
    .action(async (opts: { store: string; listen: string[]; logLevel: string }) => {
      if (opts.listen.length === 0) throw new Error('nothing to listen on: give --listen ADDR');
      const logger: Logger = createLogger({ level: opts.logLevel, name: 'vstore-resolver' });
      const store = await EmbeddedStore.open(opts.store, { logger });
      let service: ResolverService;
      try {
        service = await ResolverService.start({ store, listen: opts.listen, logger });
      } catch (e) {
        await store.close();
        throw new Error(`cannot listen: ${(e as Error).message}`);
      }
      const exited = stopOnSignals(logger, async () => {
        await service.close();
        await store.close();
      });
      for (const a of service.addresses) process.stdout.write(`vstore: resolver serving ${store.path} on ${a}\n`);
      exitAfterLogs(logger, await exited);
    });
}

function nodesCommand(): Command {
  return new Command('nodes')
    .summary('list the registered nodes and their liveness')
    .description('list the registered storage nodes: id, alive, kind (node with a lease, or static), zone, capacity, free space, last heartbeat and NBD addresses')
    .addOption(resolverOption())
    .option('--json', 'print the nodes as JSON (NodeStatus[])', false)
    .addHelpText(
      'after',
      `
Examples:
  $ vstore resolver nodes --resolver unix:/run/vstore/resolver.sock
  $ vstore resolver nodes --resolver etcd://10.0.0.1:2379,10.0.0.2:2379 --json`,
    )
    .action(async (opts: { resolver: string; json: boolean }) => {
      const nodes = await withStore(opts.resolver, (s) => s.listNodes());
      process.stdout.write(opts.json ? JSON.stringify(nodes, null, 2) + '\n' : renderNodes(nodes));
    });
}

function namesCommand(): Command {
  return new Command('names')
    .summary('list the names (volumes, directories) and where they live')
    .description('list the name records: name, kind, size, replicas, version and the nodes holding them')
    .addOption(resolverOption())
    .option('--prefix <prefix>', 'only names starting with this (e.g. vm1/)', '')
    .option('--json', 'print the records as JSON (NameRecord[])', false)
    .addHelpText(
      'after',
      `
Examples:
  $ vstore resolver names --resolver unix:/run/vstore/resolver.sock
  $ vstore resolver names --resolver etcd://127.0.0.1:2379 --prefix vm1/ --json`,
    )
    .action(async (opts: { resolver: string; prefix: string; json: boolean }) => {
      const names = await withStore(opts.resolver, (s) => s.listNames(opts.prefix));
      process.stdout.write(opts.json ? JSON.stringify(names, null, 2) + '\n' : renderNames(names));
    });
}

function showCommand(): Command {
  return new Command('show')
    .summary('show where a name lives: each replica, its node, state and NBD addresses')
    .description("show a name's record and, for each replica, its node, state, whether the node is alive, the export name and the NBD URIs that reach it")
    .argument('<name>', 'volume name (vm1/disk0) or directory path (/projects/alpha)')
    .addOption(resolverOption())
    .option('--json', 'print {record, replicas} as JSON', false)
    .addHelpText(
      'after',
      `
Examples:
  $ vstore resolver show vm1/disk0 --resolver unix:/run/vstore/resolver.sock
  $ vstore resolver show vm1/disk0 --resolver etcd://127.0.0.1:2379 --json`,
    )
    .action(async (name: string, opts: { resolver: string; json: boolean }) => {
      const { rec, nodes } = await withStore(opts.resolver, async (s) => ({ rec: await s.getName(name), nodes: await s.listNodes() }));
      if (!rec) throw new Error(`${name}: no such name`);
      const replicas = describeReplicas(rec, nodes);
      process.stdout.write(opts.json ? JSON.stringify({ record: rec, replicas }, null, 2) + '\n' : renderShow(rec, replicas));
    });
}

function nodeCommand(): Command {
  const node = new Command('node').summary('register or remove a static node (any NBD server) by hand').description('register or remove a static node: an NBD server vstore does not run (nbdkit, qemu-nbd, another vstore), always counted alive, used only where a name pins it');
  node
    .command('add')
    .summary('register a static node: any NBD server, e.g. nbdkit or qemu-nbd')
    .description(
      'register (or update) a static node: an NBD server reached at --nbd, with no lease (always counted alive) and no control address. Placement never picks a static node by itself: pin names to it with `vstore resolver place NAME --on ID[:EXPORT]`',
    )
    .argument('<id>', 'node id (1-64 of A-Z a-z 0-9 . _ -)')
    .requiredOption('--nbd <addr>', 'NBD address, repeatable (one per path): unix:/PATH or HOST:PORT', collect, [])
    .option('--zone <zone>', 'failure domain label')
    .option('--capacity <bytes>', 'storage the server has (bytes, or K/M/G/T suffix); informational')
    .addOption(resolverOption())
    .addHelpText(
      'after',
      `
Examples:
  $ nbdkit --unix /tmp/nbdkit.sock memory 1G
  $ vstore resolver node add nbdkit1 --nbd unix:/tmp/nbdkit.sock --capacity 1G --resolver unix:/run/vstore/resolver.sock
  $ vstore resolver node add qnbd --nbd 10.0.0.5:10809 --zone rack2 --resolver etcd://127.0.0.1:2379`,
    )
    .action(async (id: string, opts: { nbd: string[]; zone?: string; capacity?: string; resolver: string }) => {
      checkNodeId(id);
      if (opts.nbd.length === 0) throw new Error('--nbd: give at least one NBD address');
      for (const a of opts.nbd) parseAddress(a, '--nbd');
      const capacity = opts.capacity !== undefined ? sizeArg('--capacity', opts.capacity) : 0;
      await withStore(opts.resolver, (s) =>
        s.registerNode({ id, nbd: opts.nbd, control: [], capacity, free: capacity, static: true, ...(opts.zone ? { zone: opts.zone } : {}) }),
      );
      process.stdout.write(`vstore: static node ${id} registered (NBD ${opts.nbd.join(', ')})\n`);
    });
  node
    .command('remove')
    .summary('remove a node and its record')
    .description('remove a node from the resolver: its liveness and its record. Names that have replicas on it keep them (they show as an unknown node)')
    .argument('<id>', 'node id')
    .addOption(resolverOption())
    .addHelpText(
      'after',
      `
Examples:
  $ vstore resolver node remove nbdkit1 --resolver unix:/run/vstore/resolver.sock`,
    )
    .action(async (id: string, opts: { resolver: string }) => {
      await withStore(opts.resolver, (s) => s.deregisterNode(id, { forget: true }));
      process.stdout.write(`vstore: node ${id} removed\n`);
    });
  return node;
}

function placeCommand(): Command {
  return new Command('place')
    .summary('create a name record: choose (or pin) the nodes of its replicas')
    .description(
      "create a name's record unless it exists: replicas on the live nodes with the most free space, in distinct zones where nodes carry zones; --on pins replicas to given nodes (static nodes are used only this way) with an optional export name. Prints the record, and whether it was created or already there",
    )
    .argument('<name>', 'volume name (vm1/disk0) or, with --kind directory, a directory path (/projects/alpha)')
    .option('--size <size>', 'volume size (bytes, or K/M/G/T suffix)')
    .option('--replicas <n>', 'number of replicas (default: the number of --on pins, at least 1)')
    .option('--on <node[:export]>', 'pin a replica to this node (and export name), repeatable', collect, [])
    .addOption(new Option('--kind <kind>', 'what the name is').choices(['volume', 'directory']).default('volume'))
    .addOption(resolverOption())
    .option('--json', 'print {record, created} as JSON', false)
    .addHelpText(
      'after',
      `
Examples:
  $ vstore resolver place vm1/disk0 --size 10G --replicas 2 --resolver etcd://127.0.0.1:2379
  $ vstore resolver place vm2/disk0 --size 1G --on nbdkit1:disk0 --resolver unix:/run/vstore/resolver.sock`,
    )
    .action(async (name: string, opts: { size?: string; replicas?: string; on: string[]; kind: NameKind; resolver: string; json: boolean }) => {
      const replicas = opts.replicas === undefined ? Math.max(1, opts.on.length) : Number(opts.replicas);
      if (!Number.isSafeInteger(replicas) || replicas < 1) throw new Error(`--replicas: expected a positive integer, got "${opts.replicas}"`);
      if (opts.kind === 'volume' && opts.size === undefined) throw new Error('--size: a volume needs a size');
      const size = opts.size !== undefined ? sizeArg('--size', opts.size) : undefined;
      const pins = opts.on.map(parsePin);
      const r = await withStore(opts.resolver, (s) =>
        s.placeName({ name, kind: opts.kind, replicas, ...(size !== undefined ? { size } : {}), ...(pins.length ? { nodes: pins } : {}) }),
      );
      if (opts.json) {
        process.stdout.write(JSON.stringify(r, null, 2) + '\n');
        return;
      }
      process.stdout.write(
        `vstore: ${name} ${r.created ? 'placed' : 'exists'} on ${r.record.replicas.map((x) => (x.export ? `${x.node}:${x.export}` : x.node)).join(', ')} (version ${r.record.version})\n`,
      );
    });
}

export function resolverCommand(): Command {
  const cmd = new Command('resolver')
    .summary('the directory resolver: which nodes hold which volumes')
    .description(
      'the directory resolver maps names (volumes vm1/disk0, directories /projects/alpha) to the storage nodes that hold them and keeps the registry of nodes and their liveness. It is an embedded store served by `vstore resolver serve` (or by a daemon), or etcd. These commands run the service and read or change what it holds',
    )
    .addHelpText(
      'after',
      `
Resolver URLs (--resolver, or $VSTORE_RESOLVER):
  etcd://HOST:PORT[,HOST:PORT...]   etcd 3.4 (keys under /vstore/)
  unix:/PATH | HOST:PORT            a resolver service (vstore resolver serve, or a daemon)
  file:PATH                         a store file, opened in this process (no service running on it)

Examples:
  $ vstore resolver serve --store resolver.json --listen unix:/tmp/resolver.sock
  $ export VSTORE_RESOLVER=unix:/tmp/resolver.sock
  $ vstore resolver node add nbdkit1 --nbd unix:/tmp/nbdkit.sock --capacity 1G
  $ vstore resolver place vm1/disk0 --size 64M --on nbdkit1:disk0
  $ vstore resolver show vm1/disk0
  $ vstore resolver nodes --json`,
    );
  cmd.addCommand(serveCommand());
  cmd.addCommand(nodesCommand());
  cmd.addCommand(namesCommand());
  cmd.addCommand(showCommand());
  cmd.addCommand(nodeCommand());
  cmd.addCommand(placeCommand());
  return cmd;
}
