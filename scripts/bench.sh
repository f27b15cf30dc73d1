#!/usr/bin/env bash
# Measures seal/open (criterion) and, in the same run, the machine's RSA-2048
# speed with `openssl speed`, then prints each figure as a ratio to one
# RSA-2048 private-key operation. The ratios are what docs/PERFORMANCE.md
# records: absolute times drift on a shared machine, ratios much less.
set -euo pipefail
cd "$(dirname "$0")/.."

rsa_before=$(openssl speed -seconds 3 rsa2048 2>/dev/null | awk '/^rsa 2048 bits/ {print $6}')
aes=$(openssl speed -seconds 2 -bytes 1048576 -evp aes-256-cbc 2>/dev/null | awk '/^AES-256-CBC/ {print $2}')
sha=$(openssl speed -seconds 2 -bytes 1048576 -evp sha256 2>/dev/null | awk '/^sha256/ {print $2}')
cargo bench --bench agent -- --noplot "$@"
rsa_after=$(openssl speed -seconds 3 rsa2048 2>/dev/null | awk '/^rsa 2048 bits/ {print $6}')

python3 - "$rsa_before" "$rsa_after" "$aes" "$sha" <<'PY'
import json, sys, pathlib
before, after = float(sys.argv[1]), float(sys.argv[2])
aes, sha = (float(x.rstrip("k")) * 1000 / 1e6 for x in sys.argv[3:5])
print(f"\nopenssl speed, 1 MiB blocks: AES-256-CBC encrypt {aes:.0f} MB/s, SHA-256 {sha:.0f} MB/s")
rsa = (before + after) / 2
print(f"\nopenssl speed rsa2048: {before:.0f} and {after:.0f} signs/s (before/after); mean {rsa:.0f}/s = {1e6/rsa:.0f} us per sign\n")
print("| operation | size | mean time | ratio to one RSA-2048 sign | MB/s |")
print("|---|---|---|---|---|")
root = pathlib.Path("target/criterion/agent")
for op in ("seal", "open"):
    for size, nbytes in (("5KB", 5 * 1024), ("1MB", 1024 * 1024)):
        est = root / op / size / "new" / "estimates.json"
        if not est.exists():
            continue
        ns = json.loads(est.read_text())["mean"]["point_estimate"]
        us = ns / 1000
        ratio = us / (1e6 / rsa)
        mbps = nbytes / (ns / 1e9) / 1e6
        print(f"| {op} | {size} | {us:,.0f} us | {ratio:.2f} | {mbps:.1f} |")
PY
