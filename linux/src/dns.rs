//! The agent's DNS sockets on Linux. The engine answers every query (synthetic addresses,
//! connectors, upstream forwarding: `sluice_dataplane::engine`); this host only carries bytes.
//! A DNS address that is the TUN device's own is delivered locally by the kernel, so queries to
//! it arrive on sockets bound here (UDP, and TCP for answers too large for UDP); any other DNS
//! address is routed into the TUN device and never needs a socket. Upstream queries over TCP
//! (after a truncated UDP answer) are exchanged here too.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};

/// How long an upstream resolver has to answer one query over TCP.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest DNS message over TCP (its length prefix is 16 bits).
const MAX_TCP_MESSAGE: usize = 65_535;
/// A TCP client that sends nothing for this long is dropped.
const TCP_IDLE: Duration = Duration::from_secs(10);

pub use sluice_dataplane::engine::dns::upstreams_from_resolv_conf;

/// A query from a TCP client, for the agent's loop (which owns the engine).
pub struct TcpQuery {
    pub query: Vec<u8>,
    pub answer: oneshot::Sender<Vec<u8>>,
}

/// The agent's DNS sockets, bound before the agent changes anything in the system.
pub struct Listeners {
    pub udp: UdpSocket,
    pub tcp: Option<TcpListener>,
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
    Ok(Listeners { udp, tcp })
}

/// The next TCP client, or never without a TCP listener.
pub async fn accept(tcp: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match tcp {
        Some(t) => t.accept().await,
        None => std::future::pending().await,
    }
}

/// One TCP client: length-prefixed queries, each handed to the agent's loop and answered in
/// order, until it closes or idles.
pub async fn serve_tcp(mut s: TcpStream, queries: mpsc::Sender<TcpQuery>) -> Result<()> {
    loop {
        let n = match tokio::time::timeout(TCP_IDLE, s.read_u16()).await {
            Ok(Ok(n)) => n as usize,
            _ => return Ok(()),
        };
        let mut q = vec![0u8; n.min(MAX_TCP_MESSAGE)];
        s.read_exact(&mut q).await?;
        let (tx, rx) = oneshot::channel();
        if queries
            .send(TcpQuery {
                query: q,
                answer: tx,
            })
            .await
            .is_err()
        {
            return Ok(());
        }
        // The engine answers every query it can parse (SERVFAIL at worst, within seconds).
        let Ok(Ok(a)) = tokio::time::timeout(TCP_IDLE, rx).await else {
            return Ok(());
        };
        let len = u16::try_from(a.len()).context("answer too large")?;
        s.write_all(&len.to_be_bytes()).await?;
        s.write_all(&a).await?;
    }
}

/// Asks `upstream` over TCP (the engine's [`Event::DnsOverTcp`]).
///
/// [`Event::DnsOverTcp`]: sluice_dataplane::engine::Event::DnsOverTcp
pub async fn forward_tcp(query: &[u8], upstream: SocketAddr) -> Result<Vec<u8>> {
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
