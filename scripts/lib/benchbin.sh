# Sourced by the benchmark scripts: builds what they measure.
#   bench_build PKG [cargo build args...]   sets $bench_dir to the output dir
# With COFFRE_BENCH_QUICK=1 (scripts/bench-all --quick, run by scripts/test)
# it reuses the test run's build instead of a release build: the figures
# are then only a check that the benchmark works. It is taken as `cargo
# test --workspace` built it (binaries and examples, in target/debug): a
# `cargo build -p PKG` would unify features over PKG alone, not the
# workspace and its dev-dependencies, and rebuild a dozen crates (3 min).
bench_build() {
  local pkg=$1; shift
  if [ "${COFFRE_BENCH_QUICK:-}" = 1 ]; then
    cargo test --workspace --no-run -q
    bench_dir=$PWD/target/debug
  else
    cargo build --release -q -p "$pkg" "$@"
    bench_dir=$PWD/target/release
  fi
}
