//! Split DNS on the agent: resource hostnames resolve to synthetic addresses ([`pool`]) that
//! route into the tunnel; the connector resolves the real name in its own network. Every other
//! query goes to the upstream resolver unchanged ([`responder`] says which is which).

pub mod pool;
pub mod responder;
