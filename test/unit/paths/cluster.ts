/**
 * A storage node behind paths the test controls, for the multipath integration and e2e tests: a
 * resolver service, a real `vstore node` listening on 127.0.0.1:PORT, one TCP proxy per given
 * loopback host in front of it, the node registered as static node `id` with the proxies' addresses
 * (so the daemon reaches it only through them) and each volume created on the node and pinned there.
 */
import path from 'node:path';
import { RpcClient } from '../../../lib/rpc/index.js';
import { run } from '../../helpers/run.js';
import { freeTcpPort, startDaemonWith, startResolverService, startStorageNode, type DaemonProc } from '../../helpers/cluster.js';
import { startProxy, type Proxy } from './proxy.js';

export interface PathCluster {
  resolverUrl: string;
  proxies: Proxy[];
  /** `vstore serve` with the resolver and `config`; stopped by stop(). */
  daemon(config: Record<string, unknown>): Promise<DaemonProc>;
  /** Stops the daemon (if any), the proxies, the node and the resolver. */
  stop(): Promise<void>;
}

export async function startPathCluster(dir: string, o: { id: string; hosts: string[]; volumes: string[]; size: number }): Promise<PathCluster> {
  const resolver = await startResolverService(path.join(dir, 'resolver'));
  const port = await freeTcpPort();
  const node = await startStorageNode({ id: `${o.id}-backend`, data: path.join(dir, 'node'), resolver: resolver.url, extraListen: [`127.0.0.1:${port}`] });
  const proxies: Proxy[] = [];
  let daemon: DaemonProc | undefined;
  const stop = async (): Promise<void> => {
    if (daemon && !daemon.exited) await daemon.stop(false);
    for (const p of proxies) await p.close();
    await node.stop(false);
    await resolver.stop();
  };
  try {
    const rpc = new RpcClient(`unix:${path.join(dir, 'node', 'control.sock')}`);
    for (const v of o.volumes) await rpc.call('volume.create', { name: v, size: o.size });
    rpc.close();
    for (const host of o.hosts) proxies.push(await startProxy(host, { host: '127.0.0.1', port }));
    const cli = (args: string[]) => run(process.execPath, [path.resolve('bin/vstore.js'), 'resolver', ...args, '--resolver', resolver.url]);
    await cli(['node', 'add', o.id, ...proxies.flatMap((p) => ['--nbd', p.address])]);
    for (const v of o.volumes) await cli(['place', v, '--size', String(o.size), '--on', `${o.id}:${v}`]);
  } catch (e) {
    await stop();
    throw e;
  }
  return {
    resolverUrl: resolver.url,
    proxies,
    async daemon(config) {
      daemon = await startDaemonWith(path.join(dir, 'host'), { resolver: { url: resolver.url }, ...config });
      return daemon;
    },
    stop,
  };
}
