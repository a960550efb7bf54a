//! The termination state machine fed with real packets: connect-first TCP (refused → RST,
//! accepted → handshake, data both ways, half-close), UDP and ICMP echo handed to the shell,
//! and garbage dropped without harm.

use std::time::Instant;

use etherparse::PacketBuilder;
use proptest::prelude::*;
use sluice_dataplane::packet::{inspect, PacketInfo, PROTO_UDP};
use sluice_netstack::stack::{
    AdmitAll, DialError, FlowGate, FlowKind, Limits, NewFlow, Stack, StackEvent,
};

const CLIENT: [u8; 4] = [100, 96, 0, 1];
const SERVER: [u8; 4] = [198, 51, 100, 10];

fn tcp(sport: u16, seq: u32, ack: Option<u32>, syn: bool, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut b = PacketBuilder::ipv4(CLIENT, SERVER, 64).tcp(sport, 80, seq, 64000);
    if syn {
        b = b.syn();
    }
    if fin {
        b = b.fin();
    }
    if let Some(a) = ack {
        b = b.ack(a);
    }
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

fn outputs(s: &mut Stack) -> Vec<(Vec<u8>, PacketInfo)> {
    std::iter::from_fn(|| s.output())
        .map(|p| {
            let i = inspect(&p).unwrap();
            (p, i)
        })
        .collect()
}

fn events(s: &mut Stack) -> Vec<StackEvent> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

fn stack() -> (Stack, Instant) {
    let base = Instant::now();
    let mut s = Stack::new(Limits::default());
    s.set_time(base, base);
    (s, base)
}

#[test]
fn refused_dial_answers_the_syn_with_a_reset() {
    let (mut s, _) = stack();
    s.input(&tcp(40000, 1000, None, true, false, &[]), &mut AdmitAll);
    s.input(&tcp(40000, 1000, None, true, false, &[]), &mut AdmitAll); // retransmitted SYN while dialing
    let ev = events(&mut s);
    let [StackEvent::DialTcp {
        id,
        dst,
        hostname: None,
    }] = &ev[..]
    else {
        panic!("{ev:?}")
    };
    assert_eq!(dst.to_string(), "198.51.100.10:80");
    s.tcp_dialed(*id, Err(DialError::Refused));
    let out = outputs(&mut s);
    assert_eq!(out.len(), 1);
    let rst = &out[0].1;
    assert!(rst.tcp.rst && rst.tcp.ack && rst.tcp_ack == 1001);
    assert_eq!(rst.src.to_string(), "198.51.100.10");
    assert!(matches!(&events(&mut s)[..], [StackEvent::Close { .. }]));
}

#[test]
fn unreachable_dial_answers_icmp() {
    let (mut s, _) = stack();
    s.input(&tcp(40001, 1, None, true, false, &[]), &mut AdmitAll);
    let StackEvent::DialTcp { id, .. } = events(&mut s).remove(0) else {
        panic!()
    };
    s.tcp_dialed(id, Err(DialError::TimedOut));
    let out = outputs(&mut s);
    assert!(out[0].1.icmp_error, "{:?}", out[0].1);
}

#[test]
fn accepted_flow_carries_data_both_ways_and_half_closes() {
    let (mut s, _) = stack();
    s.input(&tcp(40002, 5000, None, true, false, &[]), &mut AdmitAll);
    let StackEvent::DialTcp { id, .. } = events(&mut s).remove(0) else {
        panic!()
    };
    s.tcp_dialed(id, Ok(()));
    s.poll();
    let out = outputs(&mut s);
    let synack = out
        .iter()
        .find(|(_, i)| i.tcp.syn && i.tcp.ack)
        .expect("SYN-ACK");
    assert_eq!(synack.1.tcp_ack, 5001);
    let srv_seq = synack.1.tcp_seq.wrapping_add(1);

    s.input(
        &tcp(40002, 5001, Some(srv_seq), false, false, &[]),
        &mut AdmitAll,
    );
    s.input(
        &tcp(40002, 5001, Some(srv_seq), false, false, b"hello"),
        &mut AdmitAll,
    );
    s.poll();
    assert_eq!(s.tcp_readable(), vec![id]);
    let mut buf = [0u8; 64];
    let n = s.tcp_to_service(id, &mut buf);
    assert_eq!(&buf[..n], b"hello");

    s.tcp_from_service(id, b"world");
    s.poll();
    let out = outputs(&mut s);
    assert!(out.iter().any(|(p, i)| i.payload(p) == b"world"), "{out:?}");
    assert_eq!(s.tcp_pending(id), 0);

    // The app half-closes: the service side is told to shut down its write half.
    s.input(
        &tcp(40002, 5006, Some(srv_seq + 5), false, true, &[]),
        &mut AdmitAll,
    );
    s.poll();
    assert!(events(&mut s).contains(&StackEvent::ShutdownWrite { id }));
    // The service finishes too: a FIN goes to the app.
    s.tcp_service_eof(id);
    s.poll();
    assert!(outputs(&mut s).iter().any(|(_, i)| i.tcp.fin));
}

#[test]
fn udp_and_echo_go_to_the_shell() {
    let (mut s, _) = stack();
    let b = PacketBuilder::ipv4(CLIENT, SERVER, 64).udp(5353, 53);
    let mut q = Vec::new();
    b.write(&mut q, b"query").unwrap();
    s.input(&q, &mut AdmitAll);
    let ev = events(&mut s);
    let [StackEvent::OpenUdp {
        id,
        dst,
        hostname: None,
    }, StackEvent::UdpSend { payload, .. }] = &ev[..]
    else {
        panic!("{ev:?}")
    };
    assert_eq!(dst.to_string(), "198.51.100.10:53");
    assert_eq!(payload, b"query");
    s.udp_from_service(*id, b"answer");
    let out = outputs(&mut s);
    let (p, i) = &out[0];
    assert_eq!(i.proto, PROTO_UDP);
    assert_eq!(
        (i.src.to_string(), i.src_port, i.dst_port),
        ("198.51.100.10".into(), 53, 5353)
    );
    assert_eq!(i.payload(p), b"answer");

    let b = PacketBuilder::ipv4(CLIENT, SERVER, 64).icmpv4_echo_request(7, 1);
    let mut e = Vec::new();
    b.write(&mut e, b"ping").unwrap();
    s.input(&e, &mut AdmitAll);
    let ev = events(&mut s);
    let [StackEvent::Echo {
        request,
        id: 7,
        seq: 1,
        ..
    }] = &ev[..]
    else {
        panic!("{ev:?}")
    };
    s.echo_reply(request);
    let out = outputs(&mut s);
    assert_eq!(out[0].1.echo.map(|e| e.request), Some(false));
}

proptest! {
    #[test]
    fn garbage_is_dropped_without_harm(pkts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..30)) {
        let (mut s, _) = stack();
        for mut p in pkts {
            if let Some(b) = p.first_mut() { *b = (*b & 0x0f) | if *b & 1 == 0 { 0x40 } else { 0x60 }; }
            s.input(&p, &mut AdmitAll);
            s.poll();
            while s.output().is_some() {}
            while s.poll_event().is_some() {}
        }
    }
}

/// Admits only TCP to port 80.
struct OnlyWeb;

impl FlowGate for OnlyWeb {
    fn admit(&mut self, f: &NewFlow) -> bool {
        f.kind == FlowKind::Tcp && f.dst.port() == 80
    }
}

#[test]
fn the_gate_refuses_new_flows_and_cuts_open_ones() {
    let (mut s, _) = stack();
    // TCP to 22: RST at once, no dial.
    let mut syn22 = Vec::new();
    PacketBuilder::ipv4(CLIENT, SERVER, 64)
        .tcp(40010, 22, 1, 64000)
        .syn()
        .write(&mut syn22, &[])
        .unwrap();
    s.input(&syn22, &mut OnlyWeb);
    assert!(events(&mut s).is_empty());
    let out = outputs(&mut s);
    assert!(out[0].1.tcp.rst, "{out:?}");
    // UDP: ICMP administratively prohibited.
    let mut q = Vec::new();
    PacketBuilder::ipv4(CLIENT, SERVER, 64)
        .udp(5353, 53)
        .write(&mut q, b"x")
        .unwrap();
    s.input(&q, &mut OnlyWeb);
    assert!(events(&mut s).is_empty());
    assert!(outputs(&mut s)[0].1.icmp_error);

    // An open flow to 80 is cut when the gate changes its mind.
    s.input(&tcp(40011, 9, None, true, false, &[]), &mut OnlyWeb);
    let StackEvent::DialTcp { id, .. } = events(&mut s).remove(0) else {
        panic!()
    };
    s.tcp_dialed(id, Ok(()));
    s.poll();
    let synack = outputs(&mut s)
        .into_iter()
        .find(|(_, i)| i.tcp.syn)
        .unwrap()
        .1;
    s.input(
        &tcp(40011, 10, Some(synack.tcp_seq + 1), false, false, &[]),
        &mut OnlyWeb,
    );
    s.poll();
    assert_eq!(s.recheck(&mut OnlyWeb), 0);
    assert_eq!(s.recheck(&mut NoOne), 1);
    assert!(
        outputs(&mut s).iter().any(|(_, i)| i.tcp.rst),
        "the app gets a RST"
    );
    assert!(events(&mut s).contains(&StackEvent::Close { id }));
}

struct NoOne;

impl FlowGate for NoOne {
    fn admit(&mut self, _: &NewFlow) -> bool {
        false
    }
}

#[test]
fn packets_to_a_name_carry_it_to_the_gate_and_the_dial() {
    struct Names(Vec<String>);
    impl FlowGate for Names {
        fn admit(&mut self, f: &NewFlow<'_>) -> bool {
            self.0.push(f.hostname.unwrap_or("-").to_string());
            f.hostname == Some("wiki.corp.internal")
        }
    }
    let (mut s, _) = stack();
    let mut gate = Names(Vec::new());
    s.input_named(
        &tcp(40020, 1, None, true, false, &[]),
        Some("wiki.corp.internal"),
        &mut gate,
    );
    let ev = events(&mut s);
    assert!(
        matches!(&ev[..], [StackEvent::DialTcp { hostname: Some(h), .. }] if h == "wiki.corp.internal"),
        "{ev:?}"
    );
    s.input_named(
        &tcp(40021, 1, None, true, false, &[]),
        Some("other.corp.internal"),
        &mut gate,
    );
    assert!(events(&mut s).is_empty());
    assert!(outputs(&mut s).iter().any(|(_, i)| i.tcp.rst));
    assert_eq!(gate.0, vec!["wiki.corp.internal", "other.corp.internal"]);
}

/// Counts what it is asked; admits everything but what `deny` names.
#[derive(Default)]
struct Counting {
    asked: usize,
    deny: bool,
}

impl FlowGate for Counting {
    fn admit(&mut self, _: &NewFlow) -> bool {
        self.asked += 1;
        !self.deny
    }
}

fn echo(id: u16, seq: u16) -> Vec<u8> {
    let mut e = Vec::new();
    PacketBuilder::ipv4(CLIENT, SERVER, 64)
        .icmpv4_echo_request(id, seq)
        .write(&mut e, b"ping")
        .unwrap();
    e
}

/// A ping is one flow: the gate (and so the audit log) sees its first echo, not every one;
/// another ping is another flow; a policy change applies from the next echo on.
#[test]
fn a_ping_is_checked_once_not_per_echo() {
    let (mut s, base) = stack();
    let mut gate = Counting::default();
    for seq in 1..=5 {
        s.input(&echo(7, seq), &mut gate);
    }
    assert_eq!(gate.asked, 1);
    assert_eq!(
        events(&mut s).len(),
        5,
        "every echo still goes to the service"
    );
    s.input(&echo(8, 1), &mut gate);
    assert_eq!(gate.asked, 2, "another ping, another flow");

    // The policy changes: rechecked, cut, and the next echo is refused.
    gate.deny = true;
    assert_eq!(s.recheck(&mut gate), 2);
    events(&mut s);
    s.input(&echo(7, 6), &mut gate);
    assert!(events(&mut s).is_empty());
    assert!(
        outputs(&mut s)[0].1.icmp_error,
        "administratively prohibited"
    );

    // An idle ping is forgotten like an idle UDP flow.
    gate.deny = false;
    s.input(&echo(9, 1), &mut gate);
    let asked = gate.asked;
    s.set_time(base + Limits::default().udp_idle * 2, base);
    s.poll();
    s.input(&echo(9, 2), &mut gate);
    assert_eq!(gate.asked, asked + 1, "checked again after going idle");
}

/// 100,000 SYNs at once from one agent: only its burst of new flows reaches the policy and
/// the dials, the dials in progress stay under their cap, the rest is dropped and counted;
/// once time passes, a new flow opens again.
#[test]
fn a_syn_flood_opens_only_the_agents_burst_of_flows() {
    use sluice_dataplane::rate::Rate;
    let base = Instant::now();
    let mut s = Stack::new(Limits {
        new_flows: Rate::new(100, 300),
        max_dialing: 200,
        ..Limits::default()
    });
    s.set_time(base, base);
    let mut gate = Counting {
        asked: 0,
        deny: false,
    };
    for i in 0..100_000u32 {
        // 100,000 different flows: 50,000 source ports to each of two service ports.
        let (sport, dport) = (1024 + (i % 50_000) as u16, 80 + (i / 50_000) as u16);
        let mut syn = Vec::new();
        PacketBuilder::ipv4(CLIENT, SERVER, 64)
            .tcp(sport, dport, i.wrapping_mul(7919), 64000)
            .syn()
            .write(&mut syn, &[])
            .unwrap();
        s.input(&syn, &mut gate);
    }
    let dials = events(&mut s)
        .iter()
        .filter(|e| matches!(e, StackEvent::DialTcp { .. }))
        .count();
    // The burst of 300 passed the rate, of which the dial cap let 200 reach the policy.
    assert_eq!(gate.asked, 200);
    assert_eq!(dials, 200);
    let st = s.stats();
    assert_eq!(st.tcp_flows, 200);
    assert_eq!(st.rate_limited, 100_000 - 200);
    // Nothing answered the dropped SYNs (a flood gets no reflection).
    assert!(outputs(&mut s).is_empty());
    // A second later there are tokens again, but the dial cap holds until dials finish.
    s.set_time(base + std::time::Duration::from_secs(1), base);
    s.input(&tcp(65000, 1, None, true, false, &[]), &mut gate);
    assert!(events(&mut s).is_empty());
    assert_eq!(gate.asked, 200);
}

/// The buffer budget caps TCP flows: two buffers of `tcp_buffer` each per flow.
#[test]
fn the_buffer_budget_caps_an_agents_tcp_flows() {
    let l = Limits {
        tcp_buffer: 256 * 1024,
        buffer_budget: 10 * 512 * 1024,
        ..Limits::default()
    };
    assert_eq!(l.tcp_flow_cap(), 10);
    let base = Instant::now();
    let mut s = Stack::new(l);
    s.set_time(base, base);
    for i in 0..11u16 {
        s.input(&tcp(30000 + i, 1, None, true, false, &[]), &mut AdmitAll);
    }
    assert_eq!(s.stats().tcp_flows, 10);
    assert_eq!(s.stats().refused, 1);
    // The eleventh got a reset at once.
    assert!(outputs(&mut s).iter().any(|(_, i)| i.tcp.rst));
    assert_eq!(Limits::default().tcp_flow_cap(), 4096);
}
