/**
 * Shared by the short-circuit integration tests (replicated-shortcircuit*.test.ts): a resolver
 * service, two `vstore node` processes on unix sockets (each offers `nbd.sock.sc`) and
 * `vstore serve` with vm1/disk0 on a 2-replica volume; the replicas as `/v1/status` shows them.
 */
import path from 'node:path';
import { tempDir } from '../helpers/index.js';
import { startDaemonWith, startResolverService, startStorageNode, type DaemonProc, type NodeProc } from '../helpers/cluster.js';

export interface ReplicaView {
  id: string;
  state: string;
  up: boolean;
  dirtyBytes: number;
  shortCircuit?: { active: boolean; reads: number; grants: number; writes?: number; writable?: boolean };
}
interface StatusView {
  vms: Array<{ name: string; disks: Array<{ name: string; replication?: { replicas: ReplicaView[] } }> }>;
}

export interface ScCluster {
  dir: string;
  resolver: { url: string; stop(): Promise<unknown> };
  nodes: NodeProc[];
  daemon: DaemonProc;
}

export async function replicas(d: DaemonProc): Promise<ReplicaView[]> {
  const s = await d.get<StatusView>('/v1/status');
  return s.vms.find((v) => v.name === 'vm1')!.disks.find((x) => x.name === 'disk0')!.replication!.replicas;
}

export async function until(what: string, cond: () => Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

export const uri = (sock: string): string => `nbd+unix:///?socket=${sock}`;

/** The cluster with vm1/disk0 of `size` and the extra volume settings. */
export async function cluster(name: string, volume: Record<string, unknown>, size = '64M'): Promise<ScCluster> {
  const dir = tempDir(name);
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

export async function stopAll(c: ScCluster): Promise<void> {
  await c.daemon.stop();
  for (const n of c.nodes) await n.stop(false).catch(() => {});
  await c.resolver.stop();
}
