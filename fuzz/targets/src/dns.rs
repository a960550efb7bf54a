//! `dns`: a DNS query to the agent (dataplane/src/dns/responder.rs `respond`, what the engine
//! runs for every query from the device or the host's socket): parse, answer, and a re-parse of
//! the answer. The same query then goes where a resource name's other records go: the
//! connector's admission (dataplane/src/connector/dns.rs), its answer, and the agent's fitting
//! of that answer to UDP.

use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use sluice_dataplane::connector::dns::{admit, Admission, Asker};
use sluice_dataplane::dns::pool::{SyntheticPool, DEFAULT_V4, DEFAULT_V6};
use sluice_dataplane::dns::records;
use sluice_dataplane::dns::responder::{respond, Reply};

use crate::fixtures;

pub fn dns(data: &[u8]) {
    let f = fixtures::get();
    // Two names at most: the second query for another name recycles the first's addresses.
    let mut pool = SyntheticPool::new(DEFAULT_V4, DEFAULT_V6, 2).expect("pool");
    let policy = &f.policy;
    let now = 1_800_000_000;
    // Twice: the second time the name already holds its addresses.
    for round in 0..2 {
        match respond(data, &mut pool, |n| policy.has_hostname(n), now + round) {
            Reply::Answer(a) => check_answer(data, &a, &pool),
            Reply::AskConnector { name } => {
                assert!(
                    policy.has_hostname(&name),
                    "asked about a name that is no resource"
                );
            }
            Reply::Forward | Reply::Drop => {}
        }
    }
    let subject = policy.subject("alice", &["lab".to_string()]);
    let asker = Asker {
        policy,
        subject: Some(&subject),
        me: "lab-connector",
        now: now as i64,
        in_flight: data.first().map_or(0, |b| usize::from(*b) % 70),
    };
    match admit(&asker, data) {
        Admission::Answer(a) => {
            let m = Message::from_vec(&a).expect("the connector's refusal parses");
            assert_eq!(m.metadata.message_type, MessageType::Response);
        }
        Admission::Lookup { name, .. } => {
            // What the host does with a lookup that found nothing, then the agent's UDP fit.
            let a = records::answer(data, ResponseCode::NXDomain, &[], &[])
                .expect("a query the connector admitted is a DNS message");
            assert!(policy.has_hostname(&name));
            let fitted = records::fit_udp(data, a);
            Message::from_vec(&fitted).expect("a fitted answer parses");
        }
        Admission::Ignore => {}
    }
}

/// The agent's own answer to `query`: a response with the query's id, and for a resource's
/// A/AAAA a synthetic address from the pool.
fn check_answer(query: &[u8], answer: &[u8], pool: &SyntheticPool) {
    let m = Message::from_vec(answer)
        .unwrap_or_else(|e| panic!("the agent's DNS answer does not parse: {e}"));
    assert_eq!(m.metadata.message_type, MessageType::Response);
    if query.len() >= 2 {
        assert_eq!(m.metadata.id, u16::from_be_bytes([query[0], query[1]]));
    }
    for r in &m.answers {
        let ip = match &r.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            other => panic!("the agent answered with a {:?} record", other.record_type()),
        };
        assert!(pool.contains(ip), "{ip} is not a synthetic address");
        assert!(matches!(r.record_type(), RecordType::A | RecordType::AAAA));
    }
}
