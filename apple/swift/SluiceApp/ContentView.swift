// The one screen: connection, files, and the engine's status.

import SluiceModels
import SwiftUI
import UniformTypeIdentifiers

struct ContentView: View {
    @EnvironmentObject private var controller: TunnelController
    @State private var importing = false
    @State private var importKind: TunnelController.ImportKind = .agentYAML

    private var isUp: Bool {
        return controller.vpnStatus == .connected || controller.vpnStatus == .connecting
            || controller.vpnStatus == .reasserting
    }

    var body: some View {
        NavigationView {
            Form {
                Section(header: Text("Connection")) {
                    Text(TunnelController.describe(controller.vpnStatus))
                    HStack {
                        Button("Connect") {
                            controller.connect()
                        }
                        .disabled(controller.vpnStatus != .disconnected)
                        Spacer()
                        Button("Disconnect") {
                            controller.disconnect()
                        }
                        .disabled(!isUp)
                    }
                }

                Section(header: Text("Configuration")) {
                    ForEach(TunnelController.ImportKind.allCases) { kind in
                        HStack {
                            Text(kind.rawValue)
                            Spacer()
                            Text(controller.isImported(kind) ? "imported" : "missing")
                                .foregroundColor(.secondary)
                            Button("Import…") {
                                importKind = kind
                                importing = true
                            }
                        }
                    }
                    Button("Install or update the VPN profile") {
                        Task {
                            await controller.saveProfile()
                        }
                    }
                }

                if let report = controller.report {
                    StatusSection(report: report)
                }

                if let message = controller.message {
                    Section {
                        Text(message)
                            .font(.footnote)
                    }
                }
            }
            .navigationTitle("Sluice")
        }
        .fileImporter(isPresented: $importing, allowedContentTypes: [.item]) { result in
            controller.importFile(result, as: importKind)
        }
        .task {
            await controller.load()
        }
    }
}

/// The engine's status document (SluiceStatusReport).
struct StatusSection: View {
    let report: SluiceStatusReport

    var body: some View {
        Section(header: Text("Engine")) {
            row("Agent", report.name)
            row("Relay", "\(report.relay.addr), \(report.relay.connected ? "connected" : "not connected")")
            if let observed = report.relay.observedAddr {
                row("Seen by the relay as", observed)
            }
            if let error = report.relay.error {
                row("Relay error", error)
            }
            ForEach(report.tunnels, id: \.connector) { tunnel in
                VStack(alignment: .leading) {
                    Text("\(tunnel.connector): \(tunnel.state.rawValue) via \(tunnel.path.rawValue)")
                    Text(detail(tunnel))
                        .font(.caption)
                        .foregroundColor(.secondary)
                }
            }
        }
    }

    private func row(_ label: String, _ value: String) -> some View {
        return HStack {
            Text(label)
            Spacer()
            Text(value)
                .foregroundColor(.secondary)
        }
    }

    private func detail(_ tunnel: TunnelStatus) -> String {
        var parts: [String] = []
        if let rtt = tunnel.rttMs {
            parts.append(String(format: "rtt %.1f ms", rtt))
        }
        if let pair = tunnel.candidatePair {
            parts.append("\(pair.local) → \(pair.remote)")
        }
        parts.append("sent \(tunnel.bytesSent) B, received \(tunnel.bytesReceived) B")
        parts.append(String(format: "up %.0f s", tunnel.upSecs))
        return parts.joined(separator: " · ")
    }
}
