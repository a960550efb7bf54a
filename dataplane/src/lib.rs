//! The Sluice packet plane: identity and TLS, wire formats, IP packet handling, and the QUIC
//! sessions (control connection to the relay, end-to-end tunnels) as sans-IO state machines.

pub mod ack_hold;
pub mod codel;
pub mod connector;
pub mod connector_record;
pub mod control;
pub mod control_link;
pub mod datagram;
pub mod dns;
pub mod engine;
pub mod homing;
pub mod identity;
pub mod metrics;
pub mod msgstream;
pub mod nat;
pub mod packet;
pub mod queue_device;
pub mod rate;
mod reader;
pub mod revocation;
pub mod session;
pub mod status;
pub mod tls;
pub mod tunnel;
pub mod wall_clock;
pub mod wire;
