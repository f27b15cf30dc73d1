//! The README's first steps, as a newcomer follows them: `hispd serve` with
//! no configuration file (the embedded default; only the ports are moved,
//! through HISPD__ environment overrides), the swaks command it prints, the
//! message read back over IMAP with the printed curl command, and, with the
//! daemon stopped, `hispd mailbox list|show`.

mod common;

use common::hisp::hispd_bin;
use common::servers::free_port;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Waits until `path` holds text for which `done` is true; returns the text.
fn wait_for(path: &std::path::Path, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if done(&text) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The shell words of the printed command that starts with `program`
/// (continuation lines joined).
fn printed_command(text: &str, program: &str) -> Vec<String> {
    let joined = text.replace("\\\n", " ");
    let line = joined
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(program))
        .unwrap_or_else(|| panic!("no {program} command printed:\n{text}"));
    line.split_whitespace()
        .map(|w| w.trim_matches('\'').to_string())
        .collect()
}

#[test]
fn the_readme_walkthrough_works_on_the_embedded_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("serve.log");
    let (mx, sub, imap, pop3, pull) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let mut daemon = Command::new(hispd_bin())
        .arg("serve")
        .current_dir(dir.path())
        .env_remove("HISPD_LOG")
        .env("HISPD__SERVER__MX_LISTEN", format!("127.0.0.1:{mx}"))
        .env(
            "HISPD__SERVER__SUBMISSION_LISTEN",
            format!("127.0.0.1:{sub}"),
        )
        .env("HISPD__SERVER__IMAP_LISTEN", format!("127.0.0.1:{imap}"))
        .env("HISPD__SERVER__POP3_LISTEN", format!("127.0.0.1:{pop3}"))
        .env("HISPD__PULL__LISTEN", format!("127.0.0.1:{pull}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("hispd serve");

    let text = wait_for(&log, |t| t.contains("imap://"));
    assert!(
        text.contains("hispd serving") && text.contains("development domain direct.test"),
        "{text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "no terminal colours in a log file:\n{text}"
    );
    assert!(dir.path().join("data").is_dir(), "state lives under ./data");

    // The printed swaks command, run as printed.
    let swaks = printed_command(&text, "swaks");
    assert!(swaks.contains(&format!("127.0.0.1:{sub}")), "{swaks:?}");
    let out = Command::new(&swaks[0])
        .args(&swaks[1..])
        .args(["--header", "Subject: my first Direct message"])
        .output()
        .expect("swaks (apt-get install swaks)");
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{transcript}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(transcript.contains("<~  250 "), "accepted: {transcript}");

    // The log shows each step the README names.
    let text = wait_for(&log, |t| t.contains("delivered mailbox=demo@direct.test"));
    for step in [
        "accepted for delivery",
        "sealed",
        "incoming-trusted",
        "delivered mailbox=demo@direct.test",
    ] {
        assert!(text.contains(step), "the log shows {step:?}:\n{text}");
    }

    // The printed curl command reads it over IMAP (STARTTLS), decrypted.
    let curl = printed_command(&text, "curl");
    assert!(curl.contains(&"--ssl-reqd".to_string()), "{curl:?}");
    let out = Command::new(&curl[0])
        .args(&curl[1..])
        .args(["--max-time", "30"])
        .output()
        .expect("curl");
    let message = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        message.contains("Subject: my first Direct message"),
        "{message}"
    );
    assert!(
        message.contains("This is a test mailing"),
        "swaks' body: {message}"
    );
    assert!(!message.contains("pkcs7"), "decrypted: {message}");

    // Ctrl-C: it drains and exits cleanly; then the mailbox commands.
    let _ = Command::new("kill")
        .args(["-INT", &daemon.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(s) = daemon.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "hispd did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "clean exit: {status}");
    let list = Command::new(hispd_bin())
        .args(["mailbox", "list", "demo@direct.test"])
        .current_dir(dir.path())
        .output()
        .expect("mailbox list");
    let listing = String::from_utf8_lossy(&list.stdout);
    let message_id = message
        .lines()
        .find_map(|l| {
            l.strip_prefix("Message-ID: ")
                .or(l.strip_prefix("Message-Id: "))
        })
        .unwrap_or_else(|| panic!("a Message-ID: {message}"))
        .trim()
        .to_string();
    // One id per message on every line about it: the job's span carries
    // the Message-ID into sealing, the audit event and the delivery.
    let text = std::fs::read_to_string(&log).expect("log");
    for step in ["sealed", "incoming-trusted", "delivered mailbox="] {
        assert!(
            text.lines().any(|l| l.contains(step)
                && l.contains(&format!("message_id=\"{message_id}\""))
                && l.contains("job{id=")),
            "the {step:?} line names the message:\n{text}"
        );
    }
    assert!(
        text.lines()
            .any(|l| l.contains("auth-ok") && l.contains("smtp{session=")),
        "the SMTP session's lines carry its id:\n{text}"
    );
    assert!(
        list.status.success() && listing.starts_with("1\t") && listing.contains(&message_id),
        "{listing}\n{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let show = Command::new(hispd_bin())
        .args(["mailbox", "show", "demo@direct.test", "1"])
        .current_dir(dir.path())
        .output()
        .expect("mailbox show");
    assert!(show.status.success());
    assert_eq!(
        String::from_utf8_lossy(&show.stdout).replace("\r\n", "\n"),
        message.replace("\r\n", "\n"),
        "the CLI shows what IMAP served"
    );
}
