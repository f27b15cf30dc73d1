#!/usr/bin/env bash
# Builds every cargo-fuzz target in fuzz/ and runs each for SECONDS (default
# 30) from a copy of its checked-in corpus (fuzz/corpus/<target>, never
# modified). Prints per target the executions and whether it crashed; exits 1
# if any target crashed (the reproducer is kept in fuzz/artifacts/<target>/).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Environment: FUZZ_SANITIZER (address, or none; default address),
# HISPD_FIXTURES (the shared fixtures, default ../shared/fixtures: their
# messages and packages seed the corpora and the smime_open target reads the
# Java reference implementation's test key from them),
# FUZZ_WORK (keep the working corpora there instead of a temporary folder),
# FUZZ_NICE (e.g. 10: run the fuzzers with that niceness).
# Stable Rust: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-30}
[[ $seconds =~ ^[0-9]+$ && $seconds -gt 0 ]] || {
  echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]" >&2
  exit 2
}
shift $(($# > 0 ? 1 : 0))
sanitizer=${FUZZ_SANITIZER:-address}
all_targets=(smtp_session smime_open mdn_dsn xdm_unpack ccda imap_command imap_fetch)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all_targets[@]}")

# What building needs: a C++ compiler for libFuzzer, OpenSSL headers for hispd.
need=()
command -v c++ >/dev/null || need+=(g++)
command -v pkg-config >/dev/null || need+=(pkg-config)
[ -f /usr/include/openssl/cms.h ] || need+=(libssl-dev)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/fuzz.sh: missing ${need[*]}; install them (apt-get install ${need[*]}) or run as root" >&2
    exit 1
  fi
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version "${CARGO_FUZZ_VERSION:-0.13.2}"
fi

if ! cargo metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null 2>&1; then
  echo "scripts/fuzz.sh: fuzz/Cargo.lock is out of date (did hispd's dependencies change?);" \
    "cargo updates it now: commit the result" >&2
fi

export RUSTC_BOOTSTRAP=1
start=$(date +%s)
# -O: no blanket -Cdebug-assertions from cargo-fuzz; fuzz/Cargo.toml's
# [profile.release] turns them (and overflow checks) on crate by crate.
cargo fuzz build --fuzz-dir fuzz --target-dir fuzz/target -s "$sanitizer" -O
echo "fuzz: built in $(($(date +%s) - start)) s (sanitizer: $sanitizer)"
bin=fuzz/target/x86_64-unknown-linux-gnu/release

if [ -n "${FUZZ_WORK:-}" ]; then
  work=$FUZZ_WORK
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
# Leak checking stays on (libFuzzer's default with ASan).
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0}
nice_cmd=()
[ -z "${FUZZ_NICE:-}" ] || nice_cmd=(nice -n "$FUZZ_NICE")

# HISPD_FIXTURES, or ../shared/fixtures beside the project (as the tests use).
fixtures=${HISPD_FIXTURES:-$PWD/../shared/fixtures}
export HISPD_FIXTURES=$fixtures
declare -A fixture_seeds=(
  [smime_open]="interop/java-ri/EncryptedMessage2.eml interop/dotnet-ri/envelopeSignature.eml"
  [mdn_dsn]="notifications/java-ri-MDNMessage.eml notifications/java-ri-MDNDispatchedMessage.eml notifications/java-ri-DSNMessage.eml"
  [xdm_unpack]="xdm/java-ri-wrapper-dir-no-uri.zip xdm/java-ri-missing-slash.zip xdm/ett-ToC_XDM_Limited_Metadata.zip xdm/ett-CCDA_Ambulatory_in_XDM.zip xdm/ett-BadXHTML.zip"
  [ccda]="ccda/hl7-ccd-2.xml"
)
[ -d "$fixtures" ] || echo "fuzz: no fixtures at $fixtures: running from fuzz/corpus alone" >&2

failed=()
summary=()
for t in "${targets[@]}"; do
  [ -x "$bin/$t" ] || {
    echo "fuzz: no target $t" >&2
    exit 2
  }
  mkdir -p "$work/$t" "fuzz/artifacts/$t"
  cp -R "fuzz/corpus/$t/." "$work/$t/"
  # Reproducers of what was found before start every run too.
  [ ! -d "fuzz/regressions/$t" ] || cp -R "fuzz/regressions/$t/." "$work/$t/"
  # Other implementations' messages and packages seed the run too, read in
  # place from the shared fixtures (never copied into the repository).
  for seed in ${fixture_seeds[$t]:-}; do
    [ ! -f "$fixtures/$seed" ] || cp "$fixtures/$seed" "$work/$t/fixture-$(basename "$seed")"
  done
  opts=()
  [ ! -f "fuzz/dict/$t.dict" ] || opts+=(-dict="fuzz/dict/$t.dict")
  # IMAP command lines may be 64 KiB (libFuzzer's default is the largest seed
  # or 4096): long enough for deep nesting to overflow the stack.
  [ "$t" != imap_command ] || opts+=(-max_len=65536)
  log="$work/$t.log"
  echo "fuzz: $t for $seconds s"
  status=0
  "${nice_cmd[@]}" "$bin/$t" "$work/$t" "${opts[@]}" \
    -max_total_time="$seconds" -timeout=25 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1 || status=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  [ -n "$execs" ] || execs=$(sed -n 's/^#\([0-9][0-9]*\).*/\1/p' "$log" | tail -1)
  if [ "$status" -eq 0 ]; then
    summary+=("$(printf '%-14s %12s executions  ok' "$t" "${execs:-?}")")
  else
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    summary+=("$(printf '%-14s %12s executions  CRASHED (exit %s) %s' "$t" "${execs:-?}" "$status" "$artifact")")
    failed+=("$t")
    echo "---- $t: last lines of the libFuzzer log" >&2
    tail -n 60 "$log" >&2
  fi
done

echo "fuzz: $seconds s per target, sanitizer $sanitizer"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashed: ${failed[*]} (reproduce: $bin/<target> <artifact>)" >&2
  exit 1
fi
