// The vhost-user transport's live handoff, with the JS front-end driver playing QEMU: a back end
// is quiesced while requests are in flight, its state and fds cross a unix socket (SCM_RIGHTS,
// as between two daemon processes), a second back end is built from them and started, and the
// driver's connection — never closed — goes on: requests queued during the handoff complete,
// the data is right, and a later reconnect lands on the handed-over listening socket. The abort
// path resumes the first back end. Also the handoff channel's framing with many fds.
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { MemoryVolume } from '../../../lib/block/memory.js';
import { silentLogger } from '../../../lib/log.js';
import { native } from '../../../lib/native/index.js';
import { HandoffChannel } from '../../../lib/daemon/handoff.js';
import { BlkStatus, VirtioBlkDevice } from '../../../lib/vhost/blk.js';
import { VhostUserServer, type ServerState } from '../../../lib/vhost/server.js';
import { patterned, tempDir } from '../../helpers/index.js';
import { VhostUserFrontend } from '../../helpers/vhost-frontend.js';

const n = native();
const SIZE = 8 * 1024 * 1024;

/** A memory volume whose writes take `delayMs` (requests stay in flight for a while). */
class SlowVolume extends MemoryVolume {
  delayMs = 0;
  override async write(offset: number, buf: Buffer, opts?: Parameters<MemoryVolume['write']>[2]): Promise<void> {
    if (this.delayMs) await new Promise((r) => setTimeout(r, this.delayMs));
    return super.write(offset, buf, opts);
  }
}

/** A connected pair of HandoffChannels over a real unix socket (listen, connect, accept). */
async function channelPair(dir: string): Promise<[HandoffChannel, HandoffChannel]> {
  const p = path.join(dir, 'h.sock');
  const l = n.unixListen(p, 1);
  const c = n.unixConnect(p);
  let a = -1;
  for (let i = 0; i < 100 && a < 0; i++) {
    a = n.unixAccept(l);
    if (a < 0) await new Promise((r) => setTimeout(r, 10));
  }
  n.closeFd(l);
  return [new HandoffChannel(c), new HandoffChannel(a)];
}

const cleanup: Array<() => unknown> = [];

/** A one-queue blk back end over a SlowVolume and the driver connected to it. */
async function oneQueue(prefix: string): Promise<{ a: VhostUserServer; fe: VhostUserFrontend; vol: SlowVolume }> {
  const dir = tempDir(prefix);
  const vol = new SlowVolume({ size: SIZE });
  const dev = new VirtioBlkDevice({ volume: vol, logger: silentLogger(), numQueues: 1, serial: 'x' });
  const socket = path.join(dir, 'vu.sock');
  const a = await VhostUserServer.listen({ path: socket, device: dev, logger: silentLogger() });
  cleanup.push(() => a.close());
  const fe = await VhostUserFrontend.connect({ socket, numQueues: 1, queueSize: 64 });
  cleanup.push(() => fe.close());
  return { a, fe, vol };
}
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});

describe('vhost-user live handoff (front-end driver as QEMU)', () => {
  it('moves a busy connection to a new back end over SCM_RIGHTS: nothing lost, nothing done twice, no reconnect', async () => {
    const dir = tempDir('vst-handoff-');
    const vol = new SlowVolume({ size: SIZE });
    const devA = new VirtioBlkDevice({ volume: vol, logger: silentLogger(), numQueues: 2, serial: 'x' });
    const socket = path.join(dir, 'vu.sock');
    const a = await VhostUserServer.listen({ path: socket, device: devA, logger: silentLogger() });
    cleanup.push(() => a.close());
    const fe = await VhostUserFrontend.connect({ socket, numQueues: 2, queueSize: 64, depth: 16, maxIo: 64 * 1024 });
    cleanup.push(() => fe.close());
    for (let i = 0; i < 8; i++) expect(await fe.write(i * 128, patterned(64 * 1024, i), i % 2)).toBe(BlkStatus.OK);

    // Requests in flight when the quiesce starts: it waits for them.
    vol.delayMs = 100;
    const early = Array.from({ length: 8 }, (_, i) => fe.write(1024 + i * 128, patterned(64 * 1024, 100 + i), i % 2));
    await new Promise((r) => setTimeout(r, 20));
    const t0 = Date.now();
    await a.quiesce(5000);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(50);
    expect(await Promise.all(early)).toEqual(Array(8).fill(BlkStatus.OK));
    vol.delayMs = 0;

    // Requests the guest makes while both back ends hold still: they wait in the rings.
    let lateDone = 0;
    const late = Array.from({ length: 6 }, (_, i) => fe.write(2048 + i * 128, patterned(64 * 1024, 200 + i), i % 2).then((s) => (lateDone++, s)));

    const { state, fds } = a.exportState();
    expect(fds.length).toBeGreaterThanOrEqual(1 + 1 + 1 + 2 * 2); // listen, conn, memory, kick+call per queue
    const [tx, rx] = await channelPair(dir);
    cleanup.push(() => tx.close(), () => rx.close());
    tx.send({ type: 'share', state }, fds);
    const got = await rx.receive(5000);
    expect(got.fds.length).toBe(fds.length);
    expect(got.fds.some((f) => fds.includes(f))).toBe(false); // copies, as another process would get
    const devB = new VirtioBlkDevice({ volume: vol, logger: silentLogger(), numQueues: 2, serial: 'x' });
    const b = VhostUserServer.adopt({ path: socket, device: devB, logger: silentLogger() }, (got.msg as unknown as { state: ServerState }).state, got.fds);
    cleanup.push(() => b.close());
    await new Promise((r) => setTimeout(r, 100));
    expect(lateDone).toBe(0);

    await a.detach(); // the commit: A lets go without a word to the driver
    expect(fe.closed).toBe(false);
    b.start(); // B kicks itself: the queued requests run
    expect(await Promise.all(late)).toEqual(Array(6).fill(BlkStatus.OK));
    for (let i = 0; i < 8; i++) {
      expect((await fe.read(i * 128, 64 * 1024)).data.equals(patterned(64 * 1024, i))).toBe(true);
      expect((await fe.read(1024 + i * 128, 64 * 1024)).data.equals(patterned(64 * 1024, 100 + i))).toBe(true);
    }
    for (let i = 0; i < 6; i++) expect((await fe.read(2048 + i * 128, 64 * 1024, 1)).data.equals(patterned(64 * 1024, 200 + i))).toBe(true);
    expect(vol.stats.writes).toBe(8 + 8 + 6); // every write ran once
    expect(fe.closed).toBe(false);
    expect(b.connected).toBe(true);

    // The listening socket moved too: a new front end is accepted by B.
    fe.close();
    await b.idle();
    const fe2 = await VhostUserFrontend.connect({ socket, numQueues: 2, queueSize: 64 });
    cleanup.push(() => fe2.close());
    expect((await fe2.read(0, 64 * 1024)).data.equals(patterned(64 * 1024, 0))).toBe(true);
    expect(b.connections).toBe(2);
  });

  it('a handoff given up before the commit: the first back end serves again, queued requests included', async () => {
    const { a, fe } = await oneQueue('vst-handoff-abort-');
    await a.quiesce(1000);
    const queued = fe.write(0, patterned(4096, 5));
    const { fds } = a.exportState();
    // the fds are still A's: a failed handoff closes only the receiver's copies
    for (const f of fds) expect(n.fdSize(f)).toBeGreaterThanOrEqual(0);
    a.resume();
    expect(await queued).toBe(BlkStatus.OK);
    expect((await fe.read(0, 4096)).data.equals(patterned(4096, 5))).toBe(true);
  });

  it('refuses to quiesce past its timeout while a request is stuck, and keeps serving', async () => {
    const { a, fe, vol } = await oneQueue('vst-handoff-stuck-');
    vol.delayMs = 1500;
    const stuck = fe.write(0, patterned(4096, 1));
    await new Promise((r) => setTimeout(r, 20));
    await expect(a.quiesce(200)).rejects.toThrow(/in flight/);
    vol.delayMs = 0;
    expect(await fe.write(8, patterned(4096, 2))).toBe(BlkStatus.OK); // served again at once
    expect(await stuck).toBe(BlkStatus.OK);
  });

  it('the handoff channel carries messages with more fds than one sendmsg takes, in order', async () => {
    const dir = tempDir('vst-handoff-ch-');
    const [tx, rx] = await channelPair(dir);
    cleanup.push(() => tx.close(), () => rx.close());
    const efds = Array.from({ length: 40 }, () => n.eventfd());
    cleanup.push(() => efds.forEach((f) => n.closeFd(f)));
    tx.send({ type: 'a', big: 'x'.repeat(100_000) }, efds);
    tx.send({ type: 'b' });
    tx.send({ type: 'c' }, efds.slice(0, 3));
    const m1 = await rx.receive(5000);
    expect(m1.msg.type).toBe('a');
    expect((m1.msg.big as string).length).toBe(100_000);
    expect(m1.fds.length).toBe(40);
    // each received fd is the same eventfd as the sent one at its index
    n.eventfdWrite(efds[37]!, 5);
    expect(n.eventfdRead(m1.fds[37]!)).toBe(5);
    expect((await rx.receive(5000)).msg.type).toBe('b');
    const m3 = await rx.receive(5000);
    expect([m3.msg.type, m3.fds.length]).toEqual(['c', 3]);
    for (const f of [...m1.fds, ...m3.fds]) n.closeFd(f);
    tx.close();
    await expect(rx.receive(5000)).rejects.toThrow(/closed/);
  });
});
