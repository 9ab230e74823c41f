#!/usr/bin/env bash
# A replicated volume through the daemon beside the same fio job straight against one storage
# node. On loopback (unix sockets), this machine: `vstore resolver serve`, two `vstore node`
# processes and `vstore serve` with one disk on a 2-replica volume. Subjects:
#   replicated  fio -> daemon's NBD export -> ReplicatedVolume -> NBD clients -> node1 + node2
#   single      fio -> daemon's NBD export of a 1-replica volume -> NBD client -> one node
#               (the daemon's hop alone, without the second copy)
#   one-node    fio -> node1's NBD export of the replicated volume (no daemon, no second copy)
# Goals (issue 3): >= 0.9x for reads, >= 0.8x for replicated writes. The two subjects alternate
# inside every workload and round (three subjects); quote the ratios, not the absolute numbers.
#
#   bash bench/replicated.sh                         # 8 s per run, 1 round
#   RUNTIME=5 ROUNDS=3 bash bench/replicated.sh
#   VSTORE_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" bash bench/replicated.sh   # profile the daemon
#   SHORT_CIRCUIT=false bash bench/replicated.sh     # every read and write over NBD (volume.shortCircuit)
#   SHORT_CIRCUIT_WRITES=false bash bench/replicated.sh   # reads local, writes over NBD (volume.shortCircuitWrites)
#
# Both nodes run on this host over unix sockets, so by default the daemon reads and writes the
# replicas' files through short-circuit descriptors (lib/node/shortcircuit.ts).
#
# Writes bench/out-replicated/raw/*.json, results.json and bench/replicated.svg; prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

RUNTIME=${RUNTIME:-8}
RAMP=${RAMP:-2}
ROUNDS=${ROUNDS:-1}
SIZE_MIB=${SIZE_MIB:-512}
SHORT_CIRCUIT=${SHORT_CIRCUIT:-true}
SHORT_CIRCUIT_WRITES=${SHORT_CIRCUIT_WRITES:-$SHORT_CIRCUIT}
WORKLOADS=${WORKLOADS:-"seqwrite seqread randread"}
OUT=${OUT:-$ROOT/bench/out-replicated}
SVG=${SVG:-$ROOT/bench/replicated.svg}
WORK=${BENCH_DIR:-${TMPDIR:-/tmp}/vstore-bench-replicated}

for cmd in fio nbdinfo node; do
  command -v "$cmd" >/dev/null || { echo "bench: missing $cmd (run scripts/setup.sh)" >&2; exit 1; }
done
[ -f "$ROOT/dist/lib/cli/index.js" ] || { echo "bench: vstore is not built: npm run build" >&2; exit 1; }

rm -rf "$WORK"
mkdir -p "$WORK" "$OUT/raw"
rm -f "$OUT"/raw/*.json
VSTORE="node $ROOT/bin/vstore.js"
PIDS=()
# The daemon first, and alone: stopped together with the nodes, its last flush can find no
# replica, and a disk with no reachable replica queues its I/O (VM suspended) instead of exiting.
cleanup() {
  if [ -n "${DAEMON_PID:-}" ]; then kill -TERM "$DAEMON_PID" 2>/dev/null || true; wait "$DAEMON_PID" 2>/dev/null || true; fi
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

wait_for() { # PATH-or-command, what
  for _ in $(seq 1 400); do eval "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "bench: $2 did not start" >&2; cat "$WORK"/*.log >&2; exit 1
}

echo "bench: starting a resolver service, two storage nodes and the daemon in $WORK" >&2
$VSTORE resolver serve --store "$WORK/resolver.json" --listen "unix:$WORK/resolver.sock" --log-level warn >"$WORK/resolver.log" 2>&1 &
PIDS+=($!)
wait_for "test -S $WORK/resolver.sock" resolver
NODE_PIDS=()
for n in node1 node2; do
  $VSTORE node --data "$WORK/$n" --id "$n" --listen "unix:$WORK/$n.sock" --resolver "unix:$WORK/resolver.sock" --log-level warn >"$WORK/$n.log" 2>&1 &
  PIDS+=($!)
  NODE_PIDS+=($!)
  wait_for "test -S $WORK/$n.sock" "$n"
done
cat >"$WORK/config.yaml" <<YAML
runDir: $WORK/run
stateDir: $WORK/state
log: { level: warn }
resolver: { url: "unix:$WORK/resolver.sock" }
vms:
  - name: bench
    disks:
      - { name: disk0, volume: { size: ${SIZE_MIB}M, replicas: 2, shortCircuit: ${SHORT_CIRCUIT}, shortCircuitWrites: ${SHORT_CIRCUIT_WRITES} } }
      - { name: disk1, volume: { size: ${SIZE_MIB}M, replicas: 1, shortCircuit: ${SHORT_CIRCUIT}, shortCircuitWrites: ${SHORT_CIRCUIT_WRITES} } }
YAML
node ${VSTORE_NODE_ARGS:-} "$ROOT/bin/vstore.js" serve -c "$WORK/config.yaml" >"$WORK/daemon.log" 2>&1 &
PIDS+=($!)
DAEMON_PID=$!
DAEMON_URI="nbd+unix:///?socket=$WORK/run/bench-disk0.sock"
SINGLE_URI="nbd+unix:///?socket=$WORK/run/bench-disk1.sock"
NODE_URI="nbd+unix:///bench/disk0?socket=$WORK/node1.sock"
wait_for "nbdinfo --size '$DAEMON_URI'" daemon

# Fill the volume through the daemon (both replicas hold data: reads hit data, not holes).
echo "bench: writing ${SIZE_MIB} MiB through the daemon" >&2
for u in "$DAEMON_URI" "$SINGLE_URI"; do
  fio --name=prep --ioengine=nbd --uri="$u" --rw=write --bs=1M --iodepth=8 --size="${SIZE_MIB}M" \
      --refill_buffers --output=/dev/null >/dev/null
done

workload_args() {
  case "$1" in
    randread)  echo "--rw=randread --bs=4k --iodepth=32" ;;
    seqread)   echo "--rw=read --bs=1M --iodepth=8" ;;
    seqwrite)  echo "--rw=write --bs=1M --iodepth=8" ;;
    *) echo "bench: unknown workload $1" >&2; exit 1 ;;
  esac
}
# CPU time (clock ticks) the vstore processes (daemon + both nodes) have used so far.
cpu_ticks() {
  local t=0 p
  for p in "$DAEMON_PID" "${NODE_PIDS[@]}"; do t=$(( t + $(awk '{print $14 + $15}' "/proc/$p/stat") )); done
  echo "$t"
}
HZ=$(getconf CLK_TCK)
: >"$OUT/cpu.tsv"
uri_of() { case "$1" in replicated) echo "$DAEMON_URI" ;; single) echo "$SINGLE_URI" ;; *) echo "$NODE_URI" ;; esac; }

read -r -a WL <<<"$WORKLOADS"
SUBJ=(replicated single one-node)
total=$(( ${#SUBJ[@]} * ${#WL[@]} * ROUNDS ))
i=0
t0=$(date +%s)
for w in "${WL[@]}"; do
  for r in $(seq 1 "$ROUNDS"); do
    order=("${SUBJ[@]:$(( (r - 1) % 3 ))}" "${SUBJ[@]:0:$(( (r - 1) % 3 ))}")
    for s in "${order[@]}"; do
      i=$((i + 1))
      printf 'bench: [%d/%d] %-9s %-10s round %d  (%ds elapsed, ~%ds left)\n' "$i" "$total" "$w" "$s" "$r" \
        $(( $(date +%s) - t0 )) $(( (total - i + 1) * (RUNTIME + RAMP + 1) )) >&2
      c0=$(cpu_ticks)
      # shellcheck disable=SC2046
      fio --name="$w" --ioengine=nbd --uri="$(uri_of "$s")" $(workload_args "$w") \
          --size="${SIZE_MIB}M" --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
          --numjobs=1 --norandommap --randrepeat=0 --output-format=json \
          --output="$OUT/raw/$w.$s.$r.json" >/dev/null 2>"$WORK/fio.err" \
        || { echo "bench: fio failed for $s/$w:" >&2; cat "$WORK/fio.err" >&2; exit 1; }
      printf '%s\t%s\t%s\t%s\n' "$w" "$s" "$r" "$(( $(cpu_ticks) - c0 ))" >>"$OUT/cpu.tsv"
    done
  done
done

node "$ROOT/bench/chart.mjs" --raw "$OUT/raw" --json "$OUT/results.json" --svg "$SVG" \
  --servers replicated,single,one-node --subject replicated --anchors one-node \
  --title 'Replicated volume (2 replicas) through the daemon vs one node directly, fio nbd engine (higher is better)' \
  --runtime "$RUNTIME" --rounds "$ROUNDS" --size-mib "$SIZE_MIB"

# CPU cost: vstore CPU (daemon + nodes) per I/O over the whole run (ramp included: fio's own
# I/O count covers the measured part only, so this slightly overstates both subjects alike).
node - "$OUT" "$HZ" "$RUNTIME" "$RAMP" <<'JS'
const [out, hz, runtime, ramp] = process.argv.slice(2);
const fs = require('node:fs');
const rows = fs.readFileSync(`${out}/cpu.tsv`, 'utf8').trim().split('\n').map((l) => l.split('\t'));
const acc = {};
for (const [w, s, r, ticks] of rows) {
  const doc = JSON.parse(fs.readFileSync(`${out}/raw/${w}.${s}.${r}.json`, 'utf8').replace(/^[^{]*/, ''));
  const side = w.includes('write') ? doc.jobs[0].write : doc.jobs[0].read;
  const ios = side.total_ios * (Number(runtime) + Number(ramp)) / Number(runtime);
  (acc[`${w} ${s}`] ??= []).push((Number(ticks) / Number(hz)) * 1e6 / ios);
}
console.log('\n| workload | subject | vstore CPU µs per I/O (daemon + nodes, median) |\n|---|---|---|');
for (const [k, v] of Object.entries(acc)) {
  v.sort((a, b) => a - b);
  const [w, s] = k.split(' ');
  console.log(`| ${w} | ${s} | ${v[Math.floor(v.length / 2)].toFixed(1)} |`);
}
JS
