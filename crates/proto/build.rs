//! Compiles `proto/janus/v1/*.proto` with the vendored protoc (nothing to install).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // At run time, not `env!`: a build-script binary reused from another checkout of the same
    // sources must still read this checkout's protos.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let protos: Vec<PathBuf> = ["common", "understanding", "generation"]
        .iter()
        .map(|p| root.join(format!("janus/v1/{p}.proto")))
        .collect();
    // The protos live outside this package: without these lines cargo would not rerun the
    // script when they change (tonic-prost-build does not emit them).
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Image payloads as `bytes::Bytes`: the gateway clones requests for retries without copying.
    config.bytes(["."]);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .file_descriptor_set_path(out.join("janus_v1_descriptor.bin"))
        .compile_with_config(config, &protos, &[root])?;
    Ok(())
}
