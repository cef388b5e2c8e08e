#!/usr/bin/env bash
# ib_write_lat server and client in one guest, both on rxe0 (RoCE v2, GID index 1): a latency table appears on both.
# perftest converts cycles to microseconds with a CPU frequency it measures at start; under TCG that measurement
# sometimes comes out as zero and a side prints `inf` for every figure. Such a run is repeated, up to three times,
# and says so; any other failure, or three such runs, fails the test.
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
require_guest
out=$(test_out perftest_lat)
dev=${RSMSG_RDMA_DEVICE:-rxe0}
gid=${RSMSG_RDMA_GID_INDEX:-1}

for try in 1 2 3; do
    port=$((18514 + try))
    perftest_server "$out/server.log" ib_write_lat -d "$dev" -x "$gid" -s 64 -n 200 -p "$port"
    perftest_client "$out/client.log" "$RSMSG_NODE_ADDR" ib_write_lat -d "$dev" -x "$gid" -s 64 -n 200 -p "$port" ||
        fail "ib_write_lat client failed"
    wait "$SERVER_PID" || { cat "$out/server.log" >&2; fail "ib_write_lat server failed"; }
    grep -Eq '^ *64 +[0-9]+ +inf ' "$out/client.log" "$out/server.log" || break
    echo "perftest_lat: run $try printed inf (perftest's CPU frequency measured as zero); repeating" >&2
    ((try < 3)) || { cat "$out/server.log" >&2; fail "ib_write_lat printed inf in three runs"; }
done
cat "$out/client.log"
assert_lat_table "$out/client.log" 64
assert_lat_table "$out/server.log" 64
echo "perftest_lat: latency table on server and client"
