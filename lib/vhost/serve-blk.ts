/**
 * A virtio-blk device over a Volume, listening on a vhost-user socket: what `vstore vhost-blk`
 * runs, and what each daemon disk with `vhostUser` runs. The caller owns the volume (and wraps
 * it in an OrderedVolume when other front ends share it, or when requests may overlap).
 */
import type { Volume } from '../block/volume.js';
import type { Logger } from '../log.js';
import { VirtioBlkDevice } from './blk.js';
import { VhostUserServer } from './server.js';

export interface VhostBlkOptions {
  socket: string;
  volume: Volume;
  queues: number;
  readOnly: boolean;
  serial?: string;
  logger: Logger;
}

export async function listenVhostBlk(o: VhostBlkOptions): Promise<{ server: VhostUserServer; device: VirtioBlkDevice }> {
  const device = new VirtioBlkDevice({ volume: o.volume, logger: o.logger, numQueues: o.queues, readOnly: o.readOnly, serial: o.serial });
  const server = await VhostUserServer.listen({ path: o.socket, device, logger: o.logger });
  return { server, device };
}
