//! `sluice ca` and `sluice policy` as an operator runs them: the real binary in a temporary
//! directory, no network and no root. Each test checks what is printed, the exit status, and
//! that nothing on disk was harmed.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// A directory under /tmp, removed when the test ends, passed or failed (Drop runs while a
/// failed assertion unwinds).
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = PathBuf::from(format!(
            "/tmp/sluice-cli-{}-{test}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        TempDir(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn sluice(dir: &Path, args: &[&str]) -> Run {
    let out: Output = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
        .unwrap_or_else(|e| panic!("{BIN}: {e}"));
    Run {
        // None means killed by a signal: never a valid outcome here.
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(dir: &Path, args: &[&str]) -> Run {
    let r = sluice(dir, args);
    assert_eq!(r.code, 0, "sluice {}: {r}", args.join(" "));
    r
}

fn read(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

fn init_ca(t: &TempDir) -> PathBuf {
    ok(t.path(), &["ca", "init", "--dir", "ca", "--org", "acme"]);
    t.path().join("ca")
}

// ---- ca issue: the CA's files and existing node files are safe ----

#[test]
fn issuing_a_node_named_ca_leaves_the_ca_files_intact() {
    let t = TempDir::new("ca-name");
    let ca = init_ca(&t);
    let (cert, key) = (read(&ca.join("ca.pem")), read(&ca.join("ca.key")));
    let other = t.path().join("other");
    fs::create_dir(&other).unwrap();
    std::os::unix::fs::symlink(&ca, t.path().join("link-to-ca")).unwrap();
    // The CA directory by name, spelt another way, through a link; with and without --force.
    for out in [None, Some("ca/../ca"), Some("link-to-ca"), Some("./ca/")] {
        for force in [false, true] {
            let mut args = vec![
                "ca", "issue", "--dir", "ca", "--role", "agent", "--name", "ca",
            ];
            if let Some(o) = out {
                args.extend(["--out", o]);
            }
            if force {
                args.push("--force");
            }
            let r = sluice(t.path(), &args);
            assert_eq!(r.code, 1, "{args:?}: {r}");
            assert!(
                r.stderr.contains("the CA's own certificate")
                    && r.stderr.contains("would destroy the CA")
                    && r.stderr.contains("--force does not allow it"),
                "{args:?}: {r}"
            );
            assert_eq!(read(&ca.join("ca.pem")), cert, "{args:?}");
            assert_eq!(read(&ca.join("ca.key")), key, "{args:?}");
        }
    }
    // A node file linked to a CA file is caught by identity, not by name.
    std::os::unix::fs::symlink(ca.join("ca.key"), other.join("bob.key")).unwrap();
    let r = sluice(
        t.path(),
        &[
            "ca", "issue", "--dir", "ca", "--role", "agent", "--name", "bob", "--out", "other",
            "--force",
        ],
    );
    assert_eq!(r.code, 1, "{r}");
    assert!(
        r.stderr
            .contains("would write other/bob.key, the CA's own key ca/ca.key (the same file)"),
        "{r}"
    );
    assert_eq!(read(&ca.join("ca.key")), key);
    // The CA still signs: its files are whole.
    ok(
        t.path(),
        &[
            "ca", "issue", "--dir", "ca", "--role", "agent", "--name", "alice",
        ],
    );
    // A node named ca elsewhere is not the CA's file.
    ok(
        t.path(),
        &[
            "ca", "issue", "--dir", "ca", "--role", "agent", "--name", "ca", "--out", "other",
        ],
    );
    assert_eq!(read(&ca.join("ca.key")), key);
}

#[test]
fn reissuing_a_name_needs_force_and_keys_are_0600() {
    let t = TempDir::new("reissue");
    let ca = init_ca(&t);
    assert_eq!(mode(&ca.join("ca.key")), 0o600);
    let issue = [
        "ca", "issue", "--dir", "ca", "--role", "agent", "--name", "alice",
    ];
    ok(t.path(), &issue);
    let (key_path, cert_path) = (ca.join("alice.key"), ca.join("alice.pem"));
    assert_eq!(mode(&key_path), 0o600);
    assert_eq!(mode(&cert_path), 0o644);
    let (key, cert) = (read(&key_path), read(&cert_path));

    let r = sluice(t.path(), &issue);
    assert_eq!(r.code, 1, "{r}");
    assert!(
        r.stderr.contains("alice.key exists")
            && r.stderr.contains("the old key would be lost")
            && r.stderr.contains("--force"),
        "{r}"
    );
    assert_eq!((read(&key_path), read(&cert_path)), (key.clone(), cert));

    // A key left readable by others: --force replaces it, and the new one is 0600 all the same.
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).unwrap();
    let mut forced = issue.to_vec();
    forced.push("--force");
    ok(t.path(), &forced);
    assert_ne!(read(&key_path), key);
    assert_eq!(mode(&key_path), 0o600);
    assert_eq!(mode(&cert_path), 0o644);
    // No staging file is left behind.
    let mut names: Vec<String> = fs::read_dir(&ca)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["alice.key", "alice.pem", "ca.key", "ca.pem"]);

    // --force on init also leaves the CA key at 0600.
    fs::set_permissions(ca.join("ca.key"), fs::Permissions::from_mode(0o644)).unwrap();
    ok(
        t.path(),
        &["ca", "init", "--dir", "ca", "--org", "acme", "--force"],
    );
    assert_eq!(mode(&ca.join("ca.key")), 0o600);
}

#[test]
fn names_that_are_not_plain_file_names_are_refused() {
    let t = TempDir::new("names");
    init_ca(&t);
    for bad in ["../evil", "a/b", ".hidden", "..", ""] {
        let r = sluice(
            t.path(),
            &[
                "ca", "issue", "--dir", "ca", "--role", "agent", "--name", bad,
            ],
        );
        assert_eq!(r.code, 1, "{bad:?}: {r}");
        assert!(
            r.stderr.contains("cannot be used as a file name"),
            "{bad:?}: {r}"
        );
    }
    assert!(!t.path().join("evil.pem").exists());
    assert!(!t.path().join("evil.key").exists());
}

// ---- ca show ----

#[test]
fn show_prints_rfc3339_expiry_and_the_ca_certificate() {
    let t = TempDir::new("show");
    init_ca(&t);
    ok(
        t.path(),
        &[
            "ca", "issue", "--dir", "ca", "--role", "agent", "--name", "alice", "--valid", "30d",
            "--group", "eng", "--group", "ops,sre",
        ],
    );
    let r = ok(t.path(), &["ca", "show", "ca/alice.pem"]);
    assert!(r.stdout.contains("name:         alice\n"), "{r}");
    assert!(r.stdout.contains("role:         agent\n"), "{r}");
    assert!(r.stdout.contains("groups:       eng,ops,sre\n"), "{r}");
    let expires = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("expires:      "))
        .unwrap_or_else(|| panic!("no expiry: {r}"));
    // 2026-12-31T23:59:59Z (in 29 days): RFC 3339 in UTC, then the time left.
    let (stamp, note) = expires.split_once(' ').unwrap_or_else(|| panic!("{r}"));
    assert_eq!(stamp.len(), 20, "{r}");
    assert!(stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T', "{r}");
    assert!(
        note == "(in 29 days)" || note == "(in 30 days)",
        "{note:?}: {r}"
    );
    assert!(!r.stdout.contains("unix seconds"), "{r}");

    let r = ok(t.path(), &["ca", "show", "ca/ca.pem"]);
    assert!(r.stdout.contains("role:         CA\n"), "{r}");
    assert!(r.stdout.contains("organisation: acme\n"), "{r}");
    assert!(
        r.stdout.contains("(in 10 years)") || r.stdout.contains("(in 9 years)"),
        "{r}"
    );
}

#[test]
fn show_flags_an_expired_certificate_with_exit_status_1() {
    let t = TempDir::new("expired");
    init_ca(&t);
    ok(
        t.path(),
        &[
            "ca", "issue", "--dir", "ca", "--role", "agent", "--name", "brief", "--valid", "1s",
        ],
    );
    // Certificate times have whole seconds: two make sure the second has passed.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let r = sluice(t.path(), &["ca", "show", "ca/brief.pem"]);
    assert_eq!(r.code, 1, "{r}");
    let expires = r
        .stdout
        .lines()
        .find(|l| l.starts_with("expires:"))
        .unwrap_or_else(|| panic!("{r}"));
    assert!(
        expires.contains("(EXPIRED ") && expires.ends_with(" ago)"),
        "{r}"
    );
    assert!(
        r.stderr
            .starts_with("error: ca/brief.pem: certificate EXPIRED ")
            && r.stderr.ends_with("Z); peers refuse it: issue a new one\n"),
        "{r}"
    );
}

// ---- --valid units ----

#[test]
fn valid_m_is_refused_as_ambiguous_and_min_mo_work() {
    let t = TempDir::new("valid");
    init_ca(&t);
    let issue = |name: &str, valid: &str| {
        sluice(
            t.path(),
            &[
                "ca", "issue", "--dir", "ca", "--role", "agent", "--name", name, "--valid", valid,
            ],
        )
    };
    let r = issue("six", "6m");
    assert_eq!(r.code, 1, "{r}");
    assert_eq!(
        r.stderr, "error: --valid \"6m\" is ambiguous: use 6min for minutes or 6mo for months\n",
        "{r}"
    );
    assert!(!t.path().join("ca/six.pem").exists());
    let r = sluice(t.path(), &["ca", "init", "--dir", "ca2", "--valid", "6m"]);
    assert_eq!(r.code, 1, "{r}");
    assert!(r.stderr.contains("is ambiguous"), "{r}");
    assert!(
        !t.path().join("ca2").exists(),
        "a refused init created its directory"
    );

    assert_eq!(issue("minutes", "6min").code, 0);
    let r = ok(t.path(), &["ca", "show", "ca/minutes.pem"]);
    assert!(
        r.stdout.contains("(in 5 minutes)") || r.stdout.contains("(in 6 minutes)"),
        "{r}"
    );
    assert_eq!(issue("months", "6mo").code, 0);
    let r = ok(t.path(), &["ca", "show", "ca/months.pem"]);
    assert!(
        r.stdout.contains("(in 179 days)") || r.stdout.contains("(in 180 days)"),
        "{r}"
    );
    let help = ok(t.path(), &["ca", "issue", "--help"]);
    assert!(
        help.stdout.contains("min, h, d, w, mo (30 days) or y"),
        "{help}"
    );
}

// ---- groups: one flag, both forms ----

#[test]
fn groups_take_commas_and_repeats_under_both_spellings() {
    let t = TempDir::new("groups");
    init_ca(&t);
    for (name, args) in [
        ("a", &["--group", "eng", "--group", "ops"][..]),
        ("b", &["--group", "eng,ops"][..]),
        ("c", &["--groups", "eng,ops"][..]),
        ("d", &["--groups", "eng", "--groups", "ops"][..]),
    ] {
        let mut cmd = vec![
            "ca", "issue", "--dir", "ca", "--role", "agent", "--name", name,
        ];
        cmd.extend_from_slice(args);
        let r = ok(t.path(), &cmd);
        assert!(r.stdout.contains("(groups: eng,ops)"), "{cmd:?}: {r}");
    }
    fs::write(t.path().join("p.yaml"), POLICY).unwrap();
    for args in [
        &["--group", "eng", "--group", "ops"][..],
        &["--group", "eng,ops"][..],
        &["--groups", "eng,ops"][..],
    ] {
        let mut cmd = vec![
            "policy",
            "explain",
            "p.yaml",
            "--user",
            "zed",
            "--to",
            "10.20.0.5:443/tcp",
        ];
        cmd.extend_from_slice(args);
        let r = ok(t.path(), &cmd);
        assert!(r.stdout.contains("  groups: eng, ops\n"), "{cmd:?}: {r}");
    }
    for sub in ["issue", "explain"] {
        let help = if sub == "issue" {
            ok(t.path(), &["ca", "issue", "--help"])
        } else {
            ok(t.path(), &["policy", "explain", "--help"])
        };
        assert!(
            help.stdout.contains("--group <GROUP>")
                && help.stdout.contains("--groups")
                && help.stdout.contains("--group eng,ops"),
            "{sub}: {help}"
        );
    }
}

// ---- policy explain ----

const POLICY: &str = "\
version: 1
groups:
  eng:
    members: [alice]
  ops: {}
resources:
  - name: wiki
    connector: conn-1
    addresses: [10.20.0.0/24, \"fd00:20::/64\"]
    ports: [tcp/443, icmp]
rules:
  - name: eng-wiki
    action: allow
    who: [group:eng]
    to: [wiki]
    expires: 2099-01-01
";

fn explain(t: &TempDir, args: &[&str]) -> Run {
    let mut cmd = vec!["policy", "explain", "p.yaml"];
    cmd.extend_from_slice(args);
    sluice(t.path(), &cmd)
}

#[test]
fn explain_exit_status_is_0_allowed_1_denied_2_usage() {
    let t = TempDir::new("explain-exit");
    fs::write(t.path().join("p.yaml"), POLICY).unwrap();
    let r = explain(&t, &["--user", "alice", "--to", "10.20.0.5:443/tcp"]);
    assert_eq!(r.code, 0, "{r}");
    assert!(r.stdout.starts_with("allow"), "{r}");
    let r = explain(&t, &["--user", "mallory", "--to", "10.20.0.5:443/tcp"]);
    assert_eq!(r.code, 1, "{r}");
    assert!(r.stdout.starts_with("deny"), "{r}");
    assert!(r.stderr.is_empty(), "{r}");
    // Usage errors, from clap and from us alike.
    let r = explain(&t, &["--user", "alice"]);
    assert_eq!(r.code, 2, "{r}");
    let r = explain(&t, &["--user", "alice", "--to", "10.20.0.5/tcp"]);
    assert_eq!(r.code, 2, "{r}");
    let help = ok(t.path(), &["policy", "explain", "--help"]);
    assert!(
        help.stdout
            .contains("0 allowed, 1 denied, 2 usage error or invalid policy"),
        "{help}"
    );
}

#[test]
fn explain_at_takes_a_plain_date() {
    let t = TempDir::new("explain-at");
    fs::write(t.path().join("p.yaml"), POLICY).unwrap();
    let to = ["--user", "alice", "--to", "10.20.0.5:443/tcp", "--at"];
    let before = explain(&t, &[&to[..], &["2098-12-31"]].concat());
    assert_eq!(before.code, 0, "{before}");
    let after = explain(&t, &[&to[..], &["2100-01-01"]].concat());
    assert_eq!(after.code, 1, "{after}");
    let rfc = explain(&t, &[&to[..], &["2100-01-01T00:00:00Z"]].concat());
    assert_eq!(rfc.code, 1, "{rfc}");
    let bad = explain(&t, &[&to[..], &["someday"]].concat());
    assert_eq!(bad.code, 2, "{bad}");
    assert_eq!(
        bad.stderr,
        "error: --at \"someday\" is not a date (2027-01-31) or an RFC 3339 time (2027-01-31T18:00:00Z)\n"
    );
}

#[test]
fn explain_refuses_ambiguous_ipv6_and_icmp_ports() {
    let t = TempDir::new("explain-to");
    fs::write(t.path().join("p.yaml"), POLICY).unwrap();
    let r = explain(&t, &["--user", "alice", "--to", "fd00:20::1:443/tcp"]);
    assert_eq!(r.code, 2, "{r}");
    assert_eq!(
        r.stderr,
        "error: --to \"fd00:20::1:443/tcp\": an IPv6 address with a port must be written [ADDRESS]:PORT, like [fd00:20::1]:443/tcp\n"
    );
    let r = explain(&t, &["--user", "alice", "--to", "[fd00:20::1]:443/tcp"]);
    assert_eq!(r.code, 0, "{r}");
    let r = explain(&t, &["--user", "alice", "--to", "10.20.0.5:80/icmp"]);
    assert_eq!(r.code, 2, "{r}");
    assert_eq!(
        r.stderr,
        "error: --to \"10.20.0.5:80/icmp\": ICMP has no port: write 10.20.0.5/icmp\n"
    );
    let r = explain(&t, &["--user", "alice", "--to", "10.20.0.5/icmp"]);
    assert_eq!(r.code, 0, "{r}");
    let r = explain(&t, &["--user", "alice", "--to", "fd00:20::1/icmp"]);
    assert_eq!(r.code, 0, "{r}");
}

/// Every line of an error report says `error` at most once.
fn assert_no_doubled_error(r: &Run) {
    for l in r.stderr.lines().chain(r.stdout.lines()) {
        assert!(l.matches("error").count() <= 1, "{l:?} in {r}");
        assert!(!l.contains(":0:0"), "{l:?} in {r}");
    }
}

#[test]
fn invalid_and_missing_policies_are_reported_once_with_a_real_position() {
    let t = TempDir::new("explain-invalid");
    fs::write(
        t.path().join("bad.yaml"),
        "version: 1\nrules:\n  - action: allow\n    who: [group:nobody]\n    to: []\n",
    )
    .unwrap();
    let r = sluice(
        t.path(),
        &[
            "policy",
            "explain",
            "bad.yaml",
            "--user",
            "a",
            "--to",
            "10.0.0.1:22/tcp",
        ],
    );
    assert_eq!(r.code, 2, "{r}");
    assert_no_doubled_error(&r);
    assert!(
        r.stderr
            .contains("bad.yaml:4:11: error: `rules[0].who[0]`: unknown group \"nobody\""),
        "{r}"
    );
    assert!(
        r.stderr
            .ends_with("bad.yaml: invalid: 2 error(s); no decision made\n"),
        "{r}"
    );
    let r = sluice(t.path(), &["policy", "check", "bad.yaml"]);
    assert_eq!(r.code, 1, "{r}");
    assert_no_doubled_error(&r);

    for cmd in [
        &["policy", "check", "/nonexistent.yaml"][..],
        &[
            "policy",
            "explain",
            "/nonexistent.yaml",
            "--user",
            "a",
            "--to",
            "10.0.0.1:22/tcp",
        ][..],
    ] {
        let r = sluice(t.path(), cmd);
        assert_eq!(r.code, 2, "{cmd:?}: {r}");
        assert_eq!(
            r.stderr, "error: /nonexistent.yaml: cannot read: No such file or directory\n",
            "{cmd:?}"
        );
    }
}

// ---- policy check warnings and cycles ----

#[test]
fn check_warns_about_routes_that_cut_the_agent_off() {
    let t = TempDir::new("check-warn");
    fs::write(
        t.path().join("p.yaml"),
        "\
version: 1
resources:
  - name: everything
    connector: c
    addresses: [0.0.0.0/0]
    ports: [any]
  - name: cgnat
    connector: c
    addresses: [100.64.0.0/10, \"fd5c:1ce0:1::/48\"]
    ports: [any]
rules:
  - action: allow
    who: [everyone]
    to: [everything, cgnat]
",
    )
    .unwrap();
    let r = ok(t.path(), &["policy", "check", "p.yaml"]);
    let warnings: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.contains(": warning: "))
        .collect();
    assert_eq!(warnings.len(), 3, "{r}");
    assert!(warnings[0].starts_with("p.yaml:5:17: warning: `resources[0].addresses[0]`: 0.0.0.0/0 covers every IPv4 address"), "{r}");
    assert!(warnings[1].starts_with("p.yaml:9:17: warning: `resources[1].addresses[0]`: 100.64.0.0/10 covers 100.96.0.1, the agent's default tunnel address (tun.ipv4)"), "{r}");
    assert!(warnings[2].starts_with("p.yaml:9:32: warning: `resources[1].addresses[1]`: fd5c:1ce0:1::/48 covers fd5c:1ce0:1::1, the agent's default tunnel address (tun.ipv6)"), "{r}");
    assert!(
        r.stdout
            .ends_with("p.yaml: valid: 0 groups, 2 resources, 1 rules, 3 warning(s)\n"),
        "{r}"
    );
}

#[test]
fn check_names_the_include_cycle() {
    let t = TempDir::new("check-cycle");
    fs::write(
        t.path().join("p.yaml"),
        "version: 1\ngroups:\n  a:\n    include: [b]\n  b:\n    include: [c]\n  c:\n    include: [a]\n",
    )
    .unwrap();
    let r = sluice(t.path(), &["policy", "check", "p.yaml"]);
    assert_eq!(r.code, 1, "{r}");
    assert!(
        r.stdout.contains("p.yaml:3:3: error: `groups.a`: group \"a\" includes itself through a cycle: a -> b -> c -> a\n"),
        "{r}"
    );
}
