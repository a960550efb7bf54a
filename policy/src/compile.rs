//! From policy text to a compiled [`Policy`]: parse, validate (every error with file, line,
//! column and key), warn about rules that cannot matter, and build the lookup tables.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::diagnostic::{Diagnostic, PolicyErrors, Severity};
use crate::locate::Locations;
use crate::matcher::{
    group_principal, user_principal, v4_bits, v6_bits, Policy, PortRanges, PortSpec, Principal,
    Resource, Rule, EVERYONE,
};
use crate::model::{Action, PolicyFile};

pub const FORMAT_VERSION: u32 = 1;

/// The agent's default tunnel addresses (`tun.ipv4`, `tun.ipv6` in linux/src/config.rs). A
/// resource covering one would route the agent's own packets back into its tunnel.
pub const AGENT_TUN_V4: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 1);
pub const AGENT_TUN_V6: Ipv6Addr = Ipv6Addr::new(0xfd5c, 0x1ce0, 0x1, 0, 0, 0, 0, 1);

/// A validated policy and the warnings its check produced.
#[derive(Debug)]
pub struct Compiled {
    pub policy: Policy,
    pub warnings: Vec<Diagnostic>,
}

impl Compiled {
    pub fn policy_groups(&self) -> usize {
        self.policy.groups.len()
    }
}

struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
    /// Built only when there is something to report: indexing a large file costs more than
    /// compiling it.
    loc: Option<Locations>,
    out: Vec<Diagnostic>,
}

impl Ctx<'_> {
    fn loc(&mut self) -> &Locations {
        let text = self.text;
        self.loc.get_or_insert_with(|| Locations::parse(text))
    }

    fn push(&mut self, severity: Severity, key: &str, at_key: bool, message: String) {
        let loc = self.loc();
        let (line, column) = if at_key {
            loc.key(key).unwrap_or_else(|| loc.nearest(key))
        } else {
            loc.nearest(key)
        };
        self.out.push(Diagnostic {
            severity,
            file: self.file.to_string(),
            line,
            column,
            key: key.to_string(),
            message,
        });
    }
    fn error(&mut self, key: &str, message: String) {
        self.push(Severity::Error, key, false, message)
    }
    fn warn(&mut self, key: &str, message: String) {
        self.push(Severity::Warning, key, false, message)
    }
}

/// Names of users, groups, resources, connectors and rules.
fn check_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 64 {
        return Err(format!("{s:?} is not a valid name: use 1-64 characters"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'))
    {
        return Err(format!(
            "{s:?} is not a valid name: use only A-Z a-z 0-9 . _ @ -"
        ));
    }
    Ok(())
}

/// An entry of a resource's `addresses`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Net(IpNet),
    Host(String),
    /// `*.corp.example`, stored as `corp.example`: names strictly below it.
    Wildcard(String),
}

fn check_hostname(h: &str) -> Result<(), String> {
    if h.len() > 253 {
        return Err(format!("hostname {h:?} is longer than 253 characters"));
    }
    for label in h.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("hostname {h:?} has an empty or over-long label"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "hostname {h:?}: a label cannot start or end with '-'"
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "hostname {h:?} has characters other than letters, digits, '-' and '_'"
            ));
        }
    }
    Ok(())
}

pub fn parse_address(s: &str) -> Result<Address, String> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Address::Net(IpNet::from(ip)));
    }
    if s.contains('/') {
        let net: IpNet = s.parse().map_err(|_| {
            format!("{s:?} is not a valid CIDR (expected like 10.0.0.0/24 or fd00::/64)")
        })?;
        if let IpNet::V6(v6) = net {
            if let Some(v4) = v6.network().to_ipv4_mapped() {
                return Err(format!(
                    "{s:?} is an IPv4-mapped IPv6 range; write the IPv4 form ({v4}/{})",
                    v6.prefix_len().saturating_sub(96)
                ));
            }
        }
        if net.trunc() != net {
            return Err(format!(
                "{s:?} has host bits set; did you mean {}?",
                net.trunc()
            ));
        }
        return Ok(Address::Net(net));
    }
    if s.contains('*') {
        let Some(rest) = s.strip_prefix("*.") else {
            return Err(format!(
                "{s:?}: a wildcard must be the whole first label, as in *.corp.example"
            ));
        };
        if rest.contains('*') {
            return Err(format!(
                "{s:?}: only one wildcard, as the first label, is allowed"
            ));
        }
        if !rest.contains('.') {
            return Err(format!(
                "{s:?} would match a whole top-level domain; name a domain like *.corp.example"
            ));
        }
        let rest = rest.to_ascii_lowercase();
        check_hostname(&rest)?;
        return Ok(Address::Wildcard(rest));
    }
    if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!("{s:?} is not a valid IP address"));
    }
    let h = s.trim_end_matches('.').to_ascii_lowercase();
    check_hostname(&h)?;
    Ok(Address::Host(h))
}

#[derive(Default)]
struct PortsAcc {
    tcp: Vec<(u16, u16)>,
    udp: Vec<(u16, u16)>,
    icmp: bool,
}

fn parse_port_number(s: &str, whole: &str) -> Result<u16, String> {
    let n: u64 = s
        .parse()
        .map_err(|_| format!("{whole:?}: {s:?} is not a port number"))?;
    if n == 0 || n > 65535 {
        return Err(format!("{whole:?}: port {n} is out of range (1-65535)"));
    }
    Ok(n as u16)
}

fn parse_ports(s: &str, acc: &mut PortsAcc) -> Result<(), String> {
    let s = s.trim().to_ascii_lowercase();
    match s.as_str() {
        "any" => {
            acc.tcp.push((1, 65535));
            acc.udp.push((1, 65535));
            acc.icmp = true;
            return Ok(());
        }
        "icmp" => {
            acc.icmp = true;
            return Ok(());
        }
        "tcp" => {
            acc.tcp.push((1, 65535));
            return Ok(());
        }
        "udp" => {
            acc.udp.push((1, 65535));
            return Ok(());
        }
        _ => {}
    }
    let Some((proto, range)) = s.split_once('/') else {
        return Err(format!(
            "{s:?}: expected tcp/PORT, tcp/FROM-TO, udp/..., tcp, udp, icmp or any"
        ));
    };
    let list = match proto {
        "tcp" => &mut acc.tcp,
        "udp" => &mut acc.udp,
        "icmp" => return Err(format!("{s:?}: ICMP has no ports; write just icmp")),
        other => {
            return Err(format!(
                "{s:?}: unknown protocol {other:?} (tcp, udp or icmp)"
            ))
        }
    };
    let (lo, hi) = match range.split_once('-') {
        Some((a, b)) => (parse_port_number(a, &s)?, parse_port_number(b, &s)?),
        None => {
            let p = parse_port_number(range, &s)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(format!("{s:?}: the range runs backwards ({lo} > {hi})"));
    }
    list.push((lo, hi));
    Ok(())
}

/// A rule as validated: who, which resources, action, expiry.
type ParsedRule = (HashSet<Who>, HashSet<u32>, Action, Option<i64>);

/// An entry of a rule's `who`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Who {
    Everyone,
    Group(String),
    User(String),
}

fn parse_who(s: &str) -> Result<Who, String> {
    let s = s.trim();
    if s == "everyone" {
        return Ok(Who::Everyone);
    }
    if let Some(g) = s.strip_prefix("group:") {
        check_name(g)?;
        return Ok(Who::Group(g.to_string()));
    }
    if let Some(u) = s.strip_prefix("user:") {
        check_name(u)?;
        return Ok(Who::User(u.to_string()));
    }
    Err(format!("{s:?}: expected everyone, group:NAME or user:NAME"))
}

/// A date (midnight UTC) or an RFC 3339 time, as Unix seconds: what `expires:` takes, and so
/// what `policy explain --at` takes too.
pub fn parse_expiry(s: &str) -> Result<i64, String> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(t) = time::OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t.unix_timestamp());
    }
    let fmt = time::format_description::parse_borrowed::<2>("[year]-[month]-[day]")
        .map_err(|e| e.to_string())?;
    match time::Date::parse(s, &fmt) {
        Ok(d) => Ok(d.midnight().assume_utc().unix_timestamp()),
        Err(_) => Err(format!(
            "{s:?} is not a date (2027-01-31) or an RFC 3339 time (2027-01-31T18:00:00Z)"
        )),
    }
}

/// Parses, validates and compiles policy `text`; `file` names it in diagnostics. `now` (Unix
/// seconds) is used only to warn about rules that have already expired.
pub fn compile(text: &str, file: &str, now: i64) -> Result<Compiled, PolicyErrors> {
    let mut cx = Ctx {
        file,
        text,
        loc: None,
        out: Vec::new(),
    };
    let de = serde_yaml::Deserializer::from_str(text);
    let pf: PolicyFile = match serde_path_to_error::deserialize(de) {
        Ok(p) => p,
        Err(e) => {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let (line, column) = match inner.location() {
                Some(l) => (l.line(), l.column()),
                None => cx.loc().nearest(&key),
            };
            let mut key = if key == "." || key == "?" {
                String::new()
            } else {
                key
            };
            let (mut line, mut column) = (line, column);
            // A repeated mapping key: point at the repeat (the index keeps the last position).
            let text = inner.to_string();
            let repeated = text.find("` is defined twice").and_then(|end| {
                let start = text[..end].rfind('`')? + 1;
                Some(text[start..end].to_string())
            });
            if let Some(name) = repeated {
                key = join_key(&key, &name);
                if let Some(pos) = cx.loc().key(&key) {
                    (line, column) = pos;
                }
            }
            // serde_yaml repeats the location at the end of its message; we print it first.
            let mut message = inner.to_string();
            if let Some(i) = message.rfind(" at line ") {
                message.truncate(i);
            }
            // ...and may start with the path, which we print too.
            if let Some((head, rest)) = message.split_once(": ") {
                if !head.contains(' ') && key.starts_with(head) {
                    message = rest.to_string();
                }
            }
            return Err(PolicyErrors(vec![Diagnostic {
                severity: Severity::Error,
                file: file.to_string(),
                line,
                column,
                key,
                message,
            }]));
        }
    };
    let policy = build(&pf, &mut cx, now);
    let has_errors = cx.out.iter().any(|d| d.severity == Severity::Error);
    if has_errors {
        return Err(PolicyErrors(cx.out));
    }
    Ok(Compiled {
        policy,
        warnings: cx.out,
    })
}

fn build(pf: &PolicyFile, cx: &mut Ctx<'_>, now: i64) -> Policy {
    let mut p = Policy::default();
    if pf.version != FORMAT_VERSION {
        cx.error(
            "version",
            format!(
                "unsupported version {} (this build reads version {FORMAT_VERSION})",
                pf.version
            ),
        );
    }

    // Groups: names, members, includes; then the transitive closure (and cycles).
    for name in pf.groups.keys() {
        let key = format!("groups.{name}");
        if let Err(e) = check_name(name) {
            cx.push(Severity::Error, &key, true, format!("group {e}"));
        }
        p.group_ids.insert(name.clone(), p.groups.len() as u32);
        p.groups.push(name.clone());
    }
    let mut includes: Vec<Vec<u32>> = vec![Vec::new(); p.groups.len()];
    for (gi, (name, g)) in pf.groups.iter().enumerate() {
        for (i, m) in g.members.iter().enumerate() {
            match check_name(m) {
                Ok(()) => {
                    let list = p.members.entry(m.clone()).or_default();
                    if !list.contains(&(gi as u32)) {
                        list.push(gi as u32);
                    }
                }
                Err(e) => cx.error(
                    &format!("groups.{name}.members[{i}]"),
                    format!("member {e}"),
                ),
            }
        }
        for (i, inc) in g.include.iter().enumerate() {
            match p.group_ids.get(inc) {
                Some(id) if *id == gi as u32 => cx.error(
                    &format!("groups.{name}.include[{i}]"),
                    format!("group {name:?} includes itself"),
                ),
                Some(id) => includes[gi].push(*id),
                None => cx.error(
                    &format!("groups.{name}.include[{i}]"),
                    format!(
                        "unknown group {inc:?} (defined groups: {})",
                        list(&p.groups)
                    ),
                ),
            }
        }
    }
    // group_closure[g] = g and every group that (transitively) includes g.
    let mut parents: Vec<Vec<u32>> = vec![Vec::new(); p.groups.len()];
    for (g, incs) in includes.iter().enumerate() {
        for &child in incs {
            parents[child as usize].push(g as u32);
        }
    }
    let mut reported_cycle = false;
    for g in 0..p.groups.len() as u32 {
        let mut seen = vec![g];
        let mut todo = vec![g];
        while let Some(x) = todo.pop() {
            for &up in &parents[x as usize] {
                if up == g && !reported_cycle && x != g {
                    reported_cycle = true;
                    let name = &p.groups[g as usize];
                    // The path is what an admin has to break; a cycle among many groups is
                    // otherwise hard to find.
                    let path: Vec<&str> = include_cycle(&includes, g)
                        .iter()
                        .map(|&i| p.groups[i as usize].as_str())
                        .collect();
                    cx.push(
                        Severity::Error,
                        &format!("groups.{name}"),
                        true,
                        format!(
                            "group {name:?} includes itself through a cycle: {}",
                            path.join(" -> ")
                        ),
                    );
                }
                if !seen.contains(&up) {
                    seen.push(up);
                    todo.push(up);
                }
            }
        }
        p.group_closure.push(seen);
    }

    // Resources.
    let mut resource_ids: HashMap<String, u32> = HashMap::new();
    for (ri, r) in pf.resources.iter().enumerate() {
        let base = format!("resources[{ri}]");
        if let Err(e) = check_name(&r.name) {
            cx.error(&format!("{base}.name"), format!("resource {e}"));
        }
        if let Some(prev) = resource_ids.get(&r.name) {
            let (line, _) = cx.loc().nearest(&format!("resources[{prev}].name"));
            cx.error(
                &format!("{base}.name"),
                format!(
                    "resource {:?} is already defined (line {line}); resource names must be unique",
                    r.name
                ),
            );
        }
        if let Err(e) = check_name(&r.connector) {
            cx.error(&format!("{base}.connector"), format!("connector {e}"));
        }
        let id = p.resources.len() as u32;
        resource_ids.entry(r.name.clone()).or_insert(id);
        if r.addresses.is_empty() {
            cx.error(
                &format!("{base}.addresses"),
                "no addresses: list at least one CIDR, IP or hostname".into(),
            );
        }
        for (ai, a) in r.addresses.iter().enumerate() {
            match parse_address(a) {
                Ok(Address::Net(net)) => {
                    if let Some(w) = route_warning(net) {
                        cx.warn(&format!("{base}.addresses[{ai}]"), w);
                    }
                    match net {
                        IpNet::V4(n) => p.v4.insert(v4_bits(n.network()), n.prefix_len(), 32, id),
                        IpNet::V6(n) => p.v6.insert(v6_bits(n.network()), n.prefix_len(), 128, id),
                    }
                    p.networks.push((net, id));
                }
                Ok(Address::Host(h)) => p.names.entry(h).or_default().push(id),
                Ok(Address::Wildcard(w)) => p.wildcards.entry(w).or_default().push(id),
                Err(e) => cx.error(&format!("{base}.addresses[{ai}]"), e),
            }
        }
        let mut acc = PortsAcc::default();
        if r.ports.is_empty() {
            cx.error(
                &format!("{base}.ports"),
                "no ports: list tcp/PORT, udp/PORT, icmp, or any".into(),
            );
        }
        for (pi, s) in r.ports.iter().enumerate() {
            if let Err(e) = parse_ports(s, &mut acc) {
                cx.error(&format!("{base}.ports[{pi}]"), e);
            }
        }
        p.resources.push(Resource {
            name: r.name.clone(),
            connector: r.connector.clone(),
            ports: PortSpec {
                tcp: PortRanges::from_ranges(acc.tcp),
                udp: PortRanges::from_ranges(acc.udp),
                icmp: acc.icmp,
            },
        });
    }
    everything_covered_warning(&p.networks, cx);
    p.allow = vec![Default::default(); p.resources.len()];
    p.deny = vec![Default::default(); p.resources.len()];

    // Rules.
    let mut rule_names: HashMap<String, usize> = HashMap::new();
    let mut parsed: Vec<ParsedRule> = Vec::new();
    for (i, r) in pf.rules.iter().enumerate() {
        let base = format!("rules[{i}]");
        let name = r.name.clone().unwrap_or_else(|| format!("rule {}", i + 1));
        if r.name.is_some() {
            if let Err(e) = check_name(&name) {
                cx.error(&format!("{base}.name"), format!("rule {e}"));
            }
            if let Some(prev) = rule_names.insert(name.clone(), i) {
                cx.error(
                    &format!("{base}.name"),
                    format!("rule name {name:?} is already used by rules[{prev}]"),
                );
            }
        }
        let expires = match &r.expires {
            Some(s) => match parse_expiry(s) {
                Ok(t) => {
                    if t <= now {
                        cx.warn(
                            &format!("{base}.expires"),
                            format!("rule {name:?} expired on {s}; it no longer applies"),
                        );
                    }
                    Some(t)
                }
                Err(e) => {
                    cx.error(&format!("{base}.expires"), e);
                    None
                }
            },
            None => None,
        };
        if r.who.is_empty() {
            cx.error(
                &format!("{base}.who"),
                "empty: name everyone, group:NAME or user:NAME".into(),
            );
        }
        if r.to.is_empty() {
            cx.error(
                &format!("{base}.to"),
                "empty: name at least one resource".into(),
            );
        }
        let mut who = HashSet::new();
        for (wi, w) in r.who.iter().enumerate() {
            match parse_who(w) {
                Ok(Who::Group(g)) if !p.group_ids.contains_key(&g) => cx.error(
                    &format!("{base}.who[{wi}]"),
                    format!("unknown group {g:?} (defined groups: {})", list(&p.groups)),
                ),
                Ok(w) => {
                    who.insert(w);
                }
                Err(e) => cx.error(&format!("{base}.who[{wi}]"), e),
            }
        }
        let mut to = HashSet::new();
        for (ti, t) in r.to.iter().enumerate() {
            match resource_ids.get(t) {
                Some(id) => {
                    to.insert(*id);
                }
                None => {
                    let names: Vec<String> = pf.resources.iter().map(|r| r.name.clone()).collect();
                    cx.error(
                        &format!("{base}.to[{ti}]"),
                        format!(
                            "unknown resource {t:?} (defined resources: {})",
                            list(&names)
                        ),
                    )
                }
            }
        }
        let rid = p.rules.len() as u32;
        p.rules.push(Rule {
            name,
            action: r.action,
            expires,
        });
        for w in &who {
            let principal: Principal = match w {
                Who::Everyone => EVERYONE,
                Who::Group(g) => match p.group_ids.get(g) {
                    Some(id) => group_principal(*id),
                    None => continue,
                },
                Who::User(u) => {
                    let next = p.users.len() as u32;
                    user_principal(*p.users.entry(u.clone()).or_insert(next))
                }
            };
            for res in &to {
                let table = match r.action {
                    Action::Allow => &mut p.allow[*res as usize],
                    Action::Deny => &mut p.deny[*res as usize],
                };
                table.entry(principal).or_default().push(rid);
            }
        }
        parsed.push((who, to, r.action, expires));
    }

    shadow_warnings(&p, &parsed, cx);
    for (ri, r) in p.resources.iter().enumerate() {
        if p.allow[ri].is_empty() {
            cx.warn(
                &format!("resources[{ri}]"),
                format!(
                    "no rule allows access to resource {:?}; nobody can reach it",
                    r.name
                ),
            );
        }
    }
    p
}

/// Warns about allow rules that a deny rule fully overrides, and rules that repeat an earlier
/// one. Candidates come from an index by resource, so this stays near linear in the rules.
fn shadow_warnings(p: &Policy, parsed: &[ParsedRule], cx: &mut Ctx<'_>) {
    let mut deny_by_resource: HashMap<u32, Vec<usize>> = HashMap::new();
    for (j, (_, to, action, expires)) in parsed.iter().enumerate() {
        if *action == Action::Deny && expires.is_none() {
            for r in to {
                deny_by_resource.entry(*r).or_default().push(j);
            }
        }
    }
    let mut seen: HashMap<(Vec<Who>, Vec<u32>, Action), usize> = HashMap::new();
    for (i, (who, to, action, _)) in parsed.iter().enumerate() {
        if who.is_empty() || to.is_empty() {
            continue;
        }
        let mut w: Vec<Who> = who.iter().cloned().collect();
        w.sort();
        let mut t: Vec<u32> = to.iter().copied().collect();
        t.sort_unstable();
        if let Some(&first) = seen.get(&(w.clone(), t.clone(), *action)) {
            let (name, other) = (&p.rules[i].name, &p.rules[first].name);
            cx.warn(
                &format!("rules[{i}]"),
                format!("rule {name:?} repeats rule {other:?}"),
            );
            continue;
        }
        seen.insert((w, t, *action), i);
        if *action != Action::Allow {
            continue;
        }
        // A covering deny names every resource of this rule, so it is among the denies of the
        // resource with the fewest.
        let Some(candidates) = to
            .iter()
            .map(|r| deny_by_resource.get(r).map_or(&[][..], |v| v.as_slice()))
            .min_by_key(|v| v.len())
        else {
            continue;
        };
        for &j in candidates {
            let (dwho, dto, _, _) = &parsed[j];
            if (dwho.contains(&Who::Everyone) || who.is_subset(dwho)) && to.is_subset(dto) {
                let (name, other) = (&p.rules[i].name, &p.rules[j].name);
                cx.warn(
                    &format!("rules[{i}]"),
                    format!("allow rule {name:?} never applies: deny rule {other:?} covers the same users and resources, and deny wins"),
                );
                break;
            }
        }
    }
}

/// The shortest chain of includes from group `g` back to itself, both ends included (empty if
/// there is none).
fn include_cycle(includes: &[Vec<u32>], g: u32) -> Vec<u32> {
    let mut prev: Vec<Option<u32>> = vec![None; includes.len()];
    let mut queue = VecDeque::from([g]);
    while let Some(x) = queue.pop_front() {
        for &y in includes.get(x as usize).map_or(&[][..], |v| v.as_slice()) {
            if y == g {
                // Walk back from x to g, then read it forwards: g -> ... -> x -> g.
                let mut back = Vec::new();
                let mut cur = x;
                while cur != g {
                    back.push(cur);
                    match prev.get(cur as usize).copied().flatten() {
                        Some(p) => cur = p,
                        None => break,
                    }
                }
                let mut path = vec![g];
                path.extend(back.into_iter().rev());
                path.push(g);
                return path;
            }
            if prev.get(y as usize).is_some_and(|p| p.is_none()) {
                prev[y as usize] = Some(x);
                queue.push_back(y);
            }
        }
    }
    Vec::new()
}

/// Resource networks the agent routes into its tunnel and should not: every address (the
/// relay's with it, so the agent cuts itself off), or its own tunnel address.
fn route_warning(net: IpNet) -> Option<String> {
    if net.prefix_len() == 0 {
        let family = if net.addr().is_ipv4() { "IPv4" } else { "IPv6" };
        return Some(format!(
            "{net} covers every {family} address: the agent would route all {family} traffic \
             into the tunnel, its relay's address included; list the networks the resource \
             really has"
        ));
    }
    let (own, setting) = match net {
        IpNet::V4(_) => (IpAddr::V4(AGENT_TUN_V4), "tun.ipv4"),
        IpNet::V6(_) => (IpAddr::V6(AGENT_TUN_V6), "tun.ipv6"),
    };
    net.contains(&own).then(|| {
        format!(
            "{net} covers {own}, the agent's default tunnel address ({setting}): the agent's \
             own traffic would be routed back into the tunnel; narrow the range or give agents \
             another {setting}"
        )
    })
}

/// The same as a /0 entry when several resources' networks together cover a whole family
/// (0.0.0.0/1 and 128.0.0.0/1, say).
fn everything_covered_warning(networks: &[(IpNet, u32)], cx: &mut Ctx<'_>) {
    for (family, whole) in [
        ("IPv4", IpNet::V4(Default::default())),
        ("IPv6", IpNet::V6(Default::default())),
    ] {
        let nets: Vec<IpNet> = networks
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| n.addr().is_ipv4() == whole.addr().is_ipv4())
            .collect();
        // A single /0 entry has its own warning already.
        if nets.iter().any(|n| n.prefix_len() == 0) {
            continue;
        }
        if IpNet::aggregate(&nets).contains(&whole) {
            cx.push(
                Severity::Warning,
                "resources",
                true,
                format!(
                    "together, the resources' addresses cover every {family} address ({whole}): \
                     the agent would route all {family} traffic into the tunnel, its relay's \
                     address included; list the networks the resources really have"
                ),
            );
        }
    }
}

fn join_key(base: &str, key: &str) -> String {
    if base.is_empty() {
        key.to_string()
    } else {
        format!("{base}.{key}")
    }
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_error(text: &str) -> Diagnostic {
        compile(text, "p.yaml", 0).unwrap_err().0.remove(0)
    }

    #[test]
    fn a_group_defined_twice_is_an_error_at_the_repeat() {
        let d =
            first_error("version: 1\ngroups:\n  a:\n    members: [x]\n  a:\n    members: [y]\n");
        assert_eq!(
            (d.line, d.column, d.key.as_str()),
            (5, 3, "groups.a"),
            "{d}"
        );
        assert!(d.message.contains("defined twice"), "{d}");
    }

    #[test]
    fn ipv4_mapped_ranges_are_refused() {
        let e = parse_address("::ffff:10.0.0.0/104").unwrap_err();
        assert!(e.contains("10.0.0.0/8"), "{e}");
    }

    #[test]
    fn serde_messages_do_not_repeat_the_location() {
        let d = first_error("version: 1\nrules:\n  - acton: allow\n");
        assert!(!d.message.contains("at line"), "{d}");
        assert!(d.message.contains("acton"), "{d}");
    }
}
