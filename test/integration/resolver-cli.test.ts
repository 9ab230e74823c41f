/**
 * `vstore resolver ...` end to end: the service in the foreground, a static node (a real nbdkit)
 * registered by hand, a placement pinned to it, and what show / names / nodes print. Runs the
 * command from dist/ (build first: npx tsc -p tsconfig.json).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { requireCommands, run, tempDir, type RunResult } from '../helpers/index.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const ENTRY = path.join(ROOT, 'dist/lib/cli/resolver.js');
const SCRIPT = `import {resolverCommand} from ${JSON.stringify(ENTRY)}; await resolverCommand().parseAsync(process.argv.slice(1), {from:"user"})`;

function vstoreResolver(args: string[], opts: { check?: boolean; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  const env: NodeJS.ProcessEnv = { ...process.env, ...opts.env };
  delete env.VSTORE_RESOLVER;
  if (opts.env?.VSTORE_RESOLVER) env.VSTORE_RESOLVER = opts.env.VSTORE_RESOLVER;
  return run('node', ['--input-type=module', '-e', SCRIPT, '--', ...args], { timeoutMs: 20_000, check: opts.check ?? true, env });
}

let dir: string;
let server: ChildProcess | null = null;
let nbdkit: ChildProcess | null = null;
let serverOut = '';
let serverErr = '';
let sock: string;
let tcp: string;
let nbdSock: string;

async function startServer(): Promise<void> {
  serverOut = '';
  serverErr = '';
  const p = spawn('node', ['--input-type=module', '-e', SCRIPT, '--', 'serve', '--store', path.join(dir, 'store.json'), '--listen', `unix:${sock}`, '--listen', '127.0.0.1:0'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  server = p;
  p.stderr!.on('data', (b) => (serverErr += b));
  await new Promise<void>((resolve, reject) => {
    p.stdout!.on('data', (b) => {
      serverOut += b;
      const m = /on (127\.0\.0\.1:\d+)$/m.exec(serverOut);
      if (m && serverOut.includes(`on unix:${sock}`)) {
        tcp = m[1]!;
        resolve();
      }
    });
    p.once('exit', (code) => reject(new Error(`resolver serve exited ${code}: ${serverErr}`)));
  });
}

async function stopServer(): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  const p = server!;
  server = null;
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => p.once('exit', (code, signal) => r({ code, signal })));
  p.kill('SIGTERM');
  return exited;
}

beforeAll(async () => {
  requireCommands('nbdkit', 'nbdinfo');
  if (!existsSync(ENTRY)) throw new Error(`${ENTRY} missing: build first (npx tsc -p tsconfig.json)`);
  dir = tempDir('vstore-rcli-');
  sock = path.join(dir, 'resolver.sock');
  nbdSock = path.join(dir, 'nbdkit.sock');
  nbdkit = spawn('nbdkit', ['--foreground', '--exit-with-parent', '--unix', nbdSock, 'memory', '64M'], { stdio: 'ignore' });
  for (let i = 0; i < 100 && !existsSync(nbdSock); i++) await new Promise((r) => setTimeout(r, 50));
  if (!existsSync(nbdSock)) throw new Error('nbdkit did not start');
  await startServer();
});

afterAll(async () => {
  if (server) await stopServer();
  nbdkit?.kill('SIGTERM');
});

describe('vstore resolver', () => {
  it('serve, node add, place, show, names, nodes --json, node remove; the store outlives the service', async () => {
    const R = ['--resolver', `unix:${sock}`];
    const add = await vstoreResolver(['node', 'add', 'nbdkit1', '--nbd', `unix:${nbdSock}`, '--capacity', '64M', '--zone', 'rack1', ...R]);
    expect(add.stdout).toContain('static node nbdkit1 registered');

    const placed = await vstoreResolver(['place', 'vm1/disk0', '--size', '64M', '--on', 'nbdkit1:mem', ...R]);
    expect(placed.stdout).toBe('vstore: vm1/disk0 placed on nbdkit1:mem (version 1)\n');
    const again = await vstoreResolver(['place', 'vm1/disk0', '--size', '64M', '--on', 'nbdkit1:mem', ...R, '--json']);
    const againJson = JSON.parse(again.stdout) as { created: boolean; record: { size: number; version: number } };
    expect(againJson.created).toBe(false);
    expect(againJson.record).toMatchObject({ size: 64 * 1024 * 1024, version: 1 });

    // show: where the name lives, and the URI reaches the real NBD server
    const show = JSON.parse((await vstoreResolver(['show', 'vm1/disk0', ...R, '--json'])).stdout) as {
      record: { name: string };
      replicas: { node: string; export: string; state: string; alive: boolean; nbd: string[]; uris: string[] }[];
    };
    expect(show.record.name).toBe('vm1/disk0');
    expect(show.replicas).toEqual([
      { node: 'nbdkit1', export: 'mem', state: 'in-sync', alive: true, nbd: [`unix:${nbdSock}`], uris: [`nbd+unix:///mem?socket=${nbdSock}`] },
    ]);
    const info = await run('nbdinfo', ['--size', show.replicas[0]!.uris[0]!], { timeoutMs: 20_000 });
    expect(info.stdout.trim()).toBe(String(64 * 1024 * 1024));
    const showText = (await vstoreResolver(['show', 'vm1/disk0', ...R])).stdout;
    expect(showText).toMatch(/^vm1\/disk0: volume, 64M \(67108864 bytes\), 1 replica\(s\), version 1/);
    expect(showText).toMatch(/nbdkit1\s+in-sync\s+yes\s+"mem"\s+nbd\+unix:/);

    // the same service over TCP, and through $VSTORE_RESOLVER
    await vstoreResolver(['place', '/projects/alpha', '--kind', 'directory', '--on', 'nbdkit1', '--resolver', tcp]);
    const names = JSON.parse((await vstoreResolver(['names', '--json'], { env: { VSTORE_RESOLVER: tcp } })).stdout) as { name: string; kind: string }[];
    expect(names.map((n) => [n.name, n.kind])).toEqual([
      ['/projects/alpha', 'directory'],
      ['vm1/disk0', 'volume'],
    ]);
    expect(JSON.parse((await vstoreResolver(['names', '--prefix', 'vm1/', '--json', ...R])).stdout)).toHaveLength(1);
    const namesText = (await vstoreResolver(['names', ...R])).stdout.split('\n');
    expect(namesText[0]).toMatch(/^NAME\s+KIND\s+SIZE\s+REPLICAS\s+VERSION\s+NODES$/);
    expect(namesText[2]).toMatch(/^vm1\/disk0\s+volume\s+64M\s+1\s+1\s+nbdkit1$/);

    const nodes = JSON.parse((await vstoreResolver(['nodes', '--json', ...R])).stdout) as Record<string, unknown>[];
    expect(nodes).toEqual([
      { id: 'nbdkit1', nbd: [`unix:${nbdSock}`], control: [], capacity: 64 * 1024 * 1024, free: 64 * 1024 * 1024, zone: 'rack1', static: true, alive: true, seen: expect.any(Number) },
    ]);
    const nodesText = (await vstoreResolver(['nodes', ...R])).stdout;
    expect(nodesText).toMatch(/^ID\s+ALIVE\s+KIND\s+ZONE\s+CAPACITY\s+FREE\s+SEEN\s+NBD\n/);
    expect(nodesText).toContain(`nbdkit1  yes    static  rack1  64M       64M   -     unix:${nbdSock}`);

    // errors: a clear message and exit status 1
    const nospace = await vstoreResolver(['place', 'vm1/disk1', '--size', '1G', ...R], { check: false });
    expect(nospace.code).toBe(1);
    expect(nospace.stderr).toContain('need 1 live node(s) with 1073741824 bytes free, found 0');
    const missing = await vstoreResolver(['show', 'vm1/nope', ...R], { check: false });
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain('vm1/nope: no such name');
    const badSize = await vstoreResolver(['place', 'vm1/disk1', '--size', '12Q', ...R], { check: false });
    expect(badSize.code).toBe(1);
    expect(badSize.stderr).toContain('--size: not a size: "12Q"');
    const noResolver = await vstoreResolver(['nodes'], { check: false });
    expect(noResolver.code).toBe(1);
    expect(noResolver.stderr).toContain("required option '--resolver <url>' not specified");
    const down = await vstoreResolver(['nodes', '--resolver', `unix:${path.join(dir, 'nobody.sock')}`], { check: false });
    expect(down.code).toBe(1);
    expect(down.stderr).toContain('unreachable');

    // SIGTERM: exits 0; the store file keeps everything; a new service serves it
    expect(await stopServer()).toEqual({ code: 0, signal: null });
    expect(serverErr).toContain('"msg":"exiting 0"');
    const offline = JSON.parse((await vstoreResolver(['names', '--json', '--resolver', `file:${path.join(dir, 'store.json')}`])).stdout) as unknown[];
    expect(offline).toHaveLength(2);
    await startServer();
    expect(JSON.parse((await vstoreResolver(['show', 'vm1/disk0', ...R, '--json'])).stdout).replicas[0].alive).toBe(true);
    await vstoreResolver(['node', 'remove', 'nbdkit1', ...R]);
    expect(JSON.parse((await vstoreResolver(['nodes', '--json', ...R])).stdout)).toEqual([]);
    const orphan = (await vstoreResolver(['show', 'vm1/disk0', ...R])).stdout;
    expect(orphan).toContain('unknown node');
  });

  it('has help with examples for every subcommand', async () => {
    for (const sub of [[], ['serve'], ['nodes'], ['names'], ['show'], ['node', 'add'], ['node', 'remove'], ['place']]) {
      const h = await vstoreResolver([...sub, '--help']);
      expect(h.stdout).toContain('Examples:');
    }
  });
});
