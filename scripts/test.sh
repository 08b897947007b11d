#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite through ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
cd "${BUILD_DIR:-build}"
# Two ctest jobs on two cores: each test pins LibTorch to one thread (TRIALIGN_TEST_THREADS).
export TRIALIGN_TEST_THREADS=${TRIALIGN_TEST_THREADS:-1}
ctest --output-on-failure -j "${CTEST_JOBS:-$(nproc)}" "$@"
