/**
 * Placement: which nodes hold a name's replicas. Pure (no I/O, no clock): every store calls it
 * with the nodes it sees now, so embedded and etcd place by the same rules.
 */
import {
  checkPlaceRequest,
  ResolverError,
  type NameRecord,
  type NodeStatus,
  type PlaceRequest,
  type ReplicaRecord,
} from './types.js';

export interface ChooseOptions {
  /** Bytes every chosen node must have free (a volume's size). */
  size?: number;
  /** Node ids that must not be chosen (a name's current replicas). */
  exclude?: string[];
}

/** A node placement may choose on its own: alive, dynamic (a lease) and with a control address. */
export function isPlaceable(n: NodeStatus): boolean {
  return n.alive && !n.static && n.control.length > 0;
}

/** A node's failure domain: its zone, or the node itself when it carries none. */
function domainOf(n: NodeStatus): string {
  return n.zone !== undefined ? `z:${n.zone}` : `n:${n.id}`;
}

/**
 * Chooses `count` distinct nodes for new replicas.
 *
 * Candidates are the nodes that are alive, not static, have a control address (the resolver asks
 * them to create the volume), have at least `size` bytes free and are not in `exclude`. Static
 * nodes (plain NBD servers registered by hand) are never chosen here: a volume lives on one only
 * when pinned with `PlaceRequest.nodes`.
 *
 * Among candidates, most free space first (ties: the smaller id, so the choice is reproducible).
 * Zones: each pick prefers a node in a zone no chosen node is in yet, even over a node with more
 * free space; a node without a zone counts as a zone of its own. When there are fewer distinct
 * zones than `count`, the remaining picks fall back to distinct nodes (most free space first),
 * so the result always spans as many zones as the candidates allow.
 *
 * Throws ResolverError('ENOSPC') when fewer than `count` nodes qualify.
 */
export function chooseNodes(nodes: NodeStatus[], count: number, opts: ChooseOptions = {}): NodeStatus[] {
  if (!Number.isSafeInteger(count) || count < 0) throw new ResolverError('EINVAL', `count must be a non-negative integer, got ${count}`);
  const size = opts.size ?? 0;
  const exclude = new Set(opts.exclude ?? []);
  const seenIds = new Set<string>();
  const candidates: NodeStatus[] = [];
  for (const n of nodes) {
    if (seenIds.has(n.id)) continue; // a list with duplicates still yields distinct nodes
    seenIds.add(n.id);
    if (!exclude.has(n.id) && isPlaceable(n) && n.free >= size) candidates.push(n);
  }
  if (candidates.length < count) throw new ResolverError('ENOSPC', noSpaceMessage(nodes, count, size, exclude, candidates.length));
  candidates.sort((a, b) => b.free - a.free || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));

  const chosen: NodeStatus[] = [];
  const usedDomains = new Set<string>();
  const left = [...candidates];
  while (chosen.length < count) {
    // Most free node in a new failure domain; else most free node left.
    let i = left.findIndex((n) => !usedDomains.has(domainOf(n)));
    if (i < 0) i = 0;
    const n = left.splice(i, 1)[0]!;
    chosen.push(n);
    usedDomains.add(domainOf(n));
  }
  return chosen;
}

function noSpaceMessage(nodes: NodeStatus[], count: number, size: number, exclude: Set<string>, found: number): string {
  let dead = 0;
  let stat = 0;
  let noControl = 0;
  let full = 0;
  let excluded = 0;
  for (const n of nodes) {
    if (exclude.has(n.id)) excluded++;
    else if (n.static) stat++;
    else if (!n.alive) dead++;
    else if (n.control.length === 0) noControl++;
    else if (n.free < size) full++;
  }
  const why = [
    dead && `${dead} dead`,
    full && `${full} with less than ${size} bytes free`,
    stat && `${stat} static (used only when pinned)`,
    noControl && `${noControl} without a control address`,
    excluded && `${excluded} excluded`,
  ].filter(Boolean);
  return (
    `need ${count} live node(s)${size ? ` with ${size} bytes free` : ''}, found ${found}` +
    ` (${nodes.length} registered${why.length ? `: ${why.join(', ')}` : ''})`
  );
}

/** A replica target: a chosen node, or a pin `{node, export}`. */
export type Target = Pick<NodeStatus, 'id'> | { node: string; export?: string };

/** The record of a new name: every replica in sync, version 1. */
export function buildRecord(req: PlaceRequest, chosen: readonly Target[], now: number): NameRecord {
  const replicas: ReplicaRecord[] = chosen.map((t) => {
    if ('id' in t) return { node: t.id, state: 'in-sync' };
    return t.export !== undefined ? { node: t.node, export: t.export, state: 'in-sync' } : { node: t.node, state: 'in-sync' };
  });
  const rec: NameRecord = { name: req.name, kind: req.kind, replicas, version: 1, created: now };
  if (req.size !== undefined) rec.size = req.size;
  return rec;
}

/**
 * Where a new name's replicas go, given every node the store knows: pinned nodes first (they must
 * be registered; liveness is not asked of them, pinning is explicit), then the rest chosen by
 * `chooseNodes` among the others. Validates the request (EINVAL), ENOENT for an unknown pinned
 * node, ENOSPC when not enough nodes qualify.
 */
export function placeRecord(req: PlaceRequest, nodes: NodeStatus[], now: number): NameRecord {
  checkPlaceRequest(req);
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const pins = req.nodes ?? [];
  for (const p of pins) {
    const n = byId.get(p.node);
    if (!n) throw new ResolverError('ENOENT', `${req.name}: pinned node ${p.node} is not registered`);
    if (req.size !== undefined && n.capacity > 0 && n.free < req.size && !n.static) {
      throw new ResolverError('ENOSPC', `${req.name}: pinned node ${p.node} has ${n.free} bytes free, ${req.size} needed`);
    }
  }
  const rest = chooseNodes(nodes, req.replicas - pins.length, { size: req.size ?? 0, exclude: pins.map((p) => p.node) });
  return buildRecord(req, [...pins, ...rest], now);
}
