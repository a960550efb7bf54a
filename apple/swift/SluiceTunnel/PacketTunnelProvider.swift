// The Network Extension: a NEPacketTunnelProvider around one SluiceEngine.
//
// Start: providerConfiguration (agent YAML + policy YAML) and the keychain (certificate, key,
// CA) -> SluiceEngine -> start (HOST: packetFlow; or UTUN: the library reads the utun
// descriptor) -> the first event, a settings event, is applied with setTunnelNetworkSettings
// -> only then startTunnel completes and packets move. Later settings events are applied the
// same way unless nothing changed.
//
// Threads: every engine call and every stored property below is used on `queue` only; the
// engine's work_waiting callback, packetFlow reads, NWPathMonitor and the NEProvider overrides
// all hop onto it. setTunnelNetworkSettings is waited for on `queue` (at most 5 s), so packets
// wait while settings change, and settings are applied in the order the engine sent them.

import Foundation
import Network
import NetworkExtension
import SluiceKit
import SluiceModels
import os

enum ProviderError: Error, CustomStringConvertible {
    case configuration(String)
    case noUtunDescriptor
    case noSettings
    case settings(Error)
    case engineStopped(String)
    case stoppedBeforeStart

    var description: String {
        switch self {
        case .configuration(let what):
            return "provider configuration: \(what)"
        case .noUtunDescriptor:
            return "no utun control socket among this process's descriptors"
        case .noSettings:
            return "the engine sent no settings event within 30 s of starting"
        case .settings(let error):
            return "setTunnelNetworkSettings failed: \(error)"
        case .engineStopped(let reason):
            return "the engine stopped: \(reason)"
        case .stoppedBeforeStart:
            return "stopped before the first settings were applied"
        }
    }
}

final class PacketTunnelProvider: NEPacketTunnelProvider {
    private let logger = Logger(subsystem: "dev.sluice", category: "tunnel")
    private let queue = DispatchQueue(label: "dev.sluice.tunnel")

    private var engine: SluiceEngine?
    private var mode: PacketMode = .host
    /// startTunnel's completion handler, held until the first settings are applied.
    private var pendingStart: ((Error?) -> Void)?
    /// The last settings event applied (to skip one that changes nothing).
    private var appliedSettings: NetworkSettingsEvent?
    /// HOST mode: whether packetFlow is being read (from the first applied settings to stop).
    private var readingPackets = false
    private var pathMonitor: NWPathMonitor?
    /// A summary of the last network path seen (to skip updates that change nothing).
    private var lastPath: String?

    private static let stopTimeoutMs: UInt32 = 2000
    /// WireGuardAdapter waits 5 s too: setTunnelNetworkSettings' completion sometimes never
    /// comes.
    private static let settingsTimeout: DispatchTimeInterval = .seconds(5)
    private static let firstSettingsTimeout: DispatchTimeInterval = .seconds(30)
    private static let packetBatch = 256

    // MARK: - NEPacketTunnelProvider

    override func startTunnel(
        options: [String: NSObject]?, completionHandler: @escaping (Error?) -> Void
    ) {
        queue.async {
            self.start(completionHandler: completionHandler)
        }
    }

    override func stopTunnel(
        with reason: NEProviderStopReason, completionHandler: @escaping () -> Void
    ) {
        queue.async {
            self.logger.info("stopTunnel, reason \(reason.rawValue)")
            self.teardown()
            if let completion = self.pendingStart {
                self.pendingStart = nil
                completion(ProviderError.stoppedBeforeStart)
            }
            completionHandler()
        }
    }

    override func sleep(completionHandler: @escaping () -> Void) {
        queue.async {
            do {
                try self.engine?.sleep()
            } catch {
                self.logger.error("sleep: \(String(describing: error), privacy: .public)")
            }
            completionHandler()
        }
    }

    override func wake() {
        queue.async {
            do {
                try self.engine?.wake()
            } catch {
                self.logger.error("wake: \(String(describing: error), privacy: .public)")
            }
        }
    }

    /// "status" -> the engine's status JSON; "set_policy\n" + YAML -> "ok" or the error text
    /// (SluiceModels.ProviderMessage). Anything else, or no engine: no data.
    override func handleAppMessage(_ messageData: Data, completionHandler: ((Data?) -> Void)? = nil) {
        queue.async {
            let text = String(decoding: messageData, as: UTF8.self)
            guard let engine = self.engine else {
                completionHandler?(nil)
                return
            }
            if text == ProviderMessage.status {
                do {
                    completionHandler?(try engine.statusJSON())
                } catch {
                    self.logger.error("status: \(String(describing: error), privacy: .public)")
                    completionHandler?(nil)
                }
            } else if text.hasPrefix(ProviderMessage.setPolicyPrefix) {
                let policy = String(text.dropFirst(ProviderMessage.setPolicyPrefix.count))
                do {
                    try engine.setPolicy(policy)
                    completionHandler?(Data("ok".utf8))
                } catch {
                    completionHandler?(Data(String(describing: error).utf8))
                }
            } else {
                completionHandler?(nil)
            }
        }
    }

    // MARK: - Start and stop (on queue)

    private struct Configuration {
        let agentYAML: String
        let policyYAML: String
        let utun: Bool
    }

    private func readProviderConfiguration() throws -> Configuration {
        guard let proto = protocolConfiguration as? NETunnelProviderProtocol,
            let values = proto.providerConfiguration
        else {
            throw ProviderError.configuration("no providerConfiguration")
        }
        guard let agentYAML = values[ProviderConfigurationKey.agentYAML] as? String else {
            throw ProviderError.configuration("no \(ProviderConfigurationKey.agentYAML)")
        }
        guard let policyYAML = values[ProviderConfigurationKey.policyYAML] as? String else {
            throw ProviderError.configuration("no \(ProviderConfigurationKey.policyYAML)")
        }
        let packetMode = values[ProviderConfigurationKey.packetMode] as? String ?? "host"
        guard packetMode == "host" || packetMode == "utun" else {
            throw ProviderError.configuration("packet_mode \(packetMode): not host or utun")
        }
        return Configuration(agentYAML: agentYAML, policyYAML: policyYAML, utun: packetMode == "utun")
    }

    private func start(completionHandler: @escaping (Error?) -> Void) {
        do {
            let configuration = try readProviderConfiguration()
            let engine = try SluiceEngine(
                configYAML: configuration.agentYAML,
                policyYAML: configuration.policyYAML,
                certificatePEM: try Keychain.read(.certificate),
                keyPEM: try Keychain.read(.key),
                caPEM: try Keychain.read(.ca),
                workQueue: queue,
                onWorkWaiting: { [weak self] in
                    self?.drain()
                }
            )
            var fd: Int32 = -1
            if configuration.utun {
                fd = try findUtunDescriptor(engine)
            }
            self.mode = configuration.utun ? .utun : .host
            self.engine = engine
            self.pendingStart = completionHandler
            try engine.start(mode: mode, fd: fd)
        } catch {
            logger.error("start: \(String(describing: error), privacy: .public)")
            self.engine = nil
            self.pendingStart = nil
            self.appliedSettings = nil
            completionHandler(error)
            return
        }
        logger.info("engine started in \(self.mode == .utun ? "utun" : "host", privacy: .public) mode")
        queue.asyncAfter(deadline: .now() + Self.firstSettingsTimeout) { [weak self] in
            guard let self = self, self.pendingStart != nil else {
                return
            }
            self.fail(ProviderError.noSettings)
        }
    }

    /// UTUN mode: the descriptor, found the way WireGuardKit finds it (SluiceKit/Utun.swift).
    ///
    /// NetworkExtension makes the utun interface when settings are first applied, and
    /// sluice_engine_start wants the descriptor. So the engine's own starting settings
    /// (sluice_engine_initial_settings, readable before start) are applied first, then the
    /// descriptor is looked up; the first settings event after start carries the same
    /// settings and only completes the start. Not tried on a device (nothing here was
    /// compiled); HOST mode (the default) needs none of this.
    private func findUtunDescriptor(_ engine: SluiceEngine) throws -> Int32 {
        let settings = try engine.initialSettings()
        if let error = applyNetworkSettings(try settings.makeNetworkSettings()) {
            throw ProviderError.settings(error)
        }
        appliedSettings = settings
        logger.info("settings generation \(settings.generation) applied before start")
        guard let fd = Utun.findFileDescriptor() else {
            throw ProviderError.noUtunDescriptor
        }
        logger.info("utun descriptor \(fd)")
        return fd
    }

    /// Stops and drops the engine, the path monitor and packet reading.
    private func teardown() {
        pathMonitor?.cancel()
        pathMonitor = nil
        readingPackets = false
        if let engine = engine {
            do {
                // Returns when the engine's thread is joined; no callback runs after it.
                try engine.stop(timeout: Self.stopTimeoutMs)
            } catch {
                logger.error("stop: \(String(describing: error), privacy: .public)")
            }
            // Freed (sluice_engine_free, then the callback box released) on a later turn of
            // the queue, never inside the handler of the box's own work signal, where drain()
            // may be running now.
            queue.async {
                withExtendedLifetime(engine) {}
            }
        }
        engine = nil
        appliedSettings = nil
        lastPath = nil
    }

    /// The tunnel cannot go on: stop, and fail the start or cancel the tunnel.
    private func fail(_ error: Error) {
        logger.error("\(String(describing: error), privacy: .public)")
        teardown()
        if let completion = pendingStart {
            pendingStart = nil
            completion(error)
        } else {
            cancelTunnelWithError(error)
        }
    }

    // MARK: - Events (on queue)

    /// After work_waiting: every waiting event, then (HOST mode, once packets move) the packets
    /// to write to packetFlow.
    private func drain() {
        guard let engine = engine else {
            return
        }
        while self.engine === engine {  // handling an event may stop the engine
            let event: SluiceEvent?
            do {
                event = try engine.nextEvent()
            } catch let error as SluiceError {
                logger.error("\(error.description, privacy: .public)")
                break
            } catch {
                // JSON that does not decode: that event is gone, the next may be fine.
                logger.error("event: \(String(describing: error), privacy: .public)")
                continue
            }
            guard let event = event else {
                break  // SLUICE_EMPTY
            }
            handle(event)
        }

        guard self.engine === engine, mode == .host, readingPackets else {
            return
        }
        let packets = engine.takePackets(limit: Self.packetBatch)
        if !packets.isEmpty {
            packetFlow.writePackets(
                packets.map { $0.packet },
                withProtocols: packets.map { NSNumber(value: $0.protocolFamily) })
        }
        if packets.count == Self.packetBatch {
            // More may be waiting: another round after what is already queued (packet reads).
            queue.async { [weak self] in
                self?.drain()
            }
        }
    }

    private func handle(_ event: SluiceEvent) {
        switch event {
        case .settings(let settings):
            apply(settings)
        case .tunnel(let connector, let state, let path):
            logger.info(
                "tunnel \(connector, privacy: .public): \(state.rawValue, privacy: .public) via \(path.rawValue, privacy: .public)"
            )
        case .audit(let line):
            // Private (the os_log default): who reached what.
            logger.info("audit \(line)")
        case .stopped(let reason):
            fail(ProviderError.engineStopped(reason))
        }
    }

    /// A settings event -> NEPacketTunnelNetworkSettings -> setTunnelNetworkSettings. The first
    /// one that succeeds completes startTunnel and starts packets and the path monitor.
    private func apply(_ settings: NetworkSettingsEvent) {
        if let applied = appliedSettings, applied.sameSettings(as: settings) {
            logger.debug("settings generation \(settings.generation): unchanged, not applied")
            // UTUN mode applied these before start: they are in force now.
            settingsInForce()
            return
        }
        let networkSettings: NEPacketTunnelNetworkSettings
        do {
            networkSettings = try settings.makeNetworkSettings()
        } catch {
            settingsFailed(settings, error)
            return
        }
        if let error = applyNetworkSettings(networkSettings) {
            settingsFailed(settings, ProviderError.settings(error))
            return
        }
        appliedSettings = settings
        logger.info("settings generation \(settings.generation) applied")
        settingsInForce()
    }

    /// Settings are in force: the first time, startTunnel completes and packets and the path
    /// monitor start.
    private func settingsInForce() {
        if let completion = pendingStart {
            pendingStart = nil
            completion(nil)
            startPathMonitor()
            if mode == .host {
                readingPackets = true
                readPackets()
                // Packets may already be waiting: a drain after this one (not nested in it).
                queue.async { [weak self] in
                    self?.drain()
                }
            }
        }
    }

    /// The first settings failing fails the start; a later one keeps the settings applied
    /// before it.
    private func settingsFailed(_ settings: NetworkSettingsEvent, _ error: Error) {
        if pendingStart != nil {
            fail(error)
        } else {
            logger.error(
                "settings generation \(settings.generation) not applied: \(String(describing: error), privacy: .public)"
            )
        }
    }

    /// setTunnelNetworkSettings, waited for at most 5 s. nil: applied, or timed out (then, as
    /// WireGuardAdapter does, it goes on as if applied, and says so in the log).
    private func applyNetworkSettings(_ networkSettings: NEPacketTunnelNetworkSettings) -> Error? {
        let done = DispatchSemaphore(value: 0)
        var failure: Error?
        setTunnelNetworkSettings(networkSettings) { error in
            failure = error
            done.signal()
        }
        if done.wait(timeout: .now() + Self.settingsTimeout) == .timedOut {
            logger.error("setTunnelNetworkSettings did not complete within 5 s; going on")
            return nil
        }
        return failure
    }

    // MARK: - Packets, HOST mode (on queue)

    /// One packetFlow read at a time: its packets go to the engine, then the next read.
    private func readPackets() {
        packetFlow.readPackets { [weak self] packets, _ in
            // The protocols are not needed: each packet's first nibble is its IP version.
            guard let self = self else {
                return
            }
            self.queue.async {
                guard self.readingPackets, let engine = self.engine else {
                    return
                }
                do {
                    try engine.inject(packets: packets)
                } catch {
                    self.logger.error("inject: \(String(describing: error), privacy: .public)")
                }
                self.readPackets()
            }
        }
    }

    // MARK: - Network changes (on queue)

    private func startPathMonitor() {
        let monitor = NWPathMonitor()
        monitor.pathUpdateHandler = { [weak self] path in
            self?.pathUpdated(path)
        }
        monitor.start(queue: queue)  // the handler runs on queue, like every engine call
        pathMonitor = monitor
    }

    /// A real change of the network (not the first report, not a repeat) -> path_changed.
    ///
    /// NWPath names interfaces, not addresses, and has no resolver list (the public APIs that
    /// do, res_9_ninit and SCDynamicStore, give only the primary resolvers or are macOS-only),
    /// so the change is sent as {}: the library then lists the addresses itself with
    /// getifaddrs, leaving out the tunnel's own. Our utun (type .other) is left out of the
    /// summary, because applying our own settings changes it.
    private func pathUpdated(_ path: NWPath) {
        let interfaces = path.availableInterfaces.filter { $0.type != .other }.map { $0.name }
        let summary =
            "\(path.status) \(interfaces) ipv4 \(path.supportsIPv4) ipv6 \(path.supportsIPv6) gateways \(path.gateways)"
        if lastPath == nil {
            lastPath = summary  // the path the engine started on
            return
        }
        if lastPath == summary {
            return
        }
        lastPath = summary
        logger.info("network path changed: \(summary, privacy: .public)")
        do {
            try engine?.pathChanged()
        } catch {
            logger.error("path_changed: \(String(describing: error), privacy: .public)")
        }
    }
}
