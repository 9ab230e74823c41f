// Fuzzing the vhost-user back end over a real socket: random sequences of (mostly well-formed)
// messages with random fds, including ring setups over random memory and kicks. Whatever
// happens to a connection, the process survives, leaks no fd, and serves the next front end.
import { readdirSync } from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MemoryVolume } from '../../../lib/block/memory.js';
import { silentLogger } from '../../../lib/log.js';
import { BlkStatus, VirtioBlkDevice } from '../../../lib/vhost/blk.js';
import {
  encodeConfig,
  encodeInflight,
  encodeMemRegionMsg,
  encodeMemTable,
  encodeMessage,
  encodeU64,
  encodeVringAddr,
  encodeVringState,
  FLAG_NEED_REPLY,
  Req,
} from '../../../lib/vhost/protocol.js';
import { VhostUserServer } from '../../../lib/vhost/server.js';
import { tempDir } from '../../helpers/tmp.js';
import { VhostUserFrontend } from '../../helpers/vhost-frontend.js';

const MEM = 1 << 20;
const UVA = 0x7f0000000000;
/** Queue 0 of a set-up run: 16 entries, descriptors at 0, avail ring at 256, used ring at 512. */
const RING_AREA = 1024;

/** QEMU's start sequence, leaving queue 0 running over the fuzz memory. */
function setup(fe: VhostUserFrontend, memfd: number, kick: number, call: number): void {
  const send = (r: number, p?: Uint8Array, fds?: number[]) => fe.sendRaw(encodeMessage(r, 0, p), fds, 0);
  send(Req.SET_PROTOCOL_FEATURES, encodeU64((1n << 0n) | (1n << 9n) | (1n << 12n)));
  send(Req.SET_FEATURES, encodeU64((1n << 32n) | (1n << 28n) | (1n << 29n) | (1n << 30n)));
  send(Req.SET_MEM_TABLE, encodeMemTable([{ guestAddr: 0n, size: BigInt(MEM), userAddr: BigInt(UVA), mmapOffset: 0n }]), [memfd]);
  send(Req.GET_INFLIGHT_FD, encodeInflight({ mmapSize: 0n, mmapOffset: 0n, numQueues: 1, queueSize: 16 }));
  send(Req.SET_VRING_NUM, encodeVringState({ index: 0, num: 16 }));
  send(Req.SET_VRING_BASE, encodeVringState({ index: 0, num: 0 }));
  send(Req.SET_VRING_ADDR, encodeVringAddr({ index: 0, flags: 0, desc: BigInt(UVA), avail: BigInt(UVA + 256), used: BigInt(UVA + 512), log: 0n }));
  send(Req.SET_VRING_KICK, encodeU64(0n), [kick]);
  send(Req.SET_VRING_CALL, encodeU64(0n), [call]);
  send(Req.SET_VRING_ENABLE, encodeVringState({ index: 0, num: 1 }));
}

type FdKind = 'none' | 'eventfd' | 'memfd' | 'two';
interface Msg {
  request: number;
  flags: number;
  payload: Uint8Array;
  fd: FdKind;
  /** Scribble over guest memory and kick queue 0 after sending. */
  scribble: number[] | null;
}

const small = fc.integer({ min: 0, max: 3 });
const addr = fc.oneof(fc.integer({ min: 0, max: MEM + 64 }).map((o) => BigInt(UVA + o)), fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }));
const region = fc.record({
  guestAddr: fc.oneof(fc.constant(0n), fc.bigInt({ min: 0n, max: 1n << 40n })),
  size: fc.oneof(fc.constant(BigInt(MEM)), fc.bigInt({ min: 0n, max: 1n << 32n })),
  userAddr: fc.oneof(fc.constant(BigInt(UVA)), fc.bigInt({ min: 0n, max: (1n << 64n) - 1n })),
  mmapOffset: fc.oneof(fc.constant(0n), fc.bigInt({ min: 0n, max: 1n << 21n })),
});

const payloadFor: Record<number, fc.Arbitrary<Uint8Array>> = {
  [Req.SET_FEATURES]: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }).map((v) => encodeU64(v & ((1n << 40n) - 1n))),
  [Req.SET_PROTOCOL_FEATURES]: fc.bigInt({ min: 0n, max: 0xffffn }).map(encodeU64),
  [Req.SET_MEM_TABLE]: fc.array(region, { maxLength: 2 }).map(encodeMemTable),
  [Req.ADD_MEM_REG]: region.map(encodeMemRegionMsg),
  [Req.REM_MEM_REG]: region.map(encodeMemRegionMsg),
  [Req.SET_VRING_NUM]: fc.record({ index: small, num: fc.constantFrom(0, 3, 8, 16, 256, 65536) }).map(encodeVringState),
  [Req.SET_VRING_BASE]: fc.record({ index: small, num: fc.integer({ min: 0, max: 70000 }) }).map(encodeVringState),
  [Req.GET_VRING_BASE]: fc.record({ index: small, num: fc.constant(0) }).map(encodeVringState),
  [Req.SET_VRING_ENABLE]: fc.record({ index: small, num: fc.integer({ min: 0, max: 2 }) }).map(encodeVringState),
  [Req.SET_VRING_ADDR]: fc.record({ index: small, flags: fc.constantFrom(0, 1), desc: addr, used: addr, avail: addr, log: fc.constant(0n) }).map(encodeVringAddr),
  [Req.SET_VRING_KICK]: fc.integer({ min: 0, max: 0x1ff }).map((v) => encodeU64(BigInt(v))),
  [Req.SET_VRING_CALL]: fc.integer({ min: 0, max: 0x1ff }).map((v) => encodeU64(BigInt(v))),
  [Req.SET_VRING_ERR]: fc.integer({ min: 0, max: 0x1ff }).map((v) => encodeU64(BigInt(v))),
  [Req.GET_CONFIG]: fc.record({ offset: fc.integer({ min: 0, max: 300 }), flags: fc.constant(0), data: fc.integer({ min: 0, max: 300 }).map((n) => Buffer.alloc(n)) }).map((c) => {
    try {
      return encodeConfig(c);
    } catch {
      return Buffer.alloc(12);
    }
  }),
  [Req.GET_INFLIGHT_FD]: fc.record({ mmapSize: fc.constant(0n), mmapOffset: fc.constant(0n), numQueues: fc.integer({ min: 0, max: 3 }), queueSize: fc.constantFrom(0, 7, 8, 128, 32768) }).map(encodeInflight),
};

const msg: fc.Arbitrary<Msg> = fc
  .oneof(
    { weight: 8, arbitrary: fc.constantFrom(...Object.keys(payloadFor).map(Number)).chain((r) => fc.tuple(fc.constant(r), payloadFor[r]!)) },
    { weight: 2, arbitrary: fc.tuple(fc.constantFrom(Req.GET_FEATURES, Req.GET_PROTOCOL_FEATURES, Req.SET_OWNER, Req.GET_QUEUE_NUM, Req.GET_MAX_MEM_SLOTS, Req.RESET_DEVICE), fc.constant(new Uint8Array(0))) },
    { weight: 1, arbitrary: fc.tuple(fc.integer({ min: 0, max: 45 }), fc.uint8Array({ maxLength: 64 })) },
  )
  .chain(([request, payload]) =>
    fc.record({
      request: fc.constant(request),
      flags: fc.constantFrom(0, FLAG_NEED_REPLY),
      payload: fc.constant(payload),
      fd: fc.oneof({ weight: 12, arbitrary: fc.constant<FdKind>('none') }, fc.constantFrom<FdKind>('eventfd', 'memfd', 'two')),
      scribble: fc.option(fc.array(fc.integer({ min: 0, max: 0xffff }), { minLength: 1, maxLength: 64 }), { freq: 4 }),
    }),
  );

describe('vhost-user back end fuzzing', () => {
  let server: VhostUserServer;
  let socket: string;
  beforeAll(async () => {
    socket = path.join(tempDir('vst-vufz-'), 's.sock');
    const device = new VirtioBlkDevice({ volume: new MemoryVolume({ size: 1 << 20 }), logger: silentLogger(), numQueues: 2 });
    server = await VhostUserServer.listen({ path: socket, device, logger: silentLogger() });
  });
  afterAll(async () => {
    await server?.close();
  });

  it('survives random message sequences without leaking fds, and serves the next front end', async () => {
    const fdsBefore = readdirSync('/proc/self/fd').length;
    await fc.assert(
      fc.asyncProperty(fc.boolean(), fc.array(msg, { minLength: 1, maxLength: 25 }), async (withSetup, seq) => {
        const start = readdirSync('/proc/self/fd').length;
        const fe = VhostUserFrontend.raw({ socket, timeoutMs: 2000 });
        const memfd = fe.n.memfdCreate('fuzz', MEM);
        const [ab] = fe.n.mmapShared(memfd, 0, MEM, 1 << 30);
        const ram = Buffer.from(ab!);
        const kick = fe.n.eventfd();
        const call = fe.n.eventfd();
        try {
          if (withSetup) setup(fe, memfd, kick, call);
          for (const m of seq) {
            if (fe.closed) break;
            const fds = m.fd === 'none' ? [] : m.fd === 'eventfd' ? [kick] : m.fd === 'memfd' ? [memfd] : [memfd, kick];
            try {
              fe.sendRaw(encodeMessage(m.request, m.flags, m.payload), fds, 0);
            } catch {
              break; // the back end closed (or is not reading): this connection is done
            }
            if (m.scribble) {
              // Mostly over the rings (descriptors, avail ring, used ring), sometimes anywhere.
              m.scribble.forEach((v, i) => ram.writeUInt16LE(v, i % 4 === 3 ? (v * 16 + i * 2) % (MEM - 2) : (v * 2 + i * 2) % RING_AREA));
              // Usually make 0-4 entries available past what was used, so chains get walked.
              if (m.scribble[0]! % 8 !== 0) ram.writeUInt16LE((ram.readUInt16LE(512 + 2) + (m.scribble[0]! % 5)) & 0xffff, 256 + 2);
              fe.n.eventfdWrite(kick);
            }
            await new Promise((r) => setImmediate(r));
          }
          await new Promise((r) => setTimeout(r, 2));
        } finally {
          fe.close();
          fe.n.closeFd(memfd);
          fe.n.closeFd(kick);
          fe.n.closeFd(call);
        }
        await server.idle();
        for (let i = 0; i < 25 && readdirSync('/proc/self/fd').length !== start; i++) await new Promise((r) => setTimeout(r, 20));
        expect(readdirSync('/proc/self/fd').length).toBe(start);
      }),
      { numRuns: 200 },
    );
    // A well-behaved front end is served as if nothing happened.
    const ok = await VhostUserFrontend.connect({ socket });
    try {
      expect(await ok.write(8, Buffer.alloc(4096, 7))).toBe(BlkStatus.OK);
      expect((await ok.read(8, 4096)).data.equals(Buffer.alloc(4096, 7))).toBe(true);
    } finally {
      ok.close();
    }
    await server.idle();
    // Messages queued behind a closed connection are dropped (and their fds closed) a few ticks
    // after it ends: wait for the count to settle; a real leak never does.
    for (let i = 0; i < 100 && readdirSync('/proc/self/fd').length !== fdsBefore; i++) await new Promise((r) => setTimeout(r, 20));
    expect(readdirSync('/proc/self/fd').length).toBe(fdsBefore);
  });
});
