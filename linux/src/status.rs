//! `sluice status`: what a running agent's tunnels are doing, read from its local control
//! socket.
//!
//! The agent publishes a snapshot ([`AgentStatus`]) once a second on a watch channel; the
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

use crate::config::{self, AgentConfig};

/// Where the agent listens unless its config says otherwise (`status_socket`).
pub const DEFAULT_SOCKET: &str = "/run/sluice/agent.sock";
/// A client that does not take its reply within this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `sluice status` waits for the agent's reply.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Larger replies are not a status snapshot (thousands of tunnels stay far below this).
const MAX_REPLY: u64 = 16 << 20;

pub use sluice_dataplane::status::*;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("no agent running (no socket at {0}); is `sluice agent` running?")]
    NoAgent(PathBuf),
    #[error(
        "no agent running (nothing listens on the stale socket {0}); is `sluice agent` running?"
    )]
    Stale(PathBuf),
    #[error("permission denied on {0}: only the agent's user (usually root) may read its status")]
    PermissionDenied(PathBuf),
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
pub fn serve(path: &Path, rx: watch::Receiver<AgentStatus>) -> Result<StatusServer, StatusError> {
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

async fn accept_loop(listener: tokio::net::UnixListener, rx: watch::Receiver<AgentStatus>) {
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

/// Reads one snapshot from the agent listening on `path`.
pub fn fetch(path: &Path) -> Result<AgentStatus, StatusError> {
    use std::io::ErrorKind;
    let p = || path.to_path_buf();
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => StatusError::NoAgent(p()),
        ErrorKind::ConnectionRefused => StatusError::Stale(p()),
        ErrorKind::PermissionDenied => StatusError::PermissionDenied(p()),
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

/// The agent's one line of JSON.
fn parse_reply(buf: &[u8]) -> Result<AgentStatus, String> {
    if buf.len() as u64 > MAX_REPLY {
        return Err(format!("more than {MAX_REPLY} bytes"));
    }
    let text = std::str::from_utf8(buf).map_err(|_| "not UTF-8".to_string())?;
    let text = text.trim();
    if text.is_empty() {
        return Err("empty reply".into());
    }
    serde_json::from_str(text).map_err(|e| e.to_string())
}

#[derive(Args)]
pub struct StatusArgs {
    /// The agent's status socket (default: `status_socket` of --config, else
    /// /run/sluice/agent.sock).
    #[arg(long, conflicts_with = "config")]
    pub socket: Option<PathBuf>,
    /// The agent's YAML configuration: its `status_socket` says where to ask.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Print the status as JSON (for scripts); `path` is "direct" or "relay".
    #[arg(long)]
    pub json: bool,
}

/// `sluice status`.
pub fn run(args: StatusArgs) -> Result<()> {
    let path = match (args.socket, args.config) {
        (Some(s), _) => s,
        (None, Some(c)) => config::load::<AgentConfig>(&c)?.status_socket,
        (None, None) => PathBuf::from(DEFAULT_SOCKET),
    };
    let st = fetch(&path)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print!("{}", render(&st));
    }
    Ok(())
}

/// The human form: a line about the agent and its relay, then one line per tunnel.
pub fn render(st: &AgentStatus) -> String {
    let short = st.peer_id.get(..16).unwrap_or(&st.peer_id);
    let relay = match (&st.relay.connected, &st.relay.observed_addr) {
        (true, Some(a)) => format!("connected, sees us at {a}"),
        (true, None) => "connected".to_string(),
        (false, _) => match &st.relay.error {
            Some(why) => format!("not connected ({why})"),
            None => "not connected".to_string(),
        },
    };
    let mut out = format!(
        "agent {} (peer {short}), relay {}: {relay}\n",
        st.name, st.relay.addr
    );
    if st.tunnels.is_empty() {
        out.push_str("no tunnels yet (one opens on the first packet to a resource)\n");
        return out;
    }
    let rows: Vec<[String; 7]> = st
        .tunnels
        .iter()
        .map(|t| {
            let path = match (t.path, &t.direct_addr) {
                (PathKind::Direct, Some(a)) => format!("direct {a}"),
                (PathKind::Direct, None) => "direct".to_string(),
                (PathKind::Relay, _) => "relay".to_string(),
            };
            let state = match t.state {
                TunnelState::Connecting => "connecting",
                TunnelState::Up => "up",
                TunnelState::Closed => "closed",
            };
            [
                t.connector.clone(),
                state.to_string(),
                path,
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
    let mut w = head.map(|h| h.chars().count());
    for r in &rows {
        for (w, c) in w.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut line = |cells: [&str; 7]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            // Numbers line up on the right, words on the left.
            let pad = w[i].saturating_sub(c.chars().count());
            if (3..=5).contains(&i) {
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
    for r in &rows {
        line(r.each_ref().map(String::as_str));
    }
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
        // The server's one-line form parses as the client reads it.
        assert_eq!(parse_reply(format!("{text}\n").as_bytes()).unwrap(), st);
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
        let text = render(&sample());
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
        let text = render(&st);
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

    #[tokio::test]
    async fn server_answers_and_cleans_up() {
        let dir = std::env::temp_dir().join(format!("sluice-status-{}", std::process::id()));
        let path = dir.join("sub").join("agent.sock");
        let (tx, rx) = watch::channel(sample());
        let server = serve(&path, rx).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second agent on the same socket is refused while the first serves.
        let (_tx2, rx2) = watch::channel(sample());
        assert!(matches!(serve(&path, rx2), Err(StatusError::InUse(_))));
        let mut st = sample();
        st.tunnels.pop();
        tx.send(st.clone()).unwrap();
        let p = path.clone();
        let got = tokio::task::spawn_blocking(move || fetch(&p))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, st);
        drop(server);
        assert!(!path.exists(), "socket left behind");
        let e = fetch(&path).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "no agent running (no socket at {}); is `sluice agent` running?",
                path.display()
            )
        );
        // A socket nobody listens on (an agent that was killed) is replaced at start.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(matches!(fetch(&path), Err(StatusError::Stale(_))));
        let (_tx3, rx3) = watch::channel(sample());
        let server = serve(&path, rx3).unwrap();
        drop(server);
        // Never replaces what is not a socket.
        std::fs::write(&path, "precious").unwrap();
        let (_tx4, rx4) = watch::channel(sample());
        assert!(matches!(serve(&path, rx4), Err(StatusError::NotASocket(_))));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
