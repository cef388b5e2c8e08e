#!/usr/bin/env bash
# vm-run: --nodes 1
# The RDMA device pulled from under live verbs traffic (an rsmsg perf bandwidth run between two processes of this
# guest), two ways:
# 1. `rdma link delete rxe0` (what rdma-setup/rxe-down does). Soft-RoCE cannot disassociate open user contexts, so the
#    kernel defers the removal until the processes close the device: the run must complete intact (exit 0, nothing
#    lost), the removal must then complete, and nothing may hang.
# 2. The netdev under rxe0 set down for the rest of the run: a side's next send usually fails at once (local QP
#    operation error); when Soft-RoCE leaves a side's sends neither completed nor failed instead, the stall limit
#    (RSMSG_STALL_TIMEOUT, docs/verbs.md) ends its wait. Both sides must end with a clear error (not success) within
#    their timeout (no hang).
# rxe0 is restored after each. Runs in its own guest since it removes rxe0.
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
require_guest
out=$(test_out fault_link_delete)
repo=$(cd "$(dirname "$0")/../.." && pwd)
bin=${RSMSG_BIN:-$repo/target/debug/rsmsg}
[[ -x $bin ]] || fail "no rsmsg executable at $bin (cargo build first)"
dev=$(rdma link show rxe0/1 | sed -n 's/.* netdev \([^ ]*\).*/\1/p')
[[ -n $dev ]] || fail "cannot tell which netdev rxe0 is on"
export RSMSG_TOKEN=fault-link-delete-token
export RSMSG_DEVICE=${RSMSG_RDMA_DEVICE:-rxe0}
export RSMSG_GID_INDEX=${RSMSG_RDMA_GID_INDEX:-1}
port=18700

timeout 900 "$bin" manager --listen "127.0.0.1:$port" >"$out/manager.log" 2>&1 &
mgr=$!
trap 'kill $mgr 2>/dev/null || true' EXIT
for _ in $(seq 120); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.5
done

# start_pair TAG: a server and a 30 s one-way stream client; sets SERVER and CLIENT.
start_pair() {
    local tag=$1
    timeout 300 "$bin" perf --transport verbs --server --once --manager "127.0.0.1:$port" --name "$tag" \
        >"$out/$tag-server.log" 2>&1 &
    SERVER=$!
    for _ in $(seq 120); do
        grep -qx listening "$out/$tag-server.log" 2>/dev/null && break
        kill -0 "$SERVER" 2>/dev/null || { cat "$out/$tag-server.log" >&2; fail "$tag: server exited early"; }
        sleep 0.5
    done
    timeout 300 "$bin" perf --transport verbs --client --manager "127.0.0.1:$port" --name "$tag" -t bw -s 4k -D 30 \
        >"$out/$tag-client.log" 2>&1 &
    CLIENT=$!
    sleep 8
    kill -0 "$CLIENT" 2>/dev/null || { cat "$out/$tag-client.log" >&2; fail "$tag: client ended before the fault"; }
}

restore() {
    ip link set "$dev" up
    [[ -e /sys/class/infiniband/rxe0 ]] || rdma-setup/rxe-up "$dev" >/dev/null || fail "could not restore rxe0"
    for _ in $(seq 60); do
        grep -q ACTIVE /sys/class/infiniband/rxe0/ports/1/state && return 0
        sleep 0.5
    done
    fail "rxe0 not ACTIVE again"
}

# ---- 1. rdma link delete
start_pair delete
echo "fault_link_delete: rdma link delete rxe0 under traffic"
timeout 200 rdma link delete rxe0 >"$out/delete.log" 2>&1 &
deleter=$!
set +e
wait "$CLIENT"
client_rc=$?
client_end=$(date +%s.%N)
wait "$SERVER"
server_rc=$?
wait "$deleter"
delete_rc=$?
delete_end=$(date +%s.%N)
set -e
echo "delete: client exit $client_rc, server exit $server_rc, link delete exit $delete_rc"
tail -n 2 "$out/delete-client.log"
((client_rc != 124 && server_rc != 124 && delete_rc != 124)) || fail "delete: something hung until its timeout"
((client_rc == 0 && server_rc == 0)) || { cat "$out/delete-client.log" "$out/delete-server.log" >&2; fail "delete: the run did not complete"; }
((delete_rc == 0)) || fail "delete: rdma link delete failed"
[[ ! -e /sys/class/infiniband/rxe0 ]] || fail "delete: rxe0 still there"
awk -v c="$client_end" -v d="$delete_end" 'BEGIN { exit !(d >= c) }' || fail "delete: the device went before the run ended"
restore

# ---- 2. netdev down
start_pair down
echo "fault_link_delete: ip link set $dev down under traffic"
ip link set "$dev" down
set +e
wait "$CLIENT"
client_rc=$?
wait "$SERVER"
server_rc=$?
set -e
echo "down: client exit $client_rc, server exit $server_rc"
tail -n 1 "$out/down-client.log" "$out/down-server.log"
restore
((client_rc != 124 && server_rc != 124)) || fail "down: a side hung until its timeout"
# Both sides end with a clear error (a failed send, or the stall limit), neither reports success.
((client_rc != 0 && server_rc != 0)) || fail "down: a side reported success although the link was down for 20 s"
grep -q 'rsmsg: error:' "$out/down-client.log" || fail "down: the client failed without an error message"
grep -q 'rsmsg: error:' "$out/down-server.log" || fail "down: the server failed without an error message"
echo "fault_link_delete: deferred removal leaves the run intact; link down gives a clear error on both sides; no hang"
