# Shared by scripts/demo, scripts/test and scripts/gpu-check: locate the tree, install what the
# build needs from Debian's packages, pick a compiler cache.
set -euo pipefail
LOCUS_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
LOCUS_JOBS=${LOCUS_JOBS:-$(nproc)}

# The calling script's usage: its leading comment block, without the "# ".
locus_usage() {
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
}

# For a script that takes no arguments: answers -h/--help with its usage (exit 0) and refuses any
# argument (exit 2), before it installs, builds, deletes or rewrites anything.
locus_no_arguments() {
  [ $# -eq 0 ] && return 0
  case "$1" in
    -h | --help) locus_usage; exit 0 ;;
  esac
  echo "$(basename "$0"): unexpected argument \"$1\"; it takes none (see --help)" >&2
  exit 2
}

# Debian packages the project builds and tests with.
LOCUS_DEBIAN_PACKAGES=(cmake g++ make libboost-test-dev libopenmpi-dev openmpi-bin nlohmann-json3-dev libcli11-dev
  libbenchmark-dev python3 python3-dev python3-venv python3-matplotlib clang-14 libclang-rt-14-dev clang-format-14 ccache)

# What the demo needs: the driver alone (no tests, benchmarks, MPI or Python).
LOCUS_DEMO_PACKAGES=(cmake g++ make nlohmann-json3-dev libcli11-dev)

# What the Python package's build and tests need besides PyPI (python-test; README's pip install).
LOCUS_PYTHON_PACKAGES=(cmake g++ make nlohmann-json3-dev python3 python3-dev python3-venv)

# Installs the missing ones of the given Debian packages (default: LOCUS_DEBIAN_PACKAGES).
locus_install_deps() {
  local missing=() wanted=("$@")
  [ ${#wanted[@]} -eq 0 ] && wanted=("${LOCUS_DEBIAN_PACKAGES[@]}")
  for p in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "locus: installing Debian packages: ${missing[*]}" >&2
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The CUDA toolkit is not a Debian package here; use it where it is installed.
if [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi

locus_cmake_launcher_args() {
  if command -v ccache >/dev/null 2>&1; then
    echo "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"
  fi
}

locus_has_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}
