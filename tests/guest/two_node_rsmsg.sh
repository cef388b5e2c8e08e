#!/usr/bin/env bash
# vm-run: --nodes 2
# Two guests, each with its own rxe0: node 0 runs the bootstrap manager (`rsmsg manager`) and an rsmsg perf server
# over verbs; node 1 connects through the manager (`rsmsg perf --transport verbs --client`) and runs latency,
# bandwidth and rate tests with sizes in every segment group. Checks the tables, the JSON counts and that both ends exit cleanly.
# (TCG and the socket network make the figures meaningless: this checks function only.)
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
require_guest
[[ $RSMSG_NODES == 2 && -n ${RSMSG_PEER_ADDR:-} ]] || fail "needs rdma-setup/vm-run --nodes 2"
out=$(test_out two_node_rsmsg)
repo=$(cd "$(dirname "$0")/../.." && pwd)
bin=${RSMSG_BIN:-$repo/target/debug/rsmsg}
[[ -x $bin ]] || fail "no rsmsg executable at $bin (cargo build first)"
export RSMSG_TOKEN=two-node-rsmsg-test-token
export RSMSG_DEVICE=${RSMSG_RDMA_DEVICE:-rxe0}
export RSMSG_GID_INDEX=${RSMSG_RDMA_GID_INDEX:-1}
port=18600
name=two-node-perf

if [[ $RSMSG_NODE == 0 ]]; then
    timeout 600 "$bin" manager --listen "$RSMSG_NODE_ADDR:$port" >"$out/manager.log" 2>&1 &
    mgr=$!
    # Start the server only once the manager accepts connections (it may take a moment under TCG).
    for _ in $(seq 120); do
        (exec 3<>"/dev/tcp/$RSMSG_NODE_ADDR/$port") 2>/dev/null && break
        kill -0 "$mgr" 2>/dev/null || { cat "$out/manager.log" >&2; fail "the manager exited"; }
        sleep 0.5
    done
    timeout 600 "$bin" perf --transport verbs --server --once --manager "$RSMSG_NODE_ADDR:$port" --name "$name" \
        >"$out/server.log" 2>&1 || { cat "$out/server.log" "$out/manager.log" >&2; kill "$mgr"; fail "server failed"; }
    kill "$mgr" 2>/dev/null || true
    wait "$mgr" 2>/dev/null || true
    grep -qx listening "$out/server.log" || fail "the server never listened"
    cat "$out/server.log"
else
    # The manager and the server on node 0 may not be up yet: the client retries for up to about 2 minutes.
    ok=0
    for _ in $(seq 4); do
        if timeout 300 "$bin" perf --transport verbs --client --manager "$RSMSG_PEER_ADDR:$port" --name "$name" \
            --test all -s 8,64,4k,64k -n 50 >"$out/lat.log" 2>&1; then
            ok=1
            break
        fi
        grep -q 'connecting to' "$out/lat.log" || break
        sleep 2
    done
    ((ok)) || { cat "$out/lat.log" >&2; fail "client failed"; }
    cat "$out/lat.log"
    grep -q 't_median' "$out/lat.log" || fail "no latency table"
    grep -q 'BW avg' "$out/lat.log" || fail "no bandwidth table"
    for s in 8 64 4096 65536; do
        # lat, bw and rate: three rows per size, each with 50 iterations and two figures
        rows=$(grep -Ec "^ *$s +50 +[0-9.]+ +[0-9.]+" "$out/lat.log" || true)
        ((rows == 3)) || fail "$rows result rows for $s bytes, expected 3 (lat, bw, rate)"
    done
fi
echo "two_node_rsmsg: node $RSMSG_NODE done"
