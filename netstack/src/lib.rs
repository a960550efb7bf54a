//! Connector-side termination: one smoltcp interface per agent accepts every destination
//! address, and its TCP, UDP and ICMP flows are spliced to real sockets toward the services.

pub mod device;
pub mod ping;
pub mod splice;
pub mod stack;
