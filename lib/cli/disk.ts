/** `vstore disk add VM FILE|-` and `vstore disk remove VM DISK`: one disk of a running VM. */
import type { Command } from 'commander';
import { readDocument } from '../config/load.js';
import { diskSchema, validate } from '../config/schema.js';
import type { DiskStatus } from '../daemon/registry.js';
import { call, controlOption, diskEndpoints } from './client.js';
import { baseQuery } from './vm.js';

export function registerDisk(program: Command): void {
  const disk = program
    .command('disk')
    .description('add or remove one disk of a VM of the running daemon')
    .addHelpText(
      'after',
      `
Examples:
  $ vstore disk add vm1 disk1.yaml
  $ vstore disk remove vm1 disk1`,
    );

  disk
    .command('add')
    .summary('add a disk to a VM from a JSON/YAML file (or stdin)')
    .description(
      'add a disk to VM: FILE (or - for stdin) holds one disk object of the config schema, JSON or YAML ({name, file, size?, readOnly?, direct?, nbd?: {socket?, export?} | false, vhostUser?: {socket?, queues?, serial?}}); it is served at once. Relative paths are relative to FILE',
    )
    .argument('<vm>', 'VM name')
    .argument('<file>', 'disk description, JSON or YAML; - reads stdin')
    .addOption(controlOption())
    .addHelpText(
      'after',
      `
Example:
  $ echo '{"name": "disk1", "file": "/var/lib/vstore/vm1-disk1.img", "size": "4G"}' | vstore disk add vm1 -`,
    )
    .action(async (vm: string, file: string, opts: { control: string }) => {
      const { data, baseDir, source } = await readDocument(file);
      validate(diskSchema, data, { source });
      const d = await call<DiskStatus>(opts.control, 'POST', `/v1/vms/${encodeURIComponent(vm)}/disks${baseQuery(baseDir)}`, data);
      process.stdout.write(`disk ${vm}/${d.name} added: ${d.file} on ${diskEndpoints(d).join(', ')}\n`);
    });

  disk
    .command('remove')
    .summary('remove a disk: drain, flush, remove its socket')
    .description('remove a disk: it stops accepting connections, drains in-flight requests, is flushed, and its socket removed')
    .argument('<vm>', 'VM name')
    .argument('<disk>', 'disk name')
    .addOption(controlOption())
    .addHelpText('after', '\nExample:\n  $ vstore disk remove vm1 disk1')
    .action(async (vm: string, name: string, opts: { control: string }) => {
      await call(opts.control, 'DELETE', `/v1/vms/${encodeURIComponent(vm)}/disks/${encodeURIComponent(name)}`);
      process.stdout.write(`disk ${vm}/${name} removed\n`);
    });
}
