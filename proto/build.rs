//! Generates the tonic/prost code with a vendored `protoc`, so no system install is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let files = [
        "proto/chunk.proto",
        "proto/types.proto",
        "proto/raft.proto",
        "proto/metadata.proto",
    ];
    tonic_build::configure()
        .bytes([".cairn.chunk"])
        .compile_protos(&files, &["proto"])?;
    // Generated again on its own, over the first output: the chunk service carries blobs, and
    // its codec frames them without extra copies (the other files import its messages only).
    tonic_build::configure()
        .bytes([".cairn.chunk"])
        .codec_path("crate::codec::ChunkCodec")
        .compile_protos(&files[..1], &["proto"])?;
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    Ok(())
}
