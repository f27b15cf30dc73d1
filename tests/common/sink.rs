//! Postfix's `smtp-sink` as a real SMTP peer that accepts mail and dumps
//! each transaction to a file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn free_port() -> u16 {
    super::servers::free_port()
}

/// A running `smtp-sink`, killed on drop.
pub struct SmtpSink {
    child: Child,
    pub addr: SocketAddr,
    pub dumps: tempfile::TempDir,
}

impl SmtpSink {
    /// `smtp-sink [extra] -d DIR/msg. 127.0.0.1:PORT 10`, ready to accept.
    pub fn start(extra: &[&str]) -> SmtpSink {
        let sink = which("smtp-sink")
            .unwrap_or_else(|| panic!("smtp-sink not found: install the Debian package `postfix`"));
        let dumps = tempfile::tempdir().expect("dump directory");
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
        let mut command = Command::new(sink);
        if is_root() {
            // smtp-sink refuses to run as root without a user to switch to.
            command.args(["-u", "root"]);
        }
        command
            .args(extra)
            .arg("-d")
            .arg(format!("{}/msg.", dumps.path().display()))
            .arg(format!("127.0.0.1:{port}"))
            .arg("10")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start smtp-sink");
        for _ in 0..200 {
            if std::net::TcpStream::connect(addr).is_ok() {
                return SmtpSink { child, addr, dumps };
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut stderr) = child.stderr.take() {
                    use std::io::Read;
                    let _ = stderr.read_to_string(&mut err);
                }
                panic!("smtp-sink exited ({status}): {err}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("smtp-sink did not start listening on {addr}");
    }

    /// The one dumped transaction, once smtp-sink has written all of it.
    pub fn single_dump(&self) -> Vec<u8> {
        for _ in 0..200 {
            let files = dump_files(self.dumps.path());
            if let [file] = files.as_slice() {
                let bytes = std::fs::read(file).expect("read dump");
                // The dump ends with an empty line once complete.
                if bytes.ends_with(b"\n\n") {
                    return bytes;
                }
            }
            assert!(files.len() <= 1, "more than one dump: {files:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("smtp-sink wrote no complete dump");
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn dump_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
}

pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
