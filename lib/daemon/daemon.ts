/**
 * The host daemon: one process serving every VM's disks. It builds the graph — registry, the
 * shared TCP NBD server when configured, the control API — from a resolved config and injected
 * factories, starts it — every configured disk, then the TCP listener, then the control socket,
 * so that neither listener accepts before every disk is there — and takes it down in order on
 * stop() (which, during startup, ends startup at the next step and takes down what was started):
 *   stop accepting (control socket, then every NBD and vhost-user listener) -> drain in-flight requests ->
 *   flush every disk -> remove sockets.
 * Signals are the caller's business (lib/cli/serve.ts): the daemon is a plain object.
 */
import { mkdir, readFile } from 'node:fs/promises';
import { FileVolume } from '../block/file.js';
import { balloonOf, CacheHost, cacheHostId, checkDirtyHost, claimWriter } from '../block/cache/host.js';
import { ConfigError, type DaemonConfig, type DiskConfig } from '../config/schema.js';
import type { Logger } from '../log.js';
import type { NbdTlsOptions } from '../nbd/api.js';
import { StorageNode } from '../node/node.js';
import { QosScheduler } from '../qos/scheduler.js';
import { DEFAULT_HOST_QOS } from '../qos/settings.js';
import { EmbeddedStore } from '../resolver/embedded.js';
import { openResolver } from '../resolver/open.js';
import { ResolverService } from '../resolver/service.js';
import type { ResolverStore } from '../resolver/types.js';
import { ControlServer, type DaemonStatus } from './control.js';
import { RemoteDisks } from './remote.js';
import { PathTable } from '../paths/node-paths.js';
import { DEFAULT_PATH_POLICY } from '../paths/policy.js';
import { HandoffError, HandoffServer, handoffSocketPath, takeOver } from './handoff.js';
import { shareSource, type AdoptedShare, type ShareDeps, type ShareServerFactory } from './virtiofs.js';
import { native } from '../native/index.js';
import { closeQuietly } from '../vhost/channel.js';
import { RegistryError, VmRegistry, type NbdServerFactory, type NbdServerLike, type VhostServerFactory, type VolumeOpener } from './registry.js';

export interface DaemonDeps {
  logger: Logger;
  createServer: NbdServerFactory;
  /** vhost-user-blk servers (lib/daemon/vhost.ts); without it, disks with vhostUser are refused. */
  createVhostServer?: VhostServerFactory;
  /**
   * virtiofs servers of shares (lib/daemon/virtiofs.ts's shareServerFactory), built once the
   * resolver is up; without it, VMs with shares are refused.
   */
  shareServers?: (deps: ShareDeps) => ShareServerFactory;
  /** Default: FileVolume over the disk's file (created sparse when `size` is set and it is missing). */
  openVolume?: VolumeOpener;
  version?: string;
  /** Directory the config's relative paths were resolved against (control requests use it too). */
  baseDir?: string;
  /**
   * `vstore serve --takeover`: take the virtiofs shares of the daemon running on this config
   * (live, over its handoff socket: lib/daemon/handoff.ts) before starting anything else, and
   * the rest once it has stopped.
   */
  takeover?: boolean;
}

export const openFileVolume: VolumeOpener = (d: DiskConfig) =>
  FileVolume.open(d.file!, { readOnly: d.readOnly, direct: d.direct, ...(d.size !== undefined ? { create: { size: d.size } } : {}) });

export class Daemon {
  private readonly logger: Logger;
  private readonly startedAt = Date.now();
  private registry: VmRegistry | undefined;
  private remote: RemoteDisks | undefined;
  private tcpServer: NbdServerLike | undefined;
  private control: ControlServer | undefined;
  /** The host-wide QoS scheduler (absent with qos.enabled: false). */
  private qos: QosScheduler | undefined;
  private resolver: ResolverStore | undefined;
  /** The host's cache device (config `cache`). */
  private cacheHost: CacheHost | undefined;
  private resolverService: ResolverService | undefined;
  private readonly nodes: StorageNode[] = [];
  private stopping: Promise<void> | undefined;
  /** Settles (never rejects) once start()'s steps have ended, however they ended. */
  private startup: Promise<void> | undefined;
  private shareFactory: ShareServerFactory | undefined;
  /** Shares taken over from the previous daemon, by `vm\0tag`, until the registry adopts them. */
  private readonly adopted = new Map<string, AdoptedShare>();
  private handoff: HandoffServer | undefined;
  private handedOffResolve!: () => void;
  /** Resolves when this daemon has handed its shares to a new one and stopped (the process then exits 0). */
  readonly handedOff: Promise<void> = new Promise((resolve) => (this.handedOffResolve = resolve));

  constructor(
    readonly config: DaemonConfig,
    private readonly deps: DaemonDeps,
  ) {
    this.logger = deps.logger;
  }

  /**
   * Serves every configured VM, then opens the shared TCP listener and the control socket — in
   * that order, so that whoever connects to either sees every configured disk (the control
   * socket's presence means "ready"). Resolves true when ready; false when stop() was called
   * before the daemon was ready (then everything started is already taken down again: a signal
   * during startup is a normal stop, not a failure). Throws, after taking down what was
   * started, when startup itself fails.
   */
  async start(): Promise<boolean> {
    if (this.startup) throw new Error('the daemon was already started');
    const steps = this.startSteps();
    // stop() waits for this: it never tears down while a step is still creating something.
    this.startup = steps.catch(() => {});
    try {
      await steps;
    } catch (e) {
      await this.stop();
      if (e instanceof StartAborted) return false;
      throw e;
    }
    if (this.stopping) {
      await this.stopping;
      return false;
    }
    const tcp = this.tcpAddresses();
    this.logger.info({ control: this.config.control, ...(tcp.length ? { tcp } : {}), vms: this.config.vms.length }, 'daemon ready');
    return true;
  }

  /** The startup steps; between any two, a stop() request ends them (StartAborted). */
  private async startSteps(): Promise<void> {
    const { config, logger } = this;
    const checkStop = (): void => {
      if (this.stopping) throw new StartAborted();
    };
    checkStop();
    await mkdir(this.config.runDir, { recursive: true, mode: 0o755 });
    checkStop();
    if (config.tcp) {
      const tls = config.tls ? await readTls(config.tls) : undefined;
      checkStop();
      this.tcpServer = this.deps.createServer({ logger: logger.child({ listener: 'tcp' }), ...(tls ? { tls } : {}) });
    }
    await this.startStorage(checkStop);
    this.shareFactory = this.deps.shareServers?.({ logger: logger.child({ component: 'shares' }), ...(this.resolver ? { resolver: this.resolver } : {}), nodesCache: new Map() });
    if (this.deps.takeover) await this.takeOverShares();
    checkStop();
    const paths = new PathTable(config.paths ?? DEFAULT_PATH_POLICY, logger.child({ component: 'paths' }));
    const remote = this.resolver ? new RemoteDisks({ resolver: this.resolver, stateDir: config.stateDir, logger: logger.child({ component: 'remote' }), paths }) : undefined;
    this.remote = remote;
    const openFile = this.deps.openVolume ?? openFileVolume;
    if (config.cache) {
      try {
        this.cacheHost = await CacheHost.open(config.cache, logger.child({ component: 'cache' }), this.resolver);
      } catch (e) {
        throw new ConfigError([`cache.device: cannot open ${config.cache.device}: ${(e as Error).message}`]);
      }
      checkStop();
    }
    const resolver = this.resolver;
    const hostQos = config.qos ?? DEFAULT_HOST_QOS;
    if (hostQos.enabled) {
      this.qos = new QosScheduler({ depth: hostQos.depth, costUnit: hostQos.costUnit, adviseAfterSeconds: hostQos.adviseAfterSeconds, logger: logger.child({ component: 'qos' }) });
      this.qos.start();
    }
    const registry = new VmRegistry({
      ...(this.qos ? { qos: this.qos } : {}),
      logger,
      createServer: this.deps.createServer,
      openVolume: async (d, vm) => {
        if (!d.volume) return openFile(d);
        if (!remote) throw new RegistryError(400, 'volume: this daemon has no resolver (top-level resolver in its config)');
        // Another host's dirty write-back cache for this volume: refuse to open it writable.
        if (resolver && !d.readOnly) {
          try {
            await checkDirtyHost(resolver, d.volume.name, cacheHostId(config.cache));
          } catch (e) {
            throw new RegistryError(409, (e as Error).message.replace(/^EBUSY: /, ''));
          }
        }
        const opened = await remote.open(d, vm);
        if (resolver) {
          // Who wrote the volume last: this host's cache drops what it holds of the volume when
          // another host has opened it writable since (lastWriter in the record). A writable open
          // claims the record for this host. Unreachable resolver: served as before, with a warning.
          const self = cacheHostId(config.cache);
          const name = d.volume.name;
          try {
            const prev = d.readOnly ? (await resolver.getName(name))?.lastWriter : await claimWriter(resolver, name, self);
            if (prev !== undefined && prev !== self) this.cacheHost?.markForeignWrites(name);
          } catch (e) {
            logger.warn({ volume: name, err: (e as Error).message }, 'resolver: could not record this host as the volume\'s last writer');
          }
        }
        return opened;
      },
      ...(this.deps.createVhostServer ? { createVhostServer: this.deps.createVhostServer } : {}),
      ...(this.shareFactory ? { createShareServer: this.adoptingFactory(this.shareFactory) } : {}),
      ...(this.tcpServer ? { tcpServer: this.tcpServer } : {}),
      ...(this.cacheHost ? { cache: this.cacheHost } : {}),
    });
    this.registry = registry;
    for (const [i, vm] of config.vms.entries()) {
      checkStop();
      try {
        await registry.addVm(vm);
      } catch (e) {
        // Name the config field: the registry speaks relative to the VM object.
        if (e instanceof RegistryError) {
          throw new ConfigError([e.message.startsWith('disks[') ? `vms[${i}].${e.message}` : `vms[${i}]: ${e.message}`]);
        }
        throw e;
      }
    }
    // Only now that every configured disk is exported: a client listing the exports right
    // after the port opens must see all of them.
    checkStop();
    if (this.tcpServer && config.tcp) {
      const { host, port } = config.tcp;
      try {
        await this.tcpServer.listen({ tcp: config.tcp });
      } catch (e) {
        throw new ConfigError([`tcp: cannot listen on ${formatHostPort(host, port)}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`]);
      }
      logger.info({ addresses: this.tcpAddresses(), tls: config.tls?.mode ?? 'off' }, 'TCP listener up (exports VM/DISK)');
    }
    checkStop();
    this.control = new ControlServer({
      logger: logger.child({ component: 'control' }),
      registry,
      resolve: { baseDir: this.deps.baseDir ?? process.cwd(), runDir: config.runDir },
      status: () => this.status(),
      ...(this.cacheHost ? { cache: this.cacheHost } : {}),
      ...(remote ? { failback: (node?: string) => remote.paths.failback(node) } : {}),
    });
    await this.control.listen(config.control);
    // Whatever was taken over and is not in a VM of the config (cannot happen: checked at adopt).
    for (const a of this.adopted.values()) await a.close().catch(() => {});
    this.adopted.clear();
    if (this.shareFactory?.adopt) {
      this.handoff = await HandoffServer.listen({
        path: handoffSocketPath(config.control),
        logger: logger.child({ component: 'handoff' }),
        source: {
          withShares: (fn) => registry.handOverShares(fn),
          stop: () => this.stop(),
        },
      });
      void this.handoff.done.then(() => this.handedOffResolve());
    }
  }

  /**
   * --takeover: the running daemon's shares, live. Only shares whose tree this process can open
   * while the other still runs: a local directory, or a directory on a storage node through a
   * resolver that is not embedded in the daemon (the embedded resolver and storage nodes are the
   * running daemon's until it stops).
   */
  private async takeOverShares(): Promise<void> {
    const { config, logger } = this;
    if (config.resolver?.store || config.nodes.length > 0) {
      throw new ConfigError(['--takeover: the config embeds a resolver or storage nodes (resolver.store, nodes): those cannot run in two daemons at once; use an external resolver (resolver.url)']);
    }
    const factory = this.shareFactory;
    if (!factory?.adopt) throw new ConfigError(['--takeover: this daemon cannot serve shares']);
    const adopt = factory.adopt;
    const list = await takeOver({
      path: handoffSocketPath(config.control),
      logger: logger.child({ component: 'handoff' }),
      adopt: async (st, fds) => {
        const vm = config.vms.find((v) => v.name === st.vm);
        const sh = vm?.shares?.find((x) => x.tag === st.tag);
        const why = !sh
          ? `share ${st.vm}/${st.tag} of the running daemon is not in this config`
          : sh.socket !== st.socket
            ? `share ${st.vm}/${st.tag}: socket ${sh.socket} here, ${st.socket} in the running daemon`
            : shareSource(sh) !== st.source
              ? `share ${st.vm}/${st.tag}: ${shareSource(sh)} here, ${st.source} in the running daemon`
              : undefined;
        if (why || !sh) {
          const n = native();
          for (const f of fds) closeQuietly(n, f);
          throw new HandoffError(why ?? 'no such share');
        }
        const a = await adopt(st.vm, sh, st, fds);
        this.adopted.set(`${st.vm}\0${st.tag}`, a);
        return a;
      },
    }).catch((e: unknown) => {
      this.adopted.clear();
      throw e instanceof HandoffError ? new ConfigError([e.message]) : e;
    });
    logger.info({ shares: list.map((a) => `${a.config.tag}`) }, 'takeover: shares served; starting the rest');
  }

  /** The registry's share factory: a share taken over is served as it is, the others are created. */
  private adoptingFactory(f: ShareServerFactory): ShareServerFactory {
    return async (vm, s, opts) => {
      const key = `${vm}\0${s.tag}`;
      const a = this.adopted.get(key);
      if (a) {
        this.adopted.delete(key);
        // Served since the takeover without QoS: from now on through the VM's flow.
        if (opts?.flow) a.bindQos?.(opts.flow);
        return a;
      }
      return f(vm, s, opts);
    };
  }

  /**
   * The resolver (embedded — served to nodes and other daemons when it has listen addresses — or
   * external), then the embedded storage nodes, which register in it. Before any disk: a disk
   * with a volume is placed through the resolver on those nodes.
   */
  private async startStorage(checkStop: () => void): Promise<void> {
    const { config, logger } = this;
    const r = config.resolver;
    if (!r) return;
    const rlog = logger.child({ component: 'resolver' });
    try {
      if (r.store) {
        const store = await EmbeddedStore.open(r.store, { logger: rlog });
        this.resolver = store;
        if (r.listen.length) {
          this.resolverService = await ResolverService.start({ store, listen: r.listen, logger: rlog });
          rlog.info({ listen: r.listen, store: r.store }, 'embedded resolver serving');
        }
      } else {
        this.resolver = await openResolver(r.url!, { logger: rlog });
      }
    } catch (e) {
      throw new ConfigError([`resolver: ${(e as Error).message}`]);
    }
    for (const [i, n] of config.nodes.entries()) {
      checkStop();
      try {
        this.nodes.push(
          await StorageNode.start({
            id: n.id,
            data: n.data,
            nbd: n.listen,
            control: n.control,
            ...(n.zone !== undefined ? { zone: n.zone } : {}),
            resolver: this.resolver,
            logger: logger.child({ node: n.id }),
          }),
        );
      } catch (e) {
        throw new ConfigError([`nodes[${i}]: ${(e as Error).message}`]);
      }
    }
  }

  /**
   * The addresses the shared TCP listener is bound to (with port 0 in the config, the port the
   * system chose); the configured one for a server that does not tell; none before it listens.
   */
  tcpAddresses(): Array<{ host: string; port: number }> {
    if (!this.tcpServer || !this.config.tcp) return [];
    const bound = this.tcpServer.addresses;
    if (bound === undefined) return [this.config.tcp];
    return bound.flatMap((a) => ('tcp' in a ? [a.tcp] : []));
  }

  status(): DaemonStatus {
    return {
      pid: process.pid,
      version: this.deps.version ?? '0.0.0',
      startedAt: new Date(this.startedAt).toISOString(),
      uptimeSeconds: Math.round((Date.now() - this.startedAt) / 1000),
      control: this.config.control,
      ...tcpStatus(this.tcpAddresses()),
      vms: this.registry?.status() ?? [],
      ...(this.remote ? { paths: this.remote.paths.status() } : {}),
      ...(this.qos ? { qos: this.qos.status() } : {}),
      ...(this.cacheHost ? { cache: { device: this.config.cache!.device, host: this.cacheHost.hostId, ...this.cacheHost.device.deviceStats(), ...balloonOf(this.cacheHost) } } : {}),
    };
  }

  /** Orderly shutdown; idempotent (a second call returns the same promise). */
  stop(): Promise<void> {
    this.stopping ??= this.doStop();
    return this.stopping;
  }

  private async doStop(): Promise<void> {
    const log = this.logger;
    if (this.startup) {
      // A stop during startup: let the step under way finish (the next one sees the request),
      // then take down whatever was started.
      await this.startup;
    }
    await this.handoff?.close().catch((e: unknown) => log.error({ err: e }, 'closing the handoff socket failed'));
    log.info('stopping: closing the control socket');
    await this.control?.close().catch((e: unknown) => log.error({ err: e }, 'closing the control socket failed'));
    log.info('stopping: draining in-flight requests and flushing every disk');
    await this.registry?.closeAll();
    // Shares taken over that no VM adopted yet (a startup that failed after the takeover).
    for (const a of this.adopted.values()) await a.close().catch((e: unknown) => log.error({ err: e }, 'closing a taken-over share failed'));
    this.adopted.clear();
    this.qos?.close();
    await this.cacheHost?.close().catch((e: unknown) => log.error({ err: e }, 'closing the cache device failed'));
    if (this.tcpServer) {
      log.info('stopping: closing the TCP listener');
      await this.tcpServer.close().catch((e: unknown) => log.error({ err: e }, 'closing the TCP listener failed'));
    }
    // Storage after the disks that use it.
    for (const n of this.nodes.splice(0).reverse()) await n.stop().catch((e: unknown) => log.error({ err: e }, 'stopping a storage node failed'));
    await this.resolverService?.close().catch((e: unknown) => log.error({ err: e }, 'closing the resolver service failed'));
    await this.resolver?.close().catch(() => {});
    log.info('stopped: every disk flushed, sockets removed');
  }
}

/** start() was cut short by stop(): not an error. */
class StartAborted extends Error {
  constructor() {
    super('stopped during startup');
    this.name = 'StartAborted';
  }
}

function tcpStatus(addrs: Array<{ host: string; port: number }>): Pick<DaemonStatus, 'tcp' | 'tcpAddresses'> {
  return addrs.length ? { tcp: addrs[0]!, tcpAddresses: addrs } : {};
}

/** host:port, with an IPv6 host in brackets. */
export function formatHostPort(host: string, port: number): string {
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
}

async function readTls(t: NonNullable<DaemonConfig['tls']>): Promise<NbdTlsOptions> {
  const read = async (field: string, p: string): Promise<Buffer> => {
    try {
      return await readFile(p);
    } catch (e) {
      throw new ConfigError([`tls.${field}: cannot read ${p}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`]);
    }
  };
  return {
    cert: await read('cert', t.cert),
    key: await read('key', t.key),
    ...(t.ca ? { ca: await read('ca', t.ca) } : {}),
    mode: t.mode,
  };
}
