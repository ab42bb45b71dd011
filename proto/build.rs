//! Compiles `proto/slipway/v1/agent.proto` and `control.proto` (the CLI's
//! controller API) into Rust at build time.
//!
//! `protox` parses the .proto in pure Rust (no system `protoc`), producing a
//! `FileDescriptorSet` that `tonic-prost-build` turns into prost messages plus
//! tonic client and server stubs in `$OUT_DIR/slipway.v1.rs`.

use std::error::Error;

const INCLUDE_DIR: &str = "proto";
const PROTOS: &[&str] = &[
    "proto/slipway/v1/agent.proto",
    "proto/slipway/v1/control.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    // `compile_fds` does not know the source paths, so tell cargo ourselves.
    println!("cargo:rerun-if-changed={INCLUDE_DIR}");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }

    // Source info is kept so .proto comments become rustdoc on the generated types.
    let fds = protox::compile(PROTOS, [INCLUDE_DIR])?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // No generated `AgentLinkClient::connect(url)` shortcut: it would clash
        // with the `Connect` rpc method, and agents need an mTLS `Endpoint`
        // anyway (`AgentLinkClient::new(channel)`).
        .build_transport(false)
        // Ordered maps where a view shows them: labels and state counts
        // come out sorted, in tables and JSON alike.
        .btree_map(".slipway.v1.NodeView.labels")
        .btree_map(".slipway.v1.FleetStatus.counts")
        .compile_fds(fds)?;
    Ok(())
}
