#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite through ctest.
#   scripts/test.sh [ctest args]      the normal build in build/
#   scripts/test.sh --sanitize [...]  an AddressSanitizer + UBSan build in build-sanitize/ running
#                                     every test but the out-of-tree plugin build (the
#                                     sentencepiece shim stays uninstrumented, loaded with dlmopen)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ "${1:-}" = "--sanitize" ]; then
  shift
  export BUILD_DIR=${BUILD_DIR:-build-sanitize}
  BUILD_TYPE=RelWithDebInfo scripts/build.sh -DTRIALIGN_SANITIZE=ON
  # Leaks inside LibTorch's and OpenCV's global state are not ours; everything else aborts the test.
  export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1}
  export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
else
  scripts/build.sh
fi
cd "${BUILD_DIR:-build}"
# Two ctest jobs on two cores: each test pins LibTorch to one thread (TRIALIGN_TEST_THREADS).
export TRIALIGN_TEST_THREADS=${TRIALIGN_TEST_THREADS:-1}
ctest --output-on-failure -j "${CTEST_JOBS:-$(nproc)}" "$@"
