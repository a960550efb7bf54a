//! Every misconfiguration gets a message that names the file, the key and the right cause,
//! and exits with status 2 (issue 14, item 12). Table-driven over the real binary; every
//! agent runs inside a network namespace of this test's own, so a case that unexpectedly got
//! past its checks could not touch the machine's routes or resolver.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");
const NS: &str = "cfgerr-test";

/// A temporary folder and namespace, removed on drop (also when the test fails).
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = std::env::temp_dir().join(format!("sluice-cfgerr-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let _ = Command::new("ip").args(["netns", "del", NS]).status();
        assert!(Command::new("ip")
            .args(["netns", "add", NS])
            .status()
            .unwrap()
            .success());
        // `ip netns exec` mounts this over /etc/resolv.conf: the host's is never at stake.
        fs::create_dir_all(format!("/etc/netns/{NS}")).unwrap();
        fs::write(
            format!("/etc/netns/{NS}/resolv.conf"),
            "nameserver 192.0.2.53\n",
        )
        .unwrap();
        Scratch { dir }
    }

    fn run(&self, args: &[&str]) -> (Option<i32>, String) {
        let out = Command::new("timeout")
            .args(["10", "ip", "netns", "exec", NS, BIN])
            .args(args)
            .current_dir("/")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) {
        let (code, err) = self.run(args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", NS]).status();
        let _ = fs::remove_dir_all(format!("/etc/netns/{NS}"));
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn write(path: &Path, text: &str) -> String {
    fs::write(path, text).unwrap();
    path.display().to_string()
}

#[test]
fn each_misconfiguration_names_its_file_key_and_cause() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root (network namespaces)"
    );
    let s = Scratch::new();
    let d = s.dir.display().to_string();
    let ca = format!("{d}/ca");
    s.ok(&["ca", "init", "--dir", &ca, "--org", "t"]);
    for (role, name) in [("agent", "alice"), ("agent", "bob"), ("connector", "c1")] {
        s.ok(&["ca", "issue", "--dir", &ca, "--role", role, "--name", name]);
    }
    s.ok(&[
        "ca", "issue", "--dir", &ca, "--role", "agent", "--name", "old", "--valid", "1s",
    ]);
    std::thread::sleep(Duration::from_millis(2100));
    let policy = write(
        &s.dir.join("policy.yaml"),
        "version: 1\nresources:\n  - name: web\n    connector: c1\n    addresses: [198.51.100.0/24]\n    ports: [tcp/80]\nrules:\n  - action: allow\n    who: [everyone]\n    to: [web]\n",
    );
    // A config whose identity lines are `cert`, `key` (relative to the config's folder).
    let agent = |name: &str, extra: &str| {
        format!(
            "relay: 192.0.2.1:4433\ncert: ca/{name}.pem\nkey: ca/{name}.key\nca: ca/ca.pem\npolicy: {policy}\ndns:\n  configure_system: false\n{extra}"
        )
    };

    let loose_key = s.dir.join("ca/bob.key");
    let cases: Vec<(&str, String, Vec<&str>, Vec<String>)> = vec![
        (
            "a key that does not match its certificate",
            write(
                &s.dir.join("mismatch.yaml"),
                &agent("alice", "").replace("ca/alice.key", "ca/bob.key"),
            ),
            vec![],
            vec![
                format!("mismatch.yaml: `key` {d}/ca/bob.key: this key does not belong to the certificate {d}/ca/alice.pem"),
            ],
        ),
        (
            "a missing policy file",
            write(
                &s.dir.join("nopolicy.yaml"),
                &agent("alice", "").replace(&policy, "/nonexistent.yaml"),
            ),
            vec![],
            vec!["nopolicy.yaml: `policy` /nonexistent.yaml: cannot read: No such file or directory".into()],
        ),
        (
            "a required key left out",
            write(
                &s.dir.join("nokey.yaml"),
                &agent("alice", "").replace(&format!("policy: {policy}\n"), ""),
            ),
            vec![],
            vec!["nokey.yaml: invalid configuration: required key `policy` is missing".into()],
        ),
        (
            "relative paths are the config's folder's, not the working directory's",
            write(
                &s.dir.join("relative.yaml"),
                &agent("alice", "").replace(&policy, "missing-policy.yaml"),
            ),
            vec![],
            vec![format!("relative.yaml: `policy` {d}/missing-policy.yaml: cannot read")],
        ),
        (
            "a bad flag is blamed on the flag",
            write(&s.dir.join("flag.yaml"), &agent("alice", "")),
            vec!["--mtu", "100"],
            vec!["--mtu is 100; IPv6 needs at least 1280".into()],
        ),
        (
            "a missing certificate",
            write(
                &s.dir.join("nocert.yaml"),
                &agent("alice", "").replace("ca/alice.pem", "ca/nobody.pem"),
            ),
            vec![],
            vec![format!("nocert.yaml: `cert` {d}/ca/nobody.pem: No such file or directory")],
        ),
        (
            "an expired certificate",
            write(&s.dir.join("expired.yaml"), &agent("old", "")),
            vec![],
            vec![format!("expired.yaml: `cert` {d}/ca/old.pem: certificate expired")],
        ),
        (
            "a certificate of the wrong role",
            write(&s.dir.join("role.yaml"), &agent("c1", "")),
            vec![],
            vec!["this is a connector certificate, but this process runs the agent role".into()],
        ),
        (
            "a relay that is no HOST:PORT",
            write(
                &s.dir.join("relay.yaml"),
                &agent("alice", "").replace("192.0.2.1:4433", "relay.example.com"),
            ),
            vec![],
            vec!["relay.yaml:1:1: invalid configuration at key `relay`: \"relay.example.com\": expected HOST:PORT".into()],
        ),
        (
            "a key readable by others is said (and the start goes on to the next error)",
            write(
                &s.dir.join("loose.yaml"),
                &agent("bob", "").replace(&policy, "/nonexistent.yaml"),
            ),
            vec![],
            vec![
                format!("loose.yaml: `key` {} can be read by other users (mode 0644)", loose_key.display()),
                "`policy` /nonexistent.yaml: cannot read".into(),
            ],
        ),
        (
            "an invalid policy",
            write(
                &s.dir.join("badpolicy.yaml"),
                &agent("alice", "").replace(
                    &policy,
                    &write(&s.dir.join("bad-policy.yaml"), "version: 1\nresources: 7\n"),
                ),
            ),
            vec![],
            vec![format!("badpolicy.yaml: `policy` {d}/bad-policy.yaml is invalid"), format!("  {d}/bad-policy.yaml:2:")],
        ),
        (
            "a DNS pool overlapping a resource",
            write(
                &s.dir.join("pool.yaml"),
                &agent("alice", "").replace("dns:\n", "dns:\n  pool_v4: 198.51.0.0/16\n"),
            ),
            vec![],
            vec!["`dns.pool_v4`: the synthetic pool 198.51.0.0/16 overlaps the policy's resource network 198.51.100.0/24".into()],
        ),
    ];
    fs::set_permissions(&loose_key, fs::Permissions::from_mode(0o644)).unwrap();
    for (what, file, flags, wants) in &cases {
        let mut args = vec!["agent", "--config", file.as_str()];
        args.extend(flags);
        let (code, err) = s.run(&args);
        assert_eq!(code, Some(2), "{what}: exit status\n{err}");
        for want in wants {
            assert!(
                err.contains(want.as_str()),
                "{what}: wanted {want:?} in\n{err}"
            );
        }
        assert_eq!(
            err.matches("error:").count(),
            1,
            "{what}: said once that it is an error\n{err}"
        );
        assert!(
            !err.contains(":0:0"),
            "{what}: no meaningless location\n{err}"
        );
    }

    // A TUN name taken by another kind of interface is said so (not "needs root").
    assert!(Command::new("ip")
        .args(["-n", NS, "link", "add", "taken0", "type", "veth", "peer", "name", "taken1"])
        .status()
        .unwrap()
        .success());
    let file = write(
        &s.dir.join("tun.yaml"),
        &agent("alice", "tun:\n  name: taken0\n"),
    );
    let (code, err) = s.run(&["agent", "--config", &file]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("an interface of that name exists and is not a TUN device"),
        "{err}"
    );
    assert!(!err.contains("CAP_NET_ADMIN"), "{err}");
}
