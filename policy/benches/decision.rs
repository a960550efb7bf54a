//! Decision cost at scale: a policy of 10,000 rules and 100,000 resource addresses (2,000
//! resources × 50: /32 and /24 IPv4, IPv6 hosts and /64s, hostnames and wildcard domains), 5,000
//! users in 300 groups (some nested).
//!
//! - `compile`: policy text → [`Policy`] (target < 200 ms), with the YAML parse and the
//!   line/column index alone for comparison;
//! - `decide`: one uncached [`Policy::decide`] for a user with a handful of groups (target
//!   < 1 µs), to a destination a rule allows, one inside a resource no rule gives the user, and
//!   one no resource names;
//! - `cache`: a hit in [`FlowCache`] keyed by (src IP, dst IP, proto, src port, dst port)
//!   (target < 50 ns); for comparison, the same lookup in a `HashMap` with an Fx-style hasher
//!   instead of the default SipHash (`FlowCache` takes no hasher parameter).
//!
//! Run: `cargo bench -p sluice-policy --bench decision -- --warm-up-time 1 --measurement-time 3`

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use sluice_policy::cache::FlowCache;
use sluice_policy::locate::Locations;
use sluice_policy::model::PolicyFile;
use sluice_policy::{compile, Flow, Policy, Proto, Verdict};

const USERS: usize = 5_000;
const GROUPS: usize = 300;
const MEMBERS_PER_GROUP: usize = 25;
const RESOURCES: usize = 2_000;
const RULES: usize = 10_000;

/// 2026-01-01T00:00:00Z.
const NOW: i64 = 1_767_225_600;

const PORTS: &[&str] = &[
    "tcp/443",
    "tcp/80",
    "tcp/22",
    "tcp/8000-8100",
    "udp/53",
    "icmp",
    "tcp/5432",
    "tcp/3306",
    "any",
];

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// FxHash-style word hasher, only to compare with `FlowCache`'s default SipHash.
#[derive(Default)]
struct Fx(u64);

impl Fx {
    fn add(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        bytes.iter().for_each(|b| self.add(u64::from(*b)));
    }
    fn write_u8(&mut self, x: u8) {
        self.add(u64::from(x))
    }
    fn write_u16(&mut self, x: u16) {
        self.add(u64::from(x))
    }
    fn write_u32(&mut self, x: u32) {
        self.add(u64::from(x))
    }
    fn write_u64(&mut self, x: u64) {
        self.add(x)
    }
    fn write_u128(&mut self, x: u128) {
        self.add(x as u64);
        self.add((x >> 64) as u64);
    }
    fn write_usize(&mut self, x: usize) {
        self.add(x as u64)
    }
    fn write_isize(&mut self, x: isize) {
        self.add(x as u64)
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

fn quoted(items: &[String]) -> String {
    let v: Vec<String> = items.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", v.join(", "))
}

/// The 50 addresses of resource `i`: 30 /32s, 10 /24s, 3 IPv6 hosts, 2 IPv6 /64s, 3 hostnames
/// and 2 wildcard domains.
fn addresses(i: usize) -> Vec<String> {
    let mut v = Vec::with_capacity(50);
    let (a, b) = (i / 250, i % 250);
    for k in 0..30 {
        v.push(format!("10.{a}.{b}.{}", k + 1));
    }
    for k in 0..10 {
        let j = i * 10 + k;
        v.push(format!("100.{}.{}.0/24", 64 + (j >> 8) % 64, j & 255));
    }
    for k in 0..3 {
        v.push(format!("fd00:{i:x}::{:x}", k + 1));
    }
    for k in 3..5 {
        v.push(format!("fd00:{i:x}:{k:x}::/64"));
    }
    for k in 0..3 {
        v.push(format!("h{k}.res{i}.corp.example"));
    }
    for k in 3..5 {
        v.push(format!("*.svc{k}.res{i}.corp.example"));
    }
    v
}

/// The policy text, and each resource's port specs (to aim flows at them).
fn policy_text() -> (String, Vec<Vec<&'static str>>) {
    let mut rng = Rng(0x5eed_1e55_c0ff_ee00);
    let mut s = String::with_capacity(4 << 20);
    s += "version: 1\ngroups:\n";
    for g in 0..GROUPS {
        let mut members: Vec<String> = (0..MEMBERS_PER_GROUP)
            .map(|_| format!("user{}", rng.below(USERS)))
            .collect();
        members.sort();
        members.dedup();
        s += &format!("  team-{g}:\n    members: {}\n", quoted(&members));
        if g + 1 < GROUPS && rng.chance(30) {
            let n = 1 + rng.below(2);
            let mut inc: Vec<String> = (0..n)
                .map(|_| format!("team-{}", g + 1 + rng.below(GROUPS - g - 1)))
                .collect();
            inc.sort();
            inc.dedup();
            s += &format!("    include: {}\n", quoted(&inc));
        }
    }
    s += "resources:\n";
    let mut ports = Vec::with_capacity(RESOURCES);
    for i in 0..RESOURCES {
        let n = 1 + rng.below(3);
        let mut p: Vec<&'static str> = (0..n).map(|_| PORTS[rng.below(PORTS.len())]).collect();
        p.dedup();
        s += &format!(
            "  - name: res{i}\n    connector: conn{}\n    addresses: {}\n    ports: {}\n",
            i % 20,
            quoted(&addresses(i)),
            quoted(&p.iter().map(|x| x.to_string()).collect::<Vec<_>>())
        );
        ports.push(p);
    }
    s += "rules:\n";
    for r in 0..RULES {
        let action = if rng.chance(92) { "allow" } else { "deny" };
        let who: Vec<String> = (0..1 + rng.below(3))
            .map(|_| match rng.below(100) {
                0..=1 => "everyone".to_string(),
                2..=24 => format!("user:user{}", rng.below(USERS)),
                _ => format!("group:team-{}", rng.below(GROUPS)),
            })
            .collect();
        let to: Vec<String> = (0..1 + rng.below(3))
            .map(|_| format!("res{}", rng.below(RESOURCES)))
            .collect();
        s += &format!(
            "  - name: rule-{r}\n    action: {action}\n    who: {}\n    to: {}\n",
            quoted(&who),
            quoted(&to)
        );
        match rng.below(100) {
            0..=4 => s += "    expires: \"2030-01-01T00:00:00Z\"\n",
            5 => s += "    expires: \"2025-06-30\"\n",
            _ => {}
        }
    }
    (s, ports)
}

fn tcp_or_udp(spec: &str) -> Option<(Proto, u16)> {
    match spec {
        "icmp" => Some((Proto::Icmp, 0)),
        "any" => Some((Proto::Tcp, 443)),
        s => {
            let (proto, port) = s.split_once('/')?;
            let port = port.split('-').next()?.parse().ok()?;
            Some((Proto::parse(proto)?, port))
        }
    }
}

struct Fixture {
    text: String,
    policy: Policy,
    allowed: Flow<'static>,
    denied_in_resource: Flow<'static>,
    no_resource: Flow<'static>,
}

fn fixture() -> Fixture {
    let t = Instant::now();
    let (text, ports) = policy_text();
    let generated = t.elapsed();
    let t = Instant::now();
    let compiled = match compile(&text, "bench.yaml", NOW) {
        Ok(c) => c,
        Err(e) => panic!("benchmark policy does not compile:\n{e}"),
    };
    eprintln!(
        "policy: {} bytes, {} rules, {} resources, {} warnings; generated in {generated:?}, compiled once in {:?}",
        text.len(),
        compiled.policy.rules().len(),
        compiled.policy.resources().len(),
        compiled.warnings.len(),
        t.elapsed()
    );
    let policy = compiled.policy;
    let subject = bench_subject(&policy);

    // Aim at the first /32 of each resource, on one of its ports, until the subject is
    // allowed (and note one resource the subject gets nothing from).
    let mut allowed = None;
    let mut denied_in_resource = None;
    for (i, p) in ports.iter().enumerate() {
        let Some((proto, port)) = tcp_or_udp(p[0]) else {
            continue;
        };
        let flow = Flow {
            dst: IpAddr::V4(Ipv4Addr::new(10, (i / 250) as u8, (i % 250) as u8, 1)),
            hostname: None,
            proto,
            port,
        };
        let d = policy.decide(&subject, &flow, NOW);
        match (d.verdict, d.rule) {
            (Verdict::Allow, _) if allowed.is_none() => allowed = Some(flow),
            (Verdict::Deny, None) if denied_in_resource.is_none() => {
                denied_in_resource = Some(flow)
            }
            _ => {}
        }
        if allowed.is_some() && denied_in_resource.is_some() {
            break;
        }
    }
    Fixture {
        text,
        policy,
        allowed: allowed.expect("no resource allowed to the bench subject"),
        denied_in_resource: denied_in_resource
            .expect("every resource decided for the bench subject"),
        no_resource: Flow {
            dst: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)),
            hostname: None,
            proto: Proto::Tcp,
            port: 443,
        },
    }
}

/// A user whose certificate lists five groups (nesting adds a few more).
fn bench_subject(policy: &Policy) -> sluice_policy::Subject {
    let groups: Vec<String> = [3, 41, 97, 150, 233]
        .iter()
        .map(|g| format!("team-{g}"))
        .collect();
    policy.subject("user1234", &groups)
}

fn benches(c: &mut Criterion) {
    let fx = fixture();
    let subject = bench_subject(&fx.policy);
    eprintln!(
        "subject: {} principals ({} groups)",
        subject.principals.len(),
        subject.groups.len()
    );

    let mut g = c.benchmark_group("decide");
    for (name, flow) in [
        ("allowed", &fx.allowed),
        ("denied_in_resource", &fx.denied_in_resource),
        ("no_resource", &fx.no_resource),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                fx.policy
                    .decide(black_box(&subject), black_box(flow), black_box(NOW))
            })
        });
    }
    g.finish();

    // Per-flow cache, warm with 10,000 flows; a hit is one hash lookup.
    type FlowKey = (IpAddr, IpAddr, u8, u16, u16);
    let mut cache: FlowCache<FlowKey> = FlowCache::new(65_536);
    let generation = 7;
    let src = |n: usize| IpAddr::V4(Ipv4Addr::new(100, 96, (n >> 8) as u8, n as u8));
    for n in 0..10_000usize {
        let key = (
            src(n % 500),
            fx.allowed.dst,
            6,
            40_000 + n as u16,
            fx.allowed.port,
        );
        cache.insert(
            key,
            generation,
            fx.policy.decide(&subject, &fx.allowed, NOW),
        );
    }
    let hit: FlowKey = (
        src(1234 % 500),
        fx.allowed.dst,
        6,
        40_000 + 1234,
        fx.allowed.port,
    );
    assert!(cache.get(&hit, generation, NOW).is_some());
    let mut fx_map: HashMap<FlowKey, (u64, sluice_policy::Decision), BuildHasherDefault<Fx>> =
        HashMap::default();
    for n in 0..10_000usize {
        let key = (
            src(n % 500),
            fx.allowed.dst,
            6,
            40_000 + n as u16,
            fx.allowed.port,
        );
        fx_map.insert(
            key,
            (generation, fx.policy.decide(&subject, &fx.allowed, NOW)),
        );
    }
    let mut g = c.benchmark_group("cache");
    g.bench_function("hit", |b| {
        b.iter(|| cache.get(black_box(&hit), black_box(generation), black_box(NOW)))
    });
    g.bench_function("hit_fxhash_hashmap_for_comparison", |b| {
        b.iter(|| {
            let now = black_box(NOW);
            match fx_map.get(black_box(&hit)) {
                Some((g, d))
                    if *g == black_box(generation) && d.valid_until.is_none_or(|t| now < t) =>
                {
                    Some(*d)
                }
                _ => None,
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("compile");
    g.sample_size(10);
    g.bench_function("policy_10k_rules_100k_addresses", |b| {
        b.iter(|| compile(black_box(&fx.text), "bench.yaml", NOW).map(|c| c.policy.rules().len()))
    });
    g.bench_function("serde_yaml_parse_only", |b| {
        b.iter(|| serde_yaml::from_str::<PolicyFile>(black_box(&fx.text)).map(|p| p.rules.len()))
    });
    g.bench_function("locations_index_only", |b| {
        b.iter(|| Locations::parse(black_box(&fx.text)).value("rules[0]"))
    });
    g.finish();
}

criterion_group!(decision, benches);
criterion_main!(decision);
