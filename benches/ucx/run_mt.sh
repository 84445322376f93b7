#!/usr/bin/env bash
# UCX 1.13 side of the multi-threaded hit workload (docs/BENCHMARKS.md,
# "Multi-threaded hits"). Usage: bash benches/ucx/run_mt.sh [--threads 1,2,4]
# Installs Debian's libucx-dev if its rcache header is missing, builds
# ucx_rcache_mt.c with gcc -O2 -pthread against it and runs it once at
# nice 10 for each listed thread count (default 1,2), printing
# `mt_hit_getput_r4096 VALUE Mops` and `mt_hit_getput_r1 VALUE Mops`.
# MT_OPS=n overrides the ops per thread per timed loop (default 1,000,000).
set -euo pipefail

threads=1,2
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) threads=${2:?--threads needs a list such as 1,2,4}; shift 2 ;;
        --threads=*) threads=${1#--threads=}; shift ;;
        *) echo "usage: $0 [--threads N[,N...]]" >&2; exit 2 ;;
    esac
done
here=$(cd "$(dirname "$0")" && pwd)
out=${UCX_MT_BIN:-/tmp/ucx_rcache_mt}

if [ ! -f /usr/include/ucs/memory/rcache.h ]; then
    apt-get update
    apt-get install -y libucx-dev
fi

if pkg-config --exists ucx-ucs 2>/dev/null; then
    flags=$(pkg-config --cflags --libs ucx-ucs)
else
    flags="-lucs -lucm"
fi

nice -n 10 gcc -O2 -Wall -Wextra -pthread -o "$out" "$here/ucx_rcache_mt.c" $flags
echo "# $(nproc) CPUs, $(uptime | sed 's/.*load average/load average/')"
nice -n 10 "$out" "$threads"
