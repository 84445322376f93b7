#!/usr/bin/env bash
# Cost per munmap of a cached region, UCX told by our monitor vs by UCX's
# own mmap hooks, side by side in one run (capi/benches/c/ucx_munmap_cost.c).
# Usage: bash capi/benches/ucx_munmap.sh [RUNS]   (needs libucx-dev; builds libnotifier)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
runs=${1:-3}
cargo build --release -p notifier-capi
out="$root/target/capi"
mkdir -p "$out"
gcc -O2 -Wall -Wextra -Icapi/include capi/benches/c/ucx_munmap_cost.c -o "$out/ucx_munmap_cost" \
    -Ltarget/release -lnotifier -Wl,-rpath,"$root/target/release" \
    $(pkg-config --cflags --libs ucx-ucs 2>/dev/null || echo "-lucs -lucm")
for i in $(seq 1 "$runs"); do
    echo "# run $i/$runs, $(uptime | sed 's/.*load average/load average/')"
    UCX_MEM_MALLOC_HOOKS=no UCX_MEM_MMAP_HOOK_MODE=none "$out/ucx_munmap_cost" ours
    "$out/ucx_munmap_cost" ucx
done
