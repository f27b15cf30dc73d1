//! The `hispd` command line: parse arguments, call the library.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use hispd::address::DirectAddress;
use hispd::agent::{
    self, Agent, AgentError, LocalDomain, OpenRequest, PrivateCredential, SealRequest,
};
use hispd::config::Settings;
use hispd::discovery::{publish, TrustContext};
use hispd::pki::{self, KeyKind, LeafSpec};
use hispd::trust::{self, AnchorSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "hispd",
    version,
    about = "A Direct-protocol HISP: S/MIME security and trust agent"
)]
struct Cli {
    /// Configuration file (TOML). Without it the embedded default is used.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Issue a throwaway PKI for two domains, seal a sample C-CDA message from
    /// one to the other, open it and print the report.
    Demo {
        /// Keep the demo PKI and messages in this directory.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Print the reports as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Development certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Seal and open messages.
    #[command(subcommand)]
    Message(MessageCommand),
    /// Configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run the HISP: MX and submission listeners, queue, delivery.
    Serve,
    /// Edge accounts (SMTP submission). Use while the daemon is stopped.
    #[command(subcommand)]
    Users(UsersCommand),
    /// The delivery queue. Use while the daemon is stopped.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Read the built-in mailboxes. Use while the daemon is stopped.
    #[command(subcommand)]
    Mailbox(MailboxCommand),
    /// C-CDA documents: a page for people, or what the document says.
    #[command(subcommand)]
    Ccda(CcdaCommand),
    /// IHE XDM packages (zip).
    #[command(subcommand)]
    Xdm(XdmCommand),
    /// Patients whose records hispd pushes (use while the daemon is stopped).
    #[command(subcommand)]
    Patients(PatientsCommand),
    /// Patient-directed push rules (use while the daemon is stopped).
    #[command(subcommand)]
    Push(PushCommand),
    /// Apps allowed to ask patients for access (Blue Button Plus Pull; use
    /// while the daemon is stopped).
    #[command(subcommand)]
    Apps(AppsCommand),
    /// Trust bundles: the configured subscriptions and their last good copies.
    #[command(subcommand)]
    Bundles(BundlesCommand),
    /// Trust anchors of the local domains (files under certs/<domain>/anchors).
    #[command(subcommand)]
    Anchors(AnchorsCommand),
    /// Each recipient's timeline of a message we sent (MDNs, DSNs, timeouts).
    /// Use while the daemon is stopped.
    Track {
        message_id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Add an account; the password is read from stdin (one line).
    Add {
        name: String,
        /// Other addresses the account may send from (default: its name).
        #[arg(long = "address")]
        addresses: Vec<String>,
    },
    /// Change an account's password (read from stdin).
    Passwd {
        name: String,
    },
    Remove {
        name: String,
    },
    List,
}

#[derive(Subcommand)]
enum CcdaCommand {
    /// A standalone, script-free HTML page for the document.
    Render { file: PathBuf },
    /// Header and sections.
    Inspect {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum XdmCommand {
    /// Package documents (C-CDA or other files) as an XDM zip.
    Pack {
        #[arg(long)]
        out: PathBuf,
        /// Intended recipient(s) (Direct addresses).
        #[arg(long = "to")]
        to: Vec<String>,
        files: Vec<PathBuf>,
    },
    /// Write a package's documents into DIR.
    Unpack {
        file: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// What a package holds.
    Inspect {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PatientsCommand {
    /// Add a patient: identifiers as ROOT^EXTENSION, as in the C-CDA recordTarget.
    Add {
        id: String,
        #[arg(long)]
        name: String,
        #[arg(long = "identifier", required = true)]
        identifiers: Vec<String>,
        /// Read a login password for the patient (one line) from stdin.
        #[arg(long)]
        password_stdin: bool,
    },
    List,
    Remove {
        id: String,
    },
}

#[derive(Subcommand)]
enum AppsCommand {
    /// Register an app (shown to patients as registered by the operator).
    /// Prints its client_id, and for --confidential its secret (shown once).
    Add {
        #[arg(long)]
        name: String,
        /// Exact redirect URI (https, http on loopback, or a private scheme); repeatable.
        #[arg(long = "redirect-uri", required = true)]
        redirect_uris: Vec<String>,
        /// A confidential app (client_secret_basic); default: public (PKCE).
        #[arg(long)]
        confidential: bool,
        /// Scopes the app may ask for (space-separated); default: any.
        #[arg(long)]
        scope: Option<String>,
        #[arg(long = "client-uri")]
        client_uri: Option<String>,
    },
    List,
    /// Remove an app; every token it holds stops working.
    Remove {
        client_id: String,
    },
}

#[derive(Subcommand)]
enum PushCommand {
    /// Send each new document of PATIENT to ADDRESS (once: only the next one).
    Add {
        #[arg(long)]
        patient: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        once: bool,
    },
    List,
    Revoke {
        rule: String,
    },
}

#[derive(Subcommand)]
enum BundlesCommand {
    /// Each bundle: URL, last fetch, digest, anchors.
    List,
    /// Fetch now (all, or NAME); a running daemon picks up a new version.
    Refresh { name: Option<String> },
    /// One bundle's metadata and anchors.
    Show { name: String },
}

#[derive(Subcommand)]
enum AnchorsCommand {
    /// Subject, fingerprint, validity and source of every anchor.
    List {
        #[arg(long)]
        domain: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Add the certificate(s) of FILE (PEM, DER or PKCS#7) as anchors.
    Add {
        file: PathBuf,
        #[arg(long)]
        domain: String,
        /// in (trust senders), out (trust recipients) or both.
        #[arg(long, default_value = "both")]
        direction: String,
    },
    /// Remove an anchor (SHA-256 fingerprint, or at least 8 leading hex digits).
    Remove { fingerprint: String },
    /// Details of one anchor.
    Show { fingerprint: String },
}

#[derive(Subcommand)]
enum QueueCommand {
    List,
    Show {
        id: String,
    },
    /// Make every pending recipient of the job due now.
    Retry {
        id: String,
    },
    Delete {
        id: String,
    },
}

#[derive(Subcommand)]
enum MailboxCommand {
    List { address: String },
    Show { address: String, uid: u64 },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a CA (a trust anchor) in DIR: cert.pem, key.pem.
    NewCa {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long, default_value = "hispd development CA")]
        name: String,
        #[arg(long, default_value_t = 2048)]
        bits: u32,
        /// Replace a key already in DIR (orphans every certificate it issued).
        #[arg(long)]
        force: bool,
    },
    /// Issue an address-bound or domain-bound certificate signed by the CA in --ca.
    Issue {
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        #[arg(long, conflicts_with = "domain", required_unless_present = "domain")]
        address: Option<String>,
        #[arg(long)]
        domain: Option<String>,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long, default_value_t = 2048)]
        bits: u32,
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Replace a key already in DIR.
        #[arg(long)]
        force: bool,
    },
    /// Find ADDRESS's certificates (local, public directory, DNS CERT, LDAP)
    /// and explain each step. Exit 0 when one is usable, 2 when none, 1 on a
    /// usage error.
    Discover {
        address: String,
        /// Anchors that must trust the certificates (file or directory).
        /// Default: the outgoing anchors of the sending domain in --config.
        #[arg(long, value_name = "PATH")]
        anchors: Vec<PathBuf>,
        /// The sending local domain whose outgoing anchors decide (with --config).
        #[arg(long)]
        domain: Option<String>,
        /// Nameserver ip:port to ask instead of the configured/system ones. Repeatable.
        #[arg(long, value_name = "IP:PORT")]
        nameserver: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Print the local domains' public certificates as DNS CERT records
    /// (zone-file format) or LDIF entries, ready to publish.
    Publish {
        #[arg(long, conflicts_with = "ldif")]
        zone: bool,
        #[arg(long)]
        ldif: bool,
        /// Base DN of the LDIF entries (default dc=<labels of the domain>).
        #[arg(long, value_name = "DN")]
        base_dn: Option<String>,
    },
}

#[derive(Args)]
struct KeyArgs {
    /// Private certificate (PEM; may also hold the key). Repeatable.
    #[arg(long = "cert", value_name = "FILE")]
    certs: Vec<PathBuf>,
    /// Private key (PEM). Repeatable.
    #[arg(long = "key", value_name = "FILE")]
    keys: Vec<PathBuf>,
    /// PKCS#12 file with certificate and key.
    #[arg(long, value_name = "FILE")]
    pkcs12: Option<PathBuf>,
    /// Password of the PKCS#12 file.
    #[arg(long, default_value = "")]
    password: String,
}

#[derive(Subcommand)]
enum MessageCommand {
    /// Wrap, sign and encrypt a message read from stdin; write it to stdout.
    Seal {
        #[arg(long)]
        from: String,
        /// Recipients, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        to: Vec<String>,
        #[arg(long, value_name = "FILE")]
        sign_cert: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        sign_key: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        sign_pkcs12: Option<PathBuf>,
        #[arg(long, default_value = "")]
        password: String,
        /// Recipient certificate (PEM or DER). Repeatable. Without it, each
        /// recipient's certificates are discovered (DNS CERT, LDAP, ...).
        #[arg(long = "recipient-cert", value_name = "FILE")]
        recipient_certs: Vec<PathBuf>,
        /// Anchors (file or directory) that must trust the recipient
        /// certificates. Without it, the given certificates are trusted as is.
        #[arg(long, value_name = "PATH")]
        anchors: Vec<PathBuf>,
        /// aes-128-cbc or aes-256-cbc (default from the configuration).
        #[arg(long)]
        cipher: Option<String>,
        /// rsa-pkcs1 or rsa-oaep (default from the configuration).
        #[arg(long)]
        key_transport: Option<String>,
        /// Print the report on stderr.
        #[arg(long)]
        report: bool,
    },
    /// Decrypt, verify and unwrap a message read from stdin; write the
    /// protected message to stdout. Exits 1 with the reason if not trusted.
    Open {
        #[command(flatten)]
        keys: KeyArgs,
        /// Anchors (file or directory) that must trust the signer. Repeatable.
        #[arg(long, value_name = "PATH")]
        anchors: Vec<PathBuf>,
        /// Judge validity as of this time (RFC 3339), e.g. for old messages.
        #[arg(long, value_name = "RFC3339")]
        at: Option<String>,
        /// Print a JSON report on stdout instead of the message.
        #[arg(long)]
        json: bool,
        /// Write the message to FILE (useful with --json).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// SMTP envelope sender to check against From/Sender.
        #[arg(long)]
        mail_from: Option<String>,
        /// SMTP envelope recipients (comma-separated) to check against To/Cc.
        #[arg(long, value_delimiter = ',')]
        rcpt_to: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Load the configuration and every key and anchor it names; report all problems.
    Check,
}

/// A refusal by the agent: exit status 1 and the reason on one line.
struct Refused(AgentError);

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // `certs discover` keeps 2 for "nothing found": its usage errors exit 1.
            let discover = std::env::args().any(|a| a == "discover");
            let _ = e.print();
            let code = if !e.use_stderr() {
                0
            } else if discover {
                1
            } else {
                2
            };
            return ExitCode::from(code);
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if let Some(Refused(reason)) = e.downcast_ref::<Refused>() {
                eprintln!("hispd: refused [{}]: {}", reason.rule(), reason);
                return ExitCode::from(1);
            }
            eprintln!("hispd: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}
impl std::fmt::Debug for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}
impl std::error::Error for Refused {}

fn read_stdin() -> Result<Vec<u8>> {
    let mut data = Vec::new();
    std::io::stdin()
        .read_to_end(&mut data)
        .context("reading the message from stdin")?;
    if data.iter().all(u8::is_ascii_whitespace) {
        bail!("no message on stdin");
    }
    Ok(data)
}

fn settings(cli_config: Option<&Path>) -> Result<Settings> {
    Settings::load(cli_config).map_err(|e| anyhow::anyhow!("{e}"))
}

fn run(cli: Cli) -> Result<ExitCode> {
    let config = cli.config.as_deref();
    match cli.command {
        Command::Demo { out, json } => demo(out.as_deref(), json),
        Command::Certs(CertsCommand::NewCa {
            out,
            name,
            bits,
            force,
        }) => {
            let bits = pki::check_bits(bits)?;
            if !force && out.join("key.pem").exists() {
                return Err(pki::PkiError::Exists(out).into());
            }
            let ca = pki::new_ca(&name, bits)?;
            pki::save_checked(&ca, &out, force)?;
            println!(
                "CA \"{}\" written to {}",
                trust::subject(&ca.cert),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs(CertsCommand::Issue {
            ca,
            address,
            domain,
            out,
            bits,
            days,
            force,
        }) => {
            let bits = pki::check_bits(bits)?;
            let days = pki::check_days(days)?;
            if !force && out.join("key.pem").exists() {
                return Err(pki::PkiError::Exists(out).into());
            }
            let ca = pki::load_ca(&ca)?;
            let spec = match (address, domain) {
                (Some(a), _) => LeafSpec::address(&DirectAddress::parse(&a)?.to_string()),
                (None, Some(d)) => LeafSpec::domain(
                    &hispd::address::normalize_domain(&d)
                        .map_err(|why| anyhow::anyhow!("--domain {d:?}: {why}"))?,
                ),
                (None, None) => bail!("give --address or --domain"),
            };
            let spec = LeafSpec {
                key: KeyKind::Rsa(bits),
                ..spec.days(days)
            };
            let cred = pki::issue(&ca, &spec)?;
            pki::save_checked(&cred, &out, force)?;
            println!(
                "certificate \"{}\" written to {}",
                trust::subject(&cred.cert),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs(CertsCommand::Discover {
            address,
            anchors,
            domain,
            nameserver,
            json,
        }) => match certs_discover(
            config,
            &address,
            &anchors,
            domain.as_deref(),
            &nameserver,
            json,
        ) {
            Ok(code) => Ok(code),
            Err(e) => {
                eprintln!("hispd: error: {e:#}");
                Ok(ExitCode::from(1))
            }
        },
        Command::Certs(CertsCommand::Publish {
            zone,
            ldif,
            base_dn,
        }) => {
            let (_, agent) = Settings::load_agent(config).map_err(|e| anyhow::anyhow!("{e}"))?;
            if agent.domains.is_empty() {
                bail!("no local domains are configured: give --config with [[domains]]");
            }
            let ldif = ldif && !zone;
            for d in agent.domains.values() {
                let base = base_dn
                    .clone()
                    .unwrap_or_else(|| publish::base_dn_for(&d.name));
                if ldif {
                    println!("# {} (base {base})", d.name);
                } else {
                    println!("; {}", d.name);
                }
                for c in &d.credentials {
                    let text = if ldif {
                        publish::ldif_entries(&base, &c.credential.cert)?
                    } else {
                        publish::zone_records(&c.credential.cert)?
                    };
                    print!("{text}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Message(MessageCommand::Seal {
            from,
            to,
            sign_cert,
            sign_key,
            sign_pkcs12,
            password,
            recipient_certs,
            anchors,
            cipher,
            key_transport,
            report,
        }) => {
            let mut settings = settings(config)?;
            if let Some(c) = cipher {
                settings.agent.cipher = c
                    .parse()
                    .map_err(|e: String| anyhow::anyhow!("--cipher: {e}"))?;
            }
            if let Some(k) = key_transport {
                settings.agent.key_transport = k
                    .parse()
                    .map_err(|e: String| anyhow::anyhow!("--key-transport: {e}"))?;
            }
            let from = DirectAddress::parse(&from)?;
            let recipients = to
                .iter()
                .map(|t| DirectAddress::parse(t))
                .collect::<Result<Vec<_>, _>>()?;
            let mut certs = Vec::new();
            for f in &recipient_certs {
                certs.extend(trust::read_certificates(f)?);
            }
            let keys = KeyArgs {
                certs: sign_cert.into_iter().collect(),
                keys: sign_key.into_iter().collect(),
                pkcs12: sign_pkcs12,
                password,
            };
            let message = read_stdin()?;
            if certs.is_empty() {
                certs = discover_recipients(&settings, config, &from, &recipients, &anchors)?;
            }
            let agent = Agent::new(settings.agent.clone());
            let request = SealRequest {
                from: from.clone(),
                recipients,
                message: &message,
                recipient_certificates: certs.clone(),
                at: agent::now(),
            };
            let sealed = if keys.is_empty() {
                if config.is_none() {
                    bail!("give --sign-cert/--sign-key or --sign-pkcs12, or --config");
                }
                if !anchors.is_empty() {
                    bail!("--anchors applies with --sign-cert/--sign-key; with --config the sending domain's outgoing anchors decide");
                }
                let (_, agent) = Settings::load_agent(config).map_err(|e| anyhow::anyhow!("{e}"))?;
                agent.seal(request)
            } else {
                let credentials = keys.load()?;
                let outgoing = if anchors.is_empty() {
                    eprintln!("hispd: no --anchors: the recipient certificates are trusted as given");
                    AnchorSet::from_certs(certs, Path::new("--recipient-cert"))
                } else {
                    load_anchors(&anchors)?
                };
                let domain = LocalDomain {
                    name: from.domain().to_string(),
                    credentials,
                    incoming_anchors: AnchorSet::new(),
                    outgoing_anchors: outgoing,
                };
                agent.seal_for_domain(&domain, request)
            }
            .map_err(Refused)?;
            std::io::stdout().write_all(&sealed.message)?;
            if report {
                eprint!("{}", sealed.report.summary());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Message(MessageCommand::Open {
            keys,
            anchors,
            at,
            json,
            out,
            mail_from,
            rcpt_to,
        }) => {
            let settings = settings(config)?;
            let at = match at {
                Some(t) => chrono::DateTime::parse_from_rfc3339(&t)
                    .with_context(|| {
                        format!("--at {t:?} is not an RFC 3339 time such as 2026-12-04T10:00:00Z")
                    })?
                    .timestamp(),
                None => agent::now(),
            };
            let rcpt_to = rcpt_to
                .iter()
                .map(|r| DirectAddress::parse(r))
                .collect::<Result<Vec<_>, _>>()?;
            let message = read_stdin()?;
            let request = OpenRequest {
                message: &message,
                mail_from,
                rcpt_to,
                at,
            };
            let result = if keys.is_empty() {
                if config.is_none() {
                    bail!("give --cert/--key or --pkcs12 with --anchors, or --config");
                }
                let (_, agent) =
                    Settings::load_agent(config).map_err(|e| anyhow::anyhow!("{e}"))?;
                agent.open(request)
            } else {
                if anchors.is_empty() {
                    bail!("--anchors is required with --cert/--key or --pkcs12");
                }
                let credentials = keys.load()?;
                let name = credentials
                    .iter()
                    .flat_map(|c| c.bindings.iter())
                    .map(|b| match b {
                        trust::Binding::Address(a) => a.rsplit('@').next().unwrap_or(a).to_string(),
                        trust::Binding::Domain(d) => d.clone(),
                    })
                    .next()
                    .unwrap_or_else(|| "(command line)".into());
                let incoming = load_anchors(&anchors)?;
                let domain = LocalDomain {
                    name,
                    credentials,
                    incoming_anchors: incoming,
                    outgoing_anchors: AnchorSet::new(),
                };
                Agent::new(settings.agent.clone()).open_for_domain(&domain, request)
            };
            match result {
                Ok(opened) => {
                    if let Some(path) = &out {
                        std::fs::write(path, &opened.message)
                            .with_context(|| format!("writing {}", path.display()))?;
                    }
                    if json {
                        let value = serde_json::json!({"trusted": true, "report": opened.report});
                        println!("{}", serde_json::to_string_pretty(&value)?);
                    } else if out.is_none() {
                        std::io::stdout().write_all(&opened.message)?;
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    if json {
                        let value = serde_json::json!({"trusted": false, "rule": e.rule(), "reason": e.to_string()});
                        println!("{}", serde_json::to_string_pretty(&value)?);
                    }
                    Err(Refused(e).into())
                }
            }
        }
        Command::Serve => serve(config),
        Command::Users(cmd) => users_command(config, cmd),
        Command::Queue(cmd) => queue_command(config, cmd),
        Command::Mailbox(cmd) => mailbox_command(config, cmd),
        Command::Anchors(cmd) => anchors_command(config, cmd),
        Command::Bundles(cmd) => bundles_command(config, cmd),
        Command::Ccda(cmd) => ccda_command(cmd),
        Command::Xdm(cmd) => xdm_command(cmd),
        Command::Patients(cmd) => patients_command(config, cmd),
        Command::Apps(cmd) => apps_command(config, cmd),
        Command::Push(cmd) => push_command(config, cmd),
        Command::Track { message_id, json } => {
            let store = open_store(config)?;
            let id = if message_id.starts_with('<') {
                message_id.clone()
            } else {
                format!("<{message_id}>")
            };
            let Some(t) = hispd::notify::track::load(&store, &id)? else {
                bail!("{id} is not a message this HISP sent (or its tracking was removed)");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                print!("{}", t.timeline());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Check) => {
            let (settings, agent) =
                Settings::load_agent(config).map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("configuration from {} is valid", settings.source);
            for d in agent.domains.values() {
                println!(
                    "  {}: {} private certificate(s), {} incoming anchor(s), {} outgoing anchor(s)",
                    d.name,
                    d.credentials.len(),
                    d.incoming_anchors.len(),
                    d.outgoing_anchors.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

impl KeyArgs {
    fn is_empty(&self) -> bool {
        self.certs.is_empty() && self.keys.is_empty() && self.pkcs12.is_none()
    }

    fn load(&self) -> Result<Vec<PrivateCredential>> {
        let mut out = Vec::new();
        if let Some(p) = &self.pkcs12 {
            out.push(agent::load_pkcs12(p, &self.password)?);
        }
        let pem: Vec<&Path> = self
            .certs
            .iter()
            .chain(&self.keys)
            .map(PathBuf::as_path)
            .collect();
        if !pem.is_empty() {
            out.extend(load_credentials_der_or_pem(&self.certs, &self.keys)?);
        }
        Ok(out)
    }
}

/// Certificates may be DER (as the reference implementations ship them) and
/// keys PKCS#8 DER; convert to the PEM loader's input.
fn load_credentials_der_or_pem(
    certs: &[PathBuf],
    keys: &[PathBuf],
) -> Result<Vec<PrivateCredential>> {
    let mut cert_list = Vec::new();
    for c in certs {
        cert_list.extend(trust::read_certificates(c)?);
    }
    let mut out = Vec::new();
    let key_files: Vec<&PathBuf> = if keys.is_empty() {
        certs.iter().collect()
    } else {
        keys.iter().collect()
    };
    for k in key_files {
        let data = std::fs::read(k).with_context(|| format!("reading {}", k.display()))?;
        let is_pem = data.windows(11).any(|w| w == b"-----BEGIN ");
        if keys.is_empty() && !(is_pem && data.windows(11).any(|w| w == b"PRIVATE KEY")) {
            bail!(
                "{} holds no private key: give the key file too (--key or --sign-key)",
                k.display()
            );
        }
        let key = if is_pem {
            openssl::pkey::PKey::private_key_from_pem(&data)
        } else {
            openssl::pkey::PKey::private_key_from_der(&data)
        }
        .map_err(|e| {
            anyhow::anyhow!(
                "{}: not a private key (PEM or DER): {}",
                k.display(),
                hispd::smime::openssl_reason(&e)
            )
        })?;
        let leaf = cert_list
            .iter()
            .find(|c| c.public_key().map(|p| p.public_eq(&key)).unwrap_or(false))
            .cloned()
            .ok_or_else(|| {
                anyhow::anyhow!("{}: no given certificate matches this key", k.display())
            })?;
        out.push(PrivateCredential::new(
            pki::Credential {
                cert: leaf,
                key,
                chain: Vec::new(),
            },
            k.display().to_string(),
        ));
    }
    Ok(out)
}

/// The store of the configured data directory (the daemon must not be running:
/// the index allows one process at a time).
fn open_store(config: Option<&Path>) -> Result<hispd::store::SledStore> {
    let settings = settings(config)?;
    hispd::store::SledStore::open(&settings.server.data_dir).map_err(|e| {
        anyhow::anyhow!(
            "{e} (is `hispd serve` running with data_dir {}? stop it first)",
            settings.server.data_dir.display()
        )
    })
}

fn read_password() -> Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    let password = line.trim_end_matches(['\r', '\n']).to_string();
    if password.is_empty() {
        bail!("no password on stdin");
    }
    Ok(password)
}

fn users_command(config: Option<&Path>, cmd: UsersCommand) -> Result<ExitCode> {
    let store = open_store(config)?;
    let users = hispd::users::Users::open(store.db())?;
    match cmd {
        UsersCommand::Add { name, addresses } => {
            DirectAddress::parse(&name)?;
            for a in &addresses {
                DirectAddress::parse(a)?;
            }
            users.add(&name, &read_password()?, &addresses)?;
            println!("added {name}");
        }
        UsersCommand::Passwd { name } => {
            users.set_password(&name, &read_password()?)?;
            println!("password of {name} changed");
        }
        UsersCommand::Remove { name } => {
            users.remove(&name)?;
            println!("removed {name}");
        }
        UsersCommand::List => {
            for u in users.list()? {
                println!(
                    "{}\tmay send as: {}\tcreated {}",
                    u.name,
                    u.addresses.join(", "),
                    u.created
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn ccda_command(cmd: CcdaCommand) -> Result<ExitCode> {
    use hispd::documents::{ccda, render};
    match cmd {
        CcdaCommand::Render { file } => {
            let doc = ccda::parse(&read_file(&file)?, &ccda::Limits::default())
                .with_context(|| file.display().to_string())?;
            print!("{}", render::render_html(&doc));
        }
        CcdaCommand::Inspect { file, json } => {
            let doc = ccda::parse(&read_file(&file)?, &ccda::Limits::default())
                .with_context(|| file.display().to_string())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                println!("{}", doc.title.as_deref().unwrap_or("(no title)"));
                for p in &doc.patients {
                    println!(
                        "  patient {} born {} gender {} ids {}",
                        p.names.join(" / "),
                        p.birth_time.as_deref().unwrap_or("?"),
                        p.gender.as_deref().unwrap_or("?"),
                        p.ids
                            .iter()
                            .filter_map(hispd::documents::index::id_key)
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                println!("  authors: {}", doc.authors.join("; "));
                if let Some(s) = &doc.stylesheet {
                    println!("  stylesheet (ignored): {s}");
                }
                for s in doc.all_sections() {
                    println!("  section: {}", s.title.as_deref().unwrap_or("(untitled)"));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What a document of a package is, for `xdm inspect`.
enum PackageDocumentKind {
    Ccda { title: Option<String> },
    UnreadableCcda(String),
    Other,
}

impl PackageDocumentKind {
    fn of(data: &[u8]) -> PackageDocumentKind {
        use hispd::documents::ccda;
        if !ccda::is_ccda(data) {
            return PackageDocumentKind::Other;
        }
        match ccda::parse(data, &ccda::Limits::default()) {
            Ok(doc) => PackageDocumentKind::Ccda { title: doc.title },
            Err(e) => PackageDocumentKind::UnreadableCcda(e.to_string()),
        }
    }

    fn json(&self) -> serde_json::Value {
        match self {
            PackageDocumentKind::Ccda { title } => serde_json::json!({"title": title}),
            PackageDocumentKind::UnreadableCcda(e) => serde_json::json!({"error": e}),
            PackageDocumentKind::Other => serde_json::Value::Null,
        }
    }
}

impl std::fmt::Display for PackageDocumentKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PackageDocumentKind::Ccda { title } => {
                write!(f, "C-CDA \"{}\"", title.as_deref().unwrap_or("(no title)"))
            }
            PackageDocumentKind::UnreadableCcda(e) => write!(f, "a C-CDA that cannot be read: {e}"),
            PackageDocumentKind::Other => f.write_str("not a C-CDA"),
        }
    }
}

fn xdm_command(cmd: XdmCommand) -> Result<ExitCode> {
    use hispd::documents::xdm;
    match cmd {
        XdmCommand::Pack { out, to, files } => {
            if files.is_empty() {
                bail!("give at least one file to pack");
            }
            let mut docs = Vec::new();
            for f in &files {
                let name = f
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                docs.push(xdm::PackDocument::from_file(name, read_file(f)?)?);
            }
            let zip = xdm::write(&docs, &to, "hispd")?;
            std::fs::write(&out, zip).with_context(|| format!("writing {}", out.display()))?;
            for d in docs.iter().filter(|d| d.unique_id.is_some()) {
                println!(
                    "  {}: C-CDA {}, patient {}",
                    d.name,
                    d.unique_id.as_deref().unwrap_or("-"),
                    d.patient_id.as_deref().unwrap_or("(no identifier)")
                );
            }
            println!("{} document(s) packed into {}", docs.len(), out.display());
        }
        XdmCommand::Unpack { file, out } => {
            for p in xdm::unpack_to(&read_file(&file)?, &out, &xdm::Limits::default())? {
                println!("{}", p.display());
            }
        }
        XdmCommand::Inspect { file, json } => {
            let pkg = xdm::read(&read_file(&file)?, &xdm::Limits::default())?;
            let kinds: Vec<PackageDocumentKind> = pkg
                .documents
                .iter()
                .map(|d| PackageDocumentKind::of(&d.data))
                .collect();
            let ccdas = kinds
                .iter()
                .filter(|k| matches!(k, PackageDocumentKind::Ccda { .. }))
                .count();
            if json {
                let docs: Vec<_> = pkg
                    .documents
                    .iter()
                    .zip(&kinds)
                    .map(|(d, kind)| serde_json::json!({"path": d.path, "mime_type": d.mime_type, "unique_id": d.unique_id,
                        "sha1": d.hash_sha1, "size": d.data.len(), "patient_id": d.patient_id, "verified": d.verified,
                        "ccda": kind.json()}))
                    .collect();
                let v = serde_json::json!({"subsets": pkg.subsets, "documents": docs,
                    "intended_recipients": pkg.intended_recipients, "warnings": pkg.warnings});
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("subsets: {}", pkg.subsets.join(", "));
                for (d, kind) in pkg.documents.iter().zip(&kinds) {
                    println!(
                        "  {} ({}, {} bytes{}): {kind}",
                        d.path,
                        d.mime_type.as_deref().unwrap_or("?"),
                        d.data.len(),
                        if d.verified {
                            ", hash/size verified"
                        } else {
                            ""
                        }
                    );
                }
                println!(
                    "intended recipients: {}",
                    pkg.intended_recipients.join(", ")
                );
                println!("C-CDA documents: {ccdas} of {}", pkg.documents.len());
                for w in &pkg.warnings {
                    println!("warning: {w}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn patients_command(config: Option<&Path>, cmd: PatientsCommand) -> Result<ExitCode> {
    use hispd::documents::index;
    let store = open_store(config)?;
    match cmd {
        PatientsCommand::Add {
            id,
            name,
            identifiers,
            password_stdin,
        } => {
            let password_hash = if password_stdin {
                let password = read_password()?;
                if password.chars().count() < hispd::users::MIN_PASSWORD_CHARS {
                    bail!(
                        "password too short (min {})",
                        hispd::users::MIN_PASSWORD_CHARS
                    );
                }
                Some(hispd::users::hash_password(&password)?)
            } else {
                None
            };
            index::add_patient(
                &store,
                &index::PatientRecord {
                    id: id.clone(),
                    name,
                    identifiers,
                    password_hash,
                },
            )?;
            println!("added patient {id}");
        }
        PatientsCommand::List => {
            for p in index::patients(&store)? {
                let docs = index::documents_of(&store, &p)?.len();
                println!(
                    "{}\t{}\t{}\t{docs} document(s)",
                    p.id,
                    p.name,
                    p.identifiers.join(", ")
                );
            }
        }
        PatientsCommand::Remove { id } => {
            index::remove_patient(&store, &id)?;
            println!("removed patient {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn apps_command(config: Option<&Path>, cmd: AppsCommand) -> Result<ExitCode> {
    use hispd::pull::oauth;
    let store = open_store(config)?;
    match cmd {
        AppsCommand::Add {
            name,
            redirect_uris,
            confidential,
            scope,
            client_uri,
        } => {
            let (app, secret) = oauth::create_app(
                &store,
                name,
                client_uri,
                redirect_uris,
                confidential,
                scope.map(|s| oauth::Scopes::grantable(&s).as_string()),
                oauth::Registration::Operator,
                None,
            )
            .map_err(|e| anyhow::anyhow!("{}", e.description()))?;
            println!("client_id\t{}", app.client_id);
            if let Some(secret) = secret {
                println!("client_secret\t{secret}");
                eprintln!("(the secret is shown only now: only its hash is kept)");
            }
        }
        AppsCommand::List => {
            for app in oauth::apps(&store)? {
                let kind = match &app.registration {
                    oauth::Registration::Open => "open (unverified)".to_string(),
                    oauth::Registration::Registry { name } => format!("registry {name}"),
                    oauth::Registration::Operator => "operator".to_string(),
                };
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    app.client_id,
                    app.name,
                    if app.is_public() {
                        "public"
                    } else {
                        "confidential"
                    },
                    kind,
                    app.redirect_uris.join(" ")
                );
            }
        }
        AppsCommand::Remove { client_id } => {
            if !oauth::remove_app(&store, &client_id)? {
                bail!("no app with client_id {client_id}");
            }
            println!("removed app {client_id}; its tokens no longer work");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn push_command(config: Option<&Path>, cmd: PushCommand) -> Result<ExitCode> {
    use hispd::documents::index;
    let store = open_store(config)?;
    match cmd {
        PushCommand::Add { patient, to, once } => {
            DirectAddress::parse(&to)?;
            let rule = index::add_rule(&store, &patient, &to, once, agent::now())?;
            println!(
                "rule {}: new documents of {patient} go to {to}{}",
                rule.id,
                if once { " (once)" } else { "" }
            );
        }
        PushCommand::List => {
            for r in index::rules(&store)? {
                println!(
                    "{}\t{}\t-> {}\t{}{}\t{} sent",
                    r.id,
                    r.patient,
                    r.to,
                    if r.revoked { "revoked" } else { "active" },
                    if r.once { ", once" } else { "" },
                    r.sent.len()
                );
            }
        }
        PushCommand::Revoke { rule } => {
            index::revoke_rule(&store, &rule)?;
            println!("rule {rule} revoked: nothing more is sent");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn bundles_command(config: Option<&Path>, cmd: BundlesCommand) -> Result<ExitCode> {
    use hispd::trust::bundle::{BundleCache, RefreshOutcome};
    let settings = settings(config)?;
    if settings.bundles.is_empty() {
        bail!("no trust bundles are configured ([[bundles]] in the configuration)");
    }
    let cache = BundleCache::new(&settings.bundle_dir())?;
    let when = |t: i64| {
        chrono::DateTime::from_timestamp(t, 0)
            .map(|d| d.to_rfc3339())
            .unwrap_or_default()
    };
    let find = |name: &str| {
        settings
            .bundles
            .iter()
            .find(|b| b.name == name)
            .ok_or_else(|| anyhow::anyhow!("no bundle named {name:?} is configured"))
    };
    match cmd {
        BundlesCommand::List => {
            for b in &settings.bundles {
                match cache.metadata(&b.name) {
                    Some(m) => println!(
                        "{}\t{}\t{} anchor(s)\tfetched {}\tsha256 {}{}",
                        b.name,
                        b.url,
                        m.anchors,
                        when(m.fetched_at),
                        &m.sha256[..16.min(m.sha256.len())],
                        if m.signed && !m.signature_verified {
                            "\tSIGNATURE NOT VERIFIED (no signer configured)"
                        } else {
                            ""
                        }
                    ),
                    None => println!("{}\t{}\tnot fetched yet", b.name, b.url),
                }
            }
        }
        BundlesCommand::Refresh { name } => {
            let targets: Vec<_> = match &name {
                Some(n) => vec![find(n)?.clone()],
                None => settings.bundles.clone(),
            };
            let mut failed = false;
            for b in targets {
                let source = settings
                    .bundle_source(&b)
                    .map_err(|p| anyhow::anyhow!("{}: {}", p.key, p.message))?;
                match runtime()?.block_on(cache.refresh(&source, agent::now())) {
                    Ok(RefreshOutcome::Updated { anchors }) => {
                        println!("{}: updated, {anchors} anchor(s)", b.name)
                    }
                    Ok(RefreshOutcome::Unchanged) => println!("{}: unchanged", b.name),
                    Err(e) => {
                        eprintln!("hispd: {}: {e} (the previous anchors stay trusted)", b.name);
                        failed = true;
                    }
                }
            }
            if failed {
                return Ok(ExitCode::from(1));
            }
        }
        BundlesCommand::Show { name } => {
            let b = find(&name)?;
            let source = settings
                .bundle_source(b)
                .map_err(|p| anyhow::anyhow!("{}: {}", p.key, p.message))?;
            match cache.load(&source, agent::now())? {
                Some(loaded) => {
                    println!(
                        "{} from {}\n  fetched {}, sha256 {}\n  signed: {}, signature verified: {}\n  applies to: {} ({})",
                        b.name,
                        b.url,
                        when(loaded.meta.fetched_at),
                        loaded.meta.sha256,
                        loaded.meta.signed,
                        loaded.meta.signature_verified,
                        if b.domains.is_empty() { "every local domain".to_string() } else { b.domains.join(", ") },
                        match (b.incoming, b.outgoing) {
                            (true, true) => "both directions",
                            (true, false) => "incoming",
                            _ => "outgoing",
                        }
                    );
                    for c in &loaded.certs {
                        let s = trust::CertSummary::of(c);
                        println!(
                            "  {}\n    {}  valid {} .. {}",
                            s.subject, s.fingerprint, s.not_before, s.not_after
                        );
                    }
                }
                None => println!("{name}: not fetched yet (hispd bundles refresh {name})"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn anchors_command(config: Option<&Path>, cmd: AnchorsCommand) -> Result<ExitCode> {
    use hispd::anchors;
    let settings = settings(config)?;
    if settings.domains.is_empty() {
        bail!("no local domains are configured: give --config with [[domains]]");
    }
    let domains = settings.domains.clone();
    let reload_hint = "a running daemon picks this up within seconds (or at once on SIGHUP)";
    match cmd {
        AnchorsCommand::List { domain, json } => {
            let mut entries: Vec<_> = anchors::list(&domains)
                .into_iter()
                .map(|(e, _)| e)
                .collect();
            // Anchors that come from the last good copy of each trust bundle.
            if let Ok(cache) = hispd::trust::bundle::BundleCache::new(&settings.bundle_dir()) {
                for b in &settings.bundles {
                    let Ok(source) = settings.bundle_source(b) else {
                        continue;
                    };
                    let Ok(Some(loaded)) = cache.load(&source, agent::now()) else {
                        continue;
                    };
                    let direction = match (b.incoming, b.outgoing) {
                        (true, true) => "both",
                        (true, false) => "incoming",
                        _ => "outgoing",
                    };
                    for d in domains
                        .iter()
                        .filter(|d| b.domains.is_empty() || b.domains.contains(&d.name))
                    {
                        for c in &loaded.certs {
                            entries.push(anchors::AnchorEntry {
                                domain: d.name.clone(),
                                direction: direction.into(),
                                source: format!("bundle {}", b.name),
                                certificate: trust::CertSummary::of(c),
                            });
                        }
                    }
                }
            }
            if let Some(d) = &domain {
                entries.retain(|e| e.domain.eq_ignore_ascii_case(d));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                for e in entries {
                    println!(
                        "{}  {:<8}  {}\n    {}  valid {} .. {}\n    from {}",
                        e.domain,
                        e.direction,
                        e.certificate.subject,
                        e.certificate.fingerprint,
                        e.certificate.not_before,
                        e.certificate.not_after,
                        e.source
                    );
                }
            }
        }
        AnchorsCommand::Add {
            file,
            domain,
            direction,
        } => {
            for path in anchors::add(&domains, &file, &domain, &direction)? {
                println!("added {}", path.display());
            }
            println!("{reload_hint}");
        }
        AnchorsCommand::Remove { fingerprint } => {
            for path in anchors::remove(&domains, &fingerprint)? {
                println!("removed from {}", path.display());
            }
            println!("{reload_hint}");
        }
        AnchorsCommand::Show { fingerprint } => {
            for (e, path) in anchors::find(&domains, &fingerprint)? {
                let certs = trust::read_certificates(&path)?;
                let Some(cert) = certs
                    .iter()
                    .find(|c| trust::fingerprint(c) == e.certificate.fingerprint)
                else {
                    continue;
                };
                let (emails, dns) = trust::san_names(cert);
                println!(
                    "{} ({}) in {}\n  subject  {}\n  issuer   {}\n  sha256   {}\n  valid    {} .. {}\n  CA       {}\n  SAN      {}",
                    e.domain,
                    e.direction,
                    path.display(),
                    e.certificate.subject,
                    e.certificate.issuer,
                    e.certificate.fingerprint,
                    e.certificate.not_before,
                    e.certificate.not_after,
                    hispd::smime::ffi::is_ca(cert),
                    emails.iter().chain(dns.iter()).cloned().collect::<Vec<_>>().join(", ")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn queue_command(config: Option<&Path>, cmd: QueueCommand) -> Result<ExitCode> {
    use hispd::store::Storage;
    let store = open_store(config)?;
    let job = |id: &str| -> Result<hispd::store::Job> {
        store
            .job(id)?
            .ok_or_else(|| anyhow::anyhow!("no job {id} in the queue"))
    };
    match cmd {
        QueueCommand::List => {
            for j in store.jobs()? {
                let pending = j
                    .recipients
                    .iter()
                    .filter(|r| r.status == hispd::store::RecipientStatus::Pending)
                    .count();
                println!(
                    "{}\t{:?}\tfrom {}\t{} recipient(s), {pending} pending\t{}",
                    j.id,
                    j.kind,
                    j.mail_from,
                    j.recipients.len(),
                    j.message_id.as_deref().unwrap_or("-")
                );
            }
        }
        QueueCommand::Show { id } => println!("{}", serde_json::to_string_pretty(&job(&id)?)?),
        QueueCommand::Retry { id } => {
            let mut j = job(&id)?;
            for r in j.recipients.iter_mut() {
                r.next_attempt = 0;
            }
            store.update_job(&j)?;
            println!("{id}: pending recipients will be tried at the next start");
        }
        QueueCommand::Delete { id } => {
            job(&id)?;
            store.finish_job(&id)?;
            println!("{id} deleted");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn mailbox_command(config: Option<&Path>, cmd: MailboxCommand) -> Result<ExitCode> {
    use hispd::store::Storage;
    let store = open_store(config)?;
    match cmd {
        MailboxCommand::List { address } => {
            for e in store.mailbox(&address)? {
                println!(
                    "{}\t{} bytes\t{}\t{}",
                    e.uid,
                    e.size,
                    chrono::DateTime::from_timestamp(e.received, 0)
                        .map(|d| d.to_rfc3339())
                        .unwrap_or_default(),
                    e.message_id.as_deref().unwrap_or("-")
                );
            }
        }
        MailboxCommand::Show { address, uid } => {
            std::io::stdout().write_all(&store.mailbox_message(&address, uid)?)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HISPD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: none in files or the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn serve(config: Option<&Path>) -> Result<ExitCode> {
    hispd::server::tune_allocator();
    let settings = settings(config)?;
    init_logging(settings.server.json_logs);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if settings.server.worker_threads > 0 {
        builder.worker_threads(settings.server.worker_threads);
    }
    let runtime = builder
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let workers = runtime.metrics().num_workers();
    runtime.block_on(async move {
        let daemon = hispd::server::Daemon::prepare(config).await?;
        let mx = daemon.mx_addr();
        let submission = daemon.submission_addr();
        let pull = daemon.pull_addr();
        // Signal handlers exist before anyone is told we are serving: a
        // SIGHUP right after READY must reload, not kill.
        use tokio::signal::unix::{signal, SignalKind};
        let signals = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        );
        tracing::info!(?mx, ?submission, ?pull, workers, "hispd serving");
        if let Some(password) = &daemon.dev_password {
            let sub = submission.map(|a| a.to_string()).unwrap_or_default();
            eprintln!(
                "\nNo domain is configured: serving the development domain {dom} (PKI under {data}).\n\
                 Send a test message (STARTTLS, then AUTH as {user}, password {password}):\n\
                 \n  swaks --server {sub} --tls --auth-user {user} --auth-password {password} \\\n        --from {user} --to {user}\n\n\
                 It is sealed, opened and delivered to the mailbox of {user}; the log shows each step.\n\
                 Read it over IMAP or POP3 (STARTTLS/STLS), e.g.\n\
                 \n  curl -k --ssl-reqd --user {user}:{password} 'imap://{imap}/INBOX;UID=1'\n\n\
                 or stop hispd (Ctrl-C) and run: {exe} mailbox list {user}\n",
                dom = hispd::server::DEV_DOMAIN,
                data = settings.server.data_dir.display(),
                user = hispd::server::DEV_USER,
                exe = std::env::current_exe()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| "hispd".into()),
                imap = settings.server.imap_listen.map(|a| a.to_string()).unwrap_or_else(|| "(IMAP disabled)".into()),
            );
        }
        let hub = daemon.hub.clone();
        let config_path = config.map(Path::to_path_buf);
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        if let Some(interval) = sd_notify::watchdog_enabled() {
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(interval / 2).await;
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
            });
        }
        let shutdown = async move {
            let (Ok(mut term), Ok(mut int), Ok(mut hup)) = signals else {
                std::future::pending::<()>().await;
                return;
            };
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                    _ = hup.recv() => hub.reload(config_path.as_deref()),
                }
            }
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        };
        daemon.run(shutdown).await;
        tracing::info!("stopped");
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The trust context for discovery: --anchors, else the sending domain's
/// outgoing anchors from the configuration (all domains' when not named).
fn trust_context(
    settings: &Settings,
    agent: &Agent,
    anchors: &[PathBuf],
    domain: Option<&str>,
) -> Result<TrustContext> {
    let (name, set) = if !anchors.is_empty() {
        ("(--anchors)".to_string(), Some(load_anchors(anchors)?))
    } else if let Some(d) = domain {
        let local = agent.domain(d).ok_or_else(|| {
            anyhow::anyhow!("--domain {d}: not a local domain of the configuration")
        })?;
        (local.name.clone(), Some(local.outgoing_anchors.clone()))
    } else if agent.domains.is_empty() {
        ("(none)".to_string(), None)
    } else {
        let mut all = AnchorSet::new();
        for d in agent.domains.values() {
            all.extend(&d.outgoing_anchors);
        }
        let names: Vec<&str> = agent.domains.keys().map(String::as_str).collect();
        (names.join(", "), Some(all))
    };
    Ok(TrustContext {
        domain: name,
        anchors: set,
        at: agent::now(),
        min_rsa_bits: settings.agent.min_rsa_bits,
    })
}

fn certs_discover(
    config: Option<&Path>,
    address: &str,
    anchors: &[PathBuf],
    domain: Option<&str>,
    nameservers: &[String],
    json: bool,
) -> Result<ExitCode> {
    let address = DirectAddress::parse(address)?;
    let (mut settings, agent) = if config.is_some() {
        Settings::load_agent(config).map_err(|e| anyhow::anyhow!("{e}"))?
    } else {
        (settings(None)?, Agent::default())
    };
    if !nameservers.is_empty() {
        settings.discovery.nameservers = nameservers
            .iter()
            .map(|n| {
                n.parse().map_err(|_| {
                    anyhow::anyhow!("--nameserver {n:?} is not ip:port (e.g. 127.0.0.1:53)")
                })
            })
            .collect::<Result<_>>()?;
    }
    let ctx = trust_context(&settings, &agent, anchors, domain)?;
    let discovery = settings
        .build_discovery(&agent)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let found = runtime()?.block_on(discovery.discover(&address, &ctx));
    if json {
        println!("{}", serde_json::to_string_pretty(&found.report)?);
    } else {
        print!("{}", found.report.explain());
    }
    Ok(if found.certificates.is_empty() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// Certificates for every recipient through discovery, or an error naming
/// the recipients without one and why.
fn discover_recipients(
    settings: &Settings,
    config: Option<&Path>,
    from: &DirectAddress,
    recipients: &[DirectAddress],
    anchors: &[PathBuf],
) -> Result<Vec<openssl::x509::X509>> {
    let agent = if config.is_some() {
        Settings::load_agent(config)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .1
    } else {
        Agent::default()
    };
    if anchors.is_empty() && agent.domain(from.domain()).is_none() {
        bail!("to discover recipient certificates, give --anchors (or --config with the sending domain)");
    }
    let ctx = trust_context(
        settings,
        &agent,
        anchors,
        agent.domain(from.domain()).map(|d| d.name.as_str()),
    )?;
    let discovery = settings
        .build_discovery(&agent)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let found = runtime()?.block_on(discovery.certificates_for(recipients, &ctx));
    if let Some(first) = found.missing.first() {
        let why = first
            .candidates
            .iter()
            .map(|c| format!("\"{}\": {}", c.subject, c.reason))
            .chain(
                first
                    .steps
                    .last()
                    .map(|s| format!("{} -> {}", s.query, s.result)),
            )
            .next()
            .unwrap_or_else(|| "nothing published".into());
        bail!(
            "no usable certificate for {} ({why}); `hispd certs discover {}` explains each step",
            found
                .missing
                .iter()
                .map(|m| m.address.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            first.address
        );
    }
    Ok(found.certificates)
}

fn load_anchors(paths: &[PathBuf]) -> Result<AnchorSet> {
    let mut set = AnchorSet::new();
    for p in paths {
        set.extend(&AnchorSet::load(p)?);
    }
    Ok(set)
}

fn demo(out: Option<&Path>, json: bool) -> Result<ExitCode> {
    let outcome = hispd::demo::run(out)?;
    if let Some(dir) = out {
        std::fs::write(dir.join("original.eml"), &outcome.original)?;
        std::fs::write(dir.join("sealed.eml"), &outcome.sealed)?;
        std::fs::write(dir.join("opened.eml"), &outcome.opened)?;
    }
    if json {
        let value = serde_json::json!({"seal": outcome.seal_report, "open": outcome.open_report});
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!(
            "hispd demo: {} -> {}\n",
            hispd::demo::SENDER,
            hispd::demo::RECIPIENT
        );
        print!("{}", outcome.seal_report.summary());
        println!("  sealed message: {} bytes\n", outcome.sealed.len());
        print!("{}", outcome.open_report.summary());
        println!(
            "  opened message: {} bytes, carrying the C-CDA",
            outcome.opened.len()
        );
        if let Some(dir) = out {
            println!(
                "\nPKI, configuration and messages written to {}; try:\n  hispd --config {}/hispd.toml message open < {}/sealed.eml",
                dir.display(),
                dir.display(),
                dir.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
