#!/usr/bin/env bash
# The guest's RDMA device is what the verbs tests expect: rxe0, port ACTIVE, a RoCE v2 GID for the node's IPv4
# address at RSMSG_RDMA_GID_INDEX, and the writable places the tests use.
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
require_guest
out=$(test_out rxe_device)
dev=${RSMSG_RDMA_DEVICE:-rxe0}
gid=${RSMSG_RDMA_GID_INDEX:-1}

ibv_devices >"$out/ibv_devices.txt" 2>&1 || fail "ibv_devices failed"
grep -qw "$dev" "$out/ibv_devices.txt" || fail "ibv_devices does not list $dev"
ibv_devinfo -v -d "$dev" >"$out/ibv_devinfo.txt" 2>&1 || fail "ibv_devinfo -d $dev failed"
grep -q 'state:.*PORT_ACTIVE' "$out/ibv_devinfo.txt" || fail "$dev port is not PORT_ACTIVE"
grep -q 'link_layer:.*Ethernet' "$out/ibv_devinfo.txt" || fail "$dev link layer is not Ethernet"
grep -Eq "GID\[ *$gid\]:.*::ffff:$RSMSG_NODE_ADDR, RoCE v2" "$out/ibv_devinfo.txt" ||
    fail "GID[$gid] is not ::ffff:$RSMSG_NODE_ADDR RoCE v2: $(grep GID "$out/ibv_devinfo.txt")"
rdma link show "$dev/1" | grep -q 'state ACTIVE' || fail "rdma link show: $dev/1 not ACTIVE"
[[ -c /dev/infiniband/uverbs0 ]] || fail "no /dev/infiniband/uverbs0"
[[ -c /dev/infiniband/rdma_cm ]] || fail "no /dev/infiniband/rdma_cm (rdma_ucm not loaded)"

echo probe >/dev/shm/rsmsg-probe && rm /dev/shm/rsmsg-probe || fail "/dev/shm is not writable"
echo probe >"${TMPDIR:-/tmp}/rsmsg-probe" && rm "${TMPDIR:-/tmp}/rsmsg-probe" || fail "/tmp is not writable"
[[ -d $HOME && -w $HOME ]] || fail "HOME=$HOME is not a writable directory"
[[ $RSMSG_NODES -ge 1 && $RSMSG_NODE -lt $RSMSG_NODES ]] || fail "RSMSG_NODE=$RSMSG_NODE RSMSG_NODES=$RSMSG_NODES"
grep -E 'hca_id|state|GID' "$out/ibv_devinfo.txt"
echo "rxe_device: $dev ACTIVE with a RoCE v2 GID for $RSMSG_NODE_ADDR"
