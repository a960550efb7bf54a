//! Events for the host as the JSON objects the header documents, and the bounded queue
//! `next_event` reads them from.

use std::collections::VecDeque;

use serde::Serialize;
use sluice_dataplane::engine::Settings;
use sluice_dataplane::status::{PathKind, TunnelState};

/// Events held for a host that does not read them; past this audit lines go first.
pub(crate) const EVENTS_MAX: usize = 512;

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum HostEvent {
    Settings {
        generation: u64,
        ipv4: String,
        ipv6: Option<String>,
        mtu: u16,
        routes: Vec<String>,
        dns_servers: Vec<String>,
        match_domains: Vec<String>,
    },
    Tunnel {
        connector: String,
        state: TunnelState,
        path: PathKind,
    },
    Audit {
        line: String,
    },
    Stopped {
        reason: String,
    },
}

impl HostEvent {
    pub fn settings(s: &Settings) -> HostEvent {
        HostEvent::Settings {
            generation: s.generation,
            ipv4: s.ipv4.to_string(),
            ipv6: s.ipv6.map(|n| n.to_string()),
            mtu: s.mtu,
            routes: s.routes.iter().map(|r| r.to_string()).collect(),
            dns_servers: s.dns_servers.iter().map(|a| a.to_string()).collect(),
            match_domains: s.match_domains.clone(),
        }
    }

    pub fn json(&self) -> String {
        // Plain data: serializing cannot fail; an empty object would still be valid JSON.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }

    fn is_audit(&self) -> bool {
        matches!(self, HostEvent::Audit { .. })
    }
}

/// A bounded queue of JSON events. Settings and tunnel states matter more than audit lines: a
/// full queue drops its oldest audit line first, then its oldest event.
#[derive(Default)]
pub struct EventQueue {
    items: VecDeque<(bool, String)>,
    pub dropped: u64,
}

impl EventQueue {
    pub fn push(&mut self, e: &HostEvent) {
        if self.items.len() >= EVENTS_MAX {
            let i = self.items.iter().position(|(audit, _)| *audit).unwrap_or(0);
            self.items.remove(i);
            self.dropped += 1;
        }
        self.items.push_back((e.is_audit(), e.json()));
    }

    pub fn front(&self) -> Option<&str> {
        self.items.front().map(|(_, s)| s.as_str())
    }

    pub fn pop(&mut self) {
        self.items.pop_front();
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.items.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;

    #[test]
    fn events_are_the_documented_json() {
        let s = Settings {
            generation: 1,
            ipv4: "100.96.0.1/32".parse().unwrap(),
            ipv6: Some("fd5c:1ce0:1::1/128".parse().unwrap()),
            mtu: 1280,
            routes: vec!["10.0.0.0/24".parse::<IpNet>().unwrap()],
            dns_servers: vec!["100.96.0.53".parse().unwrap()],
            match_domains: vec!["corp.internal".into()],
        };
        assert_eq!(
            HostEvent::settings(&s).json(),
            r#"{"type":"settings","generation":1,"ipv4":"100.96.0.1/32","ipv6":"fd5c:1ce0:1::1/128","mtu":1280,"routes":["10.0.0.0/24"],"dns_servers":["100.96.0.53"],"match_domains":["corp.internal"]}"#
        );
        let t = HostEvent::Tunnel {
            connector: "office".into(),
            state: TunnelState::Up,
            path: PathKind::Direct,
        };
        assert_eq!(
            t.json(),
            r#"{"type":"tunnel","connector":"office","state":"up","path":"direct"}"#
        );
        let a = HostEvent::Audit {
            line: r#"{"a":1}"#.into(),
        };
        assert_eq!(a.json(), r#"{"type":"audit","line":"{\"a\":1}"}"#);
        let st = HostEvent::Stopped {
            reason: "fd".into(),
        };
        assert_eq!(st.json(), r#"{"type":"stopped","reason":"fd"}"#);
    }

    #[test]
    fn a_full_queue_drops_audit_lines_first() {
        let mut q = EventQueue::default();
        q.push(&HostEvent::Stopped {
            reason: "first".into(),
        });
        for i in 0..EVENTS_MAX + 10 {
            q.push(&HostEvent::Audit {
                line: i.to_string(),
            });
        }
        assert_eq!(q.len(), EVENTS_MAX);
        assert_eq!(q.dropped, 11);
        assert!(q.front().unwrap().contains("first"));
    }
}
