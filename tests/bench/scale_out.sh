#!/usr/bin/env bash
# Scale-out benchmark (issue 12), one invocation: the `storm` against 1 relay on SQLite, 1 relay
# on PostgreSQL and 2 relays on PostgreSQL (one fresh database per run, made and dropped by the
# bench), one after another, --rounds times alternating, every relay process under the same CPU
# budget (a cgroup CFS quota, --cpu-per-relay CPUs). Prints the table (stderr) and the JSON line
# (stdout, also saved in --out) with the ratios to 1 PostgreSQL relay and to SQLite.
#
#   tests/bench/scale_out.sh [--devices 100] [--visits 10] [--cpu-per-relay 0.5] [--rounds 2]
#                            [--pool N] [--plain] [--seed 1] [--limit 600] [--out DIR]
#
# Needs: cargo; PostgreSQL at FIELDCHART_TEST_POSTGRES (libpq key=value; default
# host=127.0.0.1 port=5432 user=postgres dbname=postgres, trust auth); a writable cgroup CPU
# controller for the budget (root; --cpu-per-relay 0 runs without one). Builds in release
# unless SKIP_BUILD=1.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
ARGS=() OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --devices|--visits|--cpu-per-relay|--rounds|--seed) ARGS+=("$1" "$2"); shift 2 ;;
    --pool) ARGS+=(--database-pool "$2"); shift 2 ;;
    --limit) ARGS+=(--timeout-s "$2"); shift 2 ;;
    --plain) ARGS+=(--plain); shift ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$(mktemp -d -t fieldchart-scale-out.XXXXXX)}
mkdir -p "$OUT"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  (cd "$ROOT" && cargo build --release -p fieldchart-server -p fieldchart-tests)
fi
BENCH=${BENCH:-$ROOT/target/release/fieldchart-bench}

status=0
"$BENCH" scale-out "${ARGS[@]}" > "$OUT/scale-out.json" 2> "$OUT/scale-out.err" || status=$?
# The table, without the progress bars' lines.
grep -v '^\s*\(provision\|phones\|charting\|storm\)\b' "$OUT/scale-out.err" >&2 || true
cat "$OUT/scale-out.json"
echo "raw output in $OUT" >&2
exit "$status"
