# Helpers for the guest shell tests (sourced, not a test). The tests run inside a Soft-RoCE guest started by
# rdma-setup/vm-run; see docs/soft-roce.md.

# fail MSG...: print the reason and end the test with a failure.
fail() {
    echo "FAIL: $*" >&2
    exit 1
}

# require_guest: fail unless we are inside a vm-run guest with rxe0.
require_guest() {
    [[ -n ${RSMSG_NODE:-} && -n ${RSMSG_OUT:-} ]] || fail "not inside a vm-run guest: run rdma-setup/vm-run -- $0"
    [[ -e /sys/class/infiniband/${RSMSG_RDMA_DEVICE:-rxe0} ]] || fail "no RDMA device ${RSMSG_RDMA_DEVICE:-rxe0}"
}

# test_out NAME: a fresh directory for this test's files under $RSMSG_OUT; prints its path.
test_out() {
    local d=$RSMSG_OUT/$1
    mkdir -p "$d" || fail "cannot create $d"
    echo "$d"
}

# perftest_server LOG TOOL ARGS...: start a perftest server in the background (bounded by a timeout); sets SERVER_PID.
perftest_server() {
    local log=$1
    shift
    timeout 300 "$@" >"$log" 2>&1 &
    SERVER_PID=$!
}

# perftest_client LOG ADDR TOOL ARGS...: run a perftest client against ADDR, retrying while it could not reach the
# server (not listening yet) for up to about 60 s. A run that got connected and then failed is not retried.
perftest_client() {
    local log=$1 addr=$2 try
    shift 2
    for try in $(seq 60); do
        if timeout 300 "$@" "$addr" >"$log" 2>&1; then
            return 0
        fi
        ! grep -q 'local address:' "$log" || break
        sleep 1
    done
    echo "---- $log ----" >&2
    cat "$log" >&2
    return 1
}

# perftest_finite LOG...: no figure in the logs is inf or nan (see perftest_lat_pair).
perftest_finite() {
    ! grep -Eqi '(^| )(-?inf|nan)( |$)' "$@"
}

# perftest_lat_pair SERVER_LOG CLIENT_LOG PORT TOOL ARGS...: a perftest latency server and client in this guest (the
# client connects to $RSMSG_NODE_ADDR), on PORT, PORT+1, PORT+2 for the repeats. perftest converts cycles to
# microseconds with a CPU frequency it measures at start; under TCG that sometimes comes out as zero and a side
# prints `inf` for every figure (`nan` counts too). Such a run is repeated, up to three times, and says so on stderr; a failed run,
# or three runs with `inf`, fails the test.
perftest_lat_pair() {
    local slog=$1 clog=$2 port=$3 try
    shift 3
    for try in 1 2 3; do
        perftest_server "$slog" "$@" -p "$port"
        perftest_client "$clog" "$RSMSG_NODE_ADDR" "$@" -p "$port" || fail "$1 client failed"
        wait "$SERVER_PID" || { cat "$slog" >&2; fail "$1 server failed"; }
        perftest_finite "$clog" "$slog" && return 0
        echo "$1: run $try printed inf (perftest measured its CPU frequency as zero)" >&2
        port=$((port + 1))
    done
    cat "$slog" "$clog" >&2
    fail "$1 printed inf in three runs"
}

# assert_lat_table LOG SIZE: the log holds a perftest latency table with a row for SIZE bytes.
assert_lat_table() {
    local log=$1 size=$2
    grep -q 't_typical\[usec\]' "$log" || fail "$log: no latency table header"
    grep -Eq "^ *$size +[0-9]+ +[0-9.]+ +[0-9.]+ +[0-9.]+" "$log" || fail "$log: no latency row for $size bytes"
}

# assert_bw_table LOG SIZE: the log holds a perftest bandwidth table with a non-zero row for SIZE bytes.
assert_bw_table() {
    local log=$1 size=$2 avg
    grep -q 'BW average\[MB/sec\]' "$log" || fail "$log: no bandwidth table header"
    avg=$(awk -v s="$size" '$1 == s && NF >= 4 { print $4; exit }' "$log")
    [[ -n $avg ]] || fail "$log: no bandwidth row for $size bytes"
    awk -v a="$avg" 'BEGIN { exit !(a > 0) }' || fail "$log: average bandwidth is $avg MB/s"
}
