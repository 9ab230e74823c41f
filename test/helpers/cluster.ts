/**
 * Processes of a storage cluster on this machine, for integration and e2e tests: `vstore resolver
 * serve`, `vstore node`, `vstore serve` with a resolver, and a real etcd. Each is a child process
 * that a test can SIGKILL, pause and restart on the same state, as a failure would.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import * as net from 'node:net';
import path from 'node:path';
import { afterAll } from 'vitest';
import { REPO_ROOT, VSTORE_BIN } from './nbd-server.js';
import { tempDir } from './tmp.js';

export interface Proc {
  readonly child: ChildProcess;
  /** Everything it wrote on stdout and stderr. */
  log(): string;
  /** SIGTERM; resolves with the exit code (throws unless it is 0 when `expectClean`). */
  stop(expectClean?: boolean): Promise<number | null>;
  /** SIGKILL, resolves when it is gone. */
  kill(): Promise<void>;
  readonly exited: boolean;
}

const live = new Set<ChildProcess>();
afterAll(() => {
  for (const c of live) c.kill('SIGKILL');
});
process.once('exit', () => {
  for (const c of live) c.kill('SIGKILL');
});

/** Spawns `cmd args`; resolves once `ready(log)` is true (rejects if it exits first or after timeoutMs). */
export async function spawnProc(cmd: string, args: string[], ready: (log: string) => boolean | Promise<boolean>, timeoutMs = 20_000): Promise<Proc> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  live.add(child);
  let out = '';
  child.stdout!.on('data', (b: Buffer) => (out += b.toString()));
  child.stderr!.on('data', (b: Buffer) => (out += b.toString()));
  let exitCode: number | null | undefined;
  const exit = new Promise<number | null>((resolve) =>
    child.once('exit', (code) => {
      live.delete(child);
      exitCode = code;
      resolve(code);
    }),
  );
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (exitCode !== undefined) throw new Error(`${path.basename(cmd)} ${args.join(' ')} exited (${exitCode}) before it was ready:\n${out}`);
    if (await ready(out)) break;
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`${path.basename(cmd)} ${args.join(' ')} not ready after ${timeoutMs} ms:\n${out}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    child,
    log: () => out,
    get exited() {
      return exitCode !== undefined;
    },
    async stop(expectClean = true) {
      if (exitCode === undefined) child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 15_000);
      const code = await exit;
      clearTimeout(timer);
      if (expectClean && code !== 0) throw new Error(`${path.basename(cmd)} did not exit cleanly (${code}):\n${out}`);
      return code;
    },
    async kill() {
      if (exitCode === undefined) child.kill('SIGKILL');
      await exit;
    },
  };
}

function vstoreBuilt(): void {
  if (!existsSync(path.join(REPO_ROOT, 'dist/lib/cli/index.js'))) {
    throw new Error('vstore is not built (dist/lib/cli/index.js missing): run `npm run build` or scripts/setup.sh');
  }
}

/** `vstore resolver serve` with its store in `dir`; `url` is what nodes and daemons are given. */
export async function startResolverService(dir: string): Promise<Proc & { url: string }> {
  vstoreBuilt();
  mkdirSync(dir, { recursive: true });
  const sock = path.join(dir, 'resolver.sock');
  const p = await spawnProc(
    process.execPath,
    [VSTORE_BIN, 'resolver', 'serve', '--store', path.join(dir, 'resolver.json'), '--listen', `unix:${sock}`, '--log-level', 'info'],
    () => existsSync(sock),
  );
  return Object.assign(p, { url: `unix:${sock}` });
}

export interface NodeProc extends Proc {
  id: string;
  data: string;
  /** The node's NBD unix socket. */
  socket: string;
  /** Path of a volume's file on this node. */
  volumeFile(name: string): string;
}

/** `vstore node` on `data` (created), listening on a unix socket in it, registered in `resolver`. */
export async function startStorageNode(o: { id: string; data: string; resolver: string; zone?: string; leaseTtlMs?: number; extraListen?: string[] }): Promise<NodeProc> {
  vstoreBuilt();
  mkdirSync(o.data, { recursive: true });
  const socket = path.join(o.data, 'nbd.sock');
  const args = [VSTORE_BIN, 'node', '--data', o.data, '--id', o.id, '--listen', `unix:${socket}`, '--resolver', o.resolver, '--log-level', 'info'];
  for (const l of o.extraListen ?? []) args.push('--listen', l);
  if (o.zone) args.push('--zone', o.zone);
  if (o.leaseTtlMs) args.push('--lease-ttl', String(o.leaseTtlMs));
  const p = await spawnProc(process.execPath, args, (log) => log.includes('node: serving'));
  return Object.assign(p, { id: o.id, data: o.data, socket, volumeFile: (name: string) => path.join(o.data, 'volumes', `${name}.img`) });
}

export interface DaemonProc extends Proc {
  config: string;
  control: string;
  runDir: string;
  /** The NBD unix socket of VM/DISK. */
  diskSocket(vm: string, disk: string): string;
  /** GET on the control API (JSON). */
  get<T = unknown>(p: string): Promise<T>;
  /** GET on the control API, as text (/metrics). */
  text(p: string): Promise<string>;
}

/** `vstore serve` on `config` (written to dir/config.json with runDir/stateDir/control in dir); ready when the control socket is. */
export async function startDaemonWith(dir: string, config: Record<string, unknown>): Promise<DaemonProc> {
  vstoreBuilt();
  mkdirSync(dir, { recursive: true });
  const runDir = path.join(dir, 'run');
  const control = path.join(dir, 'control.sock');
  const file = path.join(dir, 'config.json');
  writeFileSync(file, JSON.stringify({ runDir, stateDir: path.join(dir, 'state'), control, ...config }, null, 2));
  const p = await spawnProc(process.execPath, [VSTORE_BIN, 'serve', '-c', file, '--log-level', 'info'], () => existsSync(control), 60_000);
  const text = async (urlPath: string): Promise<string> => {
    const { request } = await import('node:http');
    return new Promise<string>((resolve, reject) => {
      const req = request({ socketPath: control, path: urlPath, method: 'GET', headers: { host: 'vstore' } }, (res) => {
        let body = '';
        res.on('data', (c: Buffer) => (body += c.toString()));
        res.on('end', () => resolve(body));
      });
      req.on('error', reject);
      req.end();
    });
  };
  const get = async <T>(urlPath: string): Promise<T> => JSON.parse(await text(urlPath)) as T;
  return Object.assign(p, { config: file, control, runDir, diskSocket: (vm: string, disk: string) => path.join(runDir, `${vm}-${disk}.sock`), get, text });
}

export interface ReplicatedCluster {
  dir: string;
  resolver: Proc & { url: string };
  nodes: NodeProc[];
  daemon: DaemonProc;
}

/**
 * A resolver service, storage nodes n1 and n2 on unix sockets and `vstore serve` with vm1/disk0 on
 * a 2-replica volume of `size` (plus the `volume` settings given), in a new temp dir `prefix*`.
 */
export async function startReplicatedCluster(prefix: string, volume: Record<string, unknown> = {}, size = '64M'): Promise<ReplicatedCluster> {
  const dir = tempDir(prefix);
  const resolver = await startResolverService(path.join(dir, 'resolver'));
  const nodes = [
    await startStorageNode({ id: 'n1', data: path.join(dir, 'n1'), resolver: resolver.url }),
    await startStorageNode({ id: 'n2', data: path.join(dir, 'n2'), resolver: resolver.url }),
  ];
  const daemon = await startDaemonWith(path.join(dir, 'host'), {
    resolver: { url: resolver.url },
    vms: [{ name: 'vm1', disks: [{ name: 'disk0', volume: { size, replicas: 2, ...volume } }] }],
  });
  return { dir, resolver, nodes, daemon };
}

export function freeTcpPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

export interface EtcdProc extends Proc {
  url: string;
  /** etcd://127.0.0.1:PORT, what vstore takes. */
  vstoreUrl: string;
  dataDir: string;
  /** Starts it again on the same data dir and port (after stop/kill). */
  restart(): Promise<EtcdProc>;
}

/** A real single-member etcd on loopback; ready when /health answers. */
export async function startEtcd(dir: string, ports?: { client: number; peer: number }): Promise<EtcdProc> {
  const client = ports?.client ?? (await freeTcpPort());
  const peer = ports?.peer ?? (await freeTcpPort());
  const dataDir = path.join(dir, 'etcd');
  const url = `http://127.0.0.1:${client}`;
  const p = await spawnProc(
    'etcd',
    [
      '--name', 'default',
      '--data-dir', dataDir,
      '--listen-client-urls', url,
      '--advertise-client-urls', url,
      '--listen-peer-urls', `http://127.0.0.1:${peer}`,
      '--initial-advertise-peer-urls', `http://127.0.0.1:${peer}`,
      '--initial-cluster', `default=http://127.0.0.1:${peer}`,
      '--log-level', 'warn',
    ],
    async () => {
      try {
        const r = await fetch(`${url}/health`, { signal: AbortSignal.timeout(500) });
        return r.ok;
      } catch {
        return false;
      }
    },
  );
  return Object.assign(p, { url, vstoreUrl: `etcd://127.0.0.1:${client}`, dataDir, restart: () => startEtcd(dir, { client, peer }) });
}
