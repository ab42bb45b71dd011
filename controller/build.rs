//! Embeds the git commit of the build in `slipway-controller --version` and
//! `slipway --version`; see `scripts/build_info.rs`.

#[path = "../scripts/build_info.rs"]
mod build_info;

fn main() {
    // What goes into the controller and the CLI: their sources, the protocol, the lock file.
    build_info::emit(&[
        "controller/src",
        "controller/Cargo.toml",
        "proto",
        "Cargo.toml",
        "Cargo.lock",
    ]);
}
