// The utun descriptor of a NEPacketTunnelProvider, for PacketMode.utun.
//
// NetworkExtension does not hand the provider its utun descriptor. This finds it the way
// WireGuardKit does (WireGuardAdapter.swift, `tunnelFileDescriptor`), and Firezone's Rust does
// the same: among the process's descriptors, the one that is a kernel-control socket
// (getpeername gives an AF_SYSTEM sockaddr_ctl) connected to the control whose name is
// "com.apple.net.utun_control" (its id comes from ioctl CTLIOCGINFO) is the utun.
// The kernel-control types are CSluice.h's copies (the iOS SDK has no <sys/kern_control.h>).

import CSluice
import Foundation

public enum Utun {
    /// The first descriptor from 0 through 1024 that is a utun control socket, or nil. Only
    /// meaningful inside the Network Extension, once its tunnel interface exists (after a
    /// setTunnelNetworkSettings).
    public static func findFileDescriptor() -> Int32? {
        var info = sluice_ctl_info()
        // ctl_name: the control's name, NUL-terminated (the rest of the 96 bytes stays zero).
        let name = Array(SLUICE_UTUN_CONTROL_NAME.utf8)
        withUnsafeMutableBytes(of: &info.ctl_name) { bytes in
            bytes.copyBytes(from: name)
        }

        for fd: Int32 in 0...1024 {
            var addr = sluice_sockaddr_ctl()
            var len = socklen_t(MemoryLayout<sluice_sockaddr_ctl>.size)
            let peer = withUnsafeMutablePointer(to: &addr) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                    getpeername(fd, sa, &len)
                }
            }
            if peer != 0 || Int32(addr.sc_family) != AF_SYSTEM {
                continue  // not open, not a socket, or not a kernel-control socket
            }
            if info.ctl_id == 0 {
                // Once: the id the kernel gave the utun control.
                if ioctl(fd, SLUICE_CTLIOCGINFO, &info) != 0 {
                    continue
                }
            }
            if addr.sc_id == info.ctl_id {
                return fd
            }
        }
        return nil
    }
}
