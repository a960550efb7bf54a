//! `config`: a role's configuration file (linux/src/config.rs), read as each of the three
//! roles; an agent's that parses is validated too.

use sluice::config::{self, AgentConfig, ConnectorConfig, RelayConfig};

pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::parse::<AgentConfig>(text, "agent.yaml") {
        Ok(a) => {
            let _ = a.validate("agent.yaml").map_err(|e| e.to_string());
            let _ = a.dns_address();
            let _ = a.identity();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    if let Err(e) = config::parse::<ConnectorConfig>(text, "connector.yaml") {
        let _ = e.to_string();
    }
    if let Err(e) = config::parse::<RelayConfig>(text, "relay.yaml") {
        let _ = e.to_string();
    }
}
