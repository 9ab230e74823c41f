#!/usr/bin/env bash
# NBD throughput of `vstore nbd` beside the anchors nbdkit (file plugin) and qemu-nbd, measured
# with fio's nbd engine (libnbd) over a unix socket on one raw image held in the page cache.
# Servers alternate inside every workload (and every round), so drift of a shared, noisy
# machine hits all three alike; quote the ratios, not the absolute numbers.
#
#   bash bench/nbd.sh                    # 10 s per run, 1 round
#   RUNTIME=5 ROUNDS=3 bash bench/nbd.sh # shorter runs, median of 3
#   SERVERS="vstore nbdkit" WORKLOADS="randread" bash bench/nbd.sh
#
# Writes bench/out/raw/*.json (fio output), bench/out/results.json and bench/nbd.svg (OUT= and
# SVG= move them) and prints a table (bench/chart.mjs). Needs `npm run build` first (vstore runs
# from dist/).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-2}
ROUNDS=${ROUNDS:-1}
SIZE_MIB=${SIZE_MIB:-1024}
SERVERS=${SERVERS:-"vstore nbdkit qemu-nbd"}
WORKLOADS=${WORKLOADS:-"randread randwrite seqread"}
OUT=${OUT:-$ROOT/bench/out}
SVG=${SVG:-$ROOT/bench/nbd.svg}
WORK=${BENCH_DIR:-${TMPDIR:-/tmp}/vstore-bench}

for cmd in fio nbdkit qemu-nbd nbdinfo node; do
  command -v "$cmd" >/dev/null || { echo "bench: missing $cmd (run scripts/setup.sh)" >&2; exit 1; }
done
[ -f "$ROOT/dist/lib/cli/index.js" ] || { echo "bench: vstore is not built: npm run build" >&2; exit 1; }

mkdir -p "$WORK" "$OUT/raw"
rm -f "$OUT"/raw/*.json
IMG=$WORK/bench.img
SOCK=$WORK/nbd.sock
PIDFILE=$WORK/server.pid

# fio parameters of each workload.
workload_args() {
  case "$1" in
    randread)  echo "--rw=randread --bs=4k --iodepth=32" ;;
    randwrite) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    seqread)   echo "--rw=read --bs=1M --iodepth=8" ;;
    *) echo "bench: unknown workload $1" >&2; exit 1 ;;
  esac
}

start_server() {
  rm -f "$SOCK"
  case "$1" in
    vstore)   node "$ROOT/bin/vstore.js" nbd "$IMG" --socket "$SOCK" --log-level warn >"$WORK/server.log" 2>&1 & ;;
    nbdkit)   nbdkit -f -U "$SOCK" file "$IMG" >"$WORK/server.log" 2>&1 & ;;
    qemu-nbd) qemu-nbd -k "$SOCK" -f raw -t -e 16 --cache=writeback "$IMG" >"$WORK/server.log" 2>&1 & ;;
    *) echo "bench: unknown server $1" >&2; exit 1 ;;
  esac
  echo $! > "$PIDFILE"
  for _ in $(seq 1 300); do
    if [ -S "$SOCK" ] && nbdinfo --size "nbd+unix:///?socket=$SOCK" >/dev/null 2>&1; then return 0; fi
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
    # Rotate the order each round so no server always goes first.
    order=("${SRV[@]:$(( (r - 1) % ${#SRV[@]} ))}" "${SRV[@]:0:$(( (r - 1) % ${#SRV[@]} ))}")
    for s in "${order[@]}"; do
      i=$((i + 1))
      printf 'bench: [%d/%d] %-9s %-9s round %d  (%ds elapsed, ~%ds left)\n' "$i" "$total" "$w" "$s" "$r" \
        $(( $(date +%s) - t0 )) $(( (total - i + 1) * (RUNTIME + RAMP + 2) )) >&2
      start_server "$s"
      # shellcheck disable=SC2046
      fio --name="$w" --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" $(workload_args "$w") \
          --size="${SIZE_MIB}M" --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
          --numjobs=1 --norandommap --randrepeat=0 --output-format=json \
          --output="$OUT/raw/$w.$s.$r.json" >/dev/null 2>"$WORK/fio.err" \
        || { echo "bench: fio failed for $s/$w:" >&2; cat "$WORK/fio.err" >&2; exit 1; }
      stop_server
    done
  done
done

node "$ROOT/bench/chart.mjs" --raw "$OUT/raw" --json "$OUT/results.json" --svg "$SVG" \
  --runtime "$RUNTIME" --rounds "$ROUNDS" --size-mib "$SIZE_MIB"
