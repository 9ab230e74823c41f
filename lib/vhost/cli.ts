/**
 * `vstore vhost-blk FILE --socket PATH`: serve one image as a vhost-user-blk device in the
 * foreground, like `qemu-storage-daemon --export type=vhost-user-blk`. QEMU attaches with
 * `-chardev socket,id=c,path=PATH -device vhost-user-blk-pci,chardev=c` and guest RAM shared
 * (`-object memory-backend-memfd,id=mem,size=...,share=on -numa node,memdev=mem`).
 * SIGTERM/SIGINT disconnects the front end, flushes the image, removes the socket, exits 0.
 *
 * Exported as a factory; lib/cli/index.ts registers it (`program.addCommand(vhostBlkCommand())`).
 */
import path from 'node:path';
import { Command, InvalidArgumentError, Option } from 'commander';
import { FileVolume } from '../block/file.js';
import { exitAfterLogs, stopOnSignals } from '../cli/signals.js';
import { LOG_LEVELS, MAX_SOCKET_PATH } from '../config/schema.js';
import { createLogger } from '../log.js';
import { OrderedVolume } from '../block/ordering.js';
import { listenVhostBlk } from './serve-blk.js';
import type { VhostUserServer } from './server.js';

interface VhostBlkOpts {
  socket: string;
  readOnly: boolean;
  queues: number;
  serial?: string;
  direct: boolean;
  logLevel: string;
}

function parseQueues(v: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1 || n > 64) throw new InvalidArgumentError('expected an integer from 1 to 64');
  return n;
}

export function vhostBlkCommand(): Command {
  return new Command('vhost-blk')
    .summary('serve one image as a vhost-user-blk device in the foreground')
    .description(
      'serve one raw image file (or block device) as a vhost-user-blk device on a unix socket until SIGTERM/SIGINT, like `qemu-storage-daemon --export type=vhost-user-blk`; one front end (QEMU) at a time, and the next one is accepted when it disconnects',
    )
    .argument('<file>', 'raw image file or block device to serve')
    .requiredOption('-s, --socket <path>', 'vhost-user unix socket to listen on (mode 0600; a stale socket is replaced)')
    .option('-r, --read-only', 'offer a read-only device (VIRTIO_BLK_F_RO; writes fail with IOERR)', false)
    .option('-q, --queues <n>', 'virtqueues offered (1-64); QEMU wants one per vCPU unless given num-queues=N, and refuses to start with fewer', parseQueues, 1)
    .option('--serial <id>', 'device id returned by GET_ID (at most 20 bytes)')
    .option('--direct', 'open FILE with O_DIRECT (bypass the host page cache)', false)
    .addOption(new Option('--log-level <level>', 'log level (logs are JSON lines on stderr)').choices([...LOG_LEVELS]).default('info'))
    .addHelpText(
      'after',
      `
Example:
  $ vstore vhost-blk disk.img --socket /run/vstore/disk.vhost --queues 2
  $ qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\
      -chardev socket,id=vb0,path=/run/vstore/disk.vhost -device vhost-user-blk-pci,chardev=vb0,num-queues=2`,
    )
    .action(async (file: string, opts: VhostBlkOpts) => {
      const socket = path.resolve(opts.socket);
      if (Buffer.byteLength(socket) > MAX_SOCKET_PATH) throw new Error(`--socket: ${socket} is longer than ${MAX_SOCKET_PATH} bytes`);
      const logger = createLogger({ level: opts.logLevel });
      const volume = await FileVolume.open(file, { readOnly: opts.readOnly, direct: opts.direct });
      let server: VhostUserServer;
      try {
        // Ordered: a guest may have overlapping requests in flight; they keep their order here.
        ({ server } = await listenVhostBlk({ socket, volume: new OrderedVolume(volume), logger, queues: opts.queues, readOnly: opts.readOnly, serial: opts.serial }));
      } catch (e) {
        await volume.close();
        throw e;
      }
      logger.info({ file, socket, queues: opts.queues, readOnly: opts.readOnly, size: volume.size }, 'vhost-blk: serving');
      const code = await stopOnSignals(logger, async () => {
        await server.close();
        if (!opts.readOnly) await volume.flush();
        await volume.close();
      });
      exitAfterLogs(logger, code);
    });
}

/** Adds the command to a program (the shape of the other lib/cli/ registrations). */
export function registerVhostBlk(program: Command): void {
  program.addCommand(vhostBlkCommand());
}
