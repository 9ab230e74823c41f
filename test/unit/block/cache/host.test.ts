import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { CacheHost, checkDirtyHost, setDirtyHost } from '../../../../lib/block/cache/host.js';
import { MemoryVolume } from '../../../../lib/block/memory.js';
import { silentLogger } from '../../../../lib/log.js';
import { EmbeddedStore } from '../../../../lib/resolver/embedded.js';
import { tempDir } from '../../../helpers/tmp.js';

async function store(): Promise<EmbeddedStore> {
  const s = await EmbeddedStore.open(path.join(tempDir('vstore-cache-host-'), 'resolver.json'), { logger: silentLogger() });
  await s.registerNode({ id: 'n1', nbd: ['unix:/nonexistent'], control: [], capacity: 1 << 30, free: 1 << 30, static: true });
  await s.placeName({ name: 'vm1/disk0', kind: 'volume', size: 1 << 24, replicas: 1, nodes: [{ node: 'n1' }] });
  return s;
}

describe('dirty-cache records in the resolver', () => {
  it('another host may not open a volume this host holds dirty cache for; clearing the record lets it', async () => {
    const s = await store();
    await checkDirtyHost(s, 'vm1/disk0', 'hostB'); // clean: fine
    await setDirtyHost(s, 'vm1/disk0', 'hostA');
    expect((await s.getName('vm1/disk0'))!.dirtyHost).toBe('hostA');
    await checkDirtyHost(s, 'vm1/disk0', 'hostA'); // its own: fine
    await expect(checkDirtyHost(s, 'vm1/disk0', 'hostB')).rejects.toThrow(/host hostA holds dirty cache for volume vm1\/disk0.*invalidate --volume vm1\/disk0 --force/);
    await setDirtyHost(s, 'vm1/disk0', null);
    expect((await s.getName('vm1/disk0'))!.dirtyHost).toBeUndefined();
    await checkDirtyHost(s, 'vm1/disk0', 'hostB');
    await s.close();
  });

  it('a write-back disk marks the record before its first dirty write is acknowledged and clears it after write-back', async () => {
    const s = await store();
    const dir = tempDir('vstore-cache-dev-');
    const host = await CacheHost.open({ device: path.join(dir, 'cache.img'), size: 8 << 20, ramBytes: 1 << 20, host: 'hostA' }, silentLogger(), s);
    const backing = new MemoryVolume({ size: 1 << 24 });
    const v = await host.openDisk('vm1', 'disk0', 'volume:vm1/disk0', backing, { mode: 'write-back' }, 'vm1/disk0');
    expect((await s.getName('vm1/disk0'))!.dirtyHost).toBeUndefined();
    await v.write(0, Buffer.alloc(4096, 1));
    expect((await s.getName('vm1/disk0'))!.dirtyHost).toBe('hostA');
    await v.drain();
    for (let i = 0; i < 100 && (await s.getName('vm1/disk0'))!.dirtyHost !== undefined; i++) await new Promise((r) => setTimeout(r, 20));
    expect((await s.getName('vm1/disk0'))!.dirtyHost).toBeUndefined();
    expect(host.list().map((d) => `${d.vm}/${d.disk}`)).toEqual(['vm1/disk0']);
    await v.close();
    await host.close();
    await s.close();
  });
});
