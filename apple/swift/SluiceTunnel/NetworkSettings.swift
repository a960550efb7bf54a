// NEPacketTunnelNetworkSettings from a settings event (SluiceModels.NetworkSettingsEvent).
//
//   ipv4 "A/N"        -> NEIPv4Settings(addresses: [A], subnetMasks: [mask of N])
//   routes (IPv4)     -> ipv4Settings.includedRoutes, NEIPv4Route(A, mask of N)
//   ipv6 "A/N" | null -> NEIPv6Settings(addresses: [A], networkPrefixLengths: [min(N, 120)])
//   routes (IPv6)     -> ipv6Settings.includedRoutes, NEIPv6Route(A, N)
//   dns_servers       -> NEDNSSettings(servers:), each also routed into the tunnel (/32, /128)
//   match_domains     -> dnsSettings.matchDomains, matchDomainsNoSearch = true
//   mtu               -> mtu
//   tunnelRemoteAddress "127.0.0.1": there is no single remote (WireGuard and Firezone do the
//   same; the system only shows it).

import Foundation
import NetworkExtension
import SluiceModels

enum NetworkSettingsError: Error, CustomStringConvertible {
    case badCIDR(String)

    var description: String {
        switch self {
        case .badCIDR(let text):
            return "settings event: not an address/prefix: \(text)"
        }
    }
}

/// "A/N" as (A, N), N within 0...maxPrefix.
private func splitCIDR(_ text: String, maxPrefix: Int) throws -> (address: String, prefix: Int) {
    let parts = text.split(separator: "/", omittingEmptySubsequences: false)
    guard parts.count == 2, let prefix = Int(parts[1]), prefix >= 0, prefix <= maxPrefix else {
        throw NetworkSettingsError.badCIDR(text)
    }
    return (String(parts[0]), prefix)
}

/// The dotted IPv4 mask of a prefix length: 24 -> "255.255.255.0".
private func ipv4Mask(prefix: Int) -> String {
    let bits: UInt32 = prefix == 0 ? 0 : UInt32.max << UInt32(32 - prefix)
    return "\(bits >> 24 & 0xff).\(bits >> 16 & 0xff).\(bits >> 8 & 0xff).\(bits & 0xff)"
}

private func isIPv6(_ cidrOrAddress: String) -> Bool {
    return cidrOrAddress.contains(":")
}

extension NetworkSettingsEvent {
    func makeNetworkSettings() throws -> NEPacketTunnelNetworkSettings {
        let settings = NEPacketTunnelNetworkSettings(tunnelRemoteAddress: "127.0.0.1")

        var routes4: [NEIPv4Route] = []
        var routes6: [NEIPv6Route] = []
        for route in routes {
            if isIPv6(route) {
                let (address, prefix) = try splitCIDR(route, maxPrefix: 128)
                routes6.append(
                    NEIPv6Route(destinationAddress: address, networkPrefixLength: NSNumber(value: prefix)))
            } else {
                let (address, prefix) = try splitCIDR(route, maxPrefix: 32)
                routes4.append(NEIPv4Route(destinationAddress: address, subnetMask: ipv4Mask(prefix: prefix)))
            }
        }
        // The engine answers DNS from packets sent to these addresses, so they must enter the
        // tunnel even where no route above covers them (the contract's example puts
        // 100.96.0.53 outside the /32 interface address and outside every route).
        for server in dnsServers {
            if isIPv6(server) {
                routes6.append(NEIPv6Route(destinationAddress: server, networkPrefixLength: 128))
            } else {
                routes4.append(NEIPv4Route(destinationAddress: server, subnetMask: "255.255.255.255"))
            }
        }

        let (address4, prefix4) = try splitCIDR(ipv4, maxPrefix: 32)
        let ipv4Settings = NEIPv4Settings(addresses: [address4], subnetMasks: [ipv4Mask(prefix: prefix4)])
        ipv4Settings.includedRoutes = routes4
        settings.ipv4Settings = ipv4Settings

        if let ipv6 = ipv6 {
            let (address6, prefix6) = try splitCIDR(ipv6, maxPrefix: 128)
            // Clamped to /120: iOS and macOS ignore an interface prefix longer than /120
            // (WireGuard's PacketTunnelSettingsGenerator and Firezone's NetworkSettings both do
            // this). The engine's /128 becomes /120; the routes below are not clamped.
            let ipv6Settings = NEIPv6Settings(
                addresses: [address6], networkPrefixLengths: [NSNumber(value: min(prefix6, 120))])
            ipv6Settings.includedRoutes = routes6
            settings.ipv6Settings = ipv6Settings
        }

        // With no match domains there is nothing to split: an NEDNSSettings whose matchDomains
        // is empty would make the engine the resolver for every name, so none is set.
        if !dnsServers.isEmpty && !matchDomains.isEmpty {
            let dns = NEDNSSettings(servers: dnsServers)
            dns.matchDomains = matchDomains
            // Only names under match_domains go to the engine; the domains are not added to the
            // search list.
            dns.matchDomainsNoSearch = true
            settings.dnsSettings = dns
        }

        settings.mtu = NSNumber(value: mtu)
        return settings
    }
}
