#!/usr/bin/env bash
# vm-run: --nodes 2
# Two guests, each with its own rxe0 on its eth0: node 0 serves, node 1 connects to it over the virtual Ethernet
# segment; ib_write_lat and ib_write_bw tables appear on both sides. (TCG makes the figures meaningless: this checks
# function only.)
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
require_guest
[[ $RSMSG_NODES == 2 && -n ${RSMSG_PEER_ADDR:-} ]] || fail "needs rdma-setup/vm-run --nodes 2"
out=$(test_out two_node_perftest)
dev=${RSMSG_RDMA_DEVICE:-rxe0}
gid=${RSMSG_RDMA_GID_INDEX:-1}
lat=(ib_write_lat -d "$dev" -x "$gid" -s 64 -n 20 -p 18535)
bw=(ib_write_bw -d "$dev" -x "$gid" -s 65536 -n 20 -p 18536)

if [[ $RSMSG_NODE == 0 ]]; then
    perftest_server "$out/lat-server.log" "${lat[@]}"
    wait "$SERVER_PID" || { cat "$out/lat-server.log" >&2; fail "ib_write_lat server failed"; }
    perftest_server "$out/bw-server.log" "${bw[@]}"
    wait "$SERVER_PID" || { cat "$out/bw-server.log" >&2; fail "ib_write_bw server failed"; }
    grep -q "GID: .*255:255:10:77:00:0$((RSMSG_NODE + 1))" "$out/lat-server.log" || fail "server's GID is not its own"
    assert_lat_table "$out/lat-server.log" 64
    assert_bw_table "$out/bw-server.log" 65536
    cat "$out/lat-server.log" "$out/bw-server.log"
else
    perftest_client "$out/lat-client.log" "$RSMSG_PEER_ADDR" "${lat[@]}" || fail "ib_write_lat client failed"
    perftest_client "$out/bw-client.log" "$RSMSG_PEER_ADDR" "${bw[@]}" || fail "ib_write_bw client failed"
    assert_lat_table "$out/lat-client.log" 64
    assert_bw_table "$out/bw-client.log" 65536
    cat "$out/lat-client.log" "$out/bw-client.log"
fi
echo "two_node_perftest: node $RSMSG_NODE done"
