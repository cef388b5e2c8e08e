#!/usr/bin/env bash
# The C all-to-all example (examples/c/alltoall.c, built by ci/stages/30-capi into TARGET/capi-bin) over verbs in
# one guest: 4 ranks started as a PMI launcher would (PMI_RANK/PMI_SIZE), RSMSG_TRANSPORT=verbs, rank 0 embedding
# the bootstrap manager (RSMSG_EMBED_MANAGER=1). Every message is checked by the example; each rank must report
# all of them.
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
require_guest
out=$(test_out capi_verbs)
repo=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
exe=$target/capi-bin/alltoall
[[ -x $exe ]] || fail "no $exe: run ci/stages/30-capi first"
export RSMSG_TRANSPORT=verbs RSMSG_EMBED_MANAGER=1 RSMSG_TOKEN=capi-verbs-guest-token
export RSMSG_MANAGER=127.0.0.1:18700 RSMSG_JOB=capi-verbs RSMSG_SHM_DIR=$out/sock
export RSMSG_DEVICE=${RSMSG_RDMA_DEVICE:-rxe0} RSMSG_GID_INDEX=${RSMSG_RDMA_GID_INDEX:-1}
rounds=8 n=4
pids=()
for ((r = 0; r < n; r++)); do
    PMI_RANK=$r PMI_SIZE=$n timeout 300 "$exe" $rounds >"$out/rank$r.log" 2>&1 &
    pids+=($!)
done
st=0
for p in "${pids[@]}"; do wait "$p" || st=1; done
for ((r = 0; r < n; r++)); do
    grep -q "^alltoall rank $r of $n: $((rounds * (n - 1))) messages checked" "$out/rank$r.log" || {
        cat "$out"/rank*.log >&2
        fail "rank $r did not check all its messages"
    }
done
((st == 0)) || { cat "$out"/rank*.log >&2; fail "a rank exited with an error"; }
echo "capi_verbs: $n ranks over verbs, $((n * rounds * (n - 1))) messages checked"
