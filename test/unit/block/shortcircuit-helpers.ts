/**
 * Shared by the short-circuit unit tests (reads: shortcircuit.test.ts, writes:
 * shortcircuit-writes.test.ts): a real StorageNode on a unix socket, RemoteVolumes over it, and
 * the teardown list both files run after each test.
 */
import path from 'node:path';
import { afterEach } from 'vitest';
import { RemoteVolume } from '../../../lib/block/remote.js';
import { silentLogger } from '../../../lib/log.js';
import { StorageNode } from '../../../lib/node/node.js';
import { tempDir } from '../../helpers/index.js';

export const MiB = 1024 * 1024;

/** Run (last first) after each test of the file that imports this. */
export const cleanup: Array<() => Promise<unknown> | unknown> = [];
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});

export interface TestNode {
  node: StorageNode;
  sock: string;
  dir: string;
  /** The volume's file on the node. */
  file(volume: string): string;
}

export async function node(name = 'n1', opts: { shortCircuit?: boolean } = {}): Promise<TestNode> {
  const dir = tempDir('vst-sc-unit-');
  const sock = path.join(dir, 'nbd.sock');
  const n = await StorageNode.start({ id: name, data: path.join(dir, 'data'), nbd: [`unix:${sock}`], control: [], logger: silentLogger(), ...opts });
  cleanup.push(() => n.stop());
  return { node: n, sock, dir, file: (v) => path.join(dir, 'data', 'volumes', `${v}.img`) };
}

export async function remote(sock: string, vol: string, opts: { shortCircuit?: boolean; shortCircuitWrites?: boolean; id?: string } = {}): Promise<RemoteVolume> {
  const v = await RemoteVolume.open({ id: opts.id ?? 'n1', addresses: [`unix:${sock}`], export: vol, logger: silentLogger(), reconnect: { initialMs: 20, maxMs: 100 }, ...opts });
  cleanup.push(() => v.close());
  return v;
}

export async function until(what: string, cond: () => boolean, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}
