//! Policy enforcement plumbing shared by agent and connector: loading and reloading the policy
//! file, and the audit log.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use sluice_policy::watch::{PolicyWatcher, Reload};

use crate::config::ConfigError;

/// Loads the policy at start; a missing or invalid file is a configuration error (exit code 2)
/// naming the config file (`origin`) and its `policy` key.
pub fn open_policy(path: &Path, origin: &str) -> Result<PolicyWatcher> {
    if let Err(e) = std::fs::metadata(path) {
        return Err(ConfigError(format!(
            "{origin}: `policy` {}: cannot read: {e}",
            path.display()
        ))
        .into());
    }
    let (w, warnings) = PolicyWatcher::open(path).map_err(|e| {
        // One "error:" in front (the binary's) is enough: each problem is listed by place.
        let problems: Vec<String> =
            e.0.iter()
                .filter(|d| d.severity == sluice_policy::Severity::Error)
                .map(|d| {
                    let key = if d.key.is_empty() {
                        String::new()
                    } else {
                        format!("`{}`: ", d.key)
                    };
                    format!("  {}:{}:{}: {key}{}", d.file, d.line, d.column, d.message)
                })
                .collect();
        ConfigError(format!(
            "{origin}: `policy` {} is invalid (`sluice policy check` explains):\n{}",
            path.display(),
            problems.join("\n")
        ))
    })?;
    for d in warnings {
        tracing::warn!("policy: {d}");
    }
    tracing::info!(
        "policy {}: {} resources, {} rules",
        path.display(),
        w.policy().resources().len(),
        w.policy().rules().len()
    );
    Ok(w)
}

/// Checks the policy file for changes; true when a new policy is now in force.
pub fn reload(w: &mut PolicyWatcher) -> bool {
    match w.poll() {
        None => false,
        Some(r) => log_reload(w, r),
    }
}

/// Logs a reload's outcome; true if a new policy is in force.
fn log_reload(w: &PolicyWatcher, r: Reload) -> bool {
    match r {
        Reload::Updated {
            generation,
            warnings,
        } => {
            for d in warnings {
                tracing::warn!("policy: {d}");
            }
            tracing::info!(
                "policy reloaded (generation {generation}): {} resources, {} rules",
                w.policy().resources().len(),
                w.policy().rules().len()
            );
            true
        }
        Reload::Rejected(e) => {
            tracing::error!("policy change rejected, the previous policy stays in force:\n{e}");
            false
        }
    }
}

/// What an operator's reload (SIGHUP) did to the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// A new policy is in force.
    Applied,
    /// The file holds the policy in force already.
    Unchanged,
    /// The new file (or config) is invalid: the previous policy stays in force.
    Rejected,
}

/// Reloads the policy now from `path` (the configuration's `policy`, read again): the same
/// file is read whatever its time stamp, another file replaces the watched one.
pub fn reload_now(w: &mut PolicyWatcher, path: &Path, origin: &str) -> Reloaded {
    if path != w.path() {
        return match open_policy(path, origin) {
            Ok(n) => {
                tracing::info!(
                    "policy now read from {} (was {}): {} resources, {} rules",
                    path.display(),
                    w.path().display(),
                    n.policy().resources().len(),
                    n.policy().rules().len()
                );
                *w = n;
                Reloaded::Applied
            }
            Err(e) => {
                tracing::error!(
                    "policy change rejected, the previous policy stays in force: {e:#}"
                );
                Reloaded::Rejected
            }
        };
    }
    match w.reload_now() {
        None => {
            tracing::info!("policy unchanged ({})", path.display());
            Reloaded::Unchanged
        }
        Some(r) => {
            let rejected = matches!(r, Reload::Rejected(_));
            log_reload(w, r);
            if rejected {
                Reloaded::Rejected
            } else {
                Reloaded::Applied
            }
        }
    }
}

/// Where audit lines go: a file (appended) or standard output.
pub struct AuditSink {
    file: Option<File>,
}

impl AuditSink {
    pub fn open(path: Option<&Path>) -> Result<Self> {
        let file = match path {
            Some(p) => Some({
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                }
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("cannot open audit log {}", p.display()))?
            }),
            None => None,
        };
        Ok(AuditSink { file })
    }

    pub fn write_line(&mut self, line: &str) {
        let r = match &mut self.file {
            Some(f) => writeln!(f, "{line}"),
            None => writeln!(std::io::stdout().lock(), "{line}"),
        };
        if let Err(e) = r {
            tracing::warn!("audit log write failed: {e}");
        }
    }
}
