/**
 * Health probe of a path: connect (from the path's source address) and wait for the NBD server
 * greeting (`NBDMAGIC`), then hang up. It proves what a request needs — the address is reachable
 * and the NBD server there is answering — without an export name or a handshake's cost. A
 * blackholed path (connect hangs, or a proxy accepts and forwards nothing) fails by timeout.
 */
import * as net from 'node:net';
import { parseNbdUri } from '../nbd/client.js';

const GREETING = Buffer.from('NBDMAGIC', 'latin1');

export type Prober = (address: string, source: string | undefined, timeoutMs: number) => Promise<void>;

export const probeNbdGreeting: Prober = (address, source, timeoutMs) =>
  new Promise<void>((resolve, reject) => {
    let t;
    try {
      t = parseNbdUri(address).address;
    } catch (e) {
      reject(e as Error);
      return;
    }
    const s = 'unix' in t ? net.connect({ path: t.unix }) : net.connect({ host: t.host, port: t.port, ...(source ? { localAddress: source } : {}) });
    let got = Buffer.alloc(0);
    const done = (err: Error | null): void => {
      clearTimeout(timer);
      s.destroy();
      if (err) reject(err);
      else resolve();
    };
    const timer = setTimeout(() => done(new Error(`no NBD greeting within ${timeoutMs} ms`)), timeoutMs);
    s.on('data', (b: Buffer) => {
      // Copy: at most 8 bytes, once per probe.
      got = Buffer.concat([got, b]).subarray(0, GREETING.length);
      if (got.length < GREETING.length) return;
      done(got.equals(GREETING) ? null : new Error('not an NBD server (bad greeting)'));
    });
    s.on('error', (e) => done(e));
    s.on('close', () => done(new Error('closed before the NBD greeting')));
  });
