//! A relay's or a connector's revocation list file (`revocations` in its config): read at
//! start, where a bad one is a configuration error, and read again within a second of a change
//! (and on SIGHUP), where a bad one is logged and the list in force stays.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Result;
use sluice_dataplane::revocation::{CaKey, RevocationList};
use sluice_dataplane::tls::Credentials;

use crate::config::ConfigError;

pub struct RevocationFile {
    path: PathBuf,
    /// Modification time and length when last read.
    stamp: Option<(SystemTime, u64)>,
    /// An unreadable file is said once, not every second.
    unreadable: bool,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn read(path: &Path) -> std::result::Result<Vec<u8>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    RevocationList::bytes_from_pem(&text).map_err(|e| e.to_string())
}

impl RevocationFile {
    /// Reads the file at start and puts its list in force in `creds.revocations` (the handle
    /// every handshake checks). Returns the watcher and the list's bytes, for a core that
    /// hands it on or enforces it.
    pub fn open(path: &Path, creds: &Credentials, origin: &str) -> Result<(Self, Vec<u8>)> {
        let bad =
            |why: String| ConfigError(format!("{origin}: `revocations` {}: {why}", path.display()));
        let st = stamp(path);
        let bytes = read(path).map_err(bad)?;
        let ca: CaKey = creds.ca_key().map_err(|e| bad(e.to_string()))?;
        RevocationList::verify(&bytes, &ca).map_err(|e| bad(e.to_string()))?;
        let source = path.display().to_string();
        creds
            .revocations
            .load(&bytes, &ca, &source, sluice_dataplane::identity::unix_now())
            .map_err(|e| bad(e.to_string()))?;
        let file = RevocationFile {
            path: path.to_path_buf(),
            stamp: st,
            unreadable: false,
        };
        Ok((file, bytes))
    }

    pub fn source(&self) -> String {
        self.path.display().to_string()
    }

    /// The file's bytes if it changed since it was last read (or always, with `force`: a
    /// SIGHUP). Whoever gets them loads them, which verifies and logs.
    pub fn poll(&mut self, force: bool) -> Option<Vec<u8>> {
        let st = stamp(&self.path);
        if !force && st == self.stamp {
            return None;
        }
        match read(&self.path) {
            Ok(b) => {
                self.stamp = st;
                self.unreadable = false;
                Some(b)
            }
            Err(why) => {
                if !self.unreadable || force {
                    tracing::warn!(
                        "revocation list {}: {why}; the list in force stays",
                        self.path.display()
                    );
                }
                self.unreadable = true;
                self.stamp = st;
                None
            }
        }
    }
}
