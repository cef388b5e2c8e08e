#!/usr/bin/env bash
# vm-run: --nodes 2
# Two guests, each with its own rxe0 on its eth0: node 0 serves, node 1 connects to it over the virtual Ethernet
# segment; ib_write_lat and ib_write_bw tables appear on both sides. (TCG makes the figures meaningless: this checks
# function only: every run must succeed, and each side must print a table with usable figures in at least one round.)
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
require_guest
[[ $RSMSG_NODES == 2 && -n ${RSMSG_PEER_ADDR:-} ]] || fail "needs rdma-setup/vm-run --nodes 2"
out=$(test_out two_node_perftest)
dev=${RSMSG_RDMA_DEVICE:-rxe0}
gid=${RSMSG_RDMA_GID_INDEX:-1}
# perftest converts cycles with a CPU frequency it measures at start; under TCG that sometimes comes out as zero and a
# side prints `inf` (see perftest_lat_pair in _lib.sh). The two sides are in different guests and cannot agree on a
# repeat, so both always run three rounds (ports 18535-18540) and each side needs one round with finite figures.
rounds=3
for r in $(seq 0 $((rounds - 1))); do
    lat=(ib_write_lat -d "$dev" -x "$gid" -s 64 -n 20 -p $((18535 + 2 * r)))
    bw=(ib_write_bw -d "$dev" -x "$gid" -s 65536 -n 20 -p $((18536 + 2 * r)))
    if [[ $RSMSG_NODE == 0 ]]; then
        perftest_server "$out/lat-$r.log" "${lat[@]}"
        wait "$SERVER_PID" || { cat "$out/lat-$r.log" >&2; fail "ib_write_lat server failed"; }
        perftest_server "$out/bw-$r.log" "${bw[@]}"
        wait "$SERVER_PID" || { cat "$out/bw-$r.log" >&2; fail "ib_write_bw server failed"; }
    else
        perftest_client "$out/lat-$r.log" "$RSMSG_PEER_ADDR" "${lat[@]}" || fail "ib_write_lat client failed"
        perftest_client "$out/bw-$r.log" "$RSMSG_PEER_ADDR" "${bw[@]}" || fail "ib_write_bw client failed"
    fi
done
# bw_positive LOG: its 65536-byte row has an average above zero.
bw_positive() { awk '$1 == 65536 && NF >= 4 && $4 ~ /^[0-9.]+$/ && $4 + 0 > 0 { ok = 1 } END { exit !ok }' "$1"; }
role=$( ((RSMSG_NODE == 0)) && echo server || echo client)
lat_ok='' bw_ok=''
for r in $(seq 0 $((rounds - 1))); do
    if [[ -z $lat_ok ]] && perftest_finite "$out/lat-$r.log"; then lat_ok=$out/lat-$r.log; fi
    if [[ -z $bw_ok ]] && perftest_finite "$out/bw-$r.log" && bw_positive "$out/bw-$r.log"; then bw_ok=$out/bw-$r.log; fi
    perftest_finite "$out/lat-$r.log" && perftest_finite "$out/bw-$r.log" && bw_positive "$out/bw-$r.log" ||
        echo "two_node_perftest: $role round $r printed inf, nan or a zero bandwidth (perftest measured its CPU frequency as zero)" >&2
done
[[ -n $lat_ok ]] || { cat "$out"/lat-*.log >&2; fail "ib_write_lat $role printed inf in all $rounds rounds"; }
[[ -n $bw_ok ]] || { cat "$out"/bw-*.log >&2; fail "ib_write_bw $role printed no usable figure in $rounds rounds"; }
if [[ $RSMSG_NODE == 0 ]]; then
    grep -q "GID: .*255:255:10:77:00:0$((RSMSG_NODE + 1))" "$lat_ok" || fail "server's GID is not its own"
fi
assert_lat_table "$lat_ok" 64
assert_bw_table "$bw_ok" 65536
cat "$lat_ok" "$bw_ok"
echo "two_node_perftest: node $RSMSG_NODE done"
