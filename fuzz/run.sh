#!/usr/bin/env bash
# Coverage-guided fuzzing on the stable toolchain: the ExternalIVR codec, the
# configuration loader and the template renderer.
#
#   fuzz/run.sh [TARGET] [libFuzzer flags...]
#   fuzz/run.sh parse_event -runs=5000000      # a number of executions
#   fuzz/run.sh render -max_total_time=300     # or a number of seconds
#
# TARGET is parse_event (default), render (the command writer), config (the
# configuration parser and loader) or template (the template renderer); with
# no flags it runs 1,000,000 executions. New inputs go to fuzz/corpus/TARGET
# (not committed); the committed seeds in fuzz/seeds/TARGET are read as a
# starting point, and fuzz/TARGET.dict, if there, is passed as a dictionary.
# A crash is written to fuzz/artifacts/TARGET and the script exits non-zero.
# SECURITY.md records the runs done so far.
#
# cargo-fuzz passes -Z flags to rustc; RUSTC_BOOTSTRAP=1 lets a stable
# compiler take them, so no nightly toolchain is needed. The sanitizer is off
# by default (the codec is safe Rust; coverage guidance still works); set
# FUZZ_SANITIZER=address to turn ASan on.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
target=${1:-parse_event}
[ $# -gt 0 ] && shift
[ $# -gt 0 ] || set -- -runs=1000000

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
mkdir -p "$here/corpus/$target"
dict=()
[ -f "$here/$target.dict" ] && dict=("-dict=$here/$target.dict")
cd "$here/.."
# nice: a fuzzing run must not starve other builds on the machine.
exec nice -n 10 cargo fuzz run --fuzz-dir "$here" \
    --sanitizer "${FUZZ_SANITIZER:-none}" --debug-assertions \
    "$target" "$here/corpus/$target" "$here/seeds/$target" -- "${dict[@]}" "$@"
