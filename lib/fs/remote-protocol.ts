/**
 * The directory RPC between a host (RemoteFileTree, lib/fs/remote.ts) and a storage node
 * (lib/node/dirs.ts): method names and the pure parts of the wire shape both sides share. The
 * frames are lib/rpc's (u32 length + msgpack); `Buffer`s (names, data, xattr values) travel as
 * msgpack binary, never base64.
 *
 * Session: `fs.attach {path, readOnly?}` binds the RPC connection to one exported directory and
 * answers `{sid}`. Every `fs.*` call carries `s: sid`; a call whose sid is not the connection's
 * session is answered with the code SESSION_GONE (the node restarted or the connection is new),
 * never executed, so a host cannot use ids of an old session in a new one: node ids are reused by
 * a restarted node.
 *
 * Params of every fs call: `s` sid, `c` the caller (`{u, g, p, m?}`: uid, gid, pid, umask), then
 * the operation's own fields (`n` node id, `p` parent, `name`, `fh`, `off`, `size`, `data`, ...).
 * 64-bit lock owners travel as hex strings (msgpack here decodes 64-bit integers to doubles, which
 * would lose bits).
 *
 * On the node the whole connection is one FileTree session (ids, handles and locks); a host that
 * multiplexes several sessions of its own (guests, a host mount) over one connection keeps them
 * apart itself (RemoteFileTree salts lock owners with its session).
 */
import { FsError } from './errors.js';
import type { FsContext } from './tree.js';

/** Error code of a call made outside the connection's session (not an errno: the host re-attaches and retries). */
export const SESSION_GONE = 'EVSESSION';

/** The wire form of an FsContext (the session is the connection's, chosen by the node). */
export interface WireCtx {
  u: number;
  g: number;
  p: number;
  m?: number;
}
/** Largest read a node serves in one call and largest write it takes (also bounded by the frame size). */
export const MAX_IO = 4 * 1024 * 1024;

export function encodeCtx(ctx: FsContext): WireCtx {
  const w: WireCtx = { u: ctx.uid, g: ctx.gid, p: ctx.pid };
  if (ctx.umask !== undefined) w.m = ctx.umask;
  return w;
}

function u32(x: unknown): x is number {
  return typeof x === 'number' && Number.isInteger(x) && x >= 0 && x <= 0xffffffff;
}

/** Validates a wire context (EINVAL otherwise); `session` is the node's session of the connection. */
export function decodeCtx(x: unknown, session: string): FsContext {
  const w = x as Partial<WireCtx> | null;
  if (typeof w !== 'object' || w === null) throw new FsError('EINVAL', 'c: expected the caller context');
  if (!u32(w.u) || !u32(w.g) || !u32(w.p)) throw new FsError('EINVAL', 'c: uid, gid and pid must be 32-bit unsigned integers');
  if (w.m !== undefined && w.m !== null && !(u32(w.m) && w.m <= 0o777)) throw new FsError('EINVAL', 'c.m: umask must be 0..0777');
  const ctx: FsContext = { uid: w.u, gid: w.g, pid: w.p, session };
  if (typeof w.m === 'number') ctx.umask = w.m;
  return ctx;
}

/** A 64-bit lock owner as the wire carries it. */
export function encodeOwner(owner: bigint): string {
  return BigInt.asUintN(64, owner).toString(16);
}

export function decodeOwner(x: unknown): bigint {
  if (typeof x !== 'string' || !/^[0-9a-f]{1,16}$/.test(x)) throw new FsError('EINVAL', 'owner: expected up to 16 hex digits');
  return BigInt(`0x${x}`);
}
