//! A role's numbers in Prometheus form: what each host's loop publishes once a second
//! ([`Sample`]) and how `/metrics` writes it (OpenMetrics text, by prometheus-client).
//!
//! Names follow Prometheus practice: a `sluice_` prefix, `_total` on counters (the encoder adds
//! it), base units (bytes, seconds), and labels from closed sets (path, reason, result, kind):
//! never a peer, so the number of series does not grow with the number of agents.

use std::fmt;
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use sluice_dataplane::metrics::{
    Direction, DnsKind, DnsResult, DropReason, NodeCounters, PathKind,
};
use sluice_netstack::splice::DialStats;
use sluice_relay::server::{Refusal, RelayStats};

/// Which process this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRole {
    Agent,
    Connector,
    Relay,
}

impl NodeRole {
    pub fn name(self) -> &'static str {
        match self {
            NodeRole::Agent => "agent",
            NodeRole::Connector => "connector",
            NodeRole::Relay => "relay",
        }
    }
}

/// When the node's certificates expire, seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertExpiry {
    pub node: i64,
    /// None when the CA file could not be read again.
    pub ca: Option<i64>,
}

/// A role's numbers at one moment, as its loop published them.
#[derive(Debug, Clone)]
pub struct Sample {
    pub role: NodeRole,
    /// When the loop took it: a sample that stops getting newer means a stuck loop.
    pub taken: Instant,
    /// Whether the role does its job now (see `ops::Readiness`).
    pub ready: bool,
    /// The control connection to the relay (agent and connector).
    pub relay_connected: Option<bool>,
    /// The tunnels' counters (agent and connector).
    pub node: Option<NodeCounters>,
    /// The connector's dials to services.
    pub dials: Option<DialStats>,
    /// The relay's counters.
    pub relay: Option<RelayStats>,
    pub certs: CertExpiry,
    /// Configuration reloads (SIGHUP) that took, and that failed.
    pub reloads: (u64, u64),
}

impl Sample {
    /// A sample with no numbers yet: the role is starting.
    pub fn starting(role: NodeRole, certs: CertExpiry) -> Sample {
        Sample {
            role,
            taken: Instant::now(),
            ready: false,
            relay_connected: None,
            node: None,
            dials: None,
            relay: None,
            certs,
            reloads: (0, 0),
        }
    }
}

/// How `/metrics` writes: OpenMetrics for a scraper that asks for it (Prometheus does), the
/// classic Prometheus text format (0.0.4) for everyone else (curl, `promtool check metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    Prometheus,
}

impl Format {
    /// The format an HTTP `Accept` header asks for.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// `sample` in `format`.
pub fn render(sample: &Sample, format: Format) -> String {
    let open = render_openmetrics(sample);
    match format {
        Format::OpenMetrics => open,
        Format::Prometheus => to_prometheus_text(&open),
    }
}

/// OpenMetrics text as the classic format: a counter family is named with its `_total` (in
/// OpenMetrics only its samples are), and there is no `# EOF`.
fn to_prometheus_text(open: &str) -> String {
    let counters: std::collections::HashSet<&str> = open
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open.len() + 64 * counters.len());
    for line in open.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The OpenMetrics text of `sample`.
fn render_openmetrics(sample: &Sample) -> String {
    let mut registry = Registry::with_prefix("sluice");
    registry.register_collector(Box::new(SampleCollector(sample.clone())));
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug in a name here.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::warn!("metrics: cannot encode: {e}");
    }
    out
}

#[derive(Debug)]
struct SampleCollector(Sample);

/// A row's labels: names and values (the values from the counted enums' `label()`).
type Labels<const N: usize> = [(&'static str, &'static str); N];

/// One metric family: its rows, each a label set and a value.
fn family<M: EncodeMetric, const N: usize>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    rows: &[(Labels<N>, M)],
) -> fmt::Result {
    let mut e = enc.encode_descriptor(name, help, None, ty)?;
    for (labels, m) in rows {
        m.encode(e.encode_family(labels)?)?;
    }
    Ok(())
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let m = ConstCounter::new(v);
    m.encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> fmt::Result {
    let m = ConstGauge::new(v);
    m.encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for SampleCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        let role = s.role.name();
        {
            let version = env!("CARGO_PKG_VERSION");
            let labels = [("version", version), ("role", role)];
            let mut e = enc.encode_descriptor(
                "build_info",
                "The running Sluice build: its version and role (always 1).",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(1i64).encode(e.encode_family(&labels)?)?;
        }
        gauge(
            &mut enc,
            "ready",
            "1 while the role does its job (the relay listens; the connector is registered with the relay; the agent's TUN device is up and the relay connected).",
            s.ready as i64,
        )?;
        {
            let rows: Vec<_> = [("node", Some(s.certs.node)), ("ca", s.certs.ca)]
                .into_iter()
                .filter_map(|(which, t)| Some(([("certificate", which)], ConstGauge::new(t?))))
                .collect();
            family(
                &mut enc,
                "certificate_expiry_timestamp_seconds",
                "When the node's certificate and its CA's expire, seconds since the Unix epoch.",
                MetricType::Gauge,
                &rows,
            )?;
        }
        {
            let rows = [
                ([("result", "ok")], ConstCounter::new(s.reloads.0)),
                ([("result", "failed")], ConstCounter::new(s.reloads.1)),
            ];
            family(
                &mut enc,
                "config_reloads",
                "Configuration and policy reloads asked for by SIGHUP, by result.",
                MetricType::Counter,
                &rows,
            )?;
        }
        if let Some(up) = s.relay_connected {
            gauge(
                &mut enc,
                "relay_connected",
                "1 while the control connection to the relay is up.",
                up as i64,
            )?;
        }
        if let Some(n) = &s.node {
            encode_node(&mut enc, n, s.role)?;
        }
        if let Some(d) = &s.dials {
            let rows = [
                ([("result", "connected")], ConstCounter::new(d.connected)),
                ([("result", "refused")], ConstCounter::new(d.refused)),
                (
                    [("result", "unreachable")],
                    ConstCounter::new(d.unreachable),
                ),
                ([("result", "timeout")], ConstCounter::new(d.timed_out)),
            ];
            family(
                &mut enc,
                "connector_dials",
                "TCP connections the connector opened to services for agents' flows, by result.",
                MetricType::Counter,
                &rows,
            )?;
        }
        if let Some(r) = &s.relay {
            encode_relay(&mut enc, r)?;
        }
        Ok(())
    }
}

fn encode_node(enc: &mut DescriptorEncoder, n: &NodeCounters, role: NodeRole) -> fmt::Result {
    for (dir, what, word) in [
        (Direction::Sent, "sent", "into"),
        (Direction::Received, "received", "out of"),
    ] {
        let bytes: Vec<_> = PathKind::ALL
            .iter()
            .map(|p| {
                let c = n.traffic.get(dir, *p);
                ([("path", p.label())], ConstCounter::new(c.bytes))
            })
            .collect();
        family(
            enc,
            &format!("tunnel_{what}_bytes"),
            &format!("Bytes of IP packets {word} the tunnels, by the path the tunnel was on."),
            MetricType::Counter,
            &bytes,
        )?;
        let packets: Vec<_> = PathKind::ALL
            .iter()
            .map(|p| {
                let c = n.traffic.get(dir, *p);
                ([("path", p.label())], ConstCounter::new(c.packets))
            })
            .collect();
        family(
            enc,
            &format!("tunnel_{what}_packets"),
            &format!("IP packets {word} the tunnels, by the path the tunnel was on."),
            MetricType::Counter,
            &packets,
        )?;
    }
    let drops: Vec<_> = DropReason::ALL
        .iter()
        .map(|r| ([("reason", r.label())], ConstCounter::new(n.drops.get(*r))))
        .collect();
    family(
        enc,
        "dropped_packets",
        "IP packets not carried, by reason (a denied or unroutable packet is answered with a TCP reset or an ICMP error).",
        MetricType::Counter,
        &drops,
    )?;
    let decisions = [
        (
            [("result", "allow")],
            ConstCounter::new(n.decisions.allowed),
        ),
        ([("result", "deny")], ConstCounter::new(n.decisions.denied)),
    ];
    family(
        enc,
        "policy_decisions",
        "Policy decisions on new flows, by result.",
        MetricType::Counter,
        &decisions,
    )?;
    let kinds: &[DnsKind] = match role {
        NodeRole::Connector => &[DnsKind::Lookup],
        _ => &[DnsKind::Local, DnsKind::Connector, DnsKind::Upstream],
    };
    let mut rows = Vec::new();
    for k in kinds {
        for r in DnsResult::ALL {
            let labels = [("kind", k.label()), ("result", r.label())];
            rows.push((labels, ConstCounter::new(n.dns.queries(*k, r))));
        }
    }
    family(
        enc,
        "dns_queries",
        "DNS queries, by who answered (kind: local, connector, upstream; a connector's lookups for agents: lookup) and the answer's response code.",
        MetricType::Counter,
        &rows,
    )?;
    {
        let mut e = enc.encode_descriptor(
            "dns_answer_duration_seconds",
            "Time from a DNS query to its answer, by who answered.",
            None,
            MetricType::Histogram,
        )?;
        for k in kinds {
            let h = n.dns.latency(*k);
            let buckets: Vec<(f64, u64)> = h
                .per_bucket()
                .into_iter()
                // The encoder writes f64::MAX as +Inf.
                .map(|(b, c)| (if b.is_finite() { b } else { f64::MAX }, c))
                .collect();
            let labels = [("kind", k.label())];
            e.encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(h.sum_secs, h.count, &buckets, None)?;
        }
    }
    let switches: Vec<_> = PathKind::ALL
        .iter()
        .map(|p| ([("to", p.label())], ConstCounter::new(n.switches(*p))))
        .collect();
    family(
        enc,
        "path_switches",
        "Tunnels that moved between the relay and a direct path, by the path they moved to.",
        MetricType::Counter,
        &switches,
    )?;
    gauge(
        enc,
        "tunnels",
        "End-to-end tunnels up now.",
        n.tunnels as i64,
    )?;
    gauge(
        enc,
        "flows",
        "Flows open now (the agent: flows the policy has decided; the connector: TCP connections, UDP flows and pings to services).",
        n.flows as i64,
    )?;
    if role == NodeRole::Agent {
        counter(
            enc,
            "device_packets",
            "IP packets the agent read from its TUN device.",
            n.device_packets,
        )?;
        counter(
            enc,
            "orphan_resets",
            "TCP segments of connections whose tunnel went away, answered with a reset.",
            n.resets,
        )?;
    }
    Ok(())
}

fn encode_relay(enc: &mut DescriptorEncoder, r: &RelayStats) -> fmt::Result {
    gauge(
        enc,
        "relay_connections",
        "Agents and connectors connected to the relay now.",
        r.clients as i64,
    )?;
    gauge(
        enc,
        "relay_registered_connectors",
        "Connectors registered with the relay now (agents can reach them).",
        r.connectors as i64,
    )?;
    counter(
        enc,
        "relay_accepted_connections",
        "Connections whose peer proved its identity with a certificate of the organisation's CA.",
        r.accepted,
    )?;
    let refused: Vec<_> = Refusal::ALL
        .iter()
        .map(|why| {
            (
                [("reason", why.label())],
                ConstCounter::new(r.refused(*why)),
            )
        })
        .collect();
    family(
        enc,
        "relay_refused_connections",
        "Connections the relay turned away, by reason.",
        MetricType::Counter,
        &refused,
    )?;
    counter(
        enc,
        "relay_forwarded_bytes",
        "Bytes of end-to-end tunnel packets the relay forwarded (it cannot read them).",
        r.forwarded_bytes,
    )?;
    counter(
        enc,
        "relay_forwarded_packets",
        "End-to-end tunnel packets the relay forwarded.",
        r.forwarded_packets,
    )?;
    counter(
        enc,
        "relay_rate_limited_packets",
        "UDP packets of authenticated peers over their rate (`limits.peer_packets`, `limits.peer_bytes`), dropped before decryption.",
        r.rate_limited_packets,
    )?;
    counter(
        enc,
        "relay_rate_limited_bytes",
        "Bytes of the packets counted in sluice_relay_rate_limited_packets_total.",
        r.rate_limited_bytes,
    )?;
    counter(
        enc,
        "relay_dropped_packets",
        "Tunnel packets the relay could not forward (no such peer, two of a kind, queue full).",
        r.dropped_packets,
    )?;
    counter(
        enc,
        "relay_malformed_packets",
        "UDP packets that were not QUIC of a known connection, or failed to decrypt.",
        r.bad_packets,
    )?;
    counter(
        enc,
        "relay_retries",
        "Stateless retries sent (address validation of new clients).",
        r.retries_sent,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certs() -> CertExpiry {
        CertExpiry {
            node: 1_900_000_000,
            ca: Some(2_000_000_000),
        }
    }

    #[test]
    fn an_agent_sample_has_every_family_with_prefix_and_total() {
        let mut n = NodeCounters::default();
        n.traffic.count(Direction::Sent, PathKind::Relay, 1000);
        n.drops.add(DropReason::Policy);
        n.decisions.count(false);
        n.dns.answered(
            DnsKind::Local,
            &[0u8; 12],
            std::time::Duration::from_micros(50),
        );
        let mut s = Sample::starting(NodeRole::Agent, certs());
        s.node = Some(n);
        s.relay_connected = Some(true);
        s.ready = true;
        let text = render(&s, Format::OpenMetrics);
        for want in [
            "sluice_build_info{version=\"",
            "sluice_ready 1",
            "sluice_tunnel_sent_bytes_total{path=\"relay\"} 1000",
            "sluice_tunnel_sent_packets_total{path=\"direct\"} 0",
            "sluice_dropped_packets_total{reason=\"policy\"} 1",
            "sluice_dropped_packets_total{reason=\"rate_limited\"} 0",
            "sluice_policy_decisions_total{result=\"deny\"} 1",
            "sluice_dns_queries_total{kind=\"local\",result=\"noerror\"} 1",
            "sluice_dns_answer_duration_seconds_bucket{le=\"0.00025\",kind=\"local\"} 1",
            "sluice_dns_answer_duration_seconds_count{kind=\"local\"} 1",
            "sluice_certificate_expiry_timestamp_seconds{certificate=\"ca\"} 2000000000",
            "sluice_relay_connected 1",
            "sluice_path_switches_total{to=\"direct\"} 0",
            "# EOF",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        assert!(!text.contains("sluice_relay_forwarded"), "{text}");
        assert!(!text.contains("kind=\"lookup\""), "{text}");
        // The classic form names counter families with their _total, and has no EOF.
        let classic = render(&s, Format::Prometheus);
        assert!(classic.contains("# TYPE sluice_dropped_packets_total counter\n"));
        assert!(classic.contains("# HELP sluice_dropped_packets_total IP packets"));
        assert!(classic.contains("# TYPE sluice_tunnels gauge\n"));
        assert!(classic.contains("# TYPE sluice_dns_answer_duration_seconds histogram\n"));
        assert!(!classic.contains("# EOF"));
        assert_eq!(
            classic.lines().filter(|l| !l.starts_with('#')).count(),
            text.lines().filter(|l| !l.starts_with('#')).count()
        );
        assert_eq!(Format::from_accept(None), Format::Prometheus);
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
            )),
            Format::OpenMetrics
        );
    }

    #[test]
    fn a_relay_sample_has_its_own_families() {
        let mut r = RelayStats {
            clients: 2,
            connectors: 1,
            forwarded_bytes: 4096,
            accepted: 3,
            ..RelayStats::default()
        };
        r.refused[Refusal::BadCertificate as usize] = 1;
        let mut s = Sample::starting(NodeRole::Relay, certs());
        s.relay = Some(r);
        let text = render(&s, Format::OpenMetrics);
        for want in [
            "sluice_relay_connections 2",
            "sluice_relay_registered_connectors 1",
            "sluice_relay_forwarded_bytes_total 4096",
            "sluice_relay_accepted_connections_total 3",
            "sluice_relay_refused_connections_total{reason=\"bad_certificate\"} 1",
            "sluice_build_info{version=\"0.1.0\",role=\"relay\"} 1",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        assert!(!text.contains("sluice_tunnel_"), "{text}");
    }
}
