#!/usr/bin/env bash
# A replicated volume through the daemon beside the same fio job straight against one storage
# node. On loopback (unix sockets), this machine: `vstore resolver serve`, two `vstore node`
# processes and `vstore serve` with one disk on a 2-replica volume. Subjects:
#   replicated  fio -> daemon's NBD export -> ReplicatedVolume -> NBD clients -> node1 + node2
#   one-node    fio -> node1's NBD export of the same volume (no daemon, no second copy)
# Goals (issue 3): >= 0.9x for reads, >= 0.8x for replicated writes. The two subjects alternate
# inside every workload and round; quote the ratios, not the absolute numbers.
#
#   bash bench/replicated.sh                         # 8 s per run, 1 round
#   RUNTIME=5 ROUNDS=3 bash bench/replicated.sh
#
# Writes bench/out-replicated/raw/*.json, results.json and bench/replicated.svg; prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

RUNTIME=${RUNTIME:-8}
RAMP=${RAMP:-2}
ROUNDS=${ROUNDS:-1}
SIZE_MIB=${SIZE_MIB:-512}
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
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

wait_for() { # PATH-or-command, what
  for _ in $(seq 1 400); do eval "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "bench: $2 did not start" >&2; cat "$WORK"/*.log >&2; exit 1
}

echo "bench: starting a resolver service, two storage nodes and the daemon in $WORK" >&2
$VSTORE resolver serve --store "$WORK/resolver.json" --listen "unix:$WORK/resolver.sock" --log-level warn >"$WORK/resolver.log" 2>&1 &
PIDS+=($!)
wait_for "test -S $WORK/resolver.sock" resolver
for n in node1 node2; do
  $VSTORE node --data "$WORK/$n" --id "$n" --listen "unix:$WORK/$n.sock" --resolver "unix:$WORK/resolver.sock" --log-level warn >"$WORK/$n.log" 2>&1 &
  PIDS+=($!)
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
      - { name: disk0, volume: { size: ${SIZE_MIB}M, replicas: 2 } }
YAML
$VSTORE serve -c "$WORK/config.yaml" >"$WORK/daemon.log" 2>&1 &
PIDS+=($!)
DAEMON_URI="nbd+unix:///?socket=$WORK/run/bench-disk0.sock"
NODE_URI="nbd+unix:///bench/disk0?socket=$WORK/node1.sock"
wait_for "nbdinfo --size '$DAEMON_URI'" daemon

# Fill the volume through the daemon (both replicas hold data: reads hit data, not holes).
echo "bench: writing ${SIZE_MIB} MiB through the daemon" >&2
fio --name=prep --ioengine=nbd --uri="$DAEMON_URI" --rw=write --bs=1M --iodepth=8 --size="${SIZE_MIB}M" \
    --refill_buffers --output=/dev/null >/dev/null

workload_args() {
  case "$1" in
    randread)  echo "--rw=randread --bs=4k --iodepth=32" ;;
    seqread)   echo "--rw=read --bs=1M --iodepth=8" ;;
    seqwrite)  echo "--rw=write --bs=1M --iodepth=8" ;;
    *) echo "bench: unknown workload $1" >&2; exit 1 ;;
  esac
}
uri_of() { if [ "$1" = replicated ]; then echo "$DAEMON_URI"; else echo "$NODE_URI"; fi; }

read -r -a WL <<<"$WORKLOADS"
SUBJ=(replicated one-node)
total=$(( ${#SUBJ[@]} * ${#WL[@]} * ROUNDS ))
i=0
t0=$(date +%s)
for w in "${WL[@]}"; do
  for r in $(seq 1 "$ROUNDS"); do
    order=("${SUBJ[@]:$(( (r - 1) % 2 ))}" "${SUBJ[@]:0:$(( (r - 1) % 2 ))}")
    for s in "${order[@]}"; do
      i=$((i + 1))
      printf 'bench: [%d/%d] %-9s %-10s round %d  (%ds elapsed, ~%ds left)\n' "$i" "$total" "$w" "$s" "$r" \
        $(( $(date +%s) - t0 )) $(( (total - i + 1) * (RUNTIME + RAMP + 1) )) >&2
      # shellcheck disable=SC2046
      fio --name="$w" --ioengine=nbd --uri="$(uri_of "$s")" $(workload_args "$w") \
          --size="${SIZE_MIB}M" --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
          --numjobs=1 --norandommap --randrepeat=0 --output-format=json \
          --output="$OUT/raw/$w.$s.$r.json" >/dev/null 2>"$WORK/fio.err" \
        || { echo "bench: fio failed for $s/$w:" >&2; cat "$WORK/fio.err" >&2; exit 1; }
    done
  done
done

node "$ROOT/bench/chart.mjs" --raw "$OUT/raw" --json "$OUT/results.json" --svg "$SVG" \
  --servers replicated,one-node --subject replicated --anchors one-node \
  --title 'Replicated volume (2 replicas) through the daemon vs one node directly, fio nbd engine (higher is better)' \
  --runtime "$RUNTIME" --rounds "$ROUNDS" --size-mib "$SIZE_MIB"
