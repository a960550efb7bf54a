// The events sluice_engine_next_event returns, one JSON object each (sluice.h):
//
//   {"type":"settings","generation":1,"ipv4":"100.96.0.1/32","ipv6":"fd5c:1ce0:1::1/128"|null,
//    "mtu":1280,"routes":["10.0.0.0/24","198.18.0.0/15",...],
//    "dns_servers":["100.96.0.53"],"match_domains":["corp.internal",...]}
//   {"type":"tunnel","connector":"office","state":"connecting"|"up"|"closed",
//    "path":"relay"|"direct"}
//   {"type":"audit","line":"{...one JSON audit line...}"}
//   {"type":"stopped","reason":"..."}

import Foundation

/// One event from the engine.
public enum SluiceEvent: Equatable {
    /// The tunnel interface the host should configure (the first event after start is always one).
    case settings(NetworkSettingsEvent)
    /// A connector's tunnel changed state or path.
    case tunnel(connector: String, state: TunnelState, path: TunnelPath)
    /// One audit line (itself a JSON document, passed on as text).
    case audit(String)
    /// The engine's thread ended on its own (for example the descriptor failed).
    case stopped(reason: String)
}

extension SluiceEvent: Decodable {
    /// An event whose "type" this code does not know (a newer library). SluiceEngine skips it.
    public struct UnknownType: Error, Equatable {
        public let type: String
    }

    private enum CodingKeys: String, CodingKey {
        case type
        case connector
        case state
        case path
        case line
        case reason
    }

    public init(from decoder: Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let type = try container.decode(String.self, forKey: .type)
        switch type {
        case "settings":
            // The same object holds the settings' own keys; "type" is ignored there.
            self = .settings(try NetworkSettingsEvent(from: decoder))
        case "tunnel":
            self = .tunnel(
                connector: try container.decode(String.self, forKey: .connector),
                state: try container.decode(TunnelState.self, forKey: .state),
                path: try container.decode(TunnelPath.self, forKey: .path)
            )
        case "audit":
            self = .audit(try container.decode(String.self, forKey: .line))
        case "stopped":
            self = .stopped(reason: try container.decode(String.self, forKey: .reason))
        default:
            throw UnknownType(type: type)
        }
    }
}

/// A "settings" event: what NEPacketTunnelNetworkSettings is built from.
public struct NetworkSettingsEvent: Codable, Equatable {
    /// Counts up by one with every settings event.
    public var generation: UInt64
    /// The agent's tunnel IPv4 address with its prefix, like "100.96.0.1/32".
    public var ipv4: String
    /// The agent's tunnel IPv6 address with its prefix, or nil when there is none.
    public var ipv6: String?
    public var mtu: Int
    /// IPv4 and IPv6 prefixes together, like "10.0.0.0/24" and "fd00::/64".
    public var routes: [String]
    /// The engine's own DNS addresses (it answers DNS from the packets sent to them).
    public var dnsServers: [String]
    /// The domains those servers answer for (split DNS).
    public var matchDomains: [String]

    private enum CodingKeys: String, CodingKey {
        case generation
        case ipv4
        case ipv6
        case mtu
        case routes
        case dnsServers = "dns_servers"
        case matchDomains = "match_domains"
    }

    public init(
        generation: UInt64, ipv4: String, ipv6: String?, mtu: Int, routes: [String],
        dnsServers: [String], matchDomains: [String]
    ) {
        self.generation = generation
        self.ipv4 = ipv4
        self.ipv6 = ipv6
        self.mtu = mtu
        self.routes = routes
        self.dnsServers = dnsServers
        self.matchDomains = matchDomains
    }

    /// Whether applying `other` would change nothing: every field but `generation` is equal.
    public func sameSettings(as other: NetworkSettingsEvent) -> Bool {
        return ipv4 == other.ipv4
            && ipv6 == other.ipv6
            && mtu == other.mtu
            && routes == other.routes
            && dnsServers == other.dnsServers
            && matchDomains == other.matchDomains
    }
}

/// A connector tunnel's state, in events and in the status document.
public enum TunnelState: String, Codable, Equatable {
    /// Looking the connector up, or handshaking.
    case connecting
    case up
    /// No tunnel now (it closed, or nothing has needed it since).
    case closed
}

/// Which path a tunnel's packets take, in events and in the status document.
public enum TunnelPath: String, Codable, Equatable {
    case relay
    case direct
}
