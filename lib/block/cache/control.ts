/**
 * The cache endpoints of the daemon's control API (lib/daemon/control.ts routes /v1/cache... and
 * /v1/vms/VM/disks/DISK/cache... here). Off the data path: they call CacheVolume's control methods.
 *
 *   GET  /v1/cache                                   device, host id, every cached disk's stats
 *   GET  /v1/cache/balloon                           the capacity scheduler: per VM shares, target,
 *                                                    allotment, used bytes, hit ratio, activity
 *   PUT  /v1/cache/balloon/VM  {shares, min?, max?}  a VM's share at runtime (bytes; not saved)
 *   POST /v1/cache/invalidate-volume  {volume, force: true}
 *                                                    clears another host's dirty record of a volume
 *   GET  /v1/vms/VM/disks/DISK/cache                 the disk's cache stats
 *   PUT  /v1/vms/VM/disks/DISK/cache/mode  {mode}    switch (leaving write-back drains first)
 *   POST /v1/vms/VM/disks/DISK/cache/flush           write back every dirty byte (answers when done;
 *                                                    progress is in the stats meanwhile)
 *   POST /v1/vms/VM/disks/DISK/cache/warm  {offset?, length?}
 *   POST /v1/vms/VM/disks/DISK/cache/invalidate  {force: true}   drop everything, dirty included
 *   PUT  /v1/vms/VM/disks/DISK/cache/allotment  {bytes | null}   the per-disk allotment
 */
import { CACHE_MODES, type CacheMode, type CacheVolume } from './volume.js';
import type { CacheHost } from './host.js';

export interface CacheApiResult {
  status: number;
  body: unknown;
}

interface Registry {
  cacheOf(vm: string, disk: string): CacheVolume;
}

function err(status: number, error: string): CacheApiResult {
  return { status, body: { error } };
}

/**
 * Answers a cache request, or undefined when `parts` (the path after /v1) is not one.
 * `readBody` parses the JSON body.
 */
export async function handleCacheRequest(
  method: string,
  parts: string[],
  readBody: () => Promise<unknown>,
  registry: Registry,
  host: CacheHost | undefined,
): Promise<CacheApiResult | undefined> {
  const isDisk = parts[0] === 'vms' && parts[2] === 'disks' && parts[4] === 'cache' && parts.length >= 5 && parts.length <= 6;
  if (parts[0] !== 'cache' && !isDisk) return undefined;
  if (!host) return err(400, 'this daemon has no cache device (top-level cache in its config)');
  try {
    if (parts[0] === 'cache') {
      if (parts.length === 1) {
        if (method !== 'GET') return err(405, 'use GET');
        return { status: 200, body: { host: host.hostId, device: host.device.deviceStats(), disks: host.list() } };
      }
      if (parts[1] === 'balloon' && parts.length === 2) {
        if (method !== 'GET') return err(405, 'use GET');
        const b = host.balloonStatus();
        if (!b) return err(404, 'the capacity scheduler is off (cache.balloon.enabled: false)');
        return { status: 200, body: b };
      }
      if (parts[1] === 'balloon' && parts.length === 3) {
        if (method !== 'PUT') return err(405, 'use PUT');
        const b = (await readBody()) as { shares?: unknown; min?: unknown; max?: unknown } | null;
        const size = (v: unknown): boolean => v === undefined || v === null || (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0);
        if (typeof b?.shares !== 'number') return err(400, 'shares: a positive number');
        if (!size(b.min) || !size(b.max)) return err(400, 'min, max: bytes (non-negative integers) or null');
        host.setVmPolicy(parts[2]!, {
          shares: b.shares,
          ...(typeof b.min === 'number' ? { minBytes: b.min } : {}),
          ...(typeof b.max === 'number' ? { maxBytes: b.max } : {}),
        });
        return { status: 200, body: host.balloonStatus() ?? {} };
      }
      if (parts[1] === 'invalidate-volume' && parts.length === 2) {
        if (method !== 'POST') return err(405, 'use POST');
        const b = (await readBody()) as { volume?: unknown; force?: unknown } | null;
        if (typeof b?.volume !== 'string') return err(400, 'volume: required (the resolver name)');
        if (b.force !== true) return err(400, 'force: must be true (the other host\'s dirty data is abandoned)');
        await host.clearDirtyRecord(b.volume);
        return { status: 200, body: { volume: b.volume, dirtyHost: null } };
      }
      return undefined;
    }
    const cache = registry.cacheOf(parts[1]!, parts[3]!);
    const action = parts[5];
    if (action === undefined) {
      if (method !== 'GET') return err(405, 'use GET');
      return { status: 200, body: cache.stats() };
    }
    if (action === 'mode') {
      if (method !== 'PUT') return err(405, 'use PUT');
      const b = (await readBody()) as { mode?: unknown } | null;
      if (typeof b?.mode !== 'string' || !CACHE_MODES.includes(b.mode as CacheMode)) return err(400, `mode: one of ${CACHE_MODES.join(', ')}`);
      await cache.setMode(b.mode as CacheMode);
      return { status: 200, body: cache.stats() };
    }
    if (action === 'flush') {
      if (method !== 'POST') return err(405, 'use POST');
      await cache.drain();
      return { status: 200, body: cache.stats() };
    }
    if (action === 'warm') {
      if (method !== 'POST') return err(405, 'use POST');
      const b = ((await readBody()) ?? {}) as { offset?: unknown; length?: unknown };
      const offset = b.offset ?? 0;
      if (typeof offset !== 'number' || !Number.isSafeInteger(offset) || offset < 0 || offset > cache.size) return err(400, `offset: an integer from 0 to ${cache.size}`);
      const length = b.length ?? cache.size - offset;
      if (typeof length !== 'number' || !Number.isSafeInteger(length) || length < 0 || offset + length > cache.size) return err(400, `length: an integer, offset + length <= ${cache.size}`);
      if (cache.mode === 'pass-through') return err(409, 'the disk is in pass-through mode: nothing is cached');
      await cache.warm(offset, length);
      return { status: 200, body: cache.stats() };
    }
    if (action === 'invalidate') {
      if (method !== 'POST') return err(405, 'use POST');
      const b = (await readBody()) as { force?: unknown } | null;
      if (b?.force !== true) return err(400, 'force: must be true (dirty data that was not written back is lost)');
      const dropped = await cache.invalidate();
      return { status: 200, body: { droppedDirtyBytes: dropped, ...cache.stats() } };
    }
    if (action === 'allotment') {
      if (method !== 'PUT') return err(405, 'use PUT');
      const b = (await readBody()) as { bytes?: unknown } | null;
      if (b?.bytes !== null && (typeof b?.bytes !== 'number' || !(b.bytes > 0))) return err(400, 'bytes: a positive number, or null for no bound');
      cache.setAllotment(b.bytes === null ? undefined : b.bytes);
      return { status: 200, body: cache.stats() };
    }
    return undefined;
  } catch (e) {
    const status = (e as { status?: unknown }).status;
    return err(typeof status === 'number' ? status : (e as Error).name === 'ConfigError' ? 400 : 500, (e as Error).message);
  }
}
