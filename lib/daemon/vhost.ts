/**
 * The daemon's vhost-user-blk server factory: a disk's device and socket over the volume the
 * registry hands it (the disk's shared OrderedVolume).
 */
import { listenVhostBlk } from '../vhost/serve-blk.js';
import type { VhostServerFactory } from './registry.js';

export const createVhostBlkServer: VhostServerFactory = async (o) => {
  const { server, device } = await listenVhostBlk(o);
  return {
    close: () => server.close(),
    stats: () => ({ connected: server.connected, connections: server.connections, ...device.stats }),
  };
};
