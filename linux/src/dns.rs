//! The agent's DNS server (split DNS): UDP and TCP on the agent's tunnel address. Queries for
//! resource names are answered with synthetic addresses; every other query is passed to the
//! upstream resolver and its answer returned unchanged (TCP when the UDP answer is truncated).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use sluice_dataplane::dns::pool::SyntheticPool;
use sluice_dataplane::dns::responder::{respond, Reply};
use sluice_policy::Policy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// How long an upstream resolver has to answer one query.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest DNS message over TCP (its length prefix is 16 bits).
const MAX_TCP_MESSAGE: usize = 65_535;

/// What the DNS server and the packet path share: the pool, and the policy that says which
/// names are resources.
pub struct DnsState {
    pub pool: SyntheticPool,
    pub policy: Arc<Policy>,
}

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

async fn forward_udp(query: &[u8], upstream: SocketAddr) -> Result<Vec<u8>> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(upstream).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65_535];
    let n = tokio::time::timeout(UPSTREAM_TIMEOUT, sock.recv(&mut buf))
        .await
        .context("upstream timed out")??;
    buf.truncate(n);
    Ok(buf)
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
async fn forward(query: &[u8], upstreams: &[SocketAddr], tcp: bool) -> Option<Vec<u8>> {
    for u in upstreams {
        let r = if tcp {
            forward_tcp(query, *u).await
        } else {
            match forward_udp(query, *u).await {
                Ok(a) if truncated(&a) => forward_tcp(query, *u).await,
                other => other,
            }
        };
        match r {
            Ok(a) => return Some(a),
            Err(e) => tracing::debug!("DNS upstream {u}: {e:#}"),
        }
    }
    None
}

/// Serves DNS on `addr` (UDP and TCP) until the future is dropped.
pub async fn serve(addr: SocketAddr, state: SharedDns, upstreams: Vec<SocketAddr>) -> Result<()> {
    let udp = Arc::new(
        UdpSocket::bind(addr)
            .await
            .with_context(|| format!("cannot serve DNS on {addr}/udp"))?,
    );
    let tcp = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot serve DNS on {addr}/tcp"))?;
    tracing::info!(
        "DNS on {addr} (udp, tcp): resource names answered here, others forwarded to {}",
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
    let upstreams: Arc<[SocketAddr]> = upstreams.into();
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
                let query = buf[..n].to_vec();
                match local_reply(&state, &query) {
                    Reply::Answer(a) => {
                        let _ = udp.send_to(&a, client).await;
                    }
                    Reply::Drop => {}
                    Reply::Forward => {
                        let (udp, upstreams) = (udp.clone(), upstreams.clone());
                        tokio::spawn(async move {
                            if let Some(a) = forward(&query, &upstreams, false).await {
                                let _ = udp.send_to(&a, client).await;
                            }
                        });
                    }
                }
            }
            r = tcp.accept() => {
                let Ok((stream, _)) = r else { continue };
                let (state, upstreams) = (state.clone(), upstreams.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve_tcp(stream, state, upstreams).await {
                        tracing::debug!("DNS over TCP: {e:#}");
                    }
                });
            }
        }
    }
}

/// One TCP client: length-prefixed queries, answered in order, until it closes or idles.
async fn serve_tcp(mut s: TcpStream, state: SharedDns, upstreams: Arc<[SocketAddr]>) -> Result<()> {
    loop {
        let n = match tokio::time::timeout(Duration::from_secs(10), s.read_u16()).await {
            Ok(Ok(n)) => n as usize,
            _ => return Ok(()),
        };
        let mut q = vec![0u8; n.min(MAX_TCP_MESSAGE)];
        s.read_exact(&mut q).await?;
        let answer = match local_reply(&state, &q) {
            Reply::Answer(a) => Some(a),
            Reply::Drop => None,
            Reply::Forward => forward(&q, &upstreams, true).await,
        };
        let Some(a) = answer else { return Ok(()) };
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
