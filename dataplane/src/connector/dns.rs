//! The connector's side of split DNS: an agent asks on its tunnel for a resource name's records
//! other than A/AAAA (MX, TXT, SRV, ...), and the connector looks them up in its own network.
//! Private zone data is private: only names the agent's user may reach, of resources this
//! connector serves, are looked up. This decides; the host does the lookup.

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use sluice_policy::{Policy, Subject};

use crate::dns::records;

/// Lookups one agent may have running at once; past this it gets SERVFAIL.
pub const MAX_IN_FLIGHT: usize = 64;

/// What becomes of one query.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Answer at once with this (refused, malformed, too many in flight).
    Answer(Vec<u8>),
    /// Look `name` up for records of type `rtype`.
    Lookup { name: String, rtype: RecordType },
    /// Not a DNS message: nothing can answer it.
    Ignore,
}

/// Who asks, against which policy.
pub struct Asker<'a> {
    pub policy: &'a Policy,
    /// None until the agent's certificate is known (then nothing is allowed).
    pub subject: Option<&'a Subject>,
    /// This connector's name: only its resources count.
    pub me: &'a str,
    /// Unix seconds, for rules that expire.
    pub now: i64,
    /// Lookups this agent has running now.
    pub in_flight: usize,
}

/// Decides what to do with `query` from `asker`.
pub fn admit(asker: &Asker<'_>, query: &[u8]) -> Admission {
    let refuse = |code| match records::answer(query, code, &[], &[]) {
        Some(a) => Admission::Answer(a),
        None => Admission::Ignore,
    };
    let Some((name, rtype)) = records::question(query) else {
        return refuse(ResponseCode::FormErr);
    };
    let allowed = asker.subject.and_then(|s| {
        asker
            .policy
            .name_allowed(s, &name, asker.now, Some(asker.me))
    });
    if allowed.is_none() {
        tracing::debug!("DNS: an agent may not see {name} {rtype}: refused");
        return refuse(ResponseCode::Refused);
    }
    if asker.in_flight >= MAX_IN_FLIGHT {
        return refuse(ResponseCode::ServFail);
    }
    Admission::Lookup { name, rtype }
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::Name;

    use super::*;

    fn policy() -> Policy {
        sluice_policy::compile::compile(
            "version: 1\nresources:\n  - name: mail\n    connector: office\n    addresses: [\"mail.corp.internal\"]\n    ports: [tcp/25]\n  - name: elsewhere\n    connector: branch\n    addresses: [\"db.corp.internal\"]\n    ports: [tcp/5432]\nrules:\n  - name: staff\n    action: allow\n    who: [user:alice]\n    to: [mail, elsewhere]\n",
            "test.yaml",
            0,
        )
        .expect("policy")
        .policy
    }

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 7;
        m.add_query(Query::query(Name::from_ascii(name).expect("name"), t));
        m.to_vec().expect("encodes")
    }

    fn code(answer: &Admission) -> Option<ResponseCode> {
        match answer {
            Admission::Answer(a) => Some(Message::from_vec(a).ok()?.metadata.response_code),
            _ => None,
        }
    }

    #[test]
    fn an_allowed_name_of_this_connector_is_looked_up() {
        let p = policy();
        let alice = p.subject("alice", &[]);
        let asker = Asker {
            policy: &p,
            subject: Some(&alice),
            me: "office",
            now: 0,
            in_flight: 0,
        };
        assert_eq!(
            admit(&asker, &query("Mail.Corp.Internal.", RecordType::MX)),
            Admission::Lookup {
                name: "mail.corp.internal".into(),
                rtype: RecordType::MX
            }
        );
    }

    #[test]
    fn other_users_other_connectors_and_unknown_agents_are_refused() {
        let p = policy();
        let (alice, bob) = (p.subject("alice", &[]), p.subject("bob", &[]));
        let mut asker = Asker {
            policy: &p,
            subject: Some(&bob),
            me: "office",
            now: 0,
            in_flight: 0,
        };
        let mx = query("mail.corp.internal.", RecordType::MX);
        assert_eq!(code(&admit(&asker, &mx)), Some(ResponseCode::Refused));
        asker.subject = None;
        assert_eq!(code(&admit(&asker, &mx)), Some(ResponseCode::Refused));
        asker.subject = Some(&alice);
        let other = query("db.corp.internal.", RecordType::TXT);
        assert_eq!(code(&admit(&asker, &other)), Some(ResponseCode::Refused));
    }

    #[test]
    fn too_many_lookups_get_servfail_and_junk_gets_nothing() {
        let p = policy();
        let alice = p.subject("alice", &[]);
        let asker = Asker {
            policy: &p,
            subject: Some(&alice),
            me: "office",
            now: 0,
            in_flight: MAX_IN_FLIGHT,
        };
        let mx = query("mail.corp.internal.", RecordType::MX);
        assert_eq!(code(&admit(&asker, &mx)), Some(ResponseCode::ServFail));
        assert_eq!(admit(&asker, b"\x01"), Admission::Ignore);
    }
}
