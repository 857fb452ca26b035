#!/usr/bin/env bash
# Regenerate the lock files from pyproject.toml (run from anywhere in the repository):
#
#   bash requirements/update.sh             # same pins where pyproject.toml allows them
#   bash requirements/update.sh --upgrade   # move the unpinned (transitive) ones to their latest
#
# Every file lists each package at ==version with the sha256 of every file PyPI has for that
# version, resolved for CPython 3.11 on Linux x86_64 (manylinux_2_28), wheels only:
#   lock-test.txt  the project with its test extra: the CI install (.ci/run)
#   lock.txt       the project alone, PyPI's torch (CUDA build with its nvidia-* wheels): the GPU image
#   lock-cpu.txt   the project alone without torch, torchvision and the CUDA-only packages PyPI's
#                  Linux torch needs: the CPU image, whose torch and torchvision come from
#                  PyTorch's CPU index (cluster/Dockerfile)
#   torch-cpu.txt  torch and torchvision from PyTorch's CPU index with that index's hashes, written
#                  only where the index can be reached; the CPU image checks them when it is there
# lock.txt and lock-cpu.txt are constrained by lock-test.txt: the images run the versions CI tests.
# The resolver is uv, pinned here and installed into a scratch virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9
CPU_INDEX="${CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
TOOL="${RAYKD_LOCK_TOOL:-${TMPDIR:-/tmp}/raykd-lock-tool}"
if ! "$TOOL/bin/uv" --version 2>/dev/null | grep -qx "uv $UV_VERSION.*"; then
  python3 -m venv "$TOOL"
  "$TOOL/bin/pip" install -q --disable-pip-version-check "uv==$UV_VERSION"
fi

compile() {  # compile OUTPUT [uv pip compile options...]
  local out="$1"; shift
  "$TOOL/bin/uv" pip compile --quiet --generate-hashes --only-binary :all: \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --custom-compile-command "bash requirements/update.sh" --output-file "$out" "$@"
}

compile requirements/lock-test.txt pyproject.toml --extra test "$@"
compile requirements/lock.txt pyproject.toml -c requirements/lock-test.txt "$@"

# cpu-overrides.txt removes the CUDA-only requirements of PyPI's Linux torch from the resolution.
trap 'rm -f requirements/torch-cpu.txt.new' EXIT
compile requirements/lock-cpu.txt pyproject.toml -c requirements/lock-test.txt \
  --override requirements/cpu-overrides.txt --no-emit-package torch --no-emit-package torchvision "$@"

pins="$(grep -oE '"(torch|torchvision)==[^"]+"' pyproject.toml | tr -d '"')"
if echo "$pins" | compile requirements/torch-cpu.txt.new - --no-deps --index-url "$CPU_INDEX" "$@"; then
  mv requirements/torch-cpu.txt.new requirements/torch-cpu.txt
elif [ -f requirements/torch-cpu.txt ]; then
  echo "update.sh: $CPU_INDEX could not be reached or resolved; requirements/torch-cpu.txt left as it was" >&2
else
  echo "update.sh: $CPU_INDEX could not be reached or resolved; without requirements/torch-cpu.txt the CPU" \
       "image installs torch and torchvision from that index pinned by version, not by hash" >&2
fi

for f in requirements/lock-test.txt requirements/lock.txt requirements/lock-cpu.txt; do
  echo "$f: $(grep -cE '^[A-Za-z0-9]' "$f") packages"
done
