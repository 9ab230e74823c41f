/** `vstore vm add FILE|-` and `vstore vm remove NAME`: VMs of the running daemon. */
import path from 'node:path';
import type { Command } from 'commander';
import { readDocument } from '../config/load.js';
import { validate, vmSchema } from '../config/schema.js';
import type { VmStatus } from '../daemon/registry.js';
import { call, controlOption, diskEndpoints } from './client.js';
import { registerVmQos } from './qos.js';

/** Query string carrying the directory relative paths of a document are relative to. */
export function baseQuery(baseDir: string): string {
  return `?base=${encodeURIComponent(path.resolve(baseDir))}`;
}

export function registerVm(program: Command): void {
  const vm = program
    .command('vm')
    .description("add or remove a VM (and all its disks) of the running daemon, or show and change a VM's service level (qos)")
    .addHelpText(
      'after',
      `
Examples:
  $ vstore vm add vm2.yaml
  $ vstore vm remove vm2
  $ vstore vm qos vm1 --limit-iops 500`,
    );

  vm.command('add')
    .summary('add a VM from a JSON/YAML file (or stdin)')
    .description(
      'add a VM: FILE (or - for stdin) holds one VM object of the config schema, JSON or YAML ({name, disks: [{name, file, size?, readOnly?, nbd?: {socket?, export?}}]}); its disks are served at once. Relative paths are relative to FILE',
    )
    .argument('<file>', 'VM description, JSON or YAML; - reads stdin')
    .addOption(controlOption())
    .addHelpText(
      'after',
      `
Example:
  $ cat vm2.yaml
  name: vm2
  disks:
    - { name: disk0, file: /var/lib/vstore/vm2-disk0.img, size: 10G }
  $ vstore vm add vm2.yaml`,
    )
    .action(async (file: string, opts: { control: string }) => {
      const { data, baseDir, source } = await readDocument(file);
      validate(vmSchema, data, { source }); // the same errors the daemon would give, without a round trip
      const added = await call<VmStatus>(opts.control, 'POST', `/v1/vms${baseQuery(baseDir)}`, data);
      process.stdout.write(`VM ${added.name} added${added.disks.length ? ':' : ''}\n`);
      for (const d of added.disks) process.stdout.write(`  ${d.name}: ${d.file} on ${diskEndpoints(d).join(', ')}\n`);
    });

  vm.command('remove')
    .summary('remove a VM: drain, flush, remove its sockets')
    .description("remove a VM: each of its disks stops accepting connections, drains in-flight requests, is flushed, and its socket removed")
    .argument('<name>', 'VM name')
    .addOption(controlOption())
    .addHelpText('after', '\nExample:\n  $ vstore vm remove vm2')
    .action(async (name: string, opts: { control: string }) => {
      await call(opts.control, 'DELETE', `/v1/vms/${encodeURIComponent(name)}`);
      process.stdout.write(`VM ${name} removed\n`);
    });

  registerVmQos(vm);
}
