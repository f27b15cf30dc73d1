//! Independent S/MIME peers for integration tests: thin wrappers around the
//! real `openssl` (3.0) and `gpgsm` (GnuPG 2.2) command-line tools.
//!
//! Only std + `tempfile`. Every fallible step returns `Err(String)` that names
//! the command and carries the tool's stderr (and `--status-fd` lines for
//! gpgsm), so tests can simply `.expect("...")`.
//!
//! What was learned with gpgsm 2.2.40 / libksba 1.6.3 on Debian 12 (checked
//! with certificates like the ones hispd issues: RSA 2048, sha256WithRSA, leaf
//! keyUsage digitalSignature+keyEncipherment, EKU emailProtection, SAN either
//! `email:alice@a.example` or only `DNS:a.example`; CA with CA:TRUE and
//! keyUsage keyCertSign+cRLSign):
//!
//! * Domain-bound certificates (DNS SAN only, no e-mail anywhere) are fully
//!   usable when addressed by their SHA-1 fingerprint (40 hex digits, as in
//!   `fpr_of`): gpgsm signs with them, encrypts to them, decrypts with them and
//!   verifies their signatures (GOODSIG/VALIDSIG/TRUST_FULLY). gpgsm lists such
//!   a SAN as the user id `(dns-name a.example)`. gpgsm never compares a
//!   signer's e-mail with anything (it does not see the RFC 5322 From:); the
//!   e-mail address is only a way to *look up* a certificate for -u / -r.
//! * gpgsm signs/encrypts only with a certificate whose chain ends in a root
//!   listed in trustlist.txt (else INV_SGNR/INV_RECP "Not trusted").
//! * Verification of a good signature under an untrusted/missing root still
//!   prints GOODSIG + VALIDSIG but then TRUST_UNDEFINED and exits with 2, so
//!   `verify_detached` demands exit 0 AND GOODSIG AND VALIDSIG AND
//!   TRUST_FULLY|TRUST_ULTIMATE, and no BADSIG/ERRSIG/EXPSIG/…/TRUST_NEVER.
//!   A bad signature gives `BADSIG <fpr> <subject>` and exit 2.
//! * gpgsm 2.2 cannot decrypt RSAES-OAEP key transport ("No secret key") nor
//!   AuthEnvelopedData / AES-GCM ("error getting IV: Buffer too short"): only
//!   RSA PKCS#1 v1.5 + AES-CBC (or 3DES) EnvelopedData works towards gpgsm.
//! * gpgsm signs with SHA-256 (we also pass `--digest-algo SHA256`; the
//!   signature algorithm OID it writes is plain rsaEncryption), adds signedAttrs
//!   contentType, signingTime, messageDigest, smimeCapabilities, and embeds
//!   the signer certificate (include-certs -2: all but the root).
//! * gpgsm encrypts with aes-128-cbc by default; with `--cipher-algo AES256`
//!   (used here) it writes aes-256-cbc, key transport rsaEncryption (v1.5).
//! * `gpgsm --verify` stores certificates embedded in a signature in its
//!   keybox, so a later `-r alice@a.example` can fail with "Ambiguous name"
//!   (INV_RECP 2) if some other certificate with that address was seen:
//!   address peers by fingerprint when a test verifies foreign signatures.
//! * gpg-agent caches a non-empty trustlist.txt; `trust_ca` therefore runs
//!   `gpgconf --reload gpg-agent` (without it a second CA stays untrusted).
//! * Without `s2k-count 65536` in gpg-agent.conf each private-key operation
//!   takes ~0.65 s (agent's calibrated passphrase KDF); with it, ~10 ms.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Any single tool invocation taking longer than this is killed and reported.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// Passphrase used for the PKCS#12 transport file and for the gpg-agent
/// protection of imported private keys.
const GPGSM_PASSPHRASE: &str = "peers-test-passphrase";

// ---------------------------------------------------------------------------
// process plumbing
// ---------------------------------------------------------------------------

struct RunOutput {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    desc: String,
}

impl RunOutput {
    fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    /// Error message naming the command, its exit status, stderr, and (if it
    /// looks like text, e.g. gpgsm status lines) stdout.
    fn failure(&self, what: &str) -> String {
        let mut msg = format!(
            "{what}: `{}` exited with {}\n--- stderr ---\n{}",
            self.desc,
            self.status,
            self.stderr_text()
        );
        if !self.stdout.is_empty()
            && self.stdout.len() < 16 * 1024
            && std::str::from_utf8(&self.stdout).is_ok()
        {
            msg.push_str("--- stdout ---\n");
            msg.push_str(&self.stdout_text());
        }
        msg
    }
    fn ok_or(self, what: &str) -> Result<RunOutput, String> {
        if self.status.success() {
            Ok(self)
        } else {
            Err(self.failure(what))
        }
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` with `stdin` fed from a thread (no pipe deadlock on big data),
/// collecting stdout and stderr, killing it after `TOOL_TIMEOUT`.
fn run(mut cmd: Command, stdin: Option<&[u8]>) -> Result<RunOutput, String> {
    let desc = describe(&cmd);
    cmd.env("LC_ALL", "C")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start `{desc}`: {e}"))?;

    let writer = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => {
            let data = data.to_vec();
            // A tool may exit without reading everything (broken pipe): the
            // exit status and stderr tell the real story, so ignore write errors.
            Some(std::thread::spawn(move || {
                let _ = pipe.write_all(&data);
            }))
        }
        _ => None,
    };
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(p) = out_pipe.as_mut() {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(p) = err_pipe.as_mut() {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    });

    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {
                if start.elapsed() > TOOL_TIMEOUT {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "`{desc}` did not finish within {TOOL_TIMEOUT:?}; killed"
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(format!("waiting for `{desc}` failed: {e}")),
        }
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout = out_reader
        .join()
        .map_err(|_| format!("stdout reader of `{desc}` panicked"))?;
    let stderr = err_reader
        .join()
        .map_err(|_| format!("stderr reader of `{desc}` panicked"))?;
    Ok(RunOutput {
        status,
        stdout,
        stderr,
        desc,
    })
}

fn scratch() -> Result<tempfile::TempDir, String> {
    tempfile::Builder::new()
        .prefix("peers-")
        .tempdir()
        .map_err(|e| format!("cannot create temp dir: {e}"))
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), String> {
    std::fs::write(path, data).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn openssl() -> Command {
    Command::new("openssl")
}

/// Normalises "aes-256-cbc" / "-aes-256-cbc" to the openssl option "-aes-256-cbc".
fn cipher_flag(cipher: &str) -> String {
    format!("-{}", cipher.trim_start_matches('-'))
}

// ---------------------------------------------------------------------------
// OpenSSL peer
// ---------------------------------------------------------------------------

/// `openssl cms -sign -md DIGEST -crlfeol -signer C -inkey K` (detached):
/// returns an S/MIME `multipart/signed` message (CRLF line ends) whose first
/// part is `content` (a full MIME entity, canonicalised to CRLF by openssl).
pub fn openssl_sign(
    content: &[u8],
    signer_cert_pem: &Path,
    signer_key_pem: &Path,
    digest: &str,
) -> Result<Vec<u8>, String> {
    let dir = scratch()?;
    let input = dir.path().join("content");
    write_file(&input, content)?;
    let mut cmd = openssl();
    cmd.args(["cms", "-sign", "-md", digest, "-crlfeol", "-signer"])
        .arg(signer_cert_pem)
        .arg("-inkey")
        .arg(signer_key_pem)
        .arg("-in")
        .arg(&input);
    Ok(run(cmd, None)?.ok_or("openssl cms -sign")?.stdout)
}

/// Detached signature as bare DER CMS SignedData over exactly `content`
/// (`-binary`, no canonicalisation), e.g. to feed `Gpgsm::verify_detached`.
pub fn openssl_sign_der_detached(
    content: &[u8],
    signer_cert_pem: &Path,
    signer_key_pem: &Path,
    digest: &str,
) -> Result<Vec<u8>, String> {
    let dir = scratch()?;
    let input = dir.path().join("content");
    write_file(&input, content)?;
    let mut cmd = openssl();
    cmd.args([
        "cms", "-sign", "-binary", "-outform", "DER", "-md", digest, "-signer",
    ])
    .arg(signer_cert_pem)
    .arg("-inkey")
    .arg(signer_key_pem)
    .arg("-in")
    .arg(&input);
    Ok(run(cmd, None)?
        .ok_or("openssl cms -sign -outform DER")?
        .stdout)
}

fn encrypt_cmd(
    input: &Path,
    recipient_certs_pem: &[&Path],
    cipher: &str,
    oaep: bool,
) -> Result<Command, String> {
    if recipient_certs_pem.is_empty() {
        return Err("openssl cms -encrypt: no recipients given".into());
    }
    let mut cmd = openssl();
    cmd.args(["cms", "-encrypt"])
        .arg(cipher_flag(cipher))
        .arg("-in")
        .arg(input);
    for r in recipient_certs_pem {
        cmd.arg("-recip").arg(r);
        if oaep {
            cmd.args(["-keyopt", "rsa_padding_mode:oaep"]);
        }
    }
    Ok(cmd)
}

/// `openssl cms -encrypt -<cipher> -recip R [-keyopt rsa_padding_mode:oaep] ... -crlfeol`:
/// S/MIME `application/pkcs7-mime` (enveloped-data, or authEnveloped-data for
/// aes-*-gcm). `cipher` is e.g. "aes-128-cbc", "aes-256-cbc", "aes-256-gcm".
pub fn openssl_encrypt(
    content: &[u8],
    recipient_certs_pem: &[&Path],
    cipher: &str,
    oaep: bool,
) -> Result<Vec<u8>, String> {
    let dir = scratch()?;
    let input = dir.path().join("content");
    write_file(&input, content)?;
    let mut cmd = encrypt_cmd(&input, recipient_certs_pem, cipher, oaep)?;
    cmd.arg("-crlfeol");
    Ok(run(cmd, None)?.ok_or("openssl cms -encrypt")?.stdout)
}

/// Like `openssl_encrypt` but bare DER CMS over exactly `content` (`-binary
/// -outform DER`), e.g. to feed `Gpgsm::decrypt`.
pub fn openssl_encrypt_der(
    content: &[u8],
    recipient_certs_pem: &[&Path],
    cipher: &str,
    oaep: bool,
) -> Result<Vec<u8>, String> {
    let dir = scratch()?;
    let input = dir.path().join("content");
    write_file(&input, content)?;
    let mut cmd = encrypt_cmd(&input, recipient_certs_pem, cipher, oaep)?;
    cmd.args(["-binary", "-outform", "DER"]);
    Ok(run(cmd, None)?
        .ok_or("openssl cms -encrypt -outform DER")?
        .stdout)
}

fn decrypt_impl(
    input_bytes: &[u8],
    cert_pem: &Path,
    key_pem: &Path,
    der: bool,
) -> Result<Vec<u8>, String> {
    let dir = scratch()?;
    let input = dir.path().join("in");
    write_file(&input, input_bytes)?;
    let mut cmd = openssl();
    cmd.args([
        "cms",
        "-decrypt",
        "-inform",
        if der { "DER" } else { "SMIME" },
    ]);
    if der {
        cmd.arg("-binary");
    }
    cmd.arg("-recip")
        .arg(cert_pem)
        .arg("-inkey")
        .arg(key_pem)
        .arg("-in")
        .arg(&input);
    Ok(run(cmd, None)?.ok_or("openssl cms -decrypt")?.stdout)
}

/// `openssl cms -decrypt -recip C -inkey K` of an S/MIME message; returns the
/// decrypted MIME entity.
pub fn openssl_decrypt(smime: &[u8], cert_pem: &Path, key_pem: &Path) -> Result<Vec<u8>, String> {
    decrypt_impl(smime, cert_pem, key_pem, false)
}

/// `openssl cms -decrypt -inform DER -binary` of bare CMS (e.g. from gpgsm).
pub fn openssl_decrypt_der(der: &[u8], cert_pem: &Path, key_pem: &Path) -> Result<Vec<u8>, String> {
    decrypt_impl(der, cert_pem, key_pem, true)
}

/// `openssl cms -verify -CAfile CA` of an S/MIME signed message (multipart/
/// signed or opaque pkcs7-mime signed-data). Only `ca_file_pem` is trusted
/// (system CA dir/store are disabled). Returns the signed content as bytes;
/// Err when verification fails.
pub fn openssl_verify(smime_signed: &[u8], ca_file_pem: &Path) -> Result<Vec<u8>, String> {
    let dir = scratch()?;
    let input = dir.path().join("in");
    write_file(&input, smime_signed)?;
    let mut cmd = openssl();
    cmd.args([
        "cms",
        "-verify",
        "-inform",
        "SMIME",
        "-no-CApath",
        "-no-CAstore",
        "-CAfile",
    ])
    .arg(ca_file_pem)
    .arg("-in")
    .arg(&input);
    Ok(run(cmd, None)?.ok_or("openssl cms -verify")?.stdout)
}

/// Verifies a bare DER detached signature (e.g. from gpgsm) over exactly
/// `content`: `openssl cms -verify -inform DER -content F -binary -CAfile CA`.
/// Returns the content on success.
pub fn openssl_verify_der_detached(
    signature_der: &[u8],
    content: &[u8],
    ca_file_pem: &Path,
) -> Result<Vec<u8>, String> {
    let dir = scratch()?;
    let sig = dir.path().join("sig.der");
    let data = dir.path().join("content");
    write_file(&sig, signature_der)?;
    write_file(&data, content)?;
    let mut cmd = openssl();
    cmd.args([
        "cms",
        "-verify",
        "-inform",
        "DER",
        "-binary",
        "-no-CApath",
        "-no-CAstore",
        "-CAfile",
    ])
    .arg(ca_file_pem)
    .arg("-in")
    .arg(&sig)
    .arg("-content")
    .arg(&data);
    Ok(run(cmd, None)?
        .ok_or("openssl cms -verify -inform DER")?
        .stdout)
}

/// `openssl cms -cmsout -print -inform DER|SMIME`: a textual dump in which
/// tests can look for algorithm names (e.g. "aes-256-cbc", "rsaesOaep",
/// "sha256", "id-smime-ct-authEnvelopedData").
pub fn openssl_cms_print(smime_or_der: &[u8], is_der: bool) -> Result<String, String> {
    let dir = scratch()?;
    let input = dir.path().join("in");
    write_file(&input, smime_or_der)?;
    let mut cmd = openssl();
    cmd.args([
        "cms",
        "-cmsout",
        "-print",
        "-noout",
        "-inform",
        if is_der { "DER" } else { "SMIME" },
        "-in",
    ])
    .arg(&input);
    let out = run(cmd, None)?.ok_or("openssl cms -cmsout -print")?;
    Ok(out.stdout_text())
}

/// SHA-1 fingerprint of a PEM certificate as 40 upper-case hex digits (the
/// form gpgsm accepts for -u / -r and prints in status lines).
pub fn fpr_of(cert_pem: &Path) -> Result<String, String> {
    Ok(sha1_fingerprint_colons(cert_pem)?.replace(':', ""))
}

/// SHA-1 fingerprint as "AA:BB:..." (the trustlist.txt form).
fn sha1_fingerprint_colons(cert_pem: &Path) -> Result<String, String> {
    let mut cmd = openssl();
    cmd.args(["x509", "-noout", "-fingerprint", "-sha1", "-in"])
        .arg(cert_pem);
    let out = run(cmd, None)?.ok_or("openssl x509 -fingerprint")?;
    let text = out.stdout_text();
    let fp = text
        .trim()
        .rsplit_once('=')
        .map(|(_, fp)| fp.trim().to_ascii_uppercase())
        .ok_or_else(|| format!("unexpected fingerprint output: {text:?}"))?;
    if fp.len() != 59 || !fp.chars().all(|c| c == ':' || c.is_ascii_hexdigit()) {
        return Err(format!("unexpected fingerprint output: {text:?}"));
    }
    Ok(fp)
}

// ---------------------------------------------------------------------------
// Test PKI made with the openssl CLI (shaped like what hispd issues)
// ---------------------------------------------------------------------------

/// A certificate and its unencrypted PKCS#8 private key, both PEM files.
#[derive(Clone, Debug)]
pub struct TestCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn unique_serial() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // positive, < 20 octets
    format!(
        "0x{:x}{:05x}{:04x}",
        nanos & 0xffff_ffff_ffff_ffff,
        std::process::id() & 0xfffff,
        n & 0xffff
    )
}

const CA_EXT: &str = "[req]\ndistinguished_name=dn\n[dn]\n[v3_ca]\n\
basicConstraints=critical,CA:TRUE\n\
keyUsage=critical,keyCertSign,cRLSign\n\
subjectKeyIdentifier=hash\n\
authorityKeyIdentifier=keyid:always\n";

/// Self-signed RSA-2048 / SHA-256 CA: `<dir>/<name>.pem`, `<dir>/<name>.key`,
/// basicConstraints critical CA:TRUE, keyUsage critical keyCertSign,cRLSign.
/// `subject` is an openssl -subj string such as "/CN=Test CA/O=Example".
pub fn openssl_make_ca(dir: &Path, name: &str, subject: &str) -> Result<TestCert, String> {
    let cfg = dir.join(format!("{name}.ca.cnf"));
    write_file(&cfg, CA_EXT.as_bytes())?;
    let tc = TestCert {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    let mut cmd = openssl();
    cmd.args([
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3650", "-subj",
        subject,
    ])
    .args(["-set_serial", &unique_serial()])
    .arg("-config")
    .arg(&cfg)
    .args(["-extensions", "v3_ca", "-keyout"])
    .arg(&tc.key)
    .arg("-out")
    .arg(&tc.cert);
    run(cmd, None)?.ok_or("openssl req -x509 (CA)")?;
    Ok(tc)
}

/// RSA-2048 end-entity certificate signed (SHA-256) by `ca`:
/// keyUsage critical digitalSignature,keyEncipherment; extendedKeyUsage
/// emailProtection; subjectAltName `san`, e.g. "email:alice@a.example"
/// (address-bound) or "DNS:a.example" (domain-bound).
pub fn openssl_make_leaf(
    dir: &Path,
    name: &str,
    ca: &TestCert,
    subject: &str,
    san: &str,
) -> Result<TestCert, String> {
    let ext = dir.join(format!("{name}.ext.cnf"));
    let csr = dir.join(format!("{name}.csr"));
    write_file(
        &ext,
        format!(
            "[leaf]\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=emailProtection\n\
             subjectAltName={san}\n\
             subjectKeyIdentifier=hash\n\
             authorityKeyIdentifier=keyid,issuer\n"
        )
        .as_bytes(),
    )?;
    let tc = TestCert {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    let mut req = openssl();
    req.args([
        "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout",
    ])
    .arg(&tc.key)
    .arg("-out")
    .arg(&csr);
    run(req, None)?.ok_or("openssl req -new (leaf)")?;
    let mut sign = openssl();
    sign.args([
        "x509",
        "-req",
        "-sha256",
        "-days",
        "825",
        "-set_serial",
        &unique_serial(),
        "-in",
    ])
    .arg(&csr)
    .arg("-CA")
    .arg(&ca.cert)
    .arg("-CAkey")
    .arg(&ca.key)
    .arg("-extfile")
    .arg(&ext)
    .args(["-extensions", "leaf", "-out"])
    .arg(&tc.cert);
    run(sign, None)?.ok_or("openssl x509 -req (leaf)")?;
    Ok(tc)
}

// ---------------------------------------------------------------------------
// gpgsm peer
// ---------------------------------------------------------------------------

/// A gpgsm instance with its own GNUPGHOME (mode 0700) and its own gpg-agent,
/// fully offline (no dirmngr, no CRL/OCSP, no common-certs import).
pub struct Gpgsm {
    home: tempfile::TempDir,
}

/// Parsed `--status-fd` lines: ("GOODSIG", "FPR rest…").
fn status_lines(stdout: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("[GNUPG:] "))
        .map(|l| match l.split_once(' ') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (l.to_string(), String::new()),
        })
        .collect()
}

fn has_status(st: &[(String, String)], key: &str) -> bool {
    st.iter().any(|(k, _)| k == key)
}

impl Gpgsm {
    pub fn new() -> Result<Gpgsm, String> {
        let home = tempfile::Builder::new()
            .prefix("gpgsm-")
            .tempdir()
            .map_err(|e| format!("cannot create GNUPGHOME: {e}"))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700))
                .map_err(|e| format!("chmod 700 {}: {e}", home.path().display()))?;
        }
        write_file(
            &home.path().join("gpg-agent.conf"),
            b"allow-loopback-pinentry\n\
              # minimum KDF work for the agent's key protection: ~10 ms instead of ~0.65 s per op\n\
              s2k-count 65536\n\
              disable-scdaemon\n",
        )?;
        write_file(
            &home.path().join("gpgsm.conf"),
            b"disable-crl-checks\n\
              disable-trusted-cert-crl-check\n\
              disable-ocsp\n\
              disable-dirmngr\n\
              disable-policy-checks\n\
              no-common-certs-import\n",
        )?;
        let g = Gpgsm { home };
        // Creates pubring.kbx and proves the config files parse.
        let mut cmd = g.cmd();
        cmd.arg("--list-keys");
        run(cmd, None)?.ok_or("gpgsm --list-keys (initialising GNUPGHOME)")?;
        Ok(g)
    }

    pub fn home(&self) -> &Path {
        self.home.path()
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("gpgsm");
        c.env("GNUPGHOME", self.home.path())
            .env_remove("GPG_AGENT_INFO")
            .env_remove("DISPLAY")
            .args(["--batch", "--no-tty", "--status-fd", "1"]);
        c
    }

    /// Command for operations that need the private key: the passphrase is
    /// written to stdin (so data must come from files).
    fn cmd_with_passphrase(&self) -> Command {
        let mut c = self.cmd();
        c.args(["--pinentry-mode", "loopback", "--passphrase-fd", "0"]);
        c
    }

    fn passphrase_stdin() -> Vec<u8> {
        format!("{GPGSM_PASSPHRASE}\n").into_bytes()
    }

    fn scratch(&self) -> Result<tempfile::TempDir, String> {
        scratch()
    }

    /// Imports the CA certificate and marks it as a trusted root
    /// ("<SHA-1 fp with colons> S relax" in trustlist.txt).
    pub fn trust_ca(&self, ca_cert_pem: &Path) -> Result<(), String> {
        self.import_cert(ca_cert_pem)?;
        let fp = sha1_fingerprint_colons(ca_cert_pem)?;
        let path = self.home.path().join("trustlist.txt");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        writeln!(f, "{fp} S relax").map_err(|e| format!("write {}: {e}", path.display()))?;
        drop(f);
        // A running agent caches a non-empty trustlist: ask it to re-read.
        // (Does not start an agent; errors are irrelevant.)
        let mut reload = Command::new("gpgconf");
        reload
            .env("GNUPGHOME", self.home.path())
            .args(["--reload", "gpg-agent"]);
        let _ = run(reload, None);
        Ok(())
    }

    /// Imports a certificate (PEM or DER) without private key.
    pub fn import_cert(&self, cert_pem: &Path) -> Result<(), String> {
        let mut cmd = self.cmd();
        cmd.arg("--import").arg(cert_pem);
        let out = run(cmd, None)?.ok_or("gpgsm --import")?;
        if !has_status(&status_lines(&out.stdout), "IMPORT_OK") {
            return Err(out.failure("gpgsm --import: no IMPORT_OK"));
        }
        Ok(())
    }

    /// Imports certificate + private key via a PKCS#12 file made the only way
    /// gpgsm 2.2 accepts (`-certpbe NONE -keypbe PBE-SHA1-3DES -macalg sha1`).
    pub fn import_identity(&self, cert_pem: &Path, key_pem: &Path) -> Result<(), String> {
        // gpgsm 2.2's PKCS#12 reader now and then fails to decrypt a file
        // that openssl wrote with the right passphrase ("error parsing or
        // decrypting the PKCS#12 file"; seen once in about thirty runs): a
        // fresh export (new salt and IV) imports. Any other error is final.
        let mut last = String::new();
        for _ in 0..3 {
            match self.import_identity_once(cert_pem, key_pem) {
                Ok(()) => return Ok(()),
                Err(e) if e.contains("error parsing or decrypting the PKCS#12") => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    fn import_identity_once(&self, cert_pem: &Path, key_pem: &Path) -> Result<(), String> {
        let dir = self.scratch()?;
        let p12 = dir.path().join("identity.p12");
        let mut export = openssl();
        export
            .args([
                "pkcs12",
                "-export",
                "-certpbe",
                "NONE",
                "-keypbe",
                "PBE-SHA1-3DES",
                "-macalg",
                "sha1",
            ])
            .arg("-passout")
            .arg(format!("pass:{GPGSM_PASSPHRASE}"))
            .arg("-in")
            .arg(cert_pem)
            .arg("-inkey")
            .arg(key_pem)
            .arg("-out")
            .arg(&p12);
        run(export, None)?.ok_or("openssl pkcs12 -export")?;

        let mut cmd = self.cmd_with_passphrase();
        cmd.arg("--import").arg(&p12);
        let out = run(cmd, Some(&Self::passphrase_stdin()))?.ok_or("gpgsm --import (PKCS#12)")?;
        // IMPORT_RES count no_user_id imported imported_rsa unchanged n_uids
        //            n_subk n_sigs n_revoc sec_read sec_imported sec_dups
        //            skipped_new_keys not_imported
        let st = status_lines(&out.stdout);
        let res = st
            .iter()
            .find(|(k, _)| k == "IMPORT_RES")
            .map(|(_, v)| {
                v.split_whitespace()
                    .map(|n| n.parse::<u64>().unwrap_or(0))
                    .collect::<Vec<_>>()
            })
            .ok_or_else(|| out.failure("gpgsm --import (PKCS#12): no IMPORT_RES"))?;
        let field = |i: usize| res.get(i).copied().unwrap_or(0);
        if field(9) == 0 || field(10) + field(11) == 0 || field(13) != 0 {
            return Err(out.failure("gpgsm --import (PKCS#12): secret key not imported"));
        }
        Ok(())
    }

    /// Detached signature, bare DER CMS SignedData, SHA-256. `signer` is an
    /// e-mail address or a 40-hex SHA-1 fingerprint (see `fpr_of`).
    pub fn sign_detached(&self, data: &[u8], signer_email_or_fpr: &str) -> Result<Vec<u8>, String> {
        let dir = self.scratch()?;
        let input = dir.path().join("data");
        let output = dir.path().join("sig.der");
        write_file(&input, data)?;
        let mut cmd = self.cmd_with_passphrase();
        cmd.args([
            "--digest-algo",
            "SHA256",
            "--local-user",
            signer_email_or_fpr,
            "--output",
        ])
        .arg(&output)
        .arg("--detach-sign")
        .arg(&input);
        let out = run(cmd, Some(&Self::passphrase_stdin()))?.ok_or("gpgsm --detach-sign")?;
        if !has_status(&status_lines(&out.stdout), "SIG_CREATED") {
            return Err(out.failure("gpgsm --detach-sign: no SIG_CREATED"));
        }
        read_file(&output)
    }

    /// Verifies a bare DER detached signature over `data`; Ok only for a good
    /// signature whose chain ends in a root from `trust_ca`.
    pub fn verify_detached(&self, signature_der: &[u8], data: &[u8]) -> Result<(), String> {
        self.verify_detached_signer(signature_der, data).map(|_| ())
    }

    /// As `verify_detached`, returning the signer's SHA-1 fingerprint (from
    /// VALIDSIG; upper-case hex, no colons).
    pub fn verify_detached_signer(
        &self,
        signature_der: &[u8],
        data: &[u8],
    ) -> Result<String, String> {
        let dir = self.scratch()?;
        let sig = dir.path().join("sig.der");
        let input = dir.path().join("data");
        write_file(&sig, signature_der)?;
        write_file(&input, data)?;
        let mut cmd = self.cmd();
        cmd.arg("--verify").arg(&sig).arg(&input);
        let out = run(cmd, None)?;
        let st = status_lines(&out.stdout);
        const BAD: [&str; 8] = [
            "BADSIG",
            "ERRSIG",
            "EXPSIG",
            "EXPKEYSIG",
            "REVKEYSIG",
            "TRUST_UNDEFINED",
            "TRUST_NEVER",
            "TRUST_MARGINAL",
        ];
        if let Some((k, _)) = st.iter().find(|(k, _)| BAD.contains(&k.as_str())) {
            return Err(out.failure(&format!("gpgsm --verify: {k}")));
        }
        if !out.status.success() {
            return Err(out.failure("gpgsm --verify"));
        }
        let n_sigs = st.iter().filter(|(k, _)| k == "NEWSIG").count();
        let goods = st.iter().filter(|(k, _)| k == "GOODSIG").count();
        let trusted = st
            .iter()
            .filter(|(k, _)| k == "TRUST_FULLY" || k == "TRUST_ULTIMATE")
            .count();
        let valid: Vec<&String> = st
            .iter()
            .filter(|(k, _)| k == "VALIDSIG")
            .map(|(_, v)| v)
            .collect();
        if n_sigs == 0 || goods != n_sigs || valid.len() != n_sigs || trusted != n_sigs {
            return Err(
                out.failure("gpgsm --verify: not every signature is GOODSIG+VALIDSIG+TRUST_FULLY")
            );
        }
        valid[0]
            .split_whitespace()
            .next()
            .map(str::to_string)
            .ok_or_else(|| out.failure("gpgsm --verify: malformed VALIDSIG"))
    }

    /// Bare DER CMS EnvelopedData (AES-256-CBC, RSA PKCS#1 v1.5 key transport).
    pub fn encrypt(&self, data: &[u8], recipient_email_or_fpr: &str) -> Result<Vec<u8>, String> {
        self.encrypt_to(data, &[recipient_email_or_fpr])
    }

    /// As `encrypt`, for several recipients.
    pub fn encrypt_to(&self, data: &[u8], recipients: &[&str]) -> Result<Vec<u8>, String> {
        if recipients.is_empty() {
            return Err("gpgsm --encrypt: no recipients given".into());
        }
        let dir = self.scratch()?;
        let input = dir.path().join("data");
        let output = dir.path().join("enc.der");
        write_file(&input, data)?;
        let mut cmd = self.cmd();
        cmd.args(["--cipher-algo", "AES256"]);
        for r in recipients {
            cmd.args(["--recipient", r]);
        }
        cmd.arg("--output")
            .arg(&output)
            .arg("--encrypt")
            .arg(&input);
        let out = run(cmd, None)?.ok_or("gpgsm --encrypt")?;
        let st = status_lines(&out.stdout);
        if has_status(&st, "INV_RECP") || has_status(&st, "FAILURE") {
            return Err(out.failure("gpgsm --encrypt: invalid recipient"));
        }
        let der = read_file(&output)?;
        if der.is_empty() {
            return Err(out.failure("gpgsm --encrypt: empty output"));
        }
        Ok(der)
    }

    /// Decrypts bare DER CMS EnvelopedData. (gpgsm 2.2: RSA PKCS#1 v1.5 key
    /// transport only, no OAEP, no AuthEnvelopedData/AES-GCM.)
    pub fn decrypt(&self, der: &[u8]) -> Result<Vec<u8>, String> {
        let dir = self.scratch()?;
        let input = dir.path().join("enc.der");
        let output = dir.path().join("plain");
        write_file(&input, der)?;
        let mut cmd = self.cmd_with_passphrase();
        cmd.arg("--output")
            .arg(&output)
            .arg("--decrypt")
            .arg(&input);
        let out = run(cmd, Some(&Self::passphrase_stdin()))?;
        let st = status_lines(&out.stdout);
        if !out.status.success()
            || has_status(&st, "DECRYPTION_FAILED")
            || !has_status(&st, "DECRYPTION_OKAY")
        {
            return Err(out.failure("gpgsm --decrypt"));
        }
        read_file(&output)
    }
}

impl Drop for Gpgsm {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .env("GNUPGHOME", self.home.path())
            .args(["--kill", "gpg-agent"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
