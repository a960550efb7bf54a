//! Property tests of the compiled matcher against a naive reference.
//!
//! Random valid policies over a small universe (users u0..u3, groups g0..g3 with acyclic
//! includes, resources r0..r4 over overlapping CIDRs v4/v6, single IPs, hostnames and wildcard
//! domains, a pool of port specs, allow/deny rules, some expiring) are rendered as YAML and
//! compiled with [`compile`]. A reference evaluator that scans every rule of the generated model
//! in file order — membership, addresses and ports checked directly, never through the compiled
//! tables — must agree with [`Policy::decide`] on verdict and deciding rule. Two monotonicity
//! properties follow: an extra allow rule never removes access, an extra deny rule never grants
//! it.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, subsequence};
use sluice_policy::{compile, Decision, Flow, Policy, Proto, Verdict};

/// Users u0..u3 can be named by a policy; flows also come from u4, whom no policy names.
const USERS: usize = 4;
/// Groups g0..g{n-1} are defined (n ≤ 4); certificates may also list g4 and g5, never defined.
const GROUPS: usize = 4;
const CERT_GROUPS: usize = 6;
const MAX_RESOURCES: usize = 5;
const MAX_RULES: usize = 12;

/// What an entry of `addresses` means, as the reference understands it.
#[derive(Debug, Clone, Copy)]
enum A {
    /// Network address and prefix length.
    Net(&'static str, u8),
    /// Exact hostname, lower case, no trailing dot.
    Host(&'static str),
    /// `*.SUFFIX`: names strictly below SUFFIX.
    Wild(&'static str),
}

/// Entries of `addresses` as an admin writes them, with their meaning.
const ADDRESSES: &[(&str, A)] = &[
    ("10.0.0.0/8", A::Net("10.0.0.0", 8)),
    ("10.1.0.0/16", A::Net("10.1.0.0", 16)),
    ("10.1.2.0/24", A::Net("10.1.2.0", 24)),
    ("10.1.2.128/25", A::Net("10.1.2.128", 25)),
    ("10.1.2.3", A::Net("10.1.2.3", 32)),
    ("10.1.2.3/32", A::Net("10.1.2.3", 32)),
    ("192.168.0.0/16", A::Net("192.168.0.0", 16)),
    ("192.168.1.7", A::Net("192.168.1.7", 32)),
    ("0.0.0.0/0", A::Net("0.0.0.0", 0)),
    ("fd00::/8", A::Net("fd00::", 8)),
    ("fd00:1::/32", A::Net("fd00:1::", 32)),
    ("fd00:1:2::/48", A::Net("fd00:1:2::", 48)),
    ("fd00:1:2::5", A::Net("fd00:1:2::5", 128)),
    ("2001:db8::/32", A::Net("2001:db8::", 32)),
    ("::/0", A::Net("::", 0)),
    ("corp.example", A::Host("corp.example")),
    ("web.corp.example", A::Host("web.corp.example")),
    ("Web.Corp.Example", A::Host("web.corp.example")),
    ("db.corp.example.", A::Host("db.corp.example")),
    ("a.b.corp.example", A::Host("a.b.corp.example")),
    ("other.example", A::Host("other.example")),
    ("*.corp.example", A::Wild("corp.example")),
    ("*.b.corp.example", A::Wild("b.corp.example")),
    ("*.Other.Example", A::Wild("other.example")),
];

/// What an entry of `ports` means.
#[derive(Debug, Clone, Copy)]
enum P {
    Tcp(u16, u16),
    Udp(u16, u16),
    Icmp,
    Any,
}

const PORTS: &[(&str, P)] = &[
    ("tcp/80", P::Tcp(80, 80)),
    ("tcp/22", P::Tcp(22, 22)),
    ("tcp/443", P::Tcp(443, 443)),
    ("tcp/8000-8100", P::Tcp(8000, 8100)),
    ("tcp/8080", P::Tcp(8080, 8080)),
    ("udp/53", P::Udp(53, 53)),
    ("udp/50-60", P::Udp(50, 60)),
    ("icmp", P::Icmp),
    ("tcp", P::Tcp(1, 65535)),
    ("udp", P::Udp(1, 65535)),
    ("any", P::Any),
];

/// Expiry times as written, with their Unix time (computed independently, by `date -u`).
const EXPIRIES: &[(&str, i64)] = &[
    ("2027-01-15T08:00:00Z", 1_800_000_000),
    ("2027-01-15T10:00:00+02:00", 1_800_000_000),
    ("2027-01-15T08:00:01Z", 1_800_000_001),
    ("2027-01-15T02:00:01-06:00", 1_800_000_001),
    ("2027-01-14T23:59:59Z", 1_799_971_199),
    ("2027-01-16", 1_800_057_600),
    ("2026-06-01T00:00:00Z", 1_780_272_000),
];

/// The `now` passed to `compile` (used there only for warnings).
const COMPILE_NOW: i64 = 1_800_000_000;

/// Flow destinations: inside, at the edges of and outside the pool's networks.
const DSTS: &[&str] = &[
    "10.1.2.3",
    "10.1.2.4",
    "10.1.2.127",
    "10.1.2.128",
    "10.1.2.255",
    "10.1.3.1",
    "10.200.0.1",
    "11.0.0.1",
    "192.168.1.7",
    "192.168.2.1",
    "198.51.100.7",
    "::ffff:10.1.2.3",
    "::ffff:192.168.1.7",
    "::ffff:11.0.0.1",
    "fd00:1:2::5",
    "fd00:1:2::6",
    "fd00:1:3::1",
    "fd12::1",
    "fe80::1",
    "2001:db8::1",
    "2001:db9::1",
    "::1",
];

/// Flow hostnames (lower case: callers lower-case names before deciding).
const HOSTS: &[&str] = &[
    "corp.example",
    "corp.example.",
    "web.corp.example",
    "web.corp.example.",
    "db.corp.example",
    "b.corp.example",
    "a.b.corp.example",
    "x.a.b.corp.example",
    "evilcorp.example",
    "corp.example.evil",
    "other.example",
    "x.other.example",
    "example",
];

const FLOW_PORTS: &[u16] = &[
    1, 22, 50, 53, 60, 61, 80, 81, 443, 7999, 8000, 8050, 8080, 8100, 8101, 65535,
];

#[derive(Debug, Clone)]
struct GroupM {
    members: Vec<usize>,
    /// Only groups of higher index, so includes are acyclic.
    include: Vec<usize>,
}

#[derive(Debug, Clone)]
struct ResourceM {
    addresses: Vec<usize>,
    ports: Vec<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WhoM {
    Everyone,
    Group(usize),
    User(usize),
}

#[derive(Debug, Clone)]
struct RuleM {
    allow: bool,
    who: Vec<WhoM>,
    to: Vec<usize>,
    expires: Option<usize>,
}

#[derive(Debug, Clone)]
struct Model {
    groups: Vec<GroupM>,
    resources: Vec<ResourceM>,
    rules: Vec<RuleM>,
}

#[derive(Debug, Clone)]
struct FlowM {
    user: usize,
    cert_groups: Vec<usize>,
    dst: IpAddr,
    host: Option<String>,
    proto: Proto,
    port: u16,
    now: i64,
}

// ---------------------------------------------------------------------------------------------
// Generators

fn group(g: usize, n_groups: usize) -> impl Strategy<Value = GroupM> {
    let higher: Vec<usize> = (g + 1..n_groups).collect();
    let n_higher = higher.len();
    (
        subsequence((0..USERS).collect::<Vec<_>>(), 0..=USERS),
        subsequence(higher, 0..=n_higher),
    )
        .prop_map(|(members, include)| GroupM { members, include })
}

fn resource() -> impl Strategy<Value = ResourceM> {
    (vec(0..ADDRESSES.len(), 1..=4), vec(0..PORTS.len(), 1..=3))
        .prop_map(|(addresses, ports)| ResourceM { addresses, ports })
}

fn who(n_groups: usize) -> BoxedStrategy<WhoM> {
    if n_groups == 0 {
        prop_oneof![1 => Just(WhoM::Everyone), 3 => (0..USERS).prop_map(WhoM::User)].boxed()
    } else {
        prop_oneof![
            1 => Just(WhoM::Everyone),
            3 => (0..n_groups).prop_map(WhoM::Group),
            2 => (0..USERS).prop_map(WhoM::User),
        ]
        .boxed()
    }
}

fn rule(n_groups: usize, n_resources: usize) -> impl Strategy<Value = RuleM> {
    (
        prop::bool::weighted(0.7),
        vec(who(n_groups), 1..=3),
        vec(0..n_resources, 1..=3),
        prop::option::weighted(0.3, 0..EXPIRIES.len()),
    )
        .prop_map(|(allow, who, to, expires)| RuleM {
            allow,
            who,
            to,
            expires,
        })
}

fn model() -> impl Strategy<Value = Model> {
    (0..=GROUPS, 1..=MAX_RESOURCES).prop_flat_map(|(ng, nr)| {
        let groups: Vec<_> = (0..ng).map(|g| group(g, ng)).collect();
        (
            groups,
            vec(resource(), nr),
            vec(rule(ng, nr), 0..=MAX_RULES),
        )
            .prop_map(|(groups, resources, rules)| Model {
                groups,
                resources,
                rules,
            })
    })
}

fn dst() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        4 => select(DSTS).prop_map(|s| s.parse::<IpAddr>().unwrap()),
        1 => (0u32..1 << 24).prop_map(|x| IpAddr::V4(Ipv4Addr::from((10 << 24) | x))),
        1 => any::<u32>().prop_map(|x| IpAddr::V4(Ipv4Addr::from(x))),
        1 => any::<u32>().prop_map(|x| IpAddr::V6(Ipv6Addr::from((0xffffu128 << 32) | u128::from(x)))),
        1 => any::<u128>().prop_map(|x| IpAddr::V6(Ipv6Addr::from((0xfd00_0001u128 << 96) | (x >> 32)))),
        1 => any::<u128>().prop_map(|x| IpAddr::V6(Ipv6Addr::from(x))),
    ]
}

fn now() -> impl Strategy<Value = i64> {
    prop_oneof![
        3 => (0..EXPIRIES.len(), -1i64..=1).prop_map(|(i, d)| EXPIRIES[i].1 + d),
        1 => 1_780_000_000i64..1_810_000_000,
    ]
}

fn flow() -> impl Strategy<Value = FlowM> {
    (
        0..=USERS,
        vec(0..CERT_GROUPS, 0..=3),
        dst(),
        prop::option::weighted(0.5, select(HOSTS).prop_map(String::from)),
        select(&[Proto::Tcp, Proto::Udp, Proto::Icmp][..]),
        prop_oneof![3 => select(FLOW_PORTS), 1 => 1u16..=65535],
        now(),
    )
        .prop_map(|(user, cert_groups, dst, host, proto, port, now)| FlowM {
            user,
            cert_groups,
            dst,
            host,
            proto,
            port,
            now,
        })
}

/// A flow aimed at one address and one port spec of one of the model's resources, so that
/// rules decide often (random flows mostly fall to the default deny).
fn aimed_flow(m: &Model) -> impl Strategy<Value = FlowM> {
    let resources = m.resources.clone();
    (
        flow(),
        any::<prop::sample::Index>(),
        any::<prop::sample::Index>(),
        any::<prop::sample::Index>(),
        any::<u128>(),
        any::<bool>(),
        select(&["", "x.", "a.b."][..]),
    )
        .prop_map(move |(mut f, r, a, p, bits, variant, label)| {
            let r = &resources[r.index(resources.len())];
            match ADDRESSES[r.addresses[a.index(r.addresses.len())]].1 {
                A::Net(net, len) => {
                    // The network address with random host bits.
                    let (width, n) = match net.parse::<IpAddr>().unwrap() {
                        IpAddr::V4(v4) => (32, u128::from(u32::from(v4))),
                        IpAddr::V6(v6) => (128, u128::from(v6)),
                    };
                    let host_bits = u32::from(width - len);
                    let host_mask = if host_bits == 0 {
                        0
                    } else {
                        u128::MAX >> (128 - host_bits)
                    };
                    let x = n | (bits & host_mask);
                    f.dst = if width == 32 {
                        let v4 = Ipv4Addr::from(x as u32);
                        // Sometimes as IPv4-mapped IPv6.
                        if variant {
                            IpAddr::V6(v4.to_ipv6_mapped())
                        } else {
                            IpAddr::V4(v4)
                        }
                    } else {
                        IpAddr::V6(Ipv6Addr::from(x))
                    };
                }
                A::Host(h) => {
                    f.host = Some(if variant {
                        h.to_string()
                    } else {
                        format!("{h}.")
                    });
                }
                A::Wild(suffix) => {
                    // Below the suffix, or (with no label) the suffix itself, which must not match.
                    f.host = Some(format!("{label}{suffix}"));
                }
            }
            match PORTS[r.ports[p.index(r.ports.len())]].1 {
                P::Tcp(lo, hi) => {
                    f.proto = Proto::Tcp;
                    f.port = lo + (bits as u16) % (hi - lo + 1).max(1);
                }
                P::Udp(lo, hi) => {
                    f.proto = Proto::Udp;
                    f.port = lo + (bits as u16) % (hi - lo + 1).max(1);
                }
                P::Icmp => f.proto = Proto::Icmp,
                P::Any => {}
            }
            f
        })
}

/// Flows for a model: half random, half aimed at its resources.
fn flows(m: &Model) -> impl Strategy<Value = Vec<FlowM>> {
    vec(prop_oneof![flow(), aimed_flow(m)], 1..64)
}

fn model_and_flows() -> impl Strategy<Value = (Model, Vec<FlowM>)> {
    model().prop_flat_map(|m| {
        let f = flows(&m);
        (Just(m), f)
    })
}

/// A model, one more rule for it, where to insert that rule, and flows.
fn model_extra_rule_and_flows() -> impl Strategy<Value = (Model, RuleM, usize, Vec<FlowM>)> {
    model().prop_flat_map(|m| {
        let (ng, nr, n_rules) = (m.groups.len(), m.resources.len(), m.rules.len());
        let f = flows(&m);
        (Just(m), rule(ng, nr), 0..=n_rules, f)
    })
}

// ---------------------------------------------------------------------------------------------
// Rendering

fn quoted(items: impl IntoIterator<Item = String>) -> String {
    let v: Vec<String> = items.into_iter().map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", v.join(", "))
}

fn who_text(w: WhoM) -> String {
    match w {
        WhoM::Everyone => "everyone".into(),
        WhoM::Group(g) => format!("group:g{g}"),
        WhoM::User(u) => format!("user:u{u}"),
    }
}

fn render(m: &Model) -> String {
    let mut s = String::from("version: 1\n");
    if !m.groups.is_empty() {
        s += "groups:\n";
        for (g, def) in m.groups.iter().enumerate() {
            s += &format!("  g{g}:\n");
            s += &format!(
                "    members: {}\n",
                quoted(def.members.iter().map(|u| format!("u{u}")))
            );
            if !def.include.is_empty() {
                s += &format!(
                    "    include: {}\n",
                    quoted(def.include.iter().map(|h| format!("g{h}")))
                );
            }
        }
    }
    s += "resources:\n";
    for (i, r) in m.resources.iter().enumerate() {
        s += &format!("  - name: r{i}\n    connector: c{}\n", i % 2);
        s += &format!(
            "    addresses: {}\n",
            quoted(r.addresses.iter().map(|a| ADDRESSES[*a].0.to_string()))
        );
        s += &format!(
            "    ports: {}\n",
            quoted(r.ports.iter().map(|p| PORTS[*p].0.to_string()))
        );
    }
    if m.rules.is_empty() {
        s += "rules: []\n";
    } else {
        s += "rules:\n";
        for (i, r) in m.rules.iter().enumerate() {
            // Some rules are named, the others get the default `rule N`.
            if i % 3 == 0 {
                s += "  -\n";
            } else {
                s += &format!("  - name: rule-{i}\n");
            }
            s += &format!("    action: {}\n", if r.allow { "allow" } else { "deny" });
            s += &format!("    who: {}\n", quoted(r.who.iter().map(|w| who_text(*w))));
            s += &format!("    to: {}\n", quoted(r.to.iter().map(|t| format!("r{t}"))));
            if let Some(e) = r.expires {
                s += &format!("    expires: \"{}\"\n", EXPIRIES[e].0);
            }
        }
    }
    s
}

fn compiled(text: &str) -> Result<Policy, TestCaseError> {
    match compile(text, "prop.yaml", COMPILE_NOW) {
        Ok(c) => Ok(c.policy),
        Err(e) => Err(TestCaseError::fail(format!(
            "generated policy does not compile:\n{e}\n--- policy ---\n{text}"
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Reference evaluator: straight from the model, one rule at a time.

/// The groups `user` is in: listed as a member or named by the certificate (defined groups
/// only), then every group that includes a group the user is in, to a fixpoint.
fn ref_groups(m: &Model, user: usize, cert_groups: &[usize]) -> BTreeSet<usize> {
    let mut set: BTreeSet<usize> = (0..m.groups.len())
        .filter(|g| m.groups[*g].members.contains(&user) || cert_groups.contains(g))
        .collect();
    loop {
        let more: Vec<usize> = (0..m.groups.len())
            .filter(|g| !set.contains(g) && m.groups[*g].include.iter().any(|h| set.contains(h)))
            .collect();
        if more.is_empty() {
            return set;
        }
        set.extend(more);
    }
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) is the IPv4 address; returns (is_v6, 128-bit value).
fn ref_canon(ip: IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(v4) => (false, u128::from(u32::from(v4))),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if s[..5] == [0, 0, 0, 0, 0] && s[5] == 0xffff {
                (false, (u128::from(s[6]) << 16) | u128::from(s[7]))
            } else {
                (true, u128::from(v6))
            }
        }
    }
}

fn ref_in_net(dst: IpAddr, net: &str, len: u8) -> bool {
    let net: IpAddr = net.parse().unwrap();
    let (dst_v6, d) = ref_canon(dst);
    let (net_v6, n, width) = match net {
        IpAddr::V4(v4) => (false, u128::from(u32::from(v4)), 32u32),
        IpAddr::V6(v6) => (true, u128::from(v6), 128),
    };
    if dst_v6 != net_v6 {
        return false;
    }
    // Compare the top `len` bits, one at a time.
    (0..u32::from(len)).all(|i| {
        let bit = width - 1 - i;
        (d >> bit) & 1 == (n >> bit) & 1
    })
}

fn ref_address_matches(a: A, dst: IpAddr, host: Option<&str>) -> bool {
    let host = host.map(|h| h.strip_suffix('.').unwrap_or(h));
    match a {
        A::Net(net, len) => ref_in_net(dst, net, len),
        A::Host(h) => host == Some(h),
        A::Wild(suffix) => host.is_some_and(|h| {
            h.len() > suffix.len() + 1
                && h.ends_with(suffix)
                && h.as_bytes()[h.len() - suffix.len() - 1] == b'.'
        }),
    }
}

fn ref_port_matches(p: P, proto: Proto, port: u16) -> bool {
    match (p, proto) {
        (P::Tcp(lo, hi), Proto::Tcp) | (P::Udp(lo, hi), Proto::Udp) => lo <= port && port <= hi,
        (P::Icmp, Proto::Icmp) | (P::Any, Proto::Icmp) => true,
        (P::Any, _) => port >= 1,
        _ => false,
    }
}

fn ref_resource_matches(r: &ResourceM, f: &FlowM) -> bool {
    r.addresses
        .iter()
        .any(|a| ref_address_matches(ADDRESSES[*a].1, f.dst, f.host.as_deref()))
        && r.ports
            .iter()
            .any(|p| ref_port_matches(PORTS[*p].1, f.proto, f.port))
}

/// (verdict, deciding rule): the first matching unexpired deny, else the first matching
/// unexpired allow, else the default deny.
fn reference(m: &Model, f: &FlowM, now: i64) -> (Verdict, Option<usize>) {
    let groups = ref_groups(m, f.user, &f.cert_groups);
    let mut first_allow = None;
    for (i, r) in m.rules.iter().enumerate() {
        if r.expires.is_some_and(|e| now >= EXPIRIES[e].1) {
            continue;
        }
        let who = r.who.iter().any(|w| match *w {
            WhoM::Everyone => true,
            WhoM::Group(g) => groups.contains(&g),
            WhoM::User(u) => u == f.user,
        });
        if !who
            || !r
                .to
                .iter()
                .any(|t| ref_resource_matches(&m.resources[*t], f))
        {
            continue;
        }
        if !r.allow {
            return (Verdict::Deny, Some(i));
        }
        first_allow.get_or_insert(i);
    }
    match first_allow {
        Some(i) => (Verdict::Allow, Some(i)),
        None => (Verdict::Deny, None),
    }
}

// ---------------------------------------------------------------------------------------------
// The compiled side

fn cert_names(f: &FlowM) -> Vec<String> {
    f.cert_groups.iter().map(|g| format!("g{g}")).collect()
}

fn decide(p: &Policy, f: &FlowM) -> Decision {
    let subject = p.subject(&format!("u{}", f.user), &cert_names(f));
    let flow = Flow {
        dst: f.dst,
        hostname: f.host.as_deref(),
        proto: f.proto,
        port: f.port,
    };
    p.decide(&subject, &flow, f.now)
}

fn check_flow(m: &Model, p: &Policy, f: &FlowM, text: &str) -> Result<(), TestCaseError> {
    let ctx = || format!("\nflow: {f:?}\n--- policy ---\n{text}");

    let want_groups: BTreeSet<String> = ref_groups(m, f.user, &f.cert_groups)
        .into_iter()
        .map(|g| format!("g{g}"))
        .collect();
    let subject = p.subject(&format!("u{}", f.user), &cert_names(f));
    let got_groups: BTreeSet<String> = subject.groups.iter().cloned().collect();
    prop_assert_eq!(&got_groups, &want_groups, "subject groups differ{}", ctx());

    let d = decide(p, f);
    let (verdict, rule) = reference(m, f, f.now);
    let got_rule = d.rule.map(|r| r as usize);
    prop_assert_eq!(
        (d.verdict, got_rule),
        (verdict, rule),
        "decision differs{}",
        ctx()
    );

    // The reported resource is one the deciding rule names and the flow matches.
    match (rule, d.resource) {
        (None, res) => prop_assert_eq!(res, None, "default deny names a resource{}", ctx()),
        (Some(i), Some(res)) => {
            let res = res as usize;
            prop_assert!(
                m.rules[i].to.contains(&res) && ref_resource_matches(&m.resources[res], f),
                "rule {} reported through resource r{}, which it does not name or the flow does not match{}",
                i,
                res,
                ctx()
            );
        }
        (Some(i), None) => prop_assert!(false, "rule {} decided without a resource{}", i, ctx()),
    }

    // valid_until: the decision holds (same verdict and rule) until then.
    if let Some(v) = d.valid_until {
        prop_assert!(v > f.now, "valid_until {} is not after now{}", v, ctx());
    }
    for e in m
        .rules
        .iter()
        .filter_map(|r| r.expires)
        .map(|e| EXPIRIES[e].1)
    {
        if e > f.now && d.valid_until.is_none_or(|v| e < v) {
            prop_assert_eq!(
                reference(m, f, e),
                (verdict, rule),
                "decision changes at {} but valid_until is {:?}{}",
                e,
                d.valid_until,
                ctx()
            );
        }
    }
    Ok(())
}

/// Whether adding `extra` at `pos` may change a flow's verdict from `from` (compiled matcher
/// on both policies).
fn check_monotone(
    m: &Model,
    extra: &RuleM,
    pos: usize,
    flows: &[FlowM],
    from: Verdict,
) -> Result<(), TestCaseError> {
    let text = render(m);
    let before = compiled(&text)?;
    let mut m2 = m.clone();
    m2.rules.insert(pos, extra.clone());
    let text2 = render(&m2);
    let after = compiled(&text2)?;
    for f in flows {
        let (b, a) = (decide(&before, f), decide(&after, f));
        if b.verdict == from {
            prop_assert_eq!(
                a.verdict,
                from,
                "adding rule at {} changed a {:?}: {:?} -> {:?}\nflow: {:?}\n--- before ---\n{}--- after ---\n{}",
                pos,
                from,
                b,
                a,
                f,
                text,
                text2
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn compiled_matcher_agrees_with_reference((m, flows) in model_and_flows()) {
        let text = render(&m);
        let p = compiled(&text)?;
        for f in &flows {
            check_flow(&m, &p, f, &text)?;
        }
    }

    #[test]
    fn adding_an_allow_never_removes_access(
        (m, mut extra, pos, flows) in model_extra_rule_and_flows(),
    ) {
        extra.allow = true;
        check_monotone(&m, &extra, pos, &flows, Verdict::Allow)?;
    }

    #[test]
    fn adding_a_deny_never_grants_access(
        (m, mut extra, pos, flows) in model_extra_rule_and_flows(),
    ) {
        extra.allow = false;
        check_monotone(&m, &extra, pos, &flows, Verdict::Deny)?;
    }
}
