//! `connector_record`: a signed connector record as the registry stores it and agents read it
//! (dataplane/src/connector_record.rs): the parser, verification against the fixtures' CA, and
//! for a record that parses, the same draft signed by the fixtures' connector must verify back
//! to it (when it is that connector's name) and feed a record book without a panic.

use sluice_dataplane::connector_record::{ConnectorRecord, RecordBook};
use sluice_dataplane::identity::unix_now;

use crate::fixtures;

pub fn connector_record(data: &[u8]) {
    let f = fixtures::get();
    let check = f.connector.peer_check().expect("fixture peer check");
    let now = unix_now();
    if let Ok(rec) = ConnectorRecord::verify(data, &check, now) {
        let mut book = RecordBook::default();
        let _ = book.offer(rec, now);
    }
    let Ok(rec) = ConnectorRecord::parse_unverified(data) else {
        return;
    };
    assert_eq!(rec.encoded(), data);
    let _ = format!("{rec:?}");
    let mut draft = rec.draft();
    draft.name = f.connector.identity.name.clone();
    draft.expires_at = draft.expires_at.max(now + 60);
    let signed = ConnectorRecord::sign(&draft, &f.connector).expect("a parsed draft signs again");
    let back =
        ConnectorRecord::verify(signed.encoded(), &check, now).expect("our own record verifies");
    assert_eq!(back.draft(), draft);
}
