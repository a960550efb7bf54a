// SluiceEngine: one libsluice_apple engine (sluice.h), owned by a Swift object.
//
// Every method is one C call (two where a buffer was too small), named in its comment; the
// table in apple/README.md lists them all. sluice.h allows calls from any thread at once (all
// but sluice_engine_free), but this class keeps every call on one serial queue anyway (the
// Network Extension uses the queue it passes as `workQueue`): simpler to reason about, and
// sluice_last_error is per thread, read right after the failed call on the same thread.

import CSluice
import Dispatch
import Foundation
import SluiceModels
import os

public final class SluiceEngine {
    /// The SluiceEngine* from sluice_engine_new; freed by sluice_engine_free in deinit.
    private let handle: OpaquePointer
    /// The object the callbacks' `context` points to. Retained (+1) before sluice_engine_new
    /// and released in deinit only after sluice_engine_free has returned, so no callback can
    /// reach a freed box: sluice_engine_stop and sluice_engine_free both return only when the
    /// engine's thread is joined, and sluice.h says no callback runs after that.
    private let box: Unmanaged<CallbackBox>
    private let logger: Logger

    /// sluice_abi_version(): the ABI version of the linked library.
    public static var libraryABIVersion: UInt32 {
        return sluice_abi_version()
    }

    /// sluice_engine_new. A new engine, not running yet.
    ///
    /// - Parameters:
    ///   - configYAML: the agent YAML text (cert/key/ca/policy/status_socket/audit_log keys are
    ///     ignored by the library).
    ///   - policyYAML: the policy YAML text (no includes).
    ///   - certificatePEM, keyPEM, caPEM: PEM bytes.
    ///   - workQueue: the serial queue `onWorkWaiting` runs on; make every call to this engine
    ///     on it too.
    ///   - onWorkWaiting: runs on `workQueue` after the library's work_waiting callback said
    ///     events or packets are waiting (several signals may coalesce into one run): drain
    ///     nextEvent() and takePackets() there. Do not capture this engine strongly in it (the
    ///     box below holds it, and the engine holds the box).
    /// - Throws: SluiceError (status code + sluice_last_error).
    public init(
        configYAML: String,
        policyYAML: String,
        certificatePEM: Data,
        keyPEM: Data,
        caPEM: Data,
        workQueue: DispatchQueue,
        logger: Logger = Logger(subsystem: "dev.sluice", category: "engine"),
        onWorkWaiting: @escaping () -> Void
    ) throws {
        // The header this was compiled against must match the library that was linked.
        let libraryVersion = sluice_abi_version()
        guard libraryVersion == UInt32(SLUICE_ABI_VERSION) else {
            throw SluiceError(
                code: SluiceError.abiMismatch,
                function: "sluice_abi_version",
                message: "library ABI \(libraryVersion), header SLUICE_ABI_VERSION \(SLUICE_ABI_VERSION)"
            )
        }

        let box = Unmanaged.passRetained(
            CallbackBox(logger: logger, workQueue: workQueue, onWorkWaiting: onWorkWaiting)
        )
        let callbacks = SluiceEngine.makeCallbacks(context: box.toOpaque())

        let cert = [UInt8](certificatePEM)
        let key = [UInt8](keyPEM)
        let ca = [UInt8](caPEM)
        var out: OpaquePointer? = nil
        // Strings pass as NUL-terminated UTF-8 and arrays as pointers to their first byte, both
        // valid for the duration of the call.
        let code = sluice_engine_new(
            configYAML,
            policyYAML,
            cert, cert.count,
            key, key.count,
            ca, ca.count,
            callbacks,
            &out
        )
        guard code == SluiceCode.ok.rawValue, let engine = out else {
            let error = SluiceError(
                code: code, function: "sluice_engine_new", message: SluiceEngine.lastError())
            // No engine was made, so nothing holds `context`: the box may go now.
            box.takeUnretainedValue().cancel()
            box.release()
            throw error
        }
        self.handle = engine
        self.box = box
        self.logger = logger
    }

    deinit {
        // sluice_engine_free stops the engine if it still runs (joining its thread); after it
        // returns no callback runs, so only then is the box cancelled and released.
        sluice_engine_free(handle)
        box.takeUnretainedValue().cancel()
        box.release()
    }

    // MARK: - Running

    /// sluice_engine_start(engine, mode, fd). Starts the engine's thread: it binds its UDP
    /// sockets and dials the relay. `fd` is the utun descriptor for .utun (the library dups it;
    /// the caller keeps its own), -1 for .host. The first event is always a settings event.
    public func start(mode: PacketMode, fd: Int32 = -1) throws {
        try check(sluice_engine_start(handle, mode.rawValue, fd), "sluice_engine_start")
    }

    /// sluice_engine_stop(engine, timeout_ms). Says goodbye to the relay and connectors (waiting
    /// up to `timeout` milliseconds), stops the thread and joins it. Idempotent. After it
    /// returns no callback runs.
    public func stop(timeout: UInt32) throws {
        try check(sluice_engine_stop(handle, timeout), "sluice_engine_stop")
    }

    /// sluice_engine_sleep. The device is going to sleep.
    public func sleep() throws {
        try check(sluice_engine_sleep(handle), "sluice_engine_sleep")
    }

    /// sluice_engine_wake. The device woke up.
    public func wake() throws {
        try check(sluice_engine_wake(handle), "sluice_engine_wake")
    }

    /// sluice_engine_set_policy(engine, policy_yaml). On SLUICE_ERR_POLICY the old policy stays
    /// and the error's message says why.
    public func setPolicy(_ policyYAML: String) throws {
        try check(sluice_engine_set_policy(handle, policyYAML), "sluice_engine_set_policy")
    }

    /// sluice_engine_path_changed(engine, change_json) with
    /// {"interfaces":[...],"resolvers":["IP:PORT",...]}; a nil argument leaves its key out
    /// (no interfaces: the library lists the addresses itself with getifaddrs), so
    /// pathChanged() sends {}.
    public func pathChanged(interfaces: [String]? = nil, resolvers: [String]? = nil) throws {
        let change = PathChange(interfaces: interfaces, resolvers: resolvers)
        let json = String(decoding: try JSONEncoder().encode(change), as: UTF8.self)
        try check(sluice_engine_path_changed(handle, json), "sluice_engine_path_changed")
    }

    // MARK: - Events and status

    /// sluice_engine_next_event. The next event, or nil on SLUICE_EMPTY. An event of a type
    /// this code does not know is logged and skipped.
    ///
    /// - Throws: SluiceError for an error code; DecodingError for JSON that does not decode
    ///   (that event is gone; the next call returns the one after it).
    public func nextEvent() throws -> SluiceEvent? {
        while true {
            let (code, bytes) = SluiceEngine.callWithBuffer(capacity: 4096) { buffer, capacity, len in
                sluice_engine_next_event(self.handle, buffer, capacity, len)
            }
            if code == SluiceCode.empty.rawValue {
                return nil
            }
            guard code == SluiceCode.ok.rawValue else {
                throw SluiceError(
                    code: code, function: "sluice_engine_next_event",
                    message: SluiceEngine.lastError())
            }
            do {
                return try JSONDecoder().decode(SluiceEvent.self, from: SluiceEngine.jsonData(bytes))
            } catch let unknown as SluiceEvent.UnknownType {
                logger.info("skipping an event of unknown type \(unknown.type, privacy: .public)")
                continue
            }
        }
    }

    /// sluice_engine_initial_settings: the settings the engine starts with (its first settings
    /// event, generation 1), readable before start. UTUN mode applies them to get the utun
    /// interface made before it has a descriptor to start with.
    public func initialSettings() throws -> NetworkSettingsEvent {
        let (code, bytes) = SluiceEngine.callWithBuffer(capacity: 4096) { buffer, capacity, len in
            sluice_engine_initial_settings(self.handle, buffer, capacity, len)
        }
        guard code == SluiceCode.ok.rawValue else {
            throw SluiceError(
                code: code, function: "sluice_engine_initial_settings",
                message: SluiceEngine.lastError())
        }
        let event = try JSONDecoder().decode(SluiceEvent.self, from: SluiceEngine.jsonData(bytes))
        guard case .settings(let settings) = event else {
            throw SluiceError(
                code: SluiceCode.errState.rawValue, function: "sluice_engine_initial_settings",
                message: "not a settings event")
        }
        return settings
    }

    /// sluice_engine_status: the status document as JSON bytes (what handleAppMessage returns).
    public func statusJSON() throws -> Data {
        let (code, bytes) = SluiceEngine.callWithBuffer(capacity: 16384) { buffer, capacity, len in
            sluice_engine_status(self.handle, buffer, capacity, len)
        }
        guard code == SluiceCode.ok.rawValue else {
            throw SluiceError(
                code: code, function: "sluice_engine_status", message: SluiceEngine.lastError())
        }
        return SluiceEngine.jsonData(bytes)
    }

    /// sluice_engine_status, decoded.
    public func status() throws -> SluiceStatusReport {
        return try JSONDecoder().decode(SluiceStatusReport.self, from: try statusJSON())
    }

    // MARK: - Packets (HOST mode)

    /// sluice_engine_inject_packets(engine, packets, lens, count): bare IP packets read from
    /// packetFlow. The library copies them before it returns. Empty packets are left out.
    public func inject(packets: [Data]) throws {
        let packets = packets.filter { !$0.isEmpty }
        if packets.isEmpty {
            return
        }
        // One contiguous copy, so that every packet's pointer is valid during the one call.
        var flat = [UInt8]()
        flat.reserveCapacity(packets.reduce(0) { $0 + $1.count })
        var lens = [Int]()
        lens.reserveCapacity(packets.count)
        for packet in packets {
            flat.append(contentsOf: packet)
            lens.append(packet.count)
        }
        let code: Int32 = flat.withUnsafeBufferPointer { buffer in
            let base = buffer.baseAddress!  // not nil: flat holds at least one byte
            var pointers = [UnsafePointer<UInt8>?]()
            pointers.reserveCapacity(lens.count)
            var offset = 0
            for len in lens {
                pointers.append(base + offset)
                offset += len
            }
            return sluice_engine_inject_packets(handle, pointers, lens, lens.count)
        }
        try check(code, "sluice_engine_inject_packets")
    }

    /// sluice_engine_take_packet, called until SLUICE_EMPTY or `limit` packets: the packets to
    /// write to packetFlow, each with the protocol family packetFlow.writePackets wants
    /// (AF_INET for ip_version 4, AF_INET6 for 6). An error code ends the batch and is logged
    /// (after stop the library answers SLUICE_ERR_STATE, and there is nothing to write then).
    public func takePackets(limit: Int = 256) -> [(packet: Data, protocolFamily: Int32)] {
        var packets: [(packet: Data, protocolFamily: Int32)] = []
        var buffer = [UInt8](repeating: 0, count: 2048)  // MTU 1280 fits; grows if asked
        while packets.count < limit {
            var len = 0
            var ipVersion: Int32 = 0
            let capacity = buffer.count
            let code = buffer.withUnsafeMutableBufferPointer { bytes in
                sluice_engine_take_packet(handle, bytes.baseAddress, capacity, &len, &ipVersion)
            }
            if code == SluiceCode.empty.rawValue {
                break
            }
            if code == SluiceCode.tooSmall.rawValue {
                // Nothing was consumed and len is the size needed: again with a buffer that big.
                buffer = [UInt8](repeating: 0, count: max(len, capacity * 2))
                continue
            }
            guard code == SluiceCode.ok.rawValue else {
                let error = SluiceError(
                    code: code, function: "sluice_engine_take_packet",
                    message: SluiceEngine.lastError())
                logger.error("\(error.description, privacy: .public)")
                break
            }
            let packet = Data(buffer[0..<min(len, capacity)])
            switch ipVersion {
            case 4:
                packets.append((packet: packet, protocolFamily: AF_INET))
            case 6:
                packets.append((packet: packet, protocolFamily: AF_INET6))
            default:
                logger.error("sluice_engine_take_packet gave ip_version \(ipVersion); packet dropped")
            }
        }
        return packets
    }

    // MARK: - Helpers

    /// The body of path_changed's JSON. Synthesized Encodable leaves nil keys out.
    private struct PathChange: Encodable {
        let interfaces: [String]?
        let resolvers: [String]?
    }

    /// Turns a status code into a thrown SluiceError unless it is SLUICE_OK.
    private func check(_ code: Int32, _ function: String) throws {
        if code == SluiceCode.ok.rawValue {
            return
        }
        throw SluiceError(code: code, function: function, message: SluiceEngine.lastError())
    }

    /// sluice_last_error: this thread's last error text ("" if none or unreadable).
    static func lastError() -> String {
        let (code, bytes) = callWithBuffer(capacity: 512) { buffer, capacity, len in
            sluice_last_error(buffer, capacity, len)
        }
        guard code == SluiceCode.ok.rawValue else {
            return ""
        }
        return String(decoding: jsonData(bytes), as: UTF8.self)
    }

    /// Calls `body(buffer, capacity, &len)` with a buffer of `capacity` bytes. On
    /// SLUICE_TOO_SMALL nothing was consumed and len holds the size needed, so it calls again
    /// with a buffer that big (plus one byte, in case the library counts a trailing NUL
    /// separately: sluice.h does not say), at most three times more. Returns the last code and,
    /// on SLUICE_OK, the first len bytes.
    private static func callWithBuffer(
        capacity initialCapacity: Int,
        _ body: (UnsafeMutablePointer<CChar>, Int, UnsafeMutablePointer<Int>) -> Int32
    ) -> (code: Int32, bytes: [UInt8]) {
        var capacity = max(initialCapacity, 1)
        var retries = 0
        while true {
            var buffer = [UInt8](repeating: 0, count: capacity)
            var len = 0
            let code: Int32 = buffer.withUnsafeMutableBufferPointer { bytes in
                bytes.baseAddress!.withMemoryRebound(to: CChar.self, capacity: capacity) { chars in
                    body(chars, capacity, &len)
                }
            }
            if code == SluiceCode.tooSmall.rawValue && retries < 3 {
                retries += 1
                capacity = max(len + 1, capacity + 1)
                continue
            }
            guard code == SluiceCode.ok.rawValue else {
                return (code, [])
            }
            return (code, Array(buffer[0..<min(len, capacity)]))
        }
    }

    /// The bytes without trailing NULs (sluice.h does not say whether len counts one).
    private static func jsonData(_ bytes: [UInt8]) -> Data {
        var end = bytes.count
        while end > 0 && bytes[end - 1] == 0 {
            end -= 1
        }
        return Data(bytes[0..<end])
    }

    /// The SluiceCallbacks struct: `context` is the box; the three functions are C-convention
    /// closures that capture nothing and find the box through `context`.
    private static func makeCallbacks(context: UnsafeMutableRawPointer) -> SluiceCallbacks {
        var callbacks = SluiceCallbacks()
        callbacks.context = context

        // log(context, level, target, message): target and message are valid only during the
        // call, so they are copied into Swift strings here.
        callbacks.log = { context, level, target, message in
            guard let context = context else {
                return
            }
            let box = Unmanaged<CallbackBox>.fromOpaque(context).takeUnretainedValue()
            let targetText = target.map { String(cString: $0) } ?? ""
            let messageText = message.map { String(cString: $0) } ?? ""
            box.log(level: level, target: targetText, message: messageText)
        }

        // work_waiting(context): runs on the engine's thread, which must not call back into the
        // engine, so it only signals the dispatch source; the handler runs on workQueue.
        callbacks.work_waiting = { context in
            guard let context = context else {
                return
            }
            Unmanaged<CallbackBox>.fromOpaque(context).takeUnretainedValue().signalWork()
        }

        // clock_ns(context): Darwin's CLOCK_MONOTONIC keeps counting while the device sleeps
        // (CLOCK_UPTIME_RAW, what Rust's Instant reads on Apple, does not).
        callbacks.clock_ns = { _ in
            return clock_gettime_nsec_np(CLOCK_MONOTONIC)
        }

        return callbacks
    }
}

/// What the C callbacks reach through `context`: a logger and the work signal. SluiceEngine
/// keeps it retained until after sluice_engine_free has returned.
final class CallbackBox {
    private let logger: Logger
    /// A coalescing signal: many work_waiting calls before the handler runs make one run.
    private let workSignal: DispatchSourceUserDataOr

    init(logger: Logger, workQueue: DispatchQueue, onWorkWaiting: @escaping () -> Void) {
        self.logger = logger
        self.workSignal = DispatchSource.makeUserDataOrSource(queue: workQueue)
        self.workSignal.setEventHandler {
            onWorkWaiting()
        }
        self.workSignal.activate()
    }

    /// From work_waiting, on the engine's thread: returns at once.
    func signalWork() {
        workSignal.or(data: 1)
    }

    /// After the engine is freed: a signal still pending does not run its handler.
    func cancel() {
        workSignal.cancel()
    }

    /// From log, on any of the library's threads. Levels are sluice.h's SluiceLogLevel.
    func log(level: Int32, target: String, message: String) {
        let type: OSLogType
        switch level {
        case 1:  // SLUICE_LOG_ERROR
            type = .error
        case 2:  // SLUICE_LOG_WARN (os_log has nothing between default and error)
            type = .default
        case 3:  // SLUICE_LOG_INFO
            type = .info
        default:  // SLUICE_LOG_DEBUG, SLUICE_LOG_TRACE
            type = .debug
        }
        // Public: the engine's own lines, wanted in sysdiagnoses; they carry addresses, not
        // user content.
        logger.log(level: type, "\(target, privacy: .public): \(message, privacy: .public)")
    }
}
