//! Anchor management on disk (`hispd anchors ...`): the anchor files of each
//! local domain and direction, as laid out in certs/README.md.

use crate::config::DomainConfig;
use crate::trust::{self, CertSummary};
use openssl::x509::X509;
use serde::Serialize;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum AnchorAdminError {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("{0} is not a configured local domain")]
    NoSuchDomain(String),
    #[error("no anchor with fingerprint {0}")]
    NotFound(String),
    #[error("fingerprint prefix {prefix} matches {count} anchors: give more digits")]
    Ambiguous { prefix: String, count: usize },
    #[error("give at least 8 hex digits of the SHA-256 fingerprint (got {0:?})")]
    ShortFingerprint(String),
    #[error("{fingerprint} is already an anchor of {domain} ({direction}) in {path}")]
    Exists {
        fingerprint: String,
        domain: String,
        direction: String,
        path: PathBuf,
    },
    #[error("direction {0:?}: use in, out or both")]
    Direction(String),
}

/// One anchor as `anchors list` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct AnchorEntry {
    pub domain: String,
    /// "incoming", "outgoing" or "both".
    pub direction: String,
    /// The file it is in (or "bundle NAME").
    pub source: String,
    #[serde(flatten)]
    pub certificate: CertSummary,
}

fn direction_dirs(d: &DomainConfig) -> Vec<(&'static str, PathBuf)> {
    vec![
        ("incoming", d.dir.join("anchors/incoming")),
        ("outgoing", d.dir.join("anchors/outgoing")),
        ("both", d.dir.join("anchors/both")),
    ]
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|e| {
            e.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.retain(|p| {
        let n = p
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        !n.starts_with('.') && !n.starts_with("readme")
    });
    files.sort();
    files
}

/// Every anchor file certificate of the given domains.
pub fn list(domains: &[DomainConfig]) -> Vec<(AnchorEntry, PathBuf)> {
    let mut out = Vec::new();
    for d in domains {
        for (direction, dir) in direction_dirs(d) {
            for file in files_in(&dir) {
                let Ok(certs) = trust::read_certificates(&file) else {
                    continue;
                };
                for c in certs {
                    out.push((
                        AnchorEntry {
                            domain: d.name.clone(),
                            direction: direction.into(),
                            source: file.display().to_string(),
                            certificate: CertSummary::of(&c),
                        },
                        file.clone(),
                    ));
                }
            }
        }
    }
    out
}

fn normalize_fp(fp: &str) -> Result<String, AnchorAdminError> {
    let clean: String = fp
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    if clean.len() < 8 || !clean.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(AnchorAdminError::ShortFingerprint(fp.to_string()));
    }
    Ok(clean)
}

/// The anchors whose fingerprint starts with `fingerprint`.
pub fn find(
    domains: &[DomainConfig],
    fingerprint: &str,
) -> Result<Vec<(AnchorEntry, PathBuf)>, AnchorAdminError> {
    let fp = normalize_fp(fingerprint)?;
    let found: Vec<_> = list(domains)
        .into_iter()
        .filter(|(e, _)| e.certificate.fingerprint.starts_with(&fp))
        .collect();
    let distinct: std::collections::HashSet<&str> = found
        .iter()
        .map(|(e, _)| e.certificate.fingerprint.as_str())
        .collect();
    match distinct.len() {
        0 => Err(AnchorAdminError::NotFound(fingerprint.to_string())),
        1 => Ok(found),
        n => Err(AnchorAdminError::Ambiguous {
            prefix: fingerprint.to_string(),
            count: n,
        }),
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), AnchorAdminError> {
    let err = |e: std::io::Error| AnchorAdminError::File {
        path: path.to_path_buf(),
        why: e.to_string(),
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(err)?;
    }
    let tmp = path.with_extension("tmp-hispd");
    let mut f = fs::File::create(&tmp).map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

/// Adds the certificates of `file` as anchors of `domain` in `direction`
/// ("in", "out" or "both"); returns the files written.
pub fn add(
    domains: &[DomainConfig],
    file: &Path,
    domain: &str,
    direction: &str,
) -> Result<Vec<PathBuf>, AnchorAdminError> {
    let sub = match direction {
        "in" | "incoming" => "incoming",
        "out" | "outgoing" => "outgoing",
        "both" => "both",
        other => return Err(AnchorAdminError::Direction(other.to_string())),
    };
    let d = domains
        .iter()
        .find(|d| d.name.eq_ignore_ascii_case(domain))
        .ok_or_else(|| AnchorAdminError::NoSuchDomain(domain.to_string()))?;
    let certs = trust::read_certificates(file).map_err(|e| AnchorAdminError::File {
        path: file.to_path_buf(),
        why: e.to_string(),
    })?;
    let existing = list(std::slice::from_ref(d));
    let mut written = Vec::new();
    for c in certs {
        let fp = trust::fingerprint(&c);
        if let Some((e, path)) = existing.iter().find(|(e, _)| {
            e.certificate.fingerprint == fp && (e.direction == sub || e.direction == "both")
        }) {
            return Err(AnchorAdminError::Exists {
                fingerprint: fp,
                domain: d.name.clone(),
                direction: e.direction.clone(),
                path: path.clone(),
            });
        }
        let path = d
            .dir
            .join("anchors")
            .join(sub)
            .join(format!("{}.pem", &fp[..16]));
        let pem = c.to_pem().map_err(|e| AnchorAdminError::File {
            path: file.to_path_buf(),
            why: e.to_string(),
        })?;
        write_atomic(&path, &pem)?;
        written.push(path);
    }
    Ok(written)
}

/// Removes an anchor (every copy of it); files holding other certificates
/// too are rewritten without it. Returns the files changed.
pub fn remove(
    domains: &[DomainConfig],
    fingerprint: &str,
) -> Result<Vec<PathBuf>, AnchorAdminError> {
    let found = find(domains, fingerprint)?;
    let mut changed = Vec::new();
    for (entry, path) in found {
        if changed.contains(&path) {
            continue;
        }
        let certs = trust::read_certificates(&path).map_err(|e| AnchorAdminError::File {
            path: path.clone(),
            why: e.to_string(),
        })?;
        let keep: Vec<X509> = certs
            .into_iter()
            .filter(|c| trust::fingerprint(c) != entry.certificate.fingerprint)
            .collect();
        if keep.is_empty() {
            fs::remove_file(&path).map_err(|e| AnchorAdminError::File {
                path: path.clone(),
                why: e.to_string(),
            })?;
        } else {
            let mut pem = Vec::new();
            for c in &keep {
                pem.extend(c.to_pem().map_err(|e| AnchorAdminError::File {
                    path: path.clone(),
                    why: e.to_string(),
                })?);
            }
            write_atomic(&path, &pem)?;
        }
        changed.push(path);
    }
    Ok(changed)
}

/// A fingerprint of what is in the anchor and key directories (names, sizes,
/// modification times): the daemon reloads when it changes.
pub fn directory_signature(domains: &[DomainConfig]) -> String {
    let mut parts = Vec::new();
    for d in domains {
        let mut dirs: Vec<PathBuf> = direction_dirs(d).into_iter().map(|(_, p)| p).collect();
        dirs.extend(d.incoming_anchors.iter().cloned());
        dirs.extend(d.outgoing_anchors.iter().cloned());
        dirs.push(d.dir.join("private"));
        dirs.sort();
        dirs.dedup();
        for dir in dirs {
            let files = if dir.is_file() {
                vec![dir.clone()]
            } else {
                files_in(&dir)
            };
            for f in files {
                let meta = fs::metadata(&f).ok();
                let mtime = meta
                    .as_ref()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                parts.push(format!(
                    "{}|{}|{mtime}",
                    f.display(),
                    meta.map(|m| m.len()).unwrap_or(0)
                ));
            }
        }
    }
    parts.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki;

    fn domain(dir: &Path) -> DomainConfig {
        DomainConfig {
            name: "a.example".into(),
            edge_relay: None,
            routes: Vec::new(),
            dir: dir.to_path_buf(),
            incoming_anchors: vec![dir.join("anchors/incoming"), dir.join("anchors/both")],
            outgoing_anchors: vec![dir.join("anchors/outgoing"), dir.join("anchors/both")],
            private: Vec::new(),
        }
    }

    #[test]
    fn add_list_find_remove() {
        let dir = tempfile::tempdir().unwrap();
        let domains = vec![domain(dir.path())];
        let ca1 = pki::new_ca("One CA", 2048).unwrap();
        let ca2 = pki::new_ca("Two CA", 2048).unwrap();
        let file = dir.path().join("two.pem");
        let mut both = ca1.cert.to_pem().unwrap();
        both.extend(ca2.cert.to_pem().unwrap());
        fs::write(&file, &both).unwrap();
        let sig0 = directory_signature(&domains);
        let written = add(&domains, &file, "a.example", "in").unwrap();
        assert_eq!(written.len(), 2);
        assert_ne!(directory_signature(&domains), sig0, "a change is seen");
        let listed = list(&domains);
        assert_eq!(listed.len(), 2);
        assert!(listed.iter().all(|(e, _)| e.direction == "incoming"));
        assert!(matches!(
            add(&domains, &file, "a.example", "in"),
            Err(AnchorAdminError::Exists { .. })
        ));
        assert!(matches!(
            add(&domains, &file, "b.example", "in"),
            Err(AnchorAdminError::NoSuchDomain(_))
        ));
        assert!(matches!(
            add(&domains, &file, "a.example", "sideways"),
            Err(AnchorAdminError::Direction(_))
        ));
        let fp = trust::fingerprint(&ca1.cert);
        assert_eq!(find(&domains, &fp[..12]).unwrap().len(), 1);
        assert!(matches!(
            find(&domains, "12"),
            Err(AnchorAdminError::ShortFingerprint(_))
        ));
        remove(&domains, &fp).unwrap();
        let listed = list(&domains);
        assert_eq!(listed.len(), 1);
        assert!(listed[0].0.certificate.subject.contains("Two CA"));
        assert!(matches!(
            find(&domains, &fp),
            Err(AnchorAdminError::NotFound(_))
        ));
    }
}
