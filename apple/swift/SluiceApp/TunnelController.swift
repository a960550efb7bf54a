// The app's side of the tunnel: the NETunnelProviderManager (the VPN profile), the keychain
// items, and the status the extension reports.

import Foundation
import NetworkExtension
import SluiceModels

@MainActor
final class TunnelController: ObservableObject {
    /// What the user imports with the file importer.
    enum ImportKind: String, CaseIterable, Identifiable {
        case agentYAML = "Agent YAML"
        case policyYAML = "Policy YAML"
        case certificate = "Certificate (PEM)"
        case key = "Key (PEM)"
        case ca = "CA certificate (PEM)"

        var id: String { rawValue }
    }

    @Published private(set) var vpnStatus: NEVPNStatus = .invalid
    /// The engine's status document, while connected (refreshed every 2 s).
    @Published private(set) var report: SluiceStatusReport?
    @Published private(set) var agentYAML = ""
    @Published private(set) var policyYAML = ""
    @Published private(set) var storedItems: Set<Keychain.Item> = []
    /// The last thing worth telling the user (an error, or what was done).
    @Published var message: String?

    private var manager: NETunnelProviderManager?
    private var statusObserver: NSObjectProtocol?
    private var timer: Timer?

    /// The Network Extension's bundle identifier: this app's plus ".tunnel" (set the extension
    /// target's PRODUCT_BUNDLE_IDENTIFIER that way).
    private var tunnelBundleIdentifier: String {
        return (Bundle.main.bundleIdentifier ?? "dev.sluice.app") + ".tunnel"
    }

    init() {
        refreshKeychain()
        timer = Timer.scheduledTimer(withTimeInterval: 2, repeats: true) { [weak self] _ in
            Task { @MainActor in
                self?.refresh()
            }
        }
    }

    // MARK: - The VPN profile

    /// Loads this app's profile (it installs at most one) and the YAML texts saved in it.
    func load() async {
        do {
            let managers = try await NETunnelProviderManager.loadAllFromPreferences()
            manager = managers.first
            if let proto = manager?.protocolConfiguration as? NETunnelProviderProtocol,
                let values = proto.providerConfiguration
            {
                agentYAML = values[ProviderConfigurationKey.agentYAML] as? String ?? ""
                policyYAML = values[ProviderConfigurationKey.policyYAML] as? String ?? ""
            }
            observeStatus()
            refresh()
        } catch {
            message = "Loading the VPN profile failed: \(error.localizedDescription)"
        }
    }

    /// Installs the profile, or updates it with the YAML texts imported since. While connected,
    /// the new policy is also sent to the running extension (set_policy).
    func saveProfile() async {
        guard !agentYAML.isEmpty, !policyYAML.isEmpty else {
            message = "Import the agent YAML and the policy YAML first."
            return
        }
        let manager = self.manager ?? NETunnelProviderManager()
        let proto = NETunnelProviderProtocol()
        proto.providerBundleIdentifier = tunnelBundleIdentifier
        // Shown in Settings; the extension takes the relay from the agent YAML itself.
        proto.serverAddress = TunnelController.relayAddress(inAgentYAML: agentYAML) ?? "Sluice"
        proto.providerConfiguration = [
            ProviderConfigurationKey.agentYAML: agentYAML,
            ProviderConfigurationKey.policyYAML: policyYAML,
        ]
        manager.protocolConfiguration = proto
        manager.localizedDescription = "Sluice"
        manager.isEnabled = true
        do {
            try await manager.saveToPreferences()
            // Loaded again after saving: a profile just saved cannot be started otherwise.
            try await manager.loadFromPreferences()
            self.manager = manager
            observeStatus()
            message = "VPN profile saved."
            if vpnStatus == .connected {
                pushPolicy()
            }
        } catch {
            message = "Saving the VPN profile failed: \(error.localizedDescription)"
        }
        refresh()
    }

    /// The value of the agent YAML's top-level `relay:` key (HOST:PORT), for serverAddress.
    static func relayAddress(inAgentYAML yaml: String) -> String? {
        for line in yaml.split(separator: "\n") where line.hasPrefix("relay:") {
            var value = line.dropFirst("relay:".count)
            if let comment = value.firstIndex(of: "#") {
                value = value[..<comment]
            }
            let trimmed = value.trimmingCharacters(in: .whitespaces)
                .trimmingCharacters(in: CharacterSet(charactersIn: "\"'"))
            return trimmed.isEmpty ? nil : trimmed
        }
        return nil
    }

    // MARK: - Connect and disconnect

    func connect() {
        guard let manager = manager else {
            message = "Install the VPN profile first."
            return
        }
        do {
            try manager.connection.startVPNTunnel()
        } catch {
            message = "Connecting failed: \(error.localizedDescription)"
        }
    }

    func disconnect() {
        manager?.connection.stopVPNTunnel()
    }

    // MARK: - Files

    func isImported(_ kind: ImportKind) -> Bool {
        switch kind {
        case .agentYAML:
            return !agentYAML.isEmpty
        case .policyYAML:
            return !policyYAML.isEmpty
        case .certificate:
            return storedItems.contains(.certificate)
        case .key:
            return storedItems.contains(.key)
        case .ca:
            return storedItems.contains(.ca)
        }
    }

    /// A file from the file importer: YAML texts are kept for the next saveProfile(); PEM files
    /// go into the shared keychain group at once.
    func importFile(_ result: Result<URL, Error>, as kind: ImportKind) {
        do {
            let url = try result.get()
            let accessing = url.startAccessingSecurityScopedResource()
            defer {
                if accessing {
                    url.stopAccessingSecurityScopedResource()
                }
            }
            let data = try Data(contentsOf: url)
            switch kind {
            case .agentYAML:
                agentYAML = String(decoding: data, as: UTF8.self)
            case .policyYAML:
                policyYAML = String(decoding: data, as: UTF8.self)
            case .certificate:
                try Keychain.store(data, as: .certificate)
            case .key:
                try Keychain.store(data, as: .key)
            case .ca:
                try Keychain.store(data, as: .ca)
            }
            refreshKeychain()
            message = "Imported \(url.lastPathComponent) as \(kind.rawValue)."
        } catch {
            message = "Import failed: \(error)"
        }
    }

    private func refreshKeychain() {
        storedItems = Set(Keychain.Item.allCases.filter { Keychain.contains($0) })
    }

    // MARK: - Status

    private func observeStatus() {
        if let observer = statusObserver {
            NotificationCenter.default.removeObserver(observer)
        }
        guard let connection = manager?.connection else {
            return
        }
        statusObserver = NotificationCenter.default.addObserver(
            forName: .NEVPNStatusDidChange, object: connection, queue: .main
        ) { [weak self] _ in
            Task { @MainActor in
                self?.refresh()
            }
        }
    }

    /// NEVPNStatus now, and (while connected) the engine's status through sendProviderMessage.
    func refresh() {
        vpnStatus = manager?.connection.status ?? .invalid
        guard vpnStatus == .connected, let session = manager?.connection as? NETunnelProviderSession
        else {
            report = nil
            return
        }
        do {
            try session.sendProviderMessage(Data(ProviderMessage.status.utf8)) { [weak self] data in
                let report = data.flatMap { try? JSONDecoder().decode(SluiceStatusReport.self, from: $0) }
                Task { @MainActor in
                    self?.report = report
                }
            }
        } catch {
            message = "Asking the tunnel for its status failed: \(error.localizedDescription)"
        }
    }

    /// Sends the policy YAML to the running extension (SluiceEngine.setPolicy there).
    private func pushPolicy() {
        guard let session = manager?.connection as? NETunnelProviderSession else {
            return
        }
        let body = Data((ProviderMessage.setPolicyPrefix + policyYAML).utf8)
        do {
            try session.sendProviderMessage(body) { [weak self] data in
                let answer = data.map { String(decoding: $0, as: UTF8.self) } ?? "no answer"
                Task { @MainActor in
                    self?.message = answer == "ok" ? "Policy applied." : "Policy not applied: \(answer)"
                }
            }
        } catch {
            message = "Sending the policy failed: \(error.localizedDescription)"
        }
    }

    static func describe(_ status: NEVPNStatus) -> String {
        switch status {
        case .invalid:
            return "Not installed"
        case .disconnected:
            return "Disconnected"
        case .connecting:
            return "Connecting"
        case .connected:
            return "Connected"
        case .reasserting:
            return "Reconnecting"
        case .disconnecting:
            return "Disconnecting"
        @unknown default:
            return "Unknown"
        }
    }
}
