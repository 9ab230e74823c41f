#!/usr/bin/env bash
# The main job on the embedded default (`npm start`): installs and builds what is missing
# (scripts/setup.sh), then runs vstore in the foreground on fixtures/demo.yaml — on this one
# machine and in one process, an embedded resolver, two storage nodes (./.state/node1, node2)
# and the host daemon, with one demo VM whose 1 GiB disk is a volume replicated on both nodes
# (created on first run, found again through the resolver after that), cached write-back in
# ./.state/cache.img, and whose directory
# /demo/shared is shared over virtiofs — and prints how to attach
# it to QEMU and how to look at it. Ctrl-C (SIGINT) or SIGTERM drains, flushes and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

bash scripts/setup.sh

CONFIG="$ROOT/fixtures/demo.yaml"
STATE="$ROOT/.state"
SOCK="$STATE/run/demo-disk0.sock"
VSOCK="$STATE/run/demo-disk0.vhost.sock"
FSOCK="$STATE/run/demo-shared.fs.sock"
CONTROL="$STATE/run/control.sock"
mkdir -p "$STATE/run"

cat <<INFO
vstore demo: an embedded resolver, storage nodes node1 and node2, and the daemon serving VM "demo",
disk "disk0": volume demo/disk0, 1 GiB, one replica on each node ($STATE/node{1,2}/volumes/demo/disk0.img)
  write-back cache: $STATE/cache.img (FLUSH = durable there; written back to both nodes in order)
  NBD socket:     $SOCK   (export name "")
  vhost-user-blk: $VSOCK
and share "shared": directory /demo/shared on a storage node ($STATE/node?/dirs/demo/shared)
  virtiofs (vhost-user-fs): $FSOCK
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

With the share too (virtiofs needs shared guest RAM as well):
  qemu-system-x86_64 -accel tcg -cpu max -m 512 -nographic \\
    -kernel vmlinuz -initrd initrd.img -append "console=ttyS0" \\
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \\
    -drive file=nbd:unix:$SOCK,format=raw,if=virtio,cache=none \\
    -chardev socket,id=fs0,path=$FSOCK -device vhost-user-fs-pci,chardev=fs0,tag=shared
and in the guest:
  mkdir -p /mnt/shared && mount -t virtiofs shared /mnt/shared

Look at it:
  nbdinfo 'nbd+unix:///?socket=$SOCK'
  node bin/vstore.js status --control $CONTROL
  node bin/vstore.js cache stats --control $CONTROL
  node bin/vstore.js resolver show demo/disk0 --resolver unix:$STATE/run/resolver.sock
  node bin/vstore.js resolver nodes --resolver unix:$STATE/run/resolver.sock
  curl --unix-socket $CONTROL http://vstore/metrics

Ctrl-C stops the daemon (drains in-flight requests, flushes the disk, removes the sockets).
INFO

exec node bin/vstore.js serve --config "$CONFIG"
