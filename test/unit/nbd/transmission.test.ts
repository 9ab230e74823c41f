/** The transmission phase of the NBD server: commands, flags, errors, concurrency, lifecycle. */
import { existsSync, writeFileSync, rmSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { afterEach, describe, expect, it } from 'vitest';
import { VolumeError } from '../../../lib/block/errors.js';
import { MemoryVolume } from '../../../lib/block/memory.js';
import * as codec from '../../../lib/nbd/codec.js';
import * as C from '../../../lib/nbd/constants.js';
import { gate, MiB, pattern, sleep, startHarness, type Harness } from './setup.js';

let h: Harness;
afterEach(async () => {
  await h?.cleanup();
});

const ALL_WRITABLE =
  C.NBD_FLAG_HAS_FLAGS | C.NBD_FLAG_SEND_FLUSH | C.NBD_FLAG_SEND_FUA | C.NBD_FLAG_SEND_TRIM | C.NBD_FLAG_SEND_WRITE_ZEROES |
  C.NBD_FLAG_SEND_FAST_ZERO | C.NBD_FLAG_CAN_MULTI_CONN | C.NBD_FLAG_SEND_CACHE;

describe('transmission flags', () => {
  it('follow the volume caps; SEND_DF only with structured replies; read-only exports say so', async () => {
    h = await startHarness({
      exports: (vol) => [
        { name: '', volume: vol },
        { name: 'ro', volume: new MemoryVolume({ size: MiB }), readOnly: true },
      ],
    });
    const a = await h.connect();
    await a.greeting();
    expect((await a.go({ structured: true })).flags).toBe(ALL_WRITABLE | C.NBD_FLAG_SEND_DF);
    const b = await h.connect();
    await b.greeting();
    expect((await b.go({ structured: false })).flags).toBe(ALL_WRITABLE);
    const c = await h.connect();
    await c.greeting();
    const ro = (await c.go({ name: 'ro', structured: false })).flags;
    expect(ro).toBe(C.NBD_FLAG_HAS_FLAGS | C.NBD_FLAG_READ_ONLY | C.NBD_FLAG_SEND_FLUSH | C.NBD_FLAG_CAN_MULTI_CONN | C.NBD_FLAG_SEND_CACHE);
  });
});

describe('commands', () => {
  for (const structured of [false, true]) {
    it(`write, read, FUA write, flush, trim, write zeroes, cache (${structured ? 'structured' : 'simple'})`, async () => {
      h = await startHarness();
      const c = await h.open({ structured });
      const data = pattern(64 * 1024, 1);
      expect((await c.cmd(C.NBD_CMD_WRITE, 4096, data.length, { payload: data })).error).toBe(0);
      const r = await c.readAt(4096, data.length);
      expect(r.error).toBe(0);
      expect(r.simple).toBe(!structured);
      expect(r.data!.equals(data)).toBe(true);
      const fuaBefore = h.vol.stats.fuaWrites;
      expect((await c.cmd(C.NBD_CMD_WRITE, 0, 512, { payload: Buffer.alloc(512, 1), flags: C.NBD_CMD_FLAG_FUA })).error).toBe(0);
      expect(h.vol.stats.fuaWrites).toBe(fuaBefore + 1);
      const flushes = h.vol.stats.flushes;
      expect((await c.cmd(C.NBD_CMD_FLUSH, 0, 0)).error).toBe(0);
      expect(h.vol.stats.flushes).toBe(flushes + 1);
      expect((await c.cmd(C.NBD_CMD_TRIM, 4096, 65536)).error).toBe(0);
      expect((await c.readAt(4096, 65536)).data).toEqual(Buffer.alloc(65536));
      await c.cmd(C.NBD_CMD_WRITE, MiB, 8192, { payload: Buffer.alloc(8192, 9) });
      expect((await c.cmd(C.NBD_CMD_WRITE_ZEROES, MiB, 4096, { flags: C.NBD_CMD_FLAG_NO_HOLE })).error).toBe(0);
      const z = await c.readAt(MiB, 8192);
      expect(z.data).toEqual(Buffer.concat([Buffer.alloc(4096), Buffer.alloc(4096, 9)]));
      expect((await c.cmd(C.NBD_CMD_CACHE, 0, 4096)).error).toBe(0);
      expect((await c.readAt(0, 512)).data).toEqual(Buffer.alloc(512, 1));
      const st = h.server.stats().exports[0]!;
      expect(st.writes).toBe(3);
      expect(st.bytesWritten).toBe(64 * 1024 + 512 + 8192);
      expect(st.reads).toBe(4);
      expect(st.errors).toBe(0);
      await c.disconnect();
    });
  }

  it('structured reads send zero regions as OFFSET_HOLE chunks, and DF gets one data chunk', async () => {
    h = await startHarness({ server: { sparseReadThreshold: 0 } });
    await h.vol.write(128 * 1024, Buffer.alloc(64 * 1024, 0x42));
    const c = await h.open();
    const r = await c.readAt(0, 512 * 1024);
    expect(r.error).toBe(0);
    const kinds = r.chunks.map((x) => x.type);
    expect(kinds).toEqual([C.NBD_REPLY_TYPE_OFFSET_HOLE, C.NBD_REPLY_TYPE_OFFSET_DATA, C.NBD_REPLY_TYPE_OFFSET_HOLE]);
    const expected = Buffer.alloc(512 * 1024);
    expected.fill(0x42, 128 * 1024, 192 * 1024);
    expect(r.data!.equals(expected)).toBe(true);
    const df = await c.readAt(0, 512 * 1024, C.NBD_CMD_FLAG_DF);
    expect(df.chunks.map((x) => x.type)).toEqual([C.NBD_REPLY_TYPE_OFFSET_DATA]);
    expect(df.data!.equals(expected)).toBe(true);
    // DF without structured replies is invalid
    const s = await h.open({ structured: false });
    expect((await s.readAt(0, 512, C.NBD_CMD_FLAG_DF)).error).toBe(C.NBD_EINVAL);
  });

  it('zero-length read/write/trim/zero succeed without disconnecting', async () => {
    h = await startHarness();
    const c = await h.open();
    expect((await c.readAt(0, 0)).error).toBe(0);
    expect((await c.cmd(C.NBD_CMD_WRITE, 0, 0)).error).toBe(0);
    expect((await c.cmd(C.NBD_CMD_TRIM, 0, 0)).error).toBe(0);
    expect((await c.cmd(C.NBD_CMD_WRITE_ZEROES, 0, 0)).error).toBe(0);
    expect((await c.readAt(0, 512)).error).toBe(0);
  });

  describe('BLOCK_STATUS', () => {
    it('reports holes and data with merged extents, under the negotiated context id; REQ_ONE gives one', async () => {
      h = await startHarness();
      await h.vol.write(128 * 1024, Buffer.alloc(128 * 1024, 1)); // two adjacent 64k chunks: one extent
      const c = await h.connect();
      await c.greeting();
      await c.option(C.NBD_OPT_STRUCTURED_REPLY);
      const set = await c.option(C.NBD_OPT_SET_META_CONTEXT, codec.encodeMetaContextRequest('', [C.BASE_ALLOCATION]));
      const ctx = codec.parseRepMetaContext(set[0]!.data);
      if (ctx.kind !== 'ok') throw new Error('bad');
      c.structured = true;
      await c.go({ structured: false, meta: false });
      const r = await c.cmd(C.NBD_CMD_BLOCK_STATUS, 0, MiB);
      expect(r.error).toBe(0);
      expect(r.chunks).toEqual([
        {
          type: C.NBD_REPLY_TYPE_BLOCK_STATUS,
          contextId: ctx.value.id,
          descriptors: [
            { length: 128 * 1024, flags: C.NBD_STATE_HOLE | C.NBD_STATE_ZERO },
            { length: 128 * 1024, flags: 0 },
            { length: MiB - 256 * 1024, flags: C.NBD_STATE_HOLE | C.NBD_STATE_ZERO },
          ],
        },
      ]);
      const one = await c.cmd(C.NBD_CMD_BLOCK_STATUS, 4096, MiB, { flags: C.NBD_CMD_FLAG_REQ_ONE });
      expect(one.chunks).toEqual([
        { type: C.NBD_REPLY_TYPE_BLOCK_STATUS, contextId: ctx.value.id, descriptors: [{ length: 124 * 1024, flags: 3 }] },
      ]);
    });

    it('is EINVAL without structured replies, without a context, past the end, or of length 0', async () => {
      h = await startHarness();
      const simple = await h.open({ structured: false });
      expect((await simple.cmd(C.NBD_CMD_BLOCK_STATUS, 0, 4096)).error).toBe(C.NBD_EINVAL);
      const noMeta = await h.open({ structured: true, meta: false });
      expect((await noMeta.cmd(C.NBD_CMD_BLOCK_STATUS, 0, 4096)).error).toBe(C.NBD_EINVAL);
      const c = await h.open();
      expect((await c.cmd(C.NBD_CMD_BLOCK_STATUS, 16 * MiB - 512, 1024)).error).toBe(C.NBD_EINVAL);
      expect((await c.cmd(C.NBD_CMD_BLOCK_STATUS, 0, 0)).error).toBe(C.NBD_EINVAL);
      expect((await c.cmd(C.NBD_CMD_BLOCK_STATUS, 0, 4096, { flags: C.NBD_CMD_FLAG_DF })).error).toBe(C.NBD_EINVAL);
    });
  });
});

describe('errors', () => {
  it('ranges: EINVAL for read/trim/cache/block status, ENOSPC for write/write zeroes; overflowing offsets too', async () => {
    h = await startHarness();
    const c = await h.open();
    const end = 16 * MiB;
    expect((await c.readAt(end - 512, 1024)).error).toBe(C.NBD_EINVAL);
    expect((await c.cmd(C.NBD_CMD_WRITE, end - 512, 1024, { payload: Buffer.alloc(1024) })).error).toBe(C.NBD_ENOSPC);
    expect((await c.cmd(C.NBD_CMD_TRIM, end, 512)).error).toBe(C.NBD_EINVAL);
    expect((await c.cmd(C.NBD_CMD_WRITE_ZEROES, end, 512)).error).toBe(C.NBD_ENOSPC);
    expect((await c.cmd(C.NBD_CMD_CACHE, end, 512)).error).toBe(C.NBD_EINVAL);
    const huge = 0xffffffffffffff00n; // offset + length wraps a u64
    expect((await c.cmd(C.NBD_CMD_READ, huge, 512)).error).toBe(C.NBD_EINVAL);
    const h2 = c.send(C.NBD_CMD_WRITE, huge, 512, { payload: Buffer.alloc(512) });
    const r2 = await c.reply();
    expect([r2.handle, r2.error]).toEqual([h2, C.NBD_ENOSPC]);
    // The failed writes' payloads were consumed: the stream is still in sync.
    expect((await c.readAt(0, 512)).data).toEqual(Buffer.alloc(512));
    expect(h.server.stats().exports[0]!.errors).toBe(7);
  });

  it('length over the advertised maximum: EINVAL for read, write, cache and non-fast zero (trim is not limited)', async () => {
    h = await startHarness({ server: { maxPayload: MiB } });
    const c = await h.open();
    expect((await c.readAt(0, MiB + 1)).error).toBe(C.NBD_EINVAL);
    expect((await c.cmd(C.NBD_CMD_CACHE, 0, MiB + 1)).error).toBe(C.NBD_EINVAL);
    expect((await c.cmd(C.NBD_CMD_WRITE_ZEROES, 0, 2 * MiB)).error).toBe(C.NBD_EINVAL);
    expect((await c.cmd(C.NBD_CMD_WRITE_ZEROES, 0, 2 * MiB, { flags: C.NBD_CMD_FLAG_FAST_ZERO })).error).toBe(0);
    expect((await c.cmd(C.NBD_CMD_TRIM, 0, 4 * MiB)).error).toBe(0);
    expect((await c.readAt(0, MiB)).error).toBe(0);
  });

  it('a write over the hard payload cap disconnects that client only', async () => {
    h = await startHarness({ server: { maxPayload: MiB } });
    const bad = await h.open();
    const good = await h.open();
    bad.send(C.NBD_CMD_WRITE, 0, MiB + 1);
    await bad.waitClosed();
    expect((await good.readAt(0, 512)).error).toBe(0);
  });

  it('unknown commands and flags are EINVAL; FUA when not advertised is EINVAL', async () => {
    h = await startHarness({
      exports: (vol) => [{ name: '', volume: vol }, { name: 'ro', volume: new MemoryVolume({ size: MiB }), readOnly: true }],
    });
    const c = await h.open();
    expect((await c.cmd(42, 0, 512)).error).toBe(C.NBD_EINVAL);
    expect((await c.cmd(C.NBD_CMD_RESIZE, 0, 512)).error).toBe(C.NBD_EINVAL);
    expect((await c.readAt(0, 512, 0x8000)).error).toBe(C.NBD_EINVAL);
    expect((await c.readAt(0, 512, C.NBD_CMD_FLAG_REQ_ONE)).error).toBe(C.NBD_EINVAL);
    expect((await c.cmd(C.NBD_CMD_WRITE, 0, 512, { payload: Buffer.alloc(512), flags: C.NBD_CMD_FLAG_NO_HOLE })).error).toBe(C.NBD_EINVAL);
    expect((await c.cmd(C.NBD_CMD_TRIM, 0, 512, { flags: C.NBD_CMD_FLAG_FAST_ZERO })).error).toBe(C.NBD_EINVAL);
    expect((await c.cmd(C.NBD_CMD_FLUSH, 512, 0)).error).toBe(C.NBD_EINVAL);
    expect((await c.cmd(C.NBD_CMD_CACHE, 0, 512, { flags: C.NBD_CMD_FLAG_DF })).error).toBe(C.NBD_EINVAL);
    const ro = await h.open({ name: 'ro' });
    const w = ro.send(C.NBD_CMD_WRITE, 0, 512, { payload: Buffer.alloc(512), flags: C.NBD_CMD_FLAG_FUA });
    const r = await ro.reply();
    expect([r.handle, r.error]).toEqual([w, C.NBD_EPERM]);
    expect((await ro.readAt(0, 512, C.NBD_CMD_FLAG_FUA)).error).toBe(C.NBD_EINVAL);
  });

  it('read-only export: write, trim and write zeroes are EPERM (write payload consumed), reads work', async () => {
    h = await startHarness({ exports: (vol) => [{ name: '', volume: vol, readOnly: true }] });
    const c = await h.open();
    expect((await c.cmd(C.NBD_CMD_WRITE, 0, 4096, { payload: Buffer.alloc(4096, 1) })).error).toBe(C.NBD_EPERM);
    expect((await c.cmd(C.NBD_CMD_TRIM, 0, 4096)).error).toBe(C.NBD_EPERM);
    expect((await c.cmd(C.NBD_CMD_WRITE_ZEROES, 0, 4096)).error).toBe(C.NBD_EPERM);
    expect((await c.readAt(0, 4096)).data).toEqual(Buffer.alloc(4096));
    expect(h.vol.stats.writes).toBe(0);
  });

  it('volume errors: EIO as ERROR_OFFSET (structured) or simple error without payload; ENOTSUP only for FAST_ZERO', async () => {
    let fail: VolumeError | null = null;
    h = await startHarness({
      hook: () => {
        if (fail) throw fail;
      },
    });
    const s = await h.open();
    const p = await h.open({ structured: false });
    fail = new VolumeError('EIO', 'disk on fire');
    const r = await s.readAt(4096, 4096);
    expect(r.error).toBe(C.NBD_EIO);
    expect(r.chunks).toEqual([{ type: C.NBD_REPLY_TYPE_ERROR_OFFSET, error: C.NBD_EIO, message: 'EIO: disk on fire', offset: 4096 }]);
    const q = await p.readAt(0, 4096);
    expect(q.error).toBe(C.NBD_EIO);
    expect(q.data).toBeUndefined();
    fail = new VolumeError('ENOTSUP', 'slow');
    expect((await s.cmd(C.NBD_CMD_WRITE_ZEROES, 0, 4096, { flags: C.NBD_CMD_FLAG_FAST_ZERO })).error).toBe(C.NBD_ENOTSUP);
    expect((await s.cmd(C.NBD_CMD_WRITE_ZEROES, 0, 4096)).error).toBe(C.NBD_EINVAL);
    fail = new VolumeError('ENOSPC');
    expect((await p.cmd(C.NBD_CMD_WRITE, 0, 512, { payload: Buffer.alloc(512) })).error).toBe(C.NBD_ENOSPC);
    fail = new VolumeError('ETIMEDOUT');
    expect((await p.cmd(C.NBD_CMD_FLUSH, 0, 0)).error).toBe(C.NBD_EIO);
    fail = null;
    // Simple-reply stream stayed in sync after the failed read (no payload was sent).
    expect((await p.readAt(0, 512)).data).toEqual(Buffer.alloc(512));
  });

  it('bad request magic disconnects that client; the others carry on', async () => {
    h = await startHarness();
    const bad = await h.open();
    const good = await h.open();
    const frame = codec.encodeRequest({ type: C.NBD_CMD_READ, offset: 0, length: 512 });
    frame.writeUInt32BE(0xdeadbeef, 0);
    bad.write(frame);
    await bad.waitClosed();
    expect((await good.readAt(0, 512)).error).toBe(0);
  });
});

describe('concurrency', () => {
  it('replies out of order: a slow read does not hold back a fast one', async () => {
    const slow = gate();
    h = await startHarness({
      hook: async (op, offset) => {
        if (op === 'read' && offset === 0) await slow.wait();
      },
    });
    const c = await h.open();
    const a = c.send(C.NBD_CMD_READ, 0, 4096);
    const b = c.send(C.NBD_CMD_READ, MiB, 4096);
    const first = await c.reply();
    expect(first.handle).toBe(b);
    slow.open();
    const second = await c.reply();
    expect(second.handle).toBe(a);
  });

  it('overlapping writes land in issue order; a later read sees the earlier (slow) write', async () => {
    const slow = gate();
    let n = 0;
    h = await startHarness({
      hook: async (op) => {
        if (op === 'write' && n++ === 0) await slow.wait();
      },
    });
    const c = await h.open();
    const a = c.send(C.NBD_CMD_WRITE, 0, 4096, { payload: Buffer.alloc(4096, 0xaa) });
    const b = c.send(C.NBD_CMD_WRITE, 2048, 4096, { payload: Buffer.alloc(4096, 0xbb) });
    const rd = c.send(C.NBD_CMD_READ, 0, 8192);
    const other = c.send(C.NBD_CMD_READ, MiB, 512); // not overlapping: answered at once
    expect((await c.reply()).handle).toBe(other);
    await sleep(50);
    expect(c.buffered).toBe(0); // the write, the overlapping write and the read all wait
    slow.open();
    const replies = [await c.reply(), await c.reply(), await c.reply()];
    expect(replies.map((r) => r.handle)).toEqual([a, b, rd]);
    const expected = Buffer.concat([Buffer.alloc(2048, 0xaa), Buffer.alloc(4096, 0xbb), Buffer.alloc(2048)]);
    expect(replies[2]!.data!.equals(expected)).toBe(true);
  });

  it('a flush on one connection waits for writes in flight on another (shared ordering)', async () => {
    const slow = gate();
    h = await startHarness({
      hook: async (op) => {
        if (op === 'write') await slow.wait();
      },
    });
    const a = await h.open();
    const b = await h.open();
    a.send(C.NBD_CMD_WRITE, 0, 512, { payload: Buffer.alloc(512, 5) });
    await sleep(20);
    const f = b.send(C.NBD_CMD_FLUSH, 0, 0);
    await sleep(50);
    expect(b.buffered).toBe(0);
    expect(h.vol.stats.flushes).toBe(0);
    slow.open();
    expect((await a.reply()).error).toBe(0);
    const fr = await b.reply();
    expect([fr.handle, fr.error]).toEqual([f, 0]);
    expect((await b.readAt(0, 512)).data).toEqual(Buffer.alloc(512, 5));
  });

  it('bounded in flight: the server stops reading at maxInflightPerConnection', async () => {
    const g = gate();
    h = await startHarness({
      server: { maxInflightPerConnection: 3 },
      hook: async (op) => {
        if (op === 'read') await g.wait();
      },
    });
    const c = await h.open();
    const handles = Array.from({ length: 10 }, (_, i) => c.send(C.NBD_CMD_READ, i * 4096, 4096));
    await sleep(100);
    expect(g.waiting()).toBe(3);
    expect(h.server.stats().exports[0]!.inflight).toBe(3);
    g.open();
    const got = new Set<bigint>();
    for (let i = 0; i < 10; i++) got.add((await c.reply()).handle);
    expect(got).toEqual(new Set(handles));
  });

  it('bounded in-flight bytes: big reads stop the reading at 64 MiB held, whatever the request count', async () => {
    const g = gate();
    h = await startHarness({
      size: 512 * MiB,
      hook: async (op) => {
        if (op === 'read') await g.wait();
      },
    });
    const c = await h.open({ structured: false });
    for (let i = 0; i < 6; i++) c.send(C.NBD_CMD_READ, i * 32 * MiB, 32 * MiB);
    await sleep(200);
    expect(g.waiting()).toBe(2);
    g.open();
    for (let i = 0; i < 6; i++) expect((await c.reply(20000)).data!.length).toBe(32 * MiB);
  });

  it('a client vanishing mid-payload or with requests in flight does not disturb others or leak', async () => {
    const g = gate();
    h = await startHarness({
      hook: async (op, offset) => {
        if (op === 'read' && offset === 0) await g.wait();
      },
    });
    const good = await h.open();
    const a = await h.open();
    a.write(codec.encodeRequest({ type: C.NBD_CMD_WRITE, offset: 0, length: 65536 }, Buffer.alloc(1000)));
    const b = await h.open();
    b.send(C.NBD_CMD_READ, 0, 4096);
    await sleep(20);
    a.destroy();
    b.destroy();
    await sleep(50);
    expect(h.server.stats().connections).toBe(1);
    expect(h.server.stats().exports[0]!.inflight).toBe(1); // b's read still runs
    g.open();
    await sleep(20);
    expect(h.server.stats().exports[0]!.inflight).toBe(0);
    expect((await good.readAt(4096, 512)).error).toBe(0);
  });

  it('handles many requests pipelined in one write, and frames split byte by byte', async () => {
    h = await startHarness();
    const c = await h.open();
    const frames: Buffer[] = [];
    for (let i = 0; i < 200; i++) {
      frames.push(codec.encodeRequest({ type: C.NBD_CMD_WRITE, handle: BigInt(i + 1), offset: i * 512, length: 512 }, Buffer.alloc(512, i)));
    }
    c.write(Buffer.concat(frames));
    for (let i = 0; i < 200; i++) expect((await c.reply()).error).toBe(0);
    const rd = codec.encodeRequest({ type: C.NBD_CMD_WRITE, handle: 999n, offset: 0, length: 3 }, Buffer.from([1, 2, 3]));
    for (const byte of rd) {
      c.write(Buffer.from([byte]));
      await sleep(1);
    }
    expect((await c.reply()).handle).toBe(999n);
    const r = await c.readAt(0, 512 * 200);
    for (let i = 0; i < 200; i++) expect(r.data![i * 512 + 100]).toBe(i);
    expect(r.data!.subarray(0, 3)).toEqual(Buffer.from([1, 2, 3]));
  });
});

describe('lifecycle', () => {
  it('removeExport drains in-flight requests, flushes, disconnects its clients; others stay', async () => {
    const g = gate();
    h = await startHarness({
      hook: async (op, offset) => {
        if (op === 'read' && offset === 8192) await g.wait();
      },
      exports: (vol) => [{ name: 'a', volume: vol }, { name: 'b', volume: new MemoryVolume({ size: MiB }) }],
    });
    const a = await h.open({ name: 'a' });
    const b = await h.open({ name: 'b' });
    await a.cmd(C.NBD_CMD_WRITE, 0, 512, { payload: Buffer.alloc(512, 3) });
    const inflight = a.send(C.NBD_CMD_READ, 8192, 512);
    await sleep(20);
    const removed = h.server.removeExport('a');
    await sleep(20);
    const late = a.send(C.NBD_CMD_READ, 0, 512); // after removal started: ESHUTDOWN
    const lateReply = await a.reply();
    expect([lateReply.handle, lateReply.error]).toEqual([late, C.NBD_ESHUTDOWN]);
    g.open();
    const r = await a.reply();
    expect([r.handle, r.error]).toEqual([inflight, 0]);
    await removed;
    await a.waitClosed();
    expect(h.vol.stats.flushes).toBe(1);
    expect((await b.readAt(0, 512)).error).toBe(0);
    const c = await h.connect();
    await c.greeting();
    expect((await c.option(C.NBD_OPT_INFO, codec.encodeInfoRequest('a'))).map((x) => x.type)).toEqual([C.NBD_REP_ERR_UNKNOWN]);
  });

  it('close() lets in-flight requests finish, flushes, closes every connection and removes the socket', async () => {
    const g = gate();
    h = await startHarness({
      hook: async (op) => {
        if (op === 'read') await g.wait();
      },
    });
    const a = await h.open();
    const hs = await h.connect(); // still handshaking
    await hs.greeting();
    const rd = a.send(C.NBD_CMD_READ, 0, 4096);
    await sleep(20);
    let closed = false;
    const p = h.server.close().then(() => (closed = true));
    await hs.waitClosed();
    await sleep(30);
    expect(closed).toBe(false);
    g.open();
    const r = await a.reply();
    expect([r.handle, r.error]).toEqual([rd, 0]);
    await p;
    await a.waitClosed();
    expect(h.vol.stats.flushes).toBe(1);
    expect(existsSync(h.sock)).toBe(false);
    expect(h.server.stats().connections).toBe(0);
  });

  it('replaces a stale socket file left by a dead server', async () => {
    h = await startHarness();
    const stale = `${h.dir}/stale.sock`;
    // A socket file nobody listens on: its server was SIGKILLed, so nothing unlinked it.
    const child = spawn(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(stale)}, () => console.log('up'))`]);
    await new Promise((r) => child.stdout.once('data', r));
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));
    expect(existsSync(stale)).toBe(true);
    await h.server.listen({ unix: stale });
    const c = await (await import('./rawclient.js')).RawClient.connect(stale);
    await c.handshake();
    expect((await c.readAt(0, 512)).error).toBe(0);
    c.destroy();
    writeFileSync(`${h.dir}/plain`, 'x');
    await expect(h.server.listen({ unix: `${h.dir}/plain` })).rejects.toThrow(/not a socket/);
    rmSync(`${h.dir}/plain`);
  });
});
