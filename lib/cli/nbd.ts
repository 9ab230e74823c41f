/**
 * `vstore nbd FILE --socket PATH`: serve one image over NBD in the foreground, like
 * `qemu-nbd -k PATH FILE`; SIGTERM/SIGINT drains, flushes and exits 0.
 */
import { readFile, rm } from 'node:fs/promises';
import path from 'node:path';
import { Option, type Command } from 'commander';
import { FileVolume } from '../block/file.js';
import { LOG_LEVELS, MAX_SOCKET_PATH, parseSize } from '../config/schema.js';
import { parseHostPort, prepareSocket } from '../net/address.js';
import { createLogger } from '../log.js';
import type { NbdTlsOptions } from '../nbd/api.js';
import { NbdServer } from '../nbd/server.js';
import { exitAfterLogs, stopOnSignals } from './signals.js';

interface NbdOpts {
  socket?: string;
  tcp?: string;
  export: string;
  readOnly?: boolean;
  size?: string;
  direct?: boolean;
  engine?: 'threadpool' | 'uring' | 'auto';
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  tls: 'on' | 'require';
  logLevel: string;
}


async function readPem(flag: string, p: string): Promise<Buffer> {
  try {
    return await readFile(p);
  } catch (e) {
    throw new Error(`${flag}: cannot read ${p}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
}

export function registerNbd(program: Command): void {
  program
    .command('nbd')
    .summary('serve one image over NBD in the foreground (like qemu-nbd -k)')
    .description(
      "serve one raw image file (or block device) over NBD in the foreground until SIGTERM/SIGINT, like `qemu-nbd -k PATH FILE`; the default export name is '' so `nbd:unix:PATH` reaches it; on a signal, in-flight requests drain, the image is flushed, the socket removed, and the exit code is 0",
    )
    .argument('<file>', 'raw image file or block device to serve')
    .option('-k, --socket <path>', 'unix socket to listen on (created mode 0600; a stale socket is replaced)')
    .option('--tcp <host:port>', 'also (or only) listen on TCP, e.g. 127.0.0.1:10809')
    .option('-x, --export <name>', 'export name', '')
    .option('-r, --read-only', 'serve read-only (writes fail with EPERM)', false)
    .option('--size <size>', 'create FILE sparse with this size if it does not exist (bytes, or K/M/G/T suffix)')
    .option('--direct', 'open FILE with O_DIRECT (bypass the host page cache)', false)
    .addOption(new Option('--engine <engine>', 'how misses, large reads, writes and fdatasync reach the kernel (advanced)').choices(['threadpool', 'uring', 'auto']).hideHelp())
    .option('--tls-cert <file>', 'PEM certificate chain of the server (TCP only; needs --tls-key)')
    .option('--tls-key <file>', 'PEM private key of the server')
    .option('--tls-ca <file>', 'PEM CA: clients must present a certificate it signed')
    .addOption(new Option('--tls <mode>', "with --tls-cert: 'require' refuses plaintext, 'on' allows it").choices(['on', 'require']).default('require'))
    .addOption(new Option('--log-level <level>', 'log level (logs are JSON lines on stderr)').choices([...LOG_LEVELS]).default('info'))
    .addHelpText(
      'after',
      `
Examples:
  $ vstore nbd /var/lib/images/disk.img --socket /run/vstore/disk.sock
  $ vstore nbd new.img --size 10G --socket /tmp/new.sock --export disk0
  $ vstore nbd disk.img --tcp 0.0.0.0:10809 --tls-cert srv.pem --tls-key srv.key

Attach with QEMU:
  qemu-system-x86_64 ... -drive file=nbd:unix:/run/vstore/disk.sock,format=raw,if=virtio,cache=none`,
    )
    .action(async (file: string, opts: NbdOpts) => {
      if (!opts.socket && !opts.tcp) throw new Error('nothing to listen on: give --socket PATH and/or --tcp HOST:PORT');
      const tcp = opts.tcp ? parseHostPort(opts.tcp) : undefined;
      const socket = opts.socket ? path.resolve(opts.socket) : undefined;
      if (socket && Buffer.byteLength(socket) > MAX_SOCKET_PATH) throw new Error(`--socket: ${socket} is longer than ${MAX_SOCKET_PATH} bytes`);
      if ((opts.tlsCert === undefined) !== (opts.tlsKey === undefined)) throw new Error('--tls-cert and --tls-key go together');
      if (opts.tlsCert && !tcp) throw new Error('--tls-cert: TLS is offered on TCP only; add --tcp HOST:PORT');
      let size: number | undefined;
      if (opts.size !== undefined) {
        size = parseSize(opts.size);
        if (size === undefined) throw new Error(`--size: not a size: "${opts.size}" (bytes, or a number with K, M, G, T suffix)`);
      }
      const tls: NbdTlsOptions | undefined = opts.tlsCert
        ? {
            cert: await readPem('--tls-cert', opts.tlsCert),
            key: await readPem('--tls-key', opts.tlsKey!),
            ...(opts.tlsCa ? { ca: await readPem('--tls-ca', opts.tlsCa) } : {}),
            mode: opts.tls,
          }
        : undefined;

      const logger = createLogger({ level: opts.logLevel });
      let volume: FileVolume;
      try {
        volume = await FileVolume.open(file, {
          readOnly: opts.readOnly ?? false,
          direct: opts.direct ?? false,
          ...(size ? { create: { size } } : {}),
          ...(opts.engine ? { engine: opts.engine } : {}),
          logger,
        });
      } catch (e) {
        const code = (e as { code?: string }).code;
        if (code === 'ENOENT') throw new Error(`${file}: no such file (give --size SIZE to create it)`);
        throw new Error(`${file}: ${(e as Error).message}`);
      }
      const server = new NbdServer({ logger, ...(tls ? { tls } : {}) });
      const stop = async (): Promise<void> => {
        logger.info('stopping: no new connections, draining in-flight requests');
        // removeExport drains and disconnects clients at once; close() alone would wait for
        // net.Server's close callback, which comes only after every connection has ended.
        await server.removeExport(opts.export);
        await server.close();
        await volume.flush();
        logger.info({ file }, 'flushed');
        await volume.close();
        if (socket) {
          await rm(socket, { force: true });
          logger.info({ socket }, 'socket removed');
        }
      };
      const exited = stopOnSignals(logger, stop);
      try {
        server.addExport({ name: opts.export, volume, readOnly: opts.readOnly ?? false, description: path.basename(file) });
        if (socket) {
          await prepareSocket(socket, '--socket');
          await server.listen({ unix: socket });
        }
        if (tcp) await server.listen({ tcp });
      } catch (e) {
        await server.close().catch(() => {});
        await volume.close().catch(() => {});
        throw new Error(`cannot listen: ${(e as Error).message}`);
      }
      const exp = encodeURIComponent(opts.export);
      logger.info({ file, size: volume.size, listening: server.addresses, export: opts.export, readOnly: volume.caps.readOnly || !!opts.readOnly, tls: tls?.mode ?? 'off' }, 'serving');
      if (socket) process.stdout.write(`vstore: serving ${file} (${volume.size} bytes) on nbd+unix:///${exp}?socket=${socket}\n`);
      for (const a of server.addresses) {
        if (!('tcp' in a)) continue; // the port the system chose when --tcp said :0
        const host = a.tcp.host.includes(':') ? `[${a.tcp.host}]` : a.tcp.host;
        process.stdout.write(`vstore: serving ${file} (${volume.size} bytes) on nbd${tls ? 's' : ''}://${host}:${a.tcp.port}/${exp}\n`);
      }
      exitAfterLogs(logger, await exited);
    });
}
