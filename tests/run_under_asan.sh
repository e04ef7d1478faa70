#!/usr/bin/env bash
# Runs the tests that call the C++ ops with bad arguments against an AddressSanitizer build of
# fusedrnn._C, where a read or write past a buffer aborts the process with a report instead of
# passing unseen. Not part of CI (the build takes a minute); run it after touching csrc/cpu:
#   bash tests/run_under_asan.sh [pytest args...]   (default: tests/test_ops_arguments.py)
# It builds in a scratch copy of the working tree, so the installed extension is untouched.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
tar -C "$repo" --exclude=.venv --exclude=.git --exclude='*.so' --exclude=build -cf - . \
  | tar -C "$scratch" -xf -
cd "$scratch"
CFLAGS="-fsanitize=address -fno-omit-frame-pointer" LDFLAGS="-fsanitize=address" \
  python setup.py -q build_ext --inplace 2>&1 | grep -v -i warning || true
test -f fusedrnn/_C*.so || { echo "ASan build failed" >&2; exit 1; }
# python is not instrumented: preload the runtime, with libstdc++ (else ASan's __cxa_throw
# interceptor finds no real one and every C++ exception aborts); leave leak checking off (the
# interpreter's allocations at exit are not ours). An ASan report ends the run with status 1.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0}"
python -c "import fusedrnn, fusedrnn._C; print('ASan build:', fusedrnn._C.__file__)"
python -m pytest -q -p no:cacheprovider "${@:-tests/test_ops_arguments.py}"
