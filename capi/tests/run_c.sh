#!/usr/bin/env bash
# Build libnotifier and run the C side of the ABI: the UCX external-events
# test, the libfabric import-monitor test and the README's example
# (capi/examples/use_from_c.c). Exits non-zero on any failure; a test that
# finds no userfaultfd exits 77 (skip), which fails here only under
# NOTIFIER_REQUIRE_UFFD=1.
#   Installs libucx-dev libfabric-dev pkg-config with apt-get if missing.
#   Also checks that the committed include/notifier.h is the generated one,
#   and writes target/capi/notifier.pc (prefix: the build tree) to show how
#   the pkg-config file is installed: substitute @PREFIX@/@LIBDIR@/@VERSION@
#   in capi/notifier.pc.in and copy it to $libdir/pkgconfig/.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
capi=$(dirname "$here")
root=$(dirname "$capi")
cd "$root"

pkgs=(libucx-dev libfabric-dev pkg-config gcc)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "run_c.sh: installing ${missing[*]}" >&2
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

git_header=$(git show HEAD:capi/include/notifier.h 2>/dev/null || true)
cargo build --release -p notifier-capi
if [ -n "$git_header" ] && [ "$git_header" != "$(cat capi/include/notifier.h)" ]; then
    echo "run_c.sh: capi/include/notifier.h differs from the committed one: commit the regenerated header" >&2
    exit 1
fi

lib="$root/target/release"
out="$root/target/capi"
mkdir -p "$out/pkgconfig"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
sed -e "s|@PREFIX@|$capi|" -e "s|@LIBDIR@|$lib|" -e "s|@VERSION@|$version|" \
    capi/notifier.pc.in > "$out/pkgconfig/notifier.pc"
export PKG_CONFIG_PATH="$out/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
cflags="-O2 -g -Wall -Wextra -Werror $(pkg-config --cflags notifier)"
libs="$(pkg-config --libs notifier) -Wl,-rpath,$lib"

ucx_flags=$(pkg-config --cflags --libs ucx-ucs 2>/dev/null || echo "-lucs -lucm")
fab_flags=$(pkg-config --cflags --libs libfabric 2>/dev/null || echo "-lfabric")

# name, source, extra flags, extra environment
run() {
    local name=$1 src=$2 flags=$3; shift 3
    echo "::: c $name"
    # shellcheck disable=SC2086
    gcc $cflags -o "$out/$name" "$src" $libs $flags -lpthread
    local rc=0
    env "$@" timeout 120 "$out/$name" || rc=$?
    if [ "$rc" -eq 77 ] && [ "${NOTIFIER_REQUIRE_UFFD:-}" != "1" ]; then
        echo "::: c $name skipped"
        skipped=$((skipped + 1))
    elif [ "$rc" -ne 0 ]; then
        echo "::: c $name FAILED (exit $rc)"
        failed=$((failed + 1))
    else
        passed=$((passed + 1))
    fi
}

passed=0 failed=0 skipped=0
run ucx_external_events capi/tests/c/ucx_external_events.c "$ucx_flags" \
    UCX_MEM_MALLOC_HOOKS=no UCX_MEM_MMAP_HOOK_MODE=none
run fi_import_monitor capi/tests/c/fi_import_monitor.c "$fab_flags"
run use_from_c capi/examples/use_from_c.c ""
echo "capi-c: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
