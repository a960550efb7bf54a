//! Table-driven decisions over the example policy admins copy, `configs/policy.yaml`: users,
//! groups (listed, nested, and asserted by certificate), CIDRs v4/v6, single IPs, hostnames,
//! wildcard domains, port ranges, UDP, ICMP, deny beating allow, expiry and connectors.

use std::net::{IpAddr, Ipv4Addr};

use sluice_policy::{compile, Decision, Flow, Policy, Proto, Severity, Verdict};

const POLICY: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../configs/policy.yaml"
));
const FILE: &str = "configs/policy.yaml";

/// 2026-01-01T00:00:00Z: the "present" of the table.
const NOW: i64 = 1_767_225_600;
/// 2099-01-01T00:00:00Z: `erin-audit` expires.
const ERIN_EXPIRES: i64 = 4_070_908_800;
/// 2024-06-30T18:00:00Z: `frank-db-migration` expired.
const FRANK_EXPIRES: i64 = 1_719_770_400;
/// 2024-01-01T00:00:00Z: before frank's rule expired.
const EARLY_2024: i64 = 1_704_067_200;

/// Where DNS-named flows go: an address no resource names, so only the hostname can match.
const UNNAMED_DST: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));

use Verdict::{Allow, Deny};
const TCP: Proto = Proto::Tcp;
const UDP: Proto = Proto::Udp;
const ICMP: Proto = Proto::Icmp;
const DEFAULT: &str = "default";

fn policy() -> Policy {
    match compile(POLICY, FILE, NOW) {
        Ok(c) => c.policy,
        Err(e) => panic!("{FILE} does not compile:\n{e}"),
    }
}

/// A flow to `dest`, an IP address or else a hostname (then sent to [`UNNAMED_DST`]).
fn flow(dest: &str, proto: Proto, port: u16) -> Flow<'_> {
    match dest.parse::<IpAddr>() {
        Ok(dst) => Flow {
            dst,
            hostname: None,
            proto,
            port,
        },
        Err(_) => Flow {
            dst: UNNAMED_DST,
            hostname: Some(dest),
            proto,
            port,
        },
    }
}

struct Case<'a> {
    user: &'a str,
    cert_groups: &'a [&'a str],
    dest: &'a str,
    proto: Proto,
    port: u16,
    now: i64,
    connector: Option<&'a str>,
    verdict: Verdict,
    rule: &'a str,
}

/// Runs every case, collecting all mismatches so one run shows every failure.
fn run(p: &Policy, cases: &[Case<'_>]) {
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let groups: Vec<String> = c.cert_groups.iter().map(|g| g.to_string()).collect();
        let subject = p.subject(c.user, &groups);
        let f = flow(c.dest, c.proto, c.port);
        let d: Decision = p.decide_for(&subject, &f, c.now, c.connector);
        if d.verdict != c.verdict || p.rule_name(&d) != c.rule {
            failures.push(format!(
                "case {i}: user {:?} cert groups {:?} (policy groups {:?}) -> {} {}/{} at {}{}:\n      \
                 expected {:?} by {:?}, got: {}",
                c.user,
                c.cert_groups,
                subject.groups,
                c.dest,
                c.proto.as_str(),
                c.port,
                c.now,
                c.connector.map(|c| format!(" via {c}")).unwrap_or_default(),
                c.verdict,
                c.rule,
                p.describe(&d),
            ));
        }
        // Without a connector filter the answer must be the same as through decide().
        if c.connector.is_none() {
            assert_eq!(
                d,
                p.decide(&subject, &f, c.now),
                "case {i}: decide_for(None) != decide"
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} decisions differ from the table:\n  {}",
        failures.len(),
        cases.len(),
        failures.join("\n  ")
    );
}

/// (user, certificate groups, destination, protocol, port, verdict, deciding rule), at [`NOW`]
/// on any connector.
type Row<'a> = (
    &'a str,
    &'a [&'a str],
    &'a str,
    Proto,
    u16,
    Verdict,
    &'a str,
);

fn at_now<'a>(rows: &[Row<'a>]) -> Vec<Case<'a>> {
    rows.iter()
        .map(
            |&(user, cert_groups, dest, proto, port, verdict, rule)| Case {
                user,
                cert_groups,
                dest,
                proto,
                port,
                now: NOW,
                connector: None,
                verdict,
                rule,
            },
        )
        .collect()
}

#[test]
fn example_policy_compiles_with_only_the_deliberate_warning() {
    let c = compile(POLICY, FILE, NOW).unwrap_or_else(|e| panic!("{FILE} does not compile:\n{e}"));
    let shown: Vec<String> = c.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(c.warnings.len(), 1, "warnings:\n{}", shown.join("\n"));
    let w = &c.warnings[0];
    assert_eq!(w.severity, Severity::Warning);
    assert_eq!(w.key, "rules[9].expires", "{w}");
    assert!(
        w.message.contains("frank-db-migration") && w.message.contains("expired"),
        "{w}"
    );
    // It points at the expiry value, on the line that says so.
    let line = POLICY.lines().nth(w.line - 1).unwrap_or("");
    assert!(
        line.trim_start().starts_with("expires: 2024-06-30"),
        "{w}\nline: {line:?}"
    );
    assert_eq!(&line[w.column - 1..], "2024-06-30T18:00:00Z", "{w}");

    // Before it expired, the same file checks clean.
    let early = compile(POLICY, FILE, EARLY_2024).expect("compiles");
    assert!(early.warnings.is_empty(), "{:?}", early.warnings);
}

#[test]
fn subjects_resolve_nested_and_certificate_groups() {
    let p = policy();
    let groups = |user: &str, cert: &[&str]| {
        let cert: Vec<String> = cert.iter().map(|g| g.to_string()).collect();
        let mut g = p.subject(user, &cert).groups;
        g.sort();
        g
    };
    assert_eq!(groups("alice", &[]), ["engineering", "sre", "staff"]);
    assert_eq!(groups("bob", &[]), ["engineering", "staff"]);
    assert_eq!(groups("dave", &[]), ["finance", "staff"]);
    assert_eq!(groups("mallory", &[]), ["contractors"]);
    assert_eq!(groups("erin", &[]), Vec::<String>::new());
    assert_eq!(groups("zoe", &["sre"]), ["engineering", "sre", "staff"]);
    assert_eq!(groups("sec-1", &["security", "no-such-team"]), ["security"]);
    assert_eq!(
        groups("mallory", &["engineering"]),
        ["contractors", "engineering", "staff"]
    );
}

#[test]
fn decisions_at_now() {
    let p = policy();
    #[rustfmt::skip]
    let rows: &[Row] = &[
        // dns: a single IPv4 address, udp/53 and tcp/53, for everyone (even unknown users).
        ("bob",     &[], "10.0.0.53", UDP, 53, Allow, "everyone-dns"),
        ("nobody",  &[], "10.0.0.53", UDP, 53, Allow, "everyone-dns"),
        ("mallory", &[], "10.0.0.53", TCP, 53, Allow, "everyone-dns"),
        ("bob",     &[], "10.0.0.53", UDP, 54, Deny, DEFAULT),
        ("bob",     &[], "10.0.0.53", UDP, 52, Deny, DEFAULT),
        ("bob",     &[], "10.0.0.54", UDP, 53, Deny, DEFAULT),
        ("bob",     &[], "10.0.0.52", UDP, 53, Deny, DEFAULT),
        ("bob",     &[], "10.0.0.53", ICMP, 0, Deny, DEFAULT),

        // web-internal: 10.10.1.0/24 and 2001:db8:10::/64, tcp/80 and tcp/443, engineering.
        ("bob",   &[], "10.10.1.5",   TCP, 443, Allow, "engineering-apps"),
        ("bob",   &[], "10.10.1.5",   TCP, 80,  Allow, "engineering-apps"),
        ("bob",   &[], "10.10.1.0",   TCP, 443, Allow, "engineering-apps"),
        ("bob",   &[], "10.10.1.255", TCP, 443, Allow, "engineering-apps"),
        ("bob",   &[], "10.10.0.255", TCP, 443, Deny, DEFAULT),
        ("bob",   &[], "10.10.2.0",   TCP, 443, Deny, DEFAULT),
        ("bob",   &[], "10.10.1.5",   TCP, 8080, Deny, DEFAULT),
        ("bob",   &[], "10.10.1.5",   UDP, 443, Deny, DEFAULT),
        ("carol", &[], "2001:db8:10::1", TCP, 443, Allow, "engineering-apps"),
        ("carol", &[], "2001:db8:10::ffff:ffff:ffff:ffff", TCP, 80, Allow, "engineering-apps"),
        ("carol", &[], "2001:db8:10:1::", TCP, 443, Deny, DEFAULT),
        ("carol", &[], "2001:db8:f::ffff", TCP, 443, Deny, DEFAULT),
        ("dave",  &[], "10.10.1.5",   TCP, 443, Deny, DEFAULT),
        // alice is in sre, which engineering includes.
        ("alice", &[], "10.10.1.5",   TCP, 443, Allow, "engineering-apps"),
        // 10.10.1.200 is both web-internal and admin-panel: bob gets it through web-internal;
        // alice through both, and the first matching rule in the file is reported.
        ("bob",   &[], "10.10.1.200", TCP, 443, Allow, "engineering-apps"),
        ("alice", &[], "10.10.1.200", TCP, 443, Allow, "engineering-apps"),

        // Deny beats allow: contractors reach web-internal but not the admin panel inside it,
        // whether listed as members or by certificate, and even when also engineers.
        ("mallory", &[], "10.10.1.5",   TCP, 443, Allow, "contractors-web"),
        ("mallory", &[], "10.10.1.200", TCP, 443, Deny, "no-contractors-on-admin"),
        // admin-panel is only tcp/443, so the deny does not cover port 80.
        ("mallory", &[], "10.10.1.200", TCP, 80,  Allow, "contractors-web"),
        ("ext-1", &["contractors"], "10.10.1.200", TCP, 443, Deny, "no-contractors-on-admin"),
        ("ext-1", &["contractors"], "10.10.1.7",   TCP, 443, Allow, "contractors-web"),
        ("ext-2", &["contractors", "engineering"], "10.10.1.200", TCP, 443, Deny, "no-contractors-on-admin"),
        ("ext-2", &["contractors", "engineering"], "10.30.0.1", TCP, 8000, Allow, "engineering-apps"),
        ("mallory", &["engineering"], "10.10.1.200", TCP, 443, Deny, "no-contractors-on-admin"),
        ("mallory", &[], "10.20.1.5", TCP, 5432, Deny, DEFAULT),
        ("mallory", &[], "10.30.0.1", TCP, 8000, Deny, DEFAULT),

        // prod-db: 10.20.0.0/16 and fd00:20::/48, tcp/5432, sre only.
        ("alice", &[], "10.20.1.5",       TCP, 5432, Allow, "sre-production"),
        ("alice", &[], "10.20.0.0",       TCP, 5432, Allow, "sre-production"),
        ("alice", &[], "10.20.255.255",   TCP, 5432, Allow, "sre-production"),
        ("alice", &[], "10.21.0.0",       TCP, 5432, Deny, DEFAULT),
        ("alice", &[], "10.19.255.255",   TCP, 5432, Deny, DEFAULT),
        ("alice", &[], "10.20.1.5",       TCP, 5433, Deny, DEFAULT),
        ("alice", &[], "10.20.1.5",       UDP, 5432, Deny, DEFAULT),
        ("alice", &[], "fd00:20::5",      TCP, 5432, Allow, "sre-production"),
        ("alice", &[], "fd00:20:0:ffff:ffff:ffff:ffff:ffff", TCP, 5432, Allow, "sre-production"),
        ("alice", &[], "fd00:20:1::",     TCP, 5432, Deny, DEFAULT),
        ("alice", &[], "fd00:21::5",      TCP, 5432, Deny, DEFAULT),
        ("alice", &[], "fd00:1f:ffff::5", TCP, 5432, Deny, DEFAULT),
        // An IPv4-mapped IPv6 destination is the IPv4 address.
        ("alice", &[], "::ffff:10.20.1.5", TCP, 5432, Allow, "sre-production"),
        // Nesting goes one way: engineering includes sre, not the other way round.
        ("bob",   &[], "10.20.1.5",  TCP, 5432, Deny, DEFAULT),
        ("bob",   &[], "fd00:20::5", TCP, 5432, Deny, DEFAULT),
        // Groups from the certificate count like listed membership, nesting included.
        ("zoe",    &["sre"],          "10.20.1.5", TCP, 5432, Allow, "sre-production"),
        ("zoe",    &["sre"],          "10.10.1.5", TCP, 443,  Allow, "engineering-apps"),
        ("yuri",   &["engineering"],  "10.20.1.5", TCP, 5432, Deny, DEFAULT),
        ("yuri",   &["engineering"],  "10.10.1.5", TCP, 443,  Allow, "engineering-apps"),
        ("xavier", &["no-such-team"], "10.20.1.5", TCP, 5432, Deny, DEFAULT),
        // A user rule with an expiry far in the future; an expired one.
        ("erin",  &[], "10.20.1.5",  TCP, 5432, Allow, "erin-audit"),
        ("erin",  &[], "fd00:20::5", TCP, 5432, Allow, "erin-audit"),
        ("erin",  &[], "10.40.0.1",  ICMP, 0,   Deny, DEFAULT),
        ("frank", &[], "10.20.1.5",  TCP, 5432, Deny, DEFAULT),
        ("frank", &[], "10.50.0.10", TCP, 22,   Deny, DEFAULT),

        // dev-apps: tcp/3000 and the range tcp/8000-8100, edges included.
        ("bob", &[], "10.30.0.1",     TCP, 7999, Deny, DEFAULT),
        ("bob", &[], "10.30.0.1",     TCP, 8000, Allow, "engineering-apps"),
        ("bob", &[], "10.30.0.1",     TCP, 8001, Allow, "engineering-apps"),
        ("bob", &[], "10.30.200.200", TCP, 8050, Allow, "engineering-apps"),
        ("bob", &[], "10.30.0.1",     TCP, 8099, Allow, "engineering-apps"),
        ("bob", &[], "10.30.0.1",     TCP, 8100, Allow, "engineering-apps"),
        ("bob", &[], "10.30.0.1",     TCP, 8101, Deny, DEFAULT),
        ("bob", &[], "10.30.0.1",     TCP, 3000, Allow, "engineering-apps"),
        ("bob", &[], "10.30.0.1",     TCP, 2999, Deny, DEFAULT),
        ("bob", &[], "10.30.0.1",     TCP, 3001, Deny, DEFAULT),
        ("bob", &[], "10.30.0.1",     UDP, 8000, Deny, DEFAULT),
        ("bob", &[], "10.30.0.1",     ICMP, 0,   Deny, DEFAULT),

        // monitoring: icmp plus tcp/9090 and tcp/9100-9110.
        ("alice", &[], "10.40.0.1",   ICMP, 0,    Allow, "sre-production"),
        // ICMP has no port: whatever the port field holds is ignored.
        ("alice", &[], "10.40.0.1",   ICMP, 8,    Allow, "sre-production"),
        ("alice", &[], "10.40.0.254", TCP,  9090, Allow, "sre-production"),
        ("alice", &[], "10.40.0.1",   TCP,  9100, Allow, "sre-production"),
        ("alice", &[], "10.40.0.1",   TCP,  9110, Allow, "sre-production"),
        ("alice", &[], "10.40.0.1",   TCP,  9111, Deny, DEFAULT),
        ("alice", &[], "10.40.0.1",   TCP,  9099, Deny, DEFAULT),
        ("alice", &[], "10.40.0.1",   UDP,  9090, Deny, DEFAULT),
        ("alice", &[], "10.40.1.1",   ICMP, 0,    Deny, DEFAULT),
        ("bob",   &[], "10.40.0.1",   ICMP, 0,    Deny, DEFAULT),
        ("sec-1", &["security"], "10.40.0.7", ICMP, 0, Allow, "security-monitoring"),
        ("sec-1", &["security"], "10.20.1.5", TCP, 5432, Deny, DEFAULT),

        // jump-host: two single addresses, v4 and v6, `any` protocol and port.
        ("alice", &[], "10.50.0.10", TCP,  22,    Allow, "sre-production"),
        ("alice", &[], "10.50.0.10", TCP,  1,     Allow, "sre-production"),
        ("alice", &[], "10.50.0.10", TCP,  65535, Allow, "sre-production"),
        ("alice", &[], "10.50.0.10", UDP,  51820, Allow, "sre-production"),
        ("alice", &[], "10.50.0.10", ICMP, 0,     Allow, "sre-production"),
        ("alice", &[], "10.50.0.11", TCP,  22,    Deny, DEFAULT),
        ("alice", &[], "2001:db8:50::10", TCP, 22, Allow, "sre-production"),
        ("alice", &[], "2001:db8:50::11", TCP, 22, Deny, DEFAULT),
        ("bob",   &[], "10.50.0.10", TCP,  22,    Deny, DEFAULT),
        ("sec-1", &["security"], "2001:db8:50::10", UDP, 500, Allow, "security-monitoring"),

        // git: an exact hostname; no subdomains, no parent domain.
        ("bob",  &[], "git.example.com",     TCP, 22,  Allow, "engineering-apps"),
        ("bob",  &[], "git.example.com",     TCP, 443, Allow, "engineering-apps"),
        ("bob",  &[], "git.example.com.",    TCP, 443, Allow, "engineering-apps"),
        ("bob",  &[], "git.example.com",     TCP, 80,  Deny, DEFAULT),
        ("bob",  &[], "www.git.example.com", TCP, 443, Deny, DEFAULT),
        ("bob",  &[], "example.com",         TCP, 443, Deny, DEFAULT),
        ("bob",  &[], "git.example.co",      TCP, 443, Deny, DEFAULT),
        ("dave", &[], "git.example.com",     TCP, 443, Deny, DEFAULT),

        // corp-sites: *.corp.example for staff (nested: finance and engineering, and sre
        // through engineering). The domain itself does not match its wildcard.
        ("dave",  &[], "wiki.corp.example",      TCP, 443, Allow, "staff-intranet"),
        ("bob",   &[], "wiki.corp.example",      TCP, 80,  Allow, "staff-intranet"),
        ("alice", &[], "a.b.corp.example",       TCP, 443, Allow, "staff-intranet"),
        ("alice", &[], "wiki.corp.example.",     TCP, 443, Allow, "staff-intranet"),
        ("zoe",   &["sre"], "wiki.corp.example", TCP, 443, Allow, "staff-intranet"),
        ("fin-2", &["finance"], "hr.corp.example", TCP, 443, Allow, "staff-intranet"),
        ("bob",   &[], "corp.example",           TCP, 443, Deny, DEFAULT),
        ("bob",   &[], "corp.example.",          TCP, 443, Deny, DEFAULT),
        ("bob",   &[], "notcorp.example",        TCP, 443, Deny, DEFAULT),
        ("bob",   &[], "wikicorp.example",       TCP, 443, Deny, DEFAULT),
        ("bob",   &[], "corp.example.evil.test", TCP, 443, Deny, DEFAULT),
        ("bob",   &[], "example",                TCP, 443, Deny, DEFAULT),
        ("bob",   &[], "wiki.corp.example",      TCP, 22,  Deny, DEFAULT),
        ("bob",   &[], "wiki.corp.example",      UDP, 443, Deny, DEFAULT),
        ("mallory", &[], "wiki.corp.example",    TCP, 443, Deny, DEFAULT),
        ("erin",  &[], "wiki.corp.example",      TCP, 443, Deny, DEFAULT),

        // payroll: a hostname for finance and one named user.
        ("dave",  &[], "payroll.example.com", TCP, 443, Allow, "finance-payroll"),
        ("erin",  &[], "payroll.example.com", TCP, 443, Allow, "finance-payroll"),
        ("fin-2", &["finance"], "payroll.example.com", TCP, 443, Allow, "finance-payroll"),
        ("bob",   &[], "payroll.example.com", TCP, 443, Deny, DEFAULT),
        ("alice", &[], "payroll.example.com", TCP, 443, Deny, DEFAULT),
        ("dave",  &[], "payroll.example.com", TCP, 80,  Deny, DEFAULT),

        // Nothing names these.
        ("alice", &[], "192.168.1.1",   TCP, 443, Deny, DEFAULT),
        ("alice", &[], "2001:db8::1",   TCP, 443, Deny, DEFAULT),
        ("alice", &[], "::1",           TCP, 22,  Deny, DEFAULT),
        ("alice", &[], "intranet.test", TCP, 443, Deny, DEFAULT),
    ];
    run(&p, &at_now(rows));
}

#[test]
fn expiry_is_exact_to_the_second() {
    let p = policy();
    #[rustfmt::skip]
    let rows: &[(&str, &str, u16, i64, Verdict, &str)] = &[
        ("erin",  "10.20.1.5",  5432, NOW,                Allow, "erin-audit"),
        ("erin",  "10.20.1.5",  5432, ERIN_EXPIRES - 1,   Allow, "erin-audit"),
        ("erin",  "10.20.1.5",  5432, ERIN_EXPIRES,       Deny, DEFAULT),
        ("erin",  "10.20.1.5",  5432, ERIN_EXPIRES + 1,   Deny, DEFAULT),
        // erin's payroll rule does not expire.
        ("erin",  "payroll.example.com", 443, ERIN_EXPIRES + 1, Allow, "finance-payroll"),
        ("frank", "10.20.1.5",  5432, EARLY_2024,         Allow, "frank-db-migration"),
        ("frank", "10.20.1.5",  5432, FRANK_EXPIRES - 1,  Allow, "frank-db-migration"),
        ("frank", "10.20.1.5",  5432, FRANK_EXPIRES,      Deny, DEFAULT),
        ("frank", "10.50.0.10", 22,   EARLY_2024,         Allow, "frank-db-migration"),
        ("frank", "10.50.0.10", 22,   NOW,                Deny, DEFAULT),
        // Rules without expiry apply at any time.
        ("alice", "10.20.1.5",  5432, 0,                  Allow, "sre-production"),
        ("alice", "10.20.1.5",  5432, i64::MAX,           Allow, "sre-production"),
    ];
    let cases: Vec<Case> = rows
        .iter()
        .map(|&(user, dest, port, now, verdict, rule)| Case {
            user,
            cert_groups: &[],
            dest,
            proto: TCP,
            port,
            now,
            connector: None,
            verdict,
            rule,
        })
        .collect();
    run(&p, &cases);

    // A decision that rests on an expiring rule says until when it holds.
    let d =
        |user: &str, now: i64| p.decide(&p.subject(user, &[]), &flow("10.20.1.5", TCP, 5432), now);
    assert_eq!(d("erin", NOW).valid_until, Some(ERIN_EXPIRES));
    assert_eq!(d("frank", EARLY_2024).valid_until, Some(FRANK_EXPIRES));
    assert_eq!(d("alice", NOW).valid_until, None);
    assert_eq!(d("frank", NOW).valid_until, None);
}

/// (user, destination, protocol, port, connector deciding, verdict, deciding rule), at [`NOW`].
type ConnectorRow<'a> = (
    &'a str,
    &'a str,
    Proto,
    u16,
    Option<&'a str>,
    Verdict,
    &'a str,
);

#[test]
fn connectors_only_pass_their_own_resources() {
    let p = policy();
    #[rustfmt::skip]
    let rows: &[ConnectorRow] = &[
        ("bob",     "10.10.1.5",   TCP, 443,  Some("conn-1"), Allow, "engineering-apps"),
        ("bob",     "10.10.1.5",   TCP, 443,  Some("conn-2"), Deny, DEFAULT),
        ("bob",     "10.10.1.5",   TCP, 443,  Some("conn-3"), Deny, DEFAULT),
        ("bob",     "10.10.1.5",   TCP, 443,  None,           Allow, "engineering-apps"),
        ("bob",     "10.30.0.1",   TCP, 8000, Some("conn-2"), Allow, "engineering-apps"),
        ("bob",     "10.30.0.1",   TCP, 8000, Some("conn-1"), Deny, DEFAULT),
        ("bob",     "git.example.com", TCP, 22, Some("conn-2"), Allow, "engineering-apps"),
        ("bob",     "git.example.com", TCP, 22, Some("conn-1"), Deny, DEFAULT),
        ("dave",    "wiki.corp.example", TCP, 443, Some("conn-2"), Allow, "staff-intranet"),
        ("dave",    "wiki.corp.example", TCP, 443, Some("conn-1"), Deny, DEFAULT),
        ("bob",     "10.0.0.53",   UDP, 53,   Some("conn-1"), Allow, "everyone-dns"),
        ("bob",     "10.0.0.53",   UDP, 53,   Some("conn-2"), Deny, DEFAULT),
        ("alice",   "fd00:20::5",  TCP, 5432, Some("conn-1"), Allow, "sre-production"),
        ("alice",   "fd00:20::5",  TCP, 5432, Some("conn-2"), Deny, DEFAULT),
        ("alice",   "10.50.0.10",  ICMP, 0,   Some("conn-2"), Allow, "sre-production"),
        ("alice",   "10.50.0.10",  ICMP, 0,   Some("conn-1"), Deny, DEFAULT),
        ("mallory", "10.10.1.200", TCP, 443,  Some("conn-1"), Deny, "no-contractors-on-admin"),
        ("mallory", "10.10.1.200", TCP, 443,  Some("conn-2"), Deny, DEFAULT),
        ("alice",   "10.10.1.200", TCP, 443,  Some("conn-1"), Allow, "engineering-apps"),
    ];
    let cases: Vec<Case> = rows
        .iter()
        .map(
            |&(user, dest, proto, port, connector, verdict, rule)| Case {
                user,
                cert_groups: &[],
                dest,
                proto,
                port,
                now: NOW,
                connector,
                verdict,
                rule,
            },
        )
        .collect();
    run(&p, &cases);
}

#[test]
fn decisions_name_the_resource_they_matched() {
    let p = policy();
    let d = |user: &str, dest: &str, port: u16| {
        p.decide(&p.subject(user, &[]), &flow(dest, TCP, port), NOW)
    };
    let resource = |d: Decision| d.resource.map(|r| p.resource(r).name.clone());
    assert_eq!(
        resource(d("mallory", "10.10.1.200", 443)).as_deref(),
        Some("admin-panel")
    );
    assert_eq!(
        resource(d("bob", "10.10.1.200", 443)).as_deref(),
        Some("web-internal")
    );
    assert_eq!(
        resource(d("bob", "git.example.com", 22)).as_deref(),
        Some("git")
    );
    assert_eq!(resource(d("bob", "corp.example", 443)), None);
    let denied = d("mallory", "10.10.1.200", 443);
    assert_eq!(
        p.describe(&denied),
        r#"deny by rule "no-contractors-on-admin" (resource "admin-panel")"#
    );
    assert!(p
        .describe(&d("bob", "corp.example", 443))
        .starts_with("deny (default"));
}

/// DNS names compare without case: a flow's hostname matches whatever case it arrives in.
#[test]
fn hostnames_match_case_insensitively() {
    let p = policy();
    #[rustfmt::skip]
    let rows: &[Row] = &[
        ("bob",  &[], "Git.Example.COM",      TCP, 443, Allow, "engineering-apps"),
        ("dave", &[], "WIKI.Corp.Example",    TCP, 443, Allow, "staff-intranet"),
        ("dave", &[], "Payroll.Example.Com.", TCP, 443, Allow, "finance-payroll"),
    ];
    run(&p, &at_now(rows));
}

/// The DNS records of a resource name (other than the agent's synthetic A/AAAA) are visible to
/// those an allow rule lets reach it, through the connector that serves it.
#[test]
fn name_records_follow_allow_rules() {
    let p = policy();
    let seen = |user: &str, host: &str, conn: Option<&str>| {
        p.name_allowed(&p.subject(user, &[]), host, NOW, conn)
            .map(|r| p.resource(r).name.clone())
    };
    assert_eq!(seen("bob", "git.example.com", None).as_deref(), Some("git"));
    assert_eq!(
        seen("bob", "git.example.com", Some("conn-2")).as_deref(),
        Some("git")
    );
    // Served elsewhere, or not allowed, or not a resource: hidden.
    assert_eq!(seen("bob", "git.example.com", Some("conn-1")), None);
    assert_eq!(seen("mallory", "git.example.com", None), None);
    assert_eq!(seen("bob", "www.example.org", None), None);
    // Under a wildcard, but not the domain itself.
    assert_eq!(
        seen("dave", "wiki.corp.example", None).as_deref(),
        Some("corp-sites")
    );
    assert_eq!(seen("dave", "corp.example", None), None);
    // Allowed as a user rather than through a group.
    assert_eq!(
        seen("erin", "payroll.example.com", None).as_deref(),
        Some("payroll")
    );
}
