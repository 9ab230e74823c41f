#!/usr/bin/env bash
# The local cache in front of a remote volume with added latency. The remote is nbdkit's file
# plugin behind its delay filter (1 ms per read and write), registered in an embedded resolver
# as a static node; the daemon serves it as a 1-replica volume through a cache layer on a local
# cache device. fio (nbd engine, unix socket) runs the same jobs against:
#   local      vstore serve, a disk on a local image (no cache): the target
#   remote     the delayed nbdkit directly (the bare remote)
#   vcache     vstore serve, the volume on the delayed remote, cached (write-back)
#   nbdkit     nbdkit's cache filter (cache-on-read=true) over the same delayed remote
# Jobs: 4k random reads QD$IODEPTH over a $REGION_MIB MiB region that touch every block once
# (cold: the first pass after start; warm: the second pass), and 4k random writes (write-back
# against local). Prints IOPS and mean completion latency, and the ratios the issue asks for:
# warm vcache / local (goal >= 0.9), cold vcache / remote (goal >= 1.0), write vcache / local
# (goal >= 0.9), beside nbdkit's.
#
#   bash bench/cache.sh                    # needs `npm run build` first
#   REGION_MIB=64 IODEPTH=16 bash bench/cache.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
REGION_MIB=${REGION_MIB:-128}
IODEPTH=${IODEPTH:-16}
DELAY=${DELAY:-1ms}
OUT=${OUT:-$ROOT/bench/out-cache}
WORK=${BENCH_DIR:-${TMPDIR:-/tmp}/vstore-bench-cache}
VSTORE="node $ROOT/bin/vstore.js"

for cmd in fio nbdkit node; do
  command -v "$cmd" >/dev/null || { echo "bench: missing $cmd (run scripts/setup.sh)" >&2; exit 1; }
done
[ -f "$ROOT/dist/lib/cli/index.js" ] || { echo "bench: vstore is not built: npm run build" >&2; exit 1; }

PIDS=()
cleanup() {
  # the daemon first (it writes its dirty cache back to the remote), the remote last
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill "${PIDS[$i]}" 2>/dev/null || true; wait "${PIDS[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT

rm -rf "$WORK" && mkdir -p "$WORK/run" "$OUT"
rm -f "$OUT"/*.json
SIZE_MIB=$((REGION_MIB * 2))
echo "bench: preparing two ${SIZE_MIB} MiB images (remote and local)" >&2
for img in remote local; do
  fio --name=prep --filename="$WORK/$img.img" --rw=write --bs=1M --size="${SIZE_MIB}M" --ioengine=psync \
      --refill_buffers --end_fsync=1 --output=/dev/null >/dev/null
done
cat "$WORK/remote.img" "$WORK/local.img" >/dev/null

waitsock() { for _ in $(seq 1 300); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "bench: $1 never appeared" >&2; exit 1; }

# The delayed remote, and nbdkit's cache filter over it.
nbdkit -f -U "$WORK/remote.sock" --filter=delay file "$WORK/remote.img" rdelay="$DELAY" wdelay="$DELAY" & PIDS+=($!)
waitsock "$WORK/remote.sock"
start_nbdkit_cache() {
  nbdkit -f -U "$WORK/nbdkit-cache.sock" --filter=cache nbd socket="$WORK/remote.sock" cache=writeback cache-on-read=true & PIDS+=($!)
  waitsock "$WORK/nbdkit-cache.sock"
}

# The resolver: the delayed nbdkit as a static node, the volume pinned to it.
STORE="file:$WORK/resolver.json"
$VSTORE resolver node add remote --nbd "unix:$WORK/remote.sock" --resolver "$STORE" >/dev/null
$VSTORE resolver place bench/d0 --size "${SIZE_MIB}M" --on remote --resolver "$STORE" >/dev/null

cat > "$WORK/config.json" <<JSON
{ "runDir": "$WORK/run", "control": "$WORK/run/control.sock",
  "resolver": { "store": "$WORK/resolver.json" },
  "cache": { "device": "$WORK/cache.img", "size": "$((REGION_MIB * 4))M", "lineSize": "64K" },
  "vms": [ { "name": "vm", "disks": [
    { "name": "local", "file": "$WORK/local.img", "cache": { "mode": "pass-through" } },
    { "name": "d0", "volume": { "name": "bench/d0", "size": "${SIZE_MIB}M", "replicas": 1 }, "cache": { "mode": "write-back" } } ] } ] }
JSON
$VSTORE serve -c "$WORK/config.json" --log-level warn 2>"$WORK/daemon.log" & PIDS+=($!)
waitsock "$WORK/run/control.sock"

uri() { echo "nbd+unix:///?socket=$1"; }
# one pass over the region: every 4k block once, in random order
job() { # name uri rw
  fio --name="$1" --ioengine=nbd --uri="$2" --rw="$3" --bs=4k --size="${REGION_MIB}M" --iodepth="$IODEPTH" \
      --norandommap=0 --randrepeat=1 --output-format=json --output="$OUT/$1.json" >/dev/null 2>>"$WORK/fio.log"
}

echo "bench: local" >&2;           job local-read "$(uri "$WORK/run/vm-local.sock")" randread
echo "bench: remote" >&2;          job remote-read "$(uri "$WORK/remote.sock")" randread
echo "bench: vstore cold" >&2;     job vcache-cold "$(uri "$WORK/run/vm-d0.sock")" randread
sleep 2 # background fills of the cold pass land
echo "bench: vstore warm" >&2;     job vcache-warm "$(uri "$WORK/run/vm-d0.sock")" randread
start_nbdkit_cache
echo "bench: nbdkit cold" >&2;     job nbdkit-cold "$(uri "$WORK/nbdkit-cache.sock")" randread
echo "bench: nbdkit warm" >&2;     job nbdkit-warm "$(uri "$WORK/nbdkit-cache.sock")" randread
echo "bench: writes" >&2
job local-write "$(uri "$WORK/run/vm-local.sock")" randwrite
job vcache-write "$(uri "$WORK/run/vm-d0.sock")" randwrite
$VSTORE cache stats --control "$WORK/run/control.sock" >"$OUT/cache-stats.txt" || true
$VSTORE cache flush vm/d0 --control "$WORK/run/control.sock" >/dev/null 2>&1 || true

node - "$OUT" <<'NODE'
const fs = require('fs');
const dir = process.argv[2];
const r = {};
for (const f of fs.readdirSync(dir).filter((f) => f.endsWith('.json'))) {
  const j = JSON.parse(fs.readFileSync(`${dir}/${f}`, 'utf8')).jobs[0];
  const s = j.read.io_bytes > 0 ? j.read : j.write;
  r[f.replace('.json', '')] = { iops: s.iops, latUs: s.clat_ns.mean / 1000 };
}
const row = (k) => (r[k] ? `| ${k.padEnd(13)} | ${Math.round(r[k].iops).toString().padStart(8)} | ${r[k].latUs.toFixed(1).padStart(10)} |` : `| ${k} | - | - |`);
console.log('| job           |     IOPS | mean lat us |');
console.log('|---|---|---|');
for (const k of ['local-read', 'remote-read', 'vcache-cold', 'vcache-warm', 'nbdkit-cold', 'nbdkit-warm', 'local-write', 'vcache-write']) console.log(row(k));
const ratio = (a, b) => (r[a] && r[b] ? (r[a].iops / r[b].iops).toFixed(2) : '-');
console.log('');
console.log(`warm read / local:   vstore ${ratio('vcache-warm', 'local-read')}x   nbdkit ${ratio('nbdkit-warm', 'local-read')}x   (goal >= 0.9)`);
console.log(`cold read / remote:  vstore ${ratio('vcache-cold', 'remote-read')}x   nbdkit ${ratio('nbdkit-cold', 'remote-read')}x   (goal >= 1.0)`);
console.log(`write-back / local:  vstore ${ratio('vcache-write', 'local-write')}x   (goal >= 0.9)`);
NODE
