/**
 * QosVolume: one VM disk's entry into the host-wide scheduler. A Volume over a Volume: each
 * data request is submitted to the VM's flow and runs on the volume below when dispatched.
 * Every disk of a VM shares the VM's one flow, so the VM's settings cover all its disks.
 *
 * Where it sits: below the ordering layer (the NBD export's OrderedVolume, or the one a disk
 * with several front ends shares) — NbdExport(Ordered(Qos(volume))). A request therefore waits
 * for the earlier requests it conflicts with *before* it is queued here, and never holds one of
 * the host's device slots while it waits for another request; the other way round, requests
 * holding every slot could wait on overlapping requests queued behind them, a deadlock. Flush
 * and FUA keep their meaning: the ordering layer lets a flush through only when the writes it
 * covers have completed (through this layer), and this layer never reorders what is already
 * dispatched; it only delays dispatch.
 *
 * What is scheduled: read and write (cost by size), flush, trim and write-zeroes (one request,
 * no bytes: they move no payload). blockStatus and prefetch pass straight through: they carry
 * no data, are cheap, and the NBD server issues blockStatus as part of a read it already counts.
 */
import { VolumeLayer } from '../block/layer.js';
import type { Volume, WriteOptions, ZeroOptions } from '../block/volume.js';
import { OpKind, type QosFlow } from './scheduler.js';

export class QosVolume extends VolumeLayer {
  constructor(
    inner: Volume,
    readonly flow: QosFlow,
  ) {
    super(inner);
  }

  override read(offset: number, buf: Buffer): Promise<void> {
    return this.flow.submit(OpKind.Read, buf.length, () => this.inner.read(offset, buf));
  }
  override write(offset: number, buf: Buffer, opts?: WriteOptions): Promise<void> {
    return this.flow.submit(OpKind.Write, buf.length, () => this.inner.write(offset, buf, opts));
  }
  override flush(): Promise<void> {
    return this.flow.submit(OpKind.Other, 0, () => this.inner.flush());
  }
  override trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    return this.flow.submit(OpKind.Other, 0, () => this.inner.trim(offset, length, opts));
  }
  override writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    return this.flow.submit(OpKind.Other, 0, () => this.inner.writeZeroes(offset, length, opts));
  }
}
