#!/usr/bin/env bash
# `rsmsg perf --transport verbs` (local mode: embedded manager and a server process, both on rxe0): lat, bw and rate
# with --json, a small size sweep, and the rows checked (tests, sizes, iteration counts, ordered percentiles,
# bandwidth = rate x size); then a size larger than the layout's largest message is refused with a message.
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
require_guest
out=$(test_out cli_perf)
bin=${RSMSG_BIN:-target/debug/rsmsg}
[[ -x $bin ]] || fail "$bin not built (cargo build --bin rsmsg)"
export RSMSG_DEVICE=${RSMSG_RDMA_DEVICE:-rxe0} RSMSG_GID_INDEX=${RSMSG_RDMA_GID_INDEX:-1}

timeout 300 "$bin" perf --transport verbs --json -t lat -s 8..512 -n 200 >"$out/lat.json" 2>"$out/lat.err" ||
    fail "perf lat: $(cat "$out/lat.err")"
timeout 300 "$bin" perf --transport verbs --json -t bw -s 64,4k,64k -n 300 >"$out/bw.json" 2>"$out/bw.err" ||
    fail "perf bw: $(cat "$out/bw.err")"
timeout 300 "$bin" perf --transport verbs --json -t rate -n 2000 >"$out/rate.json" 2>"$out/rate.err" ||
    fail "perf rate: $(cat "$out/rate.err")"
python3 - "$out" <<'PY' || fail "perf --json rows are wrong"
import json, sys, os
d = sys.argv[1]
lat = json.load(open(os.path.join(d, "lat.json")))
assert [r["size"] for r in lat] == [8, 32, 128, 512], lat
for r in lat:
    assert r["test"] == "lat" and r["transport"] == "verbs" and r["iterations"] == 200, r
    l = r["lat_us"]
    assert 0 < l["min"] <= l["p50"] <= l["p99"] <= l["p999"] <= l["max"], l
    assert "bw_mbps" not in r, r
bw = json.load(open(os.path.join(d, "bw.json")))
assert [r["size"] for r in bw] == [64, 4096, 65536], bw
for r in bw:
    assert r["test"] == "bw" and r["transport"] == "verbs" and r["iterations"] == 300, r
    assert r["bw_mbps"] > 0 and abs(r["bw_mbps"] - r["rate_mmps"] * r["size"]) <= 1e-6 * r["bw_mbps"], r
rate = json.load(open(os.path.join(d, "rate.json")))
assert len(rate) == 1 and rate[0]["test"] == "rate" and rate[0]["size"] == 64 and rate[0]["iterations"] == 2000, rate
assert rate[0]["rate_mmps"] > 0, rate
print("lat p50 (us):", [r["lat_us"]["p50"] for r in lat])
print("bw (MB/s):", [round(r["bw_mbps"], 1) for r in bw], "rate (Mmsg/s):", round(rate[0]["rate_mmps"], 4))
PY
# Above the default layout's largest eager message (256 KiB - 16 B) perf goes by rendezvous: 1 MiB is carried.
for t in lat bw; do
    timeout 300 "$bin" perf --transport verbs --json -t $t -s 1m -n 5 >"$out/big-$t.json" 2>"$out/big-$t.err" ||
        fail "1 MiB $t over verbs (rendezvous): $(tail -n 3 "$out/big-$t.err")"
done
python3 - "$out/big-lat.json" "$out/big-bw.json" <<'PY' || fail "1 MiB rows wrong: $(cat "$out"/big-*.json)"
import json, sys
lat, bw = (json.load(open(p)) for p in sys.argv[1:3])
assert len(lat) == 1 and len(bw) == 1, (lat, bw)
for r, t in ((lat[0], "lat"), (bw[0], "bw")):
    assert r["test"] == t and r["size"] == 1048576 and r["iterations"] == 5, r
assert bw[0]["bw_mbps"] > 0 and lat[0]["lat_us"]["p50"] > 0, (lat, bw)
PY
echo "cli_perf: verbs lat/bw/rate JSON checked, 1 MiB carried by rendezvous"
