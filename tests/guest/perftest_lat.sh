#!/usr/bin/env bash
# ib_write_lat server and client in one guest, both on rxe0 (RoCE v2, GID index 1): a latency table appears on both.
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
require_guest
out=$(test_out perftest_lat)
dev=${RSMSG_RDMA_DEVICE:-rxe0}
gid=${RSMSG_RDMA_GID_INDEX:-1}

perftest_server "$out/server.log" ib_write_lat -d "$dev" -x "$gid" -s 64 -n 200 -p 18515
perftest_client "$out/client.log" "$RSMSG_NODE_ADDR" ib_write_lat -d "$dev" -x "$gid" -s 64 -n 200 -p 18515 ||
    fail "ib_write_lat client failed"
wait "$SERVER_PID" || { cat "$out/server.log" >&2; fail "ib_write_lat server failed"; }
cat "$out/client.log"
assert_lat_table "$out/client.log" 64
assert_lat_table "$out/server.log" 64
echo "perftest_lat: latency table on server and client"
