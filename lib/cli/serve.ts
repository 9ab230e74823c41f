/** `vstore serve --config FILE`: the host daemon, in the foreground until SIGTERM/SIGINT. */
import type { Command } from 'commander';
import { loadConfig } from '../config/load.js';
import { LOG_LEVELS } from '../config/schema.js';
import { Daemon, formatHostPort } from '../daemon/daemon.js';
import { createVhostBlkServer } from '../daemon/vhost.js';
import { shareServerFactory } from '../daemon/virtiofs.js';
import { qemuMemoryArgs, shareQemuArgs } from '../config/shares.js';
import { createLogger } from '../log.js';
import { NbdServer } from '../nbd/server.js';
import { diskEndpoints } from './client.js';
import { exitAfterLogs, failAfterLogs, stopOnSignals } from './signals.js';
import { packageVersion } from './version.js';
import path from 'node:path';
import { Option } from 'commander';

export function registerServe(program: Command): void {
  program
    .command('serve')
    .summary('run the host daemon (every VM disk of a config, control socket, metrics)')
    .description(
      "run the host daemon in the foreground: serve every VM disk of the config over NBD (a unix socket per disk, and optionally one TCP listener) and/or vhost-user-blk (a unix socket per disk), with a control socket for `vstore status`, `vstore vm ...`, `vstore disk ...` and /metrics; SIGTERM or SIGINT drains in-flight requests, flushes every disk, removes the sockets and exits 0",
    )
    .requiredOption('-c, --config <file>', 'daemon config, JSON or YAML (see fixtures/demo.yaml)')
    .addOption(new Option('--log-level <level>', 'log level, overriding the config’s log.level').choices([...LOG_LEVELS]))
    .option(
      '--takeover',
      'take over from the daemon running on this config without breaking mounted shares: its virtiofs connections move to this process live (over CONTROL.handoff), then it drains its disks and exits 0, and this one starts them',
    )
    .addHelpText(
      'after',
      `
Example:
  $ vstore serve --config /etc/vstore/vstore.yaml
  $ vstore serve -c fixtures/demo.yaml --log-level debug
  $ vstore serve -c /etc/vstore/vstore.yaml --takeover     # restart or upgrade under running guests

Logs are JSON lines (pino) on stderr.`,
    )
    .action(async (opts: { config: string; logLevel?: string; takeover?: boolean }) => {
      const config = await loadConfig(opts.config);
      const logger = createLogger({ level: opts.logLevel ?? config.log.level });
      const daemon = new Daemon(config, {
        logger,
        createServer: (o) => new NbdServer(o),
        createVhostServer: createVhostBlkServer,
        shareServers: shareServerFactory,
        version: packageVersion(),
        baseDir: path.dirname(path.resolve(opts.config)),
        ...(opts.takeover ? { takeover: true } : {}),
      });
      let started: Promise<boolean> | undefined;
      // A signal during startup is a normal stop (exit 0, like qemu-storage-daemon): start()
      // then resolves false once what was started is down. If startup fails for real, the
      // failure below is what ends the process (exit 1), not the signal.
      const exited = stopOnSignals(logger, async () => {
        await daemon.stop();
        if (started) await started.catch(() => new Promise<never>(() => {}));
      });
      started = daemon.start();
      let ready: boolean;
      try {
        ready = await started;
      } catch (e) {
        // Everything started is down again. The one-line error must be the last line on
        // stderr, after the log lines of the aborted start (bin/vstore.js would print it
        // ahead of pino's pending writes).
        failAfterLogs(logger, e instanceof Error ? e.message : String(e));
        return;
      }
      if (ready) {
        const st = daemon.status();
        for (const vm of st.vms) {
          for (const d of vm.disks) {
            for (const at of diskEndpoints(d)) process.stdout.write(`vstore: ${vm.name}/${d.name}: ${d.file} on ${at}\n`);
          }
          const shares = vm.shares ?? [];
          for (const sh of shares) process.stdout.write(`vstore: ${vm.name} share ${sh.tag}: ${sh.source} on ${sh.socket}; in the guest: ${sh.mount}\n`);
          if (shares.length > 0) {
            const args = [...qemuMemoryArgs('<RAM size>'), ...shares.flatMap((sh, i) => shareQemuArgs(sh, i))];
            process.stdout.write(`vstore: ${vm.name} QEMU arguments for its shares: ${args.join(' ')}\n`);
          }
        }
        const tcp = (st.tcpAddresses ?? []).map((a) => formatHostPort(a.host, a.port)).join(', ');
        process.stdout.write(`vstore: control socket ${config.control}${tcp ? `, TCP ${tcp}` : ''}\n`);
      }
      // Handed over to a new daemon (vstore serve --takeover): stopped already, exit 0.
      exitAfterLogs(logger, await Promise.race([exited, daemon.handedOff.then(() => 0)]));
    });
}
