#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what it needs (scripts/setup.sh), builds
# the guest image for the e2e tests (scripts/build-guest.sh), then runs vitest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -x scripts/build-guest.sh ]; then bash scripts/build-guest.sh; fi
exec npx vitest run "$@"
