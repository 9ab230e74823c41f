#!/usr/bin/env bash
# vhost-user-blk throughput of `vstore vhost-blk` beside qemu-storage-daemon's vhost-user-blk
# export, both driven by the same front end (test/helpers/vhost-frontend.ts through
# bench/vhost-blk-driver.ts: memfd guest memory, one split virtqueue of 128, EVENT_IDX), and
# beside vstore's own NBD export measured with fio's nbd engine, as bench/nbd.sh does. One 1 GiB
# fully written raw image in the page cache. Servers alternate inside every workload (order
# rotated each round), so drift of a shared, noisy machine hits all alike; quote the ratios.
#
#   bash bench/vhost-blk.sh                     # 5 s per run (+1 s ramp), 3 rounds
#   RUNTIME=3 ROUNDS=1 bash bench/vhost-blk.sh
#   SERVERS="vstore-vhost qsd-vhost" WORKLOADS="randread" bash bench/vhost-blk.sh
#
# Servers: vstore-vhost (node bin/vstore.js vhost-blk), qsd-vhost (qemu-storage-daemon),
# vstore-nbd (node bin/vstore.js nbd, fio nbd engine), null-vhost (vstore's vhost back end over
# a volume that does nothing: the ceiling of the JS driver plus the ring code, no file I/O).
# The driver is JavaScript: its own cost is in the vstore-vhost and qsd-vhost numbers alike,
# while vstore-nbd is measured by fio (C, libnbd) — see bench/RESULTS-vhost-blk.md.
#
# Writes bench/out/vhost-raw/*.json, bench/out/vhost-results.json and bench/vhost-blk.svg
# (OUT=, SVG= move them) and prints a table (bench/chart.mjs). Needs `bash scripts/setup.sh`
# (dist/, the native addon, node_modules with typescript).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

RUNTIME=${RUNTIME:-5}
RAMP=${RAMP:-1}
ROUNDS=${ROUNDS:-3}
SIZE_MIB=${SIZE_MIB:-1024}
SERVERS=${SERVERS:-"vstore-vhost qsd-vhost vstore-nbd null-vhost"}
WORKLOADS=${WORKLOADS:-"randread seqread randwrite"}
OUT=${OUT:-$ROOT/bench/out}
SVG=${SVG:-$ROOT/bench/vhost-blk.svg}
WORK=${BENCH_DIR:-${TMPDIR:-/tmp}/vstore-bench-vhost}

for cmd in fio qemu-storage-daemon nbdinfo node; do
  command -v "$cmd" >/dev/null || { echo "bench: missing $cmd (run scripts/setup.sh)" >&2; exit 1; }
done
[ -f "$ROOT/dist/lib/cli/index.js" ] || { echo "bench: vstore is not built: npm run build" >&2; exit 1; }
[ -f "$ROOT/native/build/Release/vstore_native.node" ] || { echo "bench: the native addon is not built (scripts/setup.sh)" >&2; exit 1; }
[ -x "$ROOT/node_modules/.bin/tsc" ] || { echo "bench: no node_modules/.bin/tsc (scripts/setup.sh)" >&2; exit 1; }

mkdir -p "$WORK" "$OUT/vhost-raw"
rm -f "$OUT"/vhost-raw/*.json
IMG=$WORK/bench.img
SOCK=$WORK/server.sock
PIDFILE=$WORK/server.pid

# The driver: TypeScript compiled with the project's tsc into $WORK/drv (tsx is not a
# dependency). lib/native/index.js finds the addon at ../../../native from $WORK/drv/lib/native,
# and bare imports (pino) resolve through $WORK/node_modules: two symlinks.
echo "bench: compiling bench/vhost-blk-driver.ts" >&2
ln -sfn "$ROOT/native" "$WORK/native"
ln -sfn "$ROOT/node_modules" "$WORK/node_modules"
rm -rf "$WORK/drv"
"$ROOT/node_modules/.bin/tsc" --target ES2022 --module NodeNext --moduleResolution NodeNext --strict \
  --esModuleInterop --skipLibCheck --types node --rootDir "$ROOT" --outDir "$WORK/drv" \
  "$ROOT/bench/vhost-blk-driver.ts"
DRIVER=$WORK/drv/bench/vhost-blk-driver.js

# Parameters of each workload: rw bs iodepth.
workload_params() {
  case "$1" in
    randread)  echo "randread 4096 32" ;;
    randwrite) echo "randwrite 4096 32" ;;
    seqread)   echo "read 1048576 8" ;;
    *) echo "bench: unknown workload $1" >&2; exit 1 ;;
  esac
}

start_server() {
  rm -f "$SOCK"
  case "$1" in
    vstore-vhost) node "$ROOT/bin/vstore.js" vhost-blk "$IMG" --socket "$SOCK" --log-level warn >"$WORK/server.log" 2>&1 & ;;
    qsd-vhost) qemu-storage-daemon --blockdev "driver=file,node-name=f,filename=$IMG,cache.direct=off" \
                 --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=1" \
                 >"$WORK/server.log" 2>&1 & ;;
    null-vhost) node "$DRIVER" serve-null --socket "$SOCK" --size $((SIZE_MIB * 1024 * 1024)) >"$WORK/server.log" 2>&1 & ;;
    vstore-nbd) node "$ROOT/bin/vstore.js" nbd "$IMG" --socket "$SOCK" --log-level warn >"$WORK/server.log" 2>&1 & ;;
    *) echo "bench: unknown server $1" >&2; exit 1 ;;
  esac
  echo $! > "$PIDFILE"
  # vhost-user back ends take one front end at a time: only wait for the socket (the driver
  # retries its connect); NBD is probed as nbd.sh does.
  for _ in $(seq 1 300); do
    if [ -S "$SOCK" ]; then
      [ "$1" != vstore-nbd ] && return 0
      nbdinfo --size "nbd+unix:///?socket=$SOCK" >/dev/null 2>&1 && return 0
    fi
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { echo "bench: $1 exited:" >&2; cat "$WORK/server.log" >&2; exit 1; }
    sleep 0.05
  done
  echo "bench: $1 did not start" >&2; cat "$WORK/server.log" >&2; exit 1
}

stop_server() {
  local pid
  pid=$(cat "$PIDFILE" 2>/dev/null || true)
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
}
trap 'stop_server' EXIT INT TERM

run_client() { # server workload outfile
  local rw bs qd
  read -r rw bs qd <<<"$(workload_params "$2")"
  if [ "$1" = vstore-nbd ]; then
    fio --name="$2" --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --rw="$rw" --bs="$bs" --iodepth="$qd" \
        --size="${SIZE_MIB}M" --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
        --numjobs=1 --norandommap --randrepeat=0 --output-format=json --output="$3" >/dev/null 2>"$WORK/client.err"
  else
    node "$DRIVER" run --socket "$SOCK" --rw "$rw" --bs "$bs" --iodepth "$qd" --size $((SIZE_MIB * 1024 * 1024)) \
        --runtime "$RUNTIME" --ramp "$RAMP" --output "$3" >/dev/null 2>"$WORK/client.err"
  fi
}

# One fully written image (no holes: reads hit data), then pulled into the page cache.
if [ ! -f "$IMG" ] || [ "$(stat -c %s "$IMG")" != $((SIZE_MIB * 1024 * 1024)) ]; then
  echo "bench: writing a ${SIZE_MIB} MiB image at $IMG" >&2
  fio --name=prep --filename="$IMG" --rw=write --bs=1M --size="${SIZE_MIB}M" --ioengine=psync \
      --refill_buffers --end_fsync=1 --output=/dev/null >/dev/null
fi
cat "$IMG" > /dev/null

read -r -a SRV <<<"$SERVERS"
read -r -a WL <<<"$WORKLOADS"
total=$(( ${#SRV[@]} * ${#WL[@]} * ROUNDS ))
i=0
t0=$(date +%s)
for w in "${WL[@]}"; do
  for r in $(seq 1 "$ROUNDS"); do
    order=("${SRV[@]:$(( (r - 1) % ${#SRV[@]} ))}" "${SRV[@]:0:$(( (r - 1) % ${#SRV[@]} ))}")
    for s in "${order[@]}"; do
      i=$((i + 1))
      printf 'bench: [%d/%d] %-9s %-12s round %d  (%ds elapsed, ~%ds left)\n' "$i" "$total" "$w" "$s" "$r" \
        $(( $(date +%s) - t0 )) $(( (total - i + 1) * (RUNTIME + RAMP + 2) )) >&2
      start_server "$s"
      f="$OUT/vhost-raw/$w.$s.$r.json"
      run_client "$s" "$w" "$f" || { echo "bench: client failed for $s/$w:" >&2; cat "$WORK/client.err" "$WORK/server.log" >&2; exit 1; }
      stop_server
      node -e 'const t=require("fs").readFileSync(process.argv[1],"utf8");const j=JSON.parse(t.slice(t.indexOf("{"))).jobs[0];const s=j.read.iops?j.read:j.write;
        console.error(`bench:          -> ${(s.iops/1000).toFixed(1)}k IOPS, ${(s.bw_bytes/1048576).toFixed(0)} MiB/s${j.error?", errors "+j.error:""}`)' "$f"
    done
  done
done

node "$ROOT/bench/chart.mjs" --raw "$OUT/vhost-raw" --json "$OUT/vhost-results.json" --svg "$SVG" \
  --runtime "$RUNTIME" --rounds "$ROUNDS" --size-mib "$SIZE_MIB" \
  --servers vstore-vhost,qsd-vhost,vstore-nbd,null-vhost --subject vstore-vhost --anchors qsd-vhost,vstore-nbd \
  --panel-width 330 --reference null-vhost \
  --title 'vhost-user-blk (JS front-end driver, 1 queue) vs NBD (fio nbd engine), unix socket (higher is better)'
