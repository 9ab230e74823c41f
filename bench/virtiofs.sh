#!/usr/bin/env bash
# virtiofs: vstore's share beside Debian's virtiofsd over an equal directory, measured inside a
# real guest (the e2e guest of scripts/build-guest.sh under QEMU TCG, vhost-user-fs-pci, shared
# memfd RAM). The guest prints a marker before and after each phase; the host timestamps the
# markers as they arrive on the serial console, so the guest's own clock does not matter.
#
# Subjects (alternating each round, order rotated):
#   vstore     `vstore serve` with one VM whose share is a local directory (dir:)
#   virtiofsd  /usr/lib/qemu/virtiofsd -o source=DIR -o cache=auto -o sandbox=chroot
# Phases (per boot):
#   seqwrite   dd 1 MiB blocks, SIZE_MIB MiB, conv=fsync
#   seqread    the same file read back twice after a remount (the second read is the "warm"
#              one: the host page cache holds the file); MiB/s of the second read
#   create / stat / unlink   FILES small files (echo > fN), then stat each, then rm each
# Under TCG the guest's CPU is slow and is the same for both subjects: quote the ratios.
#
#   bash bench/virtiofs.sh                 # SIZE_MIB=128 FILES=500 ROUNDS=1
#   ROUNDS=3 bash bench/virtiofs.sh
#   VSTORE_QOS=false bash bench/virtiofs.sh   # the daemon without its QoS layer
#   VSTORE_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" bash bench/virtiofs.sh   # profile the daemon
#
# Writes bench/out-virtiofs/results.json (+ raw serial logs) and prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

ROUNDS=${ROUNDS:-1}
SIZE_MIB=${SIZE_MIB:-128}
FILES=${FILES:-500}
MEM_MIB=${MEM_MIB:-768}
SUBJECTS=${SUBJECTS:-"vstore virtiofsd"}
OUT=${OUT:-$ROOT/bench/out-virtiofs}
WORK=${BENCH_DIR:-${TMPDIR:-/tmp}/vstore-bench-virtiofs}
VIRTIOFSD=${VIRTIOFSD:-/usr/lib/qemu/virtiofsd}
GUEST=$ROOT/.cache/guest

for cmd in qemu-system-x86_64 cpio gzip node "$VIRTIOFSD"; do
  command -v "$cmd" >/dev/null || { echo "bench: missing $cmd (run scripts/setup.sh)" >&2; exit 1; }
done
[ -f "$ROOT/dist/lib/cli/index.js" ] || { echo "bench: vstore is not built: npm run build" >&2; exit 1; }
bash "$ROOT/scripts/build-guest.sh" >/dev/null
KERNEL=$GUEST/vmlinux
[ -f "$KERNEL" ] || KERNEL=$GUEST/vmlinuz

rm -rf "$WORK"
mkdir -p "$WORK" "$OUT/raw"
rm -f "$OUT"/raw/*
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# The guest's script: phases bracketed by markers the host timestamps.
cat >"$WORK/test.sh" <<EOF
mark() { echo "@@MARK \$1"; }
mkdir -p /mnt/s
mount -t virtiofs s /mnt/s || { echo "@@RESULT error mount"; exit 1; }
cd /mnt/s
mark seqwrite-start
dd if=/dev/zero of=big bs=1M count=$SIZE_MIB conv=fsync 2>/dev/null
mark seqwrite-end
cd / && umount /mnt/s && mount -t virtiofs s /mnt/s && cd /mnt/s
mark seqread1-start
dd if=big of=/dev/null bs=1M 2>/dev/null
mark seqread1-end
mark seqread-start
dd if=big of=/dev/null bs=1M 2>/dev/null
mark seqread-end
mkdir small && cd small
mark create-start
i=0; while [ \$i -lt $FILES ]; do echo \$i > f\$i; i=\$((i+1)); done
mark create-end
cd / && umount /mnt/s && mount -t virtiofs s /mnt/s && cd /mnt/s/small
mark stat-start
i=0; while [ \$i -lt $FILES ]; do stat f\$i >/dev/null; i=\$((i+1)); done
mark stat-end
mark unlink-start
i=0; while [ \$i -lt $FILES ]; do rm f\$i; i=\$((i+1)); done
mark unlink-end
cd / && rm -f /mnt/s/big && rmdir /mnt/s/small && umount /mnt/s
echo "@@RESULT done 1"
EOF
(cd "$WORK" && echo test.sh | cpio -o -H newc --quiet | gzip) >"$WORK/extra.cpio.gz"
cat "$GUEST/initrd.img" "$WORK/extra.cpio.gz" >"$WORK/initrd.img"

# Boots the guest against the vhost-user-fs socket $1; serial lines timestamped into $2.
boot() {
  local sock=$1 log=$2
  timeout 900 qemu-system-x86_64 -accel tcg -cpu max -m "$MEM_MIB" -nographic -no-reboot -nodefaults \
    -serial stdio -display none -kernel "$KERNEL" -initrd "$WORK/initrd.img" \
    -append "console=ttyS0 panic=-1 quiet" \
    -object "memory-backend-memfd,id=mem,size=${MEM_MIB}M,share=on" -numa node,memdev=mem \
    -chardev "socket,id=fs0,path=$sock" -device vhost-user-fs-pci,chardev=fs0,tag=s </dev/null |
    while IFS= read -r line; do printf '%s %s\n' "$(date +%s.%N)" "$line"; done >"$log"
  grep -q '@@RESULT done 1' "$log" || { echo "bench: the guest did not finish; see $log" >&2; tail -20 "$log" >&2; exit 1; }
}

start_subject() {
  local s=$1 dir=$WORK/dir-$s
  rm -rf "$dir" && mkdir -p "$dir"
  case "$s" in
    vstore)
      rm -rf "$WORK/host" && mkdir -p "$WORK/host"
      QOSJSON=
      [ -n "${VSTORE_QOS:-}" ] && QOSJSON=" \"qos\": { \"enabled\": $VSTORE_QOS },"
      cat >"$WORK/host/config.json" <<EOF
{ "runDir": "$WORK/host/run", "control": "$WORK/host/control.sock",$QOSJSON
  "vms": [ { "name": "bench", "shares": [ { "tag": "s", "dir": "$dir", "target": "/mnt/s" } ] } ] }
EOF
      node ${VSTORE_NODE_ARGS:-} "$ROOT/bin/vstore.js" serve -c "$WORK/host/config.json" --log-level warn >"$WORK/vstore.log" 2>&1 &
      PIDS+=($!)
      SOCK=$WORK/host/run/bench-s.fs.sock
      ;;
    virtiofsd)
      SOCK=$WORK/virtiofsd.sock
      rm -f "$SOCK"
      "$VIRTIOFSD" --socket-path="$SOCK" -o source="$dir" -o cache=auto -o sandbox=chroot -f >"$WORK/virtiofsd.log" 2>&1 &
      PIDS+=($!)
      ;;
  esac
  for _ in $(seq 300); do [ -S "$SOCK" ] && return; sleep 0.1; done
  echo "bench: $s did not create $SOCK" >&2; exit 1
}

stop_subjects() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  PIDS=()
}

read -r -a SUBJ <<<"$SUBJECTS"
n=${#SUBJ[@]}
start=$(date +%s)
for round in $(seq "$ROUNDS"); do
  for k in $(seq 0 $((n - 1))); do
    s=${SUBJ[$(((k + round - 1) % n))]}
    echo "bench: round $round/$ROUNDS $s ($(( $(date +%s) - start ))s elapsed)" >&2
    start_subject "$s"
    boot "$SOCK" "$OUT/raw/$s-$round.log"
    stop_subjects
  done
done

node - "$OUT" "$SIZE_MIB" "$FILES" "$ROUNDS" "$SUBJECTS" <<'EOF'
const fs = require('fs');
const [out, sizeMiB, files, rounds, subjects] = process.argv.slice(2);
const subj = subjects.split(' ');
const phases = ['seqwrite', 'seqread', 'create', 'stat', 'unlink'];
const med = (a) => { const s = [...a].sort((x, y) => x - y); return s[Math.floor(s.length / 2)]; };
const res = {};
for (const s of subj) {
  res[s] = {};
  for (const p of phases) res[s][p] = [];
  for (let r = 1; r <= +rounds; r++) {
    const marks = {};
    for (const line of fs.readFileSync(`${out}/raw/${s}-${r}.log`, 'utf8').split('\n')) {
      const m = /^(\S+) .*@@MARK (\S+)/.exec(line);
      if (m) marks[m[2]] = +m[1];
    }
    for (const p of phases) {
      const secs = marks[`${p}-end`] - marks[`${p}-start`];
      res[s][p].push(p.startsWith('seq') ? +sizeMiB / secs : +files / secs);
    }
  }
}
const rows = phases.map((p) => {
  const v = subj.map((s) => med(res[s][p]));
  const unit = p.startsWith('seq') ? 'MiB/s' : 'ops/s';
  return `| ${p} (${unit}) | ${v.map((x) => x.toFixed(1)).join(' | ')} | ${(v[0] / v[1]).toFixed(2)} |`;
});
console.log(`| phase | ${subj.join(' | ')} | ${subj[0]}/${subj[1]} |`);
console.log(`|---|${subj.map(() => '---|').join('')}---|`);
console.log(rows.join('\n'));
fs.writeFileSync(`${out}/results.json`, JSON.stringify({ sizeMiB: +sizeMiB, files: +files, rounds: +rounds, results: res }, null, 2));
EOF
