/** The handshake phase of the NBD server, over a real unix socket, with a raw client. */
import { statSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { MemoryVolume } from '../../../lib/block/memory.js';
import * as codec from '../../../lib/nbd/codec.js';
import * as C from '../../../lib/nbd/constants.js';
import { RawClient } from './rawclient.js';
import { MiB, startHarness, type Harness } from './setup.js';

let h: Harness;
afterEach(async () => {
  await h?.cleanup();
});

function infoOf(replies: codec.OptionReply[]): codec.Info[] {
  return replies
    .filter((r) => r.type === C.NBD_REP_INFO)
    .map((r) => {
      const p = codec.parseInfo(r.data);
      if (p.kind !== 'ok') throw new Error('bad info');
      return p.value;
    });
}

describe('NBD handshake', () => {
  it('greets with NBDMAGIC/IHAVEOPT and FIXED_NEWSTYLE|NO_ZEROES', async () => {
    h = await startHarness();
    const c = await h.connect();
    const raw = await c.read(18);
    expect(raw.readBigUInt64BE(0)).toBe(C.NBDMAGIC);
    expect(raw.readBigUInt64BE(8)).toBe(C.IHAVEOPT);
    expect(raw.readUInt16BE(16)).toBe(C.NBD_FLAG_FIXED_NEWSTYLE | C.NBD_FLAG_NO_ZEROES);
  });

  it('disconnects a client without FIXED_NEWSTYLE, and one with unknown flags', async () => {
    h = await startHarness();
    const a = await h.connect();
    await a.greeting(0);
    await a.waitClosed();
    const b = await h.connect();
    await b.greeting(C.NBD_FLAG_C_FIXED_NEWSTYLE | 0x100);
    await b.waitClosed();
  });

  it('EXPORT_NAME: 124 zero bytes unless NO_ZEROES, then transmission works', async () => {
    h = await startHarness();
    await h.vol.write(0, Buffer.alloc(512, 7));
    for (const noZeroes of [false, true]) {
      const c = await h.connect();
      await c.greeting(C.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? C.NBD_FLAG_C_NO_ZEROES : 0));
      c.write(codec.encodeOption(C.NBD_OPT_EXPORT_NAME, Buffer.from('')));
      const rep = await c.read(noZeroes ? 10 : 134);
      expect(codec.readU64(rep, 0)).toBe(16 * MiB);
      expect(rep.readUInt16BE(8) & C.NBD_FLAG_HAS_FLAGS).toBeTruthy();
      if (!noZeroes) expect(rep.subarray(10).equals(Buffer.alloc(124))).toBe(true);
      const r = await c.readAt(0, 512);
      expect(r.simple).toBe(true);
      expect(r.data).toEqual(Buffer.alloc(512, 7));
      expect(c.buffered).toBe(0);
    }
  });

  it('EXPORT_NAME of an unknown export terminates the session', async () => {
    h = await startHarness();
    const c = await h.connect();
    await c.greeting();
    c.write(codec.encodeOption(C.NBD_OPT_EXPORT_NAME, Buffer.from('nope')));
    await c.waitClosed();
  });

  it('ABORT is acknowledged, then the server closes', async () => {
    h = await startHarness();
    const c = await h.connect();
    await c.greeting();
    const r = await c.option(C.NBD_OPT_ABORT);
    expect(r.map((x) => x.type)).toEqual([C.NBD_REP_ACK]);
    await c.waitClosed();
  });

  it('LIST answers one REP_SERVER per export then ACK; LIST with data is INVALID', async () => {
    h = await startHarness({
      exports: (vol) => [
        { name: '', description: 'default', volume: vol },
        { name: 'disk1', description: 'first', volume: new MemoryVolume({ size: MiB }) },
        { name: 'disk2', volume: new MemoryVolume({ size: MiB }), readOnly: true },
      ],
    });
    const c = await h.connect();
    await c.greeting();
    const r = await c.option(C.NBD_OPT_LIST);
    expect(r[r.length - 1]!.type).toBe(C.NBD_REP_ACK);
    const servers = r.filter((x) => x.type === C.NBD_REP_SERVER).map((x) => {
      const p = codec.parseRepServer(x.data);
      if (p.kind !== 'ok') throw new Error('bad');
      return p.value;
    });
    expect(servers).toEqual([
      { name: '', description: 'default' },
      { name: 'disk1', description: 'first' },
      { name: 'disk2', description: '' },
    ]);
    const bad = await c.option(C.NBD_OPT_LIST, Buffer.from('x'));
    expect(bad.map((x) => x.type)).toEqual([C.NBD_REP_ERR_INVALID]);
  });

  it('INFO sends EXPORT, NAME, DESCRIPTION, BLOCK_SIZE; unknown export is ERR_UNKNOWN; GO enters transmission', async () => {
    h = await startHarness();
    const c = await h.connect();
    await c.greeting();
    const unknown = await c.option(C.NBD_OPT_INFO, codec.encodeInfoRequest('missing', []));
    expect(unknown.map((x) => x.type)).toEqual([C.NBD_REP_ERR_UNKNOWN]);
    const r = await c.option(C.NBD_OPT_INFO, codec.encodeInfoRequest('', [C.NBD_INFO_BLOCK_SIZE, C.NBD_INFO_DESCRIPTION, 999]));
    expect(r[r.length - 1]!.type).toBe(C.NBD_REP_ACK);
    const infos = infoOf(r);
    expect(infos).toContainEqual({ type: C.NBD_INFO_EXPORT, size: 16 * MiB, flags: expect.any(Number) });
    expect(infos).toContainEqual({ type: C.NBD_INFO_NAME, name: '' });
    expect(infos).toContainEqual({ type: C.NBD_INFO_DESCRIPTION, description: 'test disk' });
    expect(infos).toContainEqual({ type: C.NBD_INFO_BLOCK_SIZE, minimum: 1, preferred: 4096, maximum: 32 * MiB });
    // Still negotiating after INFO: GO works.
    const g = await c.go({ structured: false });
    expect(g.size).toBe(16 * MiB);
    expect((await c.readAt(0, 4096)).data).toEqual(Buffer.alloc(4096));
  });

  it('a malformed INFO/GO is INVALID and negotiation continues', async () => {
    h = await startHarness();
    const c = await h.connect();
    await c.greeting();
    const good = codec.encodeInfoRequest('', [C.NBD_INFO_BLOCK_SIZE]);
    // count says 3 requests but only 1 present
    const badCount = Buffer.from(good);
    badCount.writeUInt16BE(3, 4);
    expect((await c.option(C.NBD_OPT_GO, badCount)).map((x) => x.type)).toEqual([C.NBD_REP_ERR_INVALID]);
    // name length past the end
    const badName = Buffer.from(good);
    badName.writeUInt32BE(1000, 0);
    expect((await c.option(C.NBD_OPT_GO, badName)).map((x) => x.type)).toEqual([C.NBD_REP_ERR_INVALID]);
    // too short
    expect((await c.option(C.NBD_OPT_INFO, Buffer.alloc(3))).map((x) => x.type)).toEqual([C.NBD_REP_ERR_INVALID]);
    // trailing byte
    expect((await c.option(C.NBD_OPT_GO, Buffer.concat([good, Buffer.alloc(1)]))).map((x) => x.type)).toEqual([C.NBD_REP_ERR_INVALID]);
    await c.go();
  });

  it('unknown options are UNSUP; oversized options are TOO_BIG (drained, or disconnect when huge)', async () => {
    h = await startHarness();
    const c = await h.connect();
    await c.greeting();
    expect((await c.option(99, Buffer.from('whatever'))).map((x) => x.type)).toEqual([C.NBD_REP_ERR_UNSUP]);
    expect((await c.option(C.NBD_OPT_EXTENDED_HEADERS)).map((x) => x.type)).toEqual([C.NBD_REP_ERR_UNSUP]);
    expect((await c.option(C.NBD_OPT_LIST, Buffer.alloc(100 * 1024))).map((x) => x.type)).toEqual([C.NBD_REP_ERR_TOO_BIG]);
    await c.go(); // still in sync
    const d = await h.connect();
    await d.greeting();
    const hdr = codec.encodeOption(C.NBD_OPT_INFO);
    hdr.writeUInt32BE(0x7fffffff, 12);
    d.write(hdr);
    const r = await d.readOptionReply();
    expect(r.type).toBe(C.NBD_REP_ERR_TOO_BIG);
    await d.waitClosed();
  });

  it('STARTTLS on a unix socket is refused with POLICY; with data it is INVALID', async () => {
    h = await startHarness();
    const c = await h.connect();
    await c.greeting();
    expect((await c.option(C.NBD_OPT_STARTTLS, Buffer.from('x'))).map((x) => x.type)).toEqual([C.NBD_REP_ERR_INVALID]);
    expect((await c.option(C.NBD_OPT_STARTTLS)).map((x) => x.type)).toEqual([C.NBD_REP_ERR_POLICY]);
  });

  it('STRUCTURED_REPLY with data is INVALID, without it ACK', async () => {
    h = await startHarness();
    const c = await h.connect();
    await c.greeting();
    expect((await c.option(C.NBD_OPT_STRUCTURED_REPLY, Buffer.from('x'))).map((x) => x.type)).toEqual([C.NBD_REP_ERR_INVALID]);
    expect((await c.option(C.NBD_OPT_STRUCTURED_REPLY)).map((x) => x.type)).toEqual([C.NBD_REP_ACK]);
  });

  describe('meta contexts', () => {
    async function metaReplies(c: RawClient, opt: number, name: string, queries: string[]): Promise<Array<number | string>> {
      const r = await c.option(opt, codec.encodeMetaContextRequest(name, queries));
      return r.map((x) => {
        if (x.type !== C.NBD_REP_META_CONTEXT) return x.type;
        const p = codec.parseRepMetaContext(x.data);
        if (p.kind !== 'ok') throw new Error('bad');
        return `${p.value.name}#${p.value.id === 0 ? 0 : 'id'}`;
      });
    }

    it('need structured replies first', async () => {
      h = await startHarness();
      const c = await h.connect();
      await c.greeting();
      expect(await metaReplies(c, C.NBD_OPT_LIST_META_CONTEXT, '', [])).toEqual([C.NBD_REP_ERR_INVALID]);
      expect(await metaReplies(c, C.NBD_OPT_SET_META_CONTEXT, '', [C.BASE_ALLOCATION])).toEqual([C.NBD_REP_ERR_INVALID]);
    });

    it('LIST: no query lists all, base: is a wildcard, unknown namespaces ignored, no colon INVALID', async () => {
      h = await startHarness();
      const c = await h.connect();
      await c.greeting();
      await c.option(C.NBD_OPT_STRUCTURED_REPLY);
      const L = C.NBD_OPT_LIST_META_CONTEXT;
      expect(await metaReplies(c, L, '', [])).toEqual(['base:allocation#0', C.NBD_REP_ACK]);
      expect(await metaReplies(c, L, '', ['base:'])).toEqual(['base:allocation#0', C.NBD_REP_ACK]);
      expect(await metaReplies(c, L, '', ['base:allocation'])).toEqual(['base:allocation#0', C.NBD_REP_ACK]);
      expect(await metaReplies(c, L, '', ['x-foo:bar', 'qemu:dirty-bitmap:a', 'base:nope'])).toEqual([C.NBD_REP_ACK]);
      expect(await metaReplies(c, L, '', ['nocolon'])).toEqual([C.NBD_REP_ERR_INVALID]);
      expect(await metaReplies(c, L, 'missing', [])).toEqual([C.NBD_REP_ERR_UNKNOWN]);
      // a query length that runs past the option
      const bad = codec.encodeMetaContextRequest('', ['base:allocation']);
      bad.writeUInt32BE(500, 8);
      expect((await c.option(L, bad)).map((x) => x.type)).toEqual([C.NBD_REP_ERR_INVALID]);
    });

    it('SET: base:allocation selects with a nonzero id; base: alone selects nothing', async () => {
      h = await startHarness();
      const c = await h.connect();
      await c.greeting();
      await c.option(C.NBD_OPT_STRUCTURED_REPLY);
      const S = C.NBD_OPT_SET_META_CONTEXT;
      expect(await metaReplies(c, S, '', ['base:'])).toEqual([C.NBD_REP_ACK]);
      expect(await metaReplies(c, S, '', [])).toEqual([C.NBD_REP_ACK]);
      expect(await metaReplies(c, S, '', ['x-foo:bar', 'base:allocation'])).toEqual(['base:allocation#id', C.NBD_REP_ACK]);
      expect(await metaReplies(c, S, 'missing', ['base:allocation'])).toEqual([C.NBD_REP_ERR_UNKNOWN]);
    });

    it('a SET for another export than the one chosen does not enable BLOCK_STATUS', async () => {
      h = await startHarness({
        exports: (vol) => [{ name: '', volume: vol }, { name: 'other', volume: new MemoryVolume({ size: MiB }) }],
      });
      const c = await h.connect();
      await c.greeting();
      await c.option(C.NBD_OPT_STRUCTURED_REPLY);
      await c.option(C.NBD_OPT_SET_META_CONTEXT, codec.encodeMetaContextRequest('other', [C.BASE_ALLOCATION]));
      c.structured = true;
      await c.go({ structured: false, meta: false });
      const r = await c.cmd(C.NBD_CMD_BLOCK_STATUS, 0, 4096);
      expect(r.error).toBe(C.NBD_EINVAL);
    });
  });

  it('a client that never finishes the handshake is timed out', async () => {
    h = await startHarness({ server: { handshakeTimeoutMs: 200 } });
    const c = await h.connect();
    await c.greeting();
    const t0 = Date.now();
    await c.waitClosed(3000);
    expect(Date.now() - t0).toBeLessThan(2000);
    // A client that completed the handshake is not affected.
    const ok = await h.open();
    await new Promise((r) => setTimeout(r, 400));
    expect((await ok.readAt(0, 512)).error).toBe(0);
  });

  it('listens on a 0600 socket, replacing a stale socket file, refusing a live one', async () => {
    h = await startHarness();
    expect(statSync(h.sock).mode & 0o777).toBe(0o600);
    const other = new (await import('../../../lib/nbd/server.js')).NbdServer({ logger: (await import('../../../lib/log.js')).silentLogger() });
    await expect(other.listen({ unix: h.sock })).rejects.toThrow(/in use/);
    await other.close();
  });

  it('addExport refuses a duplicate name; TCP port 0 reports the real port', async () => {
    h = await startHarness();
    expect(() => h.server.addExport({ name: '', volume: h.vol })).toThrow(/exists/);
    await h.server.listen({ tcp: { host: '127.0.0.1', port: 0 } });
    const tcp = h.server.addresses.find((a) => 'tcp' in a) as { tcp: { host: string; port: number } };
    expect(tcp.tcp.port).toBeGreaterThan(0);
    const c = await RawClient.connect({ host: '127.0.0.1', port: tcp.tcp.port });
    await c.handshake();
    expect((await c.readAt(0, 512)).error).toBe(0);
    c.destroy();
  });
});
