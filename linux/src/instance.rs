//! One agent per tunnel address in a network namespace, and one owner of a resolv.conf.
//!
//! Two agents with the same tunnel address in one network namespace fight over the DNS address,
//! the routes and the resolver backup: a second start used to restore the first agent's
//! resolv.conf, replace its routes and then fail on the DNS port, leaving the first agent cut
//! off. So the agent takes an exclusive `flock` before it touches anything, keyed by the network
//! namespace it runs in and its tunnel address (agents of two organisations, with their own
//! addresses and networks, can share a namespace), and one more while it has a resolv.conf
//! rewritten, keyed by that file. A lock dies with its
//! process, so a crash never leaves a stale one; the file's text only says who holds it.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Where agents keep their locks and the resolver backup.
pub const STATE_DIR: &str = "/run/sluice";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another sluice agent holds {path} ({holder}); stop it first, or run this one in another network namespace")]
    Held { path: PathBuf, holder: String },
    #[error("cannot take the lock {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An exclusive lock, released when dropped (or when the process ends, however it ends).
#[derive(Debug)]
pub struct InstanceLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl InstanceLock {
    /// Takes the lock at `path` without waiting and writes `who` into it.
    pub fn take(path: &Path, who: &str) -> Result<InstanceLock, LockError> {
        let io = |source| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(LockError::Held {
                    path: path.to_path_buf(),
                    holder: if holder.is_empty() {
                        "a process that has not said who it is yet".into()
                    } else {
                        holder.to_string()
                    },
                });
            }
            Err((_, e)) => return Err(io(std::io::Error::from(e))),
        };
        // Only the holder writes, and only after it holds the lock.
        lock.set_len(0).map_err(io)?;
        lock.rewind().map_err(io)?;
        lock.write_all(who.as_bytes()).map_err(io)?;
        Ok(InstanceLock {
            _lock: lock,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The lock for agents with tunnel address `tun` in this process's network namespace.
pub fn netns_lock_path(state_dir: &Path, tun: std::net::Ipv4Addr) -> PathBuf {
    // The namespace's inode tells namespaces apart (`ip netns identify` uses the same).
    let id = fs::metadata("/proc/self/ns/net").map_or(0, |m| m.ino());
    state_dir.join(format!("agent.netns-{id}.{tun}.lock"))
}

/// What a lock file says about its holder: pid and what it runs.
pub fn holder_text(what: &str) -> String {
    format!("pid {}, {what}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_and_names_the_holder_then_freed_on_drop() {
        let dir = std::env::temp_dir().join(format!("sluice-lock-test-{}", std::process::id()));
        let path = dir.join("x.lock");
        let first = InstanceLock::take(&path, "pid 1, TUN sluice0").unwrap();
        match InstanceLock::take(&path, "pid 2") {
            Err(LockError::Held { holder, .. }) => assert_eq!(holder, "pid 1, TUN sluice0"),
            other => panic!("expected a held lock, got {other:?}"),
        }
        drop(first);
        let again = InstanceLock::take(&path, "pid 3").unwrap();
        assert_eq!(fs::read_to_string(again.path()).unwrap(), "pid 3");
        drop(again);
        let _ = fs::remove_dir_all(dir);
    }
}
