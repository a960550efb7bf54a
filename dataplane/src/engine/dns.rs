//! The agent's DNS resolution, whatever carried the query in: resource names are answered
//! from the synthetic pool (A/AAAA) or by the resource's connector (other types), and every
//! other query is passed to the upstream resolvers, its answer returned unchanged. Upstream
//! queries leave as datagrams the host sends (or, for answers too large for UDP, as a TCP
//! exchange the host carries out), and their answers come back as inputs. Everything in flight
//! is bounded and expires by the clock the host gives.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;

use crate::dns::records;
use crate::metrics::{DnsKind, DnsStats};

/// How long an upstream resolver has to answer one query (then the next one is asked).
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a connector has to answer (it may have to come up first, then ask its resolver).
pub const CONNECTOR_TIMEOUT: Duration = Duration::from_secs(4);
/// Queries in flight at once, upstream and to connectors together; past this a query is
/// answered SERVFAIL at once rather than held.
pub const MAX_IN_FLIGHT: usize = 1024;

/// Who asked, and so where the answer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DnsClient {
    /// A query the host read from its own DNS socket: the answer goes back to the host with
    /// its token.
    Host { token: u64, tcp: bool },
    /// A UDP query that came as a packet from the TUN device: the answer goes back as one.
    Packet {
        client: SocketAddr,
        server: SocketAddr,
    },
    /// A query on a TCP connection of the engine's own DNS-over-TCP server.
    Stream { conn: usize },
}

impl DnsClient {
    /// Whether the answer travels over TCP (no UDP size limit).
    pub fn tcp(&self) -> bool {
        match self {
            DnsClient::Host { tcp, .. } => *tcp,
            DnsClient::Packet { .. } => false,
            DnsClient::Stream { .. } => true,
        }
    }
}

/// A query passed upstream, until its answer comes.
struct Forward {
    client: DnsClient,
    /// The client's query, with the client's id.
    query: Vec<u8>,
    /// Index of the upstream asked now.
    upstream: usize,
    /// Asked over TCP (the client did, or the UDP answer was truncated).
    tcp: bool,
    deadline: Instant,
    /// When the client asked (the answer time counts from here).
    asked: Instant,
}

/// A query a connector answers.
struct ConnectorAsk {
    client: DnsClient,
    query: Vec<u8>,
    deadline: Instant,
    asked: Instant,
}

/// Forwarding state: queries in flight and the outputs waiting for the host.
pub struct Resolver {
    upstreams: Vec<SocketAddr>,
    /// UDP forwards by the id we put in the query.
    udp: HashMap<u16, Forward>,
    /// TCP exchanges the host carries out, by their id.
    tcp: HashMap<u64, Forward>,
    next_tcp: u64,
    connector: HashMap<u32, ConnectorAsk>,
    next_connector: u32,
    /// Answers ready for their clients.
    pub answers: VecDeque<(DnsClient, Vec<u8>)>,
    /// Queries by who answered and how, and how long each took.
    pub stats: DnsStats,
    /// UDP queries to send to upstreams.
    pub transmits: VecDeque<(SocketAddr, Vec<u8>)>,
    /// TCP exchanges for the host: id, upstream, query.
    pub tcp_exchanges: VecDeque<(u64, SocketAddr, Vec<u8>)>,
}

impl Resolver {
    pub fn new(upstreams: Vec<SocketAddr>) -> Self {
        Resolver {
            upstreams,
            udp: HashMap::new(),
            tcp: HashMap::new(),
            next_tcp: 0,
            connector: HashMap::new(),
            next_connector: 0,
            answers: VecDeque::new(),
            stats: DnsStats::default(),
            transmits: VecDeque::new(),
            tcp_exchanges: VecDeque::new(),
        }
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// New upstream resolvers (the network changed); queries in flight finish where they are.
    pub fn set_upstreams(&mut self, upstreams: Vec<SocketAddr>) {
        self.upstreams = upstreams;
    }

    fn in_flight(&self) -> usize {
        self.udp.len() + self.tcp.len() + self.connector.len()
    }

    /// `client`'s answer, from `kind`, for a query asked at `asked`.
    fn answer(
        &mut self,
        client: DnsClient,
        answer: Vec<u8>,
        kind: DnsKind,
        asked: Instant,
        now: Instant,
    ) {
        self.stats
            .answered(kind, &answer, now.saturating_duration_since(asked));
        self.answers.push_back((client, answer));
    }

    /// An answer the agent made itself, at once.
    pub fn answer_local(&mut self, client: DnsClient, answer: Vec<u8>, now: Instant) {
        self.answer(client, answer, DnsKind::Local, now, now);
    }

    /// Answers `query` with `code` and no records, as `kind` would have.
    pub fn fail(
        &mut self,
        client: DnsClient,
        query: &[u8],
        code: ResponseCode,
        kind: DnsKind,
        asked: Instant,
        now: Instant,
    ) {
        match records::answer(query, code, &[], &[]) {
            Some(a) => self.answer(client, a, kind, asked, now),
            None => self.stats.dropped(kind),
        }
    }

    /// Passes `query` to the first upstream.
    pub fn forward(&mut self, client: DnsClient, query: &[u8], now: Instant) {
        if self.upstreams.is_empty() || self.in_flight() >= MAX_IN_FLIGHT || query.len() < 12 {
            let up = DnsKind::Upstream;
            return self.fail(client, query, ResponseCode::ServFail, up, now, now);
        }
        let f = Forward {
            client,
            query: query.to_vec(),
            upstream: 0,
            tcp: client.tcp(),
            deadline: now + UPSTREAM_TIMEOUT,
            asked: now,
        };
        self.ask(f, now);
    }

    /// Sends `f` to its upstream, over UDP with a fresh id of ours, or as a TCP exchange.
    fn ask(&mut self, f: Forward, now: Instant) {
        let Some(&upstream) = self.upstreams.get(f.upstream) else {
            let (client, query) = (f.client, f.query);
            let up = DnsKind::Upstream;
            return self.fail(client, &query, ResponseCode::ServFail, up, f.asked, now);
        };
        if f.tcp {
            self.next_tcp = self.next_tcp.wrapping_add(1);
            let id = self.next_tcp;
            self.tcp_exchanges
                .push_back((id, upstream, f.query.clone()));
            self.tcp.insert(id, f);
            return;
        }
        // A fresh random id per query (restored in the answer): answers cannot be matched to
        // the wrong client, nor guessed by an off-path sender.
        let mut id = rand::random::<u16>();
        while self.udp.contains_key(&id) {
            id = rand::random::<u16>();
        }
        let mut q = f.query.clone();
        q[..2].copy_from_slice(&id.to_be_bytes());
        self.transmits.push_back((upstream, q));
        self.udp.insert(id, f);
    }

    /// A datagram from an upstream resolver: true if it answered a query of ours.
    pub fn handle_upstream(&mut self, from: SocketAddr, msg: &[u8], now: Instant) -> bool {
        let Some(id) = msg.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
            return false;
        };
        match self.udp.get(&id) {
            Some(f) if self.upstreams.get(f.upstream) == Some(&from) => {}
            _ => return false,
        }
        let Some(mut f) = self.udp.remove(&id) else {
            return false;
        };
        if truncated(msg) {
            // Too large for UDP: the same upstream, over TCP.
            f.tcp = true;
            f.deadline = now + UPSTREAM_TIMEOUT;
            self.ask(f, now);
            return true;
        }
        let mut a = msg.to_vec();
        a[..2].copy_from_slice(&f.query[..2]);
        self.answer(f.client, a, DnsKind::Upstream, f.asked, now);
        true
    }

    /// The host's TCP exchange `id` ended: with the upstream's answer, or None when it failed.
    pub fn handle_tcp_answer(&mut self, id: u64, answer: Option<Vec<u8>>, now: Instant) {
        let Some(mut f) = self.tcp.remove(&id) else {
            return;
        };
        match answer {
            Some(a) if a.len() >= 2 => {
                let mut a = a;
                a[..2].copy_from_slice(&f.query[..2]);
                let a = if f.client.tcp() {
                    a
                } else {
                    records::fit_udp(&f.query, a)
                };
                self.answer(f.client, a, DnsKind::Upstream, f.asked, now);
            }
            _ => {
                f.upstream += 1;
                f.deadline = now + UPSTREAM_TIMEOUT;
                self.ask(f, now);
            }
        }
    }

    /// A query for a connector: its id in the tunnel's DNS message, or None when too many are
    /// in flight (answered SERVFAIL already).
    pub fn ask_connector(&mut self, client: DnsClient, query: &[u8], now: Instant) -> Option<u32> {
        if self.in_flight() >= MAX_IN_FLIGHT {
            let kind = DnsKind::Connector;
            self.fail(client, query, ResponseCode::ServFail, kind, now, now);
            return None;
        }
        self.next_connector = self.next_connector.wrapping_add(1);
        let id = self.next_connector;
        self.connector.insert(
            id,
            ConnectorAsk {
                client,
                query: query.to_vec(),
                deadline: now + CONNECTOR_TIMEOUT,
                asked: now,
            },
        );
        Some(id)
    }

    /// The connector answered query `id`.
    pub fn connector_answer(&mut self, id: u32, answer: Vec<u8>, now: Instant) {
        if let Some(q) = self.connector.remove(&id) {
            let a = if q.client.tcp() {
                answer
            } else {
                records::fit_udp(&q.query, answer)
            };
            self.answer(q.client, a, DnsKind::Connector, q.asked, now);
        }
    }

    /// The connector cannot answer query `id` (it is not reachable).
    pub fn connector_failed(&mut self, id: u32, now: Instant) {
        if let Some(q) = self.connector.remove(&id) {
            let kind = DnsKind::Connector;
            self.fail(
                q.client,
                &q.query,
                ResponseCode::ServFail,
                kind,
                q.asked,
                now,
            );
        }
    }

    /// Forgets the queries of a client that went away (a closed TCP connection): they count
    /// as dropped.
    pub fn forget(&mut self, client: DnsClient) {
        let before = self.udp.len() + self.tcp.len();
        self.udp.retain(|_, f| f.client != client);
        self.tcp.retain(|_, f| f.client != client);
        for _ in self.udp.len() + self.tcp.len()..before {
            self.stats.dropped(DnsKind::Upstream);
        }
        let before = self.connector.len();
        self.connector.retain(|_, q| q.client != client);
        for _ in self.connector.len()..before {
            self.stats.dropped(DnsKind::Connector);
        }
        self.answers.retain(|(c, _)| *c != client);
    }

    pub fn deadline(&self) -> Option<Instant> {
        let f = self
            .udp
            .values()
            .chain(self.tcp.values())
            .map(|f| f.deadline);
        f.chain(self.connector.values().map(|q| q.deadline)).min()
    }

    /// Queries past their deadline: the next upstream is asked, or the client hears SERVFAIL.
    pub fn on_deadline(&mut self, now: Instant) {
        let late: Vec<u16> = self
            .udp
            .iter()
            .filter(|(_, f)| f.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            if let Some(mut f) = self.udp.remove(&id) {
                f.upstream += 1;
                f.deadline = now + UPSTREAM_TIMEOUT;
                self.ask(f, now);
            }
        }
        let late: Vec<u64> = self
            .tcp
            .iter()
            .filter(|(_, f)| f.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            self.handle_tcp_answer(id, None, now);
        }
        let late: Vec<u32> = self
            .connector
            .iter()
            .filter(|(_, q)| q.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            self.connector_failed(id, now);
        }
    }
}

/// Reads the upstream resolvers from a resolv.conf-style file (the system's, before the agent
/// took over resolution; Darwin keeps one too).
pub fn upstreams_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// The TC (truncated) bit of a DNS message header.
pub fn truncated(msg: &[u8]) -> bool {
    msg.get(2).is_some_and(|b| b & 0x02 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.add_query(Query::query(
            Name::from_ascii(name).expect("name"),
            RecordType::A,
        ));
        m.to_vec().expect("encodes")
    }

    fn up(n: u8) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, n], 53))
    }

    const CLIENT: DnsClient = DnsClient::Host {
        token: 7,
        tcp: false,
    };

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
    fn an_upstream_answer_goes_back_with_the_clients_id() {
        let t0 = Instant::now();
        let mut r = Resolver::new(vec![up(1)]);
        let q = query(0x1234, "www.example.test.");
        r.forward(CLIENT, &q, t0);
        let (to, sent) = r.transmits.pop_front().expect("sent upstream");
        assert_eq!(to, up(1));
        let mut answer = sent.clone();
        answer[2] |= 0x80;
        assert!(
            !r.handle_upstream(up(2), &answer, t0),
            "only the upstream asked"
        );
        assert!(r.handle_upstream(up(1), &answer, t0));
        let (c, a) = r.answers.pop_front().expect("answered");
        assert_eq!(c, CLIENT);
        assert_eq!(&a[..2], &[0x12, 0x34]);
        assert!(r.deadline().is_none(), "nothing left in flight");
    }

    #[test]
    fn a_truncated_answer_is_asked_again_over_tcp_and_a_silent_upstream_passes_to_the_next() {
        let t0 = Instant::now();
        let mut r = Resolver::new(vec![up(1), up(2)]);
        let q = query(1, "big.example.test.");
        r.forward(CLIENT, &q, t0);
        let (_, sent) = r.transmits.pop_front().expect("sent");
        let mut tc = sent.clone();
        tc[2] |= 0x82;
        assert!(r.handle_upstream(up(1), &tc, t0));
        let (id, to, tq) = r.tcp_exchanges.pop_front().expect("over tcp");
        assert_eq!((to, tq.as_slice()), (up(1), q.as_slice()));
        // The TCP exchange fails: the second upstream is asked, over TCP again.
        r.handle_tcp_answer(id, None, t0);
        let (_, to, _) = r.tcp_exchanges.pop_front().expect("next upstream");
        assert_eq!(to, up(2));
        // It never answers: SERVFAIL once the deadline passes.
        r.on_deadline(t0 + UPSTREAM_TIMEOUT);
        let (_, a) = r.answers.pop_front().expect("servfail");
        let m = Message::from_vec(&a).expect("parses");
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    }

    #[test]
    fn a_connector_that_never_answers_gives_servfail_and_no_upstream_gives_servfail_at_once() {
        let t0 = Instant::now();
        let mut r = Resolver::new(Vec::new());
        let q = query(9, "db.corp.internal.");
        r.forward(CLIENT, &q, t0);
        assert!(
            r.answers.pop_front().is_some(),
            "no upstream: answered at once"
        );
        let id = r.ask_connector(CLIENT, &q, t0).expect("in flight");
        r.on_deadline(t0 + CONNECTOR_TIMEOUT - Duration::from_millis(1));
        assert!(r.answers.is_empty());
        r.on_deadline(t0 + CONNECTOR_TIMEOUT);
        assert!(r.answers.pop_front().is_some());
        r.connector_answer(id, q.clone(), t0);
        assert!(r.answers.is_empty(), "a late answer is dropped");
        // Both count as SERVFAIL, each under who failed to answer, with the time it took.
        use crate::metrics::{DnsKind, DnsResult};
        assert_eq!(r.stats.queries(DnsKind::Upstream, DnsResult::ServFail), 1);
        assert_eq!(r.stats.queries(DnsKind::Connector, DnsResult::ServFail), 1);
        assert_eq!(r.stats.total(), 2);
        let waited = r.stats.latency(DnsKind::Connector).sum_secs;
        assert!((waited - CONNECTOR_TIMEOUT.as_secs_f64()).abs() < 1e-9);
        assert_eq!(r.stats.latency(DnsKind::Upstream).sum_secs, 0.0);
    }
}
