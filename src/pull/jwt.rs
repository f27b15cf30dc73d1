//! Compact JWS / JWT: verifying tokens against a JWKS (software statements
//! from a trusted app registry, RFC 7591 and Blue Button Plus trusted
//! registration) and signing id_tokens with the server's own RSA key.
//!
//! Only asymmetric algorithms are accepted, the algorithm must fit the key,
//! and keys come only from the caller: header members such as `jku`, `x5u`
//! or `jwk` are never followed.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::ecdsa::EcdsaSig;
use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private, Public};
use openssl::rsa::{Padding, Rsa};
use openssl::sign::{RsaPssSaltlen, Signer, Verifier};
use serde_json::{Map, Value};
use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

/// Longest token [`verify`] will look at; real software statements are a few KiB.
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

/// Largest JWKS document [`parse_jwks`] will parse.
pub const MAX_JWKS_LEN: usize = 256 * 1024;

/// Smallest RSA modulus accepted, in bits, for verifying and for signing.
const MIN_RSA_BITS: u32 = 2048;

/// Bytes of the SHA-256 of the public key kept in a [`SigningKey`]'s kid.
const KID_BYTES: usize = 16;

const ACCEPTED: &str = "RS256, RS384, RS512, PS256, ES256, ES384";

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    #[error("token is not three dot-separated parts")]
    NotThreeParts,
    #[error("header is not base64url JSON")]
    BadHeader,
    #[error("payload is not base64url JSON")]
    BadPayload,
    #[error("signature is not base64url")]
    BadSignatureEncoding,
    #[error("not base64url")]
    NotBase64Url,
    #[error("header has no alg")]
    NoAlg,
    #[error("algorithm none is refused")]
    AlgNone,
    #[error("algorithm {0} is refused (only {ACCEPTED})")]
    AlgRefused(String),
    #[error("header kid is not a string")]
    KidNotString,
    #[error("header crit is present; no extensions are understood")]
    Crit,
    #[error("no key with kid {0}")]
    NoKeyWithKid(String),
    #[error("key {kid} cannot verify {alg} (key is {key})")]
    KeyAlgMismatch {
        kid: String,
        alg: &'static str,
        key: String,
    },
    #[error("no key can verify {0}")]
    NoKeyForAlg(&'static str),
    #[error("signature does not verify")]
    BadSignature,
    #[error("expired at {0}")]
    Expired(String),
    #[error("issued in the future (iat {0})")]
    IssuedInFuture(String),
    #[error("not valid before {0}")]
    NotYetValid(String),
    #[error("claim {0} is not a number")]
    NotNumeric(&'static str),
    #[error("claims are not a JSON object")]
    ClaimsNotObject,
    #[error("JWKS: {0}")]
    Jwks(String),
    #[error("key file {path}: {why}")]
    KeyFile { path: PathBuf, why: String },
    #[error("OpenSSL: {0}")]
    OpenSsl(#[from] ErrorStack),
}

/// Base64url without padding, as JOSE uses everywhere.
pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Strict base64url: no padding, no whitespace, no stray trailing bits.
pub fn b64url_decode(s: &str) -> Result<Vec<u8>, JwtError> {
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| JwtError::NotBase64Url)
}

/// A JWS algorithm this module accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Alg {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Es256,
    Es384,
}

impl Alg {
    fn parse(name: &str) -> Result<Alg, JwtError> {
        Ok(match name {
            "RS256" => Alg::Rs256,
            "RS384" => Alg::Rs384,
            "RS512" => Alg::Rs512,
            "PS256" => Alg::Ps256,
            "ES256" => Alg::Es256,
            "ES384" => Alg::Es384,
            n if n.eq_ignore_ascii_case("none") => return Err(JwtError::AlgNone),
            other => return Err(JwtError::AlgRefused(other.to_string())),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Rs384 => "RS384",
            Alg::Rs512 => "RS512",
            Alg::Ps256 => "PS256",
            Alg::Es256 => "ES256",
            Alg::Es384 => "ES384",
        }
    }

    fn digest(self) -> MessageDigest {
        match self {
            Alg::Rs256 | Alg::Ps256 | Alg::Es256 => MessageDigest::sha256(),
            Alg::Rs384 | Alg::Es384 => MessageDigest::sha384(),
            Alg::Rs512 => MessageDigest::sha512(),
        }
    }

    /// The only key type that may verify this algorithm.
    fn key_type(self) -> KeyType {
        match self {
            Alg::Rs256 | Alg::Rs384 | Alg::Rs512 | Alg::Ps256 => KeyType::Rsa,
            Alg::Es256 => KeyType::EcP256,
            Alg::Es384 => KeyType::EcP384,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyType {
    Rsa,
    EcP256,
    EcP384,
}

impl KeyType {
    fn describe(self) -> &'static str {
        match self {
            KeyType::Rsa => "RSA",
            KeyType::EcP256 => "EC P-256",
            KeyType::EcP384 => "EC P-384",
        }
    }

    /// Length of one coordinate, and of r or s in a JWS signature.
    fn coordinate_len(self) -> usize {
        match self {
            KeyType::Rsa => 0,
            KeyType::EcP256 => 32,
            KeyType::EcP384 => 48,
        }
    }
}

/// A public verification key from a JWKS.
#[derive(Clone, Debug)]
pub struct Jwk {
    pub kid: Option<String>,
    /// The JWK's own `alg`; when present, tokens must use exactly it.
    pub alg: Option<String>,
    key: PKey<Public>,
    key_type: KeyType,
}

impl Jwk {
    fn fits(&self, alg: Alg) -> bool {
        self.key_type == alg.key_type() && self.alg.as_deref().is_none_or(|a| a == alg.name())
    }

    fn describe(&self) -> String {
        match &self.alg {
            Some(a) => format!("{} for {a}", self.key_type.describe()),
            None => self.key_type.describe().to_string(),
        }
    }
}

/// Reads a JWKS (`{"keys":[...]}`) as bytes.
pub fn parse_jwks(bytes: &[u8]) -> Result<Vec<Jwk>, JwtError> {
    if bytes.len() > MAX_JWKS_LEN {
        return Err(JwtError::Jwks(format!("longer than {MAX_JWKS_LEN} bytes")));
    }
    let doc: Value =
        serde_json::from_slice(bytes).map_err(|e| JwtError::Jwks(format!("not JSON: {e}")))?;
    parse_jwks_value(&doc)
}

/// Reads an already parsed JWKS, such as the `jwks` member of an RFC 7591
/// registration request. Keys for another `use` than `sig`, of an
/// unsupported `kty` or curve, or with an `alg` this module does not verify
/// are skipped; a malformed or weak key of a supported type is an error, so
/// a broken registry key is reported rather than silently ignored.
pub fn parse_jwks_value(doc: &Value) -> Result<Vec<Jwk>, JwtError> {
    let entries = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| JwtError::Jwks("no \"keys\" array".to_string()))?;
    let mut keys = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let name = match entry.get("kid").and_then(Value::as_str) {
            Some(kid) => format!("key {kid}"),
            None => format!("key #{index}"),
        };
        if let Some(jwk) =
            parse_jwk(entry).map_err(|why| JwtError::Jwks(format!("{name}: {why}")))?
        {
            keys.push(jwk);
        }
    }
    if keys.is_empty() {
        return Err(JwtError::Jwks("no usable signature key".to_string()));
    }
    Ok(keys)
}

/// One JWKS entry: `Ok(None)` when it is not meant for us to verify with.
fn parse_jwk(entry: &Value) -> Result<Option<Jwk>, String> {
    let obj = entry.as_object().ok_or("not a JSON object")?;
    let text = |name: &str| -> Result<Option<String>, String> {
        match obj.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("{name} is not a string")),
        }
    };
    if text("use")?.is_some_and(|u| u != "sig") {
        return Ok(None);
    }
    if let Some(ops) = obj.get("key_ops") {
        let ops = ops.as_array().ok_or("key_ops is not an array")?;
        if !ops.iter().any(|op| op == "verify") {
            return Ok(None);
        }
    }
    let kid = text("kid")?;
    let alg = text("alg")?;
    let alg_key_type = match alg.as_deref().map(Alg::parse) {
        None => None,
        Some(Ok(a)) => Some(a.key_type()),
        // An encryption or symmetric alg: not a key for us.
        Some(Err(_)) => return Ok(None),
    };
    let kty = text("kty")?.ok_or("no kty")?;
    let bignum = |name: &str| -> Result<(BigNum, usize), String> {
        let encoded = text(name)?.ok_or_else(|| format!("no {name}"))?;
        let bytes = b64url_decode(&encoded).map_err(|_| format!("{name} is not base64url"))?;
        let n = BigNum::from_slice(&bytes).map_err(|e| format!("{name}: {e}"))?;
        Ok((n, bytes.len()))
    };
    let (key, key_type) = match kty.as_str() {
        "RSA" => {
            let (n, _) = bignum("n")?;
            let (e, _) = bignum("e")?;
            // e = 1 (or any even e) makes signatures trivial or meaningless.
            if !e.is_bit_set(0) || e.num_bits() < 2 {
                return Err("RSA exponent e is not odd and at least 3".to_string());
            }
            let bits = n.num_bits();
            if bits < MIN_RSA_BITS as i32 {
                return Err(format!(
                    "RSA key of {bits} bits refused (at least {MIN_RSA_BITS})"
                ));
            }
            let rsa = Rsa::from_public_components(n, e).map_err(|e| e.to_string())?;
            (
                PKey::from_rsa(rsa).map_err(|e| e.to_string())?,
                KeyType::Rsa,
            )
        }
        "EC" => {
            let (nid, key_type) = match text("crv")?.ok_or("no crv")?.as_str() {
                "P-256" => (Nid::X9_62_PRIME256V1, KeyType::EcP256),
                "P-384" => (Nid::SECP384R1, KeyType::EcP384),
                _ => return Ok(None),
            };
            let (x, x_len) = bignum("x")?;
            let (y, y_len) = bignum("y")?;
            let want = key_type.coordinate_len();
            if x_len != want || y_len != want {
                return Err(format!("x and y must be {want} bytes each"));
            }
            let group = EcGroup::from_curve_name(nid).map_err(|e| e.to_string())?;
            // Also checks that the point is on the curve.
            let ec = EcKey::from_public_key_affine_coordinates(&group, &x, &y)
                .map_err(|_| "x, y is not a point on the curve".to_string())?;
            (PKey::from_ec_key(ec).map_err(|e| e.to_string())?, key_type)
        }
        _ => return Ok(None),
    };
    if alg_key_type.is_some_and(|t| t != key_type) {
        return Err(format!(
            "alg {} does not fit a {} key",
            alg.unwrap_or_default(),
            key_type.describe()
        ));
    }
    Ok(Some(Jwk {
        kid,
        alg,
        key,
        key_type,
    }))
}

/// A token whose signature checked out. Times are not checked: see [`check_times`].
#[derive(Clone, Debug)]
pub struct Verified {
    pub header: Map<String, Value>,
    pub claims: Map<String, Value>,
}

/// Verifies a compact JWS against `keys`. With a `kid` in the header only
/// keys with that kid are tried; without one, every key fit for the
/// algorithm is.
pub fn verify(token: &str, keys: &[Jwk]) -> Result<Verified, JwtError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::TooLong);
    }
    let parts: Vec<&str> = token.split('.').collect();
    let [header_b64, payload_b64, signature_b64] = parts[..] else {
        return Err(JwtError::NotThreeParts);
    };
    let header = json_object(header_b64).ok_or(JwtError::BadHeader)?;
    let alg = match header.get("alg") {
        Some(Value::String(name)) => Alg::parse(name)?,
        Some(other) => return Err(JwtError::AlgRefused(other.to_string())),
        None => return Err(JwtError::NoAlg),
    };
    if header.contains_key("crit") {
        return Err(JwtError::Crit);
    }
    let candidates: Vec<&Jwk> = match header.get("kid") {
        Some(Value::String(kid)) => {
            let named: Vec<&Jwk> = keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
                .collect();
            let Some(first) = named.first() else {
                return Err(JwtError::NoKeyWithKid(kid.clone()));
            };
            let fit: Vec<&Jwk> = named.iter().copied().filter(|k| k.fits(alg)).collect();
            if fit.is_empty() {
                return Err(JwtError::KeyAlgMismatch {
                    kid: kid.clone(),
                    alg: alg.name(),
                    key: first.describe(),
                });
            }
            fit
        }
        Some(_) => return Err(JwtError::KidNotString),
        None => keys.iter().filter(|k| k.fits(alg)).collect(),
    };
    if candidates.is_empty() {
        return Err(JwtError::NoKeyForAlg(alg.name()));
    }
    let signature = b64url_decode(signature_b64).map_err(|_| JwtError::BadSignatureEncoding)?;
    let signing_input = &token[..header_b64.len() + 1 + payload_b64.len()];
    if !candidates
        .iter()
        .any(|key| signature_matches(alg, key, signing_input.as_bytes(), &signature))
    {
        return Err(JwtError::BadSignature);
    }
    let claims = json_object(payload_b64).ok_or(JwtError::BadPayload)?;
    Ok(Verified { header, claims })
}

fn json_object(part: &str) -> Option<Map<String, Value>> {
    serde_json::from_slice(&b64url_decode(part).ok()?).ok()
}

/// Any OpenSSL error counts as "does not verify".
fn signature_matches(alg: Alg, key: &Jwk, input: &[u8], signature: &[u8]) -> bool {
    let check = || -> Result<bool, ErrorStack> {
        let der;
        let signature = match key.key_type {
            KeyType::Rsa => signature,
            ec => {
                // JWS carries r || s; OpenSSL wants a DER ECDSA-Sig-Value.
                let n = ec.coordinate_len();
                if signature.len() != 2 * n {
                    return Ok(false);
                }
                let r = BigNum::from_slice(&signature[..n])?;
                let s = BigNum::from_slice(&signature[n..])?;
                der = EcdsaSig::from_private_components(r, s)?.to_der()?;
                &der[..]
            }
        };
        let mut verifier = Verifier::new(alg.digest(), &key.key)?;
        if alg == Alg::Ps256 {
            verifier.set_rsa_padding(Padding::PKCS1_PSS)?;
            verifier.set_rsa_mgf1_md(alg.digest())?;
            // RFC 7518 3.5: the salt is as long as the hash.
            verifier.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH)?;
        }
        verifier.verify_oneshot(signature, input)
    };
    check().unwrap_or(false)
}

/// Checks `exp`, `nbf` and `iat` (each optional) against `now`, allowing
/// `leeway_secs` of clock skew either way.
pub fn check_times(
    claims: &Map<String, Value>,
    now: i64,
    leeway_secs: i64,
) -> Result<(), JwtError> {
    let earliest = now.saturating_sub(leeway_secs) as f64;
    let latest = now.saturating_add(leeway_secs) as f64;
    if let Some(exp) = numeric_date(claims, "exp")? {
        if exp <= earliest {
            return Err(JwtError::Expired(show_time(exp)));
        }
    }
    if let Some(nbf) = numeric_date(claims, "nbf")? {
        if nbf > latest {
            return Err(JwtError::NotYetValid(show_time(nbf)));
        }
    }
    if let Some(iat) = numeric_date(claims, "iat")? {
        if iat > latest {
            return Err(JwtError::IssuedInFuture(show_time(iat)));
        }
    }
    Ok(())
}

/// A NumericDate claim; RFC 7519 allows fractions.
fn numeric_date(claims: &Map<String, Value>, name: &'static str) -> Result<Option<f64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(value) => value.as_f64().map(Some).ok_or(JwtError::NotNumeric(name)),
    }
}

fn show_time(secs: f64) -> String {
    chrono::DateTime::from_timestamp(secs.floor() as i64, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| secs.to_string())
}

/// The server's RSA-2048 key for signing id_tokens.
pub struct SigningKey {
    key: PKey<Private>,
    kid: String,
    n: String,
    e: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish()
    }
}

impl SigningKey {
    /// Loads the PEM (PKCS#8) key at `path`, or creates one there (mode 0600,
    /// parent directories too) if the file does not exist. An existing file
    /// that cannot be read or is not an RSA key is an error and is left alone.
    pub fn load_or_create(path: &Path) -> Result<SigningKey, JwtError> {
        let fail = |why: String| JwtError::KeyFile {
            path: path.to_path_buf(),
            why,
        };
        match fs::read(path) {
            Ok(pem) => Self::from_pem(&pem).map_err(fail),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let rsa = Rsa::generate(MIN_RSA_BITS)?;
                let key = PKey::from_rsa(rsa)?;
                let pem = key.private_key_to_pem_pkcs8()?;
                match create_new(path, &pem).map_err(|e| fail(e.to_string()))? {
                    Created::Written => Self::from_key(key),
                    // Another process won the race: use its key, not ours.
                    Created::AlreadyThere => {
                        let pem = fs::read(path).map_err(|e| fail(e.to_string()))?;
                        Self::from_pem(&pem).map_err(fail)
                    }
                }
            }
            Err(e) => Err(fail(e.to_string())),
        }
    }

    fn from_pem(pem: &[u8]) -> Result<SigningKey, String> {
        let key =
            PKey::private_key_from_pem(pem).map_err(|_| "not a PEM private key".to_string())?;
        if key.rsa().is_err() {
            return Err("not an RSA key".to_string());
        }
        if key.bits() < MIN_RSA_BITS {
            return Err(format!(
                "RSA key of {} bits is too small (at least {MIN_RSA_BITS})",
                key.bits()
            ));
        }
        Self::from_key(key).map_err(|e| e.to_string())
    }

    fn from_key(key: PKey<Private>) -> Result<SigningKey, JwtError> {
        let rsa = key.rsa()?;
        let digest = openssl::sha::sha256(&key.public_key_to_der()?);
        Ok(SigningKey {
            kid: b64url(&digest[..KID_BYTES]),
            n: b64url(&rsa.n().to_vec()),
            e: b64url(&rsa.e().to_vec()),
            key,
        })
    }

    /// Signs a claims object as an RS256 JWT carrying this key's kid.
    pub fn sign(&self, claims: &Value) -> Result<String, JwtError> {
        if !claims.is_object() {
            return Err(JwtError::ClaimsNotObject);
        }
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": self.kid});
        let mut token = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let mut signer = Signer::new(MessageDigest::sha256(), &self.key)?;
        let signature = signer.sign_oneshot_to_vec(token.as_bytes())?;
        token.push('.');
        token.push_str(&b64url(&signature));
        Ok(token)
    }

    /// The public half, for the server's jwks_uri.
    pub fn public_jwk(&self) -> Value {
        serde_json::json!({
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": self.kid,
            "n": self.n,
            "e": self.e,
        })
    }

    /// `{"keys":[public_jwk]}`, ready to serve.
    pub fn jwks(&self) -> Value {
        serde_json::json!({ "keys": [self.public_jwk()] })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }
}

enum Created {
    Written,
    AlreadyThere,
}

/// Writes `data` to `path` only if nothing is there yet: a private temporary
/// file beside it, synced, then linked into place (which, unlike a rename,
/// never replaces a file that appeared meanwhile).
fn create_new(path: &Path, data: &[u8]) -> std::io::Result<Created> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir)?;
    let file_name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(format!(".tmp-{:016x}", rand::random::<u64>()));
    let tmp = dir.join(tmp_name);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let written = (|| {
        let mut file = options.open(&tmp)?;
        file.write_all(data)?;
        file.sync_all()?;
        match fs::hard_link(&tmp, path) {
            Ok(()) => Ok(Created::Written),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(Created::AlreadyThere),
            // Filesystems without hard links: fall back to a rename.
            Err(_) => fs::rename(&tmp, path).map(|()| Created::Written),
        }
    })();
    let _ = fs::remove_file(&tmp);
    if written.is_ok() {
        // Make the new directory entry durable; not all systems allow it.
        let _ = fs::File::open(dir).and_then(|d| d.sync_all());
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::bn::BigNumContext;
    use serde_json::json;
    use std::process::Command;

    fn claims() -> Value {
        json!({"iss": "https://registry.example", "sub": "app-1", "iat": 1_700_000_000, "exp": 1_700_000_600})
    }

    fn jwks_of(keys: &[Value]) -> Vec<Jwk> {
        parse_jwks(json!({ "keys": keys }).to_string().as_bytes()).unwrap()
    }

    fn make_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes()),
            b64url(signature)
        )
    }

    fn rsa_jwk(key: &PKey<Private>, kid: &str) -> Value {
        let rsa = key.rsa().unwrap();
        json!({"kty": "RSA", "kid": kid, "n": b64url(&rsa.n().to_vec()), "e": b64url(&rsa.e().to_vec())})
    }

    fn ec_jwk(key: &PKey<Private>, kid: &str, crv: &str, len: usize) -> Value {
        let ec = key.ec_key().unwrap();
        let mut x = BigNum::new().unwrap();
        let mut y = BigNum::new().unwrap();
        let mut ctx = BigNumContext::new().unwrap();
        ec.public_key()
            .affine_coordinates(ec.group(), &mut x, &mut y, &mut ctx)
            .unwrap();
        let pad = |n: &BigNum| n.to_vec_padded(len as i32).unwrap();
        json!({"kty": "EC", "kid": kid, "crv": crv, "x": b64url(&pad(&x)), "y": b64url(&pad(&y))})
    }

    fn rsa_key() -> PKey<Private> {
        PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap()
    }

    fn ec_key(nid: Nid) -> PKey<Private> {
        let group = EcGroup::from_curve_name(nid).unwrap();
        PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
    }

    /// Runs the openssl binary: an implementation independent of our signing code.
    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl binary");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Signs `header.payload` with the CLI; returns the token's signing input
    /// and the raw signature bytes as openssl wrote them.
    fn cli_sign(dir: &Path, header: &Value, claims: &Value, extra: &[&str]) -> (String, Vec<u8>) {
        let input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        fs::write(dir.join("input"), &input).unwrap();
        let mut args = vec!["dgst"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-sign", "key.pem", "-out", "sig", "input"]);
        openssl(dir, &args);
        (input, fs::read(dir.join("sig")).unwrap())
    }

    /// Hand-parses a DER ECDSA-Sig-Value into JWS r || s, each `len` bytes.
    fn der_to_raw(der: &[u8], len: usize) -> Vec<u8> {
        assert_eq!(der[0], 0x30);
        // P-256 and P-384 signatures are short enough for one- or two-byte lengths.
        let mut i = if der[1] == 0x81 { 3 } else { 2 };
        let mut raw = Vec::new();
        for _ in 0..2 {
            assert_eq!(der[i], 0x02);
            let n = der[i + 1] as usize;
            let mut int = &der[i + 2..i + 2 + n];
            while int.len() > len && int[0] == 0 {
                int = &int[1..];
            }
            raw.extend(std::iter::repeat_n(0u8, len - int.len()));
            raw.extend_from_slice(int);
            i += 2 + n;
        }
        raw
    }

    fn flip(part: &str, index: usize) -> String {
        let mut bytes = b64url_decode(part).unwrap();
        bytes[index] ^= 0x01;
        b64url(&bytes)
    }

    #[test]
    fn signed_token_round_trips_and_tampering_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::load_or_create(&dir.path().join("jwt.pem")).unwrap();
        let token = key.sign(&claims()).unwrap();
        let keys = parse_jwks(key.jwks().to_string().as_bytes()).unwrap();

        let verified = verify(&token, &keys).unwrap();
        assert_eq!(Value::Object(verified.claims), claims());
        assert_eq!(verified.header["alg"], "RS256");
        assert_eq!(verified.header["typ"], "JWT");
        assert_eq!(verified.header["kid"], key.kid());

        let parts: Vec<&str> = token.split('.').collect();
        let bad_payload = format!("{}.{}.{}", parts[0], flip(parts[1], 5), parts[2]);
        assert!(matches!(
            verify(&bad_payload, &keys),
            Err(JwtError::BadSignature)
        ));
        let bad_signature = format!("{}.{}.{}", parts[0], parts[1], flip(parts[2], 40));
        assert!(matches!(
            verify(&bad_signature, &keys),
            Err(JwtError::BadSignature)
        ));
        assert!(matches!(
            key.sign(&json!("x")),
            Err(JwtError::ClaimsNotObject)
        ));
    }

    #[test]
    fn public_jwk_has_the_published_members() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::load_or_create(&dir.path().join("k.pem")).unwrap();
        let jwk = key.public_jwk();
        assert_eq!(jwk["kty"], "RSA");
        assert_eq!(jwk["use"], "sig");
        assert_eq!(jwk["alg"], "RS256");
        assert_eq!(jwk["kid"], key.kid());
        assert_eq!(jwk["e"], "AQAB");
        assert_eq!(
            b64url_decode(jwk["n"].as_str().unwrap()).unwrap().len(),
            256
        );
        assert!(jwk.get("d").is_none());
    }

    #[test]
    fn rs256_signed_by_openssl_cli_verifies() {
        let dir = tempfile::tempdir().unwrap();
        openssl(
            dir.path(),
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "key.pem",
            ],
        );
        let key =
            PKey::private_key_from_pem(&fs::read(dir.path().join("key.pem")).unwrap()).unwrap();
        let header = json!({"alg": "RS256", "kid": "cli"});
        let (input, sig) = cli_sign(dir.path(), &header, &claims(), &["-sha256"]);
        let token = format!("{input}.{}", b64url(&sig));
        let verified = verify(&token, &jwks_of(&[rsa_jwk(&key, "cli")])).unwrap();
        assert_eq!(verified.claims["sub"], "app-1");
    }

    #[test]
    fn ps256_signed_by_openssl_cli_verifies() {
        let dir = tempfile::tempdir().unwrap();
        openssl(
            dir.path(),
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "key.pem",
            ],
        );
        let key =
            PKey::private_key_from_pem(&fs::read(dir.path().join("key.pem")).unwrap()).unwrap();
        let header = json!({"alg": "PS256"});
        let pss = [
            "-sha256",
            "-sigopt",
            "rsa_padding_mode:pss",
            "-sigopt",
            "rsa_pss_saltlen:digest",
        ];
        let (input, sig) = cli_sign(dir.path(), &header, &claims(), &pss);
        let keys = jwks_of(&[rsa_jwk(&key, "cli")]);
        assert!(verify(&format!("{input}.{}", b64url(&sig)), &keys).is_ok());
        // The same signature claimed as PKCS#1 v1.5 must not pass.
        let as_rs256 = format!(
            "{}.{}",
            make_token(&json!({"alg": "RS256"}), &claims(), &[]).trim_end_matches('.'),
            b64url(&sig)
        );
        assert!(matches!(
            verify(&as_rs256, &keys),
            Err(JwtError::BadSignature)
        ));
    }

    #[test]
    fn es256_and_es384_signed_by_openssl_cli_verify() {
        for (curve, crv, digest, alg, len) in [
            ("P-256", "P-256", "-sha256", "ES256", 32),
            ("P-384", "P-384", "-sha384", "ES384", 48),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let curve_opt = format!("ec_paramgen_curve:{curve}");
            openssl(
                dir.path(),
                &[
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    &curve_opt,
                    "-out",
                    "key.pem",
                ],
            );
            let key =
                PKey::private_key_from_pem(&fs::read(dir.path().join("key.pem")).unwrap()).unwrap();
            let header = json!({"alg": alg, "kid": "ec"});
            let (input, der) = cli_sign(dir.path(), &header, &claims(), &[digest]);
            let raw = der_to_raw(&der, len);
            assert_eq!(raw.len(), 2 * len);
            let keys = jwks_of(&[ec_jwk(&key, "ec", crv, len)]);
            let verified = verify(&format!("{input}.{}", b64url(&raw)), &keys).unwrap();
            assert_eq!(verified.claims["iss"], "https://registry.example", "{alg}");
            // The DER form itself is not a JWS signature.
            assert!(matches!(
                verify(&format!("{input}.{}", b64url(&der)), &keys),
                Err(JwtError::BadSignature)
            ));
        }
    }

    #[test]
    fn alg_none_and_hmac_are_refused() {
        let key = rsa_key();
        let keys = jwks_of(&[rsa_jwk(&key, "a")]);
        let none = make_token(&json!({"alg": "none"}), &claims(), &[]);
        assert!(matches!(verify(&none, &keys), Err(JwtError::AlgNone)));
        let none_upper = make_token(&json!({"alg": "NONE"}), &claims(), b"x");
        assert!(matches!(verify(&none_upper, &keys), Err(JwtError::AlgNone)));

        // The classic confusion: HMAC keyed with the public key's bytes.
        let secret = PKey::hmac(&key.public_key_to_pem().unwrap()).unwrap();
        let input = make_token(&json!({"alg": "HS256", "kid": "a"}), &claims(), &[]);
        let input = input.trim_end_matches('.');
        let mac = Signer::new(MessageDigest::sha256(), &secret)
            .unwrap()
            .sign_oneshot_to_vec(input.as_bytes())
            .unwrap();
        let hs256 = format!("{input}.{}", b64url(&mac));
        let err = verify(&hs256, &keys).unwrap_err();
        assert!(matches!(&err, JwtError::AlgRefused(a) if a == "HS256"));
        assert_eq!(
            err.to_string(),
            "algorithm HS256 is refused (only RS256, RS384, RS512, PS256, ES256, ES384)"
        );
        let no_alg = make_token(&json!({"typ": "JWT"}), &claims(), b"x");
        assert!(matches!(verify(&no_alg, &keys), Err(JwtError::NoAlg)));
    }

    fn rs256(key: &PKey<Private>, header: &Value) -> String {
        let input = make_token(header, &claims(), &[]);
        let input = input.trim_end_matches('.');
        let sig = Signer::new(MessageDigest::sha256(), key)
            .unwrap()
            .sign_oneshot_to_vec(input.as_bytes())
            .unwrap();
        format!("{input}.{}", b64url(&sig))
    }

    #[test]
    fn algorithm_must_fit_the_key() {
        let rsa = rsa_key();
        let ec = ec_key(Nid::X9_62_PRIME256V1);
        let ec_only = jwks_of(&[ec_jwk(&ec, "k", "P-256", 32)]);
        // Even signed by a real RSA key, an RS256 token cannot use an EC JWK.
        let with_kid = rs256(&rsa, &json!({"alg": "RS256", "kid": "k"}));
        assert!(matches!(
            verify(&with_kid, &ec_only),
            Err(JwtError::KeyAlgMismatch { .. })
        ));
        let without_kid = rs256(&rsa, &json!({"alg": "RS256"}));
        assert!(matches!(
            verify(&without_kid, &ec_only),
            Err(JwtError::NoKeyForAlg("RS256"))
        ));
        // A JWK pinned to RS512 does not verify RS256.
        let mut pinned = rsa_jwk(&rsa, "k");
        pinned["alg"] = json!("RS512");
        assert!(matches!(
            verify(&with_kid, &jwks_of(&[pinned])),
            Err(JwtError::KeyAlgMismatch { .. })
        ));
        assert!(verify(&with_kid, &jwks_of(&[rsa_jwk(&rsa, "k")])).is_ok());
    }

    #[test]
    fn kid_selects_the_key() {
        let first = rsa_key();
        let second = rsa_key();
        let keys = jwks_of(&[rsa_jwk(&first, "one"), rsa_jwk(&second, "two")]);
        assert!(verify(
            &rs256(&second, &json!({"alg": "RS256", "kid": "two"})),
            &keys
        )
        .is_ok());
        assert!(verify(
            &rs256(&first, &json!({"alg": "RS256", "kid": "one"})),
            &keys
        )
        .is_ok());
        // Signed by the second key but naming the first: only "one" is tried.
        assert!(matches!(
            verify(
                &rs256(&second, &json!({"alg": "RS256", "kid": "one"})),
                &keys
            ),
            Err(JwtError::BadSignature)
        ));
        let unknown = verify(
            &rs256(&first, &json!({"alg": "RS256", "kid": "three"})),
            &keys,
        );
        assert!(matches!(&unknown, Err(JwtError::NoKeyWithKid(k)) if k == "three"));
        // Without kid every fitting key is tried.
        assert!(verify(&rs256(&second, &json!({"alg": "RS256"})), &keys).is_ok());
        assert!(matches!(
            verify(&rs256(&second, &json!({"alg": "RS256", "kid": 2})), &keys),
            Err(JwtError::KidNotString)
        ));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let key = rsa_key();
        let keys = jwks_of(&[rsa_jwk(&key, "a")]);
        assert!(matches!(verify("a.b", &keys), Err(JwtError::NotThreeParts)));
        assert!(matches!(
            verify("a.b.c.d", &keys),
            Err(JwtError::NotThreeParts)
        ));
        assert!(matches!(
            verify("!!.e30.AA", &keys),
            Err(JwtError::BadHeader)
        ));
        let array_header = format!("{}.e30.AA", b64url(b"[1]"));
        assert!(matches!(
            verify(&array_header, &keys),
            Err(JwtError::BadHeader)
        ));
        let crit = rs256(&key, &json!({"alg": "RS256", "crit": ["exp"], "exp": 1}));
        assert!(matches!(verify(&crit, &keys), Err(JwtError::Crit)));
        let long = format!("{}.e30.AA", "A".repeat(MAX_TOKEN_LEN));
        assert!(matches!(verify(&long, &keys), Err(JwtError::TooLong)));
        let padded = format!("{}=", rs256(&key, &json!({"alg": "RS256"})));
        assert!(matches!(
            verify(&padded, &keys),
            Err(JwtError::BadSignatureEncoding)
        ));
        // A valid signature over a payload that is not a JSON object.
        let input = format!("{}.{}", b64url(br#"{"alg":"RS256"}"#), b64url(b"[]"));
        let sig = Signer::new(MessageDigest::sha256(), &key)
            .unwrap()
            .sign_oneshot_to_vec(input.as_bytes())
            .unwrap();
        assert!(matches!(
            verify(&format!("{input}.{}", b64url(&sig)), &keys),
            Err(JwtError::BadPayload)
        ));
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn check_times_enforces_exp_nbf_iat_with_leeway() {
        let now = 1_700_000_000;
        assert!(check_times(&obj(json!({})), now, 0).is_ok());
        assert!(check_times(
            &obj(json!({"exp": now + 1, "nbf": now, "iat": now})),
            now,
            0
        )
        .is_ok());

        let expired = check_times(&obj(json!({"exp": now})), now, 0).unwrap_err();
        assert!(matches!(expired, JwtError::Expired(_)));
        assert_eq!(expired.to_string(), "expired at 2023-11-14T22:13:20Z");
        assert!(check_times(&obj(json!({"exp": now - 30})), now, 60).is_ok());
        assert!(matches!(
            check_times(&obj(json!({"exp": now - 60})), now, 60),
            Err(JwtError::Expired(_))
        ));

        assert!(matches!(
            check_times(&obj(json!({"nbf": now + 61})), now, 60),
            Err(JwtError::NotYetValid(_))
        ));
        assert!(check_times(&obj(json!({"nbf": now + 60})), now, 60).is_ok());

        assert!(matches!(
            check_times(&obj(json!({"iat": now + 1})), now, 0),
            Err(JwtError::IssuedInFuture(_))
        ));
        assert!(check_times(&obj(json!({"iat": now as f64 + 59.5})), now, 60).is_ok());

        let string_exp = check_times(&obj(json!({"exp": (now + 600).to_string()})), now, 0);
        assert!(matches!(string_exp, Err(JwtError::NotNumeric("exp"))));
        assert!(matches!(
            check_times(&obj(json!({"nbf": null})), now, 0),
            Err(JwtError::NotNumeric("nbf"))
        ));
    }

    #[test]
    fn parse_jwks_refuses_garbage_and_weak_keys() {
        assert!(matches!(parse_jwks(b"not json"), Err(JwtError::Jwks(_))));
        assert!(matches!(parse_jwks(b"{}"), Err(JwtError::Jwks(_))));
        assert!(matches!(parse_jwks(b"[]"), Err(JwtError::Jwks(_))));
        let empty = parse_jwks(br#"{"keys":[]}"#).unwrap_err();
        assert_eq!(empty.to_string(), "JWKS: no usable signature key");

        let weak = PKey::from_rsa(Rsa::generate(1024).unwrap()).unwrap();
        let err = parse_jwks(
            json!({"keys": [rsa_jwk(&weak, "old")]})
                .to_string()
                .as_bytes(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("1024 bits refused"), "{err}");

        let mut e_one = rsa_jwk(&rsa_key(), "e1");
        e_one["e"] = json!("AQ");
        assert!(parse_jwks(json!({"keys": [e_one]}).to_string().as_bytes()).is_err());

        let mut off_curve = ec_jwk(&ec_key(Nid::X9_62_PRIME256V1), "ec", "P-256", 32);
        off_curve["y"] = off_curve["x"].clone();
        assert!(parse_jwks(json!({"keys": [off_curve]}).to_string().as_bytes()).is_err());

        let too_big = vec![b' '; MAX_JWKS_LEN + 1];
        assert!(matches!(parse_jwks(&too_big), Err(JwtError::Jwks(_))));
    }

    #[test]
    fn parse_jwks_skips_keys_not_for_signing() {
        let enc = rsa_key();
        let sig = rsa_key();
        let mut enc_jwk = rsa_jwk(&enc, "enc");
        enc_jwk["use"] = json!("enc");
        let oct = json!({"kty": "oct", "kid": "mac", "k": "c2VjcmV0"});
        let okp = json!({"kty": "OKP", "crv": "Ed25519", "x": "AAAA"});
        let mut oaep = rsa_jwk(&enc, "oaep");
        oaep["alg"] = json!("RSA-OAEP");
        let keys = jwks_of(&[enc_jwk.clone(), oct, okp, oaep, rsa_jwk(&sig, "sig")]);
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("sig"));
        // With only the encryption key there is nothing to verify with.
        assert!(parse_jwks(json!({"keys": [enc_jwk]}).to_string().as_bytes()).is_err());
        // And a token signed by the skipped key finds no key.
        let token = rs256(&enc, &json!({"alg": "RS256", "kid": "enc"}));
        assert!(matches!(
            verify(&token, &keys),
            Err(JwtError::NoKeyWithKid(_))
        ));
    }

    #[test]
    fn load_or_create_creates_private_file_and_reloads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join("pull").join("jwt-key.pem");
        let created = SigningKey::load_or_create(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(fs::read_to_string(&path)
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----"));
        let loaded = SigningKey::load_or_create(&path).unwrap();
        assert_eq!(created.kid(), loaded.kid());
        assert_eq!(created.public_jwk(), loaded.public_jwk());
        // No temporary files are left beside the key.
        let names: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
        // A token from the first instance verifies with the second's JWK.
        let token = created.sign(&claims()).unwrap();
        assert!(verify(
            &token,
            &parse_jwks(loaded.jwks().to_string().as_bytes()).unwrap()
        )
        .is_ok());
    }

    #[test]
    fn load_or_create_refuses_a_bad_file_and_leaves_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwt-key.pem");
        fs::write(&path, b"garbage").unwrap();
        let err = SigningKey::load_or_create(&path).unwrap_err();
        assert!(matches!(&err, JwtError::KeyFile { path: p, .. } if p == &path));
        assert!(err.to_string().contains("jwt-key.pem"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"garbage");

        // An EC key is not what id_tokens are signed with here.
        let ec = ec_key(Nid::X9_62_PRIME256V1)
            .private_key_to_pem_pkcs8()
            .unwrap();
        fs::write(&path, &ec).unwrap();
        assert!(matches!(
            SigningKey::load_or_create(&path),
            Err(JwtError::KeyFile { .. })
        ));
        assert_eq!(fs::read(&path).unwrap(), ec);

        // A directory where the file should be is an error too.
        let as_dir = dir.path().join("dir.pem");
        fs::create_dir(&as_dir).unwrap();
        assert!(matches!(
            SigningKey::load_or_create(&as_dir),
            Err(JwtError::KeyFile { .. })
        ));
    }
}
