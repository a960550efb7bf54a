//! `revocation`: a revocation list as a file or the relay's control message carries it
//! (dataplane/src/revocation.rs): the parser, verification against the fixtures' CA, and for a
//! list that parses, the same entries signed by that CA must parse and verify back to them.

use sluice_dataplane::revocation::{CaKey, RevocationList};

use crate::fixtures;

pub fn revocation(data: &[u8]) {
    let f = fixtures::get();
    let ca = CaKey::from_cert_pem(&f.ca.cert_pem).expect("fixture CA key");
    let _ = RevocationList::verify(data, &ca);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = RevocationList::bytes_from_pem(text);
    }
    let Ok(list) = RevocationList::parse_unverified(data) else {
        return;
    };
    assert_eq!(list.encoded(), data);
    let _ = format!("{list:?}");
    let draft = list.draft();
    let signed = RevocationList::sign(&draft, &f.ca.cert_pem, &f.ca.key_pem)
        .expect("a list that parsed signs again");
    let back = RevocationList::verify(signed.encoded(), &ca).expect("our own list verifies");
    assert_eq!(back.draft(), draft);
    let pem = back.to_pem();
    let raw = RevocationList::bytes_from_pem(&pem).expect("our PEM reads back");
    assert_eq!(raw, signed.encoded());
    for id in [&f.agent.identity, &f.connector.identity] {
        let _ = list.revokes(id);
    }
}
