//! Headless Chromium for page screenshots and DOM dumps, kept off the
//! network: every request that is not to loopback goes to a dead proxy
//! (127.0.0.1:9), which also keeps Chromium from resolving their names,
//! and Chromium's own background traffic is switched off. `http://127.x.x.x`,
//! `http://localhost` and `file://` URLs load.
//!
//! The browser is `HISPD_TEST_CHROMIUM` (scripts/test.sh exports it) or
//! `chromium` on PATH (Debian package `chromium`). Each run gets a throwaway
//! profile, crash-dump directory and HOME, and is killed after 60 s.
//!
//! Chromium exits 0 even when the page failed to load, so its stderr is
//! checked for "Page load failed" and the screenshot for its size.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(60);

/// The Chromium binary; panics if there is none.
pub fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("HISPD_TEST_CHROMIUM").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "HISPD_TEST_CHROMIUM={} does not exist; install the Debian package `chromium` \
             (scripts/test.sh does)",
            path.display()
        );
        return path;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("chromium"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "chromium not found (HISPD_TEST_CHROMIUM unset, none on PATH): install the \
                 Debian package `chromium` (scripts/test.sh does)"
            )
        })
}

/// The `file://` URL of a local file (made absolute).
pub fn file_url(path: &Path) -> String {
    let path = std::path::absolute(path).expect("absolute path");
    url::Url::from_file_path(&path)
        .unwrap_or_else(|()| panic!("no file URL for {}", path.display()))
        .to_string()
}

/// Renders `url` in a `width`×`height` window and saves a PNG of it to
/// `out` (its directory is made if missing). Panics if the page did not
/// load or the PNG is not `width`×`height`.
pub fn screenshot(url: &str, out: &Path, width: u32, height: u32) {
    let out = std::path::absolute(out).expect("absolute screenshot path");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("browser: mkdir {}: {e}", dir.display()));
    }
    match std::fs::remove_file(&out) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("browser: remove old {}: {e}", out.display()),
    }
    let (_, stderr) = run(
        &[
            format!("--window-size={width},{height}"),
            format!("--screenshot={}", out.display()),
        ],
        url,
    );
    assert!(
        out.is_file(),
        "browser: chromium wrote no screenshot of {url} to {}:\n{stderr}",
        out.display()
    );
    let (w, h, _) = png_info(&out);
    assert_eq!(
        (w, h),
        (width, height),
        "browser: screenshot of {url} has the wrong size"
    );
}

/// The DOM of `url` after it loaded (and ran its scripts), serialized.
pub fn dump_dom(url: &str) -> String {
    let (stdout, stderr) = run(&["--dump-dom".to_string()], url);
    assert!(
        !stdout.trim().is_empty(),
        "browser: chromium dumped no DOM for {url}:\n{stderr}"
    );
    stdout
}

/// Width, height and the number of distinct colours (over every pixel) of
/// a non-interlaced PNG; a blank page has one colour.
pub fn png_info(path: &Path) -> (u32, u32, usize) {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("png: read {}: {e}", path.display()));
    let what = path.display();
    assert!(
        data.starts_with(b"\x89PNG\r\n\x1a\n"),
        "png: {what} is not a PNG"
    );
    let mut at = 8;
    let mut header = None;
    let mut idat = Vec::new();
    while at + 12 <= data.len() {
        let len = u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        let kind = &data[at + 4..at + 8];
        let body = data
            .get(at + 8..at + 8 + len)
            .unwrap_or_else(|| panic!("png: {what}: chunk runs past the end"));
        match kind {
            b"IHDR" => header = Some(body.to_vec()),
            b"IDAT" => idat.extend_from_slice(body),
            b"IEND" => break,
            _ => {}
        }
        at += 12 + len;
    }
    let ihdr = header.unwrap_or_else(|| panic!("png: {what}: no IHDR"));
    assert!(ihdr.len() == 13, "png: {what}: bad IHDR");
    let width = u32::from_be_bytes(ihdr[0..4].try_into().unwrap());
    let height = u32::from_be_bytes(ihdr[4..8].try_into().unwrap());
    let (depth, colour_type, interlace) = (ihdr[8] as usize, ihdr[9], ihdr[12]);
    assert!(
        interlace == 0,
        "png: {what}: interlaced PNGs are not supported"
    );
    let channels = match colour_type {
        0 | 3 => 1,
        2 => 3,
        4 => 2,
        6 => 4,
        other => panic!("png: {what}: unknown colour type {other}"),
    };
    let bits = channels * depth;
    let bpp = bits.div_ceil(8).max(1);
    let stride = (width as usize * bits).div_ceil(8);
    let raw = inflate(&idat);
    assert!(
        raw.len() >= (stride + 1) * height as usize,
        "png: {what}: image data too short"
    );
    let mut colours = HashSet::new();
    let mut prev = vec![0u8; stride];
    let mut row = vec![0u8; stride];
    for y in 0..height as usize {
        let line = &raw[y * (stride + 1)..(y + 1) * (stride + 1)];
        let filter = line[0];
        for i in 0..stride {
            let a = if i >= bpp { row[i - bpp] as i16 } else { 0 };
            let b = prev[i] as i16;
            let c = if i >= bpp { prev[i - bpp] as i16 } else { 0 };
            let predictor = match filter {
                0 => 0,
                1 => a,
                2 => b,
                3 => (a + b) / 2,
                4 => {
                    let p = a + b - c;
                    let (pa, pb, pc) = ((p - a).abs(), (p - b).abs(), (p - c).abs());
                    if pa <= pb && pa <= pc {
                        a
                    } else if pb <= pc {
                        b
                    } else {
                        c
                    }
                }
                other => panic!("png: {what}: unknown filter {other} in row {y}"),
            };
            row[i] = line[1 + i].wrapping_add(predictor as u8);
        }
        for x in 0..width as usize {
            let colour = if bits >= 8 {
                let bytes = &row[x * bits / 8..(x + 1) * bits / 8];
                bytes.iter().fold(0u64, |acc, &b| acc << 8 | b as u64)
            } else {
                let bit = x * bits;
                ((row[bit / 8] >> (8 - bits - bit % 8)) & ((1u8 << bits) - 1)) as u64
            };
            colours.insert(colour);
        }
        std::mem::swap(&mut prev, &mut row);
    }
    (width, height, colours.len())
}

/// zlib-decompresses with python3's zlib (no inflate crate is a dependency).
fn inflate(data: &[u8]) -> Vec<u8> {
    let mut file = tempfile::NamedTempFile::new().expect("png: temp file");
    std::io::Write::write_all(&mut file, data).expect("png: write temp file");
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, zlib; sys.stdout.buffer.write(zlib.decompress(open(sys.argv[1], 'rb').read()))",
        ])
        .arg(file.path())
        .output()
        .unwrap_or_else(|e| panic!("png: cannot run python3 to inflate: {e}"));
    assert!(
        out.status.success(),
        "png: inflating image data failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Runs headless Chromium with `extra` flags on `url`; (stdout, stderr).
/// Panics if it fails, times out, or reports that the page did not load.
fn run(extra: &[String], url: &str) -> (String, String) {
    let chromium = chromium();
    let scratch = tempfile::Builder::new()
        .prefix("hispd-chromium-")
        .tempdir()
        .expect("browser: temp dir");
    let dir = |name: &str| {
        let path = scratch.path().join(name);
        std::fs::create_dir(&path).expect("browser: mkdir");
        path
    };
    let (profile, crashes, home) = (dir("profile"), dir("crashes"), dir("home"));
    let stdout_path = scratch.path().join("stdout");
    let stderr_path = scratch.path().join("stderr");
    let mut command = Command::new(&chromium);
    command
        .args([
            "--headless",
            "--no-sandbox", // as root Chromium refuses to start with its sandbox
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--mute-audio",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--no-pings",
            "--disable-domain-reliability",
            "--force-webrtc-ip-handling-policy=disable_non_proxied_udp",
            // Everything but loopback goes to a dead proxy. (Chromium
            // bypasses proxies for loopback by itself; the list says so
            // again. `<-loopback>` would do the opposite: send loopback
            // to the proxy too.)
            "--proxy-server=127.0.0.1:9",
            "--proxy-bypass-list=127.0.0.0/8;localhost;[::1]",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--crash-dumps-dir={}", crashes.display()))
        .args(extra)
        .arg(url)
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_path).expect("browser: stdout file"))
        .stderr(File::create(&stderr_path).expect("browser: stderr file"))
        // Its own process group, so that the renderer, zygote and crash
        // handler are killed with it.
        .process_group(0);
    let started = Instant::now();
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("browser: cannot start {}: {e}", chromium.display()));
    let status = loop {
        if let Some(status) = child.try_wait().expect("browser: wait") {
            break Some(status);
        }
        if started.elapsed() > TIMEOUT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    kill_group(child.id());
    let _ = child.wait();
    let stdout =
        String::from_utf8_lossy(&std::fs::read(&stdout_path).unwrap_or_default()).into_owned();
    let stderr =
        String::from_utf8_lossy(&std::fs::read(&stderr_path).unwrap_or_default()).into_owned();
    let status = status.unwrap_or_else(|| {
        panic!("browser: chromium on {url} did not finish in {TIMEOUT:?}; killed:\n{stderr}")
    });
    assert!(
        status.success(),
        "browser: chromium on {url} failed ({status}):\n{stderr}"
    );
    if let Some(line) = stderr.lines().find(|l| l.contains("Page load failed")) {
        panic!("browser: {url} did not load: {line}");
    }
    (stdout, stderr)
}

/// SIGKILL to the process group `pgid` (what is left of it, if anything).
fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
