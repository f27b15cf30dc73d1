//! `hispd demo`: a throwaway PKI for two domains, a sample C-CDA message
//! sealed by one and opened by the other. Shows the whole agent in one run.

use crate::address::DirectAddress;
use crate::agent::{
    self, Agent, AgentError, AgentSettings, LocalDomain, OpenReport, PrivateCredential, SealReport,
};
use crate::pki::{self, LeafSpec, PkiError};
use crate::trust::AnchorSet;
use std::path::Path;

pub const SENDER: &str = "dr.lee@direct.sunrise-clinic.example";
pub const RECIPIENT: &str = "jane.doe@direct.patient-app.example";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("could not build the demo PKI: {0}")]
    Pki(#[from] PkiError),
    #[error("the demo message was refused: {0}")]
    Agent(#[from] AgentError),
}

pub struct DemoOutcome {
    /// The message as the clinic's EHR submitted it.
    pub original: Vec<u8>,
    pub sealed: Vec<u8>,
    pub opened: Vec<u8>,
    pub seal_report: SealReport,
    pub open_report: OpenReport,
}

/// A small C-CDA Continuity of Care Document with made-up data.
pub const SAMPLE_CCDA: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<ClinicalDocument xmlns="urn:hl7-org:v3">
  <realmCode code="US"/>
  <typeId root="2.16.840.1.113883.1.3" extension="POCD_HD000040"/>
  <templateId root="2.16.840.1.113883.10.20.22.1.2" extension="2015-08-01"/>
  <id root="2.16.840.1.113883.19.5.99999.1" extension="demo-1"/>
  <code code="34133-9" codeSystem="2.16.840.1.113883.6.1" displayName="Summarization of Episode Note"/>
  <title>Continuity of Care Document</title>
  <effectiveTime value="20261204120000-0500"/>
  <recordTarget><patientRole>
    <id root="2.16.840.1.113883.19.5.99999.2" extension="998991"/>
    <patient><name><given>Jane</given><family>Doe</family></name>
      <administrativeGenderCode code="F" codeSystem="2.16.840.1.113883.5.1"/>
      <birthTime value="19750501"/></patient>
  </patientRole></recordTarget>
  <component><structuredBody><component><section>
    <code code="48765-2" codeSystem="2.16.840.1.113883.6.1"/>
    <title>Allergies</title>
    <text><list><item>Penicillin: hives</item></list></text>
  </section></component></structuredBody></component>
</ClinicalDocument>
"#;

/// The sample message: a short note with the C-CDA attached.
pub fn sample_message() -> Vec<u8> {
    let boundary = "=_demo_boundary";
    format!(
        "From: Dr. Lee <{SENDER}>\r\nTo: Jane Doe <{RECIPIENT}>\r\nSubject: Your visit summary\r\n\
Date: {}\r\nMessage-ID: <demo-{}@{}>\r\nMIME-Version: 1.0\r\nDisposition-Notification-Options: X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,true\r\n\
Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\
Hello Jane, your visit summary is attached.\r\n--{boundary}\r\nContent-Type: application/xml; name=\"ccd.xml\"\r\n\
Content-Disposition: attachment; filename=\"ccd.xml\"\r\n\r\n{}\r\n--{boundary}--\r\n",
        chrono::Utc::now().to_rfc2822(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default(),
        SENDER.rsplit('@').next().unwrap_or("localhost"),
        SAMPLE_CCDA.replace('\n', "\r\n")
    )
    .into_bytes()
}

/// Runs the demo; when `save` is given, the PKI is written there as a
/// working configuration: `<dir>/hispd.toml`, `<dir>/certs/<domain>/private/`
/// and `anchors/both/` for each domain (see certs/README.md), and the CAs in
/// `<dir>/ca-<domain>/` to issue more certificates from.
pub fn run(save: Option<&Path>) -> Result<DemoOutcome, DemoError> {
    let sender = DirectAddress::parse(SENDER).map_err(AgentError::from)?;
    let recipient = DirectAddress::parse(RECIPIENT).map_err(AgentError::from)?;
    let clinic_ca = pki::new_ca("Sunrise Clinic Direct CA", 2048)?;
    let app_ca = pki::new_ca("Patient App Direct CA", 2048)?;
    let clinic_key = pki::issue(&clinic_ca, &LeafSpec::address(SENDER))?;
    let app_key = pki::issue(&app_ca, &LeafSpec::domain(recipient.domain()))?;
    if let Some(dir) = save {
        let (s, r) = (sender.domain(), recipient.domain());
        pki::save(&clinic_ca, &dir.join(format!("ca-{s}")))?;
        pki::save(&app_ca, &dir.join(format!("ca-{r}")))?;
        let certs = dir.join("certs");
        pki::save(&clinic_key, &certs.join(s).join("private"))?;
        pki::save(&app_key, &certs.join(r).join("private"))?;
        write_anchor(
            &certs
                .join(s)
                .join("anchors/both")
                .join(format!("{r}-ca.pem")),
            &app_ca,
        )?;
        write_anchor(
            &certs
                .join(r)
                .join("anchors/both")
                .join(format!("{s}-ca.pem")),
            &clinic_ca,
        )?;
        let config = format!(
            "# Written by `hispd demo --out`: the two demo domains as a configuration.\n\
             [certs]\ndir = \"certs\"\n\n[[domains]]\nname = \"{s}\"\n\n[[domains]]\nname = \"{r}\"\n"
        );
        std::fs::write(dir.join("hispd.toml"), config).map_err(|error| PkiError::Io {
            path: dir.join("hispd.toml"),
            error,
        })?;
    }
    let mut agent = Agent::new(AgentSettings::default());
    let app_anchor = AnchorSet::from_certs(vec![app_ca.cert.clone()], Path::new("(demo)"));
    let clinic_anchor = AnchorSet::from_certs(vec![clinic_ca.cert.clone()], Path::new("(demo)"));
    agent.add_domain(LocalDomain {
        name: sender.domain().to_string(),
        credentials: vec![PrivateCredential::new(clinic_key, "(demo)")],
        incoming_anchors: app_anchor.clone(),
        outgoing_anchors: app_anchor,
    });
    agent.add_domain(LocalDomain {
        name: recipient.domain().to_string(),
        credentials: vec![PrivateCredential::new(app_key.clone(), "(demo)")],
        incoming_anchors: clinic_anchor.clone(),
        outgoing_anchors: clinic_anchor,
    });
    let message = sample_message();
    let sealed = agent.seal(agent::SealRequest {
        from: sender.clone(),
        recipients: vec![recipient.clone()],
        message: &message,
        recipient_certificates: vec![app_key.cert],
        at: agent::now(),
    })?;
    let opened = agent.open(agent::OpenRequest {
        message: &sealed.message,
        mail_from: Some(SENDER.to_string()),
        rcpt_to: vec![recipient],
        at: agent::now(),
    })?;
    Ok(DemoOutcome {
        original: message,
        sealed: sealed.message,
        opened: opened.message,
        seal_report: sealed.report,
        open_report: opened.report,
    })
}

fn write_anchor(path: &Path, ca: &pki::Credential) -> Result<(), PkiError> {
    let io = |error| PkiError::Io {
        path: path.to_path_buf(),
        error,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    std::fs::write(path, ca.cert.to_pem()?).map_err(io)
}

#[cfg(test)]
mod tests {
    #[test]
    fn demo_round_trip_is_trusted_and_keeps_the_document() {
        let out = super::run(None).unwrap();
        assert!(String::from_utf8_lossy(&out.opened).contains("<ClinicalDocument"));
        assert!(!String::from_utf8_lossy(&out.sealed).contains("Your visit summary"));
        assert_eq!(out.open_report.signer.digest, "SHA256");
        assert!(out.open_report.wrapped);
        assert_eq!(
            out.opened, out.original,
            "the recipient reads exactly what was sent"
        );
    }

    #[test]
    fn demo_out_is_a_working_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let out = super::run(Some(dir.path())).unwrap();
        let settings = crate::config::Settings::load(Some(&dir.path().join("hispd.toml"))).unwrap();
        let agent = settings.build_agent().unwrap();
        assert_eq!(agent.domains.len(), 2);
        let opened = agent
            .open(crate::agent::OpenRequest {
                message: &out.sealed,
                mail_from: None,
                rcpt_to: Vec::new(),
                at: crate::agent::now(),
            })
            .unwrap();
        assert_eq!(opened.message, out.original);
    }
}
