//! `engine_device`: the agent engine fed what arrives from outside it: IP packets from the TUN
//! device (flows and the policy's fast path, in-packet DNS over UDP and TCP, the answers to
//! denied and oversize packets), DNS queries from the host's socket, answers from the upstream
//! resolver, and datagrams from strangers on the peer socket (punches, junk, QUIC for no
//! tunnel). Every packet the engine writes to the device must parse.
//!
//! Operations ([`crate::Ops`]), by tag modulo 6:
//! - 0: a packet from the device;
//! - 1: time passes (the body's first two bytes, in milliseconds) and the timers run;
//! - 2: a DNS query from the host's UDP socket; 3: the same over TCP;
//! - 4: a datagram from the upstream resolver 192.0.2.53:53 on the DNS socket;
//! - 5: a datagram on the peer socket from 203.0.113.7:4500, a stranger.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use sluice_dataplane::engine::{DnsConfig, Engine, EngineConfig, SocketKind, DEVICE_HEADROOM};
use sluice_dataplane::packet;

use crate::{fixtures, num, Ops};

/// The lab agent's settings (docs/lab.md). Its DNS address, the TUN's own, is served from a
/// socket there; here packets to it are answered in the packet path, as on Apple hosts.
fn config() -> EngineConfig {
    EngineConfig {
        relay: "192.0.2.1:4433".parse().expect("relay"),
        local: "0.0.0.0:40000".parse().expect("local"),
        ipv4: "100.96.0.1/32".parse().expect("v4"),
        ipv6: "fd5c:1ce0:1::1/128".parse().ok(),
        mtu: 1280,
        dns: DnsConfig {
            enabled: true,
            address: IpAddr::V4(Ipv4Addr::new(100, 96, 0, 1)),
            pool_v4: "198.18.0.0/15".parse().expect("pool"),
            pool_v6: "fd5c:1ce0:d5::/96".parse().expect("pool6"),
            // Small, so that recycling names is reachable.
            max_names: 4,
            upstreams: vec![upstream()],
        },
        direct_paths: true,
        interface_ips: vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10))],
        instance: 1,
    }
}

fn upstream() -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 53], 53))
}

pub fn engine_device(data: &[u8]) {
    let f = fixtures::get();
    let mut now = Instant::now();
    let unix_nanos = 1_800_000_000 * 1_000_000_000;
    let mut e =
        Engine::new(config(), &f.agent, f.policy.clone(), now, unix_nanos).expect("engine setup");
    let mut buf = vec![0u8; 65_536 + DEVICE_HEADROOM];
    let mut out = vec![0u8; 65_536];
    for (i, (tag, body)) in Ops(data).enumerate() {
        match tag % 6 {
            0 => {
                let b = &mut buf[..DEVICE_HEADROOM + body.len()];
                b[DEVICE_HEADROOM..].copy_from_slice(body);
                e.handle_device_packet(b, now);
            }
            1 => {
                now += Duration::from_millis(num(&body[..body.len().min(2)]));
                e.handle_timeout(now);
            }
            2 | 3 => e.handle_dns_query(i as u64, tag % 6 == 3, body, now),
            4 | 5 => {
                let (socket, from) = if tag % 6 == 4 {
                    (SocketKind::Dns, upstream())
                } else {
                    (SocketKind::Peer, SocketAddr::from(([203, 0, 113, 7], 4500)))
                };
                let b = &mut buf[..body.len()];
                b.copy_from_slice(body);
                e.handle_datagram(socket, from, b, now);
            }
            _ => unreachable!(),
        }
        drain(&mut e, &mut out, now);
    }
    let _ = e.poll_timeout(now);
    let _ = e.status(now);
    let _ = e.stats();
}

/// Takes everything the engine has for the host, as a host would.
fn drain(e: &mut Engine, out: &mut [u8], now: Instant) {
    e.drain_device(|p| {
        if let Err(err) = packet::inspect(p) {
            panic!("the engine wrote a packet to the device that does not parse: {err}");
        }
    });
    // Bounded: a send loop that never ends would be a finding of its own (a timeout).
    for _ in 0..1024 {
        if e.poll_transmit(out, now).is_none() {
            break;
        }
    }
    while e.poll_dns_answer().is_some() {}
    while e.poll_event().is_some() {}
}
