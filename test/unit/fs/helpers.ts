// Small helpers for FileTree tests: contexts, names, path walks and whole-file I/O.
import { ROOT_ID, type FileTree, type FsContext } from '../../../lib/fs/tree.js';

export const O_RDONLY = 0;
export const O_WRONLY = 1;
export const O_RDWR = 2;
export const O_CREAT = 0o100;
export const O_EXCL = 0o200;
export const O_TRUNC = 0o1000;
export const O_APPEND = 0o2000;
export const S_IFREG = 0o100000;
export const S_IFDIR = 0o040000;
export const S_IFLNK = 0o120000;
export const S_IFIFO = 0o010000;
export const S_IFCHR = 0o020000;

export function ctx(session = 's1', uid = 0, gid = 0): FsContext {
  return { uid, gid, pid: 1234, session };
}

export const b = (s: string): Buffer => Buffer.from(s);

/** Looks up each component of `p` (relative, '/'-separated) from the root: the last node id. */
export async function walk(tree: FileTree, c: FsContext, p: string): Promise<number> {
  let id = ROOT_ID;
  for (const part of p.split('/').filter(Boolean)) id = (await tree.lookup(c, id, b(part))).nodeId;
  return id;
}

/** Creates (or truncates) `name` in `parent` with `data`; returns the node id. */
export async function writeFile(tree: FileTree, c: FsContext, parent: number, name: string, data: Buffer | string, mode = 0o644): Promise<number> {
  const { entry, open } = await tree.create(c, parent, b(name), S_IFREG | mode, O_RDWR | O_TRUNC);
  await tree.write(c, entry.nodeId, open.fh, 0, Buffer.from(data));
  await tree.release(c, entry.nodeId, open.fh);
  return entry.nodeId;
}

export async function readFile(tree: FileTree, c: FsContext, nodeId: number): Promise<Buffer> {
  const { fh } = await tree.open(c, nodeId, O_RDONLY);
  try {
    const { attr } = await tree.getattr(c, nodeId);
    return await tree.read(c, nodeId, fh, 0, Math.max(attr.size, 1) + 4096);
  } finally {
    await tree.release(c, nodeId, fh);
  }
}

/** Every name of a directory, read through readdir in chunks of `chunk`. */
export async function listAll(tree: FileTree, c: FsContext, dir: number, chunk = 64): Promise<string[]> {
  const { fh } = await tree.opendir(c, dir, 0);
  const names: string[] = [];
  let off = 0;
  for (;;) {
    const ents = await tree.readdir(c, dir, fh, off, chunk);
    if (ents.length === 0) break;
    for (const e of ents) names.push(e.name.toString());
    off = ents[ents.length - 1]!.offset;
  }
  await tree.releasedir(c, dir, fh);
  return names;
}

/** Expects a promise to reject with an FsError of `code`. */
export async function errno(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    return (e as { code?: string }).code ?? String(e);
  }
  return 'OK';
}
