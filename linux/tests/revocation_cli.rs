//! `sluice ca revoke`, `sluice ca renew` and `sluice ca show --revocations` as an operator runs
//! them (issue 17): the real binary in a temporary directory, no network, no root. Each test
//! checks what is printed, the exit status, and that a refused command changed nothing on
//! disk.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use sluice_dataplane::revocation::RevocationList;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// A directory under /tmp, removed when the test ends, passed or failed.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = PathBuf::from(format!(
            "/tmp/sluice-revcli-{}-{test}-{}",
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

    fn file(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
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

/// A command that must fail with exit status 1 and an error naming `want`.
fn fails(dir: &Path, args: &[&str], want: &[&str]) -> Run {
    let r = sluice(dir, args);
    assert_eq!(r.code, 1, "sluice {}: {r}", args.join(" "));
    assert!(
        r.stderr.starts_with("error: "),
        "sluice {}: {r}",
        args.join(" ")
    );
    for w in want {
        assert!(
            r.stderr.contains(w),
            "sluice {}: stderr lacks {w:?}: {r}",
            args.join(" ")
        );
    }
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

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A CA in DIR/ca with agents alice, bob and carol.
fn ca_with_nodes(t: &TempDir) {
    ok(t.path(), &["ca", "init", "--dir", "ca", "--org", "acme"]);
    for name in ["alice", "bob", "carol"] {
        ok(
            t.path(),
            &[
                "ca", "issue", "--dir", "ca", "--role", "agent", "--name", name, "--group", "eng",
            ],
        );
    }
}

/// The value of a `KEY:   value` line of `ca show`.
fn field<'a>(r: &'a Run, key: &str) -> &'a str {
    r.stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .map(|v| v.trim_start_matches(':').trim())
        })
        .unwrap_or_else(|| panic!("no {key:?} line: {r}"))
}

/// The sequence number `ca revoke` printed ("revocation list #N written to ...").
fn written_sequence(r: &Run) -> u64 {
    r.stdout
        .strip_prefix("revocation list #")
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no sequence number: {r}"))
}

fn show_list(t: &TempDir) -> Run {
    ok(
        t.path(),
        &["ca", "show", "ca/revoked.pem", "--ca", "ca/ca.pem"],
    )
}

// ---- ca revoke and ca show --revocations ----

#[test]
fn revoke_by_name_and_peer_id_signs_a_growing_list_that_show_reads() {
    let t = TempDir::new("revoke");
    ca_with_nodes(&t);
    let before = now_unix();
    let r = ok(t.path(), &["ca", "revoke", "--dir", "ca", "alice"]);
    let first = written_sequence(&r);
    assert!(
        r.stdout
            .contains(" written to ca/revoked.pem: 1 name(s), 0 peer id(s); expires "),
        "{r}"
    );
    // At least the time now: a list rebuilt after the file was lost still replaces the old.
    assert!(
        first >= before,
        "sequence {first} is below the time {before}: {r}"
    );
    assert_eq!(mode(&t.file("ca/revoked.pem")), 0o644);
    let pem = String::from_utf8(read(&t.file("ca/revoked.pem"))).unwrap();
    assert!(
        pem.starts_with("-----BEGIN SLUICE REVOCATION LIST-----\n") && !pem.contains('\r'),
        "{pem}"
    );

    let s = show_list(&t);
    assert_eq!(field(&s, "revocation list #"), first.to_string(), "{s}");
    assert_eq!(field(&s, "names"), "alice", "{s}");
    assert_eq!(field(&s, "peer ids"), "none", "{s}");
    assert_eq!(field(&s, "signature"), "valid", "{s}");
    let expires = field(&s, "expires");
    assert!(
        expires.ends_with("(in 29 days)") || expires.ends_with("(in 30 days)"),
        "default validity is 30 days: {s}"
    );
    // Without the CA the list is shown, but not vouched for.
    let s = ok(t.path(), &["ca", "show", "ca/revoked.pem"]);
    assert!(field(&s, "signature").starts_with("not checked"), "{s}");

    // Bob by peer id: every certificate for that key.
    let bob = ok(t.path(), &["ca", "show", "ca/bob.pem"]);
    let bob_id = field(&bob, "peer id").to_string();
    assert_eq!(bob_id.len(), 64, "{bob}");
    let r = ok(t.path(), &["ca", "revoke", "--dir", "ca", &bob_id]);
    let second = written_sequence(&r);
    assert!(second > first, "#{second} after #{first}");
    assert!(r.stdout.contains(": 1 name(s), 1 peer id(s); "), "{r}");
    let s = show_list(&t);
    assert_eq!(field(&s, "names"), "alice", "{s}");
    assert_eq!(field(&s, "peer ids"), bob_id, "{s}");
    // Upper-case hex names the same key.
    let r = ok(
        t.path(),
        &["ca", "revoke", "--dir", "ca", &bob_id.to_uppercase()],
    );
    assert!(r.stderr.contains("is on the list already"), "{r}");
    assert!(r.stdout.contains(": 1 name(s), 1 peer id(s); "), "{r}");

    // show --revocations: revoked ones exit 1 and say why; the CA defaults to ca.pem beside
    // the list.
    let r = sluice(
        t.path(),
        &[
            "ca",
            "show",
            "ca/alice.pem",
            "--revocations",
            "ca/revoked.pem",
        ],
    );
    assert_eq!(r.code, 1, "{r}");
    assert!(
        field(&r, "revoked").starts_with("YES: its name is on revocation list #"),
        "{r}"
    );
    assert!(
        r.stderr
            .starts_with("error: ca/alice.pem: revoked by ca/revoked.pem (list #")
            && r.stderr.ends_with("); peers that enforce it refuse it\n"),
        "{r}"
    );
    let r = sluice(
        t.path(),
        &[
            "ca",
            "show",
            "ca/bob.pem",
            "--revocations",
            "ca/revoked.pem",
            "--ca",
            "ca/ca.pem",
        ],
    );
    assert_eq!(r.code, 1, "{r}");
    assert!(
        field(&r, "revoked").starts_with("YES: its peer id is on revocation list #"),
        "{r}"
    );
    let r = ok(
        t.path(),
        &[
            "ca",
            "show",
            "ca/carol.pem",
            "--revocations",
            "ca/revoked.pem",
        ],
    );
    assert!(
        field(&r, "revoked").starts_with("no (revocation list #"),
        "{r}"
    );
    // A name on the list is no CA's name: the CA certificate is not revoked by it.
    let r = ok(
        t.path(),
        &["ca", "show", "ca/ca.pem", "--revocations", "ca/revoked.pem"],
    );
    assert!(field(&r, "revoked").starts_with("no "), "{r}");

    // --remove takes alice off; her certificate is good again.
    let r = ok(
        t.path(),
        &["ca", "revoke", "--dir", "ca", "--remove", "alice"],
    );
    let third = written_sequence(&r);
    assert!(third > second);
    assert!(r.stdout.contains(": 0 name(s), 1 peer id(s); "), "{r}");
    ok(
        t.path(),
        &[
            "ca",
            "show",
            "ca/alice.pem",
            "--revocations",
            "ca/revoked.pem",
        ],
    );
    // Removing what is not there says so, and still signs a valid list.
    let r = ok(
        t.path(),
        &["ca", "revoke", "--dir", "ca", "--remove", "alice"],
    );
    assert!(
        r.stderr.contains("note: alice is not on the list already"),
        "{r}"
    );

    // --refresh signs the same entries again with a new expiry and a higher number.
    let r = ok(
        t.path(),
        &["ca", "revoke", "--dir", "ca", "--refresh", "--valid", "2d"],
    );
    let refreshed = written_sequence(&r);
    assert!(refreshed > third);
    let s = show_list(&t);
    assert_eq!(field(&s, "names"), "none", "{s}");
    assert_eq!(field(&s, "peer ids"), bob_id, "{s}");
    let expires = field(&s, "expires");
    assert!(
        expires.ends_with("(in 47 hours)") || expires.ends_with("(in 2 days)"),
        "{s}"
    );

    // Several targets at once, into another file.
    let r = ok(
        t.path(),
        &[
            "ca",
            "revoke",
            "--dir",
            "ca",
            "--list",
            "other.pem",
            "alice",
            "carol",
            "--valid",
            "1h",
        ],
    );
    assert!(
        r.stdout
            .contains("written to other.pem: 2 name(s), 0 peer id(s)"),
        "{r}"
    );
    let s = ok(t.path(), &["ca", "show", "other.pem", "--ca", "ca/ca.pem"]);
    assert_eq!(field(&s, "names"), "alice, carol", "{s}");
    // No staging files left behind.
    let mut names: Vec<String> = fs::read_dir(t.file("ca"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    names.sort();
    assert!(names.is_empty(), "{names:?}");
}

#[test]
fn revoke_refuses_bad_input_clearly_and_leaves_the_list_as_it_was() {
    let t = TempDir::new("revoke-bad");
    ca_with_nodes(&t);
    // Nothing to do.
    fails(
        t.path(),
        &["ca", "revoke", "--dir", "ca"],
        &["name what to revoke", "--refresh"],
    );
    assert!(!t.file("ca/revoked.pem").exists());
    // --remove with no list yet.
    fails(
        t.path(),
        &["ca", "revoke", "--dir", "ca", "--remove", "alice"],
        &["ca/revoked.pem: no revocation list to remove entries from"],
    );
    assert!(!t.file("ca/revoked.pem").exists());
    // No CA.
    fails(
        t.path(),
        &["ca", "revoke", "--dir", "nowhere", "alice"],
        &["no CA in nowhere", "sluice ca init --dir nowhere"],
    );

    ok(t.path(), &["ca", "revoke", "--dir", "ca", "alice"]);
    let list = t.file("ca/revoked.pem");
    let good = read(&list);
    // A target that is neither a name nor a peer id; nothing is written, even for the good
    // target before it.
    for bad in ["a/b", "has space", "x".repeat(65).as_str(), "ünï"] {
        fails(
            t.path(),
            &["ca", "revoke", "--dir", "ca", "carol", bad],
            &[
                "invalid name",
                "or give a peer id: 64 hex digits, as `sluice ca show` prints",
            ],
        );
        assert_eq!(read(&list), good, "{bad:?} changed the list");
    }
    // Validity: zero, ambiguous, garbage.
    fails(
        t.path(),
        &["ca", "revoke", "--dir", "ca", "carol", "--valid", "0s"],
        &["--valid \"0s\": a validity must be more than zero"],
    );
    fails(
        t.path(),
        &["ca", "revoke", "--dir", "ca", "carol", "--valid", "6m"],
        &["is ambiguous: use 6min for minutes or 6mo for months"],
    );
    fails(
        t.path(),
        &["ca", "revoke", "--dir", "ca", "carol", "--valid", "soon"],
        &["--valid \"soon\": expected a number and a unit"],
    );
    assert_eq!(read(&list), good);

    // A list signed by another CA is not extended (its entries would be lost or forged).
    ok(t.path(), &["ca", "init", "--dir", "evil", "--org", "evil"]);
    ok(
        t.path(),
        &[
            "ca", "revoke", "--dir", "evil", "--list", "evil.pem", "mallory",
        ],
    );
    let evil = read(&t.file("evil.pem"));
    fails(
        t.path(),
        &["ca", "revoke", "--dir", "ca", "--list", "evil.pem", "carol"],
        &["evil.pem", "signed by another CA"],
    );
    assert_eq!(read(&t.file("evil.pem")), evil);
    // ... and show checks the signature against the CA it is given.
    fails(
        t.path(),
        &["ca", "show", "evil.pem", "--ca", "ca/ca.pem"],
        &["evil.pem", "signed by another CA"],
    );
    fails(
        t.path(),
        &[
            "ca",
            "show",
            "ca/alice.pem",
            "--revocations",
            "evil.pem",
            "--ca",
            "ca/ca.pem",
        ],
        &["evil.pem", "signed by another CA"],
    );

    // A tampered list: one byte of the signed body changed.
    let mut raw =
        RevocationList::bytes_from_pem(&String::from_utf8(good.clone()).unwrap()).unwrap();
    raw[60] ^= 0x01; // in the expiry field
    let tampered = RevocationList::parse_unverified(&raw).unwrap().to_pem();
    fs::write(t.file("tampered.pem"), &tampered).unwrap();
    fails(
        t.path(),
        &["ca", "show", "tampered.pem", "--ca", "ca/ca.pem"],
        &["tampered.pem", "signature does not verify"],
    );
    fails(
        t.path(),
        &[
            "ca",
            "revoke",
            "--dir",
            "ca",
            "--list",
            "tampered.pem",
            "carol",
        ],
        &["tampered.pem", "signature does not verify"],
    );
    assert_eq!(read(&t.file("tampered.pem")), tampered.as_bytes());

    // Not a list at all: a certificate, or garbage.
    fs::copy(t.file("ca/alice.pem"), t.file("cert-as-list.pem")).unwrap();
    fails(
        t.path(),
        &[
            "ca",
            "revoke",
            "--dir",
            "ca",
            "--list",
            "cert-as-list.pem",
            "carol",
        ],
        &[
            "cert-as-list.pem",
            "found a \"CERTIFICATE\" block, expected \"SLUICE REVOCATION LIST\"",
        ],
    );
    fails(
        t.path(),
        &[
            "ca",
            "show",
            "ca/alice.pem",
            "--revocations",
            "cert-as-list.pem",
            "--ca",
            "ca/ca.pem",
        ],
        &["cert-as-list.pem", "expected \"SLUICE REVOCATION LIST\""],
    );
    fs::write(t.file("garbage.pem"), "hello\n").unwrap();
    fails(
        t.path(),
        &[
            "ca",
            "revoke",
            "--dir",
            "ca",
            "--list",
            "garbage.pem",
            "carol",
        ],
        &["garbage.pem", "not a PEM revocation list"],
    );
    assert_eq!(read(&t.file("garbage.pem")), b"hello\n");
    assert_eq!(read(&list), good, "the real list was touched");
}

#[test]
fn show_revocations_needs_a_readable_list_and_ca() {
    let t = TempDir::new("show-bad");
    ca_with_nodes(&t);
    ok(t.path(), &["ca", "revoke", "--dir", "ca", "alice"]);
    fails(
        t.path(),
        &["ca", "show", "ca/alice.pem", "--revocations", "missing.pem"],
        &[],
    );
    // A list away from its CA, and no --ca: the error says what to give.
    fs::create_dir(t.file("elsewhere")).unwrap();
    fs::copy(t.file("ca/revoked.pem"), t.file("elsewhere/list.pem")).unwrap();
    fails(
        t.path(),
        &[
            "ca",
            "show",
            "ca/alice.pem",
            "--revocations",
            "elsewhere/list.pem",
        ],
        &[
            "cannot read the CA certificate elsewhere/ca.pem",
            "(give --ca)",
        ],
    );
    let r = sluice(
        t.path(),
        &[
            "ca",
            "show",
            "ca/alice.pem",
            "--revocations",
            "elsewhere/list.pem",
            "--ca",
            "ca/ca.pem",
        ],
    );
    assert_eq!(r.code, 1, "{r}");
    assert!(field(&r, "revoked").starts_with("YES: its name"), "{r}");
}

// ---- ca renew ----

#[test]
fn renew_keeps_the_key_and_peer_id_with_a_new_validity() {
    let t = TempDir::new("renew");
    ok(t.path(), &["ca", "init", "--dir", "ca", "--org", "acme"]);
    ok(
        t.path(),
        &[
            "ca",
            "issue",
            "--dir",
            "ca",
            "--role",
            "connector",
            "--name",
            "conn-1",
            "--group",
            "eng,ops",
            "--valid",
            "1h",
            "--out",
            "nodes",
        ],
    );
    let (cert, key) = (t.file("nodes/conn-1.pem"), t.file("nodes/conn-1.key"));
    let (cert0, key0) = (read(&cert), read(&key));
    let before = ok(t.path(), &["ca", "show", "nodes/conn-1.pem"]);
    let peer = field(&before, "peer id").to_string();

    let r = ok(
        t.path(),
        &[
            "ca", "renew", "--dir", "ca", "--name", "conn-1", "--out", "nodes", "--valid", "90s",
        ],
    );
    assert!(
        r.stdout.starts_with(&format!(
            "renewed connector certificate for \"conn-1\" (groups: eng,ops), peer id {} (the same key), valid 90s: nodes/conn-1.pem",
            &peer[..16]
        )),
        "{r}"
    );
    assert_ne!(read(&cert), cert0, "the certificate was not rewritten");
    assert_eq!(read(&key), key0, "renew must not touch the key");
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&cert), 0o644);
    let after = ok(t.path(), &["ca", "show", "nodes/conn-1.pem"]);
    assert_eq!(field(&after, "peer id"), peer, "{after}");
    assert_eq!(field(&after, "role"), "connector", "{after}");
    assert_eq!(field(&after, "groups"), "eng,ops", "{after}");
    let expires = field(&after, "expires");
    assert!(
        expires.ends_with("(in 89 seconds)") || expires.ends_with("(in 90 seconds)"),
        "{after}"
    );
    // --group replaces the groups.
    let r = ok(
        t.path(),
        &[
            "ca", "renew", "--dir", "ca", "--name", "conn-1", "--out", "nodes", "--group", "sre",
        ],
    );
    assert!(r.stdout.contains("(groups: sre)"), "{r}");
    let after = ok(t.path(), &["ca", "show", "nodes/conn-1.pem"]);
    assert_eq!(field(&after, "groups"), "sre", "{after}");
    assert_eq!(field(&after, "peer id"), peer);
    assert!(
        field(&after, "expires").contains("(in 29 days)")
            || field(&after, "expires").contains("(in 30 days)")
    );
    assert_eq!(read(&key), key0);
}

#[test]
fn renew_brings_back_an_expired_certificate_and_accepts_one_second() {
    let t = TempDir::new("renew-expired");
    ok(t.path(), &["ca", "init", "--dir", "ca"]);
    ok(
        t.path(),
        &[
            "ca", "issue", "--dir", "ca", "--role", "agent", "--name", "brief", "--valid", "1s",
        ],
    );
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let r = sluice(t.path(), &["ca", "show", "ca/brief.pem"]);
    assert_eq!(r.code, 1, "expired: {r}");
    ok(
        t.path(),
        &[
            "ca", "renew", "--dir", "ca", "--name", "brief", "--valid", "1h",
        ],
    );
    ok(t.path(), &["ca", "show", "ca/brief.pem"]);
    // The shortest validity is one second; zero is refused.
    ok(
        t.path(),
        &[
            "ca", "renew", "--dir", "ca", "--name", "brief", "--valid", "1s",
        ],
    );
    let cert = read(&t.file("ca/brief.pem"));
    fails(
        t.path(),
        &[
            "ca", "renew", "--dir", "ca", "--name", "brief", "--valid", "0s",
        ],
        &["--valid \"0s\": a validity must be more than zero"],
    );
    assert_eq!(read(&t.file("ca/brief.pem")), cert);
}

#[test]
fn renew_refuses_bad_input_and_never_harms_the_ca_or_the_node_files() {
    let t = TempDir::new("renew-bad");
    ca_with_nodes(&t);
    let ca_files = (read(&t.file("ca/ca.pem")), read(&t.file("ca/ca.key")));
    let alice = (read(&t.file("ca/alice.pem")), read(&t.file("ca/alice.key")));

    fails(
        t.path(),
        &["ca", "renew", "--dir", "ca", "--name", "nobody"],
        &[
            "cannot read ca/nobody.pem",
            "renew needs the node's certificate and key; `ca issue` makes new ones",
        ],
    );
    for bad in ["../evil", "a/b", ".hidden", ""] {
        fails(
            t.path(),
            &["ca", "renew", "--dir", "ca", "--name", bad],
            &["cannot be used as a file name"],
        );
    }
    // The CA's own files are no node's: refused, and left whole.
    fails(
        t.path(),
        &["ca", "renew", "--dir", "ca", "--name", "ca"],
        &["cannot renew ca/ca.pem"],
    );
    assert_eq!(
        (read(&t.file("ca/ca.pem")), read(&t.file("ca/ca.key"))),
        ca_files
    );
    // A key that is not the certificate's.
    fs::copy(t.file("ca/bob.key"), t.file("ca/alice.key")).unwrap();
    fails(
        t.path(),
        &["ca", "renew", "--dir", "ca", "--name", "alice"],
        &[
            "cannot renew ca/alice.pem",
            "the key does not belong to the certificate",
        ],
    );
    assert_eq!(read(&t.file("ca/alice.pem")), alice.0);
    fs::write(t.file("ca/alice.key"), &alice.1).unwrap();
    // NAME.pem holding another node's certificate (with its key).
    fs::copy(t.file("ca/bob.pem"), t.file("ca/dave.pem")).unwrap();
    fs::copy(t.file("ca/bob.key"), t.file("ca/dave.key")).unwrap();
    let dave = read(&t.file("ca/dave.pem"));
    fails(
        t.path(),
        &["ca", "renew", "--dir", "ca", "--name", "dave"],
        &["ca/dave.pem is the certificate of \"bob\", not \"dave\""],
    );
    assert_eq!(read(&t.file("ca/dave.pem")), dave);
    // A missing key.
    fs::remove_file(t.file("ca/dave.key")).unwrap();
    fails(
        t.path(),
        &["ca", "renew", "--dir", "ca", "--name", "dave"],
        &["cannot read ca/dave.key"],
    );
    // No CA.
    fails(
        t.path(),
        &[
            "ca", "renew", "--dir", "nowhere", "--name", "alice", "--out", "ca",
        ],
        &["no CA in nowhere"],
    );
    assert_eq!(
        (read(&t.file("ca/alice.pem")), read(&t.file("ca/alice.key"))),
        alice
    );
    assert_eq!(
        (read(&t.file("ca/ca.pem")), read(&t.file("ca/ca.key"))),
        ca_files
    );
}
