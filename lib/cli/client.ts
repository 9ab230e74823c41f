/**
 * The CLI's side of the control API: JSON requests over the daemon's unix socket, with errors
 * turned into one line a user can act on (daemon not running, permission, the daemon's answer).
 */
import { request } from 'node:http';
import { Option } from 'commander';
import type { DiskStatus } from '../daemon/registry.js';

export const DEFAULT_CONTROL = '/run/vstore/control.sock';

/** `--control PATH`, shared by every command that talks to the daemon (env VSTORE_CONTROL). */
export function controlOption(): Option {
  return new Option('--control <path>', 'control socket of the running daemon').env('VSTORE_CONTROL').default(DEFAULT_CONTROL);
}

export class ControlError extends Error {
  constructor(
    message: string,
    readonly status?: number,
  ) {
    super(message);
    this.name = 'ControlError';
  }
}

export async function call<T = unknown>(socketPath: string, method: string, path: string, body?: unknown): Promise<T> {
  const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
  const res = await new Promise<{ status: number; text: string }>((resolve, reject) => {
    const req = request(
      {
        socketPath,
        method,
        path,
        headers: payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {},
      },
      (r) => {
        const chunks: Buffer[] = [];
        r.on('data', (c: Buffer) => chunks.push(c));
        r.on('end', () => resolve({ status: r.statusCode ?? 0, text: Buffer.concat(chunks).toString('utf8') }));
        r.on('error', reject);
      },
    );
    req.on('error', (e: NodeJS.ErrnoException) => {
      if (e.code === 'ENOENT' || e.code === 'ECONNREFUSED') {
        reject(new ControlError(`the daemon is not running (no control socket at ${socketPath}; start it with \`vstore serve --config FILE\`, or pass --control PATH)`));
      } else if (e.code === 'EACCES') {
        reject(new ControlError(`permission denied on the control socket ${socketPath} (run as the daemon's user)`));
      } else {
        reject(new ControlError(`cannot reach the daemon at ${socketPath}: ${e.message}`));
      }
    });
    req.end(payload);
  });
  let parsed: unknown;
  try {
    parsed = JSON.parse(res.text || 'null');
  } catch {
    parsed = undefined;
  }
  if (res.status >= 400) {
    const msg = (parsed as { error?: string } | undefined)?.error ?? (res.text || `HTTP ${res.status}`);
    throw new ControlError(msg, res.status);
  }
  return parsed as T;
}

/** Raw text GET (the /metrics endpoint). */
export async function getText(socketPath: string, path: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, path }, (r) => {
      const chunks: Buffer[] = [];
      r.on('data', (c: Buffer) => chunks.push(c));
      r.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
      r.on('error', reject);
    });
    req.on('error', (e) => reject(new ControlError(`cannot reach the daemon at ${socketPath}: ${e.message}`)));
    req.end();
  });
}

/** Where a disk is served, one entry per front end: `nbd+unix:///EXPORT?socket=S`, `vhost-user-blk S (N queues)`. */
export function diskEndpoints(d: Pick<DiskStatus, 'socket' | 'export' | 'vhostUser'>): string[] {
  const out: string[] = [];
  if (d.socket) out.push(`nbd+unix:///${encodeURIComponent(d.export)}?socket=${d.socket}`);
  if (d.vhostUser) out.push(`vhost-user-blk ${d.vhostUser.socket} (${d.vhostUser.queues} queue${d.vhostUser.queues === 1 ? '' : 's'})`);
  return out;
}
