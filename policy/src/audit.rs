//! The audit log: every new-flow decision as one JSON line.

use std::net::SocketAddr;

use serde::Serialize;

use crate::matcher::{Decision, Flow, Policy};

#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord<'a> {
    /// RFC 3339, UTC.
    pub time: String,
    /// Where the decision was taken: `agent` or `connector`.
    pub enforcer: &'a str,
    pub user: &'a str,
    /// The agent's peer id (hash of its key), which names the device.
    pub device: &'a str,
    pub source: String,
    pub destination: String,
    pub hostname: Option<&'a str>,
    pub protocol: &'a str,
    pub port: u16,
    pub decision: &'a str,
    pub rule: &'a str,
    pub resource: Option<&'a str>,
}

impl AuditRecord<'_> {
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// One new-flow decision, as its enforcer saw it: the agent engine and the connector core both
/// write their audit lines from this.
pub struct FlowDecision<'a> {
    /// `agent` or `connector`.
    pub enforcer: &'a str,
    pub user: &'a str,
    pub device: &'a str,
    pub source: SocketAddr,
    pub flow: &'a Flow<'a>,
    pub decision: &'a Decision,
}

impl FlowDecision<'_> {
    /// The JSON line, stamped with the wall clock `unix_nanos` (nanoseconds since the epoch).
    pub fn line(&self, policy: &Policy, unix_nanos: i128) -> String {
        let (f, d) = (self.flow, self.decision);
        AuditRecord {
            time: rfc3339_at(unix_nanos),
            enforcer: self.enforcer,
            user: self.user,
            device: self.device,
            source: self.source.to_string(),
            destination: SocketAddr::new(f.dst, f.port).to_string(),
            hostname: f.hostname,
            protocol: f.proto.as_str(),
            port: f.port,
            decision: if d.allowed() { "allow" } else { "deny" },
            rule: policy.rule_name(d),
            resource: d.resource.map(|id| policy.resource(id).name.as_str()),
        }
        .to_line()
    }
}

pub fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// RFC 3339 (UTC) for a wall-clock time given in nanoseconds since the Unix epoch (the agent
/// engine reads no clock: its host's time comes in).
pub fn rfc3339_at(unix_nanos: i128) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(unix_nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}
