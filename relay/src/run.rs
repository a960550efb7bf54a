//! The relay's tokio shell: one UDP socket, the sans-IO [`Relay`] core, and its timers.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::UdpSocket;

use crate::server::{Relay, RelayStats};

/// How often the relay logs its counters when something changed.
const STATS_EVERY: Duration = Duration::from_secs(30);

/// Re-arms an event loop's timer for `after` from now, but only when that is earlier than the
/// armed deadline (or the timer fired). Resetting a tokio timer while the loop runs wakes the
/// runtime's driver (an eventfd write and one more epoll round) almost every time; a timer that
/// fires early is harmless, since every loop checks each deadline against the clock.
pub fn rearm(timer: Pin<&mut tokio::time::Sleep>, after: Duration) {
    let deadline = tokio::time::Instant::now() + after;
    if timer.is_elapsed() || deadline < timer.deadline() {
        timer.reset(deadline);
    }
}

/// Serves relay clients on `socket` until the future is dropped.
pub async fn serve(socket: UdpSocket, config: quiche::Config) -> std::io::Result<()> {
    let local = socket.local_addr()?;
    let mut relay = Relay::new(config, local);
    let mut buf = vec![0u8; 65_536];
    let mut out = vec![0u8; 1500];
    let mut last_logged = RelayStats::default();
    let mut stats_tick = tokio::time::interval(STATS_EVERY);
    // One timer, re-armed each round, rather than a new one per packet.
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    loop {
        rearm(
            timer.as_mut(),
            relay.timeout().unwrap_or(Duration::from_secs(3600)),
        );
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let (n, from) = r?;
                relay.recv(&mut buf[..n], from);
                // Drain whatever else is queued without waiting, to batch the sends below.
                while let Ok((n, from)) = socket.try_recv_from(&mut buf) {
                    relay.recv(&mut buf[..n], from);
                }
            }
            _ = &mut timer => relay.on_timeout(),
            _ = stats_tick.tick() => {
                let s = relay.stats();
                if s != last_logged {
                    tracing::info!(
                        "relay: {} clients ({} connectors), forwarded {} packets / {} bytes, dropped {}, bad {}",
                        s.clients, s.connectors, s.forwarded_packets, s.forwarded_bytes,
                        s.dropped_packets, s.bad_packets
                    );
                    last_logged = s;
                }
            }
        }
        flush(&socket, &mut relay, &mut out).await;
    }
}

async fn flush(socket: &UdpSocket, relay: &mut Relay, out: &mut [u8]) {
    while let Some((n, to)) = relay.send(out) {
        send_to(socket, &out[..n], to).await;
    }
}

async fn send_to(socket: &UdpSocket, pkt: &[u8], to: SocketAddr) {
    if let Err(e) = socket.send_to(pkt, to).await {
        tracing::debug!("relay: send to {to} failed: {e}");
    }
}
