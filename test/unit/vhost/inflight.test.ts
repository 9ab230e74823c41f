// The inflight area: what a restarted back end recovers from it.
import { describe, expect, it } from 'vitest';
import { inflightBytes, inflightQueueBytes, InflightQueue } from '../../../lib/vhost/inflight.js';

describe('InflightQueue', () => {
  it('starts blank, then recovers popped-but-not-completed chains in submission order', () => {
    expect(inflightQueueBytes(128)).toBe(2112);
    expect(inflightBytes(2, 128)).toBe(4224);
    const area = Buffer.alloc(inflightQueueBytes(8));
    const a = new InflightQueue(area, 8);
    expect(a.recover(5)).toEqual({ lastAvail: 5, resubmit: [], fresh: true });
    // Pop 4 chains (heads 3, 0, 6, 1), complete two (0 then 6).
    for (const h of [3, 0, 6, 1]) a.get(h);
    let used = 5;
    for (const h of [0, 6]) {
      a.prePut(h);
      used++;
      a.postPut(h, used);
    }
    // The back end dies; a new one maps the same area.
    const b = new InflightQueue(area, 8);
    const r = b.recover(used);
    expect(r).toEqual({ lastAvail: 9, resubmit: [3, 1], fresh: false });
    // New pops continue the counter after the recovered ones.
    b.get(2);
    const c = new InflightQueue(area, 8).recover(used);
    expect(c.resubmit).toEqual([3, 1, 2]);
  });

  it('treats a crash between publishing used->idx and clearing the flag as completed', () => {
    const area = Buffer.alloc(inflightQueueBytes(8));
    const a = new InflightQueue(area, 8);
    a.recover(0);
    a.get(4);
    a.get(5);
    a.prePut(5);
    // ...used element and used->idx = 1 written to the ring, then the process dies.
    const r = new InflightQueue(area, 8).recover(1);
    expect(r.resubmit).toEqual([4]);
    expect(r.lastAvail).toBe(2);
  });

  it('reinitialises an area made for another queue size, and wraps indices', () => {
    const area = Buffer.alloc(inflightQueueBytes(16));
    const a = new InflightQueue(area, 16);
    a.recover(0);
    a.get(1);
    expect(new InflightQueue(area, 8).recover(3).fresh).toBe(true);
    const wrapArea = Buffer.alloc(inflightQueueBytes(8));
    const w = new InflightQueue(wrapArea, 8);
    w.recover(0xffff);
    w.get(0);
    w.get(1);
    expect(new InflightQueue(wrapArea, 8).recover(0xffff).lastAvail).toBe(1);
  });
});
