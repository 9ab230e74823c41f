#!/usr/bin/env bash
# The main job on the embedded default (`npm start`): installs and builds what is missing
# (scripts/setup.sh), then runs the vstore daemon in the foreground on fixtures/demo.yaml — one
# demo VM with a 1 GiB sparse disk under ./.state/ (created on first run) — and prints how to
# attach it to QEMU and how to look at it. Ctrl-C (SIGINT) or SIGTERM drains, flushes and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

bash scripts/setup.sh

CONFIG="$ROOT/fixtures/demo.yaml"
STATE="$ROOT/.state"
SOCK="$STATE/run/demo-disk0.sock"
VSOCK="$STATE/run/demo-disk0.vhost.sock"
CONTROL="$STATE/run/control.sock"
mkdir -p "$STATE/run"

cat <<INFO
vstore demo: serving VM "demo", disk "disk0" ($STATE/demo-disk0.img, 1 GiB sparse)
  NBD socket:     $SOCK   (export name "")
  vhost-user-blk: $VSOCK
  control socket: $CONTROL

Attach it to a VM over NBD:
  qemu-system-x86_64 -accel tcg -cpu max -m 512 -nographic \\
    -kernel vmlinuz -initrd initrd.img -append "console=ttyS0" \\
    -drive file=nbd:unix:$SOCK,format=raw,if=virtio,cache=none

or as a vhost-user-blk device (guest RAM must be shared memory; one front end at a time):
  qemu-system-x86_64 -accel tcg -cpu max -m 512 -nographic \\
    -kernel vmlinuz -initrd initrd.img -append "console=ttyS0" \\
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \\
    -chardev socket,id=b0,path=$VSOCK,reconnect=1 -device vhost-user-blk-pci,chardev=b0

Look at it:
  nbdinfo 'nbd+unix:///?socket=$SOCK'
  node bin/vstore.js status --control $CONTROL
  curl --unix-socket $CONTROL http://vstore/metrics

Ctrl-C stops the daemon (drains in-flight requests, flushes the disk, removes the sockets).
INFO

exec node bin/vstore.js serve --config "$CONFIG"
