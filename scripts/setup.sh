#!/usr/bin/env bash
# Installs trialign's build and run dependencies from Debian 12 packages. Idempotent: packages
# already present are not touched, so this is cheap to call before every build.
set -euo pipefail

PACKAGES=(
  build-essential cmake ccache pkg-config
  libtorch-dev
  libopenblas0-pthread   # without it LibTorch falls back to the reference BLAS (~12x slower fp32 matmul)
  libopencv-dev libsentencepiece-dev libyaml-cpp-dev libspdlog-dev
  nlohmann-json3-dev libcli11-dev catch2
  libgloo-dev            # headers of c10d's Gloo process group (data parallel on the CPU)
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#PACKAGES[@]} packages present"
  exit 0
fi

echo "setup: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "setup: done"
