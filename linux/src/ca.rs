//! `sluice ca`: the organisation CA and node certificates on disk.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use sluice_dataplane::identity::{self, PemPair, Role};

use crate::CaCmd;

fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn validity(s: &str) -> Result<std::time::Duration> {
    identity::parse_validity(s).with_context(|| {
        format!("--valid {s:?}: use a number and a unit s, m, h, d or y (like 12h)")
    })
}

pub fn init_ca(dir: &Path, org: &str, valid: &str, force: bool) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cert = dir.join("ca.pem");
    if cert.exists() && !force {
        bail!(
            "{} exists; use --force to replace the CA (certificates it issued stop working)",
            cert.display()
        );
    }
    let ca = identity::create_ca(org, validity(valid)?)?;
    write_file(&dir.join("ca.key"), &ca.key_pem, 0o600)?;
    write_file(&cert, &ca.cert_pem, 0o644)?;
    Ok(())
}

pub fn issue(
    dir: &Path,
    role: &str,
    name: &str,
    groups: &[String],
    valid: &str,
    out: &Path,
) -> Result<()> {
    let role = Role::parse(role)
        .with_context(|| format!("--role {role:?}: use agent, connector or relay"))?;
    let ca = PemPair {
        cert_pem: fs::read_to_string(dir.join("ca.pem")).with_context(|| {
            format!(
                "no CA in {} (run `sluice ca init --dir {}` first)",
                dir.display(),
                dir.display()
            )
        })?,
        key_pem: fs::read_to_string(dir.join("ca.key"))
            .with_context(|| format!("cannot read {}", dir.join("ca.key").display()))?,
    };
    let groups: Vec<String> = groups
        .iter()
        .map(|g| g.trim().to_string())
        .filter(|g| !g.is_empty())
        .collect();
    let node = identity::issue(&ca, role, name, &groups, validity(valid)?)?;
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    write_file(&out.join(format!("{name}.key")), &node.key_pem, 0o600)?;
    write_file(&out.join(format!("{name}.pem")), &node.cert_pem, 0o644)?;
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
        } => {
            let out = out.unwrap_or_else(|| dir.clone());
            issue(&dir, &role, &name, &groups, &valid, &out)?;
            let id =
                identity::identity_from_pem(&fs::read_to_string(out.join(format!("{name}.pem")))?)?;
            println!(
                "issued {} certificate for {:?} (groups: {}), peer id {}, valid {valid}: {} and {}",
                id.role,
                id.name,
                if id.groups.is_empty() {
                    "none".into()
                } else {
                    id.groups.join(",")
                },
                id.peer_id.short(),
                out.join(format!("{name}.pem")).display(),
                out.join(format!("{name}.key")).display()
            );
        }
        CaCmd::Show { cert } => {
            let text = fs::read_to_string(&cert)
                .with_context(|| format!("cannot read {}", cert.display()))?;
            let id =
                identity::identity_from_pem(&text).with_context(|| cert.display().to_string())?;
            println!("name:    {}", id.name);
            println!("role:    {}", id.role);
            println!("groups:  {}", id.groups.join(","));
            println!("peer id: {}", id.peer_id);
            println!("expires: {} (unix seconds)", id.not_after);
        }
    }
    Ok(())
}
