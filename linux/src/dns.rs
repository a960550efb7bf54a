//! The agent's DNS server (split DNS): UDP and TCP on the agent's tunnel address. Queries for
//! resource names are answered with synthetic addresses (A/AAAA) or by the resource's connector
//! (other types); every other query is passed to the upstream resolver and its answer returned
//! unchanged (TCP when the UDP answer is truncated).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use hickory_proto::op::ResponseCode;
use sluice_dataplane::dns::live_flows::LiveFlows;
use sluice_dataplane::dns::pool::SyntheticPool;
use sluice_dataplane::dns::records;
use sluice_dataplane::dns::responder::{respond, Reply};
use sluice_policy::Policy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};

/// How long an upstream resolver has to answer one query.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a connector has to answer (it may have to come up first, then ask its resolver).
const CONNECTOR_TIMEOUT: Duration = Duration::from_secs(4);

/// A query for a resource name's records that only its connector can answer, handed to the
/// agent's packet task (which owns the tunnels).
pub struct ConnectorQuery {
    pub name: String,
    pub query: Vec<u8>,
    pub reply: oneshot::Sender<ConnectorReply>,
}

#[derive(Debug)]
pub enum ConnectorReply {
    /// The connector's answer.
    Answer(Vec<u8>),
    /// This user may not see the name's records: the name exists, with no records to show.
    Hidden,
    /// The connector cannot be reached.
    Unavailable,
}
/// Largest DNS message over TCP (its length prefix is 16 bits).
const MAX_TCP_MESSAGE: usize = 65_535;

/// What the DNS server and the packet path share: the pool, and the policy that says which
/// names are resources.
pub struct DnsState {
    pub pool: SyntheticPool,
    pub policy: Arc<Policy>,
    /// Apps' flows to synthetic addresses: their names keep their addresses.
    pub flows: LiveFlows<FlowKey>,
}

/// A flow as the agent sees it: source, destination, protocol, ports (ICMP: echo id).
pub type FlowKey = (IpAddr, IpAddr, u8, u16, u16);

pub type SharedDns = Arc<Mutex<DnsState>>;

fn unix_now() -> u64 {
    sluice_policy::watch::now_unix().max(0) as u64
}

/// Answers locally or says to forward.
fn local_reply(state: &SharedDns, query: &[u8]) -> Reply {
    let Ok(mut st) = state.lock() else {
        return Reply::Drop;
    };
    let st = &mut *st;
    let policy = st.policy.clone();
    respond(
        query,
        &mut st.pool,
        |name| policy.has_hostname(name),
        unix_now(),
    )
}

/// Reads the upstream resolvers from a resolv.conf-style file (the system's, before the agent
/// took over resolution).
pub fn upstreams_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Queries in flight to one upstream over UDP, by the id we gave them.
type InFlight = Arc<Mutex<HashMap<u16, oneshot::Sender<Vec<u8>>>>>;

/// One connected UDP socket per upstream, shared by all queries: a query gets a fresh random
/// id (restored in the answer), and one task per socket hands answers to their queries. No
/// socket or task per query, which made forwarding 2.7× slower than asking the upstream.
struct UdpUpstream {
    sock: Arc<UdpSocket>,
    in_flight: InFlight,
}

impl UdpUpstream {
    async fn open(upstream: SocketAddr) -> Result<Self> {
        let bind: SocketAddr = if upstream.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = Arc::new(UdpSocket::bind(bind).await?);
        sock.connect(upstream).await?;
        let in_flight: InFlight = Arc::default();
        let (s, f) = (sock.clone(), in_flight.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            loop {
                let n = match s.recv(&mut buf).await {
                    Ok(n) => n,
                    // ICMP errors (port unreachable) surface here: the waiting query times out.
                    Err(_) => continue,
                };
                let Some(id) = buf.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
                    continue;
                };
                let waiting = f.lock().ok().and_then(|mut m| m.remove(&id));
                if let Some(tx) = waiting {
                    let _ = tx.send(buf[..n].to_vec());
                }
            }
        });
        Ok(UdpUpstream { sock, in_flight })
    }

    async fn exchange(&self, query: &[u8]) -> Result<Vec<u8>> {
        let Some(orig) = query.get(..2).map(|b| [b[0], b[1]]) else {
            anyhow::bail!("query too short");
        };
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut m = self
                .in_flight
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?;
            let mut id = rand::random::<u16>();
            while m.contains_key(&id) {
                id = rand::random::<u16>();
            }
            m.insert(id, tx);
            id
        };
        let mut q = query.to_vec();
        q[..2].copy_from_slice(&id.to_be_bytes());
        let result = async {
            self.sock.send(&q).await?;
            let mut a = tokio::time::timeout(UPSTREAM_TIMEOUT, rx)
                .await
                .context("upstream timed out")??;
            a[..2].copy_from_slice(&orig);
            anyhow::Ok(a)
        }
        .await;
        if result.is_err() {
            if let Ok(mut m) = self.in_flight.lock() {
                m.remove(&id);
            }
        }
        result
    }
}

/// The upstream resolvers, as the system had them before the agent took over.
struct Upstreams {
    addrs: Vec<SocketAddr>,
    udp: Vec<Option<UdpUpstream>>,
}

impl Upstreams {
    async fn open(addrs: Vec<SocketAddr>) -> Self {
        let mut udp = Vec::new();
        for a in &addrs {
            udp.push(match UdpUpstream::open(*a).await {
                Ok(u) => Some(u),
                Err(e) => {
                    tracing::warn!("DNS upstream {a}: {e:#}");
                    None
                }
            });
        }
        Upstreams { addrs, udp }
    }
}

async fn forward_tcp(query: &[u8], upstream: SocketAddr) -> Result<Vec<u8>> {
    let exchange = async {
        let mut s = TcpStream::connect(upstream).await?;
        let len = u16::try_from(query.len()).context("query too large")?;
        s.write_all(&len.to_be_bytes()).await?;
        s.write_all(query).await?;
        let n = s.read_u16().await? as usize;
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).await?;
        anyhow::Ok(buf)
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, exchange)
        .await
        .context("upstream timed out")?
}

/// The TC (truncated) bit of a DNS message header.
fn truncated(msg: &[u8]) -> bool {
    msg.get(2).is_some_and(|b| b & 0x02 != 0)
}

/// Passes a query to the upstreams in turn; the first answer comes back unchanged.
async fn forward(query: &[u8], upstreams: &Upstreams, tcp: bool) -> Option<Vec<u8>> {
    for (u, udp) in upstreams.addrs.iter().zip(&upstreams.udp) {
        let r = match udp {
            Some(udp) if !tcp => match udp.exchange(query).await {
                Ok(a) if truncated(&a) => forward_tcp(query, *u).await,
                other => other,
            },
            _ => forward_tcp(query, *u).await,
        };
        match r {
            Ok(a) => return Some(a),
            Err(e) => tracing::debug!("DNS upstream {u}: {e:#}"),
        }
    }
    None
}

/// Asks the resource name's connector (through the agent's packet task).
async fn ask_connector(
    ask: &mpsc::Sender<ConnectorQuery>,
    name: String,
    query: &[u8],
) -> Option<Vec<u8>> {
    let (reply, rx) = oneshot::channel();
    let sent = ask
        .send(ConnectorQuery {
            name,
            query: query.to_vec(),
            reply,
        })
        .await;
    let outcome = match sent {
        Ok(()) => tokio::time::timeout(CONNECTOR_TIMEOUT, rx)
            .await
            .ok()
            .and_then(|r| r.ok()),
        Err(_) => None,
    };
    match outcome {
        Some(ConnectorReply::Answer(a)) => Some(a),
        Some(ConnectorReply::Hidden) => records::answer(query, ResponseCode::NoError, &[], &[]),
        Some(ConnectorReply::Unavailable) | None => {
            records::answer(query, ResponseCode::ServFail, &[], &[])
        }
    }
}

/// Everything a query may need besides the shared state: the upstreams and the way to the
/// connectors.
struct Resolvers {
    upstreams: Upstreams,
    connectors: mpsc::Sender<ConnectorQuery>,
}

/// The answer to one query, from wherever `reply` says it comes; None to stay silent.
async fn answer(reply: Reply, r: &Resolvers, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
    match reply {
        Reply::Answer(a) => Some(a),
        Reply::Drop => None,
        Reply::Forward => forward(query, &r.upstreams, tcp).await,
        Reply::AskConnector { name } => {
            let a = ask_connector(&r.connectors, name, query).await?;
            Some(if tcp { a } else { records::fit_udp(query, a) })
        }
    }
}

/// The next TCP client, or never without a TCP listener.
async fn accept(tcp: Option<&TcpListener>) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match tcp {
        Some(t) => t.accept().await,
        None => std::future::pending().await,
    }
}

/// A non-blocking socket with SO_REUSEADDR, bound to `addr`.
fn reusable(
    addr: SocketAddr,
    ty: socket2::Type,
    proto: socket2::Protocol,
) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), ty, Some(proto))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// The agent's DNS sockets, bound before the agent changes anything in the system.
pub struct Listeners {
    pub addr: SocketAddr,
    udp: UdpSocket,
    tcp: Option<TcpListener>,
}

/// Binds UDP and TCP port 53 on `addr` (the TUN device's address) only. The UDP socket shares
/// the port with a resolver bound to every address (`*:53`, as dnsmasq does) when that one
/// allows it (SO_REUSEADDR); TCP cannot share with a listening wildcard socket, so without it
/// answers too large for UDP come back truncated with nowhere to retry, which is said.
pub fn bind(addr: SocketAddr) -> Result<Listeners> {
    let udp = reusable(addr, socket2::Type::DGRAM, socket2::Protocol::UDP)
        .and_then(|s| UdpSocket::from_std(s.into()))
        .with_context(|| format!("cannot serve DNS on {addr}/udp"))?;
    let tcp = reusable(addr, socket2::Type::STREAM, socket2::Protocol::TCP).and_then(|s| {
        s.listen(128)?;
        TcpListener::from_std(s.into())
    });
    let tcp = match tcp {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(
                "DNS on {addr}/tcp: {e} (another DNS server listens on every address?); answering over UDP only, so answers too large for UDP cannot be retried over TCP"
            );
            None
        }
    };
    Ok(Listeners { addr, udp, tcp })
}

/// Serves DNS on the bound listeners until the future is dropped.
pub async fn serve(
    listeners: Listeners,
    state: SharedDns,
    upstreams: Vec<SocketAddr>,
    connectors: mpsc::Sender<ConnectorQuery>,
) -> Result<()> {
    let Listeners { addr, udp, tcp } = listeners;
    let udp = Arc::new(udp);
    tracing::info!(
        "DNS on {addr} ({}): resource names answered here, others forwarded to {}",
        if tcp.is_some() { "udp, tcp" } else { "udp" },
        if upstreams.is_empty() {
            "nobody (no upstream resolver known)".to_string()
        } else {
            upstreams
                .iter()
                .map(|u| u.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    let resolvers = Arc::new(Resolvers {
        upstreams: Upstreams::open(upstreams).await,
        connectors,
    });
    let mut buf = vec![0u8; 65_535];
    loop {
        tokio::select! {
            r = udp.recv_from(&mut buf) => {
                let (n, client) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!("DNS receive: {e}");
                        continue;
                    }
                };
                let query = &buf[..n];
                match local_reply(&state, query) {
                    Reply::Answer(a) => {
                        let _ = udp.send_to(&a, client).await;
                    }
                    Reply::Drop => {}
                    reply => {
                        let (udp, resolvers) = (udp.clone(), resolvers.clone());
                        let query = query.to_vec();
                        tokio::spawn(async move {
                            if let Some(a) = answer(reply, &resolvers, &query, false).await {
                                let _ = udp.send_to(&a, client).await;
                            }
                        });
                    }
                }
            }
            r = accept(tcp.as_ref()) => {
                let Ok((stream, _)) = r else { continue };
                let (state, resolvers) = (state.clone(), resolvers.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve_tcp(stream, state, resolvers).await {
                        tracing::debug!("DNS over TCP: {e:#}");
                    }
                });
            }
        }
    }
}

/// One TCP client: length-prefixed queries, answered in order, until it closes or idles.
async fn serve_tcp(mut s: TcpStream, state: SharedDns, resolvers: Arc<Resolvers>) -> Result<()> {
    loop {
        let n = match tokio::time::timeout(Duration::from_secs(10), s.read_u16()).await {
            Ok(Ok(n)) => n as usize,
            _ => return Ok(()),
        };
        let mut q = vec![0u8; n.min(MAX_TCP_MESSAGE)];
        s.read_exact(&mut q).await?;
        let reply = local_reply(&state, &q);
        let Some(a) = answer(reply, &resolvers, &q, true).await else {
            return Ok(());
        };
        let len = u16::try_from(a.len()).context("answer too large")?;
        s.write_all(&len.to_be_bytes()).await?;
        s.write_all(&a).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_parse() {
        let text = "# comment\nnameserver 192.0.2.53\nsearch corp\nnameserver fe80::1%eth0\nnameserver 2001:db8::53\noptions edns0\n";
        let u = upstreams_from_resolv_conf(text);
        assert_eq!(
            u,
            vec![
                "192.0.2.53:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap(),
                "[2001:db8::53]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn truncation_bit() {
        assert!(truncated(&[0, 1, 0x83, 0]));
        assert!(!truncated(&[0, 1, 0x81, 0]));
        assert!(!truncated(&[0]));
    }
}
