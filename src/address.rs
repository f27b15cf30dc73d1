//! Direct addresses (`local@domain`) and domains.

use std::fmt;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("{0:?} is not a Direct address: expected local@domain")]
    NoAt(String),
    #[error("{0:?} has an empty local part")]
    EmptyLocal(String),
    #[error("{0:?} has an invalid domain: {1}")]
    BadDomain(String, &'static str),
}

/// A Direct address. The domain is kept in lower case; the local part as
/// given, but compared without regard to case (as every deployed HISP does).
#[derive(Clone, Debug)]
pub struct DirectAddress {
    local: String,
    domain: String,
}

impl DirectAddress {
    pub fn parse(text: &str) -> Result<DirectAddress, AddressError> {
        let trimmed = text.trim().trim_start_matches('<').trim_end_matches('>');
        let (local, domain) = trimmed
            .rsplit_once('@')
            .ok_or_else(|| AddressError::NoAt(text.to_string()))?;
        if local.is_empty() || local.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(AddressError::EmptyLocal(text.to_string()));
        }
        let domain = normalize_domain(domain)
            .map_err(|why| AddressError::BadDomain(text.to_string(), why))?;
        Ok(DirectAddress {
            local: local.to_string(),
            domain,
        })
    }

    pub fn local(&self) -> &str {
        &self.local
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }
}

impl PartialEq for DirectAddress {
    fn eq(&self, other: &Self) -> bool {
        self.domain == other.domain && self.local.eq_ignore_ascii_case(&other.local)
    }
}

impl Eq for DirectAddress {}

impl fmt::Display for DirectAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// Lower-cases a DNS domain and checks its shape (labels of letters, digits
/// and hyphens; no empty labels). A trailing dot is dropped.
pub fn normalize_domain(domain: &str) -> Result<String, &'static str> {
    let d = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    if d.is_empty() {
        return Err("empty domain");
    }
    if d.len() > 253 {
        return Err("longer than 253 characters");
    }
    for label in d.split('.') {
        if label.is_empty() {
            return Err("empty label");
        }
        if label.len() > 63 {
            return Err("label longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("only letters, digits, '-' and '_' are allowed in labels");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label starts or ends with '-'");
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_compares_without_case() {
        let a = DirectAddress::parse("<Bob@Direct.Example.ORG>").unwrap();
        assert_eq!(a.domain(), "direct.example.org");
        assert_eq!(a.local(), "Bob");
        assert_eq!(a, DirectAddress::parse("bob@direct.example.org").unwrap());
        assert_eq!(a.to_string(), "Bob@direct.example.org");
    }

    #[test]
    fn refuses_malformed() {
        assert!(matches!(
            DirectAddress::parse("bob"),
            Err(AddressError::NoAt(_))
        ));
        assert!(matches!(
            DirectAddress::parse("@x.org"),
            Err(AddressError::EmptyLocal(_))
        ));
        assert!(matches!(
            DirectAddress::parse("a@x..org"),
            Err(AddressError::BadDomain(..))
        ));
        assert!(matches!(
            DirectAddress::parse("a@x y.org"),
            Err(AddressError::BadDomain(..))
        ));
    }
}
