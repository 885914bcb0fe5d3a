#!/usr/bin/env bash
# Build edgert's OpenCL runtime library for TVM (edgert/runtime/opencl/tvm_opencl.cc).
#   tools/build_opencl_runtime.sh                   for this machine
#   tools/build_opencl_runtime.sh --arch aarch64    cross-built (aarch64-linux-gnu-g++): RK3588, Pi
#   tools/build_opencl_runtime.sh --arch android    Android arm64 (the NDK's clang++ on PATH)
#   --out DIR   write there instead of the cache ($EDGERT_CACHE or ~/.cache/edgert)/opencl/ARCH
# Writes libedgert_opencl.so and libedgert_opencl.json (its sha256, the source's sha256, the
# tvm-ffi version); edgert.runtime.opencl loads the library only if they match.
# libOpenCL is not linked: the library opens it at run time (dlopen), so one build runs with
# the ICD loader on Linux and with the vendor's library on phones.
set -euo pipefail
cd "$(dirname "$0")/.."
arch=host
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch=${2:?--arch needs a value}; shift 2 ;;
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
[ "$arch" = host ] && arch=$(uname -m)
case "$arch" in
  x86_64|aarch64) ;;
  android|android-arm64) arch=android-arm64 ;;
  *) echo "unsupported --arch '$arch' (host, x86_64, aarch64, android)" >&2; exit 2 ;;
esac

# Where the wheels' headers and libraries are (found without importing tvm: it takes seconds).
eval "$("$PY" - <<'PYEOF'
import importlib.util
from importlib.metadata import version
from pathlib import Path
for var, pkg, dist in (("FFI", "tvm_ffi", "apache-tvm-ffi"), ("TVM", "tvm", "apache-tvm")):
    spec = importlib.util.find_spec(pkg)
    if spec is None or spec.origin is None:
        raise SystemExit(f"echo 'the Python package {dist} is not installed' >&2; exit 1")
    print(f"{var}_DIR='{Path(spec.origin).parent}'; {var}_VERSION='{version(dist)}'")
PYEOF
)"
[ -n "$out" ] || out="${EDGERT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgert}/opencl/$arch"
mkdir -p "$out"
chmod go-w "$out"

src=edgert/runtime/opencl/tvm_opencl.cc
flags=(-std=c++17 -O2 -fPIC -shared -fvisibility=hidden -Wall -Wno-unused-parameter
       -I"$TVM_DIR/include" -I"$FFI_DIR/include" -I"$FFI_DIR/3rdparty/dlpack/include")
if [ "$arch" = "$(uname -m)" ]; then
  CXX=${CXX:-g++}
  # Linked against this machine's TVM libraries so that -z defs catches any symbol they lack.
  libs=(-L"$TVM_DIR/lib" -L"$FFI_DIR/lib" -ltvm_runtime -ltvm_ffi -ldl -Wl,-z,defs)
else
  case "$arch" in
    aarch64) CXX=${CXX:-aarch64-linux-gnu-g++}; hint="on Debian: apt-get install g++-aarch64-linux-gnu" ;;
    android-arm64) CXX=${CXX:-aarch64-linux-android24-clang++}
      hint="install the Android NDK and put toolchains/llvm/prebuilt/linux-x86_64/bin on PATH" ;;
    *) CXX=${CXX:-$arch-linux-gnu-g++}; hint="" ;;
  esac
  command -v "$CXX" >/dev/null || { echo "cross compiler '$CXX' not found ($hint)" >&2; exit 1; }
  # TVM's symbols resolve at load time from libtvm_runtime/libtvm_ffi, which edgert loads
  # first; the OpenCL headers are architecture-independent, so the host's serve.
  cl_inc=$(mktemp -d)
  trap 'rm -rf "$cl_inc"' EXIT
  [ -d /usr/include/CL ] || { echo "OpenCL headers missing (apt-get install opencl-headers)" >&2; exit 1; }
  ln -s /usr/include/CL "$cl_inc/CL"
  flags+=(-isystem "$cl_inc")
  libs=(-ldl)
  [ "$arch" = android-arm64 ] && libs=(-ldl -static-libstdc++)
fi
[ -f /usr/include/CL/cl.h ] || [ "$arch" != "$(uname -m)" ] \
  || { echo "OpenCL headers missing (apt-get install opencl-headers)" >&2; exit 1; }
lib="$out/libedgert_opencl.so"
# One build at a time per folder (two test processes may build at once); the library and its
# manifest are written to temporary names and renamed into place.
exec 9>"$out/.build.lock"
flock 9
tmp="$lib.tmp.$$"
"$CXX" "${flags[@]}" -o "$tmp" "$src" "${libs[@]}" -s
mv -f "$tmp" "$lib"
chmod 755 "$lib"
"$PY" - "$lib" "$src" "$arch" "$FFI_VERSION" "$TVM_VERSION" "$CXX" <<'PYEOF'
import hashlib, json, sys
from pathlib import Path
lib, src, arch, ffi_version, tvm_version, cxx = sys.argv[1:]
manifest = {
    "library": Path(lib).name,
    "sha256": hashlib.sha256(Path(lib).read_bytes()).hexdigest(),
    "source_sha256": hashlib.sha256(Path(src).read_bytes()).hexdigest(),
    "arch": arch,
    "apache-tvm-ffi": ffi_version,
    "apache-tvm": tvm_version,
    "compiler": cxx,
}
dest = Path(lib).with_suffix(".json")
part = dest.with_name(dest.name + ".part")
part.write_text(json.dumps(manifest, indent=1) + "\n")
part.replace(dest)
PYEOF
echo "$lib"
