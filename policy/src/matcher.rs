//! The compiled policy: a flow decision is a few table lookups, never a scan of the rules.
//!
//! - addresses: one hash table per prefix length in use (longest first), for IPv4 and IPv6;
//! - hostnames: an exact-name table and a wildcard-suffix table walked label by label;
//! - ports: sorted ranges per protocol, binary-searched;
//! - rules: per resource, the allow and deny rules indexed by principal (everyone, a user, a
//!   group), so the cost depends on how many principals a user has, not on how many rules exist.
//!
//! Precedence is the same everywhere: a matching, unexpired deny beats any allow; without a
//! matching rule the flow is denied (default deny). Among rules of the winning kind the first in
//! the file is reported.

use rustc_hash::FxHashMap as HashMap;
use std::net::IpAddr;

use crate::model::Action;

pub type ResourceId = u32;
pub type RuleId = u32;

/// Transport protocol of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        }
    }

    pub fn parse(s: &str) -> Option<Proto> {
        match s {
            "tcp" => Some(Proto::Tcp),
            "udp" => Some(Proto::Udp),
            "icmp" => Some(Proto::Icmp),
            _ => None,
        }
    }
}

/// What a decision looks at: destination address, the hostname when DNS told us one, protocol
/// and destination port (ignored for ICMP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow<'a> {
    pub dst: IpAddr,
    pub hostname: Option<&'a str>,
    pub proto: Proto,
    pub port: u16,
}

/// Sorted, non-overlapping inclusive port ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortRanges(Vec<(u16, u16)>);

impl PortRanges {
    pub fn from_ranges(mut r: Vec<(u16, u16)>) -> Self {
        r.sort_unstable();
        let mut out: Vec<(u16, u16)> = Vec::with_capacity(r.len());
        for (lo, hi) in r {
            match out.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => out.push((lo, hi)),
            }
        }
        PortRanges(out)
    }

    pub fn contains(&self, port: u16) -> bool {
        let i = self.0.partition_point(|&(lo, _)| lo <= port);
        i > 0 && port <= self.0[i - 1].1
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSpec {
    pub tcp: PortRanges,
    pub udp: PortRanges,
    pub icmp: bool,
}

impl PortSpec {
    pub fn allows(&self, proto: Proto, port: u16) -> bool {
        match proto {
            Proto::Tcp => self.tcp.contains(port),
            Proto::Udp => self.udp.contains(port),
            Proto::Icmp => self.icmp,
        }
    }
}

/// Prefix → resources, one hash table per prefix length, longest first.
#[derive(Debug, Default)]
pub struct PrefixTable {
    /// (prefix length, masked address → resources)
    by_len: Vec<(u8, HashMap<u128, Vec<ResourceId>>)>,
}

fn mask(addr: u128, len: u8, bits: u8) -> u128 {
    if len == 0 {
        return 0;
    }
    let shift = u32::from(bits - len);
    let m = if bits == 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    };
    (addr >> shift << shift) & m
}

impl PrefixTable {
    pub fn insert(&mut self, addr: u128, len: u8, bits: u8, r: ResourceId) {
        let key = mask(addr, len, bits);
        let i = match self.by_len.iter().position(|(l, _)| *l == len) {
            Some(i) => i,
            None => {
                self.by_len.push((len, HashMap::default()));
                self.by_len.sort_by_key(|e| std::cmp::Reverse(e.0));
                self.by_len.iter().position(|(l, _)| *l == len).unwrap_or(0)
            }
        };
        let v = self.by_len[i].1.entry(key).or_default();
        if !v.contains(&r) {
            v.push(r);
        }
    }

    pub fn for_each(&self, addr: u128, bits: u8, mut f: impl FnMut(ResourceId)) {
        for (len, table) in &self.by_len {
            if let Some(rs) = table.get(&mask(addr, *len, bits)) {
                for r in rs {
                    f(*r);
                }
            }
        }
    }
}

pub fn v4_bits(ip: std::net::Ipv4Addr) -> u128 {
    u128::from(u32::from(ip))
}

pub fn v6_bits(ip: std::net::Ipv6Addr) -> u128 {
    u128::from(ip)
}

#[derive(Debug, Clone)]
pub struct Resource {
    pub name: String,
    pub connector: String,
    pub ports: PortSpec,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub action: Action,
    /// Seconds since the Unix epoch after which the rule no longer applies.
    pub expires: Option<i64>,
}

/// Who a rule names, packed: 0 = everyone, 1<<32|id = user, 2<<32|id = group.
pub type Principal = u64;
pub const EVERYONE: Principal = 0;
pub fn user_principal(id: u32) -> Principal {
    (1 << 32) | u64::from(id)
}
pub fn group_principal(id: u32) -> Principal {
    (2 << 32) | u64::from(id)
}

/// A user resolved against a policy: every principal a rule could name them by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub user: String,
    pub principals: Vec<Principal>,
    /// Names of the policy groups the user is in (directly, by certificate, or nested).
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// The rule that decided, or None for the default deny.
    pub rule: Option<RuleId>,
    /// The resource the deciding rule was matched through.
    pub resource: Option<ResourceId>,
    /// The decision may change at this time (a deciding or overriding rule expires).
    pub valid_until: Option<i64>,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }
}

#[derive(Debug, Default)]
pub struct Policy {
    pub(crate) resources: Vec<Resource>,
    pub(crate) rules: Vec<Rule>,
    pub(crate) v4: PrefixTable,
    pub(crate) v6: PrefixTable,
    pub(crate) names: HashMap<String, Vec<ResourceId>>,
    /// Wildcard `*.corp.example` stored as `corp.example`.
    pub(crate) wildcards: HashMap<String, Vec<ResourceId>>,
    pub(crate) groups: Vec<String>,
    pub(crate) group_ids: HashMap<String, u32>,
    /// For each group, itself and every group that includes it, transitively.
    pub(crate) group_closure: Vec<Vec<u32>>,
    /// Users listed as members, with the groups that list them.
    pub(crate) members: HashMap<String, Vec<u32>>,
    pub(crate) users: HashMap<String, u32>,
    /// Per resource: principal → rules (file order) that name it.
    pub(crate) allow: Vec<HashMap<Principal, Vec<RuleId>>>,
    pub(crate) deny: Vec<HashMap<Principal, Vec<RuleId>>>,
    /// Every CIDR of every resource, for routing.
    pub(crate) networks: Vec<(ipnet::IpNet, ResourceId)>,
}

impl Policy {
    pub fn resource(&self, id: ResourceId) -> &Resource {
        &self.resources[id as usize]
    }

    pub fn rule(&self, id: RuleId) -> &Rule {
        &self.rules[id as usize]
    }

    pub fn resources(&self) -> &[Resource] {
        &self.resources
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Every network a resource names, with its resource (agents route these to the tunnel).
    pub fn networks(&self) -> &[(ipnet::IpNet, ResourceId)] {
        &self.networks
    }

    /// Resolves a user: certificate name and the groups its certificate lists. Certificate
    /// groups the policy does not define are ignored (rules can only name defined groups).
    pub fn subject(&self, user: &str, cert_groups: &[String]) -> Subject {
        let mut gids: Vec<u32> = Vec::new();
        let direct = cert_groups
            .iter()
            .filter_map(|g| self.group_ids.get(g).copied())
            .chain(self.members.get(user).into_iter().flatten().copied());
        for g in direct {
            for up in &self.group_closure[g as usize] {
                if !gids.contains(up) {
                    gids.push(*up);
                }
            }
        }
        gids.sort_unstable();
        let mut principals = vec![EVERYONE];
        if let Some(u) = self.users.get(user) {
            principals.push(user_principal(*u));
        }
        principals.extend(gids.iter().map(|g| group_principal(*g)));
        Subject {
            user: user.to_string(),
            principals,
            groups: gids
                .iter()
                .map(|g| self.groups[*g as usize].clone())
                .collect(),
        }
    }

    /// The DNS names resources use: exact hostnames and wildcard domains (without `*.`), for
    /// routing those domains' queries to the agent.
    pub fn dns_domains(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .names
            .keys()
            .chain(self.wildcards.keys())
            .cloned()
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Whether some resource names `host` (exactly or under a wildcard domain): the agent answers
    /// DNS for such names itself. `host` is lowercase, without the trailing dot.
    pub fn has_hostname(&self, host: &str) -> bool {
        let mut found = false;
        self.for_each_named(host, |_| found = true);
        found
    }

    /// Calls `f` for each resource whose addresses and ports match the flow.
    pub fn for_each_resource(&self, flow: &Flow<'_>, mut f: impl FnMut(ResourceId)) {
        let mut check = |r: ResourceId| {
            if self.resources[r as usize]
                .ports
                .allows(flow.proto, flow.port)
            {
                f(r)
            }
        };
        match flow.dst {
            IpAddr::V4(ip) => self.v4.for_each(v4_bits(ip), 32, &mut check),
            IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                Some(v4) => self.v4.for_each(v4_bits(v4), 32, &mut check),
                None => self.v6.for_each(v6_bits(ip), 128, &mut check),
            },
        }
        if let Some(host) = flow.hostname {
            let host = host.trim_end_matches('.');
            // Names are stored lowercase; DNS names compare without case.
            let lowered;
            let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
                lowered = host.to_ascii_lowercase();
                lowered.as_str()
            } else {
                host
            };
            self.for_each_named(host, check);
        }
    }

    /// Calls `f` for each resource that names `host` (exactly or under a wildcard domain),
    /// whatever its ports. `host` is lowercase, without the trailing dot.
    fn for_each_named(&self, host: &str, mut f: impl FnMut(ResourceId)) {
        if let Some(rs) = self.names.get(host) {
            rs.iter().for_each(|r| f(*r));
        }
        let mut rest = host;
        while let Some(i) = rest.find('.') {
            rest = &rest[i + 1..];
            if let Some(rs) = self.wildcards.get(rest) {
                rs.iter().for_each(|r| f(*r));
            }
        }
    }

    /// The resource through which `subject` may see the DNS records of `host` (other than the
    /// synthetic A/AAAA): one naming it with an unexpired allow rule for the subject, on any
    /// port, served by `connector` when given. Records of a private zone are private data, so
    /// they follow the allow rules; deny rules act on flows (a deny on some ports does not hide
    /// a name). `host` is lowercase, without the trailing dot.
    pub fn name_allowed(
        &self,
        subject: &Subject,
        host: &str,
        now: i64,
        connector: Option<&str>,
    ) -> Option<ResourceId> {
        let mut best: Option<(RuleId, ResourceId)> = None;
        self.for_each_named(host, |r| {
            if connector.is_some_and(|c| self.resources[r as usize].connector != c) {
                return;
            }
            for p in &subject.principals {
                let Some(rules) = self.allow[r as usize].get(p) else {
                    continue;
                };
                let live = rules
                    .iter()
                    .find(|&&rule| self.rules[rule as usize].expires.is_none_or(|e| e > now));
                if let Some(&rule) = live {
                    if best.is_none_or(|(b, _)| rule < b) {
                        best = Some((rule, r));
                    }
                }
            }
        });
        best.map(|(_, r)| r)
    }

    /// Decides a flow for a subject at `now` (Unix seconds).
    pub fn decide(&self, subject: &Subject, flow: &Flow<'_>, now: i64) -> Decision {
        self.decide_for(subject, flow, now, None)
    }

    /// Like [`Policy::decide`], counting only resources served by `connector` (a connector
    /// must not pass traffic for resources it does not serve).
    pub fn decide_for(
        &self,
        subject: &Subject,
        flow: &Flow<'_>,
        now: i64,
        connector: Option<&str>,
    ) -> Decision {
        let mut deny: Option<(RuleId, ResourceId)> = None;
        let mut allow: Option<(RuleId, ResourceId)> = None;
        let mut valid_until: Option<i64> = None;
        self.for_each_resource(flow, |r| {
            if connector.is_some_and(|c| self.resources[r as usize].connector != c) {
                return;
            }
            for (table, best) in [(&self.deny, &mut deny), (&self.allow, &mut allow)] {
                for p in &subject.principals {
                    let Some(rules) = table[r as usize].get(p) else {
                        continue;
                    };
                    for &rule in rules {
                        match self.rules[rule as usize].expires {
                            Some(e) if e <= now => continue,
                            Some(e) => valid_until = Some(valid_until.map_or(e, |v: i64| v.min(e))),
                            None => {}
                        }
                        if best.is_none_or(|(b, _)| rule < b) {
                            *best = Some((rule, r));
                        }
                        // Rules are in file order: the first unexpired one is the best here.
                        break;
                    }
                }
            }
        });
        let (verdict, pick) = match (deny, allow) {
            (Some(d), _) => (Verdict::Deny, Some(d)),
            (None, Some(a)) => (Verdict::Allow, Some(a)),
            (None, None) => (Verdict::Deny, None),
        };
        Decision {
            verdict,
            rule: pick.map(|p| p.0),
            resource: pick.map(|p| p.1),
            valid_until,
        }
    }

    /// Words for a decision: `allow by rule "eng-web" (resource web)` or `deny (default)`.
    pub fn describe(&self, d: &Decision) -> String {
        let verdict = match d.verdict {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        };
        match (d.rule, d.resource) {
            (Some(rule), Some(res)) => format!(
                "{verdict} by rule {:?} (resource {:?})",
                self.rules[rule as usize].name, self.resources[res as usize].name
            ),
            _ => format!("{verdict} (default: no rule allows this flow)"),
        }
    }

    /// The deciding rule's name, or `default` for the default deny.
    pub fn rule_name(&self, d: &Decision) -> &str {
        d.rule
            .map_or("default", |r| self.rules[r as usize].name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_merge_and_search() {
        let p = PortRanges::from_ranges(vec![(80, 80), (8000, 8100), (81, 90), (443, 443)]);
        assert_eq!(p.0, vec![(80, 90), (443, 443), (8000, 8100)]);
        for (port, want) in [
            (79, false),
            (80, true),
            (90, true),
            (91, false),
            (443, true),
            (8050, true),
            (8101, false),
            (0, false),
        ] {
            assert_eq!(p.contains(port), want, "{port}");
        }
        assert!(PortRanges::from_ranges(vec![(1, 65535)]).contains(65535));
    }

    #[test]
    fn prefix_table_finds_every_covering_prefix() {
        let mut t = PrefixTable::default();
        let ip = |s: &str| v4_bits(s.parse().unwrap());
        t.insert(ip("10.0.0.0"), 8, 32, 1);
        t.insert(ip("10.1.2.0"), 24, 32, 2);
        t.insert(ip("10.1.2.3"), 32, 32, 3);
        t.insert(0, 0, 32, 4);
        let mut got = Vec::new();
        t.for_each(ip("10.1.2.3"), 32, |r| got.push(r));
        got.sort();
        assert_eq!(got, vec![1, 2, 3, 4]);
        got.clear();
        t.for_each(ip("11.0.0.1"), 32, |r| got.push(r));
        assert_eq!(got, vec![4]);
    }
}
