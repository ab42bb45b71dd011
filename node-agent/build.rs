//! Embeds the git commit of the build (`--version`, the version reported to
//! the controller); see `scripts/build_info.rs`.

#[path = "../scripts/build_info.rs"]
mod build_info;

fn main() {
    // What goes into the agent: its own sources, the protocol, the lock file.
    build_info::emit(&[
        "node-agent/src",
        "node-agent/Cargo.toml",
        "proto",
        "Cargo.toml",
        "Cargo.lock",
    ]);
}
