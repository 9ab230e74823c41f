#!/usr/bin/env bash
# The local cache in front of a remote volume with added latency. The remote is nbdkit's file
# plugin behind its delay filter (1 ms per read and write), registered in an embedded resolver
# as a static node; the daemon serves it as a 1-replica volume through a cache layer on a local
# cache device. fio (nbd engine, unix socket) runs the same jobs against:
#   local      vstore serve, a disk on a local image (cache layer in pass-through): the target
#   remote     the delayed nbdkit directly (the bare remote)
#   vpass      vstore serve, a second volume on the same delayed remote, cache in pass-through:
#              what the daemon's own hop costs, so that cold/vpass says what filling adds
#   vcache     vstore serve, the volume on the delayed remote, cached (write-back)
#   nbdkit     nbdkit's cache filter (cache-on-read=true) over the same delayed remote
# Jobs: 4k random reads QD$IODEPTH over a $REGION_MIB MiB region that touch every block once
# (cold: the first pass over the region; warm: the second pass), and 4k random writes
# (write-back against local). Every round uses a fresh region (round r: [r-1, r) x REGION), so
# each round has a true cold pass; inside a round the subjects alternate job by job (remote,
# vcache cold, local, vcache warm, nbdkit cold and warm, local write, vcache write), so that
# load from other processes on the machine hits both sides of each ratio alike. After the
# write jobs the cache is flushed (`vstore cache flush`): the next round starts without
# write-back in the background. Prints IOPS and mean completion latency per round, and the
# ratios the issue asks for per round and their median: warm vcache / local (goal >= 0.9),
# cold vcache / remote (goal >= 1.0), write vcache / local (goal >= 0.9), beside nbdkit's.
#
#   bash bench/cache.sh                    # needs `npm run build` first; 3 rounds
#   REGION_MIB=64 IODEPTH=16 ROUNDS=1 bash bench/cache.sh
#   WHOLE_LINES=true bash bench/cache.sh   # the cached disk with fillWholeLines (a miss fetches its line)
#   VSTORE_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" ROUNDS=1 bash bench/cache.sh
#       profiles the daemon; $OUT/times.txt has each job's CLOCK_MONOTONIC window (ms), which
#       `node bench/cpuprof-slice.mjs PROFILE $OUT/times.txt` uses to print where each job's
#       time went
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
REGION_MIB=${REGION_MIB:-128}
IODEPTH=${IODEPTH:-16}
DELAY=${DELAY:-1ms}
ROUNDS=${ROUNDS:-3}
BALLOON=${BALLOON:-false}
WHOLE_LINES=${WHOLE_LINES:-false}
OUT=${OUT:-$ROOT/bench/out-cache}
WORK=${BENCH_DIR:-${TMPDIR:-/tmp}/vstore-bench-cache}
VSTORE="node $ROOT/bin/vstore.js"

for cmd in fio nbdkit node; do
  command -v "$cmd" >/dev/null || { echo "bench: missing $cmd (run scripts/setup.sh)" >&2; exit 1; }
done
[ -f "$ROOT/dist/lib/cli/index.js" ] || { echo "bench: vstore is not built: npm run build" >&2; exit 1; }

PIDS=()
DAEMON=
cleanup() {
  # the daemon first (it writes its dirty cache back to the remote; SIGTERM lets --cpu-prof
  # write its profile), the remote last
  if [ -n "$DAEMON" ]; then kill "$DAEMON" 2>/dev/null || true; wait "$DAEMON" 2>/dev/null || true; fi
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill "${PIDS[$i]}" 2>/dev/null || true; wait "${PIDS[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT

rm -rf "$WORK" && mkdir -p "$WORK/run" "$OUT"
rm -f "$OUT"/*.json "$OUT/times.txt"
SIZE_MIB=$((REGION_MIB * (ROUNDS > 1 ? ROUNDS : 2)))
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
nbdkit -f -U "$WORK/nbdkit-cache.sock" --filter=cache nbd socket="$WORK/remote.sock" cache=writeback cache-on-read=true & PIDS+=($!)
waitsock "$WORK/nbdkit-cache.sock"

# The resolver: the delayed nbdkit as a static node, the volume pinned to it.
STORE="file:$WORK/resolver.json"
$VSTORE resolver node add remote --nbd "unix:$WORK/remote.sock" --resolver "$STORE" >/dev/null
$VSTORE resolver place bench/d0 --size "${SIZE_MIB}M" --on remote --resolver "$STORE" >/dev/null
$VSTORE resolver place bench/d1 --size "${SIZE_MIB}M" --on remote --resolver "$STORE" >/dev/null

# Room for every round's region read and written (a written line takes a second slot) plus metadata.
# The capacity scheduler is off by default: it would split the device between the VM's three
# disks (two of them uncached) and the dirty bound (half the allotment) would then throttle the
# write job to the write-back rate; this bench measures the data path. BALLOON=true to see that.
cat > "$WORK/config.json" <<JSON
{ "runDir": "$WORK/run", "control": "$WORK/run/control.sock",
  "resolver": { "store": "$WORK/resolver.json" },
  "cache": { "device": "$WORK/cache.img", "size": "$((SIZE_MIB * 2 + REGION_MIB))M", "lineSize": "64K", "balloon": { "enabled": $BALLOON } },
  "vms": [ { "name": "vm", "disks": [
    { "name": "local", "file": "$WORK/local.img", "cache": { "mode": "pass-through" } },
    { "name": "d0", "volume": { "name": "bench/d0", "size": "${SIZE_MIB}M", "replicas": 1 }, "cache": { "mode": "write-back", "fillWholeLines": $WHOLE_LINES } },
    { "name": "d1", "volume": { "name": "bench/d1", "size": "${SIZE_MIB}M", "replicas": 1 }, "cache": { "mode": "pass-through" } } ] } ] }
JSON
# shellcheck disable=SC2086
node ${VSTORE_NODE_ARGS:-} "$ROOT/bin/vstore.js" serve -c "$WORK/config.json" --log-level warn 2>"$WORK/daemon.log" & DAEMON=$!
waitsock "$WORK/run/control.sock"

uri() { echo "nbd+unix:///?socket=$1"; }
mono_ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }
# one pass over round r's region: every 4k block once, in random order
job() { # name uri rw round
  local off=$((($4 - 1) * REGION_MIB)) t0
  echo "bench: round $4: $1" >&2
  t0=$(mono_ms)
  fio --name="$1" --ioengine=nbd --uri="$2" --rw="$3" --bs=4k --offset="${off}M" --size="${REGION_MIB}M" --iodepth="$IODEPTH" \
      --norandommap=0 --randrepeat=1 --output-format=json --output="$OUT/$1-r$4.json" >/dev/null 2>>"$WORK/fio.log"
  echo "$1-r$4 $t0 $(mono_ms)" >>"$OUT/times.txt"
}
LOCAL=$(uri "$WORK/run/vm-local.sock"); D0=$(uri "$WORK/run/vm-d0.sock")

# warm up the daemon's JIT and the local image's page cache (not recorded)
fio --name=warmup --ioengine=nbd --uri="$LOCAL" --rw=randread --bs=4k --size="${REGION_MIB}M" --iodepth="$IODEPTH" \
    --runtime=2 --time_based --output=/dev/null >/dev/null 2>>"$WORK/fio.log"
for r in $(seq 1 "$ROUNDS"); do
  job remote-read "$(uri "$WORK/remote.sock")" randread "$r"
  job vpass-read "$(uri "$WORK/run/vm-d1.sock")" randread "$r"
  job vcache-cold "$D0" randread "$r"
  sleep 1 # background fills of the cold pass land
  job local-read "$LOCAL" randread "$r"
  job vcache-warm "$D0" randread "$r"
  job nbdkit-cold "$(uri "$WORK/nbdkit-cache.sock")" randread "$r"
  job nbdkit-warm "$(uri "$WORK/nbdkit-cache.sock")" randread "$r"
  job local-write "$LOCAL" randwrite "$r"
  job vcache-write "$D0" randwrite "$r"
  $VSTORE cache flush vm/d0 --control "$WORK/run/control.sock" >/dev/null 2>&1 || true
done
$VSTORE cache stats --control "$WORK/run/control.sock" >"$OUT/cache-stats.txt" || true
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" >"$OUT/load.txt"

node - "$OUT" "$ROUNDS" <<'NODE'
const fs = require('fs');
const [dir, roundsArg] = process.argv.slice(2);
const rounds = Number(roundsArg);
const r = {};
for (const f of fs.readdirSync(dir).filter((f) => /-r\d+\.json$/.test(f))) {
  const j = JSON.parse(fs.readFileSync(`${dir}/${f}`, 'utf8')).jobs[0];
  const s = j.read.io_bytes > 0 ? j.read : j.write;
  r[f.replace('.json', '')] = { iops: s.iops, latUs: s.clat_ns.mean / 1000 };
}
const jobs = ['local-read', 'remote-read', 'vpass-read', 'vcache-cold', 'vcache-warm', 'nbdkit-cold', 'nbdkit-warm', 'local-write', 'vcache-write'];
const cell = (k) => (r[k] ? `${Math.round(r[k].iops)} (${r[k].latUs.toFixed(0)})` : '-');
console.log(`| job (IOPS, mean lat us) | ${Array.from({ length: rounds }, (_, i) => `round ${i + 1}`).join(' | ')} |`);
console.log(`|---|${'---|'.repeat(rounds)}`);
for (const k of jobs) console.log(`| ${k} | ${Array.from({ length: rounds }, (_, i) => cell(`${k}-r${i + 1}`)).join(' | ')} |`);
const ratio = (a, b, i) => (r[`${a}-r${i}`] && r[`${b}-r${i}`] ? r[`${a}-r${i}`].iops / r[`${b}-r${i}`].iops : NaN);
const median = (xs) => {
  const v = xs.filter((x) => !Number.isNaN(x)).sort((a, b) => a - b);
  if (!v.length) return NaN;
  const m = v.length >> 1;
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
};
const line = (label, a, b, goal) => {
  const per = Array.from({ length: rounds }, (_, i) => ratio(a, b, i + 1));
  return `| ${label} | ${per.map((x) => x.toFixed(2)).join(' / ')} | ${median(per).toFixed(2)}x | ${goal} |`;
};
console.log('');
console.log('| ratio | per round | median | goal |');
console.log('|---|---|---|---|');
console.log(line('vstore warm read / local', 'vcache-warm', 'local-read', '>= 0.9'));
console.log(line('vstore cold read / bare remote', 'vcache-cold', 'remote-read', '>= 1.0'));
console.log(line('vstore write-back write / local', 'vcache-write', 'local-write', '>= 0.9'));
console.log(line('vstore cold read / vstore uncached', 'vcache-cold', 'vpass-read', '-'));
console.log(line('nbdkit warm read / local', 'nbdkit-warm', 'local-read', '-'));
console.log(line('nbdkit cold read / bare remote', 'nbdkit-cold', 'remote-read', '-'));
NODE
cat "$OUT/load.txt"
