# Sourced by the benchmark scripts: builds what they measure.
#   bench_build PKG [cargo build args...]   sets $bench_dir to the output dir
# With COFFRE_BENCH_QUICK=1 (scripts/bench-all --quick, run by scripts/test)
# it reuses the test profile's build (optimised, already built by the test
# run) instead of a release build: the figures are then only a check that
# the benchmark works.
bench_build() {
  local pkg=$1; shift
  if [ "${COFFRE_BENCH_QUICK:-}" = 1 ]; then
    cargo build --profile test -q -p "$pkg" "$@"
    bench_dir=$PWD/target/debug
  else
    cargo build --release -q -p "$pkg" "$@"
    bench_dir=$PWD/target/release
  fi
}
