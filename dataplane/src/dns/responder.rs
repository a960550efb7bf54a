//! The agent's DNS answers, as a sans-IO function of a query: resource names get synthetic
//! addresses from the [`SyntheticPool`]; everything else is left to the upstream resolver,
//! unchanged.

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};

use crate::dns::pool::SyntheticPool;

/// Seconds a synthetic answer may be cached: short, so a recycled address is not used long
/// after its name lost it.
pub const SYNTHETIC_TTL: u32 = 10;
/// The UDP payload we advertise in EDNS answers (the DNS flag day value).
pub(crate) const EDNS_PAYLOAD: u16 = 1232;

#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Send these bytes back to the client.
    Answer(Vec<u8>),
    /// Not a resource name: pass the query to the upstream resolver and its answer back.
    Forward,
    /// A resource name's records other than A/AAAA (MX, TXT, SRV, ...): the connector serving
    /// it resolves them in its network (see [`crate::dns::records`]).
    AskConnector { name: String },
    /// Not a DNS message we can even answer with an error.
    Drop,
}

/// A query name as policies spell hostnames: lowercase, without the trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn error_reply(id: u16, code: ResponseCode) -> Reply {
    let mut m = Message::response(id, OpCode::Query);
    m.metadata.response_code = code;
    match m.to_vec() {
        Ok(v) => Reply::Answer(v),
        Err(_) => Reply::Drop,
    }
}

/// Answers `query` if it asks for a resource name (`is_resource` decides, on the normalized
/// name); `now` orders the pool's recycling.
pub fn respond(
    query: &[u8],
    pool: &mut SyntheticPool,
    is_resource: impl Fn(&str) -> bool,
    now: u64,
) -> Reply {
    let msg = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) => {
            // Answer FORMERR when there is at least a header to take the id from.
            return match query.get(..2) {
                Some(id) if query.len() >= 12 => {
                    error_reply(u16::from_be_bytes([id[0], id[1]]), ResponseCode::FormErr)
                }
                _ => Reply::Drop,
            };
        }
    };
    if msg.metadata.message_type != MessageType::Query {
        return Reply::Drop;
    }
    if msg.metadata.op_code != OpCode::Query || msg.queries.len() != 1 {
        return Reply::Forward;
    }
    let q = &msg.queries[0];
    let name = normalize(&q.name().to_ascii());
    if !is_resource(&name) {
        return Reply::Forward;
    }
    let mut resp = Message::response(msg.metadata.id, OpCode::Query);
    resp.metadata.recursion_desired = msg.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.authoritative = true;
    resp.queries.push(q.clone());
    if msg.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(EDNS_PAYLOAD);
        resp.edns = Some(e);
    }
    match q.query_type() {
        RecordType::A | RecordType::AAAA => match pool.assign(&name, now) {
            Some((v4, v6)) => {
                let rdata = if q.query_type() == RecordType::A {
                    RData::A(A(v4))
                } else {
                    RData::AAAA(AAAA(v6))
                };
                resp.answers
                    .push(Record::from_rdata(q.name().clone(), SYNTHETIC_TTL, rdata));
            }
            // Every synthetic address belongs to a name with live flows.
            None => resp.metadata.response_code = ResponseCode::ServFail,
        },
        // HTTPS/SVCB records carry address hints and ECH keys of the real servers: an app
        // using the hints would bypass the synthetic address (unrouted), so the name has none.
        RecordType::HTTPS | RecordType::SVCB | RecordType::ANY => {}
        _ => return Reply::AskConnector { name },
    }
    match resp.to_vec() {
        Ok(v) => Reply::Answer(v),
        Err(_) => error_reply(msg.metadata.id, ResponseCode::ServFail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::pool::{DEFAULT_V4, DEFAULT_V6};
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use proptest::prelude::*;
    use std::str::FromStr;

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn corp(n: &str) -> bool {
        n.ends_with(".corp.internal")
    }

    fn pool() -> SyntheticPool {
        SyntheticPool::new(DEFAULT_V4, DEFAULT_V6, 1000).unwrap()
    }

    #[test]
    fn resource_names_get_synthetic_addresses() {
        let mut p = pool();
        let Reply::Answer(a) = respond(
            &query("Wiki.Corp.Internal.", RecordType::A),
            &mut p,
            corp,
            1,
        ) else {
            panic!()
        };
        let m = Message::from_vec(&a).unwrap();
        assert_eq!(m.metadata.id, 4242);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        let RData::A(A(v4)) = m.answers[0].data else {
            panic!("{m:?}")
        };
        assert_eq!(p.name_of(v4.into()), Some("wiki.corp.internal"));
        assert_eq!(m.answers[0].ttl, SYNTHETIC_TTL);

        let Reply::Answer(a) = respond(
            &query("wiki.corp.internal.", RecordType::AAAA),
            &mut p,
            corp,
            2,
        ) else {
            panic!()
        };
        let m = Message::from_vec(&a).unwrap();
        let RData::AAAA(AAAA(v6)) = m.answers[0].data else {
            panic!("{m:?}")
        };
        assert_eq!(p.name_of(v6.into()), Some("wiki.corp.internal"));

        // Other types come from the connector's network.
        assert_eq!(
            respond(
                &query("wiki.corp.internal.", RecordType::MX),
                &mut p,
                corp,
                3
            ),
            Reply::AskConnector {
                name: "wiki.corp.internal".into()
            }
        );
        // HTTPS: no records (their address hints would bypass the tunnel).
        let Reply::Answer(a) = respond(
            &query("wiki.corp.internal.", RecordType::HTTPS),
            &mut p,
            corp,
            3,
        ) else {
            panic!()
        };
        let m = Message::from_vec(&a).unwrap();
        assert!(m.answers.is_empty() && m.metadata.response_code == ResponseCode::NoError);
    }

    #[test]
    fn other_names_and_odd_messages_go_upstream_or_get_errors() {
        let mut p = pool();
        assert_eq!(
            respond(&query("example.org.", RecordType::A), &mut p, corp, 1),
            Reply::Forward
        );
        assert_eq!(respond(&[1, 2, 3], &mut p, corp, 1), Reply::Drop);
        let mut garbage = vec![0xab, 0xcd];
        garbage.extend_from_slice(&[0xff; 20]);
        let Reply::Answer(a) = respond(&garbage, &mut p, corp, 1) else {
            panic!()
        };
        let m = Message::from_vec(&a).unwrap();
        assert_eq!(
            (m.metadata.id, m.metadata.response_code),
            (0xabcd, ResponseCode::FormErr)
        );
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut p = pool();
            let _ = respond(&bytes, &mut p, |_| true, 0);
        }

        #[test]
        fn never_panics_on_mangled_queries(mut q in Just(query("a.corp.internal.", RecordType::A)), flips in proptest::collection::vec((0usize..40, any::<u8>()), 1..8), cut in 0usize..40) {
            for (i, b) in flips {
                if let Some(x) = q.get_mut(i) { *x ^= b; }
            }
            q.truncate(cut.max(1).min(q.len()));
            let mut p = pool();
            let _ = respond(&q, &mut p, corp, 0);
        }
    }
}
