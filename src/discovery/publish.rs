//! The other side of discovery: our public certificates as DNS CERT records
//! (zone-file presentation format, for BIND, Knot or NSD) or as LDIF
//! inetOrgPerson entries (for OpenLDAP).

use crate::trust::{self, Binding};
use base64::Engine;
use openssl::x509::X509Ref;

/// A DNS owner name and an LDAP mail value for a certificate's binding.
fn owner(binding: &Binding) -> (String, String) {
    match binding {
        Binding::Address(a) => {
            let (local, domain) = a.rsplit_once('@').unwrap_or((a.as_str(), ""));
            (format!("{local}.{domain}."), a.clone())
        }
        Binding::Domain(d) => (format!("{d}."), d.clone()),
    }
}

/// `owner. IN CERT PKIX 0 0 <base64 DER>` for `name`.
pub fn cert_record(name: &str, cert: &X509Ref) -> Result<String, openssl::error::ErrorStack> {
    let der = cert.to_der()?;
    let name = if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    };
    Ok(format!(
        "{name} IN CERT PKIX 0 0 {}\n",
        base64::engine::general_purpose::STANDARD.encode(der)
    ))
}

/// CERT records for a certificate at every name it binds to.
pub fn zone_records(cert: &X509Ref) -> Result<String, openssl::error::ErrorStack> {
    let mut out = String::new();
    for b in trust::bindings(cert) {
        out.push_str(&cert_record(&owner(&b).0, cert)?);
    }
    Ok(out)
}

/// An inetOrgPerson entry under `base_dn` with `mail` and the certificates.
pub fn ldif_entry(
    base_dn: &str,
    mail: &str,
    certs: &[&X509Ref],
) -> Result<String, openssl::error::ErrorStack> {
    let local = mail.split('@').next().unwrap_or(mail);
    let mut out = format!(
        "dn: cn={mail},{base_dn}\nobjectClass: inetOrgPerson\ncn: {mail}\nsn: {local}\nmail: {mail}\n"
    );
    for c in certs {
        out.push_str(&format!(
            "userCertificate;binary:: {}\n",
            base64::engine::general_purpose::STANDARD.encode(c.to_der()?)
        ));
    }
    out.push('\n');
    Ok(out)
}

/// LDIF entries for a certificate at every mail value it binds to.
pub fn ldif_entries(base_dn: &str, cert: &X509Ref) -> Result<String, openssl::error::ErrorStack> {
    let mut out = String::new();
    for b in trust::bindings(cert) {
        out.push_str(&ldif_entry(base_dn, &owner(&b).1, &[cert])?);
    }
    Ok(out)
}

/// `dc=a,dc=b` for `a.b`.
pub fn base_dn_for(domain: &str) -> String {
    domain
        .split('.')
        .map(|l| format!("dc={l}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{self, LeafSpec};

    #[test]
    fn records_name_the_bound_owner() {
        let ca = pki::new_ca("CA", 2048).unwrap();
        let alice = pki::issue(&ca, &LeafSpec::address("alice@d1.example")).unwrap();
        let zone = zone_records(&alice.cert).unwrap();
        assert!(
            zone.starts_with("alice.d1.example. IN CERT PKIX 0 0 MII"),
            "{zone}"
        );
        let dom = pki::issue(&ca, &LeafSpec::domain("d2.example")).unwrap();
        assert!(zone_records(&dom.cert)
            .unwrap()
            .starts_with("d2.example. IN CERT PKIX 0 0 "));
        let ldif = ldif_entries("dc=example", &alice.cert).unwrap();
        assert!(
            ldif.contains("dn: cn=alice@d1.example,dc=example\n"),
            "{ldif}"
        );
        assert!(ldif.contains("mail: alice@d1.example\n"));
        assert!(ldif.contains("userCertificate;binary:: MII"));
        assert_eq!(base_dn_for("d1.example"), "dc=d1,dc=example");
    }
}
