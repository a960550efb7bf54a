//! The smoltcp device of the connector's stack: the packet-queue device the dataplane defines
//! (the agent engine's DNS-over-TCP server uses the same one).

pub use sluice_dataplane::queue_device::*;
