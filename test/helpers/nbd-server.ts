/**
 * Starts an NBD server on one raw image for a test: `vstore nbd` by default; qemu-nbd or nbdkit
 * (the reference peers) when VSTORE_TEST_NBD_SERVER says so, which is how the tests themselves
 * were validated: `VSTORE_TEST_NBD_SERVER=qemu-nbd npx vitest run test/integration`.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll } from 'vitest';
import { tempDir } from './tmp.js';

export type NbdServerKind = 'vstore' | 'qemu-nbd' | 'nbdkit';

/** The one line that chooses the server every integration/e2e test talks to. */
export const DEFAULT_NBD_SERVER: NbdServerKind = (process.env.VSTORE_TEST_NBD_SERVER as NbdServerKind | undefined) ?? 'vstore';

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const VSTORE_BIN = path.join(REPO_ROOT, 'bin/vstore.js');

export interface NbdServerOptions {
  image: string;
  /** Export name; '' (the default) is what `nbd:unix:PATH` and `nbd+unix:///?socket=` reach. */
  exportName?: string;
  readOnly?: boolean;
  /** Socket path; default: a fresh temp dir's nbd.sock. */
  socket?: string;
  kind?: NbdServerKind;
  /** Extra arguments for the server command. */
  extraArgs?: string[];
}

export interface NbdServer {
  kind: NbdServerKind;
  socket: string;
  exportName: string;
  /** libnbd URI: nbd+unix:///NAME?socket=SOCK */
  uri: string;
  /** QEMU's legacy nbd filename: nbd:unix:SOCK[:exportname=NAME] */
  qemuFilename: string;
  /** qemu-io/qemu-img --image-opts string for this export. */
  imageOpts: string;
  child: ChildProcess;
  /** Everything the server wrote to stderr so far. */
  stderr(): string;
  /** SIGTERM, wait for exit; throws unless the server exits with status 0 within 10 s. */
  stop(): Promise<void>;
}

const live = new Set<NbdServer>();
let hooked = false;

export function serverCommand(kind: NbdServerKind, o: NbdServerOptions & { socket: string }): [string, string[]] {
  const name = o.exportName ?? '';
  switch (kind) {
    case 'vstore': {
      const args = [VSTORE_BIN, 'nbd', o.image, '--socket', o.socket];
      if (name) args.push('--export', name);
      if (o.readOnly) args.push('--read-only');
      return [process.execPath, [...args, ...(o.extraArgs ?? [])]];
    }
    case 'qemu-nbd': {
      const args = ['-k', o.socket, '-f', 'raw', '-t', '-e', '64', '--discard=unmap', '--cache=writeback'];
      if (name) args.push('-x', name);
      if (o.readOnly) args.push('-r');
      return ['qemu-nbd', [...args, ...(o.extraArgs ?? []), o.image]];
    }
    case 'nbdkit': {
      const args = ['-f', '-U', o.socket];
      if (name) args.push('-e', name);
      if (o.readOnly) args.push('-r');
      return ['nbdkit', [...args, ...(o.extraArgs ?? []), 'file', path.resolve(o.image)]];
    }
  }
}

export async function startNbdServer(opts: NbdServerOptions): Promise<NbdServer> {
  const kind = opts.kind ?? DEFAULT_NBD_SERVER;
  if (kind === 'vstore' && !existsSync(path.join(REPO_ROOT, 'dist/lib/cli/index.js'))) {
    throw new Error('vstore is not built (dist/lib/cli/index.js missing): run `npm run build` or scripts/setup.sh');
  }
  const socket = opts.socket ?? path.join(tempDir('vstore-nbd-'), 'nbd.sock');
  const exportName = opts.exportName ?? '';
  const [file, args] = serverCommand(kind, { ...opts, socket });
  const child = spawn(file, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  child.stdout!.on('data', (b: Buffer) => (err += b.toString()));
  let exited: { code: number | null; signal: NodeJS.Signals | null } | null = null;
  const exitP = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.on('exit', (code, signal) => {
      exited = { code, signal };
      resolve(exited);
    });
  });
  child.on('error', (e) => (err += `spawn error: ${e.message}\n`));

  // Ready = the socket exists and accepts a connection.
  const deadline = Date.now() + 15_000;
  for (;;) {
    if (exited) throw new Error(`${file} ${args.join(' ')} exited (${JSON.stringify(exited)}) before listening:\n${err}`);
    if (existsSync(socket) && (await canConnect(socket))) break;
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`${file} ${args.join(' ')}: socket ${socket} not accepting after 15 s:\n${err}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }

  const encName = encodeURIComponent(exportName);
  const srv: NbdServer = {
    kind,
    socket,
    exportName,
    uri: `nbd+unix:///${encName}?socket=${socket}`,
    qemuFilename: `nbd:unix:${socket}${exportName ? `:exportname=${exportName}` : ''}`,
    imageOpts: `driver=nbd,server.type=unix,server.path=${socket}${exportName ? `,export=${exportName}` : ''}`,
    child,
    stderr: () => err,
    async stop() {
      live.delete(srv);
      if (!exited) child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
      const res = await exitP;
      clearTimeout(timer);
      if (res.code !== 0) {
        throw new Error(`${kind} server did not exit cleanly on SIGTERM: ${JSON.stringify(res)}\n${err}`);
      }
    },
  };
  live.add(srv);
  if (!hooked) {
    hooked = true;
    // Last resort when the worker exits without running hooks.
    process.once('exit', () => {
      for (const s of live) s.child.kill('SIGKILL');
    });
    // A test that failed before stop(): do not leak the process.
    afterAll(() => {
      for (const s of live) s.child.kill('SIGKILL');
      live.clear();
    });
  }
  return srv;
}

function canConnect(socket: string): Promise<boolean> {
  return new Promise((resolve) => {
    const c = net.connect(socket);
    c.once('connect', () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
}

export interface VstoreDaemon {
  /** TCP port of the shared NBD listener. */
  port: number;
  child: ChildProcess;
  stderr(): string;
  /** SIGTERM; throws unless the daemon exits 0 within 10 s. */
  stop(): Promise<void>;
}

/** A free TCP port on 127.0.0.1 (bound and released; good enough for a test on loopback). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

/**
 * Starts `vstore serve -c CONFIG` (the daemon) with a TCP listener on 127.0.0.1 that shares all
 * disks as exports named VM/DISK; `config` is the daemon config without `tcp`/`runDir`.
 */
export async function startVstoreDaemon(config: Record<string, unknown>): Promise<VstoreDaemon> {
  if (!existsSync(path.join(REPO_ROOT, 'dist/lib/cli/index.js'))) {
    throw new Error('vstore is not built (dist/lib/cli/index.js missing): run `npm run build` or scripts/setup.sh');
  }
  const dir = tempDir('vstore-daemon-');
  const port = await freePort();
  const cfgFile = path.join(dir, 'config.json');
  const { writeFileSync } = await import('node:fs');
  writeFileSync(cfgFile, JSON.stringify({ runDir: path.join(dir, 'run'), control: path.join(dir, 'control.sock'), ...config, tcp: { host: '127.0.0.1', port } }));
  const child = spawn(process.execPath, [VSTORE_BIN, 'serve', '-c', cfgFile, '--log-level', 'warn'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  child.stdout!.on('data', (b: Buffer) => (err += b.toString()));
  let exited: { code: number | null; signal: NodeJS.Signals | null } | null = null;
  const exitP = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.on('exit', (code, signal) => resolve((exited = { code, signal }))),
  );
  const deadline = Date.now() + 15_000;
  for (;;) {
    if (exited) throw new Error(`vstore serve exited (${JSON.stringify(exited)}) before listening:\n${err}`);
    // Ready: the TCP listener accepts and every disk's unix socket exists (the daemon may open
    // its listener before it has added every disk).
    const sockets = diskSockets(config, path.join(dir, 'run'));
    if (sockets.every((s) => existsSync(s)) && (await canConnectTcp(port))) break;
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`vstore serve: 127.0.0.1:${port} not accepting after 15 s:\n${err}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  const d: VstoreDaemon = {
    port,
    child,
    stderr: () => err,
    async stop() {
      if (!exited) child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
      const res = await exitP;
      clearTimeout(timer);
      if (res.code !== 0) throw new Error(`vstore serve did not exit cleanly on SIGTERM: ${JSON.stringify(res)}\n${err}`);
    },
  };
  const kill = () => {
    if (!exited) child.kill('SIGKILL');
  };
  afterAll(kill);
  process.once('exit', kill);
  return d;
}

function diskSockets(config: Record<string, unknown>, runDir: string): string[] {
  const vms = (config.vms ?? []) as Array<{ name: string; disks?: Array<{ name: string; nbd?: { socket?: string } }> }>;
  return vms.flatMap((vm) => (vm.disks ?? []).map((d) => d.nbd?.socket ?? path.join(runDir, `${vm.name}-${d.name}.sock`)));
}

function canConnectTcp(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const c = net.connect(port, '127.0.0.1');
    c.once('connect', () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
}
