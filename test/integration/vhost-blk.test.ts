// The vhost-user front-end driver against two back ends — vstore's (a FileVolume behind a
// VhostUserServer) and qemu-storage-daemon's vhost-user-blk export — with the same tests, then
// bad input against vstore's: bad descriptors, corrupt rings, malformed messages.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FileVolume } from '../../lib/block/file.js';
import { MemoryVolume } from '../../lib/block/memory.js';
import { silentLogger } from '../../lib/log.js';
import { native } from '../../lib/native/index.js';
import { BlkStatus, BlkType, VirtioBlkDevice } from '../../lib/vhost/blk.js';
import { encodeMemTable, encodeMessage, encodeU64, encodeVringState, Req } from '../../lib/vhost/protocol.js';
import { InflightQueue, inflightQueueBytes } from '../../lib/vhost/inflight.js';
import { VhostUserServer } from '../../lib/vhost/server.js';
import { VRING_DESC_F_NEXT, VRING_DESC_F_WRITE } from '../../lib/vhost/virtqueue.js';
import { MiB, patterned, REPO_ROOT, requireCommands, sparseImage, tempDir } from '../helpers/index.js';
import { VhostUserFrontend, type FrontendOptions } from '../helpers/vhost-frontend.js';

const SIZE = 32 * MiB;
const SECTORS = SIZE / 512;

interface Backend {
  socket: string;
  image: string;
  stop(): Promise<void>;
}

async function vstoreBackend(dir: string, queues = 2): Promise<Backend & { server: VhostUserServer; device: VirtioBlkDevice }> {
  const image = path.join(dir, 'disk.img');
  sparseImage(image, SIZE);
  const vol = await FileVolume.open(image);
  const device = new VirtioBlkDevice({ volume: vol, logger: silentLogger(), numQueues: queues, serial: 'vstore-test' });
  const socket = path.join(dir, 'vu.sock');
  const server = await VhostUserServer.listen({ path: socket, device, logger: silentLogger() });
  return {
    socket,
    image,
    server,
    device,
    async stop() {
      await server.close();
      await vol.close();
    },
  };
}

async function qsdBackend(dir: string, queues = 2): Promise<Backend> {
  requireCommands('qemu-storage-daemon');
  const image = path.join(dir, 'disk.img');
  sparseImage(image, SIZE);
  const socket = path.join(dir, 'qsd.sock');
  const child: ChildProcess = spawn(
    'qemu-storage-daemon',
    [
      '--blockdev', `driver=file,node-name=f,filename=${image},discard=unmap`,
      '--export', `type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=${socket},writable=on,num-queues=${queues}`,
    ],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let log = '';
  child.stdout!.on('data', (b: Buffer) => (log += b));
  child.stderr!.on('data', (b: Buffer) => (log += b));
  const deadline = Date.now() + 10_000;
  while (!existsSync(socket)) {
    if (child.exitCode !== null || Date.now() > deadline) throw new Error(`qemu-storage-daemon did not start: ${log}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    socket,
    image,
    async stop() {
      if (child.exitCode !== null) return;
      const gone = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await gone;
    },
  };
}

/** Connects, retrying while the socket is not listening yet. */
async function connect(o: FrontendOptions): Promise<VhostUserFrontend> {
  for (let i = 0; ; i++) {
    try {
      return await VhostUserFrontend.connect(o);
    } catch (e) {
      if (i > 100 || !/ECONNREFUSED|ENOENT/.test(String(e))) throw e;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

const variants: { name: string; opts: Partial<FrontendOptions> }[] = [
  { name: 'event-idx, direct descriptors', opts: {} },
  { name: 'indirect descriptors, no event-idx', opts: { indirect: true, eventIdx: false } },
];

describe.each([
  ['vstore', vstoreBackend],
  ['qemu-storage-daemon', qsdBackend],
] as const)('front-end driver against %s', (_name, start) => {
  let be: Backend;
  beforeAll(async () => {
    be = await start(tempDir('vst-vu-'));
  });
  afterAll(async () => {
    await be?.stop();
  });

  for (const v of variants) {
    it(`reads and writes on two queues, concurrently, and the image holds the data (${v.name})`, async () => {
      const fe = await connect({ socket: be.socket, numQueues: 2, depth: 16, maxIo: 256 * 1024, ...v.opts });
      try {
        expect(fe.config.capacity).toBe(BigInt(SECTORS));
        expect(fe.config.numQueues).toBe(2);
        const model = readFileSync(be.image);
        const jobs: Promise<void>[] = [];
        for (let i = 0; i < 64; i++) {
          const len = ((i * 7919) % 64 + 1) * 4096;
          const sector = ((i * 104729) % (SECTORS - len / 512)) & ~7;
          const data = patterned(len, i + 1);
          data.copy(model, sector * 512);
          jobs.push(fe.write(sector, data, i % 2).then((s) => expect(s).toBe(BlkStatus.OK)));
          await Promise.resolve();
        }
        // Overlapping writes in flight together may land in any order: compare after they all settle.
        await Promise.all(jobs);
        // Rewrite the overlapping spans in order so that the model is exact.
        for (let i = 0; i < 64; i++) {
          const len = ((i * 7919) % 64 + 1) * 4096;
          const sector = ((i * 104729) % (SECTORS - len / 512)) & ~7;
          expect(await fe.write(sector, patterned(len, i + 1), i % 2)).toBe(BlkStatus.OK);
        }
        expect(await fe.flush()).toBe(BlkStatus.OK);
        const reads = [];
        for (let off = 0; off < SIZE; off += 256 * 1024) reads.push(fe.read(off / 512, 256 * 1024, (off >> 18) % 2));
        const got = await Promise.all(reads);
        for (const [k, r] of got.entries()) {
          expect(r.status).toBe(BlkStatus.OK);
          expect(r.len).toBe(256 * 1024 + 1);
          expect(r.data.equals(model.subarray(k * 256 * 1024, (k + 1) * 256 * 1024))).toBe(true);
        }
        expect(readFileSync(be.image).equals(model)).toBe(true);
      } finally {
        fe.close();
      }
    });
  }

  it('answers FLUSH, GET_ID, DISCARD, WRITE_ZEROES, and IOERR/UNSUPP for bad requests', async () => {
    const fe = await connect({ socket: be.socket, numQueues: 1, maxIo: 64 * 1024 });
    try {
      const id = await fe.getId();
      expect(id.status).toBe(BlkStatus.OK);
      expect(id.id.length).toBeGreaterThan(0);
      expect(await fe.write(2048, patterned(64 * 1024, 9))).toBe(BlkStatus.OK);
      // WRITE_ZEROES (with and without unmap) and DISCARD, one segment each (qsd allows one).
      expect(await fe.zeroOrDiscard(BlkType.WRITE_ZEROES, [{ sector: 2048, count: 8 }])).toBe(BlkStatus.OK);
      expect(await fe.zeroOrDiscard(BlkType.WRITE_ZEROES, [{ sector: 2056, count: 8, flags: 1 }])).toBe(BlkStatus.OK);
      const r = await fe.read(2048, 64 * 1024);
      expect(r.data.subarray(0, 8192).equals(Buffer.alloc(8192))).toBe(true);
      expect(r.data.subarray(8192).equals(patterned(64 * 1024, 9).subarray(8192))).toBe(true);
      expect(await fe.zeroOrDiscard(BlkType.DISCARD, [{ sector: 2048 + 64, count: 64 }])).toBe(BlkStatus.OK);
      expect(await fe.flush()).toBe(BlkStatus.OK);
      // Past the end, straddling the end, absurd sectors: IOERR.
      expect((await fe.read(SECTORS, 512)).status).toBe(BlkStatus.IOERR);
      expect((await fe.read(SECTORS - 1, 1024)).status).toBe(BlkStatus.IOERR);
      expect(await fe.write(2n ** 63n, Buffer.alloc(512))).toBe(BlkStatus.IOERR);
      expect(await fe.zeroOrDiscard(BlkType.WRITE_ZEROES, [{ sector: SECTORS - 1, count: 2 }])).toBe(BlkStatus.IOERR);
      // Unknown request types: UNSUPP.
      expect((await fe.blk(99, 0, { readLen: 512 })).status).toBe(BlkStatus.UNSUPP);
      // The last sector is still fine.
      expect((await fe.read(SECTORS - 1, 512)).status).toBe(BlkStatus.OK);
    } finally {
      fe.close();
    }
  });
});

describe('vstore vhost-user-blk back end under bad input', () => {
  let be: Awaited<ReturnType<typeof vstoreBackend>>;
  beforeAll(async () => {
    be = await vstoreBackend(tempDir('vst-vubad-'), 1);
  });
  afterAll(async () => {
    await be?.stop();
  });

  /** The connection still serves requests. */
  async function healthy(fe: VhostUserFrontend): Promise<void> {
    expect(await fe.write(0, patterned(4096, 3))).toBe(BlkStatus.OK);
    const r = await fe.read(0, 4096);
    expect(r.data.equals(patterned(4096, 3))).toBe(true);
  }

  /** The back end closes this connection, and serves the next one. */
  async function closesThenRecovers(fe: VhostUserFrontend, act: () => unknown): Promise<void> {
    try {
      const r = act();
      if (r instanceof Promise) await r.catch(() => {});
      await fe.whenClosed();
      expect(fe.closed).toBe(true);
    } finally {
      fe.close();
    }
    await be.server.idle();
    const next = await connect({ socket: be.socket });
    try {
      await healthy(next);
    } finally {
      next.close();
    }
  }

  it('answers requests with bad buffers with IOERR, or drops them when there is no status byte', async () => {
    const fe = await connect({ socket: be.socket });
    try {
      const s = fe.scratch();
      fe.mem.writeUInt32LE(BlkType.IN, s.header);
      fe.mem.writeBigUInt64LE(0n, s.header + 8);
      const W = VRING_DESC_F_WRITE;
      const N = VRING_DESC_F_NEXT;
      // Data buffer outside guest memory.
      fe.mem[s.status] = 0xff;
      let c = await fe.submitRaw(0, [
        { addr: s.header, len: 16, flags: N, next: 1 },
        { addr: 1n << 40n, len: 4096, flags: W | N, next: 2 },
        { addr: s.status, len: 1, flags: W },
      ]);
      expect(fe.mem[s.status]).toBe(BlkStatus.IOERR);
      expect(c.len).toBe(1);
      // Readable after writable.
      fe.mem[s.status] = 0xff;
      c = await fe.submitRaw(0, [
        { addr: s.header, len: 16, flags: N, next: 1 },
        { addr: s.data, len: 512, flags: W | N, next: 2 },
        { addr: s.data + 4096, len: 16, flags: N, next: 3 },
        { addr: s.status, len: 1, flags: W },
      ]);
      expect(fe.mem[s.status]).toBe(BlkStatus.IOERR);
      // Header too short; data length not a multiple of 512.
      for (const chain of [
        [{ addr: s.header, len: 8, flags: N, next: 1 }, { addr: s.status, len: 1, flags: W }],
        [{ addr: s.header, len: 16, flags: N, next: 1 }, { addr: s.data, len: 100, flags: W | N, next: 2 }, { addr: s.status, len: 1, flags: W }],
      ]) {
        fe.mem[s.status] = 0xff;
        await fe.submitRaw(0, chain);
        expect(fe.mem[s.status]).toBe(BlkStatus.IOERR);
      }
      // No device-writable byte at all: returned with nothing written, and the status untouched.
      fe.mem[s.status] = 0xff;
      c = await fe.submitRaw(0, [{ addr: s.header, len: 16, flags: 0 }]);
      expect(c.len).toBe(0);
      // Status byte outside memory: dropped too.
      c = await fe.submitRaw(0, [{ addr: s.header, len: 16, flags: N, next: 1 }, { addr: 1n << 50n, len: 1, flags: W }]);
      expect(c.len).toBe(0);
      // A write request whose data is device-writable: its "data" is read as the guest's output,
      // so it is an OUT with no data, and the status lands in the last writable byte.
      fe.mem.writeUInt32LE(BlkType.OUT, s.header);
      fe.mem[s.status] = 0xff;
      await fe.submitRaw(0, [{ addr: s.header, len: 16, flags: N, next: 1 }, { addr: s.status, len: 1, flags: W }]);
      expect(fe.mem[s.status]).toBe(BlkStatus.OK);
      await healthy(fe);
      expect(be.device.stats.dropped).toBeGreaterThanOrEqual(2);
    } finally {
      fe.close();
    }
  });

  it('closes the connection on a descriptor loop, and serves the next front end', async () => {
    const fe = await connect({ socket: be.socket });
    const s = fe.scratch();
    await closesThenRecovers(fe, () =>
      fe.submitRaw(0, [
        { addr: s.header, len: 16, flags: VRING_DESC_F_NEXT, next: 1 },
        { addr: s.data, len: 16, flags: VRING_DESC_F_NEXT, next: 0 },
      ]),
    );
  });

  it('closes the connection on a head out of range', async () => {
    const fe = await connect({ socket: be.socket, queueSize: 8 });
    await closesThenRecovers(fe, () => fe.submitRaw(0, [{ addr: 0, len: 1, flags: 0 }], 9));
  });

  it('closes the connection when the avail index runs ahead of the queue size', async () => {
    const fe = await connect({ socket: be.socket, queueSize: 8 });
    await closesThenRecovers(fe, () => {
      const q = fe.queue(0);
      Atomics.store(q.avail16, 1, 100);
      fe.kick(0);
    });
  });

  it('closes the connection on malformed messages, and carries on', async () => {
    const bad: [string, (fe: VhostUserFrontend) => void][] = [
      ['short SET_VRING_NUM', (fe) => fe.send(Req.SET_VRING_NUM, Buffer.alloc(4))],
      ['SET_VRING_KICK without its fd', (fe) => fe.send(Req.SET_VRING_KICK, encodeU64(0n))],
      ['SET_MEM_TABLE without fds', (fe) => fe.send(Req.SET_MEM_TABLE, Buffer.from([1, 0, 0, 0, 0, 0, 0, 0, ...new Array(32).fill(0)]))],
      ['unknown request', (fe) => fe.send(99)],
      ['queue index out of range', (fe) => fe.send(Req.SET_VRING_NUM, encodeVringState({ index: 7, num: 8 }))],
      ['queue size not a power of two', (fe) => fe.send(Req.SET_VRING_NUM, encodeVringState({ index: 0, num: 100 }))],
      ['a GET with an fd', (fe) => fe.send(Req.GET_FEATURES, undefined, [fe.n.eventfd()])],
      ['a header with a wrong version', (fe) => fe.sendRaw(Buffer.from([1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]))],
      ['a memory region past the end of its memfd', (fe) => {
        const small = fe.n.memfdCreate('small', 4096);
        fe.send(Req.SET_MEM_TABLE, encodeMemTable([{ guestAddr: 0n, size: 1n << 30n, userAddr: 1n << 40n, mmapOffset: 0n }]), [small]);
        fe.n.closeFd(small);
      }],
      ['a payload size past the limit', (fe) => fe.sendRaw(Buffer.from([1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0]))],
    ];
    for (const [name, act] of bad) {
      const fe = VhostUserFrontend.raw({ socket: be.socket });
      await new Promise((r) => setTimeout(r, 10));
      try {
        act(fe);
        await Promise.race([fe.whenClosed(), new Promise((_, rej) => setTimeout(() => rej(new Error(`${name}: not closed`)), 3000))]);
      } finally {
        fe.close();
      }
      await be.server.idle();
    }
    const ok = await connect({ socket: be.socket });
    try {
      await healthy(ok);
    } finally {
      ok.close();
    }
  });

  it('closes a front end that floods requests and never reads the replies, without stalling', async () => {
    const fe = VhostUserFrontend.raw({ socket: be.socket });
    const chunk = Buffer.concat(Array.from({ length: 200 }, () => encodeMessage(Req.GET_FEATURES, 0)));
    const started = Date.now();
    fe.reading(false);
    try {
      for (let i = 0; i < 5000 && !fe.closed; i++) {
        try {
          fe.sendRaw(chunk, undefined, 0);
        } catch {
          // our side is full too: let the back end run
        }
        await new Promise((r) => setImmediate(r));
        if (i % 50 === 49 && !be.server.connected) break;
      }
      expect(be.server.connected).toBe(false); // the back end gave up on it
      fe.reading(true);
      await fe.whenClosed();
    } finally {
      fe.close();
    }
    expect(Date.now() - started).toBeLessThan(20_000);
    await be.server.idle();
    const ok = await connect({ socket: be.socket });
    try {
      await healthy(ok);
    } finally {
      ok.close();
    }
  });

  it('refuses a second front end while one is connected', async () => {
    const fe = await connect({ socket: be.socket });
    try {
      const second = VhostUserFrontend.raw({ socket: be.socket });
      await second.whenClosed();
      second.close();
      await healthy(fe);
    } finally {
      fe.close();
    }
  });

  it('GET_VRING_BASE waits for in-flight requests and returns the next avail index', async () => {
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const vol = new MemoryVolume({ size: 4 * MiB, hook: (op) => (op === 'read' ? gate : undefined) });
    const dev = new VirtioBlkDevice({ volume: vol, logger: silentLogger() });
    const sock = path.join(tempDir('vst-vubase-'), 's.sock');
    const srv = await VhostUserServer.listen({ path: sock, device: dev, logger: silentLogger() });
    const fe = await connect({ socket: sock });
    try {
      expect(await fe.write(0, patterned(4096, 1))).toBe(BlkStatus.OK);
      const reads = [fe.read(0, 4096), fe.read(8, 4096), fe.read(16, 4096)];
      await new Promise((r) => setTimeout(r, 20));
      let answered = false;
      const base = fe.stopQueue(0).then((b) => {
        answered = true;
        return b;
      });
      await new Promise((r) => setTimeout(r, 50));
      expect(answered).toBe(false); // still waiting for the three reads
      release();
      expect(await base).toBe(4);
      const got = await Promise.all(reads);
      expect(got.map((g) => g.status)).toEqual([0, 0, 0]);
      expect(got[0]!.data.equals(patterned(4096, 1))).toBe(true);
    } finally {
      fe.close();
      await srv.close();
    }
  });

  it('maps memory given with ADD_MEM_REG (CONFIGURE_MEM_SLOTS) as well as SET_MEM_TABLE', async () => {
    const fe = await connect({ socket: be.socket, memSlots: true });
    try {
      await healthy(fe);
    } finally {
      fe.close();
    }
  });
});

describe('vstore vhost-blk command (built CLI in dist/)', () => {
  it('serves an image until SIGTERM, then flushes, removes the socket and exits 0', async () => {
    const cli = path.join(REPO_ROOT, 'dist/lib/vhost/cli.js');
    if (!existsSync(cli)) throw new Error('vstore is not built (dist/lib/vhost/cli.js missing): run `npm run build`');
    const dir = tempDir('vst-vucli-');
    const image = path.join(dir, 'disk.img');
    sparseImage(image, 8 * MiB);
    const socket = path.join(dir, 'cli.sock');
    const code = `import { vhostBlkCommand } from ${JSON.stringify(cli)}; await vhostBlkCommand().parseAsync(process.argv.slice(1), { from: "user" });`;
    const child = spawn(process.execPath, ['--input-type=module', '-e', code, image, '--socket', socket, '--queues', '2', '--serial', 'cli-disk'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let log = '';
    child.stderr!.on('data', (b: Buffer) => (log += b));
    const exited = new Promise<number | null>((r) => child.once('exit', (c) => r(c)));
    try {
      const deadline = Date.now() + 15_000;
      while (!existsSync(socket)) {
        if (child.exitCode !== null || Date.now() > deadline) throw new Error(`vhost-blk did not start: ${log}`);
        await new Promise((r) => setTimeout(r, 20));
      }
      const fe = await connect({ socket, numQueues: 2 });
      try {
        expect(fe.config.capacity).toBe(BigInt((8 * MiB) / 512));
        expect((await fe.getId()).id).toBe('cli-disk');
        expect(await fe.write(16, patterned(8192, 5), 1)).toBe(BlkStatus.OK);
      } finally {
        fe.close();
      }
    } finally {
      child.kill('SIGTERM');
    }
    expect(await exited, log).toBe(0);
    expect(existsSync(socket)).toBe(false);
    expect(readFileSync(image).subarray(16 * 512, 16 * 512 + 8192).equals(patterned(8192, 5))).toBe(true);
  });
});

describe('reconnect with the inflight area (INFLIGHT_SHMFD)', () => {
  it('resubmits requests that were in flight when the connection died; the front end sees them complete', async () => {
    let gate: Promise<void> | null = null;
    let release!: () => void;
    let writes = 0;
    const vol = new MemoryVolume({
      size: 4 * MiB,
      hook: (op) => {
        if (op !== 'write') return undefined;
        writes++;
        return gate ?? undefined;
      },
    });
    const device = new VirtioBlkDevice({ volume: vol, logger: silentLogger() });
    const socket = path.join(tempDir('vst-vuinf-'), 's.sock');
    const server = await VhostUserServer.listen({ path: socket, device, logger: silentLogger() });
    const fe = await connect({ socket, inflight: true });
    try {
      expect(fe.inflightFd).toBeGreaterThanOrEqual(0);
      expect(await fe.write(0, patterned(4096, 1))).toBe(BlkStatus.OK); // completed before: not resubmitted
      gate = new Promise<void>((r) => (release = r));
      const stuck = [1, 2, 3].map((i) => fe.write(i * 64, patterned(4096, 10 + i)));
      while (writes < 4) await new Promise((r) => setTimeout(r, 5));
      await server.disconnect(); // the back end "dies" with three writes in flight
      await fe.whenClosed();
      await fe.reconnect();
      expect(fe.connections).toBe(2);
      while (writes < 7) await new Promise((r) => setTimeout(r, 5)); // the three, resubmitted
      release();
      expect(await Promise.all(stuck)).toEqual([0, 0, 0]);
      expect(writes).toBe(7);
      for (const i of [1, 2, 3]) expect((await fe.read(i * 64, 4096)).data.equals(patterned(4096, 10 + i))).toBe(true);
      expect((await fe.read(0, 4096)).data.equals(patterned(4096, 1))).toBe(true);
      // And the ring goes on from there.
      expect(await fe.write(512, patterned(4096, 99))).toBe(BlkStatus.OK);
    } finally {
      release?.();
      fe.close();
      await server.close();
    }
  });

  it('survives SIGKILL of the vstore process under a write load: restarted, it finishes every write', async () => {
    const cli = path.join(REPO_ROOT, 'dist/lib/vhost/cli.js');
    if (!existsSync(cli)) throw new Error('vstore is not built (dist/lib/vhost/cli.js missing): run `npm run build`');
    const dir = tempDir('vst-vukill-');
    const image = path.join(dir, 'disk.img');
    sparseImage(image, 64 * MiB);
    const socket = path.join(dir, 'kill.sock');
    const code = `import { vhostBlkCommand } from ${JSON.stringify(cli)}; await vhostBlkCommand().parseAsync(process.argv.slice(1), { from: "user" });`;
    const startCli = async (): Promise<ChildProcess> => {
      const child = spawn(process.execPath, ['--input-type=module', '-e', code, image, '--socket', socket, '--log-level', 'info'], { stdio: ['ignore', 'pipe', 'pipe'] });
      let log = '';
      child.stderr!.on('data', (b: Buffer) => (log += b));
      (child as ChildProcess & { log: () => string }).log = () => log;
      const deadline = Date.now() + 15_000;
      while (!existsSync(socket) || !log.includes('vhost-blk: serving')) {
        if (child.exitCode !== null || Date.now() > deadline) throw new Error(`vhost-blk did not start: ${log}`);
        await new Promise((r) => setTimeout(r, 20));
      }
      return child;
    };
    let child = await startCli();
    const fe = await connect({ socket, inflight: true, queueSize: 128, depth: 16, maxIo: 256 * 1024 });
    const BLOCK = 256 * 1024;
    const TOTAL = 240;
    try {
      // 240 writes of 256 KiB, 16 in flight, each to its own place.
      let next = 0;
      const statuses: number[] = [];
      const worker = async () => {
        while (next < TOTAL) {
          const i = next++;
          statuses[i] = await fe.write((i * BLOCK) / 512, patterned(BLOCK, i + 1));
        }
      };
      const load = Promise.all(Array.from({ length: 16 }, worker));
      // Kill the back end while it holds requests it took off the ring: stop it (SIGSTOP), look at
      // the inflight area it shares with us, and kill it only if requests are flagged there (at
      // least two: one may be completed but not yet cleared); otherwise let it go on and try again.
      const [area] = native().mmapShared(fe.inflightFd, 0, inflightQueueBytes(128), inflightQueueBytes(128), true);
      const track = new InflightQueue(new Uint8Array(area!), 128);
      const flagged = () => Array.from({ length: 128 }, (_, h) => track.isInflight(h)).filter(Boolean).length;
      const stopped = (pid: number) => /^\d+ \(.*\) T/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
      let atKill = 0;
      while (next < TOTAL - 32 && atKill === 0) {
        await new Promise((r) => setTimeout(r, 1));
        if (next < 40) continue;
        child.kill('SIGSTOP');
        while (!stopped(child.pid!)) await new Promise((r) => setTimeout(r, 1));
        if (flagged() >= 2) {
          atKill = flagged();
          child.kill('SIGKILL');
        } else child.kill('SIGCONT');
      }
      expect(atKill, 'the back end never held two requests at once').toBeGreaterThanOrEqual(2);
      await new Promise((r) => (child.exitCode !== null || child.signalCode !== null ? r(null) : child.once('exit', r)));
      await fe.whenClosed();
      child = await startCli(); // the stale socket is replaced
      await fe.reconnect();
      await load;
      // The restarted back end found those requests in the inflight area and ran them again.
      const log2 = (child as ChildProcess & { log: () => string }).log();
      expect(log2).toMatch(/resuming from the inflight area/);
      const resubmit = Number(/"resubmit":(\d+)[^\n]*resuming from the inflight area/.exec(log2)?.[1]);
      expect(resubmit).toBeGreaterThanOrEqual(atKill - 1);
      expect(statuses.length).toBe(TOTAL);
      expect(statuses.every((s) => s === BlkStatus.OK)).toBe(true);
      expect(await fe.flush()).toBe(BlkStatus.OK);
      const img = readFileSync(image);
      for (let i = 0; i < TOTAL; i++) {
        if (!img.subarray(i * BLOCK, (i + 1) * BLOCK).equals(patterned(BLOCK, i + 1))) throw new Error(`write ${i} lost`);
      }
    } finally {
      fe.close();
      child.kill('SIGTERM');
      await new Promise((r) => (child.exitCode !== null ? r(null) : child.once('exit', r)));
    }
  });
});
