/**
 * The host daemon: one process serving every VM's disks. It builds the graph — registry, the
 * shared TCP NBD server when configured, the control API — from a resolved config and injected
 * factories, starts it, and takes it down in order on stop():
 *   stop accepting (control socket, then every NBD listener) -> drain in-flight requests ->
 *   flush every disk -> remove sockets.
 * Signals are the caller's business (lib/cli/serve.ts): the daemon is a plain object.
 */
import { mkdir, readFile } from 'node:fs/promises';
import { FileVolume } from '../block/file.js';
import { ConfigError, type DaemonConfig, type DiskConfig } from '../config/schema.js';
import type { Logger } from '../log.js';
import type { NbdTlsOptions } from '../nbd/api.js';
import { ControlServer, type DaemonStatus } from './control.js';
import { RegistryError, VmRegistry, type NbdServerFactory, type NbdServerLike, type VolumeOpener } from './registry.js';

export interface DaemonDeps {
  logger: Logger;
  createServer: NbdServerFactory;
  /** Default: FileVolume over the disk's file (created sparse when `size` is set and it is missing). */
  openVolume?: VolumeOpener;
  version?: string;
  /** Directory the config's relative paths were resolved against (control requests use it too). */
  baseDir?: string;
}

export const openFileVolume: VolumeOpener = (d: DiskConfig) =>
  FileVolume.open(d.file, { readOnly: d.readOnly, direct: d.direct, ...(d.size !== undefined ? { create: { size: d.size } } : {}) });

export class Daemon {
  private readonly logger: Logger;
  private readonly startedAt = Date.now();
  private registry: VmRegistry | undefined;
  private tcpServer: NbdServerLike | undefined;
  private control: ControlServer | undefined;
  private stopping: Promise<void> | undefined;

  constructor(
    readonly config: DaemonConfig,
    private readonly deps: DaemonDeps,
  ) {
    this.logger = deps.logger;
  }

  /** Serves every configured VM, then opens the control socket (its presence means "ready"). */
  async start(): Promise<void> {
    const { config, logger } = this;
    await mkdir(this.config.runDir, { recursive: true, mode: 0o755 });
    if (config.tcp) {
      const tls = config.tls ? await readTls(config.tls) : undefined;
      this.tcpServer = this.deps.createServer({ logger: logger.child({ listener: 'tcp' }), ...(tls ? { tls } : {}) });
    }
    const registry = new VmRegistry({
      logger,
      createServer: this.deps.createServer,
      openVolume: this.deps.openVolume ?? openFileVolume,
      ...(this.tcpServer ? { tcpServer: this.tcpServer } : {}),
    });
    this.registry = registry;
    try {
      if (this.tcpServer && config.tcp) {
        await this.tcpServer.listen({ tcp: config.tcp });
        logger.info({ host: config.tcp.host, port: config.tcp.port, tls: config.tls?.mode ?? 'off' }, 'TCP listener up (exports VM/DISK)');
      }
      for (const [i, vm] of config.vms.entries()) {
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
      this.control = new ControlServer({
        logger: logger.child({ component: 'control' }),
        registry,
        resolve: { baseDir: this.deps.baseDir ?? process.cwd(), runDir: config.runDir },
        status: () => this.status(),
      });
      await this.control.listen(config.control);
    } catch (e) {
      await this.stop();
      throw e;
    }
    logger.info({ control: config.control, vms: config.vms.length }, 'daemon ready');
  }

  status(): DaemonStatus {
    return {
      pid: process.pid,
      version: this.deps.version ?? '0.0.0',
      startedAt: new Date(this.startedAt).toISOString(),
      uptimeSeconds: Math.round((Date.now() - this.startedAt) / 1000),
      control: this.config.control,
      ...(this.config.tcp ? { tcp: this.config.tcp } : {}),
      vms: this.registry?.status() ?? [],
    };
  }

  /** Orderly shutdown; idempotent (a second call returns the same promise). */
  stop(): Promise<void> {
    this.stopping ??= this.doStop();
    return this.stopping;
  }

  private async doStop(): Promise<void> {
    const log = this.logger;
    log.info('stopping: closing the control socket');
    await this.control?.close().catch((e: unknown) => log.error({ err: e }, 'closing the control socket failed'));
    log.info('stopping: draining in-flight requests and flushing every disk');
    await this.registry?.closeAll();
    if (this.tcpServer) {
      log.info('stopping: closing the TCP listener');
      await this.tcpServer.close().catch((e: unknown) => log.error({ err: e }, 'closing the TCP listener failed'));
    }
    log.info('stopped: every disk flushed, sockets removed');
  }
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
