//! Reloading a policy file when it changes. The caller polls (about once a second); a file that
//! no longer validates leaves the old policy in force, and the errors are returned for logging.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::compile::{compile, Compiled};
use crate::diagnostic::{io_reason, Diagnostic, PolicyErrors};
use crate::matcher::Policy;

pub enum Reload {
    /// A new policy is in force; its generation and any warnings.
    Updated {
        generation: u64,
        warnings: Vec<Diagnostic>,
    },
    /// The file changed but is invalid: the previous policy stays.
    Rejected(PolicyErrors),
}

pub struct PolicyWatcher {
    path: PathBuf,
    stamp: Option<(SystemTime, u64)>,
    text: String,
    current: Arc<Policy>,
    generation: u64,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn read_and_compile(path: &Path) -> Result<(String, Compiled), PolicyErrors> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        PolicyErrors(vec![Diagnostic::whole_file(
            &name,
            format!("cannot read: {}", io_reason(&e)),
        )])
    })?;
    let c = compile(&text, &name, now_unix())?;
    Ok((text, c))
}

impl PolicyWatcher {
    /// Loads the policy; fails if the file is missing or invalid.
    pub fn open(path: &Path) -> Result<(Self, Vec<Diagnostic>), PolicyErrors> {
        let st = stamp(path);
        let (text, c) = read_and_compile(path)?;
        let w = PolicyWatcher {
            path: path.to_path_buf(),
            stamp: st,
            text,
            current: Arc::new(c.policy),
            generation: 1,
        };
        Ok((w, c.warnings))
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.current
    }

    /// Bumped by every successful reload; decisions cached under another generation are stale.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The policy file watched.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks the file; returns what happened if it changed.
    pub fn poll(&mut self) -> Option<Reload> {
        let st = stamp(&self.path);
        if st == self.stamp {
            return None;
        }
        self.stamp = st;
        self.read_again()
    }

    /// Reads the file now, whatever its time stamp says (an operator asked: SIGHUP); None if
    /// its text is the one in force.
    pub fn reload_now(&mut self) -> Option<Reload> {
        self.stamp = stamp(&self.path);
        self.read_again()
    }

    fn read_again(&mut self) -> Option<Reload> {
        match read_and_compile(&self.path) {
            Ok((text, c)) => {
                if text == self.text {
                    return None;
                }
                self.text = text;
                self.current = Arc::new(c.policy);
                self.generation += 1;
                Some(Reload::Updated {
                    generation: self.generation,
                    warnings: c.warnings,
                })
            }
            Err(e) => Some(Reload::Rejected(e)),
        }
    }
}
