#!/usr/bin/env bash
# The one command that runs every test (README "Test"); .ci/run calls it.
# It installs what the tests need (as root, with apt), checks formatting and
# lints, then runs the unit and integration tests against the real tools.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v openssl >/dev/null || need+=(openssl)
command -v gpgsm >/dev/null || need+=(gpgsm)
command -v gpg-agent >/dev/null || need+=(gpg-agent)
command -v pkg-config >/dev/null || need+=(pkg-config)
[ -f /usr/include/openssl/cms.h ] || need+=(libssl-dev)
command -v named >/dev/null || need+=(bind9)
command -v dig >/dev/null || need+=(bind9-dnsutils)
command -v slapd >/dev/null || need+=(slapd)
command -v ldapsearch >/dev/null || need+=(ldap-utils)
command -v smtp-sink >/dev/null || [ -x /usr/sbin/smtp-sink ] || need+=(postfix)
command -v mbsync >/dev/null || need+=(isync)
command -v swaks >/dev/null || need+=(swaks)
# swaks' --tls needs Net::SSLeay (only a Recommends of the swaks package).
perl -MNet::SSLeay -e1 2>/dev/null || need+=(libnet-ssleay-perl)
command -v strace >/dev/null || need+=(strace)
command -v curl >/dev/null || need+=(curl)
command -v unzip >/dev/null || need+=(unzip)
command -v python3 >/dev/null || need+=(python3)
# Debian's python3 has the venv module but not ensurepip, so `python3 -m venv
# --help` works while making a venv with pip fails; ensurepip is the test.
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: missing ${need[*]}; install them (apt-get install ${need[*]}) or run as root" >&2
    exit 1
  fi
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}"
fi

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# FHIR responses are validated with the FHIR 4.0.1 models of fhir.resources
# 6.1.0 (which needs pydantic v1), in a venv made once and reused.
venv=target/fhir-venv
if ! "$venv/bin/python" -c 'import fhir.resources as f, pydantic as p
assert f.__version__ == "6.1.0" and p.VERSION.startswith("1.")' 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-input \
    "fhir.resources==6.1.0" "pydantic<2"
fi
export HISPD_TEST_FHIR_PYTHON="$PWD/$venv/bin/python"
HISPD_TEST_CHROMIUM=$(command -v chromium)
export HISPD_TEST_CHROMIUM

log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --locked 2>&1 | tee "$log"
# One closing line for all test binaries (cargo prints one per binary).
awk '/^test result:/ {p += $4; f += $6} END {printf "tests: %d passed, %d failed\n", p, f}' "$log"

# Fuzzing (fuzz/README.md): every cargo-fuzz target for HISPD_FUZZ_SECONDS
# (default 15) from its checked-in corpus and regressions; a crash fails the
# run. Building the targets takes about 6 minutes on two cores and CI stops
# a run at 25 minutes, so fuzzing gets the time the tests left before the
# 23-minute mark: it is skipped when less than 9 minutes are left and cut
# short (without failing) at the mark. HISPD_FUZZ_SECONDS=0 skips it.
fuzz_seconds=${HISPD_FUZZ_SECONDS:-15}
fuzz_budget=$((23 * 60 - SECONDS))
if [ "$fuzz_seconds" -eq 0 ]; then
  echo "fuzz: skipped (HISPD_FUZZ_SECONDS=0)"
elif [ "$fuzz_budget" -lt $((9 * 60)) ]; then
  echo "fuzz: skipped: ${fuzz_budget} s left before the 23-minute mark"
else
  fuzz_status=0
  timeout "$fuzz_budget" ./scripts/fuzz.sh "$fuzz_seconds" || fuzz_status=$?
  if [ "$fuzz_status" -eq 124 ]; then
    echo "fuzz: cut short at the 23-minute mark (${fuzz_budget} s)"
  elif [ "$fuzz_status" -ne 0 ]; then
    exit "$fuzz_status"
  fi
fi
