// The document sluice_engine_status returns: the same JSON `sluice status --json` prints on
// Linux (Rust: dataplane/src/status.rs, AgentStatus and the types under it). Optional here is
// Option there; every key is spelled out in CodingKeys so each can be checked against the Rust
// field of the same name.

import Foundation

/// A running agent and its tunnels.
public struct SluiceStatusReport: Codable, Equatable {
    /// The agent certificate's name.
    public var name: String
    /// The agent's peer id (SHA-256 of its public key, hex).
    public var peerId: String
    public var relay: RelayStatus
    /// One per connector the agent has used since it started.
    public var tunnels: [TunnelStatus]

    private enum CodingKeys: String, CodingKey {
        case name
        case peerId = "peer_id"
        case relay
        case tunnels
    }
}

/// The control connection to the relay.
public struct RelayStatus: Codable, Equatable {
    /// The relay's UDP address.
    public var addr: String
    /// Whether the control connection is up.
    public var connected: Bool
    /// Our address as the relay sees it (QUIC Address Discovery).
    public var observedAddr: String?
    /// While not connected: why the last attempt failed.
    public var error: String?

    private enum CodingKeys: String, CodingKey {
        case addr
        case connected
        case observedAddr = "observed_addr"
        case error
    }
}

/// The ICE candidate pair a direct path uses.
public struct CandidatePair: Codable, Equatable {
    public var local: String
    public var remote: String

    private enum CodingKeys: String, CodingKey {
        case local
        case remote
    }
}

/// One connector's tunnel.
public struct TunnelStatus: Codable, Equatable {
    /// The connector's name (as the policy's resources name it).
    public var connector: String
    /// The connector's peer id, once the relay has told us.
    public var peerId: String?
    public var state: TunnelState
    public var path: TunnelPath
    /// The connector's address on the direct path, when that is the path in use.
    public var directAddr: String?
    public var candidatePair: CandidatePair?
    /// Smoothed round-trip time of the path in use, milliseconds.
    public var rttMs: Double?
    /// QUIC bytes (UDP payloads, retransmissions included) each way.
    public var bytesSent: UInt64
    public var bytesReceived: UInt64
    public var packetsSent: UInt64
    public var packetsReceived: UInt64
    /// Seconds since the path last changed; nil if it never did.
    public var sinceSwitchSecs: Double?
    /// Seconds since the tunnel came up (0 while it is not up).
    public var upSecs: Double

    private enum CodingKeys: String, CodingKey {
        case connector
        case peerId = "peer_id"
        case state
        case path
        case directAddr = "direct_addr"
        case candidatePair = "candidate_pair"
        case rttMs = "rtt_ms"
        case bytesSent = "bytes_sent"
        case bytesReceived = "bytes_received"
        case packetsSent = "packets_sent"
        case packetsReceived = "packets_received"
        case sinceSwitchSecs = "since_switch_secs"
        case upSecs = "up_secs"
    }
}
