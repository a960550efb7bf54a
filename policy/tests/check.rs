//! `policy check` on broken files: each fixture in tests/fixtures/broken has exactly one
//! mistake, and the error must name the line and column of the offending token, the key, and
//! say what is wrong.

use std::collections::BTreeSet;

use sluice_policy::{compile, Diagnostic, Severity};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/broken");

/// 2026-01-01T00:00:00Z; no fixture's rule has expired by then.
const NOW: i64 = 1_767_225_600;

struct Expect {
    file: &'static str,
    line: usize,
    column: usize,
    /// The text that starts at `line:column` in the file: the token the error points at.
    at: &'static str,
    /// The diagnostic's key (path of the offending node).
    key: &'static str,
    /// Part of the message.
    message: &'static str,
}

#[rustfmt::skip]
const EXPECTED: &[Expect] = &[
    Expect { file: "01-yaml-tab-indent", line: 19, column: 1, at: "\tconnector: conn-2",
             key: "resources[1].name", message: "found a tab character that violates indentation" },
    Expect { file: "02-unknown-top-level-key", line: 23, column: 1, at: "rule:",
             key: "rule", message: "unknown field `rule`, expected one of `version`, `groups`, `resources`, `rules`" },
    Expect { file: "03-misspelt-rule-key", line: 30, column: 5, at: "acton: allow",
             key: "rules[1].acton", message: "unknown field `acton`, expected one of `name`, `action`" },
    Expect { file: "04-wrong-version", line: 3, column: 10, at: "2",
             key: "version", message: "unsupported version 2 (this build reads version 1)" },
    Expect { file: "05-bad-action", line: 30, column: 13, at: "permit",
             key: "rules[1].action", message: "unknown variant `permit`, expected `allow` or `deny`" },
    Expect { file: "06-unknown-group-in-rule", line: 26, column: 11, at: "group:engineers]",
             key: "rules[0].who[0]", message: "unknown group \"engineers\" (defined groups: engineering, sre)" },
    Expect { file: "07-unknown-resource-in-rule", line: 27, column: 10, at: "wbe, dev]",
             key: "rules[0].to[0]", message: "unknown resource \"wbe\" (defined resources: web, dev)" },
    Expect { file: "08-unknown-group-in-include", line: 10, column: 15, at: "sres]",
             key: "groups.engineering.include[0]", message: "unknown group \"sres\"" },
    Expect { file: "09-include-cycle", line: 9, column: 3, at: "engineering:",
             key: "groups.engineering", message: "group \"engineering\" includes itself through a cycle: engineering -> sre -> engineering" },
    Expect { file: "10-bad-cidr", line: 20, column: 17, at: "10.30.0.0/33]",
             key: "resources[1].addresses[0]", message: "\"10.30.0.0/33\" is not a valid CIDR" },
    Expect { file: "11-cidr-host-bits", line: 20, column: 17, at: "10.30.1.0/16]",
             key: "resources[1].addresses[0]", message: "has host bits set; did you mean 10.30.0.0/16?" },
    Expect { file: "12-port-out-of-range", line: 16, column: 21, at: "tcp/70000]",
             key: "resources[0].ports[1]", message: "port 70000 is out of range (1-65535)" },
    Expect { file: "13-backwards-range", line: 21, column: 13, at: "tcp/8100-8000]",
             key: "resources[1].ports[0]", message: "the range runs backwards (8100 > 8000)" },
    Expect { file: "14-unknown-protocol", line: 21, column: 28, at: "sctp/9000]",
             key: "resources[1].ports[1]", message: "unknown protocol \"sctp\" (tcp, udp or icmp)" },
    Expect { file: "15-wildcard-in-middle", line: 15, column: 31, at: "\"wiki.*.example\"]",
             key: "resources[0].addresses[1]", message: "a wildcard must be the whole first label" },
    Expect { file: "16-wildcard-tld", line: 15, column: 31, at: "\"*.com\"]",
             key: "resources[0].addresses[1]", message: "\"*.com\" would match a whole top-level domain" },
    Expect { file: "17-duplicate-resource", line: 18, column: 11, at: "web",
             key: "resources[1].name", message: "resource \"web\" is already defined (line 13)" },
    Expect { file: "18-duplicate-rule-name", line: 29, column: 11, at: "eng-web",
             key: "rules[1].name", message: "rule name \"eng-web\" is already used by rules[0]" },
    Expect { file: "19-bad-who", line: 31, column: 11, at: "team:sre, user:dave]",
             key: "rules[1].who[0]", message: "\"team:sre\": expected everyone, group:NAME or user:NAME" },
    Expect { file: "20-bad-expiry", line: 33, column: 14, at: "2099-02-30",
             key: "rules[1].expires", message: "\"2099-02-30\" is not a date (2027-01-31) or an RFC 3339 time" },
    Expect { file: "21-include-cycle-three-groups", line: 10, column: 3, at: "oncall:",
             key: "groups.oncall", message: "group \"oncall\" includes itself through a cycle: oncall -> ops -> sre -> oncall" },
];

fn errors_of(file: &str) -> (String, Vec<Diagnostic>) {
    let path = format!("{DIR}/{file}.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let name = format!("{file}.yaml");
    let diags = match compile(&text, &name, NOW) {
        Ok(c) => panic!(
            "{name} compiled, but it is broken on purpose (warnings: {:?})",
            c.warnings
        ),
        Err(e) => e.0,
    };
    (text, diags)
}

#[test]
fn every_fixture_is_in_the_table() {
    let mut on_disk: Vec<String> = std::fs::read_dir(DIR)
        .unwrap_or_else(|e| panic!("{DIR}: {e}"))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    on_disk.sort();
    let listed: Vec<String> = EXPECTED
        .iter()
        .map(|e| format!("{}.yaml", e.file))
        .collect();
    assert_eq!(on_disk, listed);
    assert_eq!(EXPECTED.len(), 21);
}

#[test]
fn each_broken_file_fails_with_one_precise_error() {
    let mut failures = Vec::new();
    for e in EXPECTED {
        let (text, diags) = errors_of(e.file);
        let errors: Vec<&Diagnostic> = diags
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .collect();
        let all: Vec<String> = diags.iter().map(|d| d.to_string()).collect();
        let all = all.join("\n      ");
        let Some(first) = errors.first() else {
            failures.push(format!("{}: no error among\n      {all}", e.file));
            continue;
        };
        let mut wrong = Vec::new();
        if errors.len() != 1 {
            wrong.push(format!("{} errors, expected exactly one", errors.len()));
        }
        if (first.line, first.column) != (e.line, e.column) {
            wrong.push(format!(
                "at {}:{}, expected {}:{}",
                first.line, first.column, e.line, e.column
            ));
        }
        if first.key != e.key {
            wrong.push(format!("key {:?}, expected {:?}", first.key, e.key));
        }
        if !first.message.contains(e.message) {
            wrong.push(format!("message lacks {:?}", e.message));
        }
        // The position is that of the offending token in the file.
        let line = text.lines().nth(e.line.saturating_sub(1)).unwrap_or("");
        let from = line.get(e.column.saturating_sub(1)..).unwrap_or("");
        if !from.starts_with(e.at) {
            wrong.push(format!(
                "text at {}:{} is {from:?}, expected it to start with {:?}",
                e.line, e.column, e.at
            ));
        }
        // The rendered form an admin sees.
        let shown = first.to_string();
        let prefix = format!(
            "{}.yaml:{}:{}: error: `{}`: ",
            e.file, e.line, e.column, e.key
        );
        if !shown.starts_with(&prefix) {
            wrong.push(format!(
                "rendered as {shown:?}, expected it to start with {prefix:?}"
            ));
        }
        if !wrong.is_empty() {
            failures.push(format!("{}: {}\n      {all}", e.file, wrong.join("; ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} fixture(s) wrong:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

#[test]
fn first_errors_are_pairwise_distinct() {
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for e in EXPECTED {
        let (_, diags) = errors_of(e.file);
        let first = diags
            .iter()
            .find(|d| d.severity == Severity::Error)
            .unwrap_or_else(|| panic!("{}: no error", e.file));
        assert!(
            seen.insert(first.message.clone()),
            "{}: its first error repeats another fixture's: {:?}",
            e.file,
            first.message
        );
    }
    assert_eq!(seen.len(), EXPECTED.len());
}

/// Resources that would route the agent's relay or its own tunnel address into the tunnel are
/// valid but warned about, each at the address entry (or at `resources` when only the union of
/// several entries covers everything).
#[test]
fn routes_that_swallow_the_relay_or_the_tunnel_are_warned_about() {
    let text = "\
version: 1
resources:
  - name: all-v4
    connector: c
    addresses: [10.0.0.0/8, 0.0.0.0/0]
    ports: [any]
  - name: all-v6
    connector: c
    addresses: [\"::/0\"]
    ports: [any]
  - name: cgnat
    connector: c
    addresses: [100.64.0.0/10]
    ports: [any]
  - name: ula
    connector: c
    addresses: [\"fd5c:1ce0::/32\", 10.1.0.0/16]
    ports: [any]
rules:
  - action: allow
    who: [everyone]
    to: [all-v4, all-v6, cgnat, ula]
";
    let c = compile(text, "p.yaml", NOW).unwrap_or_else(|e| panic!("{e}"));
    let shown: Vec<String> = c.warnings.iter().map(|d| d.to_string()).collect();
    let expected = [
        "p.yaml:5:29: warning: `resources[0].addresses[1]`: 0.0.0.0/0 covers every IPv4 address: the agent would route all IPv4 traffic into the tunnel, its relay's address included; list the networks the resource really has",
        "p.yaml:9:17: warning: `resources[1].addresses[0]`: ::/0 covers every IPv6 address: the agent would route all IPv6 traffic into the tunnel, its relay's address included; list the networks the resource really has",
        "p.yaml:13:17: warning: `resources[2].addresses[0]`: 100.64.0.0/10 covers 100.96.0.1, the agent's default tunnel address (tun.ipv4): the agent's own traffic would be routed back into the tunnel; narrow the range or give agents another tun.ipv4",
        "p.yaml:17:17: warning: `resources[3].addresses[0]`: fd5c:1ce0::/32 covers fd5c:1ce0:1::1, the agent's default tunnel address (tun.ipv6): the agent's own traffic would be routed back into the tunnel; narrow the range or give agents another tun.ipv6",
    ];
    assert_eq!(shown, expected);
    assert!(c.warnings.iter().all(|d| d.severity == Severity::Warning));

    // Two halves make a whole: warned once, at `resources` (the lower half also holds the
    // tunnel address).
    let halves = "\
version: 1
resources:
  - name: low
    connector: c
    addresses: [0.0.0.0/1]
    ports: [any]
  - name: high
    connector: c
    addresses: [128.0.0.0/1]
    ports: [any]
rules:
  - action: allow
    who: [everyone]
    to: [low, high]
";
    let c = compile(halves, "p.yaml", NOW).unwrap_or_else(|e| panic!("{e}"));
    let shown: Vec<String> = c.warnings.iter().map(|d| d.to_string()).collect();
    assert_eq!(shown, [
        "p.yaml:5:17: warning: `resources[0].addresses[0]`: 0.0.0.0/1 covers 100.96.0.1, the agent's default tunnel address (tun.ipv4): the agent's own traffic would be routed back into the tunnel; narrow the range or give agents another tun.ipv4",
        "p.yaml:2:1: warning: `resources`: together, the resources' addresses cover every IPv4 address (0.0.0.0/0): the agent would route all IPv4 traffic into the tunnel, its relay's address included; list the networks the resources really have",
    ]);

    // Ordinary networks next to the tunnel addresses: no warning.
    let fine = "\
version: 1
resources:
  - name: near
    connector: c
    addresses: [100.96.1.0/24, \"fd5c:1ce0:2::/48\", 10.0.0.0/8]
    ports: [any]
rules:
  - action: allow
    who: [everyone]
    to: [near]
";
    let c = compile(fine, "p.yaml", NOW).unwrap_or_else(|e| panic!("{e}"));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}
