//! Private certificates from disk: PEM files (certificates and keys in any
//! files of a directory, matched by public key) and PKCS#12 files.

use super::PrivateCredential;
use crate::pki::Credential;
use openssl::pkcs12::Pkcs12;
use openssl::pkey::{PKey, Private};
use openssl::x509::X509;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {why}")]
    Bad { path: PathBuf, why: String },
}

fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    fs::read(path).map_err(|error| KeyError::Io {
        path: path.to_path_buf(),
        error,
    })
}

/// Splits PEM text into its certificates and private keys.
fn pem_items(path: &Path, data: &[u8]) -> Result<(Vec<X509>, Vec<PKey<Private>>), KeyError> {
    let text = String::from_utf8_lossy(data);
    let mut certs = Vec::new();
    let mut keys = Vec::new();
    let mut rest: &str = &text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let block = &rest[start..];
        let label_end = block[11..]
            .find("-----")
            .map(|i| i + 11)
            .ok_or_else(|| KeyError::Bad {
                path: path.to_path_buf(),
                why: "unterminated PEM header".into(),
            })?;
        let label = &block[11..label_end];
        let end_marker = format!("-----END {label}-----");
        let end = block.find(&end_marker).ok_or_else(|| KeyError::Bad {
            path: path.to_path_buf(),
            why: format!("PEM block {label} has no END line"),
        })? + end_marker.len();
        let pem = &block[..end];
        let bad = |what: &str, e: openssl::error::ErrorStack| KeyError::Bad {
            path: path.to_path_buf(),
            why: format!("bad {what}: {}", crate::smime::openssl_reason(&e)),
        };
        if label == "CERTIFICATE" {
            certs.push(X509::from_pem(pem.as_bytes()).map_err(|e| bad("certificate", e))?);
        } else if label.ends_with("PRIVATE KEY") {
            if label.starts_with("ENCRYPTED") {
                return Err(KeyError::Bad {
                    path: path.to_path_buf(),
                    why: "encrypted private keys are not supported in PEM; use PKCS#12 with a password".into(),
                });
            }
            keys.push(
                PKey::private_key_from_pem(pem.as_bytes()).map_err(|e| bad("private key", e))?,
            );
        }
        rest = &block[end..];
    }
    Ok((certs, keys))
}

/// Pairs each key with the certificate that holds its public key; the other
/// certificates become the chain.
fn pair(
    certs: Vec<X509>,
    keys: Vec<PKey<Private>>,
    source: &Path,
) -> Result<Vec<PrivateCredential>, KeyError> {
    let mut out = Vec::new();
    for key in keys {
        let leaf = certs
            .iter()
            .find(|c| c.public_key().map(|p| p.public_eq(&key)).unwrap_or(false));
        let Some(leaf) = leaf else {
            return Err(KeyError::Bad {
                path: source.to_path_buf(),
                why: "a private key has no matching certificate".into(),
            });
        };
        let leaf_der = leaf.to_der().unwrap_or_default();
        let chain = certs
            .iter()
            .filter(|c| c.to_der().unwrap_or_default() != leaf_der)
            .filter(|c| c.subject_name().to_der().ok() != c.issuer_name().to_der().ok())
            .cloned()
            .collect();
        out.push(PrivateCredential::new(
            Credential {
                cert: leaf.clone(),
                key,
                chain,
            },
            source.display().to_string(),
        ));
    }
    Ok(out)
}

/// Credentials from PEM files given together (certificate and key may be in
/// the same file or in separate ones).
pub fn load_pem_credentials(files: &[&Path]) -> Result<Vec<PrivateCredential>, KeyError> {
    let mut certs = Vec::new();
    let mut keys = Vec::new();
    for f in files {
        let (c, k) = pem_items(f, &read(f)?)?;
        certs.extend(c);
        keys.extend(k);
    }
    let source = files.first().copied().unwrap_or(Path::new(""));
    if keys.is_empty() {
        return Err(KeyError::Bad {
            path: source.to_path_buf(),
            why: "no private key found".into(),
        });
    }
    pair(certs, keys, source)
}

/// Every PEM credential in a directory (files ending .pem, .crt, .key).
pub fn load_private_dir(dir: &Path) -> Result<Vec<PrivateCredential>, KeyError> {
    let entries = fs::read_dir(dir).map_err(|error| KeyError::Io {
        path: dir.to_path_buf(),
        error,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension()
                        .and_then(|e| e.to_str())
                        .map(|e| e.to_ascii_lowercase())
                        .as_deref(),
                    Some("pem" | "crt" | "key")
                )
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let mut certs = Vec::new();
    let mut keys = Vec::new();
    for f in &files {
        let (c, k) = pem_items(f, &read(f)?)?;
        certs.extend(c);
        keys.extend(k);
    }
    pair(certs, keys, dir)
}

/// OpenSSL 3 keeps RC2 and DES PBEs (used by older PKCS#12 files, such as
/// those of the .NET reference implementation) in its legacy provider.
fn load_legacy_provider() -> bool {
    static LOADED: OnceLock<bool> = OnceLock::new();
    *LOADED.get_or_init(|| {
        let default = openssl::provider::Provider::load(None, "default");
        let legacy = openssl::provider::Provider::load(None, "legacy");
        match (default, legacy) {
            (Ok(d), Ok(l)) => {
                // Providers must stay loaded for the life of the process.
                std::mem::forget(d);
                std::mem::forget(l);
                true
            }
            _ => false,
        }
    })
}

/// A PKCS#12 file with its password.
pub fn load_pkcs12(path: &Path, password: &str) -> Result<PrivateCredential, KeyError> {
    let data = read(path)?;
    let bad = |why: String| KeyError::Bad {
        path: path.to_path_buf(),
        why,
    };
    let p12 = Pkcs12::from_der(&data).map_err(|e| {
        bad(format!(
            "not a PKCS#12 file: {}",
            crate::smime::openssl_reason(&e)
        ))
    })?;
    let parsed = match p12.parse2(password) {
        Ok(p) => p,
        Err(first) => {
            if !load_legacy_provider() {
                return Err(bad(format!(
                    "cannot open (wrong password?): {}",
                    crate::smime::openssl_reason(&first)
                )));
            }
            p12.parse2(password).map_err(|e| {
                bad(format!(
                    "cannot open (wrong password?): {}",
                    crate::smime::openssl_reason(&e)
                ))
            })?
        }
    };
    let cert = parsed
        .cert
        .ok_or_else(|| bad("no certificate inside".into()))?;
    let key = parsed
        .pkey
        .ok_or_else(|| bad("no private key inside".into()))?;
    let chain = parsed
        .ca
        .map(|s| s.into_iter().collect())
        .unwrap_or_default();
    Ok(PrivateCredential::new(
        Credential { cert, key, chain },
        path.display().to_string(),
    ))
}
