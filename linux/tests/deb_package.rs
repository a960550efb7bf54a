//! The Debian package (`cargo deb -p sluice --no-build`, configured in linux/Cargo.toml's
//! [package.metadata.deb]) installs, works, and goes away again in a bare Debian 12: a fresh
//! `debootstrap --variant=minbase bookworm` root (made once, then kept as
//! target/debootstrap-bookworm-minbase.tar; delete that file to make a new one), where
//! `dpkg -i` must succeed with what minbase has, the binary runs and checks the shipped policy,
//! the user `sluice` exists, the units are installed but not enabled; then `dpkg -r` keeps the
//! configuration, and `dpkg --purge` removes it, the user and every file of the package; the
//! same once more without adduser (postinst and postrm then use useradd and userdel).
//!
//! Needs root (debootstrap, chroot, mounts), cargo-deb, debootstrap and dpkg-dev (all installed
//! by scripts/setup.sh), the release binary target/release/sluice (`cargo build --release`),
//! and, the first time only, the Debian mirror (SLUICE_DEBIAN_MIRROR, default
//! http://deb.debian.org/debian). Without any of them it fails and says which; it never skips.
//! Every chroot command runs in a mount namespace of its own, so its /proc mount cannot
//! outlive it; the root is removed when the test ends, passed or failed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");
const VERSION: &str = env!("CARGO_PKG_VERSION");
const UNITS: [&str; 3] = [
    "sluice-relay.service",
    "sluice-connector.service",
    "sluice-agent.service",
];
const CONFIGS: [&str; 4] = ["relay.yaml", "connector.yaml", "agent.yaml", "policy.yaml"];
const CACHE: &str = "debootstrap-bookworm-minbase.tar";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("linux/ has a parent")
        .to_path_buf()
}

/// Cargo's target directory: BIN is TARGET/PROFILE/sluice.
fn target_dir() -> PathBuf {
    Path::new(BIN)
        .parent()
        .and_then(Path::parent)
        .expect("the binary lies in TARGET/PROFILE/")
        .to_path_buf()
}

struct Run {
    ok: bool,
    status: String,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

fn run(cmd: &mut Command) -> Run {
    let what = format!("{cmd:?}");
    let out: Output = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    Run {
        ok: out.status.success(),
        status: out.status.to_string(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(what: &str, cmd: &mut Command) -> Run {
    let r = run(cmd);
    assert!(r.ok, "{what}: {r}");
    r
}

/// Fails with `hint` when `program` is not on PATH.
fn need(program: &str, hint: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(found, "{program} is missing: {hint}");
}

/// Mounts below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().into_owned();
    let mut m: Vec<String> = fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| *p == d || p.starts_with(&format!("{d}/")))
        .map(String::from)
        .collect();
    m.sort_unstable_by(|a, b| b.cmp(a));
    m
}

/// A directory that is removed, with everything in it, when it goes out of scope (also while a
/// failed assertion unwinds); never while something is mounted below it.
struct Scratch(PathBuf);

impl Scratch {
    fn new(path: PathBuf) -> Scratch {
        if path.exists() {
            // Left by a run that was killed: the pid is reused only after a reboot or a wrap.
            drop(Scratch(path.clone()));
        }
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Scratch(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for m in mounts_under(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        let left = mounts_under(&self.0);
        if !left.is_empty() {
            eprintln!(
                "deb_package: not removing {}: still mounted there: {left:?}",
                self.0.display()
            );
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("deb_package: cannot remove {}: {e}", self.0.display());
        }
    }
}

/// A bare Debian 12 in a fresh directory, unpacked from the cached debootstrap tarball (made
/// first if there is none).
fn fresh_root(timings: &mut Vec<(String, f64)>) -> Scratch {
    let cache = target_dir().join(CACHE);
    if !cache.is_file() {
        need(
            "debootstrap",
            "scripts/setup.sh installs it (apt-get install debootstrap)",
        );
        let mirror = std::env::var("SLUICE_DEBIAN_MIRROR")
            .unwrap_or_else(|_| "http://deb.debian.org/debian".into());
        let t = Instant::now();
        let build = Scratch::new(PathBuf::from(format!(
            "/var/tmp/sluice-deb-debootstrap-{}",
            std::process::id()
        )));
        let log = build.0.with_extension("log");
        let logf = fs::File::create(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let status = Command::new("debootstrap")
            .args(["--variant=minbase", "bookworm"])
            .arg(&build.0)
            .arg(&mirror)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log file"))
            .stderr(logf)
            .status()
            .expect("cannot run debootstrap");
        let text = fs::read_to_string(&log).unwrap_or_default();
        let _ = fs::remove_file(&log);
        assert!(
            status.success(),
            "debootstrap --variant=minbase bookworm {} {mirror}: {status} (set SLUICE_DEBIAN_MIRROR for another mirror); its log ends:\n{}",
            build.0.display(),
            text.lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
        // Written aside and renamed: a run killed halfway leaves no truncated cache.
        let partial = cache.with_extension(format!("partial-{}", std::process::id()));
        let r = run(Command::new("tar")
            .arg("--numeric-owner")
            .arg("-C")
            .arg(&build.0)
            .arg("-cf")
            .arg(&partial)
            .arg("."));
        if !r.ok {
            let _ = fs::remove_file(&partial);
            panic!("tar of the new root: {r}");
        }
        fs::rename(&partial, &cache).unwrap_or_else(|e| panic!("{}: {e}", cache.display()));
        timings.push(("debootstrap (cached for later runs)".into(), secs(t)));
        println!(
            "deb_package: made {} from {mirror} in {:.1} s",
            cache.display(),
            secs(t)
        );
    }
    let t = Instant::now();
    let root = Scratch::new(PathBuf::from(format!(
        "/var/tmp/sluice-deb-root-{}",
        std::process::id()
    )));
    ok(
        "unpacking the cached root",
        Command::new("tar")
            .args(["--numeric-owner", "-xpf"])
            .arg(&cache)
            .arg("-C")
            .arg(&root.0),
    );
    // No service may start inside (invoke-rc.d and deb-systemd-invoke ask this first).
    let rc = root.0.join("usr/sbin/policy-rc.d");
    fs::write(
        &rc,
        "#!/bin/sh\n# deb_package test: no service starts here\nexit 101\n",
    )
    .unwrap_or_else(|e| panic!("{}: {e}", rc.display()));
    ok(
        "chmod policy-rc.d",
        Command::new("chmod").arg("755").arg(&rc),
    );
    timings.push(("unpack the root".into(), secs(t)));
    root
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// `args` run in `root` with a clean environment, in a mount namespace of its own where /proc
/// is mounted: the mount ends with the command.
fn in_root(root: &Path, args: &[&str]) -> Run {
    run(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(r#"root=$1; shift; mount -t proc proc "$root/proc" && exec chroot "$root" "$@""#)
        .arg("sh")
        .arg(root)
        .args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LANG", "C.UTF-8")
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn in_root_ok(root: &Path, args: &[&str]) -> Run {
    let r = in_root(root, args);
    assert!(r.ok, "in the root: {}: {r}", args.join(" "));
    r
}

/// Paths below `dir` (recursively) whose file name starts with `prefix`.
fn find_named(dir: &Path, prefix: &str, found: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if e.file_name().to_string_lossy().starts_with(prefix) {
            found.push(p.clone());
        }
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            find_named(&p, prefix, found);
        }
    }
}

#[test]
fn deb_installs_runs_and_purges_in_a_bare_debian() {
    let t_all = Instant::now();
    let mut timings: Vec<(String, f64)> = Vec::new();
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (debootstrap, chroot, mounts): run it as root, as scripts/test.sh does"
    );
    // Asked through cargo, which finds subcommands in CARGO_HOME/bin even off PATH.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let d = run(Command::new(&cargo).args(["deb", "--version"]));
    assert!(
        d.ok,
        "cargo-deb is missing (`{cargo} deb --version`: {d}): scripts/setup.sh installs it (cargo install cargo-deb --locked)"
    );
    println!("deb_package: {}", d.stdout.trim());
    need(
        "dpkg-shlibdeps",
        "scripts/setup.sh installs it (apt-get install dpkg-dev); cargo-deb's $auto needs it",
    );
    for p in ["dpkg-deb", "unshare", "chroot", "tar"] {
        need(p, "it comes with every Debian");
    }
    let release = target_dir().join("release/sluice");
    assert!(
        release.is_file(),
        "{} is missing: `cargo deb --no-build` packages it; build it first with `cargo build --release --locked --bin sluice` (scripts/test.sh does)",
        release.display()
    );

    // The policy the package installs as /etc/sluice/policy.yaml is valid.
    let t = Instant::now();
    ok(
        "sluice policy check configs/policy.yaml (on this machine)",
        Command::new(BIN)
            .args(["policy", "check", "configs/policy.yaml"])
            .current_dir(repo()),
    );
    timings.push(("policy check on the host".into(), secs(t)));

    // --- The package.
    let t = Instant::now();
    let out = Scratch::new(PathBuf::from(format!(
        "/var/tmp/sluice-deb-out-{}",
        std::process::id()
    )));
    ok(
        "cargo deb -p sluice --no-build",
        Command::new(&cargo)
            // --fast: lighter compression, the same files (xz of the 60 MB binary took 30 s).
            .args(["deb", "-p", "sluice", "--no-build", "--fast", "--output"])
            .arg(&out.0)
            .current_dir(repo()),
    );
    let deb = fs::read_dir(&out.0)
        .expect("cargo deb's output folder")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .unwrap_or_else(|| panic!("cargo deb wrote no .deb into {}", out.0.display()));
    timings.push(("cargo deb --no-build".into(), secs(t)));
    let size = fs::metadata(&deb).map(|m| m.len()).unwrap_or(0);
    println!(
        "deb_package: {} ({:.1} MiB)",
        deb.display(),
        size as f64 / (1024.0 * 1024.0)
    );

    let depends = ok(
        "dpkg-deb -f Depends",
        Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Depends"),
    )
    .stdout;
    println!("deb_package: Depends: {}", depends.trim());
    let listing = ok("dpkg-deb -c", Command::new("dpkg-deb").arg("-c").arg(&deb)).stdout;
    // cargo-deb leaves units out without a word when maintainer-scripts is not set.
    let mut expected: Vec<String> = vec![
        "./usr/bin/sluice".into(),
        "./usr/share/doc/sluice/README.md".into(),
    ];
    expected.extend(
        UNITS
            .iter()
            .map(|u| format!("./usr/lib/systemd/system/{u}")),
    );
    expected.extend(CONFIGS.iter().map(|c| format!("./etc/sluice/{c}")));
    for f in &expected {
        assert!(
            listing.lines().any(|l| l.ends_with(&format!(" {f}"))),
            "the package lacks {f}:\n{listing}"
        );
    }
    let ctl = out.0.join("control");
    ok(
        "dpkg-deb -e",
        Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&ctl),
    );
    let conffiles = fs::read_to_string(ctl.join("conffiles")).unwrap_or_default();
    for c in CONFIGS {
        assert!(
            conffiles.lines().any(|l| l == format!("/etc/sluice/{c}")),
            "/etc/sluice/{c} is no conffile:\n{conffiles}"
        );
    }
    // cargo-deb put its systemd fragment once per unit (it replaces its token wherever it is,
    // comments included).
    let postinst = fs::read_to_string(ctl.join("postinst")).unwrap_or_default();
    for u in UNITS {
        let n = postinst
            .matches(&format!("deb-systemd-helper update-state {u}"))
            .count();
        assert_eq!(n, 1, "postinst registers {u} {n} times:\n{postinst}");
        // enable = false: the fragment that keeps an admin's choice, not the one that enables.
        assert!(
            postinst.contains(&format!("deb-systemd-helper debian-installed {u}")),
            "postinst has no `enable = false` fragment for {u}:\n{postinst}"
        );
    }

    // --- Install into a bare Debian 12.
    let root = fresh_root(&mut timings);
    let r = &root.0;
    fs::copy(&deb, r.join("tmp/sluice.deb")).expect("copy the .deb into the root");

    let t = Instant::now();
    in_root_ok(r, &["dpkg", "-i", "/tmp/sluice.deb"]);
    timings.push(("dpkg -i".into(), secs(t)));

    let v = in_root_ok(r, &["sluice", "--version"]);
    assert!(
        v.stdout.contains(VERSION),
        "sluice --version says {:?}, not {VERSION}",
        v.stdout
    );
    in_root_ok(r, &["sluice", "policy", "check", "/etc/sluice/policy.yaml"]);
    in_root_ok(r, &["sluice", "--help"]);

    // The system user the relay and connector run as.
    let pw = in_root_ok(r, &["getent", "passwd", "sluice"]).stdout;
    let f: Vec<&str> = pw.trim().split(':').collect();
    assert_eq!(f.len(), 7, "getent passwd sluice: {pw:?}");
    let uid: u32 = f[2].parse().expect("a numeric uid");
    assert!(uid < 1000, "sluice is no system user (uid {uid})");
    assert_eq!(f[5], "/var/lib/sluice", "sluice's home");
    assert!(f[6].ends_with("nologin"), "sluice's shell is {}", f[6]);
    in_root_ok(r, &["getent", "group", "sluice"]);

    // The units are there, none enabled (and none started: nothing runs systemd here).
    for u in UNITS {
        assert!(
            r.join("usr/lib/systemd/system").join(u).is_file()
                || r.join("lib/systemd/system").join(u).is_file(),
            "{u} is not installed"
        );
    }
    let mut enabled = Vec::new();
    find_named(&r.join("etc/systemd/system"), "sluice", &mut enabled);
    assert!(
        enabled.is_empty(),
        "units enabled by the package: {enabled:?}"
    );
    let listed = in_root_ok(r, &["dpkg-query", "-W", "-f", "${Conffiles}\n", "sluice"]).stdout;
    for c in CONFIGS {
        assert!(
            listed.contains(&format!("/etc/sluice/{c} ")),
            "dpkg does not know /etc/sluice/{c} as a conffile:\n{listed}"
        );
    }

    // Installing again (an upgrade to the same version) keeps the user as it is.
    let t = Instant::now();
    in_root_ok(r, &["dpkg", "-i", "/tmp/sluice.deb"]);
    timings.push(("dpkg -i again".into(), secs(t)));
    let pw2 = in_root_ok(r, &["getent", "passwd", "sluice"]).stdout;
    assert_eq!(pw, pw2, "the user changed on reinstall");

    // Remove: the program goes, the configuration and the user stay.
    let t = Instant::now();
    in_root_ok(r, &["dpkg", "-r", "sluice"]);
    timings.push(("dpkg -r".into(), secs(t)));
    assert!(
        !r.join("usr/bin/sluice").exists(),
        "dpkg -r left /usr/bin/sluice"
    );
    for c in CONFIGS {
        assert!(
            r.join("etc/sluice").join(c).is_file(),
            "dpkg -r removed the configuration /etc/sluice/{c}"
        );
    }
    in_root_ok(r, &["getent", "passwd", "sluice"]);

    // Purge: nothing of the package is left.
    let t = Instant::now();
    in_root_ok(r, &["dpkg", "--purge", "sluice"]);
    timings.push(("dpkg --purge".into(), secs(t)));
    let status = in_root(
        r,
        &["dpkg-query", "-W", "-f", "${db:Status-Status}", "sluice"],
    );
    assert!(
        !status.ok || status.stdout.trim() == "not-installed",
        "dpkg still knows sluice after purge: {status}"
    );
    for l in listing.lines() {
        let Some(p) = l.split_whitespace().last() else {
            continue;
        };
        let p = p.trim_start_matches("./").trim_end_matches('/');
        // Folders the package shares with the system (usr/, etc/, usr/lib/systemd/...) stay.
        if p.is_empty() || !(p.contains("sluice")) {
            continue;
        }
        assert!(!r.join(p).exists(), "/{p} is left after purge");
    }
    for d in ["etc/sluice", "var/lib/sluice", "var/log/sluice"] {
        assert!(!r.join(d).exists(), "/{d} is left after purge");
    }
    for db in ["passwd", "group"] {
        let g = in_root(r, &["getent", db, "sluice"]);
        assert!(!g.ok, "getent {db} sluice after purge: {}", g.stdout.trim());
    }

    // Where adduser is missing (it comes with apt, so minbase has it), postinst and postrm fall
    // back to useradd and userdel (passwd): the same user, and gone again on purge.
    let t = Instant::now();
    for tool in ["adduser", "addgroup", "deluser", "delgroup"] {
        let p = r.join("usr/sbin").join(tool);
        if p.exists() {
            fs::rename(&p, p.with_extension("hidden"))
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        }
    }
    in_root_ok(r, &["dpkg", "-i", "/tmp/sluice.deb"]);
    let pw3 = in_root_ok(r, &["getent", "passwd", "sluice"]).stdout;
    let f: Vec<&str> = pw3.trim().split(':').collect();
    assert!(
        f.len() == 7
            && f[2].parse::<u32>().is_ok_and(|u| u < 1000)
            && f[5] == "/var/lib/sluice"
            && f[6].ends_with("nologin"),
        "the user useradd made: {pw3:?}"
    );
    in_root_ok(r, &["getent", "group", "sluice"]);
    in_root_ok(r, &["dpkg", "--purge", "sluice"]);
    for db in ["passwd", "group"] {
        let g = in_root(r, &["getent", db, "sluice"]);
        assert!(
            !g.ok,
            "getent {db} sluice after purge (userdel): {}",
            g.stdout.trim()
        );
    }
    assert!(
        !r.join("etc/sluice").exists(),
        "/etc/sluice is left after purge"
    );
    timings.push(("install and purge with useradd".into(), secs(t)));
    drop(root);

    timings.push(("total".into(), secs(t_all)));
    println!(
        "deb_package timings: {}",
        timings
            .iter()
            .map(|(w, s)| format!("{w} {s:.1} s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
