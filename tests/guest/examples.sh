#!/usr/bin/env bash
# The examples over verbs: a bootstrap manager (`rsmsg manager`), then `ping_pong both` (a server child process and a
# client) and `fan_in both` (a server and four client processes) with RSMSG_TRANSPORT=verbs, which forces verbs
# between processes of one host. Checks that every connection went over verbs and every message was verified.
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
require_guest
out=$(test_out examples)
repo=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
[[ $target == /* ]] || target=$repo/$target
bin=${RSMSG_BIN:-$target/debug/rsmsg}
examples=$target/debug/examples
[[ -x $bin ]] || fail "no rsmsg executable at $bin (cargo build first)"
for e in ping_pong fan_in; do
    [[ -x $examples/$e ]] || fail "no example executable $examples/$e (cargo test --no-run or cargo build --examples)"
done
port=18700
export RSMSG_TOKEN=examples-guest-test-token
export RSMSG_MANAGER=127.0.0.1:$port
export RSMSG_TRANSPORT=verbs
export RSMSG_DEVICE=${RSMSG_RDMA_DEVICE:-rxe0}
export RSMSG_GID_INDEX=${RSMSG_RDMA_GID_INDEX:-1}
export RSMSG_SHM_DIR=$out/shm

timeout 600 "$bin" manager --listen "$RSMSG_MANAGER" >"$out/manager.log" 2>&1 &
mgr=$!
trap 'kill $mgr 2>/dev/null || true' EXIT
for _ in $(seq 120); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    kill -0 "$mgr" 2>/dev/null || { cat "$out/manager.log" >&2; fail "the manager exited"; }
    sleep 0.5
done

timeout 300 "$examples/ping_pong" both ex-ping-pong --count 200 --size 1000 >"$out/ping_pong.log" 2>&1 ||
    { cat "$out/ping_pong.log" >&2; fail "ping_pong failed"; }
cat "$out/ping_pong.log"
grep -q '^ping_pong: 200 round trips of 1000 bytes over verbs to ex-ping-pong' "$out/ping_pong.log" ||
    fail "ping_pong did not run 200 round trips over verbs"
grep -q '^ping_pong: ok$' "$out/ping_pong.log" || fail "ping_pong did not finish"
grep -q 'accepted-verbs-1, verbs) left after 200 messages' "$out/ping_pong.log" ||
    fail "the ping_pong server did not see its client over verbs"

timeout 300 "$examples/fan_in" both ex-fan-in --clients 4 --count 50 >"$out/fan_in.log" 2>&1 ||
    { cat "$out/fan_in.log" >&2; fail "fan_in failed"; }
cat "$out/fan_in.log"
for k in 0 1 2 3; do
    n=$(grep -c ", verbs): client $k sent 50 messages" "$out/fan_in.log" || true)
    ((n == 1)) || fail "fan_in: client $k reported $n times over verbs, expected once"
done
grep -q '^fan_in: 4 clients x 50 messages verified' "$out/fan_in.log" || fail "fan_in did not verify everything"
grep -q '^fan_in: ok$' "$out/fan_in.log" || fail "fan_in did not finish"
echo "examples: ping_pong and fan_in over verbs ok"
