import Foundation

/// The status codes of sluice.h's `enum SluiceStatus`, as the int32_t every function returns.
///
/// The numbers are repeated here on purpose: Swift imports a C enum as a struct whose rawValue
/// is UInt32 or Int32 depending on its values, and cbindgen may emit the enum as constants or as
/// `typedef int32_t` instead; literal Int32 values compile against every one of those forms.
/// Check each line against sluice.h.
public enum SluiceCode: Int32 {
    case ok = 0                 // SLUICE_OK
    case empty = 1              // SLUICE_EMPTY
    case tooSmall = 2           // SLUICE_TOO_SMALL
    case errArgument = -1       // SLUICE_ERR_ARGUMENT
    case errConfig = -2         // SLUICE_ERR_CONFIG
    case errCredentials = -3    // SLUICE_ERR_CREDENTIALS
    case errPolicy = -4         // SLUICE_ERR_POLICY
    case errState = -5          // SLUICE_ERR_STATE
    case errIO = -6             // SLUICE_ERR_IO
    case errPanic = -99         // SLUICE_ERR_PANIC
}

/// sluice.h's `enum SluicePacketMode`, the `mode` argument of sluice_engine_start.
public enum PacketMode: Int32 {
    /// The host passes packets in (inject) and takes them out (takePackets): packetFlow.
    case host = 0               // SLUICE_PACKETS_HOST
    /// The library reads and writes the utun descriptor (4-byte address family in front).
    case utun = 1               // SLUICE_PACKETS_UTUN
    /// The library reads and writes a descriptor of bare IP packets (Linux TUN).
    case raw = 2                // SLUICE_PACKETS_RAW
}

/// A failed call: the status code, the C function that returned it, and sluice_last_error's
/// text, read on the same thread right after the call.
public struct SluiceError: Error, CustomStringConvertible {
    /// Not a code of the library's: SluiceKit's own, for a library whose
    /// sluice_abi_version() differs from the header's SLUICE_ABI_VERSION.
    public static let abiMismatch: Int32 = -1000

    /// The int32_t the function returned (see SluiceCode).
    public let code: Int32
    /// The C function, like "sluice_engine_new".
    public let function: String
    /// sluice_last_error()'s text (may be empty).
    public let message: String

    public init(code: Int32, function: String, message: String) {
        self.code = code
        self.function = function
        self.message = message
    }

    /// The code as SluiceCode, or nil for a number sluice.h does not list.
    public var kind: SluiceCode? {
        return SluiceCode(rawValue: code)
    }

    public var description: String {
        let name = kind.map { "\($0)" } ?? "code \(code)"
        if message.isEmpty {
            return "\(function) failed: \(name)"
        }
        return "\(function) failed: \(name): \(message)"
    }
}
