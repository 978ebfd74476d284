#!/usr/bin/env bash
# Build llama.cpp's llama-server, llama-bench and llama-quantize for the benches (bench only: llama.cpp is
# never a product dependency and nothing of it is committed).
#
# The source is the llama.cpp tree that llama-cpp-python's sdist vendors, fetched with the venv's pip, so the
# build needs nothing but the package index. GGML_NATIVE is OFF and every x86 feature is named explicitly
# from /proc/cpuinfo: -march=native picked instructions that one VM's CPU did not run ("Illegal
# instruction"), and explicit flags say in the build record what the binaries use.
#
#   bash bench/build_llama_cpp.sh [OUT]          # OUT defaults to /work/llama.cpp-build
#
# Environment:
#   PIP                        pip to download with (default: the venv's, .venv/bin/pip beside this repo)
#   LLAMA_CPP_PYTHON_VERSION   sdist version (default 0.3.36, as bench/gguf_vs_llama_cpp.py; "" = newest)
#   JOBS                       parallel compile jobs (default: nproc)
#
# Leaves: OUT/bin/{llama-server,llama-bench,llama-quantize}, OUT/src (the unpacked llama.cpp tree, with
# convert_hf_to_gguf.py and gguf-py) and OUT/build-info.json (version, features, cmake arguments).
set -euo pipefail

OUT="${1:-/work/llama.cpp-build}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PIP="${PIP:-$HERE/.venv/bin/pip}"
[ -x "$PIP" ] || PIP=/work/main/.venv/bin/pip
VERSION="${LLAMA_CPP_PYTHON_VERSION-0.3.36}"
JOBS="${JOBS:-$(nproc)}"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

# --- source -----------------------------------------------------------------------------------------
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
spec="llama-cpp-python${VERSION:+==$VERSION}"
echo "== downloading $spec (sdist) with $PIP"
"$PIP" download --no-binary :all: --no-deps --quiet -d "$tmp" "$spec"
sdist="$(ls "$tmp"/llama_cpp_python-*.tar.gz)"
got_version="$(basename "$sdist" .tar.gz)"
got_version="${got_version#llama_cpp_python-}"
tar -xzf "$sdist" -C "$tmp"
rm -rf "$OUT/src"
mv "$tmp/llama_cpp_python-$got_version/vendor/llama.cpp" "$OUT/src"
echo "== llama.cpp from llama-cpp-python $got_version -> $OUT/src"

# --- CPU features -------------------------------------------------------------------------------------
flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2 || true) "  # x86 only; elsewhere every x86 option is OFF
has() { [[ "$flags" == *" $1 "* ]]; }
feature_args=()
features=()
# ggml option : /proc/cpuinfo flag
for pair in SSE42:sse4_2 AVX:avx AVX2:avx2 BMI2:bmi2 FMA:fma F16C:f16c AVX_VNNI:avx_vnni \
            AVX512:avx512f AVX512_VBMI:avx512_vbmi AVX512_VNNI:avx512_vnni AVX512_BF16:avx512_bf16; do
    opt="${pair%%:*}"
    flag="${pair#*:}"
    if has "$flag"; then
        feature_args+=("-DGGML_$opt=ON")
        features+=("$opt")
    else
        feature_args+=("-DGGML_$opt=OFF")
    fi
done
echo "== CPU features: ${features[*]:-none}"

# --- build ---------------------------------------------------------------------------------------------
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake_args=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF
    -DGGML_NATIVE=OFF
    "${feature_args[@]}"
    -DGGML_CCACHE=OFF
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    # No network during the build: no web UI download or npm build, no HTTPS.
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_BUILD_UI=OFF
    -DLLAMA_OPENSSL=OFF
)
targets=(llama-server llama-bench llama-quantize)
rm -rf "$OUT/build"
cmake -S "$OUT/src" -B "$OUT/build" "${generator[@]}" "${cmake_args[@]}"
start=$(date +%s)
cmake --build "$OUT/build" --config Release -j "$JOBS" --target "${targets[@]}"
seconds=$(( $(date +%s) - start ))

mkdir -p "$OUT/bin"
for t in "${targets[@]}"; do
    cp "$OUT/build/bin/$t" "$OUT/bin/$t"
done

features_json="$(printf '"%s",' "${features[@]}")"
args_json="$(printf '"%s",' "${cmake_args[@]}")"
cat > "$OUT/build-info.json" <<EOF
{
  "llama_cpp_python_version": "$got_version",
  "cpu_model": "$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//' || true)",
  "features": [${features_json%,}],
  "cmake_args": [${args_json%,}],
  "compiler": "$(${CXX:-c++} --version | head -1)",
  "build_seconds": $seconds,
  "jobs": $JOBS,
  "built_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
}
EOF
echo "== built ${targets[*]} in ${seconds}s -> $OUT/bin (record: $OUT/build-info.json)"
