#!/usr/bin/env bash
# Build fieldchart-mobile and write its Kotlin, Swift and Python bindings under OUT_DIR:
#   OUT_DIR/kotlin/org/fieldchart/fieldchart_mobile.kt
#   OUT_DIR/swift/{Fieldchart.swift,FieldchartFFI.h,FieldchartFFI.modulemap}
#   OUT_DIR/python/fieldchart_mobile.py
#   OUT_DIR/lib/libfieldchart_mobile.so (the library the bindings were generated from)
# PROFILE=release for a release build (default: debug).
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-debug}
FLAGS=()
[ "$PROFILE" = release ] && FLAGS+=(--release)
TARGET=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

# Two separate builds: the generator (with the `bindgen` feature), then the library without
# it, so the shipped library does not carry the generator.
cargo build "${FLAGS[@]}" -p fieldchart-mobile --features bindgen --bin uniffi-bindgen
cp "$TARGET/$PROFILE/uniffi-bindgen" "$OUT/uniffi-bindgen"
cargo build "${FLAGS[@]}" -p fieldchart-mobile --lib
mkdir -p "$OUT/lib"
cp "$TARGET/$PROFILE/libfieldchart_mobile.so" "$OUT/lib/"

# Library mode: the metadata comes from the built library (generate before stripping it);
# names from mobile-bindings/uniffi.toml.
for language in kotlin swift python; do
  "$OUT/uniffi-bindgen" generate --library "$OUT/lib/libfieldchart_mobile.so" \
    --language "$language" --no-format --out-dir "$OUT/$language"
done
rm "$OUT/uniffi-bindgen"
echo "bindings written to $OUT"
