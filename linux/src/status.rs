//! `sluice status`: what a running node is doing, read from its local status socket: an
//! agent's tunnels, a connector's agents, a relay's peers.
//!
//! Each role publishes a snapshot ([`NodeStatus`]) once a second on a watch channel; the
//! server here answers every connection on the Unix socket with the latest snapshot as one
//! line of JSON and closes it, so the packet path never waits on a reader.

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::config::{self, AgentConfig, ConnectorConfig, RelayConfig};

// The default socket paths live in the library beside the config that uses them.
pub use sluice::status::{CONNECTOR_SOCKET, DEFAULT_SOCKET, RELAY_SOCKET};
/// A client that does not take its reply within this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `sluice status` waits for the agent's reply.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Larger replies are not a status snapshot (thousands of tunnels stay far below this).
const MAX_REPLY: u64 = 16 << 20;

pub use sluice_dataplane::status::*;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("no {1} running (no socket at {0}); is `sluice {1}` running?")]
    NoNode(PathBuf, &'static str),
    #[error("no {1} running (nothing listens on the stale socket {0}); is `sluice {1}` running?")]
    Stale(PathBuf, &'static str),
    #[error("permission denied on {0}: only the {1}'s user may read its status (root, or the sluice user)")]
    PermissionDenied(PathBuf, &'static str),
    #[error("{path} is a {found}'s status socket, not an agent's")]
    WrongRole { path: PathBuf, found: &'static str },
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{path}: not the reply of a sluice agent: {why}")]
    BadReply { path: PathBuf, why: String },
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("{0}: another agent is serving its status there")]
    InUse(PathBuf),
}

/// The agent's status socket, served while this lives; the file is removed on drop.
pub struct StatusServer {
    path: PathBuf,
    /// Device and inode of the socket we made: the file is removed only if it is still ours
    /// (a newer agent may have replaced it).
    id: Option<(u64, u64)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StatusServer {
    fn drop(&mut self) {
        self.task.abort();
        let ours = std::fs::symlink_metadata(&self.path)
            .ok()
            .is_some_and(|m| Some((m.dev(), m.ino())) == self.id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Listens on `path` (mode 0600) and answers each connection with the latest snapshot from
/// `rx`. Binds before returning, so a bad path is an error at startup; must run inside a tokio
/// runtime.
pub fn serve(path: &Path, rx: watch::Receiver<NodeStatus>) -> Result<StatusServer, StatusError> {
    let io = |e| StatusError::Io(path.to_path_buf(), e);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| StatusError::Io(dir.to_path_buf(), e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // Left by an agent that died; a live one still accepts.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(StatusError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(io)?;
        }
        Ok(_) => return Err(StatusError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let std_listener = std::os::unix::net::UnixListener::bind(path).map_err(io)?;
    // Tunnel names, peers and addresses are the user's business only. (A client connecting
    // between bind and chmod is possible, but would need to beat us to a root-owned /run.)
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    let id = std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()));
    std_listener.set_nonblocking(true).map_err(io)?;
    let listener = tokio::net::UnixListener::from_std(std_listener).map_err(io)?;
    let task = tokio::spawn(accept_loop(listener, rx));
    Ok(StatusServer {
        path: path.to_path_buf(),
        id,
        task,
    })
}

/// [`serve`], or a warning and None: without a status socket the node still works, so a bad
/// path is no reason to refuse to start. Held until the node stops; the file goes on drop.
pub fn serve_or_warn(
    path: &Path,
    rx: watch::Receiver<NodeStatus>,
    role: &str,
) -> Option<StatusServer> {
    match serve(path, rx) {
        Ok(s) => {
            tracing::info!("status socket {}", path.display());
            Some(s)
        }
        Err(e) => {
            tracing::warn!("no status socket, `sluice status` cannot reach this {role}: {e}");
            None
        }
    }
}

async fn accept_loop(listener: tokio::net::UnixListener, rx: watch::Receiver<NodeStatus>) {
    loop {
        let mut stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors, say: wait instead of spinning on the error.
                tracing::warn!("status socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let line = match serde_json::to_string(&*rx.borrow()) {
            Ok(mut l) => {
                l.push('\n');
                l
            }
            Err(e) => {
                tracing::warn!("status socket: cannot encode the status: {e}");
                continue;
            }
        };
        // Its own task: a client that does not read cannot hold up the next one.
        tokio::spawn(async move {
            let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
                stream.write_all(line.as_bytes()).await?;
                stream.shutdown().await
            })
            .await;
        });
    }
}

/// Reads the lab agent's snapshot (another role's is an error).
pub fn fetch_agent(path: &Path) -> Result<AgentStatus, StatusError> {
    match fetch(path, "agent")? {
        NodeStatus::Agent(a) => Ok(a),
        other => Err(StatusError::WrongRole {
            path: path.to_path_buf(),
            found: role_of(&other),
        }),
    }
}

fn role_of(st: &NodeStatus) -> &'static str {
    match st {
        NodeStatus::Agent(_) => "agent",
        NodeStatus::Connector(_) => "connector",
        NodeStatus::Relay(_) => "relay",
    }
}

/// Reads one snapshot from the node listening on `path` (`role`: what errors call it).
pub fn fetch(path: &Path, role: &'static str) -> Result<NodeStatus, StatusError> {
    use std::io::ErrorKind;
    let p = || path.to_path_buf();
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => StatusError::NoNode(p(), role),
        ErrorKind::ConnectionRefused => StatusError::Stale(p(), role),
        ErrorKind::PermissionDenied => StatusError::PermissionDenied(p(), role),
        _ => StatusError::Io(p(), e),
    })?;
    s.set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| StatusError::Io(p(), e))?;
    let mut buf = Vec::new();
    (&mut s)
        .take(MAX_REPLY + 1)
        .read_to_end(&mut buf)
        .map_err(|e| match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => StatusError::BadReply {
                path: p(),
                why: format!("no reply within {}s", READ_TIMEOUT.as_secs()),
            },
            _ => StatusError::Io(p(), e),
        })?;
    parse_reply(&buf).map_err(|why| StatusError::BadReply { path: p(), why })
}

/// The node's one line of JSON (an agent from before roles were named says no `role`).
fn parse_reply(buf: &[u8]) -> Result<NodeStatus, String> {
    if buf.len() as u64 > MAX_REPLY {
        return Err(format!("more than {MAX_REPLY} bytes"));
    }
    let text = std::str::from_utf8(buf).map_err(|_| "not UTF-8".to_string())?;
    let text = text.trim();
    if text.is_empty() {
        return Err("empty reply".into());
    }
    match serde_json::from_str::<NodeStatus>(text) {
        Ok(st) => Ok(st),
        Err(e) => match serde_json::from_str::<AgentStatus>(text) {
            Ok(a) => Ok(NodeStatus::Agent(a)),
            Err(_) => Err(e.to_string()),
        },
    }
}

/// Which role `sluice status` asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusRole {
    Agent,
    Connector,
    Relay,
}

impl StatusRole {
    fn name(self) -> &'static str {
        match self {
            StatusRole::Agent => "agent",
            StatusRole::Connector => "connector",
            StatusRole::Relay => "relay",
        }
    }

    fn default_socket(self) -> &'static str {
        match self {
            StatusRole::Agent => DEFAULT_SOCKET,
            StatusRole::Connector => CONNECTOR_SOCKET,
            StatusRole::Relay => RELAY_SOCKET,
        }
    }
}

#[derive(Args)]
pub struct StatusArgs {
    /// Which role to ask (default: the agent; with neither --role nor --socket nor --config,
    /// whichever of agent, connector and relay runs here).
    #[arg(long, value_enum)]
    pub role: Option<StatusRole>,
    /// The node's status socket (default: `status_socket` of --config, else the role's:
    /// /run/sluice/agent.sock, /run/sluice/connector/status.sock, /run/sluice/relay/status.sock).
    #[arg(long, conflicts_with = "config")]
    pub socket: Option<PathBuf>,
    /// The node's YAML configuration (of --role, default the agent): its `status_socket`
    /// says where to ask.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Print the status as JSON (for scripts); `role` says whose; `path` is "direct" or
    /// "relay".
    #[arg(long)]
    pub json: bool,
}

/// `sluice status`.
pub fn run(args: StatusArgs) -> Result<()> {
    let role = args.role.unwrap_or(StatusRole::Agent);
    let path = match (args.socket, args.config) {
        (Some(s), _) => s,
        (None, Some(c)) => match role {
            StatusRole::Agent => config::load::<AgentConfig>(&c)?.status_socket,
            StatusRole::Connector => config::load::<ConnectorConfig>(&c)?.status_socket,
            StatusRole::Relay => config::load::<RelayConfig>(&c)?.status_socket,
        },
        (None, None) => match args.role {
            Some(r) => PathBuf::from(r.default_socket()),
            // The first role with a socket here; the agent's path in the error otherwise.
            None => [StatusRole::Agent, StatusRole::Connector, StatusRole::Relay]
                .iter()
                .map(|r| PathBuf::from(r.default_socket()))
                .find(|p| p.exists())
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
        },
    };
    let st = fetch(&path, role.name())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print!("{}", render(&st));
    }
    Ok(())
}

/// The human form of any role's status.
pub fn render(st: &NodeStatus) -> String {
    match st {
        NodeStatus::Agent(a) => render_agent(a),
        NodeStatus::Connector(c) => render_connector(c),
        NodeStatus::Relay(r) => render_relay(r),
    }
}

fn relay_line(r: &RelayStatus) -> String {
    match (&r.connected, &r.observed_addr) {
        (true, Some(a)) => format!("connected, sees us at {a}"),
        (true, None) => "connected".to_string(),
        (false, _) => match &r.error {
            Some(why) => format!("not connected ({why})"),
            None => "not connected".to_string(),
        },
    }
}

fn state_word(s: TunnelState) -> &'static str {
    match s {
        TunnelState::Connecting => "connecting",
        TunnelState::Up => "up",
        TunnelState::Closed => "closed",
    }
}

fn path_word(path: PathKind, direct: &Option<String>) -> String {
    match (path, direct) {
        (PathKind::Direct, Some(a)) => format!("direct {a}"),
        (PathKind::Direct, None) => "direct".to_string(),
        (PathKind::Relay, _) => "relay".to_string(),
    }
}

/// Columns padded to their widest cell; the columns in `right` line up on the right (numbers),
/// the others on the left.
fn table<const N: usize>(head: [&str; N], rows: &[[String; N]], right: &[usize]) -> String {
    let mut w = head.map(|h| h.chars().count());
    for r in rows {
        for (w, c) in w.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; N]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = w[i].saturating_sub(c.chars().count());
            if right.contains(&i) {
                l.push_str(&" ".repeat(pad));
                l.push_str(c);
            } else {
                l.push_str(c);
                l.push_str(&" ".repeat(pad));
            }
            l.push_str("  ");
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(head);
    for r in rows {
        line(r.each_ref().map(String::as_str));
    }
    out
}

fn short(id: &str) -> &str {
    id.get(..16).unwrap_or(id)
}

/// A connector: a line about it and its relay, then one line per agent's tunnel.
pub fn render_connector(st: &ConnectorStatus) -> String {
    let mut out = format!(
        "connector {} (peer {}), relay {}: {}\n",
        st.name,
        short(&st.peer_id),
        st.relay.addr,
        relay_line(&st.relay)
    );
    if st.tunnels.is_empty() {
        out.push_str("no agents connected\n");
        return out;
    }
    let rows: Vec<[String; 9]> = st
        .tunnels
        .iter()
        .map(|t| {
            [
                t.user.clone().unwrap_or_else(|| "?".into()),
                if t.groups.is_empty() {
                    "-".into()
                } else {
                    t.groups.join(",")
                },
                short(&t.peer_id).to_string(),
                state_word(t.state).to_string(),
                path_word(t.path, &t.direct_addr),
                t.rtt_ms.map_or("-".into(), human_ms),
                t.flows.to_string(),
                human_bytes(t.bytes_sent),
                human_bytes(t.bytes_received),
            ]
        })
        .collect();
    let head = [
        "USER",
        "GROUPS",
        "PEER",
        "STATE",
        "PATH",
        "RTT",
        "FLOWS",
        "SENT ↑",
        "RECEIVED ↓",
    ];
    out.push_str(&table(head, &rows, &[5, 6, 7, 8]));
    out
}

/// A relay: a line about it, then one line per connected node.
pub fn render_relay(st: &RelayNodeStatus) -> String {
    let registered = st
        .peers
        .iter()
        .filter(|p| p.registered && p.role.as_deref() == Some("connector"))
        .count();
    let mut out = format!(
        "relay {} (peer {}) on {}: {} peer(s), {registered} connector(s) registered, forwarded {} in {} packets\n",
        st.name,
        short(&st.peer_id),
        st.listen,
        st.peers.len(),
        human_bytes(st.forwarded_bytes),
        st.forwarded_packets
    );
    if let Some(reg) = &st.registry {
        out.push_str(&render_registry(reg));
    }
    if st.peers.is_empty() {
        out.push_str("no peers connected\n");
        return out;
    }
    let rows: Vec<[String; 6]> = st
        .peers
        .iter()
        .map(|p| {
            [
                p.name.clone().unwrap_or_else(|| "(handshake)".into()),
                p.role.clone().unwrap_or_else(|| "-".into()),
                p.peer_id.as_deref().map_or("-", short).to_string(),
                p.addr.clone(),
                if p.registered { "yes" } else { "no" }.to_string(),
                human_bytes(p.forwarded_bytes),
            ]
        })
        .collect();
    let head = ["PEER", "ROLE", "ID", "ADDRESS", "REGISTERED", "FORWARDED"];
    out.push_str(&table(head, &rows, &[5]));
    out
}

/// A relay's view of the shared registry: the relays, and where each connector is homed.
fn render_registry(reg: &RegistryStatus) -> String {
    let relays: Vec<String> = reg
        .relays
        .iter()
        .map(|r| format!("{} ({}, {})", r.name, r.region, r.addr))
        .collect();
    let connectors: Vec<String> = reg
        .connectors
        .iter()
        .map(|c| format!("{} on {}", c.name, c.home))
        .collect();
    format!(
        "registry (etcd {}): relays {}; connectors {}\n",
        if reg.etcd_up {
            "up"
        } else {
            "unreachable, serving from cache"
        },
        if relays.is_empty() {
            "none".into()
        } else {
            relays.join(", ")
        },
        if connectors.is_empty() {
            "none".into()
        } else {
            connectors.join(", ")
        },
    )
}

/// The human form: a line about the agent and its relay, then one line per tunnel.
pub fn render_agent(st: &AgentStatus) -> String {
    let mut out = format!(
        "agent {} (peer {}), relay {}: {}\n",
        st.name,
        short(&st.peer_id),
        st.relay.addr,
        relay_line(&st.relay)
    );
    if st.tunnels.is_empty() {
        out.push_str("no tunnels yet (one opens on the first packet to a resource)\n");
        return out;
    }
    let rows: Vec<[String; 7]> = st
        .tunnels
        .iter()
        .map(|t| {
            [
                t.connector.clone(),
                state_word(t.state).to_string(),
                path_word(t.path, &t.direct_addr),
                t.rtt_ms.map_or("-".into(), human_ms),
                human_bytes(t.bytes_sent),
                human_bytes(t.bytes_received),
                t.since_switch_secs.map_or("never".into(), human_secs),
            ]
        })
        .collect();
    let head = [
        "CONNECTOR",
        "STATE",
        "PATH",
        "RTT",
        "SENT ↑",
        "RECEIVED ↓",
        "SINCE SWITCH",
    ];
    out.push_str(&table(head, &rows, &[3, 4, 5]));
    out
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `12.0 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// Milliseconds with the precision that matters at that size.
pub fn human_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 100.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// An age: `42s`, `3m 07s`, `2h 05m`, `4d 03h`.
pub fn human_secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {:02}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AgentStatus {
        AgentStatus {
            name: "alice".into(),
            peer_id: "0123456789abcdef".repeat(4),
            relay: RelayStatus {
                addr: "192.0.2.1:4433".into(),
                connected: true,
                observed_addr: Some("192.0.2.10:40000".into()),
                error: None,
            },
            tunnels: vec![
                TunnelStatus {
                    connector: "conn-1".into(),
                    peer_id: Some("ab".repeat(32)),
                    state: TunnelState::Up,
                    path: PathKind::Direct,
                    direct_addr: Some("192.0.2.20:4433".into()),
                    candidate_pair: Some(CandidatePair {
                        local: "192.0.2.10:40000".into(),
                        remote: "192.0.2.20:4433".into(),
                    }),
                    rtt_ms: Some(0.412),
                    bytes_sent: 1536,
                    bytes_received: 5 * 1024 * 1024 + 300 * 1024,
                    packets_sent: 10,
                    packets_received: 20,
                    since_switch_secs: Some(187.5),
                    up_secs: 200.0,
                },
                TunnelStatus::without_tunnel("database-connector".into(), TunnelState::Connecting),
            ],
        }
    }

    #[test]
    fn json_round_trip_and_field_forms() {
        let st = sample();
        let text = serde_json::to_string(&st).unwrap();
        let back: AgentStatus = serde_json::from_str(&text).unwrap();
        assert_eq!(back, st);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["tunnels"][0]["path"], "direct");
        assert_eq!(v["tunnels"][1]["path"], "relay");
        assert_eq!(v["tunnels"][0]["state"], "up");
        assert_eq!(v["tunnels"][1]["state"], "connecting");
        // Absent values are explicit nulls, so scripts can rely on every key.
        assert!(v["tunnels"][1]["rtt_ms"].is_null());
        assert!(v["tunnels"][1]
            .as_object()
            .unwrap()
            .contains_key("since_switch_secs"));
        // An agent from before roles were named still parses, as an agent.
        assert_eq!(
            parse_reply(format!("{text}\n").as_bytes()).unwrap(),
            NodeStatus::Agent(st.clone())
        );
        // The server's one-line form names the role and parses as the client reads it.
        let doc = NodeStatus::Agent(st);
        let tagged = serde_json::to_string(&doc).unwrap();
        assert!(tagged.starts_with("{\"role\":\"agent\","), "{tagged}");
        assert_eq!(parse_reply(tagged.as_bytes()).unwrap(), doc);
    }

    #[test]
    fn bad_replies_are_errors() {
        assert_eq!(parse_reply(b"").unwrap_err(), "empty reply");
        assert!(parse_reply(b"HTTP/1.1 400 Bad Request\r\n").is_err());
        assert!(parse_reply(b"{\"name\": \"x\"}").is_err());
        assert!(parse_reply(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn table_shows_each_tunnel_in_human_units() {
        let text = render_agent(&sample());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "agent alice (peer 0123456789abcdef), relay 192.0.2.1:4433: connected, sees us at 192.0.2.10:40000"
        );
        assert!(lines[1].starts_with("CONNECTOR "), "{text}");
        let conn = lines[2];
        for want in [
            "conn-1",
            "up",
            "direct 192.0.2.20:4433",
            "0.41 ms",
            "1.5 KiB",
            "5.3 MiB",
            "3m 07s",
        ] {
            assert!(conn.contains(want), "{want:?} missing from {conn:?}");
        }
        let waiting = lines[3];
        for want in [
            "database-connector",
            "connecting",
            "relay",
            "-",
            "0 B",
            "never",
        ] {
            assert!(waiting.contains(want), "{want:?} missing from {waiting:?}");
        }
        // Columns line up: every row has its path column where the header has it.
        let at = lines[1].find("PATH").unwrap();
        assert_eq!(lines[2].find("direct"), Some(at), "{text}");
        assert_eq!(lines[3].find("relay"), Some(at), "{text}");
        assert_eq!(lines.len(), 4);
    }

    #[test]
    fn empty_agent_says_so() {
        let mut st = sample();
        st.tunnels.clear();
        st.relay.connected = false;
        st.relay.error = Some("the peer refused us: certificate expired".into());
        let text = render_agent(&st);
        assert!(
            text.contains(
                "relay 192.0.2.1:4433: not connected (the peer refused us: certificate expired)"
            ),
            "{text}"
        );
        assert!(text.contains("no tunnels yet"), "{text}");
    }

    #[test]
    fn units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(200 * 1024 * 1024), "200.0 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
        assert_eq!(human_ms(0.4123), "0.41 ms");
        assert_eq!(human_ms(25.04), "25.0 ms");
        assert_eq!(human_ms(250.4), "250 ms");
        assert_eq!(human_secs(0.4), "0s");
        assert_eq!(human_secs(59.9), "59s");
        assert_eq!(human_secs(187.5), "3m 07s");
        assert_eq!(human_secs(2.0 * 3600.0 + 5.0 * 60.0), "2h 05m");
        assert_eq!(human_secs(4.0 * 86400.0 + 3.0 * 3600.0), "4d 03h");
        assert_eq!(secs(Duration::from_micros(1_234_567)), 1.235);
        assert_eq!(millis(Duration::from_micros(412)), 0.412);
    }

    #[test]
    fn connector_and_relay_tables() {
        let c = ConnectorStatus {
            name: "conn-1".into(),
            peer_id: "ab".repeat(32),
            relay: RelayStatus {
                addr: "192.0.2.1:4433".into(),
                connected: true,
                observed_addr: None,
                error: None,
            },
            tunnels: vec![AgentTunnelStatus {
                user: Some("alice".into()),
                groups: vec!["eng".into(), "ops".into()],
                peer_id: "cd".repeat(32),
                state: TunnelState::Up,
                path: PathKind::Direct,
                direct_addr: Some("192.0.2.10:40000".into()),
                rtt_ms: Some(0.5),
                flows: 3,
                bytes_sent: 2048,
                bytes_received: 10,
                since_switch_secs: None,
                up_secs: 5.0,
            }],
        };
        let text = render(&NodeStatus::Connector(c.clone()));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "connector conn-1 (peer abababababababab), relay 192.0.2.1:4433: connected"
        );
        assert!(lines[1].starts_with("USER "), "{text}");
        for want in [
            "alice",
            "eng,ops",
            "cdcdcdcdcdcdcdcd",
            "up",
            "direct 192.0.2.10:40000",
            "0.50 ms",
            "3",
            "2.0 KiB",
            "10 B",
        ] {
            assert!(lines[2].contains(want), "{want:?} missing from {text}");
        }
        let doc = serde_json::to_value(NodeStatus::Connector(c)).unwrap();
        assert_eq!(doc["role"], "connector");
        assert_eq!(doc["tunnels"][0]["flows"], 3);

        let r = RelayNodeStatus {
            name: "relay-1".into(),
            peer_id: "ef".repeat(32),
            listen: "0.0.0.0:4433".into(),
            peers: vec![
                RelayPeerStatus {
                    name: Some("conn-1".into()),
                    role: Some("connector".into()),
                    peer_id: Some("ab".repeat(32)),
                    addr: "192.0.2.20:5000".into(),
                    registered: true,
                    forwarded_bytes: 3 << 20,
                },
                RelayPeerStatus {
                    name: None,
                    role: None,
                    peer_id: None,
                    addr: "192.0.2.99:1".into(),
                    registered: false,
                    forwarded_bytes: 0,
                },
            ],
            forwarded_packets: 10,
            forwarded_bytes: 3 << 20,
            registry: None,
        };
        let text = render(&NodeStatus::Relay(r.clone()));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "relay relay-1 (peer efefefefefefefef) on 0.0.0.0:4433: 2 peer(s), 1 connector(s) registered, forwarded 3.0 MiB in 10 packets"
        );
        assert!(
            lines[2].contains("conn-1") && lines[2].contains("yes") && lines[2].contains("3.0 MiB"),
            "{text}"
        );
        assert!(
            lines[3].contains("(handshake)") && lines[3].contains("no"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn server_answers_and_cleans_up() {
        let dir = std::env::temp_dir().join(format!("sluice-status-{}", std::process::id()));
        let path = dir.join("sub").join("agent.sock");
        let (tx, rx) = watch::channel(NodeStatus::Agent(sample()));
        let server = serve(&path, rx).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second agent on the same socket is refused while the first serves.
        let (_tx2, rx2) = watch::channel(NodeStatus::Agent(sample()));
        assert!(matches!(serve(&path, rx2), Err(StatusError::InUse(_))));
        let mut st = sample();
        st.tunnels.pop();
        tx.send(NodeStatus::Agent(st.clone())).unwrap();
        let p = path.clone();
        let got = tokio::task::spawn_blocking(move || fetch_agent(&p))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, st);
        drop(server);
        assert!(!path.exists(), "socket left behind");
        let e = fetch(&path, "agent").unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "no agent running (no socket at {}); is `sluice agent` running?",
                path.display()
            )
        );
        // A socket nobody listens on (an agent that was killed) is replaced at start.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(matches!(
            fetch(&path, "agent"),
            Err(StatusError::Stale(_, "agent"))
        ));
        let (_tx3, rx3) = watch::channel(NodeStatus::Agent(sample()));
        let server = serve(&path, rx3).unwrap();
        drop(server);
        // Never replaces what is not a socket.
        std::fs::write(&path, "precious").unwrap();
        let (_tx4, rx4) = watch::channel(NodeStatus::Agent(sample()));
        assert!(matches!(serve(&path, rx4), Err(StatusError::NotASocket(_))));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
