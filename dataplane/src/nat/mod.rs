//! NAT traversal for the direct path between an agent and a connector: address candidates and
//! their priorities ([`candidate`]), the connectivity checks that find a working pair
//! ([`traversal`]), and whether the direct path in use still answers ([`liveness`]). The checks
//! run from the tunnel's own UDP socket, so the NAT mappings they open are the ones the tunnel
//! then uses.

pub mod candidate;
pub mod liveness;
pub mod local;
pub mod traversal;
