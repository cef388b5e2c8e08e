# Helpers of the guest bandwidth benchmarks (benches/rndv-bw, benches/write-pairs): sourced, not run. They use the
# caller's $dev (RDMA device), $gid (GID index), $port (the base TCP port of the next perftest run) and $rsmsg (the
# rsmsg executable), and tests/guest/_lib.sh.

# perftest TOOL SIZE N LOG: one perftest bandwidth run (server and client in this guest); prints the average in MB/s
# of 10^6 bytes, or n/a. perftest calibrates its cycle counter first; on a loaded TCG host that calibration
# sometimes fails ("Can't produce a report"): such a run is repeated, up to three times, on ports $port+1..+3 (the
# caller moves $port on by 3 for each call: this runs in a subshell, where an increment would be lost).
perftest() {
    local tool=$1 s=$2 n=$3 log=$4 ok try port=$port
    for try in 1 2 3; do
        port=$((port + 1))
        perftest_server "$log.server" "$tool" -d "$dev" -x "$gid" -s "$s" -n "$n" -p "$port"
        ok=1
        perftest_client "$log" "$RSMSG_NODE_ADDR" "$tool" -d "$dev" -x "$gid" -s "$s" -n "$n" -p "$port" >&2 || ok=0
        wait "$SERVER_PID" || ok=0
        ((ok)) && break
        echo "$tool at $s bytes failed (run $try of 3)" >&2
        grep -q "Can't produce a report" "$log" "$log.server" || break
    done
    if ((!ok)); then
        echo n/a
        return
    fi
    assert_bw_table "$log" "$s"
    # perftest's columns: #bytes #iterations BW_peak BW_average MsgRate, MB = 2^20 bytes.
    awk -v s="$s" '$1 == s && NF >= 4 { printf "%.2f\n", $4 * 1.048576; exit }' "$log"
}

# rsmsg_perf SIZE N LOG [POLL]: one `rsmsg perf -t bw` run (it starts its own server process), both ends in poll mode
# POLL (default busy); prints its MB/s (10^6 bytes).
rsmsg_perf() {
    RSMSG_DEVICE=$dev RSMSG_GID_INDEX=$gid timeout 900 "$rsmsg" perf --transport verbs -t bw -s "$1" -n "$2" \
        --poll "${4:-busy}" >"$3" 2>&1 || { cat "$3" >&2; fail "rsmsg perf at $1 bytes failed"; }
    # Its columns: #bytes #iters BW_avg[MB/s] MsgRate[Mpps].
    awk -v s="$1" '$1 == s && NF == 4 { print $3; exit }' "$3"
}
