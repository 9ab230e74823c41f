/**
 * libnbd's Python bindings (nbdsh) against `vstore nbd`: the edges of TRIM, WRITE_ZEROES,
 * BLOCK_STATUS and CACHE, the error codes the NBD spec asks for (EINVAL for reads past the end,
 * ENOSPC for writes past it, EPERM on a read-only export), and concurrent overlapping writes.
 * Each case is a Python snippet with its own asserts; a failed assert fails the test with the
 * Python traceback.
 */
import path from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  MiB, nbdsh, requireCommands, requirePythonModule, sparseImage, startNbdServer, tempDir, type NbdServer,
} from '../helpers/index.js';

const SIZE = 16 * MiB;
let dir: string;
let srv: NbdServer | undefined;
beforeAll(() => {
  requireCommands('nbdsh');
  requirePythonModule('nbd');
  dir = tempDir('vstore-nbdsh-');
});
async function stopCurrent(): Promise<void> {
  const s = srv;
  srv = undefined;
  if (s) await s.stop();
}
afterEach(stopCurrent);

const PRELUDE = String.raw`
import os, errno
URI = os.environ['NBD_URI']
SIZE = int(os.environ['SIZE'])
KiB = 1024
MiB = 1024 * KiB

def connect(strict=True):
    g = nbd.NBD()
    g.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    g.connect_uri(URI)
    if not strict:
        g.set_strict_mode(0)  # let requests the client library would refuse reach the server
    return g

def status(g, off, count, flags=0):
    """base:allocation extents as [(offset, length, flags)] for one BLOCK_STATUS request."""
    out = []
    def cb(ctx, o, entries, err):
        if ctx == nbd.CONTEXT_BASE_ALLOCATION:
            assert o == off, (o, off)
            pos = o
            for i in range(0, len(entries), 2):
                out.append((pos, entries[i], entries[i + 1]))
                pos += entries[i]
        return 0
    g.block_status(count, off, cb, flags)
    assert out, 'no base:allocation extents'
    return out

def merged(ext):
    res = []
    for o, l, f in ext:
        if res and res[-1][2] == f and res[-1][0] + res[-1][1] == o:
            res[-1] = (res[-1][0], res[-1][1] + l, f)
        else:
            res.append((o, l, f))
    return res

def status_all(g, off, count):
    """Extents covering [off, off+count), asking again where the server answered less."""
    res = []
    end = off + count
    while off < end:
        ext = status(g, off, end - off)
        for o, l, f in ext:
            l = min(l, end - o)
            if l > 0:
                res.append((o, l, f))
        off = ext[-1][0] + ext[-1][1]
    return merged(res)

def expect_errno(fn, *codes):
    try:
        fn()
    except nbd.Error as e:
        # nbd.Error: .errnum is the numeric errno, .errno its name
        assert e.errnum in codes, 'expected %s, got %s (%s)' % ([errno.errorcode[c] for c in codes], e.errno, e.string)
        return
    raise AssertionError('expected %s, the request succeeded' % [errno.errorcode[c] for c in codes])

def pattern(n, seed):
    return bytes(((i * 131 + seed * 17) % 251) + 1 for i in range(n))

HOLE = nbd.STATE_HOLE
ZERO = nbd.STATE_ZERO
`;

async function py(s: NbdServer, code: string): Promise<string> {
  const r = await nbdsh(PRELUDE + code + "\nprint('PY-OK')\n", {
    env: { NBD_URI: s.uri, SIZE: String(SIZE) },
    check: false,
  });
  if (r.code !== 0 || !r.stdout.includes('PY-OK')) {
    throw new Error(`nbdsh script failed (exit ${r.code}):\n${r.stderr}\n${r.stdout}`);
  }
  return r.stdout;
}

let n = 0;
async function freshExport(opts: { readOnly?: boolean } = {}): Promise<NbdServer> {
  const image = path.join(dir, `export${n++}.raw`);
  sparseImage(image, SIZE, opts.readOnly ? [{ offset: 0, length: MiB, seed: 7 }] : []);
  srv = await startNbdServer({ image, readOnly: opts.readOnly });
  return srv;
}

describe('nbdsh edge cases with vstore nbd', () => {
  it('WRITE_ZEROES: fast zero, no-hole, may-trim, unaligned; data around is intact', async () => {
    const s = await freshExport();
    await py(s, String.raw`
g = connect()
assert g.can_zero() and g.can_fast_zero(), 'zero / fast zero not advertised'
data = pattern(4 * MiB, 1)
g.pwrite(data, 0)
g.zero(256 * KiB, 64 * KiB, nbd.CMD_FLAG_FAST_ZERO)
g.zero(128 * KiB, 1 * MiB, nbd.CMD_FLAG_NO_HOLE)
g.zero(1 * MiB, 2 * MiB)                       # may trim
g.zero(3333, 3 * MiB + 1000)                   # unaligned
g.zero(1 * MiB, 3 * MiB + 65536, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)
g.flush()
want = bytearray(data)
for off, ln in [(64 * KiB, 256 * KiB), (1 * MiB, 128 * KiB), (2 * MiB, 1 * MiB), (3 * MiB + 1000, 3333), (3 * MiB + 65536, 1 * MiB - 65536)]:
    want[off:off + ln] = bytes(ln)
got = g.pread(4 * MiB, 0)
assert got == bytes(want), 'zeroed ranges or their neighbours are wrong'
# Zeroed ranges never report "data that is not zero" as hole: a hole must read as zeroes.
for o, l, f in status_all(g, 0, 4 * MiB):
    if f & HOLE:
        assert got[o:o + l] == bytes(l), ('hole over non-zero data', o, l)
`);
  });

  it('BLOCK_STATUS: data after write, hole after trim, hole|zero on never-written ranges', async () => {
    const s = await freshExport();
    await py(s, String.raw`
g = connect()
assert g.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
assert g.can_trim()
assert status_all(g, 0, SIZE) == [(0, SIZE, HOLE | ZERO)], status_all(g, 0, SIZE)
g.pwrite(pattern(2 * MiB, 2), 4 * MiB)
g.flush()
assert status_all(g, 4 * MiB, 2 * MiB) == [(4 * MiB, 2 * MiB, 0)], status_all(g, 4 * MiB, 2 * MiB)
g.trim(1 * MiB, 4 * MiB + 512 * KiB)
g.flush()
st = status_all(g, 4 * MiB, 2 * MiB)
assert st == [(4 * MiB, 512 * KiB, 0), (4 * MiB + 512 * KiB, 1 * MiB, HOLE | ZERO), (5 * MiB + 512 * KiB, 512 * KiB, 0)], st
# A raw file reads zeroes after trim.
assert g.pread(1 * MiB, 4 * MiB + 512 * KiB) == bytes(1 * MiB)
assert g.pread(512 * KiB, 4 * MiB) == pattern(2 * MiB, 2)[:512 * KiB]
# Whole export: holes before and after.
st = status_all(g, 0, SIZE)
assert st[0] == (0, 4 * MiB, HOLE | ZERO) and st[-1] == (6 * MiB, SIZE - 6 * MiB, HOLE | ZERO), st
# Status of a sub-range starting inside an extent, and at the last byte.
st = status(g, 4 * MiB + 100, 1000)
assert st[0][0] == 4 * MiB + 100 and st[0][2] == 0, st
st = status(g, SIZE - 1, 1)
assert st[0][0] == SIZE - 1 and st[0][1] >= 1 and st[0][2] & HOLE, st
`);
  });

  it('BLOCK_STATUS with REQ_ONE answers exactly one extent, inside the request', async () => {
    const s = await freshExport();
    await py(s, String.raw`
g = connect()
g.pwrite(pattern(64 * KiB, 3), 0)
g.pwrite(pattern(64 * KiB, 4), 1 * MiB)
g.flush()
for off, count in [(0, 2 * MiB), (64 * KiB, 2 * MiB), (1 * MiB, 64 * KiB), (1 * MiB + 4096, 4096), (0, SIZE)]:
    ext = status(g, off, count, nbd.CMD_FLAG_REQ_ONE)
    assert len(ext) == 1, ('REQ_ONE answered %d extents' % len(ext), off, count, ext)
    o, l, f = ext[0]
    assert o == off and 0 < l <= count, (off, count, ext)
    data = g.pread(l, o)
    if f & ZERO:
        assert data == bytes(l), ('ZERO extent over data', ext)
    if off in (0, 1 * MiB, 1 * MiB + 4096):
        assert not (f & HOLE), ('written data reported as hole', ext)
# Without REQ_ONE the answer may hold several extents, contiguous, none past the request.
ext = status(g, 0, 2 * MiB)
pos = 0
for o, l, f in ext:
    assert o == pos and l > 0
    pos += l
assert pos <= 2 * MiB, ext
`);
  });

  it('CACHE on valid ranges succeeds; BLOCK_STATUS and CACHE past the end are refused', async () => {
    const s = await freshExport();
    await py(s, String.raw`
g = connect()
assert g.can_cache(), 'NBD_FLAG_SEND_CACHE not advertised'
g.pwrite(pattern(1 * MiB, 5), 0)
g.cache(1 * MiB, 0)
g.cache(SIZE, 0)
g.cache(1, SIZE - 1)
assert g.pread(1 * MiB, 0) == pattern(1 * MiB, 5)
l = connect(strict=False)
expect_errno(lambda: status(l, SIZE, 4096), errno.EINVAL)
expect_errno(lambda: l.cache(8192, SIZE - 4096), errno.EINVAL, errno.ENOSPC)
assert l.pread(4096, 0) == pattern(1 * MiB, 5)[:4096], 'connection unusable after an error'
`);
  });

  it('reads past the end fail with EINVAL, the connection survives', async () => {
    const s = await freshExport();
    await py(s, String.raw`
g = connect(strict=False)
expect_errno(lambda: g.pread(512, SIZE), errno.EINVAL)
expect_errno(lambda: g.pread(1024, SIZE - 512), errno.EINVAL)
expect_errno(lambda: g.pread(1, SIZE), errno.EINVAL)
expect_errno(lambda: g.pread(4096, 2**63 - 4096), errno.EINVAL, errno.EOVERFLOW)
g.pwrite(b'\xab' * 512, SIZE - 512)
assert g.pread(512, SIZE - 512) == b'\xab' * 512
`);
  });

  it('writes and write-zeroes past the end fail with ENOSPC; nothing is written', async () => {
    const s = await freshExport();
    await py(s, String.raw`
g = connect(strict=False)
expect_errno(lambda: g.pwrite(b'x' * 512, SIZE), errno.ENOSPC)
expect_errno(lambda: g.pwrite(b'y' * 1024, SIZE - 512), errno.ENOSPC)
expect_errno(lambda: g.zero(4096, SIZE - 1024), errno.ENOSPC)
expect_errno(lambda: g.trim(4096, SIZE - 1024), errno.ENOSPC, errno.EINVAL)
assert g.pread(1024, SIZE - 1024) == bytes(1024), 'a refused request changed data'
`);
  });

  it('a read-only export refuses WRITE, WRITE_ZEROES and TRIM with EPERM and keeps its data', async () => {
    const s = await freshExport({ readOnly: true });
    await py(s, String.raw`
g = connect(strict=False)
assert g.is_read_only()
before = g.pread(2 * MiB, 0)
expect_errno(lambda: g.pwrite(b'z' * 4096, 0), errno.EPERM)
expect_errno(lambda: g.zero(4096, 0), errno.EPERM)
expect_errno(lambda: g.trim(4096, 0), errno.EPERM)
g.flush() if g.can_flush() else None
assert g.pread(2 * MiB, 0) == before
assert before[:4] != bytes(4), 'the fixture data is missing'
`);
  });

  it('concurrent overlapping aio writes: every byte comes from a write that covered it', async () => {
    const s = await freshExport();
    await py(s, String.raw`
g = connect()
N = 48
LEN = 64 * KiB
STEP = 12 * KiB + 7             # unaligned overlaps
writes = []
for i in range(N):
    off = 1 * MiB + i * STEP
    buf = nbd.Buffer.from_bytearray(bytearray([i + 1]) * LEN)
    writes.append((off, i + 1, g.aio_pwrite(buf, off)))
while g.aio_in_flight() > 0:
    g.poll(-1)
for off, v, cookie in writes:
    assert g.aio_command_completed(cookie)
end = 1 * MiB + (N - 1) * STEP + LEN
got = g.pread(end - 1 * MiB, 1 * MiB)
for p in range(1 * MiB, end):
    b = got[p - 1 * MiB]
    allowed = [v for off, v, c in writes if off <= p < off + LEN]
    if b not in allowed:
        raise AssertionError('byte at %d is %d, not from a covering write %s' % (p, b, allowed))
# Non-overlapping concurrent writes and reads: exact.
bufs = []
for i in range(64):
    data = pattern(32 * KiB, 100 + i)
    bufs.append((8 * MiB + i * 32 * KiB, data, g.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), 8 * MiB + i * 32 * KiB)))
while g.aio_in_flight() > 0:
    g.poll(-1)
reads = []
for off, data, _ in bufs:
    rb = nbd.Buffer(len(data))
    reads.append((rb, data, g.aio_pread(rb, off)))
while g.aio_in_flight() > 0:
    g.poll(-1)
for rb, data, cookie in reads:
    assert g.aio_command_completed(cookie)
    assert rb.to_bytearray() == data
`);
  });

  it('structured reads over holes and data, FUA writes, and a second connection sees the data', async () => {
    const s = await freshExport();
    await py(s, String.raw`
g = connect()
assert g.get_structured_replies_negotiated()
g.pwrite(pattern(100000, 9), 5 * MiB + 12345, nbd.CMD_FLAG_FUA)
chunks = []
def chunk(buf, off, status, err):
    chunks.append((off, status, bytes(buf)))
    return 0
got = g.pread_structured(2 * MiB, 4 * MiB + 512 * KiB, chunk)
want = bytearray(2 * MiB)
start = 5 * MiB + 12345 - (4 * MiB + 512 * KiB)
want[start:start + 100000] = pattern(100000, 9)
assert got == bytes(want)
assert chunks, 'no chunks'
for off, st, b in chunks:
    if st == nbd.READ_HOLE:
        assert want[off - (4 * MiB + 512 * KiB):][:len(b)] == bytes(len(b)), 'hole chunk over data'
# multi-conn: a write on one connection, flush on another, read on a third.
assert g.can_multi_conn()
a, b, c = connect(), connect(), connect()
a.pwrite(pattern(4096, 10), 12 * MiB)
b.flush()
assert c.pread(4096, 12 * MiB) == pattern(4096, 10)
for x in (a, b, c, g):
    x.shutdown()
`);
  });
});
