// The addon's vhost-user plumbing on real fds: fd passing, eventfd watching, shared mappings.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { native } from '../../../lib/native/index.js';

const dir = mkdtempSync(path.join(tmpdir(), 'vst-nat-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function waitFor(cond: () => boolean, ms = 2000): Promise<void> {
  const start = Date.now();
  return new Promise((resolve, reject) => {
    const tick = () => {
      if (cond()) resolve();
      else if (Date.now() - start > ms) reject(new Error('timeout'));
      else setTimeout(tick, 2);
    };
    tick();
  });
}

describe('native vhost plumbing', () => {
  const n = native();

  it('passes bytes and fds over a unix socket, and reports readiness through FdWatcher', async () => {
    const sock = path.join(dir, 'a.sock');
    const lfd = n.unixListen(sock);
    let accepted = -1;
    const lw = new n.FdWatcher(lfd, () => {
      accepted = n.unixAccept(lfd);
    });
    lw.start();
    const cfd = n.unixConnect(sock);
    await waitFor(() => accepted >= 0);
    lw.close();
    n.closeFd(lfd);

    const mfd = n.memfdCreate('t', 8192);
    const efd = n.eventfd();
    n.sendMsg(cfd, Buffer.from('hello'), [mfd, efd]);

    const got: Buffer[] = [];
    const fds: number[] = [];
    const w = new n.FdWatcher(accepted, () => {
      const buf = Buffer.alloc(3);
      const r = n.recvMsg(accepted, buf, fds);
      if (r > 0) got.push(buf.subarray(0, r));
    });
    w.start();
    await waitFor(() => Buffer.concat(got).length === 5);
    w.close();
    expect(Buffer.concat(got).toString()).toBe('hello');
    expect(fds).toHaveLength(2);
    expect(n.fdSize(fds[0]!)).toBe(8192);

    // The received memfd maps the same pages as the sender's.
    const [a] = n.mmapShared(mfd, 0, 8192, 1 << 30);
    const [b] = n.mmapShared(fds[0]!, 4096 + 100, 100, 64);
    const ua = new Uint8Array(a!);
    ua[4096 + 100] = 42;
    expect(new Uint8Array(b!)[0]).toBe(42);
    expect(n.mmapShared(fds[0]!, 0, 8192, 3000).map((x) => x.byteLength)).toEqual([3000, 3000, 2192]);

    // The received eventfd signals the sender's watcher, which drains it.
    let kicks = 0;
    const ew = new n.FdWatcher(efd, () => kicks++, { eventfd: true });
    ew.start();
    n.eventfdWrite(fds[1]!);
    n.eventfdWrite(fds[1]!);
    await waitFor(() => kicks >= 1);
    expect(n.eventfdRead(efd)).toBe(0);
    ew.close();

    // End of stream reads as 0.
    n.closeFd(cfd);
    expect(n.recvMsg(accepted, Buffer.alloc(4), [])).toBe(0);
    for (const f of [accepted, mfd, efd, ...fds]) n.closeFd(f);
  });

  it('rejects bad arguments with exceptions, not crashes', () => {
    expect(() => n.recvMsg(-1, Buffer.alloc(1), [])).toThrow();
    expect(() => n.sendMsg(1e9, Buffer.alloc(1))).toThrow();
    expect(() => n.mmapShared(-5, 0, 1, 1)).toThrow();
    expect(() => n.unixListen('x'.repeat(200))).toThrow(/ENAMETOOLONG/);
    expect(() => n.unixConnect(path.join(dir, 'nobody.sock'))).toThrow(/ENOENT|ECONNREFUSED/);
    const mfd = n.memfdCreate('t', 4096);
    expect(() => n.mmapShared(mfd, 0, 0, 4096)).toThrow(/EINVAL/);
    n.closeFd(mfd);
  });
});
