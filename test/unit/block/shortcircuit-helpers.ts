/**
 * Shared by the short-circuit unit tests (reads: shortcircuit.test.ts, writes:
 * shortcircuit-writes.test.ts): a real StorageNode on a unix socket, RemoteVolumes over it, and
 * the teardown list both files run after each test.
 */
import path from 'node:path';
import { afterEach } from 'vitest';
import { DirtyRegionLog } from '../../../lib/block/drl.js';
import { RemoteVolume } from '../../../lib/block/remote.js';
import { ReplicatedVolume, type ReplicaState } from '../../../lib/block/replicated.js';
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

/**
 * Two nodes n1, n2 with a 4 MiB volume `v` each, a RemoteVolume on each and a ReplicatedVolume
 * over both; `persisted` records every persistStates call.
 */
export async function replicatedPair(resyncRetryMs: number): Promise<{
  a: TestNode; b: TestNode; ra: RemoteVolume; rb: RemoteVolume; drl: DirtyRegionLog; rep: ReplicatedVolume; persisted: Record<string, ReplicaState>[];
}> {
  const a = await node('n1');
  const b = await node('n2');
  await a.node.createVolume('v', 4 * MiB);
  await b.node.createVolume('v', 4 * MiB);
  const ra = await remote(a.sock, 'v', { id: 'n1' });
  const rb = await remote(b.sock, 'v', { id: 'n2' });
  const drl = await DirtyRegionLog.open(path.join(tempDir('vst-sc-drl-'), 'v.drl'), { size: 4 * MiB, replicaIds: ['n1', 'n2'] });
  const persisted: Record<string, ReplicaState>[] = [];
  const rep = new ReplicatedVolume({
    name: 'v', replicas: [ra, rb], drl, persistStates: async (st) => void persisted.push({ ...st }), logger: silentLogger(), resyncRetryMs, waitMs: 5000,
  });
  cleanup.push(() => rep.close());
  return { a, b, ra, rb, drl, rep, persisted };
}
