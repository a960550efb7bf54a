// The host app: installs the VPN profile, imports the agent's files, connects and disconnects,
// and shows the engine's status. It links SluiceModels only (never the Rust library).

import SwiftUI

@main
struct SluiceApp: App {
    @StateObject private var controller = TunnelController()

    var body: some Scene {
        WindowGroup {
            ContentView()
                .environmentObject(controller)
        }
    }
}
