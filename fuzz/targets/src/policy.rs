//! `policy`: a policy file as an admin writes it (policy/src/compile.rs): parse, validate and
//! compile, the diagnostics rendered as `sluice policy check` prints them, and a compiled
//! policy's matcher asked about a few flows and names.

use std::net::IpAddr;

use sluice_policy::{Flow, Proto};

pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let c = match sluice_policy::compile(text, "policy.yaml", 1_800_000_000) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    for w in &c.warnings {
        let _ = w.to_string();
    }
    let p = &c.policy;
    let _ = c.policy_groups();
    let _ = p.dns_domains();
    let users = ["alice", "bob", "mallory", ""];
    let groups = ["lab".to_string(), "staff".to_string()];
    let dsts: [IpAddr; 4] = [
        [198, 51, 100, 10].into(),
        [10, 10, 1, 200].into(),
        "2001:db8:10::1".parse().expect("v6"),
        "::ffff:10.0.0.53".parse().expect("mapped"),
    ];
    let names = [None, Some("wiki.corp.internal"), Some("GIT.example.com.")];
    for user in users {
        let s = p.subject(user, &groups);
        for dst in dsts {
            for hostname in names {
                for (proto, port) in [(Proto::Tcp, 443), (Proto::Udp, 53), (Proto::Icmp, 0)] {
                    let flow = Flow {
                        dst,
                        hostname,
                        proto,
                        port,
                    };
                    let d = p.decide(&s, &flow, 1_800_000_000);
                    let _ = (p.describe(&d), p.rule_name(&d), d.allowed());
                }
            }
            if let Some(host) = names[1] {
                let _ = p.name_allowed(&s, host, 0, None);
                let _ = p.has_hostname(host);
            }
        }
    }
}
