#!/usr/bin/env bash
# Regenerates corpus/smime_open/ from the fuzzing-only PKI in pki/: messages
# sealed with the hispd CLI for the keys the smime_open target's Agent holds,
# so the fuzzer starts from messages that open all the way. Run from anywhere:
#   fuzz/make-smime-corpus.sh [path/to/hispd]
# The target judges validity at the fixed time in pki/at, so the corpus never
# expires. If pki/ is replaced (e.g. `hispd demo --out DIR`), update pki/at
# to a moment inside the new certificates' validity and rerun this script.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
hispd="${1:-$here/../target/debug/hispd}"
[ -x "$hispd" ] || { echo "no hispd binary at $hispd (cargo build first)" >&2; exit 1; }
out="$here/corpus/smime_open"
mkdir -p "$out"
pki="$here/pki"
clinic=dr.lee@direct.sunrise-clinic.example
app=jane.doe@direct.patient-app.example
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# seal NAME FROM TO SIGNER RECIPIENT [extra seal args...] < message
seal() {
  local name=$1 from=$2 to=$3 signer=$4 recipient=$5
  shift 5
  "$hispd" message seal --from "$from" --to "$to" \
    --sign-cert "$pki/$signer-cert.pem" --sign-key "$pki/$signer-key.pem" \
    --recipient-cert "$pki/$recipient-cert.pem" "$@" >"$out/$name.eml" 2>/dev/null
}

crlf() { sed 's/$/\r/'; }

crlf >"$tmp/plain.eml" <<MSG
From: Dr. Lee <$clinic>
To: Jane Doe <$app>
Subject: Lab results
Date: Fri, 04 Dec 2026 12:00:00 +0000
Message-ID: <fuzz-plain@direct.sunrise-clinic.example>
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8

Your results are normal.
MSG

crlf >"$tmp/multipart.eml" <<MSG
From: Dr. Lee <$clinic>
To: Jane Doe <$app>
Cc: records@direct.patient-app.example
Subject: Your visit summary
Date: Fri, 04 Dec 2026 12:00:00 +0000
Message-ID: <fuzz-multi@direct.sunrise-clinic.example>
MIME-Version: 1.0
Disposition-Notification-Options: X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,true
Content-Type: multipart/mixed; boundary="b1"

--b1
Content-Type: text/plain; charset=utf-8

See the attached summary.
--b1
Content-Type: application/xml; name="ccd.xml"
Content-Disposition: attachment; filename="ccd.xml"
Content-Transfer-Encoding: base64

PENsaW5pY2FsRG9jdW1lbnQgeG1sbnM9InVybjpobDctb3JnOnYzIi8+
--b1--
MSG

crlf >"$tmp/reply.eml" <<MSG
From: $app
To: $clinic
Subject: Re: Lab results
Message-ID: <fuzz-reply@direct.patient-app.example>
In-Reply-To: <fuzz-plain@direct.sunrise-clinic.example>

Thank you.
MSG

seal clinic-to-app-plain "$clinic" "$app" clinic app <"$tmp/plain.eml"
seal clinic-to-app-multipart "$clinic" "$app" clinic app <"$tmp/multipart.eml"
seal clinic-to-app-aes128-oaep "$clinic" "$app" clinic app \
  --cipher aes-128-cbc --key-transport rsa-oaep <"$tmp/plain.eml"
seal app-to-clinic "$app" "$clinic" app clinic <"$tmp/reply.eml"
# The signed layer as decryption yields it: the target also parses and
# verifies the raw input as a signed entity.
for m in clinic-to-app-plain clinic-to-app-multipart; do
  openssl cms -decrypt -in "$out/$m.eml" -inkey "$pki/app-key.pem" \
    -recip "$pki/app-cert.pem" -out "$out/signed-$m.eml"
done
ls -l "$out"
