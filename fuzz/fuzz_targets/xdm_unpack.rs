//! IHE XDM packages: `documents::xdm::read` with the default limits on an
//! arbitrary zip, then `unpack_to` into a scratch folder, checking that
//! nothing is written anywhere but directly inside it.
//!
//! An input starting with `PK` is taken as the zip itself. Any other input
//! describes the entries of a zip that the target builds (stored, so the
//! CRCs are right and mutations reach the metadata and path logic rather than
//! dying in the zip layer): entries are separated by a line `--8<--`; the
//! first line of each is the entry name, the rest its content; a name
//! starting with `->` makes a symlink entry whose target is the content.
#![no_main]

use hispd::documents::xdm::{self, Limits};
use libfuzzer_sys::fuzz_target;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

const SEPARATOR: &[u8] = b"\n--8<--\n";

/// The zip an entry-list input describes; `None` if the zip writer refuses it
/// (e.g. a duplicate name).
fn build_zip(spec: &[u8]) -> Option<Vec<u8>> {
    let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
    let mut rest = spec;
    loop {
        let (entry, next) = match rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
            Some(i) => (&rest[..i], Some(&rest[i + SEPARATOR.len()..])),
            None => (rest, None),
        };
        let (name, content) = match entry.iter().position(|b| *b == b'\n') {
            Some(i) => (&entry[..i], &entry[i + 1..]),
            None => (entry, &[][..]),
        };
        let name = String::from_utf8_lossy(name).into_owned();
        if let Some(link) = name.strip_prefix("->") {
            let target = String::from_utf8_lossy(content).into_owned();
            zip.add_symlink(link, target, options).ok()?;
        } else {
            zip.start_file(name, options).ok()?;
            zip.write_all(content).ok()?;
        }
        match next {
            Some(n) => rest = n,
            None => break,
        }
    }
    Some(zip.finish().ok()?.into_inner())
}

/// A private scratch root for the whole run; each input unpacks into
/// `<root>/out`, and `<root>` must hold nothing else afterwards.
fn scratch() -> &'static Path {
    static ROOT: OnceLock<tempfile::TempDir> = OnceLock::new();
    ROOT.get_or_init(|| {
        // tmpfs when there is one: unpack_to syncs every file it writes.
        let shm = Path::new("/dev/shm");
        let builder = tempfile::Builder::new().prefix("hispd-fuzz-xdm-").clone();
        let dir = if shm.is_dir() {
            builder.tempdir_in(shm)
        } else {
            builder.tempdir()
        };
        dir.expect("scratch dir")
    })
    .path()
}

/// Every path under `dir` (not following symlinks).
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
        out.push(path.clone());
        if is_dir {
            walk(&path, out);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let built;
    let data = if data.starts_with(b"PK") {
        data
    } else {
        match build_zip(data) {
            Some(zip) => {
                built = zip;
                &built[..]
            }
            None => return,
        }
    };
    let limits = Limits::default();
    let package = match xdm::read(data, &limits) {
        Ok(p) => p,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    for r in &package.intended_recipients {
        let _ = xdm::recipient_address(r);
    }
    let root = scratch();
    let out = root.join("out");
    let written = match xdm::unpack_to(data, &out, &limits) {
        Ok(w) => w,
        Err(e) => panic!("read() accepted the package but unpack_to() failed: {e}"),
    };
    assert_eq!(written.len(), package.documents.len());
    let mut found = Vec::new();
    walk(root, &mut found);
    for path in &found {
        assert!(
            path == &out || path.parent() == Some(out.as_path()),
            "unpack_to wrote {} outside {}",
            path.display(),
            out.display()
        );
        let meta = std::fs::symlink_metadata(path).expect("metadata of a written file");
        assert!(
            !meta.file_type().is_symlink(),
            "unpack_to made a symlink {}",
            path.display()
        );
    }
    for path in &written {
        assert_eq!(path.parent(), Some(out.as_path()), "{}", path.display());
        assert!(found.contains(path), "{} was not written", path.display());
    }
    assert_eq!(
        found.len(),
        written.len() + 1,
        "unexpected files: {found:?}"
    );
    std::fs::remove_dir_all(&out).expect("clean the scratch folder");
});
