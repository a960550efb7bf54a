//! The connector's side of split DNS: an agent's query for a resource name's records other
//! than A/AAAA (MX, TXT, SRV, ...), resolved with this network's resolvers and answered on the
//! tunnel. Private zone data is private: only names the agent's user is allowed to reach, and
//! only of resources this connector serves, are looked up.

use std::sync::Arc;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::TokioResolver;
use sluice_dataplane::dns::records;
use sluice_dataplane::identity::PeerId;
use sluice_policy::{Policy, Subject};
use tokio::sync::mpsc;

/// Lookups one agent may have running at once; past this it gets SERVFAIL.
pub const MAX_IN_FLIGHT: usize = 64;

/// A finished lookup: the agent, its request id and the answer.
pub type Done = (PeerId, u32, Vec<u8>);

/// What becomes of one query.
pub enum Outcome {
    /// Answer now with this.
    Answer(Vec<u8>),
    /// A lookup was started; its answer arrives on the `done` channel.
    Started,
    /// Not a DNS query: nothing to answer.
    Ignore,
}

pub struct Query<'a> {
    pub policy: &'a Policy,
    pub subject: Option<&'a Subject>,
    /// This connector's name.
    pub me: &'a str,
    pub peer: PeerId,
    pub id: u32,
    pub now: i64,
}

/// Checks `query` against the policy and starts its lookup.
pub fn start(
    q: Query<'_>,
    query: Vec<u8>,
    resolver: Option<&Arc<TokioResolver>>,
    in_flight: &mut usize,
    done: &mpsc::Sender<Done>,
) -> Outcome {
    let Some((name, rtype)) = records::question(&query) else {
        return match records::answer(&query, ResponseCode::FormErr, &[], &[]) {
            Some(a) => Outcome::Answer(a),
            None => Outcome::Ignore,
        };
    };
    let refuse = |code| match records::answer(&query, code, &[], &[]) {
        Some(a) => Outcome::Answer(a),
        None => Outcome::Ignore,
    };
    let allowed = q
        .subject
        .and_then(|s| q.policy.name_allowed(s, &name, q.now, Some(q.me)));
    if allowed.is_none() {
        tracing::debug!(
            "DNS: agent peer {} may not see {name} {rtype}: refused",
            q.peer.short()
        );
        return refuse(ResponseCode::Refused);
    }
    let Some(resolver) = resolver else {
        return refuse(ResponseCode::ServFail);
    };
    if *in_flight >= MAX_IN_FLIGHT {
        return refuse(ResponseCode::ServFail);
    }
    *in_flight += 1;
    let (resolver, done, peer, id) = (resolver.clone(), done.clone(), q.peer, q.id);
    tokio::spawn(async move {
        let answer = lookup(&resolver, &name, rtype, &query).await;
        let _ = done.send((peer, id, answer)).await;
    });
    Outcome::Started
}

/// Resolves `name`/`rtype` and writes the answer to `query`; always some answer (SERVFAIL at
/// worst), so the agent never waits for nothing.
async fn lookup(resolver: &TokioResolver, name: &str, rtype: RecordType, query: &[u8]) -> Vec<u8> {
    // Fully qualified: the connector's search domains must not be appended.
    let fqdn = format!("{name}.");
    let (code, answers, authorities) = match resolver.lookup(fqdn.as_str(), rtype).await {
        Ok(l) => (
            ResponseCode::NoError,
            l.answers().to_vec(),
            l.authorities().to_vec(),
        ),
        Err(NetError::Dns(DnsError::NoRecordsFound(nr))) => (
            nr.response_code,
            Vec::new(),
            nr.authorities.map(|a| a.to_vec()).unwrap_or_default(),
        ),
        Err(NetError::Dns(DnsError::ResponseCode(c))) => (c, Vec::new(), Vec::new()),
        Err(e) => {
            tracing::debug!("DNS: {name} {rtype}: {e}");
            (ResponseCode::ServFail, Vec::new(), Vec::new())
        }
    };
    records::answer(query, code, &answers, &authorities)
        .or_else(|| records::answer(query, ResponseCode::ServFail, &[], &[]))
        .unwrap_or_default()
}
