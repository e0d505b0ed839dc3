#!/usr/bin/env bash
# Idempotent: build llama.cpp's own server (llama-server, the native /completion endpoint) for the
# CPU and install it, with the HF -> GGUF converter, into .cache/llama.cpp/:
#     bin/llama-server   convert_hf_to_gguf.py   conversion/   gguf-py/   VERSION
# Debian bookworm has no llama.cpp package, and nothing may come from GitHub or a model hub, so
# the source is llama.cpp as vendored in the PyPI sdist of llama-cpp-python (a pinned version
# and hash). The converter runs with the project's .venv: it needs torch, transformers, numpy,
# pyyaml and tqdm, which the project already installs, and sentencepiece (a 1.4 MB compiled wheel:
# the converter imports it even for BPE tokenizers), which this script adds to .venv if missing.
#
# Build: cmake Release, target llama-server only, static, CPU only (no CUDA/Vulkan/Metal/BLAS/
# OpenSSL/web UI/tests/examples), GGML_NATIVE=OFF: an AVX2/FMA/F16C baseline that runs on any
# x86-64-v3 CPU, not only the one that built it. About 10-11 minutes on 2 cores (measured:
# NATIVE=OFF 654-675 s, NATIVE=ON 538 s, -O0 616 s: the time goes to the C++ front end of the
# server, common and mtmd sources, so lower optimisation levels barely help). Timings printed.
#
# Environment: PROXYCLIENT_LLAMACPP_DIR (install dir), LLAMACPP_JOBS (parallel compile jobs),
# LLAMACPP_OPT (e.g. -O1; default: CMake's Release flags), LLAMACPP_NATIVE (default OFF),
# PYTHON (the python whose pip downloads the sdist; default .venv's).
set -euo pipefail
cd "$(dirname "$0")/.."

SDIST_VERSION=0.3.36
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
LLAMACPP_COMMIT=0c1e570  # the llama.cpp commit that this sdist vendors (its .git/modules says so)
PREFIX=${PROXYCLIENT_LLAMACPP_DIR:-$PWD/.cache/llama.cpp}
JOBS=${LLAMACPP_JOBS:-$(nproc)}
OPT=${LLAMACPP_OPT:-}
NATIVE=${LLAMACPP_NATIVE:-OFF}
STAMP="llama-cpp-python==$SDIST_VERSION opt=${OPT:-release} native=$NATIVE"

log() { echo "setup_llamacpp: $*" >&2; }

# The converter's one dependency that the project does not install already.
ensure_converter_deps() {
  if [ -x .venv/bin/python ] && ! .venv/bin/python -c "import sentencepiece" 2>/dev/null; then
    log "installing sentencepiece into .venv (the GGUF converter imports it)"
    .venv/bin/python -m pip install -q "sentencepiece>=0.1.98,<0.3.0"
  fi
}

if [ -x "$PREFIX/bin/llama-server" ] && "$PREFIX/bin/llama-server" --version >/dev/null 2>&1 \
  && [ -f "$PREFIX/convert_hf_to_gguf.py" ] && [ "$(cat "$PREFIX/VERSION" 2>/dev/null)" = "$STAMP" ]; then
  ensure_converter_deps
  log "already installed: $PREFIX ($STAMP)"
  exit 0
fi

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
fi

# Toolchain: cmake and a C++17 compiler (ninja if present). Debian machines have them; install
# them through apt when missing and we are root.
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v c++ >/dev/null || missing+=(g++)
command -v make >/dev/null || command -v ninja >/dev/null || missing+=(make)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing ${missing[*]} with apt-get"
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    log "missing build tools: ${missing[*]} (install them, e.g. apt-get install cmake g++ make)"
    exit 1
  fi
fi
if command -v ninja >/dev/null; then GEN=(-G Ninja); else GEN=(-G "Unix Makefiles"); fi

t_start=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/llamacpp-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

log "downloading the llama-cpp-python $SDIST_VERSION sdist (vendors llama.cpp)"
echo "llama-cpp-python==$SDIST_VERSION --hash=sha256:$SDIST_SHA256" >"$work/req.txt"
"$PY" -m pip download -q --no-deps --no-binary :all: --require-hashes -r "$work/req.txt" -d "$work"
t_dl=$(date +%s)

log "extracting vendor/llama.cpp"
top="llama_cpp_python-$SDIST_VERSION"
tar -xzf "$work/$top.tar.gz" -C "$work" "$top/vendor/llama.cpp"
src="$work/$top/vendor/llama.cpp"
rm -f "$src/.git"  # a submodule's gitfile pointing nowhere; build-info then says "unknown"

opt_flags=()
if [ -n "$OPT" ]; then
  opt_flags=(-DCMAKE_C_FLAGS_RELEASE="$OPT -DNDEBUG" -DCMAKE_CXX_FLAGS_RELEASE="$OPT -DNDEBUG")
fi
log "configuring (GGML_NATIVE=$NATIVE, ${OPT:-Release flags}, ${GEN[1]})"
cmake -S "$src" -B "$work/build" "${GEN[@]}" -Wno-dev "${opt_flags[@]}" \
  -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_COMMIT="$LLAMACPP_COMMIT" \
  -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE="$NATIVE" -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF \
  -DGGML_HIP=OFF -DGGML_SYCL=OFF -DGGML_OPENCL=OFF -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  >"$work/configure.log" 2>&1 || { tail -40 "$work/configure.log" >&2; exit 1; }
t_cfg=$(date +%s)

log "building llama-server with $JOBS jobs (several minutes on 2 cores)"
cmake --build "$work/build" --target llama-server -j "$JOBS" >"$work/build.log" 2>&1 \
  || { tail -60 "$work/build.log" >&2; exit 1; }
t_build=$(date +%s)

log "installing into $PREFIX"
rm -rf "$PREFIX/bin" "$PREFIX/conversion" "$PREFIX/gguf-py" "$PREFIX/convert_hf_to_gguf.py" \
  "$PREFIX/VERSION"
mkdir -p "$PREFIX/bin"
install -m 755 "$work/build/bin/llama-server" "$PREFIX/bin/llama-server"
cp -r "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py" "$src/LICENSE" "$PREFIX/"
echo "$STAMP" >"$PREFIX/VERSION"
"$PREFIX/bin/llama-server" --version >&2
ensure_converter_deps

t_end=$(date +%s)
log "done in $((t_end - t_start)) s: download $((t_dl - t_start)) s, configure $((t_cfg - t_dl)) s," \
  "build $((t_build - t_cfg)) s"
