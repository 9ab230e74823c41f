/**
 * STARTTLS: the raw protocol rules (TLS_REQD before STARTTLS in 'require' mode, state reset,
 * STARTTLS twice), client certificates, and real TLS clients (nbdinfo, qemu-img).
 */
import { execFile, execFileSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { MemoryVolume } from '../../../lib/block/memory.js';
import * as codec from '../../../lib/nbd/codec.js';
import * as C from '../../../lib/nbd/constants.js';
import type { NbdTlsOptions } from '../../../lib/nbd/api.js';
import { NbdServer } from '../../../lib/nbd/server.js';
import { silentLogger } from '../../../lib/log.js';
import { RawClient } from './rawclient.js';

const run = promisify(execFile);
let dir: string;
let certDir: string; // what libnbd / qemu read: ca-cert.pem
let cert: Buffer;
let key: Buffer;

beforeAll(() => {
  dir = mkdtempSync(path.join(tmpdir(), 'vstore-nbd-tls-'));
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${dir}/key.pem`, '-out', `${dir}/cert.pem`,
    '-days', '2', '-subj', '/CN=localhost', '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost',
  ], { stdio: 'ignore' });
  cert = readFileSync(`${dir}/cert.pem`);
  key = readFileSync(`${dir}/key.pem`);
  certDir = path.join(dir, 'client');
  execFileSync('mkdir', ['-p', certDir]);
  copyFileSync(`${dir}/cert.pem`, `${certDir}/ca-cert.pem`);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

let server: NbdServer;
let vol: MemoryVolume;
const clients: RawClient[] = [];
afterEach(async () => {
  for (const c of clients.splice(0)) c.destroy();
  await server?.close();
});

async function start(tls: Partial<NbdTlsOptions> & { mode: 'on' | 'require' }): Promise<{ host: string; port: number }> {
  server = new NbdServer({ logger: silentLogger(), tls: { cert, key, ...tls } });
  vol = new MemoryVolume({ size: 4 * 1024 * 1024 });
  server.addExport({ name: '', description: 'secret disk', volume: vol });
  await server.listen({ tcp: { host: '127.0.0.1', port: 0 } });
  const a = server.addresses.find((x) => 'tcp' in x) as { tcp: { host: string; port: number } };
  return a.tcp;
}

async function connect(addr: { host: string; port: number }): Promise<RawClient> {
  const c = await RawClient.connect(addr);
  clients.push(c);
  await c.greeting();
  return c;
}

describe('NBD over TLS', () => {
  it("mode 'require': every option but STARTTLS/ABORT gets TLS_REQD; EXPORT_NAME disconnects", async () => {
    const addr = await start({ mode: 'require' });
    const c = await connect(addr);
    for (const [opt, data] of [
      [C.NBD_OPT_LIST, Buffer.alloc(0)],
      [C.NBD_OPT_INFO, codec.encodeInfoRequest('')],
      [C.NBD_OPT_GO, codec.encodeInfoRequest('')],
      [C.NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0)],
      [C.NBD_OPT_SET_META_CONTEXT, codec.encodeMetaContextRequest('', [C.BASE_ALLOCATION])],
      [77, Buffer.alloc(0)],
    ] as const) {
      expect((await c.option(opt, data)).map((r) => r.type)).toEqual([C.NBD_REP_ERR_TLS_REQD]);
    }
    const a = await connect(addr);
    expect((await a.option(C.NBD_OPT_ABORT)).map((r) => r.type)).toEqual([C.NBD_REP_ACK]);
    await a.waitClosed();
    c.write(codec.encodeOption(C.NBD_OPT_EXPORT_NAME, Buffer.from('')));
    await c.waitClosed();
  });

  it('STARTTLS upgrades; a second STARTTLS is INVALID; data flows encrypted', async () => {
    const addr = await start({ mode: 'require' });
    const c = await connect(addr);
    await c.startTls({ ca: cert });
    expect((await c.option(C.NBD_OPT_STARTTLS)).map((r) => r.type)).toEqual([C.NBD_REP_ERR_INVALID]);
    const list = await c.option(C.NBD_OPT_LIST);
    expect(list.map((r) => r.type)).toEqual([C.NBD_REP_SERVER, C.NBD_REP_ACK]);
    await c.go();
    const data = Buffer.alloc(65536, 0x3c);
    expect((await c.cmd(C.NBD_CMD_WRITE, 4096, data.length, { payload: data })).error).toBe(0);
    expect((await c.readAt(4096, data.length)).data!.equals(data)).toBe(true);
    expect((await c.cmd(C.NBD_CMD_BLOCK_STATUS, 0, 65536)).error).toBe(0);
    await c.disconnect();
  });

  it("mode 'on': plaintext allowed; STARTTLS resets structured replies and meta contexts", async () => {
    const addr = await start({ mode: 'on' });
    const plain = await connect(addr);
    await plain.go();
    expect((await plain.readAt(0, 512)).error).toBe(0);

    const c = await connect(addr);
    expect((await c.option(C.NBD_OPT_STRUCTURED_REPLY)).map((r) => r.type)).toEqual([C.NBD_REP_ACK]);
    await c.option(C.NBD_OPT_SET_META_CONTEXT, codec.encodeMetaContextRequest('', [C.BASE_ALLOCATION]));
    await c.startTls({ ca: cert });
    const { flags } = await c.go({ structured: false, meta: false });
    expect(flags & C.NBD_FLAG_SEND_DF).toBe(0); // structured replies were forgotten
    const r = await c.readAt(0, 512);
    expect(r.simple).toBe(true);
    expect((await c.cmd(C.NBD_CMD_BLOCK_STATUS, 0, 512)).error).toBe(C.NBD_EINVAL);
  });

  it('with a CA configured, clients must present a certificate it signed', async () => {
    const addr = await start({ mode: 'require', ca: cert });
    const anon = await connect(addr);
    // With TLS 1.3 the client may finish its side before the server checks the (missing)
    // certificate: either way nothing must get through, and the server drops the connection.
    await expect(anon.startTls({ ca: cert }).then(() => anon.option(C.NBD_OPT_LIST))).rejects.toThrow();
    await anon.waitClosed();
    const ok = await connect(addr);
    await ok.startTls({ ca: cert, cert, key });
    await ok.go();
    expect((await ok.readAt(0, 4096)).error).toBe(0);
  });

  it('a client that sends garbage instead of a TLS handshake is dropped; others are unaffected', async () => {
    const addr = await start({ mode: 'require' });
    const bad = await connect(addr);
    const r = await bad.option(C.NBD_OPT_STARTTLS);
    expect(r[0]!.type).toBe(C.NBD_REP_ACK);
    bad.write(Buffer.alloc(300, 0x41));
    await bad.waitClosed();
    const good = await connect(addr);
    await good.startTls({ ca: cert });
    await good.go();
  });

  it('nbdinfo (libnbd, GnuTLS) connects with nbds:// and refuses plaintext to a TLS-only server', async () => {
    const { host, port } = await start({ mode: 'require' });
    const { stdout } = await run('nbdinfo', ['--json', `nbds://${host}:${port}/?tls-certificates=${certDir}`]);
    const j = JSON.parse(stdout) as { TLS: boolean; exports: Array<{ description: string; 'export-size': number }> };
    expect(j.TLS).toBe(true);
    expect(j.exports[0]!.description).toBe('secret disk');
    expect(j.exports[0]!['export-size']).toBe(4 * 1024 * 1024);
    await expect(run('nbdinfo', ['--size', `nbd://${host}:${port}/`])).rejects.toThrow();
  });

  it('qemu-img (QEMU, GnuTLS) writes and reads through tls-creds-x509', async () => {
    const { host, port } = await start({ mode: 'require' });
    const obj = `tls-creds-x509,id=tls0,dir=${certDir},endpoint=client`;
    const img = `driver=nbd,server.type=inet,server.host=${host},server.port=${port},tls-creds=tls0`;
    const { stdout } = await run('qemu-img', ['info', '--output=json', '--object', obj, '--image-opts', img]);
    expect((JSON.parse(stdout) as { 'virtual-size': number })['virtual-size']).toBe(4 * 1024 * 1024);
    await run('qemu-io', ['--object', obj, '--image-opts', img, '-c', 'write -P 0x77 64k 64k']);
    const buf = Buffer.alloc(65536);
    await vol.read(65536, buf);
    expect(buf.equals(Buffer.alloc(65536, 0x77))).toBe(true);
  });
});
