//! The Sluice relay: authenticates agents and connectors on control connections, tells each its
//! observed address (QUIC Address Discovery), keeps the registry of connectors, and forwards the
//! opaque packets of end-to-end tunnels between control connections. It never holds tunnel keys.

pub mod limits;
pub mod mesh;
pub mod registry;
pub mod retry;
pub mod server;
