#!/usr/bin/env bash
# Builds the small guest the e2e tests boot under QEMU/TCG: Debian's stock kernel and a busybox
# initramfs carrying only the modules the tests need (virtio-pci, virtio-blk, virtiofs, ext4 used
# for ext2) and e2fsprogs' mke2fs. The result lands in .cache/guest/ (ignored by git):
#   vmlinuz        the kernel (bzImage)
#   vmlinux        the same kernel uncompressed (ELF with a PVH entry), booted when present: fast
#   initrd.img     the base initramfs (gzip'd newc cpio)
#   VERSION        kernel version, build-script hash (the up-to-date stamp)
#
# The test's own script is not baked in: a test appends a second tiny cpio holding /test.sh to
# initrd.img (the kernel unpacks concatenated archives in order), so one image serves every test.
# The /init mounts /proc, /sys, /dev, loads the modules, runs `sh /test.sh`, prints
# `@@EXIT <status>` and powers off. test/helpers/guest.ts does the appending and parsing.
# Note: busybox's sh runs its own applets before $PATH, so a test calls e2fsprogs' mke2fs as
# /sbin/mke2fs (plain `mke2fs` is busybox's minimal one).
#
# Usage: scripts/build-guest.sh [--force]     (GUEST_DIR and GUEST_KERNEL_PKG override defaults)
# Re-running is a no-op (well under a second) while the stamp matches.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${GUEST_DIR:-$ROOT/.cache/guest}
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1

# Which kernel: whatever Debian's linux-image-amd64 metapackage depends on (resolved offline
# from the apt lists), unless overridden.
resolve_pkg() {
  if [ -n "${GUEST_KERNEL_PKG:-}" ]; then echo "$GUEST_KERNEL_PKG"; return; fi
  local dep
  dep=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  if [ -z "$dep" ]; then
    apt-get update -qq >/dev/null 2>&1 || true
    dep=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  fi
  [ -n "$dep" ] || { echo "build-guest: cannot resolve linux-image-amd64's kernel package" >&2; exit 1; }
  echo "$dep"
}
PKG=$(resolve_pkg)
KVER=${PKG#linux-image-}
SCRIPT_HASH=$(sha256sum "$0" | cut -c1-16)
STAMP="$KVER $SCRIPT_HASH"

if [ "$FORCE" = 0 ] && [ -f "$OUT/VERSION" ] && [ "$(cat "$OUT/VERSION")" = "$STAMP" ] \
   && [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.img" ]; then
  echo "build-guest: up to date ($OUT, kernel $KVER)" >&2
  exit 0
fi

for cmd in apt-get dpkg depmod modprobe cpio gzip busybox mke2fs ldd flock setfattr getfattr; do
  command -v "$cmd" >/dev/null || { echo "build-guest: missing $cmd (run scripts/setup.sh)" >&2; exit 1; }
done

echo "build-guest: building guest with kernel $KVER into $OUT" >&2
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vstore-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# 1. Kernel package (the .deb is kept in the cache so a rebuild after a script change is offline).
DEB=$(ls "$OUT"/"${PKG}"_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$DEB" ]; then
  rm -f "$OUT"/linux-image-*.deb
  (cd "$OUT" && apt-get download "$PKG" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
  DEB=$(ls "$OUT"/"${PKG}"_*.deb 2>/dev/null | head -n1 || true)
  [ -n "$DEB" ] || { echo "build-guest: apt-get download $PKG failed" >&2; exit 1; }
fi
dpkg -x "$DEB" "$WORK/kpkg"
depmod -b "$WORK/kpkg" "$KVER"

# 2. Initramfs tree.
IR=$WORK/initramfs
mkdir -p "$IR"/{bin,sbin,dev,proc,sys,tmp,mnt,etc,lib/modules/"$KVER",usr/bin,usr/sbin}
cp /bin/busybox "$IR/bin/busybox"
for app in $(busybox --list); do
  [ -e "$IR/bin/$app" ] || ln -s busybox "$IR/bin/$app"
done

# Modules in load order (modprobe resolves dependencies from modules.dep), deduplicated.
# crc32c_generic is needed by ext4's metadata checksums (the kernel would ask modprobe for it).
WANT=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk
      fuse virtiofs crc32c_generic crc32c-intel crc16 mbcache jbd2 ext4)
ORDER=()
declare -A SEEN=()
for m in "${WANT[@]}"; do
  while read -r verb path _; do
    [ "$verb" = insmod ] || continue
    [ -n "${SEEN[$path]:-}" ] && continue
    SEEN[$path]=1
    ORDER+=("$path")
  done < <(modprobe -d "$WORK/kpkg" -S "$KVER" --show-depends "$m")
done
: > "$IR/etc/modules"
for path in "${ORDER[@]}"; do
  base=$(basename "$path")
  case "$base" in
    *.ko.xz)  xz -dc "$path" > "$IR/lib/modules/$KVER/${base%.xz}"; base=${base%.xz} ;;
    *.ko.zst) zstd -qdc "$path" > "$IR/lib/modules/$KVER/${base%.zst}"; base=${base%.zst} ;;
    *.ko.gz)  gzip -dc "$path" > "$IR/lib/modules/$KVER/${base%.gz}"; base=${base%.gz} ;;
    *)        cp "$path" "$IR/lib/modules/$KVER/$base" ;;
  esac
  echo "$base" >> "$IR/etc/modules"
done

# e2fsprogs' mke2fs with its shared libraries (busybox's mke2fs is minimal; the real one makes
# exactly the filesystem e2fsck on the host expects).
copy_bin() {
  local bin=$1 dest=$2 lib
  cp "$bin" "$IR/$dest"
  for lib in $(ldd "$bin" | awk '/=> \//{print $3} /^\t\/lib/{print $1}'); do
    mkdir -p "$IR/$(dirname "$lib")"
    [ -e "$IR/$lib" ] || cp -L "$lib" "$IR/$lib"
  done
}
rm -f "$IR/sbin/mke2fs" "$IR/bin/mke2fs" "$IR/bin/mkfs.ext2"
copy_bin "$(command -v mke2fs)" sbin/mke2fs
ln -s mke2fs "$IR/sbin/mkfs.ext2"
ln -s mke2fs "$IR/sbin/mkfs.ext4"
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$IR/etc/mke2fs.conf"
# util-linux's flock and attr's setfattr/getfattr (busybox has neither): the virtiofs tests take
# locks and set xattrs from the guest. Called by full path, like mke2fs.
for tool in flock setfattr getfattr; do
  copy_bin "$(command -v "$tool")" "usr/bin/$tool"
done
# /lib64 on Debian is a real dir holding the loader; keep the path the binaries were linked with.

cat > "$IR/init" <<'EOF'
#!/bin/sh
# vstore test guest. Runs /test.sh (appended by the test as a second cpio archive), then powers off.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /target && mount -t devpts devpts /dev/pts 2>/dev/null
echo 1 > /proc/sys/kernel/printk 2>/dev/null
for m in $(cat /etc/modules); do
  insmod /lib/modules/$(uname -r)/$m || echo "@@WARN insmod $m failed"
done
# virtio disks are probed asynchronously: when a virtio-blk PCI function exists (device id
# 0x1001 legacy / 0x1042 modern), give /dev/vda up to 5 s to show up.
if cat /sys/bus/pci/devices/*/device 2>/dev/null | grep -qE '0x1001|0x1042'; then
  i=0
  while [ $i -lt 50 ] && [ ! -b /dev/vda ]; do sleep 0.1; i=$((i+1)); done
fi
echo "@@READY"
if [ -f /test.sh ]; then
  sh -e /test.sh
  rc=$?
else
  echo "@@WARN no /test.sh"
  rc=127
fi
echo "@@EXIT $rc"
sync
poweroff -f
EOF
chmod 755 "$IR/init"

(cd "$IR" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) | gzip -6 > "$WORK/initrd.img"
cp "$WORK/kpkg/boot/vmlinuz-$KVER" "$WORK/vmlinuz"

# Under TCG, decompressing the xz bzImage costs ~6 s of the boot. When the kernel has a PVH entry
# point (CONFIG_PVH=y, true for Debian's), QEMU boots the uncompressed ELF vmlinux directly:
# the whole guest run then takes ~6 s instead of ~12 s. Extracted here once.
rm -f "$OUT/vmlinux"
if grep -q '^CONFIG_PVH=y' "$WORK/kpkg/boot/config-$KVER"; then
  for magic in '\xfd7zXZ\x00:xz -dc --single-stream' '\x28\xb5\x2f\xfd:zstd -qdc' '\x1f\x8b\x08:gzip -dc'; do
    off=$(LC_ALL=C grep -obUaP "${magic%%:*}" "$WORK/vmlinuz" | head -n1 | cut -d: -f1 || true)
    [ -n "$off" ] || continue
    tail -c +$((off + 1)) "$WORK/vmlinuz" | ${magic#*:} > "$WORK/vmlinux" 2>/dev/null || true
    if [ "$(head -c 4 "$WORK/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then
      mv -f "$WORK/vmlinux" "$OUT/vmlinux"
      break
    fi
  done
fi
mv -f "$WORK/initrd.img" "$OUT/initrd.img"
mv -f "$WORK/vmlinuz" "$OUT/vmlinuz"
echo "$STAMP" > "$OUT/VERSION"
echo "build-guest: done: $OUT/vmlinuz $OUT/initrd.img ($(du -h "$OUT/initrd.img" | cut -f1))" >&2
