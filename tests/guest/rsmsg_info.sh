#!/usr/bin/env bash
# `rsmsg info` (the freshly built binary) lists the guest's rxe0 with port 1 PORT_ACTIVE and a RoCE v2 GID for the
# node's IPv4 address; `--json` says the same; an unknown device is an error.
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
require_guest
out=$(test_out rsmsg_info)
bin=${RSMSG_BIN:-target/debug/rsmsg}
dev=${RSMSG_RDMA_DEVICE:-rxe0}
[[ -x $bin ]] || fail "$bin not built (cargo build --bin rsmsg)"

"$bin" info >"$out/info.txt" 2>&1 || fail "rsmsg info failed: $(cat "$out/info.txt")"
cat "$out/info.txt"
grep -q "^$dev\$" "$out/info.txt" || fail "rsmsg info does not list $dev"
grep -q 'port 1: PORT_ACTIVE' "$out/info.txt" || fail "port 1 is not PORT_ACTIVE"
grep -Eq "GID\[ *[0-9]+\] ::ffff:$RSMSG_NODE_ADDR +RoCE v2" "$out/info.txt" ||
    fail "no RoCE v2 GID ::ffff:$RSMSG_NODE_ADDR"
"$bin" info --json >"$out/info.json" || fail "rsmsg info --json failed"
python3 - "$out/info.json" "$dev" <<'PY' || fail "rsmsg info --json does not show $dev ACTIVE with a RoCE v2 GID"
import json, sys
devs = json.load(open(sys.argv[1]))
devs = devs.get("devices", devs) if isinstance(devs, dict) else devs
text = json.dumps(devs)
assert sys.argv[2] in text and "ACTIVE" in text and "v2" in text.lower().replace(" ", ""), text[:400]
PY
if "$bin" info -d no-such-device >"$out/bad.txt" 2>&1; then
    fail "rsmsg info -d no-such-device succeeded"
fi
echo "rsmsg_info: $dev PORT_ACTIVE with a RoCE v2 GID, JSON agrees, unknown device refused"
