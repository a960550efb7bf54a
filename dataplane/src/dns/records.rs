//! DNS messages for a resource name's records other than A/AAAA: the connector resolves them
//! in its own network and answers the agent's query with what it found; the agent passes the
//! answer to the app, fitted to what the app can take over UDP.

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{Record, RecordType};

use crate::dns::responder::{normalize, EDNS_PAYLOAD};

/// The UDP payload a client may take without EDNS (RFC 1035).
const CLASSIC_UDP: usize = 512;

/// The question of a standard query: its normalized name and type.
pub fn question(query: &[u8]) -> Option<(String, RecordType)> {
    let m = Message::from_vec(query).ok()?;
    if m.metadata.message_type != MessageType::Query
        || m.metadata.op_code != OpCode::Query
        || m.queries.len() != 1
    {
        return None;
    }
    let q = &m.queries[0];
    Some((normalize(&q.name().to_ascii()), q.query_type()))
}

/// The answer to `query`: `code` with `answers` (and `authorities`, e.g. the SOA of a negative
/// answer). None if `query` is not a DNS message.
pub fn answer(
    query: &[u8],
    code: ResponseCode,
    answers: &[Record],
    authorities: &[Record],
) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let mut m = Message::response(q.metadata.id, OpCode::Query);
    m.metadata.recursion_desired = q.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.response_code = code;
    m.queries = q.queries.clone();
    m.answers = answers.to_vec();
    m.authorities = authorities.to_vec();
    if q.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(EDNS_PAYLOAD);
        m.edns = Some(e);
    }
    m.to_vec().ok()
}

/// `answer` as sent over UDP to the client that asked `query`: unchanged if it fits the
/// client's UDP size (512 bytes, or what its EDNS says), otherwise the header and question
/// only, with the TC bit set so the client asks again over TCP.
pub fn fit_udp(query: &[u8], answer: Vec<u8>) -> Vec<u8> {
    let limit = Message::from_vec(query)
        .ok()
        .and_then(|q| q.edns.map(|e| usize::from(e.max_payload())))
        .unwrap_or(CLASSIC_UDP)
        .max(CLASSIC_UDP);
    if answer.len() <= limit {
        return answer;
    }
    let Ok(mut m) = Message::from_vec(&answer) else {
        return answer;
    };
    m.answers.clear();
    m.authorities.clear();
    m.additionals.clear();
    m.metadata.truncation = true;
    m.to_vec().unwrap_or(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::rdata::TXT;
    use hickory_proto::rr::{Name, RData};
    use proptest::prelude::*;
    use std::str::FromStr;

    fn query(name: &str, t: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 99;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).unwrap(), t));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(4096);
            m.edns = Some(e);
        }
        m.to_vec().unwrap()
    }

    fn txt(name: &str, len: usize) -> Record {
        Record::from_rdata(
            Name::from_str(name).unwrap(),
            60,
            RData::TXT(TXT::new(vec!["x".repeat(len)])),
        )
    }

    #[test]
    fn questions_and_answers() {
        let q = query("Wiki.Corp.Internal.", RecordType::TXT, false);
        assert_eq!(
            question(&q),
            Some(("wiki.corp.internal".into(), RecordType::TXT))
        );
        assert_eq!(question(&[1, 2, 3]), None);
        let a = answer(
            &q,
            ResponseCode::NoError,
            &[txt("wiki.corp.internal.", 20)],
            &[],
        )
        .unwrap();
        let m = Message::from_vec(&a).unwrap();
        assert_eq!(m.metadata.id, 99);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert_eq!(m.queries, Message::from_vec(&q).unwrap().queries);
        assert_eq!(m.answers.len(), 1);
        let nx = answer(&q, ResponseCode::NXDomain, &[], &[]).unwrap();
        assert_eq!(
            Message::from_vec(&nx).unwrap().metadata.response_code,
            ResponseCode::NXDomain
        );
    }

    #[test]
    fn large_answers_are_truncated_for_small_udp_clients() {
        let records: Vec<Record> = (0..8).map(|_| txt("big.corp.internal.", 200)).collect();
        let classic = query("big.corp.internal.", RecordType::TXT, false);
        let a = answer(&classic, ResponseCode::NoError, &records, &[]).unwrap();
        assert!(a.len() > 1500);
        let fitted = fit_udp(&classic, a.clone());
        let m = Message::from_vec(&fitted).unwrap();
        assert!(m.metadata.truncation && m.answers.is_empty());
        assert!(fitted.len() <= CLASSIC_UDP);
        // A client whose EDNS takes 4096 bytes gets it whole.
        let edns = query("big.corp.internal.", RecordType::TXT, true);
        let a = answer(&edns, ResponseCode::NoError, &records, &[]).unwrap();
        assert_eq!(fit_udp(&edns, a.clone()), a);
    }

    proptest! {
        #[test]
        fn never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = question(&bytes);
            let _ = answer(&bytes, ResponseCode::ServFail, &[], &[]);
            let _ = fit_udp(&bytes, bytes.clone());
        }
    }
}
