//! Compiles every `.proto` file in `proto/` with the vendored `protoc`, so the build needs no
//! system package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let mut files = Vec::new();
    for entry in std::fs::read_dir("proto")? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "proto") {
            println!("cargo:rerun-if-changed={}", path.display());
            files.push(path);
        }
    }
    files.sort();
    tonic_build::configure()
        .bytes(["."])
        .compile_protos(&files, &["proto"])?;
    Ok(())
}
