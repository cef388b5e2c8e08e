#!/usr/bin/env bash
# vm-run: --nodes 1
# The RDMA device removed under live traffic (`rdma link delete rxe0`, what rdma-setup/rxe-down does): an rsmsg perf
# bandwidth run over verbs between two processes of this guest must end with a clear error on both sides, not hang
# and not report success; rxe0 is then restored. Runs in its own guest since it removes rxe0.
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
# Fail over in about a second once the device is gone (4.096 us * 2^18 per try).
export RSMSG_QP_TIMEOUT=18
port=18700
name=fault-link

timeout 600 "$bin" manager --listen "127.0.0.1:$port" >"$out/manager.log" 2>&1 &
mgr=$!
for _ in $(seq 120); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.5
done
timeout 300 "$bin" perf --transport verbs --server --once --manager "127.0.0.1:$port" --name "$name" \
    >"$out/server.log" 2>&1 &
server=$!
for _ in $(seq 120); do
    grep -qx listening "$out/server.log" 2>/dev/null && break
    kill -0 "$server" 2>/dev/null || { cat "$out/server.log" >&2; fail "the server exited before listening"; }
    sleep 0.5
done
# A long one-way stream, so that the device goes away mid-run.
timeout 300 "$bin" perf --transport verbs --client --manager "127.0.0.1:$port" --name "$name" -t bw -s 4k -D 120 \
    >"$out/client.log" 2>&1 &
client=$!
sleep 10
kill -0 "$client" 2>/dev/null || { cat "$out/client.log" "$out/server.log" >&2; fail "the client ended before the fault"; }

echo "fault_link_delete: deleting rxe0 under traffic"
t0=$(date +%s)
# With the device's contexts still open, the kernel may wait for them: bounded, and done in the background.
timeout 200 rdma link delete rxe0 >"$out/delete.log" 2>&1 &
deleter=$!
set +e
wait "$client"
client_rc=$?
wait "$server"
server_rc=$?
wait "$deleter"
delete_rc=$?
set -e
t1=$(date +%s)
kill "$mgr" 2>/dev/null || true
wait "$mgr" 2>/dev/null || true
echo "fault_link_delete: client exit $client_rc, server exit $server_rc, link delete exit $delete_rc, $((t1 - t0)) s"
echo "---- client ----"; tail -5 "$out/client.log"
echo "---- server ----"; tail -5 "$out/server.log"
# Restore rxe0 for whatever runs next in this guest.
[[ -e /sys/class/infiniband/rxe0 ]] || rdma-setup/rxe-up "$dev" || fail "could not restore rxe0"

((client_rc != 124 && server_rc != 124)) || fail "a side hung until its timeout after the device went away"
((delete_rc != 124)) || fail "rdma link delete hung while rsmsg held the device"
((client_rc != 0)) || fail "the client reported success although the device went away mid-run"
grep -q 'rsmsg: error:' "$out/client.log" || fail "the client's failure carries no error message"
echo "fault_link_delete: clear error, no hang"
