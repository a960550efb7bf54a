//! The audit log: every new-flow decision as one JSON line.

use serde::Serialize;

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
