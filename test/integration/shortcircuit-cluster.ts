/**
 * Shared by the short-circuit integration tests (replicated-shortcircuit*.test.ts): a resolver
 * service, two `vstore node` processes on unix sockets (each offers `nbd.sock.sc`) and
 * `vstore serve` with vm1/disk0 on a 2-replica volume; the replicas as `/v1/status` shows them.
 */
import { startReplicatedCluster, type DaemonProc, type ReplicatedCluster } from '../helpers/cluster.js';

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

export type ScCluster = ReplicatedCluster;

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
export function cluster(name: string, volume: Record<string, unknown>, size = '64M'): Promise<ScCluster> {
  return startReplicatedCluster(name, volume, size);
}

export async function stopAll(c: ScCluster): Promise<void> {
  await c.daemon.stop();
  for (const n of c.nodes) await n.stop(false).catch(() => {});
  await c.resolver.stop();
}
