/** Builds a live NbdServer on a temp unix socket for a test, and tears it down. */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { MemoryVolume, type MemoryOp } from '../../../lib/block/memory.js';
import type { NbdExportSpec, NbdServerOptions } from '../../../lib/nbd/api.js';
import { NbdServer } from '../../../lib/nbd/server.js';
import { silentLogger } from '../../../lib/log.js';
import { RawClient } from './rawclient.js';

export interface Harness {
  server: NbdServer;
  sock: string;
  dir: string;
  vol: MemoryVolume;
  connect(): Promise<RawClient>;
  /** Connects and handshakes (GO, structured + base:allocation unless told otherwise). */
  open(o?: Parameters<RawClient['go']>[0]): Promise<RawClient>;
  cleanup(): Promise<void>;
}

export const MiB = 1024 * 1024;

export async function startHarness(o: {
  size?: number;
  hook?: (op: MemoryOp, offset: number, length: number) => void | Promise<void>;
  server?: Partial<NbdServerOptions>;
  exports?: (vol: MemoryVolume) => NbdExportSpec[];
} = {}): Promise<Harness> {
  const dir = mkdtempSync(path.join(tmpdir(), 'vstore-nbd-unit-'));
  const sock = path.join(dir, 'nbd.sock');
  const vol = new MemoryVolume({ size: o.size ?? 16 * MiB, hook: o.hook });
  const server = new NbdServer({ logger: silentLogger(), ...o.server });
  for (const e of o.exports ? o.exports(vol) : [{ name: '', description: 'test disk', volume: vol }]) server.addExport(e);
  await server.listen({ unix: sock });
  const clients: RawClient[] = [];
  const h: Harness = {
    server,
    sock,
    dir,
    vol,
    async connect() {
      const c = await RawClient.connect(sock);
      clients.push(c);
      return c;
    },
    async open(go) {
      const c = await h.connect();
      await c.greeting();
      await c.go(go);
      return c;
    },
    async cleanup() {
      for (const c of clients) c.destroy();
      await server.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
  return h;
}

/** A gate a volume hook can wait on: `wait()` blocks until `open()`. */
export function gate(): { wait: () => Promise<void>; open: () => void; waiting: () => number } {
  let n = 0;
  let release!: () => void;
  const p = new Promise<void>((r) => (release = r));
  return {
    wait: async () => {
      n++;
      await p;
    },
    open: () => release(),
    waiting: () => n,
  };
}

export function pattern(len: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(len);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < len; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
