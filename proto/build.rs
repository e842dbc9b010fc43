//! Generates the tonic client and server from `stackroute/v1alpha1/distribution.proto`.
//! Needs `protoc` (Debian: `apt-get install protobuf-compiler`, or set `PROTOC`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["stackroute/v1alpha1/distribution.proto"], &["."])?;
    println!("cargo:rerun-if-changed=stackroute/v1alpha1/distribution.proto");
    Ok(())
}
