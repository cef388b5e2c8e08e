#!/usr/bin/env bash
# vm-run: --nodes 1
# rdma-setup/rxe-up and rxe-down on a kernel that loads modules (the guest's): idempotent up, refusal to move rxe0
# to another netdev, down, idempotent down, up again with the port ACTIVE. Runs in its own guest since it removes
# rxe0 for a while.
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
require_guest
dev=$(rdma link show rxe0/1 | sed -n 's/.* netdev \([^ ]*\).*/\1/p')
[[ -n $dev ]] || fail "cannot tell which netdev rxe0 is on"
other=lo
[[ $dev != "$other" ]] || other=veth1

rdma-setup/rxe-up "$dev" || fail "rxe-up $dev on an existing rxe0 on $dev should succeed"
if rdma-setup/rxe-up "$other" 2>/dev/null; then fail "rxe-up $other should refuse: rxe0 is on $dev"; fi
rdma-setup/rxe-down || fail "rxe-down failed"
[[ ! -e /sys/class/infiniband/rxe0 ]] || fail "rxe0 still present after rxe-down"
rdma-setup/rxe-down || fail "a second rxe-down should succeed"
rdma-setup/rxe-up "$dev" || fail "rxe-up $dev failed"
grep -q ACTIVE /sys/class/infiniband/rxe0/ports/1/state || fail "rxe0 not ACTIVE after rxe-up"
ibv_devinfo -d rxe0 | grep -q PORT_ACTIVE || fail "ibv_devinfo: rxe0 not PORT_ACTIVE after rxe-up"
echo "rxe_up_down: rxe-up/rxe-down behave on $dev"
