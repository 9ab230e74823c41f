/**
 * The live NBD server under fire: several clients throw random bytes and mutated frames at it
 * (handshake and transmission phases, truncated payloads, abrupt disconnects) while one
 * well-behaved client keeps writing, reading and verifying its data. The server must stay up,
 * the good client must always see correct data, and nothing may leak (connections, in-flight
 * requests) once the fuzzers are gone. Loopback unix socket only; bounded in time.
 *
 * Reproduce a run with VSTORE_FUZZ_SEED=<seed printed on failure>.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { MemoryVolume } from '../../lib/block/memory.js';
import * as codec from '../../lib/nbd/codec.js';
import * as C from '../../lib/nbd/constants.js';
import { NbdServer } from '../../lib/nbd/server.js';
import { silentLogger } from '../../lib/log.js';
import { RawClient } from '../unit/nbd/rawclient.js';

const DURATION_MS = Number(process.env.VSTORE_FUZZ_MS ?? 8000);
const FUZZERS = 4;
const SEED = Number(process.env.VSTORE_FUZZ_SEED ?? Date.now() % 1_000_000);
const MiB = 1024 * 1024;

/** xorshift32: a small seeded PRNG so a failing run can be replayed. */
function rng(seed: number) {
  let x = seed >>> 0 || 0x9e3779b9;
  const next = (): number => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 0x100000000;
  };
  return {
    float: next,
    int: (n: number) => Math.floor(next() * n),
    pick: <T>(a: readonly T[]): T => a[Math.floor(next() * a.length)]!,
    bytes: (n: number) => {
      const b = Buffer.allocUnsafe(n);
      for (let i = 0; i < n; i++) b[i] = Math.floor(next() * 256);
      return b;
    },
  };
}
type Rng = ReturnType<typeof rng>;

function mutate(r: Rng, frame: Buffer): Buffer {
  let b = Buffer.from(frame);
  const n = r.int(4);
  for (let i = 0; i < n; i++) {
    switch (r.int(5)) {
      case 0: // flip a byte
        if (b.length) b[r.int(b.length)] = r.int(256);
        break;
      case 1: // truncate
        b = b.subarray(0, r.int(b.length + 1));
        break;
      case 2: // splice random bytes in
        b = Buffer.concat([b.subarray(0, r.int(b.length + 1)), r.bytes(r.int(40)), b.subarray(r.int(b.length + 1))]);
        break;
      case 3: // set a 32-bit field to an extreme
        if (b.length >= 4) b.writeUInt32BE(r.pick([0, 1, 0x7fffffff, 0xffffffff, 0x8000, 4096]), r.int(b.length - 3));
        break;
      default: // duplicate
        b = Buffer.concat([b, b]);
    }
  }
  return b;
}

const EXPORTS = ['fuzz', 'good-ro'];

function optionFrames(r: Rng): Buffer[] {
  const name = r.pick(EXPORTS);
  return [
    codec.encodeOption(C.NBD_OPT_LIST),
    codec.encodeOption(C.NBD_OPT_STRUCTURED_REPLY),
    codec.encodeOption(C.NBD_OPT_INFO, codec.encodeInfoRequest(name, [C.NBD_INFO_BLOCK_SIZE, C.NBD_INFO_NAME])),
    codec.encodeOption(C.NBD_OPT_LIST_META_CONTEXT, codec.encodeMetaContextRequest(name, [])),
    codec.encodeOption(C.NBD_OPT_SET_META_CONTEXT, codec.encodeMetaContextRequest(name, ['base:allocation', 'x-y:z'])),
    codec.encodeOption(C.NBD_OPT_STARTTLS),
    codec.encodeOption(r.int(40), r.bytes(r.int(20))),
  ];
}

function requestFrame(r: Rng): Buffer {
  const type = r.pick([0, 0, 1, 1, 3, 4, 5, 6, 7, r.int(20)]);
  const flags = r.float() < 0.7 ? r.pick([0, 1, 2, 4, 8, 16]) : r.int(0x10000);
  const length = r.pick([0, 1, 512, 4096, 65536, r.int(2 * MiB), 0xffffffff]);
  const offset = r.pick([0, 512, 4 * MiB - 512, 8 * MiB, r.int(8 * MiB)]);
  const payload = type === 1 && length <= 2 * MiB ? r.bytes(Math.min(length, r.float() < 0.8 ? length : r.int(length + 1))) : undefined;
  return codec.encodeRequest({ type, flags, handle: BigInt(r.int(1000)), offset, length }, payload);
}

/** One hostile connection; resolves when it is over (whatever the server did). */
async function fuzzConnection(sock: string, r: Rng): Promise<void> {
  const s = net.connect({ path: sock });
  s.on('error', () => {});
  s.on('data', () => {});
  await new Promise<void>((resolve) => {
    s.once('connect', resolve);
    s.once('close', resolve);
  });
  const send = (b: Buffer) => {
    if (!s.destroyed) s.write(b);
  };
  const pause = () => new Promise((res) => setTimeout(res, r.int(3) === 0 ? r.int(30) : 0));
  const mode = r.int(4);
  if (mode === 0) {
    // Pure noise.
    for (let i = r.int(5) + 1; i > 0; i--) {
      send(r.bytes(r.int(3000)));
      await pause();
    }
  } else {
    send(codec.encodeClientFlags(r.float() < 0.9 ? C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES : r.int(8)));
    const opts = optionFrames(r);
    for (let i = r.int(6); i > 0; i--) {
      const f = r.pick(opts);
      send(mode === 1 ? mutate(r, f) : f);
      await pause();
    }
    if (mode >= 2) {
      // Enter transmission properly, then misbehave there.
      const name = r.pick(EXPORTS);
      send(codec.encodeOption(C.NBD_OPT_STRUCTURED_REPLY));
      send(codec.encodeOption(C.NBD_OPT_SET_META_CONTEXT, codec.encodeMetaContextRequest(name, [C.BASE_ALLOCATION])));
      send(
        r.float() < 0.5
          ? codec.encodeOption(C.NBD_OPT_GO, codec.encodeInfoRequest(name, [C.NBD_INFO_BLOCK_SIZE]))
          : codec.encodeOption(C.NBD_OPT_EXPORT_NAME, Buffer.from(name)),
      );
      for (let i = r.int(30) + 1; i > 0; i--) {
        const f = requestFrame(r);
        send(mode === 3 && r.float() < 0.3 ? mutate(r, f) : f);
        if (r.int(4) === 0) await pause();
      }
      if (r.int(3) === 0) send(codec.encodeRequest({ type: C.NBD_CMD_DISC, offset: 0, length: 0 }));
    }
  }
  await new Promise((res) => setTimeout(res, r.int(100)));
  if (r.int(2) === 0) s.end();
  s.destroy();
}

describe('NBD server fuzzing', () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'vstore-nbd-fuzz-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it(`stays up and keeps a good client's data correct (seed ${SEED})`, async () => {
    const sock = path.join(dir, 'nbd.sock');
    const good = new MemoryVolume({ size: 8 * MiB });
    const server = new NbdServer({ logger: silentLogger(), handshakeTimeoutMs: 1000, maxPayload: MiB, maxInflightPerConnection: 16 });
    server.addExport({ name: 'good', volume: good });
    server.addExport({ name: 'good-ro', volume: good, readOnly: true });
    server.addExport({ name: 'fuzz', volume: new MemoryVolume({ size: 8 * MiB }) });
    await server.listen({ unix: sock });
    const deadline = Date.now() + DURATION_MS;

    let fuzzConns = 0;
    const fuzzers = Array.from({ length: FUZZERS }, async (_, i) => {
      const r = rng(SEED * 31 + i);
      while (Date.now() < deadline) {
        await fuzzConnection(sock, r);
        fuzzConns++;
      }
    });

    // The good client: random writes into a model, reads verified against it, flushes.
    const goodClient = async (): Promise<number> => {
      const r = rng(SEED ^ 0x5a5a5a);
      const c = await RawClient.connect(sock);
      await c.handshake({ name: 'good' });
      const model = Buffer.alloc(8 * MiB);
      let verified = 0;
      while (Date.now() < deadline) {
        const len = r.pick([512, 4096, 65536, 200_000]);
        const off = r.int(8 * MiB - len);
        const op = r.int(10);
        if (op < 4) {
          const data = r.bytes(len);
          const w = await c.cmd(C.NBD_CMD_WRITE, off, len, { payload: data });
          expect(w.error).toBe(0);
          data.copy(model, off);
        } else if (op < 5) {
          expect((await c.cmd(C.NBD_CMD_WRITE_ZEROES, off, len)).error).toBe(0);
          model.fill(0, off, off + len);
        } else if (op < 6) {
          expect((await c.cmd(C.NBD_CMD_FLUSH, 0, 0)).error).toBe(0);
        } else {
          const rd = await c.readAt(off, len, r.int(3) === 0 ? C.NBD_CMD_FLAG_DF : 0);
          expect(rd.error).toBe(0);
          expect(rd.data!.equals(model.subarray(off, off + len)), `read ${off}+${len} (seed ${SEED})`).toBe(true);
          verified++;
        }
      }
      // Everything the server holds matches the model.
      for (let off = 0; off < 8 * MiB; off += MiB) {
        const rd = await c.readAt(off, MiB);
        expect(rd.data!.equals(model.subarray(off, off + MiB)), `final ${off} (seed ${SEED})`).toBe(true);
      }
      await c.disconnect();
      return verified;
    };

    const [verified] = await Promise.all([goodClient(), ...fuzzers]);
    expect(verified).toBeGreaterThan(20);
    expect(fuzzConns).toBeGreaterThan(20);

    // Nothing leaked: every fuzz connection is gone, nothing is in flight.
    const until = Date.now() + 5000;
    while (server.stats().connections > 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
    const st = server.stats();
    expect(st.connections).toBe(0);
    for (const e of st.exports) expect(e.inflight).toBe(0);

    // A fresh client still gets through, then the server closes cleanly.
    const after = await RawClient.connect(sock);
    await after.handshake({ name: 'fuzz' });
    expect((await after.readAt(0, 4096)).error).toBe(0);
    const t0 = Date.now();
    await server.close();
    expect(Date.now() - t0).toBeLessThan(5000);
    after.destroy();
  });
});
