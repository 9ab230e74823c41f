#!/usr/bin/env bash
# Installs everything vstore and its test suite need on a fresh Debian 12 machine:
# the Debian peers (QEMU, qemu-utils, libnbd tools, nbdkit, fio, ...), the npm packages and
# the TypeScript build. Idempotent and quiet when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

DEB_PKGS=(qemu-system-x86 qemu-utils libnbd-bin nbdkit fio busybox-static cpio kmod e2fsprogs
          openssl python3-libnbd gnutls-bin liburing-dev etcd-server etcd-client strace
          attr fuse3)   # attr: setfattr/getfattr for the FUSE mount tests; fuse3: fusermount3 (vstore mount as non-root)
# Command each package provides, to skip apt when everything is present.
need_apt=0
for cmd in qemu-system-x86_64 qemu-img qemu-io qemu-nbd qemu-storage-daemon nbdinfo nbdcopy nbdsh nbdkit fio cpio depmod mkfs.ext2 e2fsck debugfs openssl certtool etcd etcdctl strace setfattr getfattr fusermount3; do
  command -v "$cmd" >/dev/null 2>&1 || need_apt=1
done
[ -x /bin/busybox ] || need_apt=1
test -f /usr/include/liburing.h || need_apt=1   # liburing-dev: the addon's io_uring engine
/usr/bin/python3 -c 'import nbd' 2>/dev/null || need_apt=1   # nbdsh's Python binding
if [ "$need_apt" = 1 ]; then
  echo "setup: installing Debian packages: ${DEB_PKGS[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${DEB_PKGS[@]}" >/dev/null
fi

# npm packages: reinstall when package-lock.json changed since the last install. `npm install`
# (which follows the lock file) rather than `npm ci`: npm 11 rejects its own lock files in
# `npm ci` when they omit other platforms' optional packages (rollup's native builds).
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: npm install" >&2
  npm install --no-audit --no-fund --loglevel=error
fi

# The C++ addon, built from source against this Node (npm's nodedir setting points node-gyp at
# the local headers; nothing prebuilt is downloaded).
addon=native/build/Release/vstore_native.node
if [ ! -f "$addon" ] || [ -n "$(find native/src native/binding.gyp -newer "$addon" -print -quit)" ]; then
  echo "setup: building the native addon" >&2
  if [ -z "${npm_config_nodedir:-}" ] && [ -f /usr/include/node/node.h ]; then export npm_config_nodedir=/usr; fi
  npm run --silent build:native >/dev/null
fi

# TypeScript build (dist/) when any source is newer than the last build.
if [ ! -f dist/.stamp ] || [ -n "$(find lib package.json tsconfig.json -newer dist/.stamp -print -quit)" ]; then
  echo "setup: building" >&2
  npm run --silent build
fi
