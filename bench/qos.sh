#!/usr/bin/env bash
# The QoS scheduler's cost: 4k random reads at QD32 (fio nbd engine, unix socket, one image in
# the page cache) through `vstore serve` with QoS disabled (`qos: {enabled: false}`: no QoS layer
# in the disk stack) beside QoS enabled but unconstrained (the default: every request passes the
# host-wide scheduler, whose device depth is above the client's queue depth). The modes
# alternate inside every round (order rotated each round) so that drift of a shared machine hits
# them alike; the ratio enabled/disabled of the medians is the result (goal >= 0.95).
#
#   bash bench/qos.sh                       # 10 s runs (+2 s ramp), 3 rounds
#   RUNTIME=5 ROUNDS=5 bash bench/qos.sh
#   MODES="disabled enabled limited" bash bench/qos.sh   # also a VM with a limit far above its rate
#
# Writes bench/out-qos/*.json (fio output) and prints a table with the ratio. Needs `npm run
# build` first (vstore runs from dist/).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-2}
ROUNDS=${ROUNDS:-3}
SIZE_MIB=${SIZE_MIB:-1024}
IODEPTH=${IODEPTH:-32}
MODES=${MODES:-"disabled enabled"}
OUT=${OUT:-$ROOT/bench/out-qos}
WORK=${BENCH_DIR:-${TMPDIR:-/tmp}/vstore-bench-qos}

for cmd in fio nbdinfo node; do
  command -v "$cmd" >/dev/null || { echo "bench: missing $cmd (run scripts/setup.sh)" >&2; exit 1; }
done
[ -f "$ROOT/dist/lib/cli/index.js" ] || { echo "bench: vstore is not built: npm run build" >&2; exit 1; }

mkdir -p "$WORK" "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.cpu
IMG=$WORK/bench.img
RUN=$WORK/run
SOCK=$RUN/vm-disk0.sock
PIDFILE=$WORK/daemon.pid

# One fully written image (reads hit data), pulled into the page cache.
if [ ! -f "$IMG" ] || [ "$(stat -c %s "$IMG")" != $((SIZE_MIB * 1024 * 1024)) ]; then
  echo "bench: writing a ${SIZE_MIB} MiB image at $IMG" >&2
  fio --name=prep --filename="$IMG" --rw=write --bs=1M --size="${SIZE_MIB}M" --ioengine=psync \
      --refill_buffers --end_fsync=1 --output=/dev/null >/dev/null
fi
cat "$IMG" > /dev/null

# The daemon's config for each mode.
config() {
  local qos vmqos=""
  case "$1" in
    disabled) qos='{ "enabled": false }' ;;
    enabled)  qos='{}' ;;
    # a limit far above what one client does: the limit and reservation tags are computed, never binding
    limited)  qos='{}'; vmqos=', "qos": { "limit": { "iops": 10000000 }, "reservation": { "iops": 10 } }' ;;
    *) echo "bench: unknown mode $1" >&2; exit 1 ;;
  esac
  cat <<EOF
{ "runDir": "$RUN", "control": "$RUN/control.sock", "qos": $qos,
  "vms": [ { "name": "vm", "disks": [ { "name": "disk0", "file": "$IMG" } ]$vmqos } ] }
EOF
}

start_daemon() {
  rm -rf "$RUN"
  config "$1" > "$WORK/config.json"
  node "$ROOT/bin/vstore.js" serve -c "$WORK/config.json" --log-level warn >"$WORK/daemon.log" 2>&1 &
  echo $! > "$PIDFILE"
  for _ in $(seq 1 300); do
    if [ -S "$RUN/control.sock" ] && nbdinfo --size "nbd+unix:///?socket=$SOCK" >/dev/null 2>&1; then return 0; fi
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { echo "bench: the daemon exited:" >&2; cat "$WORK/daemon.log" >&2; exit 1; }
    sleep 0.05
  done
  echo "bench: the daemon did not start" >&2; cat "$WORK/daemon.log" >&2; exit 1
}

stop_daemon() {
  local pid
  pid=$(cat "$PIDFILE" 2>/dev/null || true)
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
}
trap 'stop_daemon' EXIT INT TERM

# CPU time (user + system, clock ticks) the daemon has used so far: the cost per request is the
# robust figure on a shared machine, where IOPS move with whatever else runs.
cpu_ticks() {
  awk '{ print $14 + $15 }' "/proc/$(cat "$PIDFILE")/stat"
}

read -r -a M <<<"$MODES"
echo "bench: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" >&2
for r in $(seq 1 "$ROUNDS"); do
  # Rotate the order each round so that no mode always goes first.
  order=("${M[@]:$(( (r - 1) % ${#M[@]} ))}" "${M[@]:0:$(( (r - 1) % ${#M[@]} ))}")
  for m in "${order[@]}"; do
    echo "bench: round $r/$ROUNDS, QoS $m" >&2
    start_daemon "$m"
    c0=$(cpu_ticks)
    fio --name=randread --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --rw=randread --bs=4k \
        --iodepth="$IODEPTH" --size="${SIZE_MIB}M" --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
        --norandommap --randrepeat=0 --output-format=json --output="$OUT/$m.$r.json" >/dev/null 2>"$WORK/fio.err" \
      || { echo "bench: fio failed ($m):" >&2; cat "$WORK/fio.err" >&2; exit 1; }
    echo "$(( $(cpu_ticks) - c0 )) $(getconf CLK_TCK)" > "$OUT/$m.$r.cpu"
    stop_daemon
  done
done

# Per mode: IOPS of each round and their median, median p50/p99 latency; ratio to disabled.
RUNTIME=$RUNTIME RAMP=$RAMP node --input-type=module - "$OUT" "$MODES" <<'EOF'
import { readFileSync, readdirSync } from 'node:fs';
const [dir, modes] = process.argv.slice(2);
const median = (a) => { const s = [...a].sort((x, y) => x - y); return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2; };
const res = {};
for (const m of modes.split(/\s+/).filter(Boolean)) {
  const runs = readdirSync(dir).filter((f) => f.startsWith(`${m}.`) && f.endsWith('.json')).map((f) => {
    const t = readFileSync(`${dir}/${f}`, 'utf8');
    const j = JSON.parse(t.slice(t.indexOf('{'))).jobs[0];
    const [ticks, hz] = readFileSync(`${dir}/${f.replace(/\.json$/, '.cpu')}`, 'utf8').trim().split(' ').map(Number);
    // the daemon's CPU over ramp + runtime, per request at the measured rate
    return { iops: j.read.iops, p50: j.read.clat_ns.percentile['50.000000'] / 1000, p99: j.read.clat_ns.percentile['99.000000'] / 1000, cpuUs: (ticks / hz) * 1e6 / (j.read.iops * (Number(process.env.RUNTIME) + Number(process.env.RAMP))) };
  });
  res[m] = { iops: median(runs.map((r) => r.iops)), rounds: runs.map((r) => r.iops), p50: median(runs.map((r) => r.p50)), p99: median(runs.map((r) => r.p99)), cpuUs: median(runs.map((r) => r.cpuUs)) };
}
const base = res.disabled;
console.log('| QoS | IOPS (median) | rounds | p50 / p99 us | daemon CPU us / request (median) | IOPS ratio | CPU-per-request ratio |');
console.log('|---|---|---|---|---|---|---|');
for (const [m, r] of Object.entries(res)) {
  console.log(`| ${m} | ${(r.iops / 1000).toFixed(1)}k | ${r.rounds.map((x) => (x / 1000).toFixed(1) + 'k').join(' ')} | ${Math.round(r.p50)} / ${Math.round(r.p99)} | ${r.cpuUs.toFixed(1)} | ${base ? (r.iops / base.iops).toFixed(3) : '-'} | ${base ? (r.cpuUs / base.cpuUs).toFixed(3) : '-'} |`);
}
EOF
