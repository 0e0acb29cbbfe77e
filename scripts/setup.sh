#!/usr/bin/env bash
# One-time setup on a Debian/Ubuntu machine: the Vulkan loader, Mesa's lavapipe (a Vulkan driver
# that runs on the CPU, so this works without a GPU), the validation layer and shader tools, then a
# virtualenv in .venv with vkconv installed (editable) and its test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(mesa-vulkan-drivers libvulkan1 glslang-tools spirv-tools vulkan-validationlayers)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q -e '.[test,keras,bench,spconv]'
.venv/bin/python -m vkconv info
