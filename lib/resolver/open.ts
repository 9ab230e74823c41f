/**
 * `openResolver(url)`: the store a resolver URL names.
 *   etcd://HOST:PORT[,HOST:PORT...][/PREFIX/]   EtcdStore (etcd 3.4 JSON gateway)
 *   file:PATH                                     EmbeddedStore in this process (PATH is its JSON file)
 *   unix:/PATH, /PATH.sock, HOST:PORT, vstore://HOST:PORT
 *                                                 RemoteResolver (a `vstore resolver serve` or a daemon's resolver socket)
 */
import type { Logger } from '../log.js';
import { parseAddress } from '../net/address.js';
import { EmbeddedStore } from './embedded.js';
import { EtcdStore } from './etcd.js';
import { RemoteResolver } from './service.js';
import { ResolverError, type ResolverStore } from './types.js';

export interface OpenResolverOptions {
  logger: Logger;
  /** Timeout of one request (etcd, remote service), ms. */
  timeoutMs?: number;
}

const USAGE = 'expected etcd://HOST:PORT[,HOST:PORT...], file:PATH, unix:/PATH, /PATH.sock, HOST:PORT or vstore://HOST:PORT';

export async function openResolver(url: string, opts: OpenResolverOptions): Promise<ResolverStore> {
  if (typeof url !== 'string' || !url.trim()) throw new ResolverError('EINVAL', `no resolver URL (${USAGE})`);
  const u = url.trim();
  if (u.startsWith('etcd://')) {
    return EtcdStore.fromUrl(u, { logger: opts.logger, ...(opts.timeoutMs ? { timeoutMs: opts.timeoutMs } : {}) });
  }
  if (u.startsWith('file:')) {
    const p = u.slice(5).replace(/^\/\/(?=\/)/, '');
    if (!p) throw new ResolverError('EINVAL', `resolver "${url}": empty file path`);
    return EmbeddedStore.open(p, { logger: opts.logger });
  }
  const remote = (addr: string): RemoteResolver => {
    try {
      parseAddress(addr, 'resolver');
    } catch (e) {
      throw new ResolverError('EINVAL', `resolver "${url}": ${(e as Error).message} (${USAGE})`);
    }
    return new RemoteResolver(addr, opts.timeoutMs ? { timeoutMs: opts.timeoutMs } : {});
  };
  if (u.startsWith('vstore://')) return remote(u.slice('vstore://'.length));
  if (u.startsWith('unix:') || u.startsWith('/')) return remote(u);
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(u)) throw new ResolverError('EINVAL', `resolver "${url}": unknown scheme (${USAGE})`);
  if (/^(\[[^\]]+\]|[^:/]*):\d+$/.test(u)) return remote(u);
  throw new ResolverError('EINVAL', `resolver "${url}": not a resolver address (${USAGE})`);
}
