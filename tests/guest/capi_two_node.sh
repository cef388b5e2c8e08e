#!/usr/bin/env bash
# vm-run: --nodes 2
# The C all-to-all example across two guests over verbs: 4 ranks, two per node (ranks 0-1 on node 0, 2-3 on node 1),
# started as a PMI launcher would, rank 0 embedding the bootstrap manager on node 0's address
# (RSMSG_EMBED_MANAGER=1, RSMSG_MANAGER=node0:port). Needs TARGET/capi-bin from ci/stages/30-capi. Every message is
# checked by the example; each rank must report all of them.
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
require_guest
[[ $RSMSG_NODES == 2 && -n ${RSMSG_PEER_ADDR:-} ]] || fail "needs rdma-setup/vm-run --nodes 2"
out=$(test_out "capi_two_node-$RSMSG_NODE")
repo=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
exe=$target/capi-bin/alltoall
[[ -x $exe ]] || fail "no $exe: run ci/stages/30-capi first"
node0=$RSMSG_NODE_ADDR
[[ $RSMSG_NODE == 0 ]] || node0=$RSMSG_PEER_ADDR
export RSMSG_TRANSPORT=verbs RSMSG_EMBED_MANAGER=1 RSMSG_TOKEN=capi-two-node-token RSMSG_MESH_TIMEOUT=240
export RSMSG_MANAGER=$node0:18710 RSMSG_JOB=capi-two-node RSMSG_SHM_DIR=$out/sock
export RSMSG_DEVICE=${RSMSG_RDMA_DEVICE:-rxe0} RSMSG_GID_INDEX=${RSMSG_RDMA_GID_INDEX:-1}
rounds=6 n=4
first=$((RSMSG_NODE * 2))
pids=()
for r in $first $((first + 1)); do
    PMI_RANK=$r PMI_SIZE=$n timeout 400 "$exe" $rounds >"$out/rank$r.log" 2>&1 &
    pids+=($!)
done
st=0
for p in "${pids[@]}"; do wait "$p" || st=1; done
for r in $first $((first + 1)); do
    grep -q "^alltoall rank $r of $n: $((rounds * (n - 1))) messages checked" "$out/rank$r.log" || {
        cat "$out"/rank*.log >&2
        fail "rank $r did not check all its messages"
    }
done
((st == 0)) || { cat "$out"/rank*.log >&2; fail "a rank exited with an error"; }
echo "capi_two_node: node $RSMSG_NODE: ranks $first and $((first + 1)) checked $((2 * rounds * (n - 1))) messages"
