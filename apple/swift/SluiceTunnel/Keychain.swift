// The agent's certificate, key and CA (PEM bytes) in the keychain, shared by the host app
// (which imports them) and the Network Extension (which reads them). Compiled into both
// targets.
//
// Each is a generic-password item: service "sluice", account "certificate" / "key" / "ca",
// in one access group both targets may use. The group is read from the Info.plist key
// SluiceKeychainAccessGroup: the app group (group.dev.sluice on iOS, where an app group is
// also a keychain access group), or a keychain-access-groups entry such as
// $(AppIdentifierPrefix)dev.sluice.shared (Xcode fills in the team prefix). Both targets'
// Info.plists must name the same group (apple/README.md).

import Foundation
import Security

enum Keychain {
    enum Item: String, CaseIterable {
        case certificate
        case key
        case ca
    }

    static let service = "sluice"

    /// The shared access group, or nil (then the target's default group: not shared).
    static var accessGroup: String? {
        return Bundle.main.object(forInfoDictionaryKey: "SluiceKeychainAccessGroup") as? String
    }

    /// The attributes that name one item (class, service, account, group).
    private static func baseQuery(_ item: Item) -> [String: Any] {
        var query: [String: Any] = [
            kSecClass as String: kSecClassGenericPassword,
            kSecAttrService as String: service,
            kSecAttrAccount as String: item.rawValue,
            // macOS: the iOS-style keychain, where access groups work (ignored on iOS).
            kSecUseDataProtectionKeychain as String: true,
        ]
        if let group = accessGroup {
            query[kSecAttrAccessGroup as String] = group
        }
        return query
    }

    /// SecItemCopyMatching: the item's bytes.
    static func read(_ item: Item) throws -> Data {
        var query = baseQuery(item)
        query[kSecReturnData as String] = true
        query[kSecMatchLimit as String] = kSecMatchLimitOne
        var result: CFTypeRef?
        let status = SecItemCopyMatching(query as CFDictionary, &result)
        guard status == errSecSuccess, let data = result as? Data else {
            throw KeychainError(item: item, operation: "SecItemCopyMatching", status: status)
        }
        return data
    }

    /// Whether the item exists (SecItemCopyMatching without data).
    static func contains(_ item: Item) -> Bool {
        return SecItemCopyMatching(baseQuery(item) as CFDictionary, nil) == errSecSuccess
    }

    /// SecItemUpdate, or SecItemAdd when there is no such item yet.
    static func store(_ data: Data, as item: Item) throws {
        let update: [String: Any] = [kSecValueData as String: data]
        let status = SecItemUpdate(baseQuery(item) as CFDictionary, update as CFDictionary)
        if status == errSecSuccess {
            return
        }
        guard status == errSecItemNotFound else {
            throw KeychainError(item: item, operation: "SecItemUpdate", status: status)
        }
        var add = baseQuery(item)
        add[kSecValueData as String] = data
        // Readable by the extension whenever the device has been unlocked once since boot (it
        // may start while locked, for example on demand); never moves to another device.
        add[kSecAttrAccessible as String] = kSecAttrAccessibleAfterFirstUnlockThisDeviceOnly
        let added = SecItemAdd(add as CFDictionary, nil)
        guard added == errSecSuccess else {
            throw KeychainError(item: item, operation: "SecItemAdd", status: added)
        }
    }
}

struct KeychainError: Error, CustomStringConvertible {
    let item: Keychain.Item
    let operation: String
    let status: OSStatus

    var description: String {
        let text = SecCopyErrorMessageString(status, nil) as String? ?? "OSStatus \(status)"
        return "keychain \(item.rawValue): \(operation): \(text)"
    }
}
