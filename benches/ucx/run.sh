#!/usr/bin/env bash
# UCX 1.13 side of the registration-cache parity comparison
# (shared/bench/rcache-parity.md). Usage: bash benches/ucx/run.sh [RUNS]
# Installs Debian's libucx-dev if its rcache header is missing, builds
# ucx_rcache_parity.c with gcc -O2 against it, runs it RUNS times (default 3)
# at nice 10, printing the load average before each run.
# Profiling: UCX_PARITY_ONLY=hit|miss|misaligned|cycle|unmap runs one group;
# under valgrind set UCX_PARITY_EXTERNAL_EVENTS=1 (libucm hooks cannot install).
set -euo pipefail

runs=${1:-3}
here=$(cd "$(dirname "$0")" && pwd)
out=${UCX_PARITY_BIN:-/tmp/ucx_rcache_parity}

if [ ! -f /usr/include/ucs/memory/rcache.h ]; then
    apt-get update
    apt-get install -y libucx-dev
fi

if pkg-config --exists ucx-ucs 2>/dev/null; then
    flags=$(pkg-config --cflags --libs ucx-ucs)
    ver=$(pkg-config --modversion ucx-ucs)
else
    flags="-lucs -lucm"
    ver=$(dpkg-query -W -f='${Version}' libucx-dev 2>/dev/null || echo unknown)
fi

nice -n 10 gcc -O2 -Wall -Wextra -o "$out" "$here/ucx_rcache_parity.c" \
    -DUCX_PKG_VERSION="\"$ver\"" $flags

for i in $(seq 1 "$runs"); do
    # The load average is sampled every 5 s: wait so each run gets its own.
    [ "$i" -gt 1 ] && sleep 6
    echo "# run $i/$runs, $(uptime | sed 's/.*load average/load average/')"
    nice -n 10 "$out"
done
