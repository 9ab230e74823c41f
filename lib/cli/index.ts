/**
 * The `vstore` command line (commander); one file per command. `main` is what bin/vstore.js
 * calls; errors thrown from here are printed by it as one line, `vstore: MESSAGE`, exit 1.
 */
import { Command } from 'commander';
import { registerDisk } from './disk.js';
import { registerNbd } from './nbd.js';
import { registerMount } from './mount.js';
import { registerServe } from './serve.js';
import { registerStatus } from './status.js';
import { registerVm } from './vm.js';
import { registerCache } from './cache.js';
import { registerVhostBlk } from '../vhost/cli.js';
import { nodeCommand } from './node.js';
import { resolverCommand } from './resolver.js';
import { packageVersion } from './version.js';

export function buildProgram(): Command {
  const program = new Command('vstore')
    .description(
      'host-side userspace block driver for QEMU VMs: serves local images and replicated volumes on storage nodes as NBD exports and vhost-user-blk devices, one process for every VM, with a control socket and metrics; also runs the storage nodes and the directory resolver',
    )
    .version(packageVersion(), '-V, --version', 'print the version')
    .helpOption('-h, --help', 'show help (every command has its own: vstore COMMAND --help)')
    .showHelpAfterError('(run with --help for usage)')
    .addHelpText(
      'after',
      `
Examples:
  $ vstore nbd disk.img --socket /tmp/disk.sock          serve one image, like qemu-nbd -k
  $ vstore vhost-blk disk.img --socket /tmp/vhost.sock   the same image as a vhost-user-blk device
  $ vstore serve --config fixtures/demo.yaml             the daemon
  $ vstore status                                        what the daemon serves
  $ vstore vm add vm2.yaml                               add a VM at runtime
  $ vstore node --data /srv/n1 --listen 0.0.0.0:10809 --resolver etcd://127.0.0.1:2379
                                                         a storage node
  $ vstore resolver show vm1/disk0 --resolver etcd://127.0.0.1:2379
                                                         where a volume lives`,
    );
  registerNbd(program);
  registerVhostBlk(program);
  registerMount(program);
  registerServe(program);
  registerStatus(program);
  registerVm(program);
  registerDisk(program);
  registerCache(program);
  program.addCommand(nodeCommand());
  program.addCommand(resolverCommand());
  return program;
}

export async function main(argv: string[]): Promise<void> {
  await buildProgram().parseAsync(argv);
}
