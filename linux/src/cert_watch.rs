//! The node's certificate, key and CA files, watched: a renewed certificate (`sluice ca renew`,
//! or a short-lived one an enrolment service wrote) is read within a second of the change and
//! handed to the core, which uses it for new connections and presents it on the live ones, so
//! no flow is dropped. A file caught half-written, or a certificate that does not fit, is said
//! once per change and the credentials in force stay.

use std::path::Path;
use std::time::SystemTime;

use sluice_dataplane::identity::Role;
use sluice_dataplane::tls::Credentials;

use crate::config::IdentityFiles;

/// Modification time and length of each of the three files.
type Stamps = [Option<(SystemTime, u64)>; 3];

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

pub struct CertWatch {
    files: IdentityFiles,
    role: Role,
    origin: String,
    /// As last read (or found bad).
    stamps: Stamps,
    /// The credentials in force.
    current: Credentials,
}

impl CertWatch {
    /// Call right after `current` was read from `files`.
    pub fn new(files: IdentityFiles, role: Role, origin: &str, current: Credentials) -> CertWatch {
        let stamps = Self::stamps_of(&files);
        CertWatch {
            files,
            role,
            origin: origin.to_string(),
            stamps,
            current,
        }
    }

    /// The core took the credentials [`CertWatch::poll`] gave: they are in force now.
    pub fn accept(&mut self, new: Credentials) {
        self.current = new;
    }

    /// The CA file, for the metrics' expiry figures.
    pub fn ca_path(&self) -> std::path::PathBuf {
        self.files.ca.clone()
    }

    fn stamps_of(files: &IdentityFiles) -> Stamps {
        [stamp(&files.cert), stamp(&files.key), stamp(&files.ca)]
    }

    /// New credentials when a file changed, they read well and they differ from those in
    /// force. The revocation list in force carries over (it is the node's, not the
    /// certificate's).
    pub fn poll(&mut self) -> Option<Credentials> {
        let current = &self.current;
        let stamps = Self::stamps_of(&self.files);
        if stamps == self.stamps {
            return None;
        }
        self.stamps = stamps;
        let mut new = match crate::node::credentials(&self.files, self.role, &self.origin) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("certificate files changed but cannot be used ({e:#}); the certificate in force stays");
                return None;
            }
        };
        let same = match (new.certificate_der(), current.certificate_der()) {
            (Ok(a), Ok(b)) => a == b && new.identity.peer_id == current.identity.peer_id,
            _ => false,
        };
        if same {
            return None;
        }
        new.revocations = current.revocations.clone();
        let left = new.identity.not_after - sluice_dataplane::identity::unix_now();
        tracing::info!(
            "certificate {} renewed: {:?} (peer {}), valid for another {}",
            self.files.cert.display(),
            new.identity.name,
            new.identity.peer_id.short(),
            crate::node::human_duration(std::time::Duration::from_secs(left.max(0) as u64))
        );
        Some(new)
    }
}
