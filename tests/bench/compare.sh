#!/usr/bin/env bash
# Side by side, in one run, on this machine, one relay after another: fieldchart-server, the
# reference JavaScript sync server (tests/bench/js-relay: @automerge/automerge-repo 2.5.6,
# sharePolicy false, file storage) and a samod 0.16 relay with file storage
# (tests/bench/samod-relay). Runs the same `storm` and `bootstrap` against each (a fresh relay
# on a fresh data directory per run, each run under a time limit: a relay that does not finish
# is reported as such) and prints a table of figures and ratios to Fieldchart.
#
#   tests/bench/compare.sh [--devices 50] [--visits 50] [--patients 50] [--patient-visits 100]
#                          [--limit 300] [--seed 1] [--out DIR]
#
# Needs: cargo, node >= 20 with npm, python3. Builds what it runs (release) unless
# SKIP_BUILD=1 (BENCH=path picks another fieldchart-bench binary). Raw JSON lines and each run's stderr stay in --out (default: a temp dir).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DEVICES=50 VISITS=50 PATIENTS=50 PVISITS=100 LIMIT=300 SEED=1 OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --devices) DEVICES=$2; shift 2 ;;
    --visits) VISITS=$2; shift 2 ;;
    --patients) PATIENTS=$2; shift 2 ;;
    --patient-visits) PVISITS=$2; shift 2 ;;
    --limit) LIMIT=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$(mktemp -d -t fieldchart-compare.XXXXXX)}
mkdir -p "$OUT"

BENCH=${BENCH:-$ROOT/target/release/fieldchart-bench}
SAMOD=$ROOT/tests/bench/samod-relay/target/release/fieldchart-bench-samod-relay
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  (cd "$ROOT" && cargo build --release -p fieldchart-server -p fieldchart-tests)
  (cd "$ROOT/tests/bench/samod-relay" && CARGO_TARGET_DIR="$ROOT/tests/bench/samod-relay/target" \
    cargo build --release --locked)
  (cd "$ROOT/tests/bench/js-relay" && { [ -d node_modules ] || npm ci --no-audit --no-fund; })
fi

RELAY_PID="" RELAY_ADDR=""
# start_relay NAME DATA_DIR CMD...: start a relay that prints {"listening":..., "pid":...}.
start_relay() {
  local name=$1 data=$2; shift 2
  mkdir -p "$data"
  "$@" > "$OUT/$name.relay.out" 2> "$OUT/$name.relay.err" &
  RELAY_PID=$!
  RELAY_ADDR=""
  for _ in $(seq 300); do
    RELAY_ADDR=$(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    try: print(json.loads(l)["listening"]); break
    except Exception: pass' "$OUT/$name.relay.out" 2>/dev/null || true)
    [ -n "$RELAY_ADDR" ] && return 0
    kill -0 "$RELAY_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "$name did not start; see $OUT/$name.relay.err" >&2
  return 1
}
stop_relay() {
  [ -n "$RELAY_PID" ] && { kill "$RELAY_PID" 2>/dev/null || true; wait "$RELAY_PID" 2>/dev/null || true; }
  RELAY_PID=""
}
trap stop_relay EXIT

# run NAME ARGS...: one bench run under the time limit; its JSON line goes to $OUT/NAME.json.
run() {
  local name=$1; shift
  echo "== $name" >&2
  if timeout --kill-after=10 "$LIMIT" "$BENCH" "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"; then
    :
  else
    local rc=$?
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
      echo "{\"ok\":false,\"error\":\"did not finish within ${LIMIT}s\"}" > "$OUT/$name.json"
    elif [ ! -s "$OUT/$name.json" ]; then
      echo "{\"ok\":false,\"error\":\"exit $rc\"}" > "$OUT/$name.json"
    fi
  fi
  tail -c 600 "$OUT/$name.json" >&2
}

STORM=(storm --devices "$DEVICES" --visits "$VISITS" --seed "$SEED" --timeout-s "$LIMIT")
BOOT=(bootstrap --patients "$PATIENTS" --visits "$PVISITS" --seed "$SEED" --timeout-s "$LIMIT")

# Fieldchart: started by the bench itself (device stack, then the plain client).
run fieldchart.storm "${STORM[@]}"
run fieldchart-plain.storm "${STORM[@]}" --plain
run fieldchart.bootstrap "${BOOT[@]}"
run fieldchart-plain.bootstrap "${BOOT[@]}" --plain

for relay in js samod; do
  for workload in storm bootstrap; do
    data="$OUT/$relay.$workload.data"
    rm -rf "$data"
    case $relay in
      js) start_relay "$relay.$workload" "$data" node "$ROOT/tests/bench/js-relay/server.mjs" "$data" 0 ;;
      samod) start_relay "$relay.$workload" "$data" "$SAMOD" "$data" 0 ;;
    esac || { echo '{"ok":false,"error":"relay did not start"}' > "$OUT/$relay.$workload.json"; continue; }
    args=("${STORM[@]}")
    [ "$workload" = bootstrap ] && args=("${BOOT[@]}")
    run "$relay.$workload" "${args[@]}" --relay "ws://$RELAY_ADDR/" --relay-pid "$RELAY_PID" --relay-data-dir "$data"
    stop_relay
  done
done

python3 - "$OUT" "$DEVICES" "$VISITS" "$PATIENTS" "$PVISITS" <<'PY'
import json, sys, os
out, devices, visits, patients, pvisits = sys.argv[1:]
def load(name):
    try:
        with open(os.path.join(out, name + ".json")) as f:
            lines = [l for l in f.read().splitlines() if l.strip().startswith("{")]
            return json.loads(lines[-1]) if lines else {"ok": False, "error": "no output"}
    except Exception as e:
        return {"ok": False, "error": str(e)}
rows = [("fieldchart (device stack)", "fieldchart"), ("fieldchart (plain v1)", "fieldchart-plain"),
        ("JS sync server 2.5.6", "js"), ("samod 0.16", "samod")]
def g(d, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d: return None
        d = d[p]
    return d
def f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)
print(f"\nstorm {devices} devices x {visits} notes; bootstrap {patients} patients x {pvisits} notes; results in {out}\n")
hdr = ["relay", "storm ok", "docs/s", "dev p50 s", "dev p99 s", "CPU ms/doc", "peak RSS MB",
       "wchar MB", "write_bytes MB", "data dir MB", "caseload s", "boot ok", "boot s", "msgs/doc", "bytes/save"]
print("| " + " | ".join(hdr) + " |")
print("|" + "---|" * len(hdr))
data = {}
for label, key in rows:
    s, b = load(key + ".storm"), load(key + ".bootstrap")
    data[key] = (s, b)
    mb = lambda v: None if v is None else v / 1e6
    print("| " + " | ".join([
        label,
        str(s.get("ok")) if "error" not in s or s.get("storm") else "no: " + str(s.get("error"))[:60],
        f(g(s, "storm", "docs_per_s"), "{:.0f}"),
        f(g(s, "storm", "device_p50_s")), f(g(s, "storm", "device_p99_s")),
        f(g(s, "relay_cpu_ms_per_doc")),
        f(mb(g(s, "relay_peak_rss_bytes")), "{:.0f}"),
        f(mb(g(s, "relay_storm", "relay_wchar_bytes")), "{:.1f}"),
        f(mb(g(s, "relay_storm", "relay_write_bytes")), "{:.1f}"),
        f(mb(g(s, "relay_data_dir_bytes")), "{:.1f}"),
        f(g(s, "caseload_fetch", "elapsed_s"), "{:.3f}"),
        str(b.get("ok")) if "error" not in b or b.get("elapsed_s") else "no: " + str(b.get("error"))[:60],
        f(g(b, "elapsed_s"), "{:.3f}"), f(g(b, "messages_per_doc")), f(g(b, "bytes_over_save")),
    ]) + " |")
print("\nratios (Fieldchart device stack / Fieldchart plain vs. each other relay; >1 favours Fieldchart):\n")
print("| vs | docs/s | CPU per doc | caseload fetch | bootstrap time |")
print("|---|---|---|---|---|")
def ratio(a, b):
    return "-" if a in (None, 0) or b in (None, 0) else f"{a / b:.1f}x"
for key, label in (("js", "JS sync server"), ("samod", "samod")):
    for fc in ("fieldchart", "fieldchart-plain"):
        fs, fb = data[fc]
        os_, ob = data[key]
        ok = os_.get("ok") is True
        print(f"| {fc} vs {label} | "
              f"{ratio(g(fs, 'storm', 'docs_per_s'), g(os_, 'storm', 'docs_per_s')) if ok else 'n/a (did not finish)'} | "
              f"{ratio(g(os_, 'relay_cpu_ms_per_doc'), g(fs, 'relay_cpu_ms_per_doc')) if ok else 'n/a'} | "
              f"{ratio(g(os_, 'caseload_fetch', 'elapsed_s'), g(fs, 'caseload_fetch', 'elapsed_s')) if ok else 'n/a'} | "
              f"{ratio(g(ob, 'elapsed_s'), g(fb, 'elapsed_s')) if ob.get('ok') is True else 'n/a'} |")
PY
