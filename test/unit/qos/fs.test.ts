/**
 * QosFileTree: a share's FileTree calls through the VM's flow, on the simulated clock and device
 * of the scheduler's tests. The share's "device" is a MemoryFileTree whose reads and writes take
 * the simulated service time. Limits (ops and bytes), weights against another VM's disk, one
 * allocation for a VM's disk and share, what is counted, and a SETLKW that waits for another
 * session's unlock without holding a device slot (with the layer that would hold one beside it).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { MemoryVolume } from '../../../lib/block/memory.js';
import { parseConfig } from '../../../lib/config/schema.js';
import { Daemon } from '../../../lib/daemon/daemon.js';
import { shareServerFactory, type RunningShare, type ShareServeOptions } from '../../../lib/daemon/virtiofs.js';
import { FileTreeLayer } from '../../../lib/fs/layer.js';
import { MemoryFileTree } from '../../../lib/fs/memory.js';
import { F_UNLCK, F_WRLCK, ROOT_ID, type FileTree, type FsContext } from '../../../lib/fs/tree.js';
import { silentLogger } from '../../../lib/log.js';
import { NbdServer } from '../../../lib/nbd/server.js';
import { QosFileTree } from '../../../lib/qos/fs.js';
import { LIMIT_SLACK_SECONDS, OpKind, QosScheduler, type QosFlow } from '../../../lib/qos/scheduler.js';
import { DEFAULT_QOS } from '../../../lib/qos/settings.js';
import { b, ctx, errno, O_RDWR, S_IFREG } from '../fs/helpers.js';
import { countIn, makeSim, maxInWindow, settingsOf, SimClock, type Sim } from './sim.js';

const DEV = { depth: 4, serviceSeconds: 0.001 };
/** The most a limit may give in one second: limit x (1 s + the 20 ms slack) + 2. */
const most = (limit: number): number => Math.floor(limit * (1 + LIMIT_SLACK_SECONDS)) + 2;

/** Reads and writes take `service` seconds of the simulated clock (the share's backend). */
class SlowTree extends FileTreeLayer {
  constructor(
    inner: FileTree,
    private readonly clock: SimClock,
    private readonly service: number,
  ) {
    super(inner);
  }
  private delay(): Promise<void> {
    return new Promise((resolve) => this.clock.setTimer(resolve, this.service));
  }
  override async read(c: FsContext, nodeId: number, fh: number, offset: number, size: number): Promise<Buffer> {
    await this.delay();
    return this.inner.read(c, nodeId, fh, offset, size);
  }
  override async write(c: FsContext, nodeId: number, fh: number, offset: number, data: Buffer): Promise<number> {
    await this.delay();
    return this.inner.write(c, nodeId, fh, offset, data);
  }
}

interface ShareClient {
  tree: QosFileTree;
  mem: MemoryFileTree;
  /** Completion times of the loop's reads or writes. */
  done: number[];
  start(): void;
  stop(): void;
  errors: number;
}

/**
 * A guest's closed loop on one file of its share: `qd` requests of `bytes` outstanding (reads,
 * or writes at rotating offsets), through QosFileTree(SlowTree(MemoryFileTree)).
 */
async function shareClient(sim: Sim, flow: QosFlow | undefined, o: { qd: number; bytes: number; op: 'read' | 'write' }): Promise<ShareClient> {
  const mem = new MemoryFileTree();
  const tree = new QosFileTree(new SlowTree(mem, sim.clock, DEV.serviceSeconds), flow);
  const c = ctx('guest');
  const { entry, open } = await tree.create(c, ROOT_ID, b('f'), S_IFREG | 0o644, O_RDWR);
  await mem.write(c, entry.nodeId, open.fh, 0, Buffer.alloc(1 << 20, 7));
  let running = false;
  let outstanding = 0;
  let n = 0;
  const cl: ShareClient = {
    tree,
    mem,
    done: [],
    errors: 0,
    start: () => {
      running = true;
      while (outstanding < o.qd) issue();
    },
    stop: () => {
      running = false;
    },
  };
  const issue = (): void => {
    outstanding++;
    const off = (n++ % 16) * o.bytes;
    const p = o.op === 'read' ? tree.read(c, entry.nodeId, open.fh, off, o.bytes) : tree.write(c, entry.nodeId, open.fh, off, Buffer.alloc(o.bytes, 10 + (n % 200))); // never the initial 7
    p.then(
      () => {
        outstanding--;
        cl.done.push(sim.clock.now());
        if (running && outstanding < o.qd) issue();
      },
      () => {
        outstanding--;
        cl.errors++;
      },
    );
  };
  return cl;
}

describe('QosFileTree (simulated clock and device)', () => {
  it('a limit in IOPS holds for share reads; without the flow the same loop runs far over it', async () => {
    const sim = makeSim(DEV);
    const flow = sim.sched.addFlow('vm', settingsOf({ limit: { iops: 200 } }));
    const share = await shareClient(sim, flow, { qd: 16, bytes: 4096, op: 'read' });
    share.start();
    await sim.run(3);
    share.stop();
    expect(share.errors).toBe(0);
    expect(maxInWindow(share.done, 1)).toBeLessThanOrEqual(most(200));
    expect(countIn(share.done, 1, 3)).toBeGreaterThanOrEqual(395); // and it gets its limit
    expect(flow.status(sim.clock.now()).throttledSeconds).toBeGreaterThan(1);

    // Not bound to a flow (a share taken over before its VM is added): straight through.
    const sim2 = makeSim(DEV);
    const free = await shareClient(sim2, undefined, { qd: 16, bytes: 4096, op: 'read' });
    free.start();
    await sim2.run(1);
    free.stop();
    expect(free.done.length).toBeGreaterThan(10 * most(200));
    // ... until bound: then the limit applies from the next call.
    free.tree.flow = sim2.sched.addFlow('late', settingsOf({ limit: { iops: 200 } }));
    const before = free.done.length;
    free.start();
    await sim2.run(2);
    free.stop();
    expect(countIn(free.done, sim2.clock.now() - 1, sim2.clock.now())).toBeLessThanOrEqual(most(200));
    expect(free.done.length - before).toBeLessThan(2 * most(200) + 16);
  });

  it('a limit in bytes/s holds for share writes (cost by payload), and the data lands', async () => {
    const sim = makeSim(DEV);
    const bps = 1 << 20;
    const flow = sim.sched.addFlow('vm', settingsOf({ limit: { bps } }));
    const share = await shareClient(sim, flow, { qd: 8, bytes: 64 * 1024, op: 'write' });
    share.start();
    await sim.run(4);
    share.stop();
    await sim.run(0.1);
    // 16 writes of 64 KiB per second; at most limit x (1 s + slack) + 2 requests in any second.
    expect(maxInWindow(share.done, 1)).toBeLessThanOrEqual(Math.floor(16 * (1 + LIMIT_SLACK_SECONDS)) + 2);
    expect(countIn(share.done, 1, 4)).toBeGreaterThanOrEqual(47);
    const st = flow.status(sim.clock.now());
    expect(st.writes).toBe(share.done.length);
    expect(st.bytesWritten).toBe(share.done.length * 64 * 1024);
    const c = ctx('guest');
    const e = await share.mem.lookup(c, ROOT_ID, b('f'));
    const h = await share.mem.open(c, e.nodeId, O_RDWR);
    // the writes passed through: the first block holds one write's fill (10..209), not the initial 7
    const first = await share.mem.read(c, e.nodeId, h.fh, 0, 64 * 1024);
    expect(first[0]).toBeGreaterThanOrEqual(10);
    expect(first.every((x) => x === first[0])).toBe(true);
  });

  it('weights split a saturated device between a VM share (weight 3) and another VM disk (weight 1)', async () => {
    const sim = makeSim(DEV);
    // started after the share's file is set up (its create would queue behind the disk's requests)
    const disk = sim.vm('diskvm', { weight: 1 }, { qd: 16, autostart: false });
    const shareFlow = sim.sched.addFlow('sharevm', settingsOf({ weight: 3 }));
    const share = await shareClient(sim, shareFlow, { qd: 16, bytes: 4096, op: 'read' });
    share.start();
    disk.start();
    await sim.run(3);
    share.stop();
    disk.stop();
    const ns = countIn(share.done, 1, 3);
    const nd = countIn(disk.done, 1, 3);
    expect(ns + nd).toBeGreaterThan(7900); // the device (4 slots x 1 ms) stays busy
    expect(ns / (ns + nd)).toBeCloseTo(0.75, 2);
    expect(sim.sched.status().outstanding).toBeLessThanOrEqual(DEV.depth);
  });

  it("a VM's disk and share draw on one allocation: their sum stays under the VM limit; its status counts both", async () => {
    const sim = makeSim(DEV);
    const vm = sim.vm('vm', { limit: { iops: 300 } }, { qd: 8, autostart: false });
    const share = await shareClient(sim, vm.flow, { qd: 8, bytes: 4096, op: 'read' });
    const t0 = sim.clock.now();
    vm.start();
    share.start();
    await sim.run(3);
    vm.stop();
    share.stop();
    await sim.run(0.1);
    const all = [...vm.done, ...share.done];
    expect(maxInWindow(all, 1)).toBeLessThanOrEqual(most(300));
    expect(countIn(all, t0 + 1, t0 + 3)).toBeGreaterThanOrEqual(590);
    // neither starves the other (same flow, FIFO)
    expect(countIn(share.done, t0 + 1, t0 + 3)).toBeGreaterThan(200);
    expect(countIn(vm.done, t0 + 1, t0 + 3)).toBeGreaterThan(200);
    const st = vm.flow.status(sim.clock.now());
    expect(st.reads).toBe(vm.done.length + share.done.length);
  });
});

describe('QosFileTree: what is counted', () => {
  it('read/write by bytes, copy_file_range by length, metadata as one request; forget and endSession not at all', async () => {
    const sched = new QosScheduler({ depth: 4 });
    const flow = sched.addFlow('vm', DEFAULT_QOS);
    const mem = new MemoryFileTree();
    const t = new QosFileTree(mem, flow);
    const c = ctx('s');
    const { entry, open } = await t.create(c, ROOT_ID, b('a'), S_IFREG | 0o644, O_RDWR); // other 1
    expect(await t.write(c, entry.nodeId, open.fh, 0, Buffer.alloc(10000, 1))).toBe(10000); // write 10000
    expect((await t.read(c, entry.nodeId, open.fh, 0, 4096)).length).toBe(4096); // read 4096
    const g = await t.create(c, ROOT_ID, b('g'), S_IFREG | 0o644, O_RDWR); // other 2
    expect(await t.copyFileRange(c, { nodeId: entry.nodeId, fh: open.fh, offset: 0 }, { nodeId: g.entry.nodeId, fh: g.open.fh, offset: 0 }, 5000, 0)).toBe(5000); // write 5000
    await t.getattr(c, entry.nodeId); // other 3
    await t.lookup(c, ROOT_ID, b('a')); // other 4
    expect(await errno(t.lookup(c, ROOT_ID, b('nope')))).toBe('ENOENT'); // other 5: failures count too
    t.forget(entry.nodeId, 1);
    await t.release(c, entry.nodeId, open.fh); // other 6
    await t.endSession('s');
    expect(flow.status(sched.clock.now())).toMatchObject({ reads: 1, writes: 2, others: 6, bytesRead: 4096, bytesWritten: 15000, outstanding: 0, queued: 0 });
    expect(sched.outstanding).toBe(0);
  });
});

describe('QosFileTree: a waiting lock holds no device slot', () => {
  /** Host depth 1: one request held at the backend would stop every VM. */
  async function setup(): Promise<{ sim: Sim; flow: QosFlow; other: QosFlow; mem: MemoryFileTree; nodeId: number; fhA: number; fhB: number; a: FsContext; bCtx: FsContext }> {
    const sim = makeSim({ depth: 1, serviceSeconds: 0.001 });
    const flow = sim.sched.addFlow('vm', settingsOf({}));
    const other = sim.sched.addFlow('other', settingsOf({}));
    const mem = new MemoryFileTree();
    const a = ctx('guest-a');
    const bCtx = ctx('someone-else');
    const { entry, open } = await mem.create(a, ROOT_ID, b('f'), S_IFREG | 0o644, O_RDWR);
    await mem.lookup(bCtx, ROOT_ID, b('f'));
    const ob = await mem.open(bCtx, entry.nodeId, O_RDWR);
    // another session holds a write lock on the whole file
    await mem.setlk(bCtx, entry.nodeId, ob.fh, 9n, { start: 0, end: Number.MAX_SAFE_INTEGER, type: F_WRLCK, pid: 2 }, { wait: false, flock: false });
    return { sim, flow, other, mem, nodeId: entry.nodeId, fhA: open.fh, fhB: ob.fh, a, bCtx };
  }
  const wrlck = { start: 0, end: Number.MAX_SAFE_INTEGER, type: F_WRLCK, pid: 1 };

  it('SETLKW waits for the unlock while the VM and other VMs go on; an interrupt ends a wait with EINTR', async () => {
    const { sim, flow, other, mem, nodeId, fhA, fhB, a, bCtx } = await setup();
    const t = new QosFileTree(new SlowTree(mem, sim.clock, 0.001), flow);
    let granted = false;
    const lock = t.setlk(a, nodeId, fhA, 1n, wrlck, { wait: true, flock: false }).then(() => (granted = true));
    await sim.run(0.5);
    expect(granted).toBe(false);
    expect(sim.sched.outstanding).toBe(0); // admitted, then waiting outside the scheduler
    // the same VM's reads and another VM's requests are served meanwhile
    let reads = 0;
    for (let i = 0; i < 20; i++) void t.read(a, nodeId, fhA, 0, 4096).then(() => reads++);
    let otherDone = 0;
    for (let i = 0; i < 5; i++) void other.submit(OpKind.Read, 4096, () => new Promise<void>((r) => sim.clock.setTimer(r, 0.001))).then(() => otherDone++);
    await sim.run(0.5);
    expect([reads, otherDone, granted]).toEqual([20, 5, false]);
    // the holder unlocks (its close): the wait ends with the lock
    await mem.flush(bCtx, nodeId, fhB, 9n);
    await lock;
    expect((await mem.getlk(bCtx, nodeId, fhB, 9n, { ...wrlck, pid: 2 })).type).toBe(F_WRLCK); // held by guest-a now
    expect(flow.status(sim.clock.now())).toMatchObject({ reads: 20, others: 1, outstanding: 0 }); // the SETLKW paid one request

    // an interrupted wait: EINTR, nothing left outstanding
    await t.setlk(a, nodeId, fhA, 1n, { ...wrlck, type: F_UNLCK }, { wait: false, flock: false });
    await mem.setlk(bCtx, nodeId, fhB, 9n, { ...wrlck, pid: 2 }, { wait: false, flock: false });
    const ac = new AbortController();
    const waiting = errno(t.setlk(a, nodeId, fhA, 1n, wrlck, { wait: true, flock: false, signal: ac.signal }));
    await sim.run(0.1);
    ac.abort();
    expect(await waiting).toBe('EINTR');
    expect(sim.sched.outstanding).toBe(0);
  });

  it('(the failure it guards against) a SETLKW scheduled as an ordinary request holds the only slot: nothing else runs', async () => {
    const { sim, flow, other, mem, nodeId, fhA, a } = await setup();
    // A naive layer: the whole lock call inside the flow.
    void flow.submit(OpKind.Other, 0, () => mem.setlk(a, nodeId, fhA, 1n, wrlck, { wait: true, flock: false }));
    let otherDone = 0;
    void other.submit(OpKind.Read, 4096, () => new Promise<void>((r) => sim.clock.setTimer(r, 0.001))).then(() => otherDone++);
    await sim.run(1);
    expect(otherDone).toBe(0);
    expect(sim.sched.outstanding).toBe(1);
    expect(sim.sched.queued).toBe(1);
  });
});

describe('daemon: a share is served with its VM flow', () => {
  let dir: string | undefined;
  let daemon: Daemon | undefined;
  afterEach(async () => {
    await daemon?.stop();
    daemon = undefined;
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('the registry gives the share factory the VM flow (the one its disks use); the share has the QoS layer; none without QoS', async () => {
    for (const enabled of [true, false]) {
      dir = mkdtempSync(path.join(tmpdir(), 'vsq-fs-'));
      const seen: Array<{ vm: string; opts: ShareServeOptions | undefined; share: RunningShare }> = [];
      daemon = new Daemon(
        parseConfig({ runDir: 'run', qos: { enabled }, vms: [{ name: 'a', disks: [{ name: 'd', file: 'a.img', size: '1M' }], shares: [{ tag: 't', dir, target: '/mnt/t' }] }] }, dir),
        {
          logger: silentLogger(),
          createServer: (o) => new NbdServer(o),
          openVolume: async (d) => new MemoryVolume({ size: d.size ?? 1 << 20 }),
          shareServers: (deps) => {
            const real = shareServerFactory(deps);
            return async (vm, s, opts) => {
              const share = await real(vm, s, opts);
              seen.push({ vm, opts, share });
              return share;
            };
          },
          baseDir: dir,
        },
      );
      await daemon.start();
      expect(seen).toHaveLength(1);
      const { opts, share } = seen[0]!;
      if (enabled) {
        expect(opts?.flow?.name).toBe('a');
        // the same flow the VM's status reports (and its disks submit to): a runtime change shows on it
        opts!.flow!.update({ ...DEFAULT_QOS, weight: 5 });
        expect(daemon.status().vms[0]!.qos?.settings.weight).toBe(5);
        expect(share.bindQos).toBeTypeOf('function');
      } else {
        expect(opts?.flow).toBeUndefined();
        expect(share.bindQos).toBeUndefined();
      }
      await daemon.stop();
      daemon = undefined;
      rmSync(dir, { recursive: true, force: true });
      dir = undefined;
    }
  });
});
