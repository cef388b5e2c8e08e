#!/usr/bin/env bash
# In one guest, on rxe0: ib_write_lat (64 B, server and client) and `rsmsg perf --transport verbs --test lat` (64 B,
# local mode: an embedded manager and a server process), then both medians of the one-way latency and their ratio
# rsmsg/ib_write_lat. Under TCG only the ratio means something; no time limit is asserted.
# N (default 2000) sets the iterations of both; RSMSG_BIN picks the rsmsg executable (default: target/release/rsmsg
# when it is at least as new as target/debug/rsmsg, else target/debug/rsmsg).
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
require_guest
out=$(test_out perf_vs_ib_write_lat)
repo=$(cd "$(dirname "$0")/../.." && pwd)
dev=${RSMSG_RDMA_DEVICE:-rxe0}
gid=${RSMSG_RDMA_GID_INDEX:-1}
n=${N:-2000}
bin=${RSMSG_BIN:-}
if [[ -z $bin ]]; then
    bin=$repo/target/debug/rsmsg
    rel=$repo/target/release/rsmsg
    [[ -x $rel && ! $rel -ot $bin ]] && bin=$rel
fi
[[ -x $bin ]] || fail "no rsmsg executable at $bin (cargo build first)"

perftest_lat_pair "$out/ib-server.log" "$out/ib-client.log" 18545 ib_write_lat -d "$dev" -x "$gid" -s 64 -n "$n"
assert_lat_table "$out/ib-client.log" 64
# perftest's columns: #bytes #iterations t_min t_max t_typical (the median) t_avg ...
ib=$(awk '$1 == 64 && NF >= 6 { print $5; exit }' "$out/ib-client.log")
ib_min=$(awk '$1 == 64 && NF >= 6 { print $3; exit }' "$out/ib-client.log")

RSMSG_DEVICE=$dev RSMSG_GID_INDEX=$gid timeout 600 "$bin" perf --transport verbs --test lat -s 64 -n "$n" \
    >"$out/rsmsg.log" 2>&1 || { cat "$out/rsmsg.log" >&2; fail "rsmsg perf failed"; }
# rsmsg perf's columns: #bytes #iters t_min t_median t_avg ... (one-way, as perftest's)
rs=$(awk '$1 == 64 && NF >= 8 { print $4; exit }' "$out/rsmsg.log")
rs_min=$(awk '$1 == 64 && NF >= 8 { print $3; exit }' "$out/rsmsg.log")

cat "$out/ib-client.log" "$out/rsmsg.log"
[[ $ib =~ ^[0-9.]+$ && $rs =~ ^[0-9.]+$ ]] || fail "medians not found (ib_write_lat: '$ib', rsmsg: '$rs')"
awk -v a="$ib" -v b="$rs" 'BEGIN { exit !(a > 0 && b > 0) }' || fail "a median is zero"
ratio=$(awk -v a="$ib" -v b="$rs" 'BEGIN { printf "%.2f", b / a }')
ratio_min=$(awk -v a="$ib_min" -v b="$rs_min" 'BEGIN { if (a > 0) printf "%.2f", b / a; else print "n/a" }')
{
    echo "# one-way latency, 64 B, $n iterations, $dev (GID index $gid), same guest run; rsmsg: $bin"
    printf '%-28s %12s %12s\n' "tool" "median[us]" "min[us]"
    printf '%-28s %12s %12s\n' "ib_write_lat" "$ib" "$ib_min"
    printf '%-28s %12s %12s\n' "rsmsg perf --transport verbs" "$rs" "$rs_min"
    echo "ratio rsmsg/ib_write_lat: $ratio (median), $ratio_min (min)"
} | tee "$out/summary.txt"
