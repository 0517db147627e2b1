#!/bin/sh
# Coverage-guided fuzzing of the hostile-input parsers (see fuzz/src/lib.rs for what each
# target asserts). Needs a nightly toolchain and cargo-fuzz:
#   rustup toolchain install nightly && cargo install cargo-fuzz
# Usage: fuzz/run.sh [target|all] [seconds per target]   (default: all, 60 s each)
# New inputs collect in fuzz/corpus/<target>/; a crash is written to fuzz/artifacts/<target>/.
# Keep a fixed crash as fuzz/regressions/<target>/<name>: `cargo test --test properties`
# replays it on every run.
set -eu
cd "$(dirname "$0")"
targets="config safetensors spool_record api_stream uri"
want="${1:-all}"
secs="${2:-60}"
[ "$want" = all ] || targets="$want"
for t in $targets; do
    mkdir -p "corpus/$t"
    dirs="corpus/$t seeds/$t"
    [ -d "regressions/$t" ] && dirs="$dirs regressions/$t"
    echo "== fuzz target $t for ${secs}s"
    # shellcheck disable=SC2086
    cargo +nightly fuzz run -O "$t" $dirs -- -max_total_time="$secs" -rss_limit_mb=2048
done
