/**
 * A VM's shared directories (the second virtual drive): each is served over virtiofs on its own
 * vhost-user socket (QEMU's `vhost-user-fs-pci`) and mounted in the guest with
 * `mount -t virtiofs TAG TARGET`. The directory is either a name in the resolver (`path`, e.g.
 * `/projects/alpha`: on a storage node, created on the node with the most free space when new)
 * or a directory of this host (`dir`, as virtiofsd's --shared-dir).
 */
import path from 'node:path';
import { z } from 'zod';

/** virtio-fs tags are at most 36 bytes (the config space field); no NUL. */
export const MAX_TAG_BYTES = 36;
/** Request queues a share's device offers at most. */
export const MAX_SHARE_QUEUES = 16;

const idRangeSchema = z.strictObject({
  guest: z.number().int().min(0).max(0xffffffff),
  host: z.number().int().min(0).max(0xffffffff),
  count: z.number().int().min(1).max(0x100000000),
});

export const shareSchema = z
  .strictObject({
    /** The virtiofs tag the guest mounts by (`mount -t virtiofs TAG TARGET`). */
    tag: z
      .string()
      .min(1, 'must not be empty')
      .refine((s) => Buffer.byteLength(s) <= MAX_TAG_BYTES && !s.includes('\0'), `at most ${MAX_TAG_BYTES} bytes, no NUL`),
    /** A directory name in the resolver (on a storage node): `/a/b`, segments of [A-Za-z0-9._-]. */
    path: z.string().min(1).optional(),
    /** Or a directory of this host. */
    dir: z.string().min(1).optional(),
    /** Where the guest mounts it (printed in the mount command; the guest decides). */
    target: z.string().startsWith('/', 'an absolute path in the guest'),
    readOnly: z.boolean().optional(),
    /** The vhost-user-fs socket; default `<runDir>/<vm>-<tag>.fs.sock`. */
    socket: z.string().min(1).optional(),
    /** Request queues (QEMU's vhost-user-fs-pci num-request-queues); default 1. */
    queues: z.number().int().min(1).max(MAX_SHARE_QUEUES).optional(),
    /** guest -> storage uid/gid ranges; an id in no range becomes 65534. */
    uidMap: z.array(idRangeSchema).optional(),
    gidMap: z.array(idRangeSchema).optional(),
  })
  .superRefine((s, ctx) => {
    if ((s.path === undefined) === (s.dir === undefined)) {
      ctx.addIssue({ code: 'custom', path: ['path'], message: 'give either path (a directory on a storage node) or dir (a directory of this host)' });
    }
    if (s.path !== undefined && !/^(\/[A-Za-z0-9._-]+)+$/.test(s.path)) {
      ctx.addIssue({ code: 'custom', path: ['path'], message: 'an absolute path of [A-Za-z0-9._-] segments, e.g. /projects/alpha' });
    }
    if (s.path !== undefined && s.path.split('/').some((seg) => seg === '.' || seg === '..')) {
      ctx.addIssue({ code: 'custom', path: ['path'], message: 'no "." or ".." segments' });
    }
  });

export const sharesSchema = z.array(shareSchema).superRefine((list, ctx) => {
  const seen = new Set<string>();
  list.forEach((s, i) => {
    if (seen.has(s.tag)) ctx.addIssue({ code: 'custom', path: [i, 'tag'], message: `duplicate share tag "${s.tag}"` });
    seen.add(s.tag);
  });
});

export type ShareInput = z.input<typeof shareSchema>;

export interface IdRange {
  guest: number;
  host: number;
  count: number;
}

/** A share with every default filled and every host path absolute. */
export interface ShareConfig {
  tag: string;
  /** Resolver name of a directory on a storage node; absent for a local directory. */
  path?: string;
  /** Local directory (absolute); absent for a remote one. */
  dir?: string;
  target: string;
  readOnly: boolean;
  socket: string;
  queues: number;
  uidMap?: IdRange[];
  gidMap?: IdRange[];
}

export function resolveShare(vmName: string, s: z.output<typeof shareSchema>, ctx: { baseDir: string; runDir: string }): ShareConfig {
  return {
    tag: s.tag,
    ...(s.path !== undefined ? { path: s.path } : {}),
    ...(s.dir !== undefined ? { dir: path.resolve(ctx.baseDir, s.dir) } : {}),
    target: s.target,
    readOnly: s.readOnly ?? false,
    socket: s.socket ? path.resolve(ctx.baseDir, s.socket) : path.join(ctx.runDir, `${vmName}-${s.tag.replace(/[^A-Za-z0-9._-]/g, '_')}.fs.sock`),
    queues: s.queues ?? 1,
    ...(s.uidMap ? { uidMap: s.uidMap } : {}),
    ...(s.gidMap ? { gidMap: s.gidMap } : {}),
  };
}

/** The QEMU arguments that attach a share (memory must be shared: see `qemuMemoryArgs`). */
export function shareQemuArgs(s: Pick<ShareConfig, 'socket' | 'tag' | 'queues'>, index: number): string[] {
  const id = `vstore-fs${index}`;
  return [
    '-chardev', `socket,id=${id},path=${s.socket}`,
    '-device', `vhost-user-fs-pci,chardev=${id},tag=${s.tag}${s.queues > 1 ? `,num-request-queues=${s.queues}` : ''}`,
  ];
}

/** vhost-user devices need the guest's RAM in shared memory. */
export function qemuMemoryArgs(memory = '1G'): string[] {
  return ['-object', `memory-backend-memfd,id=mem,size=${memory},share=on`, '-numa', 'node,memdev=mem'];
}

/** The command the guest runs to mount a share. */
export function shareMountCommand(s: ShareConfig): string {
  return `mkdir -p ${s.target} && mount -t virtiofs ${s.tag}${s.readOnly ? ' -o ro' : ''} ${s.target}`;
}
