//! Split DNS on the agent: resource hostnames resolve to synthetic addresses ([`pool`]) that
//! route into the tunnel; the connector resolves the real name in its own network. Every other
//! query goes to the upstream resolver unchanged ([`responder`] says which is which). A
//! resource name's other records are resolved by its connector ([`records`]).

pub mod live_flows;
pub mod pool;
pub mod records;
pub mod responder;
