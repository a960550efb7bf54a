// The JSON shapes of sluice.h's events and of the status document, decoded. These are the
// examples the contract gives, and a status document with every key dataplane/src/status.rs
// writes.

import SluiceModels
import XCTest

final class DecodingTests: XCTestCase {
    private func event(_ json: String) throws -> SluiceEvent {
        return try JSONDecoder().decode(SluiceEvent.self, from: Data(json.utf8))
    }

    func testSettings() throws {
        let json = """
            {"type":"settings","generation":1,"ipv4":"100.96.0.1/32","ipv6":"fd5c:1ce0:1::1/128",
             "mtu":1280,"routes":["10.0.0.0/24","198.18.0.0/15","fd5c:1ce0:d5::/96"],
             "dns_servers":["100.96.0.53"],"match_domains":["corp.internal"]}
            """
        let expected = NetworkSettingsEvent(
            generation: 1, ipv4: "100.96.0.1/32", ipv6: "fd5c:1ce0:1::1/128", mtu: 1280,
            routes: ["10.0.0.0/24", "198.18.0.0/15", "fd5c:1ce0:d5::/96"],
            dnsServers: ["100.96.0.53"], matchDomains: ["corp.internal"])
        XCTAssertEqual(try event(json), .settings(expected))
    }

    func testSettingsWithoutIPv6() throws {
        let json = """
            {"type":"settings","generation":2,"ipv4":"100.96.0.1/32","ipv6":null,"mtu":1280,
             "routes":[],"dns_servers":[],"match_domains":[]}
            """
        guard case .settings(let settings) = try event(json) else {
            return XCTFail("not a settings event")
        }
        XCTAssertNil(settings.ipv6)
        var next = settings
        next.generation = 3
        XCTAssertTrue(settings.sameSettings(as: next))
        next.mtu = 1400
        XCTAssertFalse(settings.sameSettings(as: next))
    }

    func testTunnelAuditStopped() throws {
        XCTAssertEqual(
            try event(#"{"type":"tunnel","connector":"office","state":"up","path":"direct"}"#),
            .tunnel(connector: "office", state: .up, path: .direct))
        XCTAssertEqual(
            try event(#"{"type":"audit","line":"{\"decision\":\"allow\"}"}"#),
            .audit(#"{"decision":"allow"}"#))
        XCTAssertEqual(
            try event(#"{"type":"stopped","reason":"utun read failed"}"#),
            .stopped(reason: "utun read failed"))
    }

    func testUnknownType() {
        XCTAssertThrowsError(try event(#"{"type":"later"}"#)) { error in
            XCTAssertEqual(error as? SluiceEvent.UnknownType, SluiceEvent.UnknownType(type: "later"))
        }
    }

    func testStatus() throws {
        let json = """
            {"name":"alice","peer_id":"ab12","relay":{"addr":"192.0.2.1:4433","connected":true,
             "observed_addr":"192.0.2.10:40000","error":null},
             "tunnels":[{"connector":"office","peer_id":"cd34","state":"up","path":"direct",
              "direct_addr":"198.51.100.7:4433",
              "candidate_pair":{"local":"192.0.2.10:40000","remote":"198.51.100.7:4433"},
              "rtt_ms":12.5,"bytes_sent":1000,"bytes_received":2000,"packets_sent":10,
              "packets_received":20,"since_switch_secs":187.5,"up_secs":200.0},
              {"connector":"lab","peer_id":null,"state":"connecting","path":"relay",
               "direct_addr":null,"candidate_pair":null,"rtt_ms":null,"bytes_sent":0,
               "bytes_received":0,"packets_sent":0,"packets_received":0,
               "since_switch_secs":null,"up_secs":0.0}]}
            """
        let report = try JSONDecoder().decode(SluiceStatusReport.self, from: Data(json.utf8))
        XCTAssertEqual(report.name, "alice")
        XCTAssertEqual(report.peerId, "ab12")
        XCTAssertEqual(report.relay.observedAddr, "192.0.2.10:40000")
        XCTAssertNil(report.relay.error)
        XCTAssertEqual(report.tunnels.count, 2)
        XCTAssertEqual(report.tunnels[0].candidatePair?.remote, "198.51.100.7:4433")
        XCTAssertEqual(report.tunnels[0].sinceSwitchSecs, 187.5)
        XCTAssertEqual(report.tunnels[1].state, .connecting)
        XCTAssertNil(report.tunnels[1].peerId)
    }

    func testStatusWithoutRelayError() throws {
        // RelayStatus.error is #[serde(default)]: older documents leave it out.
        let json = """
            {"name":"a","peer_id":"p","relay":{"addr":"r:1","connected":false,
             "observed_addr":null},"tunnels":[]}
            """
        let report = try JSONDecoder().decode(SluiceStatusReport.self, from: Data(json.utf8))
        XCTAssertNil(report.relay.error)
    }
}
