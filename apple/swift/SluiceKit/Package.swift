// swift-tools-version:5.7
//
// SluiceKit: the Swift side of libsluice_apple's C ABI (apple/include/sluice.h).
//
// - CSluice      the C header as a Clang module (Sources/CSluice/module.modulemap); links
//                libsluice_apple.a, the Rust static library (see apple/README.md for building it
//                and for where the linker finds it).
// - SluiceModels the JSON the engine emits (events, status) as Codable types; pure Swift, no C.
//                The host app links only this, so it never pulls the Rust library in.
// - SluiceKit    SluiceEngine, a final class that owns one engine handle, plus the utun
//                descriptor lookup. The Network Extension links this.
import PackageDescription

let package = Package(
    name: "SluiceKit",
    platforms: [
        .iOS(.v15),
        .macOS(.v12),
    ],
    products: [
        .library(name: "SluiceKit", targets: ["SluiceKit"]),
        .library(name: "SluiceModels", targets: ["SluiceModels"]),
    ],
    targets: [
        .systemLibrary(name: "CSluice", path: "Sources/CSluice"),
        .target(name: "SluiceModels", path: "Sources/SluiceModels"),
        .target(
            name: "SluiceKit",
            dependencies: ["CSluice", "SluiceModels"],
            path: "Sources/SluiceKit"
        ),
        .testTarget(
            name: "SluiceModelsTests",
            dependencies: ["SluiceModels"],
            path: "Tests/SluiceModelsTests"
        ),
    ]
)
