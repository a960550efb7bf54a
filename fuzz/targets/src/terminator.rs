//! `terminator`: the connector's termination stack (netstack/src/stack.rs, smoltcp with any_ip
//! and the connect-first TCP flows) fed one agent's packets through the connector core's
//! [`Terminator`] interface, with [`AdmitAll`] as the gate. A small in-memory services side
//! answers its events (dials, echoes, UDP) so that flows get past their first packet; every
//! packet the stack sends back to the agent must parse.
//!
//! The first byte sets how dials end (`% 4`: accepted, refused, unreachable, timed out); then
//! operations ([`crate::Ops`]), by tag modulo 8:
//! - 0: a packet from the agent; 1: a packet the agent addressed to a name (body:
//!   `[name length u8][name][packet]`);
//! - 2: time passes (the body's first two bytes, in milliseconds, times 16);
//! - 3: the newest TCP flow's service sends the body; 4: the newest UDP flow's service does;
//! - 5: the newest TCP flow's service closes (EOF), 6: resets;
//! - 7: the policy changes: every flow is put to a gate that refuses all.

use std::time::{Duration, Instant};

use sluice_dataplane::connector::{AdmitAll, FlowGate, NewFlow, Terminator};
use sluice_dataplane::packet::{self, Unreachable};
use sluice_netstack::stack::{DialError, FlowId, Limits, Stack, StackEvent};

use crate::{num, Ops};

struct DenyAll;

impl FlowGate for DenyAll {
    fn admit(&mut self, _: &NewFlow<'_>) -> bool {
        false
    }
}

pub fn terminator(data: &[u8]) {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let dial = match mode % 4 {
        0 => Ok(()),
        1 => Err(DialError::Refused),
        2 => Err(DialError::Unreachable),
        _ => Err(DialError::TimedOut),
    };
    // Small buffers and flow limits: cheap per input, and the limits are reachable.
    let mut stack = Stack::new(Limits {
        tcp_buffer: 8 * 1024,
        max_tcp_flows: 8,
        max_udp_flows: 8,
        ..Limits::default()
    });
    let epoch = Instant::now();
    let mut now = epoch;
    let (mut tcp, mut udp): (Option<FlowId>, Option<FlowId>) = (None, None);
    let mut scratch = vec![0u8; 16 * 1024];
    for (tag, body) in Ops(data) {
        match tag % 8 {
            0 => Terminator::input(&mut stack, body, None, &mut AdmitAll),
            1 => {
                let Some((&n, rest)) = body.split_first() else {
                    continue;
                };
                let (name, pkt) = rest.split_at(usize::from(n).min(rest.len()));
                let name = String::from_utf8_lossy(name);
                Terminator::input(&mut stack, pkt, Some(&name), &mut AdmitAll);
            }
            2 => now += Duration::from_millis(num(&body[..body.len().min(2)]) * 16),
            3 => {
                if let Some(id) = tcp {
                    stack.tcp_from_service(id, body);
                }
            }
            4 => {
                if let Some(id) = udp {
                    stack.udp_from_service(id, body);
                }
            }
            5 => {
                if let Some(id) = tcp {
                    stack.tcp_service_eof(id);
                }
            }
            6 => {
                if let Some(id) = tcp {
                    stack.tcp_service_reset(id);
                }
            }
            7 => {
                let _ = Terminator::recheck(&mut stack, &mut DenyAll);
            }
            _ => unreachable!(),
        }
        Terminator::advance(&mut stack, now, epoch);
        serve(&mut stack, dial, &mut tcp, &mut udp, &mut scratch);
        Terminator::advance(&mut stack, now, epoch);
        while let Some(p) = Terminator::output(&mut stack) {
            if let Err(e) = packet::inspect(&p) {
                panic!("the stack sent the agent a packet that does not parse: {e}");
            }
            Terminator::recycle(&mut stack, p);
        }
        let _ = Terminator::poll_delay(&mut stack);
        let _ = Terminator::flows(&stack);
    }
    let _ = stack.stats();
}

/// The services side, in memory: dials end as `dial` says, TCP services echo what they
/// read, echo requests are answered (or fail, when dials fail), UDP sockets fail the same way.
fn serve(
    stack: &mut Stack,
    dial: Result<(), DialError>,
    tcp: &mut Option<FlowId>,
    udp: &mut Option<FlowId>,
    scratch: &mut [u8],
) {
    while let Some(ev) = stack.poll_event() {
        match ev {
            StackEvent::DialTcp { id, .. } => {
                *tcp = Some(id);
                stack.tcp_dialed(id, dial);
            }
            StackEvent::OpenUdp { id, .. } => {
                *udp = Some(id);
                if dial.is_err() {
                    stack.udp_failed(id, Unreachable::Port);
                }
            }
            StackEvent::UdpSend { .. } => {}
            StackEvent::Echo { request, .. } => match dial {
                Ok(()) => stack.echo_reply(&request),
                Err(_) => stack.echo_unreachable(&request),
            },
            StackEvent::ShutdownWrite { id } => stack.tcp_service_eof(id),
            StackEvent::Close { id } => {
                if *tcp == Some(id) {
                    *tcp = None;
                }
                if *udp == Some(id) {
                    *udp = None;
                }
            }
        }
    }
    for id in stack.tcp_readable() {
        let n = stack.tcp_to_service(id, scratch);
        stack.tcp_from_service(id, &scratch[..n]);
    }
}
