// Names the host app and the Network Extension must agree on.

import Foundation

/// Keys of NETunnelProviderProtocol.providerConfiguration (all values are String).
public enum ProviderConfigurationKey {
    /// The agent YAML text (relay, listen, tun, dns, direct_paths; file-path keys are ignored).
    public static let agentYAML = "agent_yaml"
    /// The policy YAML text (no includes).
    public static let policyYAML = "policy_yaml"
    /// "host" (packetFlow, the default) or "utun" (the library reads the utun descriptor).
    public static let packetMode = "packet_mode"
}

/// Messages the app sends with NETunnelProviderSession.sendProviderMessage (UTF-8 text).
public enum ProviderMessage {
    /// Answered with the status JSON (SluiceStatusReport), or no data while no engine runs.
    public static let status = "status"
    /// Followed by the policy YAML; answered with "ok" or the error text.
    public static let setPolicyPrefix = "set_policy\n"
}
