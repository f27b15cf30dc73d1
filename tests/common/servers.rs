//! Real DNS (BIND 9 `named`) and LDAP (OpenLDAP `slapd`) servers on loopback
//! for integration tests. Only std + `tempfile`.
//!
//! Every instance gets its own free port on 127.0.0.1 and its own private
//! temporary directory (config, data, pid file, log); nothing outside that
//! directory is written and nothing but 127.0.0.1 is listened on. The server
//! runs in the foreground as a child process; `stop()` / `Drop` kill it
//! (SIGKILL) and reap it, then the directory is removed.
//!
//! What was learned on Debian 12 (BIND 9.18, OpenLDAP 2.5), running as root:
//!
//! * `named -g -u root` works; `-g` keeps it in the foreground and logs to
//!   stderr (captured in `named.log`, see [`Bind::log`]). Startup to the
//!   first SOA answer takes ~0.15 s; `slapadd` + `slapd` to the first
//!   rootDSE answer ~0.1 s.
//! * `controls { };` is essential: by default named opens a command channel
//!   on 127.0.0.1#953 and ::1#953 (shared by all instances, and it tries to
//!   read /etc/bind/rndc.key).
//! * named binds its UDP/TCP listeners with SO_REUSEPORT, so a second named on
//!   an already used port starts *without any error* and the two silently
//!   share the traffic. [`free_port`] therefore never hands out the same port
//!   twice within one test process; across processes the kernel's random
//!   choice plus the double TCP+UDP check make a clash very unlikely.
//! * BIND answers a too-large CERT RRset over UDP with TC set and an empty
//!   answer section; over TCP it returns all records.
//! * Debian's AppArmor profile for `/usr/sbin/named` (if enforced) only lets
//!   named read /etc/bind, /var/cache/bind, ... — not a config in /tmp. The
//!   profile attaches by path, so when it is loaded in enforce mode (checked in
//!   /sys/kernel/security/apparmor/profiles) the binary is copied into the
//!   instance's temp dir and run from there (unconfined). Set
//!   `HISPD_TEST_NAMED_COPY=1` to force that path.

use std::collections::HashSet;
use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long `start` waits for a server to answer before giving up.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts (each with a fresh port) when the port turned out to be taken.
const START_ATTEMPTS: usize = 3;
/// Poll interval while waiting for a server.
const POLL: Duration = Duration::from_millis(20);

/// The LDAP suffix every [`Slapd`] serves.
pub const LDAP_SUFFIX: &str = "dc=example";

// ---------------------------------------------------------------------------
// ports
// ---------------------------------------------------------------------------

fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A free TCP+UDP port on 127.0.0.1 (bind both to check, then release).
/// Never returns the same port twice within one process.
pub fn free_port() -> u16 {
    for _ in 0..200 {
        let Ok(tcp) = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)) else {
            continue;
        };
        let Ok(addr) = tcp.local_addr() else {
            continue;
        };
        let port = addr.port();
        let Ok(udp) = UdpSocket::bind((Ipv4Addr::LOCALHOST, port)) else {
            continue;
        };
        drop(udp);
        drop(tcp);
        let mut used = handed_out().lock().unwrap_or_else(|e| e.into_inner());
        if used.insert(port) {
            return port;
        }
    }
    panic!("free_port: no free TCP+UDP port on 127.0.0.1 after 200 tries");
}

// ---------------------------------------------------------------------------
// small helpers
// ---------------------------------------------------------------------------

fn tempdir(prefix: &str) -> Result<tempfile::TempDir, String> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|e| format!("cannot create temp dir: {e}"))
}

fn write(path: &Path, data: &str) -> Result<(), String> {
    fs::write(path, data).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn kill_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Spawns `cmd` with stdin closed and stdout+stderr appended to `log`.
fn spawn_logged(mut cmd: Command, log: &Path) -> Result<Child, String> {
    let out = File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("cannot dup log file: {e}"))?;
    cmd.env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    cmd.spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))
}

/// Runs a short probe command (it bounds its own time) and returns its
/// stdout if it exited successfully.
fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if out.status.success() {
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        None
    }
}

/// Whether a server's log says it could not bind its port (then `start`
/// retries with another port). named reports a TCP clash as "creating IPv4
/// interface lo failed" + "unable to listen on any configured interfaces".
/// Fails unless `tool` can be started (it is run with `arg`, output ignored).
fn require_tool(tool: &str, arg: &str, package: &str) -> Result<(), String> {
    Command::new(tool)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|_| ())
        .map_err(|e| format!("cannot run `{tool}` ({e}); apt-get install {package}"))
}

fn port_in_use(log: &str) -> bool {
    let l = log.to_ascii_lowercase();
    l.contains("address in use")
        || l.contains("address already in use")
        || l.contains("errno=98")
        || l.contains("unable to listen on any configured interfaces")
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding, on one line.
pub fn base64(data: &[u8]) -> String {
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        s.push(B64[(n >> 18) as usize & 63] as char);
        s.push(B64[(n >> 12) as usize & 63] as char);
        s.push(if chunk.len() > 1 {
            B64[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        s.push(if chunk.len() > 2 {
            B64[n as usize & 63] as char
        } else {
            '='
        });
    }
    s
}

// ---------------------------------------------------------------------------
// BIND
// ---------------------------------------------------------------------------

/// Zone-file line for a PKIX CERT record (RFC 4398) holding `der`, e.g.
/// `cert_rr("bob", &der)` → `bob IN CERT PKIX 0 0 MIIC...`.
/// `owner` is relative to the zone origin unless it ends with a dot.
pub fn cert_rr(owner: &str, der: &[u8]) -> String {
    format!("{owner} IN CERT PKIX 0 0 {}\n", base64(der))
}

fn named_confined_by_apparmor() -> bool {
    if std::env::var_os("HISPD_TEST_NAMED_COPY").is_some_and(|v| !v.is_empty() && v != "0") {
        return true;
    }
    fs::read_to_string("/sys/kernel/security/apparmor/profiles")
        .map(|s| {
            s.lines().any(|l| {
                (l.starts_with("named ") || l.starts_with("/usr/sbin/named "))
                    && l.contains("(enforce)")
            })
        })
        .unwrap_or(false)
}

/// The `named` binary to run: /usr/sbin/named, or a private copy of it in
/// `dir` when AppArmor would confine /usr/sbin/named.
fn named_binary(dir: &Path) -> Result<PathBuf, String> {
    let system = PathBuf::from("/usr/sbin/named");
    if !system.exists() {
        return Err("/usr/sbin/named not found (apt-get install bind9)".into());
    }
    if !named_confined_by_apparmor() {
        return Ok(system);
    }
    let copy = dir.join("named");
    fs::copy(&system, &copy).map_err(|e| format!("cannot copy named binary: {e}"))?;
    Ok(copy)
}

/// An authoritative BIND (`named -g -u root -c ...`) on 127.0.0.1:port (UDP
/// and TCP) serving the given zones. Recursion is off; only 127.0.0.1.
pub struct Bind {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Bind {
    /// `zones`: (origin like "example", zone file text WITHOUT
    /// `$ORIGIN`/`$TTL`/SOA/NS boilerplate). The harness writes `$ORIGIN
    /// <origin>.`, `$TTL 300`, a SOA, `@ NS ns.<origin>.` and `ns A 127.0.0.1`
    /// before the text, so names in the text may be relative to the origin or
    /// absolute (with a trailing dot). Don't define `ns` yourself.
    ///
    /// Waits (at most 10 s) until `dig -p PORT @127.0.0.1 SOA <origin>` gets
    /// an authoritative answer for every zone; fails fast if named exits or a
    /// zone does not load, with named's log in the error.
    pub fn start(zones: &[(&str, &str)]) -> Result<Bind, String> {
        if zones.is_empty() {
            return Err("Bind::start: no zones given".into());
        }
        require_tool("dig", "-v", "bind9-dnsutils")?;
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            match Self::start_once(zones) {
                Ok(b) => return Ok(b),
                Err((retry, e)) => {
                    last = e;
                    if !retry {
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    fn start_once(zones: &[(&str, &str)]) -> Result<Bind, (bool, String)> {
        let fatal = |e: String| (false, e);
        let dir = tempdir("hispd-named-").map_err(fatal)?;
        let d = dir.path().to_path_buf();
        let ds = d.display().to_string();
        let port = free_port();

        let mut origins = Vec::new();
        let mut zone_stanzas = String::new();
        for (i, (origin, text)) in zones.iter().enumerate() {
            let origin = origin.trim_end_matches('.').to_string();
            let file = d.join(format!("zone{i}.db"));
            let body = format!(
                "$ORIGIN {origin}.\n$TTL 300\n\
                 @ IN SOA ns.{origin}. hostmaster.{origin}. 1 3600 600 86400 300\n\
                 @ IN NS ns.{origin}.\n\
                 ns IN A 127.0.0.1\n\
                 {text}\n"
            );
            write(&file, &body).map_err(fatal)?;
            zone_stanzas.push_str(&format!(
                "zone \"{origin}\" {{ type primary; file \"{}\"; notify no; }};\n",
                file.display()
            ));
            origins.push(origin);
        }
        let conf = format!(
            "options {{\n\
             \tdirectory \"{ds}\";\n\
             \tlisten-on port {port} {{ 127.0.0.1; }};\n\
             \tlisten-on-v6 {{ none; }};\n\
             \trecursion no;\n\
             \tpid-file \"{ds}/named.pid\";\n\
             \tsession-keyfile \"{ds}/session.key\";\n\
             \tmanaged-keys-directory \"{ds}\";\n\
             \tdump-file \"{ds}/named_dump.db\";\n\
             \tstatistics-file \"{ds}/named.stats\";\n\
             \tmemstatistics-file \"{ds}/named.memstats\";\n\
             \tdnssec-validation no;\n\
             \tnotify no;\n\
             }};\n\
             controls {{ }};\n\
             {zone_stanzas}"
        );
        let conf_path = d.join("named.conf");
        write(&conf_path, &conf).map_err(fatal)?;

        let named = named_binary(&d).map_err(fatal)?;
        let log_path = d.join("named.log");
        let mut cmd = Command::new(&named);
        cmd.args(["-g", "-4", "-n", "2", "-u", "root", "-c"])
            .arg(&conf_path);
        let child = spawn_logged(cmd, &log_path).map_err(fatal)?;
        let mut bind = Bind {
            port,
            dir,
            child: Some(child),
        };

        let started = Instant::now();
        let mut pending: Vec<String> = origins;
        loop {
            let exited = match bind.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(st))) => Some(st.to_string()),
                Some(Err(e)) => Some(format!("wait failed: {e}")),
                _ => None,
            };
            let log = bind.log();
            if let Some(st) = exited {
                return Err((
                    port_in_use(&log),
                    format!("named exited during startup ({st}) on port {port}\n--- named.log ---\n{log}"),
                ));
            }
            if port_in_use(&log) {
                return Err((
                    true,
                    format!("named: port {port} in use\n--- named.log ---\n{log}"),
                ));
            }
            if log.contains("not loaded due to errors")
                || log.contains("loading configuration: failure")
            {
                return Err((
                    false,
                    format!("named failed to load a zone/config\n--- named.log ---\n{log}"),
                ));
            }
            pending.retain(|origin| !bind.answers_soa(origin));
            if pending.is_empty() {
                return Ok(bind);
            }
            if started.elapsed() > START_TIMEOUT {
                return Err((
                    false,
                    format!(
                        "named on port {port} did not answer SOA for {pending:?} within {START_TIMEOUT:?}\n--- named.log ---\n{log}"
                    ),
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    fn answers_soa(&self, origin: &str) -> bool {
        let out = probe(
            Command::new("dig")
                .args(["+norec", "+time=1", "+tries=1", "-p"])
                .arg(self.port.to_string())
                .args(["@127.0.0.1", "SOA"])
                .arg(format!("{origin}.")),
        );
        matches!(out, Some(o) if o.contains("status: NOERROR") && o.contains(" aa") && o.contains("ANSWER: 1,"))
    }

    /// 127.0.0.1:port (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port))
    }

    /// The instance's private directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// named's log so far (`-g` logs everything to stderr).
    pub fn log(&self) -> String {
        read_lossy(&self.dir.path().join("named.log"))
    }

    /// Kills named (SIGKILL) and reaps it. Idempotent; also done in Drop.
    pub fn stop(&mut self) {
        kill_child(&mut self.child);
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// OpenLDAP
// ---------------------------------------------------------------------------

/// OpenLDAP slapd on 127.0.0.1:port, suffix `dc=example`, mdb database in a
/// temp dir, anonymous read of everything, core + cosine + inetorgperson
/// schemas, loaded with the LDIF given (slapadd before start).
pub struct Slapd {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Slapd {
    /// `ldif`: the entries below `dc=example` (the harness adds the
    /// `dc=example` root entry itself). Entries must be separated by blank
    /// lines; the output of [`ldif_dc`] / [`ldif_person`] can simply be
    /// concatenated. Parents must come before children.
    ///
    /// Waits (at most 10 s) until `ldapsearch -x -H ldap://127.0.0.1:PORT -s
    /// base -b "" namingContexts` answers with `dc=example`.
    pub fn start(ldif: &str) -> Result<Slapd, String> {
        for tool in ["/usr/sbin/slapd", "/usr/sbin/slapadd"] {
            if !Path::new(tool).exists() {
                return Err(format!(
                    "{tool} not found (apt-get install slapd ldap-utils)"
                ));
            }
        }
        require_tool("ldapsearch", "-VV", "ldap-utils")?;
        let dir = tempdir("hispd-slapd-")?;
        let d = dir.path().to_path_buf();
        let ds = d.display().to_string();
        fs::create_dir(d.join("db")).map_err(|e| format!("cannot create db dir: {e}"))?;
        let conf = format!(
            "include /etc/ldap/schema/core.schema\n\
             include /etc/ldap/schema/cosine.schema\n\
             include /etc/ldap/schema/inetorgperson.schema\n\
             pidfile {ds}/slapd.pid\n\
             argsfile {ds}/slapd.args\n\
             modulepath /usr/lib/ldap\n\
             moduleload back_mdb\n\
             database mdb\n\
             suffix \"{LDAP_SUFFIX}\"\n\
             rootdn \"cn=admin,{LDAP_SUFFIX}\"\n\
             directory {ds}/db\n\
             maxsize 67108864\n\
             index objectClass eq\n\
             index mail eq\n\
             access to * by * read\n"
        );
        let conf_path = d.join("slapd.conf");
        write(&conf_path, &conf)?;
        let data = format!(
            "dn: {LDAP_SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: example\n\n{}\n",
            ldif.trim_start_matches(['\n', '\r'])
        );
        let data_path = d.join("data.ldif");
        write(&data_path, &data)?;

        let out = Command::new("/usr/sbin/slapadd")
            .env("LC_ALL", "C")
            .arg("-f")
            .arg(&conf_path)
            .arg("-l")
            .arg(&data_path)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run slapadd: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "slapadd failed ({})\n--- stderr ---\n{}{}\n--- data.ldif ---\n{data}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ));
        }

        let mut slapd = Slapd {
            port: 0,
            dir,
            child: None,
        };
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            match slapd.spawn_and_wait(&conf_path) {
                Ok(()) => return Ok(slapd),
                Err((retry, e)) => {
                    slapd.stop();
                    last = e;
                    if !retry {
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    fn spawn_and_wait(&mut self, conf_path: &Path) -> Result<(), (bool, String)> {
        self.port = free_port();
        let url = self.url();
        let mut cmd = Command::new("/usr/sbin/slapd");
        cmd.arg("-f")
            .arg(conf_path)
            .arg("-h")
            .arg(format!("{url}/"))
            .args(["-d", "256"]);
        self.child = Some(spawn_logged(cmd, &self.log_path()).map_err(|e| (false, e))?);
        let started = Instant::now();
        loop {
            let exited = match self.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(st))) => Some(st.to_string()),
                Some(Err(e)) => Some(format!("wait failed: {e}")),
                _ => None,
            };
            if let Some(st) = exited {
                let log = self.log();
                return Err((
                    port_in_use(&log),
                    format!(
                        "slapd exited during startup ({st}) on {url}\n--- slapd.log ---\n{log}"
                    ),
                ));
            }
            let out = probe(
                Command::new("ldapsearch")
                    .args(["-x", "-LLL", "-o", "nettimeout=1", "-l", "2", "-H"])
                    .arg(&url)
                    .args(["-s", "base", "-b", "", "namingContexts"]),
            );
            if matches!(out, Some(o) if o.contains(LDAP_SUFFIX)) {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                return Err((
                    false,
                    format!(
                        "slapd on {url} did not answer within {START_TIMEOUT:?}\n--- slapd.log ---\n{}",
                        self.log()
                    ),
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// `ldap://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.port)
    }

    /// The instance's private directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("slapd.log")
    }

    /// slapd's log so far (`-d 256`: one line per connection/operation,
    /// e.g. `SRCH base="dc=example" scope=2 ... filter="(mail=...)"`).
    pub fn log(&self) -> String {
        read_lossy(&self.log_path())
    }

    /// Kills slapd (SIGKILL) and reaps it. Idempotent; also done in Drop.
    pub fn stop(&mut self) {
        kill_child(&mut self.child);
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// LDIF helpers
// ---------------------------------------------------------------------------

/// One LDIF `attr:: base64` line, folded at 76 columns.
fn ldif_b64_line(attribute: &str, value: &[u8]) -> String {
    let line = format!("{attribute}:: {}", base64(value));
    let mut out = String::with_capacity(line.len() + line.len() / 75 * 2 + 1);
    let mut rest = line.as_str();
    let mut width = 76;
    while rest.len() > width {
        let (head, tail) = rest.split_at(width);
        out.push_str(head);
        out.push_str("\n ");
        rest = tail;
        width = 75;
    }
    out.push_str(rest);
    out.push('\n');
    out
}

/// Entry `dc=<c>,dc=example` (objectClass dcObject + organizationalUnit),
/// followed by a blank line. `c` may be given as "d3" or "dc=d3".
pub fn ldif_dc(dn_component: &str) -> String {
    let c = dn_component.strip_prefix("dc=").unwrap_or(dn_component);
    format!(
        "dn: dc={c},{LDAP_SUFFIX}\nobjectClass: dcObject\nobjectClass: organizationalUnit\ndc: {c}\nou: {c}\n\n"
    )
}

/// An inetOrgPerson below `base_dn` with cn and sn (the local part of
/// `mail`), `mail`, and one `attribute:: <base64>` value per certificate
/// (`attribute` e.g. "userCertificate;binary" or "userSMIMECertificate"),
/// followed by a blank line. The RDN is `uid=personN` with N unique in the
/// process, so several entries may share one mail address.
pub fn ldif_person(base_dn: &str, mail: &str, certs_der: &[Vec<u8>], attribute: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(1);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let local = mail
        .split('@')
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or("person");
    let mut s = format!(
        "dn: uid=person{n},{base_dn}\nobjectClass: inetOrgPerson\nuid: person{n}\ncn: {local}\nsn: {local}\nmail: {mail}\n"
    );
    for der in certs_der {
        s.push_str(&ldif_b64_line(attribute, der));
    }
    s.push('\n');
    s
}

/// Python's `http.server` on a free loopback port, serving `dir` (for
/// bundles, CRLs, AIA issuers and CERT URL records); stopped on drop.
pub struct HttpServer {
    child: std::process::Child,
    pub port: u16,
}

impl HttpServer {
    pub fn start(dir: &Path) -> HttpServer {
        HttpServer::start_on(dir, free_port())
    }

    pub fn start_on(dir: &Path, port: u16) -> HttpServer {
        let child = std::process::Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 http.server");
        for _ in 0..250 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        HttpServer { child, port }
    }

    pub fn url(&self, file: &str) -> String {
        format!("http://127.0.0.1:{}/{file}", self.port)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
