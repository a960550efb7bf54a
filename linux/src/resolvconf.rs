//! Making the agent the system's resolver, and giving the system its resolver back.
//!
//! With systemd-resolved (/etc/resolv.conf points at its stub), the agent sets per-link DNS and
//! routing domains on its TUN device: only resource domains go to the agent, and the settings
//! vanish with the device. Otherwise the agent rewrites /etc/resolv.conf in place (a bind mount,
//! as in network namespaces, cannot be replaced by rename), after saving the original under
//! /run/sluice. It restores the original on exit; after a crash, the next start restores it
//! first. The backup is named after the file's device and inode, so agents in different
//! namespaces, each with its own resolv.conf, never mix up their backups. Whoever rewrites a
//! resolv.conf, or restores a leftover backup, first holds that file's lock
//! ([`crate::instance`]), so a second agent can never undo a live agent's change.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::instance::{InstanceLock, LockError, STATE_DIR};

const RESOLV_CONF: &str = "/etc/resolv.conf";
const STUB: &str = "/run/systemd/resolve/stub-resolv.conf";

/// What the agent changed, to be undone by [`SystemDns::restore`] (also on drop).
pub enum SystemDns {
    /// systemd-resolved link settings: they go away with the TUN device.
    Resolved,
    /// resolv.conf rewritten; the original is in `backup`.
    ResolvConf {
        target: PathBuf,
        backup: PathBuf,
        restored: bool,
        /// Held until the original is back.
        _lock: InstanceLock,
    },
}

/// The right to change this namespace's resolv.conf: its lock, taken before anything is read
/// or restored.
pub struct Claim {
    lock: Option<InstanceLock>,
}

/// Where the original of `target` is kept while the agent has it rewritten.
pub fn backup_path(target: &Path) -> Result<PathBuf> {
    let m = fs::metadata(target).with_context(|| format!("cannot read {}", target.display()))?;
    Ok(Path::new(STATE_DIR).join(format!("resolv.conf.{}-{}.backup", m.dev(), m.ino())))
}

/// Takes the lock of /etc/resolv.conf (as this namespace sees it), then restores what a
/// previous agent left rewritten when it crashed or was killed: the lock proves that agent is
/// gone. Fails with [`LockError::Held`] while another agent has the file rewritten.
pub fn claim(who: &str) -> Result<Claim> {
    let target = Path::new(RESOLV_CONF);
    let backup = backup_path(target)?;
    let lock = InstanceLock::take(&backup.with_extension("lock"), who)?;
    if let Ok(original) = fs::read(&backup) {
        fs::write(target, original)
            .with_context(|| format!("cannot restore {}", target.display()))?;
        fs::remove_file(&backup)?;
        tracing::warn!(
            "restored {} as a previous agent left it changed",
            target.display()
        );
    }
    Ok(Claim { lock: Some(lock) })
}

/// Whether an error of [`claim`] means another agent owns the file.
pub fn is_held(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<LockError>(), Some(LockError::Held { .. }))
}

fn uses_resolved() -> bool {
    fs::canonicalize(RESOLV_CONF).is_ok_and(|p| p == Path::new(STUB))
        && Command::new("resolvectl")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {cmd}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Makes `server` (the agent's DNS address) the resolver: for `domains` only with
/// systemd-resolved, for everything otherwise (the agent forwards the rest upstream).
pub fn take_over(
    claim: &mut Claim,
    tun: &str,
    server: &str,
    domains: &[String],
) -> Result<SystemDns> {
    if uses_resolved() {
        run("resolvectl", &["dns", tun, server])?;
        let routing: Vec<String> = domains.iter().map(|d| format!("~{d}")).collect();
        let mut args = vec!["domain", tun];
        args.extend(routing.iter().map(String::as_str));
        run("resolvectl", &args)?;
        tracing::info!(
            "systemd-resolved: {} via {server} on {tun}",
            routing.join(" ")
        );
        return Ok(SystemDns::Resolved);
    }
    let target = PathBuf::from(RESOLV_CONF);
    let lock = claim
        .lock
        .take()
        .context("resolv.conf was taken over once already")?;
    let original = fs::read_to_string(&target).unwrap_or_default();
    fs::create_dir_all(STATE_DIR)?;
    let backup = backup_path(&target)?;
    fs::write(&backup, &original).with_context(|| format!("cannot save {}", backup.display()))?;
    // Keep the search list and options: only the servers change.
    let kept: Vec<&str> = original
        .lines()
        .filter(|l| l.starts_with("search") || l.starts_with("domain") || l.starts_with("options"))
        .collect();
    let text = format!(
        "# Written by the sluice agent, which answers resource names and forwards the rest\n# to the servers this file named before. The original comes back when the agent stops.\nnameserver {server}\n{}",
        kept.iter().map(|l| format!("{l}\n")).collect::<String>()
    );
    fs::write(&target, text).with_context(|| format!("cannot write {}", target.display()))?;
    tracing::info!(
        "{} now points at {server} (original saved in {})",
        target.display(),
        backup.display()
    );
    Ok(SystemDns::ResolvConf {
        target,
        backup,
        restored: false,
        _lock: lock,
    })
}

impl SystemDns {
    pub fn restore(&mut self) {
        if let SystemDns::ResolvConf {
            target,
            backup,
            restored,
            ..
        } = self
        {
            if *restored {
                return;
            }
            match fs::read(&*backup).and_then(|orig| fs::write(&*target, orig)) {
                Ok(()) => {
                    let _ = fs::remove_file(&*backup);
                    tracing::info!("restored {}", target.display());
                }
                Err(e) => tracing::error!(
                    "cannot restore {} from {}: {e}",
                    target.display(),
                    backup.display()
                ),
            }
            *restored = true;
        }
    }
}

impl Drop for SystemDns {
    fn drop(&mut self) {
        self.restore();
    }
}
