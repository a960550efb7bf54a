//! What of the `sluice` binary other crates use: its configuration files, so that the fuzz
//! targets (fuzz/targets) parse them exactly as the binary does. The binary takes [`config`]
//! from here; everything else of it stays in the binary.

pub mod config;

/// The default paths of the roles' status sockets: [`config`]'s defaults, and where
/// `sluice status` looks (the binary's `status` module re-exports them).
pub mod status {
    /// Where the agent listens unless its config says otherwise (`status_socket`).
    pub const DEFAULT_SOCKET: &str = "/run/sluice/agent.sock";
    /// The connector's, in the runtime directory its systemd unit gives it.
    pub const CONNECTOR_SOCKET: &str = "/run/sluice/connector/status.sock";
    /// The relay's, likewise.
    pub const RELAY_SOCKET: &str = "/run/sluice/relay/status.sock";
}
