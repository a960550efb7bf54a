//! A running node as `sluice status --json` shows it: an agent (also an Apple host's status
//! call) with its relay link and each connector's tunnel, a connector with its agents'
//! tunnels, a relay with its peers. Plain serializable data, built by the cores.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A running agent and its tunnels, as `sluice status --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The agent certificate's name.
    pub name: String,
    /// The agent's peer id (SHA-256 of its public key, hex).
    pub peer_id: String,
    pub relay: RelayStatus,
    /// One per connector the agent has used since it started.
    pub tunnels: Vec<TunnelStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayStatus {
    /// The relay's UDP address.
    pub addr: String,
    /// Whether the control connection is up.
    pub connected: bool,
    /// Our address as the relay sees it (QUIC Address Discovery).
    pub observed_addr: Option<String>,
    /// While not connected: why the last attempt failed (`the peer refused us: certificate
    /// expired`, `relay silent`, ...).
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelState {
    /// Looking the connector up, or handshaking.
    Connecting,
    Up,
    /// No tunnel now (it closed, or nothing has needed it since).
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    Direct,
    Relay,
}

/// The ICE candidate pair a direct path uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidatePair {
    pub local: String,
    pub remote: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TunnelStatus {
    /// The connector's name (as the policy's resources name it).
    pub connector: String,
    /// The connector's peer id, once the relay has told us (None while looking it up).
    pub peer_id: Option<String>,
    pub state: TunnelState,
    pub path: PathKind,
    /// The connector's address on the direct path, when that is the path in use.
    pub direct_addr: Option<String>,
    pub candidate_pair: Option<CandidatePair>,
    /// Smoothed round-trip time of the path in use, milliseconds.
    pub rtt_ms: Option<f64>,
    /// QUIC bytes (UDP payloads, retransmissions included) each way.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub packets_sent: u64,
    pub packets_received: u64,
    /// Seconds since the path last changed; None if it never did.
    pub since_switch_secs: Option<f64>,
    /// Seconds since the tunnel came up (0 while it is not up).
    pub up_secs: f64,
}

impl TunnelStatus {
    /// A connector whose tunnel is not up (being looked up or opened, or gone): no numbers yet.
    pub fn without_tunnel(connector: String, state: TunnelState) -> Self {
        TunnelStatus {
            connector,
            peer_id: None,
            state,
            path: PathKind::Relay,
            direct_addr: None,
            candidate_pair: None,
            rtt_ms: None,
            bytes_sent: 0,
            bytes_received: 0,
            packets_sent: 0,
            packets_received: 0,
            since_switch_secs: None,
            up_secs: 0.0,
        }
    }
}

/// What a status socket answers: one node's status, tagged with its role (`"role": "agent"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum NodeStatus {
    Agent(AgentStatus),
    Connector(ConnectorStatus),
    Relay(RelayNodeStatus),
}

/// A running connector and the agents' tunnels to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectorStatus {
    /// The connector certificate's name (the one the policy's resources use).
    pub name: String,
    pub peer_id: String,
    pub relay: RelayStatus,
    /// One per agent with a tunnel here now.
    pub tunnels: Vec<AgentTunnelStatus>,
}

/// One agent's tunnel, as its connector sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentTunnelStatus {
    /// The agent certificate's name (the user), once the handshake proved it.
    pub user: Option<String>,
    pub groups: Vec<String>,
    pub peer_id: String,
    pub state: TunnelState,
    pub path: PathKind,
    pub direct_addr: Option<String>,
    pub rtt_ms: Option<f64>,
    /// Flows open now (TCP connections, UDP flows, pings).
    pub flows: u64,
    /// QUIC bytes (UDP payloads, retransmissions included) each way.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub since_switch_secs: Option<f64>,
    pub up_secs: f64,
}

/// A running relay: who is connected, and what it forwarded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayNodeStatus {
    pub name: String,
    pub peer_id: String,
    /// The UDP address it serves.
    pub listen: String,
    pub peers: Vec<RelayPeerStatus>,
    /// Tunnel packets forwarded since it started (bytes of the end-to-end packets).
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    /// The registry shared with other relays (none for a relay on its own).
    #[serde(default)]
    pub registry: Option<RegistryStatus>,
}

/// What a relay of several knows of the others, from the shared registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryStatus {
    /// Whether etcd answered last time it was asked (the relay serves from its cache if not).
    pub etcd_up: bool,
    /// Every relay with a record, this one included, by name.
    pub relays: Vec<RegistryRelayStatus>,
    /// Every connector with a record, by name, and the relay it is homed on.
    pub connectors: Vec<RegistryConnectorStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryRelayStatus {
    pub name: String,
    pub region: String,
    pub addr: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryConnectorStatus {
    pub name: String,
    pub home: String,
}

/// One node connected to a relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayPeerStatus {
    /// The certificate's name; None while the handshake runs.
    pub name: Option<String>,
    /// `agent` or `connector`; None while the handshake runs.
    pub role: Option<String>,
    pub peer_id: Option<String>,
    /// Its address as the relay sees it.
    pub addr: String,
    /// Whether it holds its peer id's registration (a connector: agents can reach it by name).
    pub registered: bool,
    /// Bytes of tunnel packets it sent through the relay.
    pub forwarded_bytes: u64,
}

/// A duration as seconds with millisecond precision (tidier JSON than 17 digits).
pub fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// A duration as milliseconds with microsecond precision.
pub fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}
