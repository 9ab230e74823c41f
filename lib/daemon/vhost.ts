/**
 * The daemon's vhost-user-blk server factory: a disk's device and socket over the volume the
 * registry hands it (the disk's shared OrderedVolume).
 *
 * TODO(issue 4): the two statements below are the construction of `vstore vhost-blk`'s action
 * (lib/vhost/cli.ts). They should be one exported function of lib/vhost/ (e.g.
 * `listenVhostBlk({ socket, volume, queues, readOnly, serial, logger }): Promise<{ server, device }>`)
 * called both there and here; lib/vhost/ is not this change's to edit.
 */
import { VirtioBlkDevice } from '../vhost/blk.js';
import { VhostUserServer } from '../vhost/server.js';
import type { VhostServerFactory } from './registry.js';

export const createVhostBlkServer: VhostServerFactory = async (o) => {
  const device = new VirtioBlkDevice({ volume: o.volume, logger: o.logger, numQueues: o.queues, readOnly: o.readOnly, serial: o.serial });
  const server = await VhostUserServer.listen({ path: o.socket, device, logger: o.logger });
  return {
    close: () => server.close(),
    stats: () => ({ connected: server.connected, connections: server.connections, ...device.stats }),
  };
};
