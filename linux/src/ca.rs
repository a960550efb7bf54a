//! `sluice ca`: the organisation CA and node certificates on disk.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use sluice_dataplane::identity::{self, PeerId, PemPair, Role};
use sluice_dataplane::revocation::{self, CaKey, Draft, RevocationList};

use crate::CaCmd;

const KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;

/// A file written next to its final path, renamed over it only once complete: a failed write
/// leaves the old file (or none), never half a key.
struct Staged {
    tmp: PathBuf,
    path: PathBuf,
}

impl Staged {
    fn write(path: &Path, text: &str, mode: u32) -> Result<Staged> {
        let name = path
            .file_name()
            .ok_or_else(|| anyhow!("{}: not a file name", path.display()))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        // A leftover of a crashed run with the same pid; create_new below must not follow it.
        let _ = fs::remove_file(&tmp);
        let staged = Staged {
            tmp,
            path: path.to_path_buf(),
        };
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&staged.tmp)
            .with_context(|| format!("cannot write {}", staged.tmp.display()))?;
        // The mode given at creation is narrowed by the umask; the key's must be exact.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .and_then(|()| f.write_all(text.as_bytes()))
            .and_then(|()| f.sync_all())
            .with_context(|| format!("cannot write {}", staged.tmp.display()))?;
        Ok(staged)
    }

    /// Drop then finds nothing left to remove.
    fn commit(self) -> Result<()> {
        fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

/// Writes a key and its certificate: both are staged before either replaces anything, so a
/// failure cannot leave a new key beside an old certificate.
fn write_pair(key_path: &Path, cert_path: &Path, pair: &PemPair) -> Result<()> {
    let key = Staged::write(key_path, &pair.key_pem, KEY_MODE)?;
    let cert = Staged::write(cert_path, &pair.cert_pem, CERT_MODE)?;
    key.commit()?;
    cert.commit()
}

fn validity(s: &str) -> Result<std::time::Duration> {
    identity::parse_validity(s).map_err(|e| anyhow!("--valid {e}"))
}

pub fn init_ca(dir: &Path, org: &str, valid: &str, force: bool) -> Result<()> {
    let valid = validity(valid)?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cert = dir.join("ca.pem");
    if cert.exists() && !force {
        bail!(
            "{} exists; use --force to replace the CA (certificates it issued stop working)",
            cert.display()
        );
    }
    let ca = identity::create_ca(org, valid)?;
    write_pair(&dir.join("ca.key"), &cert, &ca)
}

/// Node files are `NAME.pem` and `NAME.key` in the output directory: a name must stay one plain
/// file there.
fn check_file_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.starts_with('.')
        || name.contains("..")
        || name.contains(['/', '\\', '\0'])
    {
        bail!(
            "--name {name:?} cannot be used as a file name (NAME.pem and NAME.key are written \
             into the output directory): it must not be empty, start with a dot, or contain \
             '/' or '..'"
        );
    }
    Ok(())
}

/// Whether two paths name the same existing file, whatever the spelling (symlinks, `..`, hard
/// links).
fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Issues a node certificate into OUT/NAME.pem and OUT/NAME.key. The CA's own files are never
/// replaced; existing node files only with `force`.
pub fn issue_node(
    dir: &Path,
    role: &str,
    name: &str,
    groups: &[String],
    valid: &str,
    out: &Path,
    force: bool,
) -> Result<()> {
    let role = Role::parse(role)
        .with_context(|| format!("--role {role:?}: use agent, connector or relay"))?;
    check_file_name(name)?;
    identity::validate_name(name).map_err(|e| anyhow!("--name: {e}"))?;
    let valid = validity(valid)?;
    let ca = read_ca(dir)?;
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let (cert_path, key_path) = (
        out.join(format!("{name}.pem")),
        out.join(format!("{name}.key")),
    );
    // Checked by file identity, not by name, so `--out` spelling the CA directory another way
    // (or a link to a CA file) is caught too. --force cannot override this: the CA key would be
    // lost for good.
    for node_file in [&cert_path, &key_path] {
        for (ca_file, what) in [(&ca_cert, "certificate"), (&ca_key, "key")] {
            if same_file(node_file, ca_file) {
                let which = if node_file == ca_file {
                    String::new()
                } else {
                    format!(" {} (the same file)", ca_file.display())
                };
                bail!(
                    "--name {name:?} would write {}, the CA's own {what}{which}: that would \
                     destroy the CA (its key cannot be recovered), and --force does not allow it; \
                     choose another name or --out directory",
                    node_file.display(),
                );
            }
        }
    }
    if !force {
        for p in [&key_path, &cert_path] {
            if fs::symlink_metadata(p).is_ok() {
                bail!(
                    "{} exists: issuing {name:?} again would replace its key and certificate, \
                     and the old key would be lost (the node gets a new peer id and must be \
                     given the new files); use --force to replace them",
                    p.display()
                );
            }
        }
    }
    let groups: Vec<String> = groups
        .iter()
        .map(|g| g.trim().to_string())
        .filter(|g| !g.is_empty())
        .collect();
    let node = identity::issue(&ca, role, name, &groups, valid)?;
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    write_pair(&key_path, &cert_path, &node)
}

/// For the lab, which re-creates its CA on every `lab up` and so replaces its node files on
/// purpose.
pub fn issue(
    dir: &Path,
    role: &str,
    name: &str,
    groups: &[String],
    valid: &str,
    out: &Path,
) -> Result<()> {
    issue_node(dir, role, name, groups, valid, out, true)
}

/// RFC 3339 in UTC, to the second (`time`'s formatter is not built into this crate).
fn rfc3339_utc(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{unix} (unix seconds)"),
    }
}

/// A span for people: "3 hours", "29 days", "10 years" (rounded down).
fn human_span(secs: u64) -> String {
    let (n, unit) = match secs {
        0..120 => (secs, "second"),
        120..7_200 => (secs / 60, "minute"),
        7_200..172_800 => (secs / 3600, "hour"),
        172_800..63_072_000 => (secs / 86_400, "day"),
        _ => (secs / 31_536_000, "year"),
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

/// "in 29 days" or "EXPIRED 3 hours ago".
fn expiry_note(not_after: i64, now: i64) -> String {
    if not_after > now {
        format!("in {}", human_span(not_after.abs_diff(now)))
    } else {
        format!("EXPIRED {} ago", human_span(now.abs_diff(not_after)))
    }
}

fn read_ca(dir: &Path) -> Result<PemPair> {
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    Ok(PemPair {
        cert_pem: fs::read_to_string(&ca_cert).with_context(|| {
            format!(
                "no CA in {} (run `sluice ca init --dir {}` first)",
                dir.display(),
                dir.display()
            )
        })?,
        key_pem: fs::read_to_string(&ca_key)
            .with_context(|| format!("cannot read {}", ca_key.display()))?,
    })
}

/// Renews OUT/NAME.pem with its own key (OUT/NAME.key is read, never written).
pub fn renew_node(
    dir: &Path,
    name: &str,
    groups: Option<&[String]>,
    valid: &str,
    out: &Path,
) -> Result<identity::Identity> {
    check_file_name(name)?;
    let valid = validity(valid)?;
    let ca = read_ca(dir)?;
    let (cert_path, key_path) = (
        out.join(format!("{name}.pem")),
        out.join(format!("{name}.key")),
    );
    let node = PemPair {
        cert_pem: fs::read_to_string(&cert_path).with_context(|| {
            format!(
                "cannot read {} (renew needs the node's certificate and key; `ca issue` makes new ones)",
                cert_path.display()
            )
        })?,
        key_pem: fs::read_to_string(&key_path)
            .with_context(|| format!("cannot read {}", key_path.display()))?,
    };
    let groups: Option<Vec<String>> = groups.map(|g| {
        g.iter()
            .map(|g| g.trim().to_string())
            .filter(|g| !g.is_empty())
            .collect()
    });
    let renewed = identity::renew(&ca, &node, groups.as_deref(), valid)
        .with_context(|| format!("cannot renew {}", cert_path.display()))?;
    let id = identity::identity_from_pem(&renewed.cert_pem)?;
    if id.name != name {
        bail!(
            "{} is the certificate of {:?}, not {name:?}",
            cert_path.display(),
            id.name
        );
    }
    Staged::write(&cert_path, &renewed.cert_pem, CERT_MODE)?.commit()?;
    Ok(id)
}

/// What a `ca revoke` target names.
enum Target {
    Peer(PeerId),
    Name(String),
}

fn parse_target(t: &str) -> Result<Target> {
    if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        let mut id = [0u8; 32];
        hex::decode_to_slice(t, &mut id).map_err(|e| anyhow!("{t:?}: {e}"))?;
        return Ok(Target::Peer(PeerId(id)));
    }
    identity::validate_name(t).map_err(|e| {
        anyhow!("{e} (or give a peer id: 64 hex digits, as `sluice ca show` prints)")
    })?;
    Ok(Target::Name(t.to_string()))
}

/// Reads a revocation list file and checks its signature against `ca_cert_pem`.
fn read_list(path: &Path, ca_cert_pem: &str) -> Result<RevocationList> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let bytes =
        RevocationList::bytes_from_pem(&text).with_context(|| path.display().to_string())?;
    let ca = CaKey::from_cert_pem(ca_cert_pem)?;
    RevocationList::verify(&bytes, &ca).with_context(|| path.display().to_string())
}

/// Adds (or with `remove`, takes off) targets and writes the list signed anew: its sequence
/// number is above the old one's and at least the time now, so even a list rebuilt after the
/// file was lost replaces what the nodes hold.
pub fn revoke(
    dir: &Path,
    list_path: &Path,
    targets: &[String],
    remove: bool,
    valid: &str,
    refresh: bool,
    now: i64,
) -> Result<RevocationList> {
    if targets.is_empty() && !refresh {
        bail!("name what to revoke (a node name or a peer id), or give --refresh to sign the list again");
    }
    let valid = validity(valid)?;
    let ca = read_ca(dir)?;
    let mut draft = if fs::symlink_metadata(list_path).is_ok() {
        read_list(list_path, &ca.cert_pem)?.draft()
    } else if remove {
        bail!(
            "{}: no revocation list to remove entries from",
            list_path.display()
        );
    } else {
        Draft::default()
    };
    for t in targets {
        let changed = match (parse_target(t)?, remove) {
            (Target::Peer(p), false) => draft.peers.insert(p),
            (Target::Name(n), false) => draft.names.insert(n),
            (Target::Peer(p), true) => draft.peers.remove(&p),
            (Target::Name(n), true) => draft.names.remove(&n),
        };
        if !changed {
            let what = if remove { "is not on" } else { "is on" };
            eprintln!("note: {t} {what} the list already");
        }
    }
    draft.sequence = draft.sequence.saturating_add(1).max(now.max(0) as u64);
    draft.issued_at = now;
    draft.expires_at = now.saturating_add(valid.as_secs().min(i64::MAX as u64) as i64);
    let list = RevocationList::sign(&draft, &ca.cert_pem, &ca.key_pem)?;
    Staged::write(list_path, &list.to_pem(), CERT_MODE)?.commit()?;
    Ok(list)
}

fn print_list(list: &RevocationList, now: i64) {
    println!("revocation list #{}", list.sequence);
    println!("CA key:       {}", hex::encode(&list.ca_id[..8]));
    println!("issued:       {}", rfc3339_utc(list.issued_at));
    println!(
        "expires:      {} ({})",
        rfc3339_utc(list.expires_at),
        expiry_note(list.expires_at, now)
    );
    println!("names:        {}", join_or_none(list.names.iter().cloned()));
    println!(
        "peer ids:     {}",
        join_or_none(list.peers.iter().map(|p| p.to_string()))
    );
}

fn join_or_none(items: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = items.collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Prints a certificate; an expired one is an error (exit 1), so scripts can check. So is a
/// certificate that the list given as `revocations` revokes.
fn show(cert: &Path, revocations: Option<&Path>, ca: Option<&Path>, now: i64) -> Result<()> {
    let text =
        fs::read_to_string(cert).with_context(|| format!("cannot read {}", cert.display()))?;
    if text.contains(&format!("BEGIN {}", revocation::PEM_LABEL)) {
        let bytes =
            RevocationList::bytes_from_pem(&text).with_context(|| cert.display().to_string())?;
        let list = match ca {
            Some(ca) => {
                let ca_pem = fs::read_to_string(ca)
                    .with_context(|| format!("cannot read {}", ca.display()))?;
                RevocationList::verify(&bytes, &CaKey::from_cert_pem(&ca_pem)?)
            }
            None => RevocationList::parse_unverified(&bytes),
        }
        .with_context(|| cert.display().to_string())?;
        print_list(&list, now);
        if ca.is_none() {
            println!("signature:    not checked (give --ca CA.pem to check it)");
        } else {
            println!("signature:    valid");
        }
        return Ok(());
    }
    let s = identity::summarize_pem(&text).with_context(|| cert.display().to_string())?;
    println!("name:         {}", s.name);
    match s.role {
        Some(r) => {
            println!("role:         {r}");
            println!("groups:       {}", identity::groups_text(&s.groups));
        }
        None => println!("role:         CA"),
    }
    if let Some(o) = &s.organisation {
        println!("organisation: {o}");
    }
    println!("peer id:      {}", s.peer_id);
    if s.not_before > now {
        println!(
            "valid from:   {} (in {}: not valid yet)",
            rfc3339_utc(s.not_before),
            human_span(s.not_before.abs_diff(now))
        );
    }
    let note = expiry_note(s.not_after, now);
    println!("expires:      {} ({note})", rfc3339_utc(s.not_after));
    if let Some(list_path) = revocations {
        let ca_path = match ca {
            Some(p) => p.to_path_buf(),
            None => list_path.with_file_name("ca.pem"),
        };
        let ca_pem = fs::read_to_string(&ca_path).with_context(|| {
            format!(
                "cannot read the CA certificate {} to check the revocation list (give --ca)",
                ca_path.display()
            )
        })?;
        let list = read_list(list_path, &ca_pem)?;
        let why = if list.peers.contains(&s.peer_id) {
            Some("its peer id")
        } else if s.role.is_some() && list.names.contains(&s.name) {
            Some("its name")
        } else {
            None
        };
        match why {
            Some(why) => {
                println!(
                    "revoked:      YES: {why} is on revocation list #{} ({})",
                    list.sequence,
                    list_path.display()
                );
                bail!(
                    "{}: revoked by {} (list #{}); peers that enforce it refuse it",
                    cert.display(),
                    list_path.display(),
                    list.sequence
                );
            }
            None => println!(
                "revoked:      no (revocation list #{}, {})",
                list.sequence,
                list_path.display()
            ),
        }
    }
    if s.not_after <= now {
        let (what, consequence) = match s.role {
            None => (
                "CA certificate",
                "every certificate it issued is refused too: create a new CA",
            ),
            Some(_) => ("certificate", "peers refuse it: issue a new one"),
        };
        bail!(
            "{}: {what} {note} ({}); {consequence}",
            cert.display(),
            rfc3339_utc(s.not_after)
        );
    }
    Ok(())
}

pub fn run(cmd: CaCmd) -> Result<()> {
    match cmd {
        CaCmd::Init {
            dir,
            org,
            valid,
            force,
        } => {
            init_ca(&dir, &org, &valid, force)?;
            println!(
                "created CA {org:?}: {} (share) and {} (keep secret)",
                dir.join("ca.pem").display(),
                dir.join("ca.key").display()
            );
        }
        CaCmd::Issue {
            dir,
            role,
            name,
            groups,
            valid,
            out,
            force,
        } => {
            let out = out.unwrap_or_else(|| dir.clone());
            issue_node(&dir, &role, &name, &groups, &valid, &out, force)?;
            let cert = out.join(format!("{name}.pem"));
            let id = identity::identity_from_pem(
                &fs::read_to_string(&cert)
                    .with_context(|| format!("cannot read {}", cert.display()))?,
            )?;
            println!(
                "issued {} certificate for {:?} (groups: {}), peer id {}, valid {valid}: {} and {}",
                id.role,
                id.name,
                identity::groups_text(&id.groups),
                id.peer_id.short(),
                cert.display(),
                out.join(format!("{name}.key")).display()
            );
        }
        CaCmd::Renew {
            dir,
            name,
            groups,
            valid,
            out,
        } => {
            let out = out.unwrap_or_else(|| dir.clone());
            let id = renew_node(&dir, &name, groups.as_deref(), &valid, &out)?;
            println!(
                "renewed {} certificate for {:?} (groups: {}), peer id {} (the same key), valid {valid}: {}",
                id.role,
                id.name,
                identity::groups_text(&id.groups),
                id.peer_id.short(),
                out.join(format!("{name}.pem")).display()
            );
        }
        CaCmd::Revoke {
            targets,
            dir,
            list,
            remove,
            valid,
            refresh,
        } => {
            let path = list.unwrap_or_else(|| dir.join("revoked.pem"));
            let now = sluice_policy::watch::now_unix();
            let l = revoke(&dir, &path, &targets, remove, &valid, refresh, now)?;
            println!(
                "revocation list #{} written to {}: {} name(s), {} peer id(s); expires {}",
                l.sequence,
                path.display(),
                l.names.len(),
                l.peers.len(),
                rfc3339_utc(l.expires_at)
            );
            println!(
                "relays and connectors whose config names it as `revocations` apply it within a second and close what it revokes; connectors also get it from their relay"
            );
        }
        CaCmd::Show {
            cert,
            revocations,
            ca,
        } => show(
            &cert,
            revocations.as_deref(),
            ca.as_deref(),
            sluice_policy::watch::now_unix(),
        )?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_naturally() {
        assert_eq!(human_span(1), "1 second");
        assert_eq!(human_span(90), "90 seconds");
        assert_eq!(human_span(3 * 3600 + 5), "3 hours");
        assert_eq!(human_span(29 * 86_400 + 100), "29 days");
        assert_eq!(human_span(3650 * 86_400), "10 years");
        assert_eq!(expiry_note(1000, 1000 - 29 * 86_400), "in 29 days");
        assert_eq!(expiry_note(1000, 1000 + 3 * 3600), "EXPIRED 3 hours ago");
        assert_eq!(expiry_note(1000, 1000), "EXPIRED 0 seconds ago");
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(1_801_396_800), "2027-01-31T12:00:00Z");
    }

    #[test]
    fn unsafe_file_names_are_refused() {
        for bad in ["", ".hidden", "..", "a..b", "a/b", "../x", "a\\b"] {
            assert!(check_file_name(bad).is_err(), "{bad:?}");
        }
        for good in ["alice", "conn-1.eu", "a.b@c_d"] {
            assert!(check_file_name(good).is_ok(), "{good:?}");
        }
    }
}
