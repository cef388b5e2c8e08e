#!/usr/bin/env bash
# Connection set-up through rdma_cm (librdmacm, /dev/infiniband/rdma_cm) works on rxe0: ib_send_lat -R.
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
require_guest
out=$(test_out rdma_cm_lat)
dev=${RSMSG_RDMA_DEVICE:-rxe0}

perftest_lat_pair "$out/server.log" "$out/client.log" 18525 ib_send_lat -d "$dev" -R -s 64 -n 100
grep -q 'rdma_cm QPs.*ON' "$out/client.log" || fail "the client did not use rdma_cm"
assert_lat_table "$out/client.log" 64
tail -n 3 "$out/client.log"
echo "rdma_cm_lat: rdma_cm connection and latency table"
