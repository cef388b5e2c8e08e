#!/usr/bin/env bash
# ib_write_lat server and client in one guest, both on rxe0 (RoCE v2, GID index 1): a latency table appears on both.
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
require_guest
out=$(test_out perftest_lat)
dev=${RSMSG_RDMA_DEVICE:-rxe0}
gid=${RSMSG_RDMA_GID_INDEX:-1}

perftest_lat_pair "$out/server.log" "$out/client.log" 18515 ib_write_lat -d "$dev" -x "$gid" -s 64 -n 200
cat "$out/client.log"
assert_lat_table "$out/client.log" 64
assert_lat_table "$out/server.log" 64
echo "perftest_lat: latency table on server and client"
