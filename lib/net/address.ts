/**
 * Listen and connect addresses shared by every vstore service (NBD, RPC, vhost-user sockets):
 * parsing of the address syntax and preparation of unix socket paths. No protocol here.
 *
 * Syntax: `unix:PATH` or an absolute path is a unix socket; `HOST:PORT`, `tcp:HOST:PORT`,
 * `tcp://HOST:PORT` and `[V6]:PORT` are TCP (an empty host is 127.0.0.1).
 */
import { connect } from 'node:net';
import { lstat, mkdir, rm } from 'node:fs/promises';
import path from 'node:path';

export type SocketAddress = { unix: string } | { host: string; port: number };

/** A unix socket path is in use by a live process, or is not a socket (HTTP 409 in the control API). */
export class SocketConflictError extends Error {
  readonly conflict = true;
}

export function parseHostPort(s: string, what = '--tcp'): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(s);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) throw new Error(`${what}: expected HOST:PORT (e.g. 127.0.0.1:10809), got "${s}"`);
  return { host: m[1] ?? (m[2] || '127.0.0.1'), port };
}

export function parseAddress(s: string, what = 'address'): SocketAddress {
  if (s.startsWith('unix:')) {
    const p = s.slice(5).replace(/^\/\/(?=\/)/, ''); // unix:///abs too
    if (!p) throw new Error(`${what}: empty unix socket path in "${s}"`);
    return { unix: p };
  }
  if (s.startsWith('/')) return { unix: s };
  const t = s.replace(/^tcp:(\/\/)?/, '');
  return parseHostPort(t, what);
}

export function formatAddress(a: SocketAddress): string {
  if ('unix' in a) return `unix:${a.unix}`;
  return a.host.includes(':') ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`;
}

/**
 * Makes a unix socket path usable: creates its directory, removes a stale socket left by a
 * crashed process, and refuses one that a live process still listens on (or any other file).
 */
export async function prepareSocket(p: string, field = 'socket'): Promise<void> {
  await mkdir(path.dirname(p), { recursive: true });
  let st;
  try {
    st = await lstat(p);
  } catch {
    return; // nothing there
  }
  if (!st.isSocket()) throw new SocketConflictError(`${field}: ${p} exists and is not a socket`);
  if (await isListening(p)) throw new SocketConflictError(`${field}: ${p} is in use by another process`);
  await rm(p, { force: true });
}

export function isListening(p: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(p);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}
