/**
 * `IdMapFileTree`: uid/gid translation between a guest and the tree below (a share whose files
 * belong to other ids on the storage node). Ranges `{guest, host, count}` map guest ids
 * guest..guest+count-1 to host..host+count-1: the caller's ids and the ownership a setattr sets
 * go down mapped, attributes come up mapped back. As in LocalFileTree's own maps (and user
 * namespaces), with a map an id in no range becomes `overflowId` (65534, "nobody") both ways;
 * an empty map is the identity.
 */
import { FileTreeLayer } from './layer.js';
import { mapId as mapRanges, type IdMapRange } from './local.js';
import type { Attr, FileTree, FsContext, SetAttr } from './tree.js';

export type IdRange = IdMapRange;

/** Checks ranges (integers, count >= 1, no overlap on either side); throws RangeError naming the bad one. */
export function checkIdMap(map: readonly IdRange[], what: string): void {
  const ok = (n: number): boolean => Number.isInteger(n) && n >= 0 && n <= 0xffffffff;
  map.forEach((r, i) => {
    if (!ok(r.guest) || !ok(r.host) || !Number.isInteger(r.count) || r.count < 1 || r.guest + r.count > 0x100000000 || r.host + r.count > 0x100000000) {
      throw new RangeError(`${what}[${i}]: expected {guest, host, count} of 32-bit ids, count >= 1`);
    }
    for (let j = 0; j < i; j++) {
      const o = map[j]!;
      if (r.guest < o.guest + o.count && o.guest < r.guest + r.count) throw new RangeError(`${what}[${i}]: guest ids overlap ${what}[${j}]`);
      if (r.host < o.host + o.count && o.host < r.host + r.count) throw new RangeError(`${what}[${i}]: host ids overlap ${what}[${j}]`);
    }
  });
}

/** LocalFileTree's mapping (one rule for both trees); an empty map is the identity. */
function mapId(map: readonly IdRange[], id: number, toHost: boolean, overflow: number): number {
  return mapRanges(id, map as IdRange[], toHost, overflow);
}

export class IdMapFileTree extends FileTreeLayer {
  constructor(
    inner: FileTree,
    private readonly uidMap: readonly IdRange[],
    private readonly gidMap: readonly IdRange[],
    private readonly overflowId = 65534,
  ) {
    super(inner);
    checkIdMap(uidMap, 'uidMap');
    checkIdMap(gidMap, 'gidMap');
  }

  protected override mapCtx(ctx: FsContext): FsContext {
    return { ...ctx, uid: mapId(this.uidMap, ctx.uid, true, this.overflowId), gid: mapId(this.gidMap, ctx.gid, true, this.overflowId) };
  }

  protected override mapAttr(attr: Attr): Attr {
    return { ...attr, uid: mapId(this.uidMap, attr.uid, false, this.overflowId), gid: mapId(this.gidMap, attr.gid, false, this.overflowId) };
  }

  override setattr(ctx: FsContext, nodeId: number, changes: SetAttr, fh?: number): Promise<{ attr: Attr; attrTtlMs?: number }> {
    const c = { ...changes };
    if (c.uid !== undefined) c.uid = mapId(this.uidMap, c.uid, true, this.overflowId);
    if (c.gid !== undefined) c.gid = mapId(this.gidMap, c.gid, true, this.overflowId);
    return super.setattr(ctx, nodeId, c, fh);
  }
}
