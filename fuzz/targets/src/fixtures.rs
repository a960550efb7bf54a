//! What the targets share and build once per process: an organisation CA, each role's
//! credentials, and the lab's policy (so captured lab traffic is allowed traffic here).
//! Making certificates per input would cost more than most inputs.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sluice_dataplane::identity::{self, PemPair, Role};
use sluice_dataplane::tls::Credentials;
use sluice_policy::Policy;

/// The lab's policy (`sluice lab up` writes it: linux/src/lab.rs), with one deny rule so that
/// both verdicts occur.
pub const POLICY: &str = r#"version: 1
groups:
  lab:
    description: every lab agent (its certificate lists this group)
resources:
  - name: lab-services
    connector: lab-connector
    addresses: [198.51.100.0/24, "fd00:5c1c:5c::/64"]
    ports: [any]
  - name: corp-zone
    connector: lab-connector
    addresses: ["*.corp.internal"]
    ports: [any]
  - name: closed
    connector: lab-connector
    addresses: [198.51.100.99, "secret.corp.internal"]
    ports: [tcp/22]
rules:
  - name: lab-all
    action: allow
    who: [group:lab]
    to: [lab-services, corp-zone]
  - name: not-ssh-there
    action: deny
    who: [group:lab]
    to: [closed]
"#;

pub struct Fixtures {
    pub ca: PemPair,
    pub relay: Credentials,
    pub agent: Credentials,
    pub connector: Credentials,
    pub policy: Arc<Policy>,
}

fn creds(ca: &PemPair, role: Role, name: &str) -> Credentials {
    let groups = ["lab".to_string()];
    let node = identity::issue(ca, role, name, &groups, Duration::from_secs(86_400 * 365))
        .expect("fixture certificate");
    Credentials::from_pem(
        node.cert_pem.as_bytes(),
        node.key_pem.as_bytes(),
        ca.cert_pem.as_bytes(),
        ["cert", "key", "ca"],
    )
    .expect("fixture credentials")
}

pub fn get() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let ca = identity::create_ca("fuzz", Duration::from_secs(86_400 * 365)).expect("CA");
        let policy = sluice_policy::compile(POLICY, "fuzz-policy.yaml", 0)
            .expect("fixture policy")
            .policy;
        Fixtures {
            relay: creds(&ca, Role::Relay, "relay-1"),
            agent: creds(&ca, Role::Agent, "alice"),
            connector: creds(&ca, Role::Connector, "lab-connector"),
            ca,
            policy: Arc::new(policy),
        }
    })
}
