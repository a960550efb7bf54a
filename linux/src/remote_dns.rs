//! The connector's side of split DNS, the lookup: an agent's query for a resource name's
//! records other than A/AAAA (MX, TXT, SRV, ...), resolved with this network's resolvers. The
//! connector core decided that the agent may see the name
//! (`sluice_dataplane::connector::dns`); this only looks it up.

use std::sync::Arc;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::TokioResolver;
use sluice_dataplane::dns::records;
use sluice_dataplane::identity::PeerId;
use tokio::sync::mpsc;

/// A finished lookup: the agent, its request id and the answer.
pub type Done = (PeerId, u32, Vec<u8>);

/// Looks `name` up off the event loop; the answer to `query` goes to `done`. Without a
/// resolver the answer is SERVFAIL, returned at once.
pub fn start(
    resolver: Option<&Arc<TokioResolver>>,
    (agent, id): (PeerId, u32),
    name: String,
    rtype: RecordType,
    query: Vec<u8>,
    done: &mpsc::Sender<Done>,
) -> Option<Vec<u8>> {
    let Some(resolver) = resolver.cloned() else {
        return Some(records::answer(&query, ResponseCode::ServFail, &[], &[]).unwrap_or_default());
    };
    let done = done.clone();
    tokio::spawn(async move {
        let answer = lookup(&resolver, &name, rtype, &query).await;
        let _ = done.send((agent, id, answer)).await;
    });
    None
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
