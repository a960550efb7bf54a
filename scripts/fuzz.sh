#!/usr/bin/env bash
# Runs Sluice's fuzz targets (fuzz/) with libFuzzer, one after the other, each for --time
# seconds (default 60), at the lowest CPU priority. New inputs go into fuzz/corpus/TARGET/,
# which is minimised afterwards (cargo fuzz cmin); each run's figures are printed and appended
# to fuzz/runs.tsv. A crash stops that target, leaves its input in fuzz/artifacts/TARGET/ and
# makes the script exit 1 at the end: fix it, then keep the input in fuzz/regressions/TARGET/
# (`cargo test -p sluice-fuzz-targets` replays corpora and regressions alike).
#
#   scripts/fuzz.sh [TARGET...] [--time SECONDS] [--no-cmin]
#
# Environment: FUZZ_SANITIZER (address, the default, or none: about twice the executions),
# FUZZ_ARGS (more libFuzzer flags, e.g. "-max_len=16384").
# Needs the nightly toolchain (rustup toolchain install nightly); installs cargo-fuzz if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

time_s=60
cmin=1
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --time) time_s="$2"; shift 2 ;;
    --time=*) time_s="${1#--time=}"; shift ;;
    --no-cmin) cmin=0; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    -*) echo "fuzz: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[[ "$time_s" =~ ^[0-9]+$ ]] || { echo "fuzz: --time takes whole seconds" >&2; exit 2; }

all=()
for f in fuzz/fuzz_targets/*.rs; do all+=("$(basename "$f" .rs)"); done
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
  [[ " ${all[*]} " == *" $t "* ]] || { echo "fuzz: no target $t (targets: ${all[*]})" >&2; exit 2; }
done

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz: the nightly toolchain is missing (rustup toolchain install nightly)" >&2
  exit 1
fi
# Installed here rather than by scripts/setup.sh: only fuzzing needs it, not every CI run.
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz (cargo install cargo-fuzz --locked)"
  cargo install cargo-fuzz --locked
fi

san="${FUZZ_SANITIZER:-address}"
# The fuzz crate is a workspace of its own; starting from the main lock file keeps every
# dependency at the version the tests run (cargo adds libfuzzer-sys to it).
cp Cargo.lock fuzz/Cargo.lock
echo "fuzz: building ${#targets[@]} target(s) (sanitizer: $san)"
# One target, or all of them (cargo fuzz build takes one name or none).
one=()
[ ${#targets[@]} -eq 1 ] && one=("${targets[0]}")
if ! (cd fuzz && nice -n 19 cargo +nightly fuzz build -s "$san" "${one[@]}" >build.log 2>&1); then
  tail -30 fuzz/build.log >&2
  echo "fuzz: build failed (fuzz/build.log)" >&2
  exit 1
fi

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -n "$(git status --porcelain 2>/dev/null | head -1)" ] && commit="$commit+dirty"
[ -f fuzz/runs.tsv ] || printf 'date\ttarget\tseconds\texecutions\tcov\tft\tcorpus_files\tcorpus_bytes\tcrash\tsanitizer\tcommit\tcpu_seconds\n' > fuzz/runs.tsv
failed=()
mkdir -p fuzz/logs
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  log="fuzz/logs/$t.log"
  echo "fuzz: $t for ${time_s}s"
  set +e
  # The CPU time the fuzzer got (user + system), as well as the wall time: at the lowest
  # priority it shares the machine with whatever else runs, and executions follow the CPU.
  TIMEFORMAT='%U %S'
  # shellcheck disable=SC2086
  # (The inner braces keep the redirections off `time`'s own report.)
  { time { (cd fuzz && nice -n 19 cargo +nightly fuzz run -s "$san" "$t" "corpus/$t" -- \
     -max_total_time="$time_s" -timeout=10 -print_final_stats=1 ${FUZZ_ARGS:-}) >"$log" 2>&1 ; } ; } \
     2>"fuzz/logs/$t.time"
  rc=$?
  set -e
  cpu=$(awk '{ printf "%d", $1 + $2 }' "fuzz/logs/$t.time" 2>/dev/null || true)
  # libFuzzer's last status line ("#RUNS DONE cov: C ft: F corp: ...") and its final stats.
  status=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  [ -n "$execs" ] || execs=$(sed -E -n 's/^#([0-9]+).*/\1/p' <<<"$status")
  cov=$(sed -E -n 's/.* cov: ([0-9]+).*/\1/p' <<<"$status")
  ft=$(sed -E -n 's/.* ft: ([0-9]+).*/\1/p' <<<"$status")
  crash=none
  if [ $rc -ne 0 ]; then
    crash=$(grep -o 'artifact_prefix=[^ ]*\|Test unit written to [^ ]*' "$log" | tail -1 | sed 's/.* //')
    [ -n "$crash" ] || crash="exit $rc"
    failed+=("$t")
    echo "fuzz: $t FAILED ($crash); see $log" >&2
    grep -m1 -A12 -E 'panicked at|ERROR: AddressSanitizer|ERROR: libFuzzer' "$log" >&2 || tail -20 "$log" >&2
  fi
  if [ $cmin -eq 1 ] && [ $rc -eq 0 ]; then
    (cd fuzz && nice -n 19 cargo +nightly fuzz cmin -s "$san" "$t" "corpus/$t" >>"../$log" 2>&1) \
      || echo "fuzz: cmin of $t failed; see $log" >&2
  fi
  files=$(find "fuzz/corpus/$t" -type f | wc -l)
  bytes=$(du -sb "fuzz/corpus/$t" | cut -f1)
  echo "fuzz: $t: ${execs:-?} executions in ${time_s}s (${cpu:-?} s of CPU), cov ${cov:-?}, ft ${ft:-?}, corpus $files files / $bytes bytes, crash: $crash"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$t" "$time_s" \
    "${execs:-}" "${cov:-}" "${ft:-}" "$files" "$bytes" "$crash" "$san" "$commit" "${cpu:-}" >> fuzz/runs.tsv
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashes in: ${failed[*]}" >&2
  exit 1
fi
