//! Build script:
//!
//! 1. compiles our own APIs into Rust (messages, tonic client and server) and
//!    encoded descriptor sets for reflection: the admin API
//!    (`proto/portcullis/admin/v1/admin.proto`, admin listener) and the
//!    service-facing `Authorizer` (`proto/portcullis/v1/authorizer.proto`, main
//!    listener);
//! 2. produces the encoded `FileDescriptorSet` that gRPC reflection serves for
//!    Envoy's `envoy.service.auth.v3.Authorization` service.
//!
//! Both use the pure-Rust `protox` compiler (no system `protoc`).
//!
//! The message types themselves come from the `envoy-types` crate; we only compile
//! descriptors, from the `.proto` files that crate ships, with the pure-Rust `protox`
//! compiler (no system `protoc`). If the sources cannot be found (an unusual cargo
//! layout), the build still succeeds and reflection simply omits Envoy's service.

use std::path::{Path, PathBuf};

const ENVOY_TYPES_DIR: &str = "envoy-types-0.7.7";

const ADMIN_PROTO: &str = "portcullis/admin/v1/admin.proto";
const AUTHORIZER_PROTO: &str = "portcullis/v1/authorizer.proto";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=proto");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    compile_own(&out, ADMIN_PROTO, "admin_descriptor.bin");
    compile_own(&out, AUTHORIZER_PROTO, "authorizer_descriptor.bin");
    let target = out.join("envoy_auth_descriptor.bin");
    let bytes = match find_envoy_proto_root() {
        Some(root) => compile(&root),
        None => {
            println!(
                "cargo:warning=envoy-types proto sources not found; gRPC reflection will not describe envoy.service.auth.v3"
            );
            Vec::new()
        }
    };
    std::fs::write(&target, bytes).expect("write descriptor set");
}

/// Our own APIs must compile: any problem fails the build. Well-known types
/// (`google.protobuf.Struct`) map to `prost-types`.
fn compile_own(out: &Path, proto: &str, descriptor: &str) {
    let fds = protox::compile([proto], ["proto"]).expect("compile proto/ with protox");
    std::fs::write(out.join(descriptor), prost::Message::encode_to_vec(&fds))
        .expect("write descriptor set");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)
        .expect("generate the API code");
}

fn compile(root: &Path) -> Vec<u8> {
    let includes = [
        "data-plane-api",
        "xds",
        "protoc-gen-validate",
        "googleapis",
        "cel-spec/proto",
        "opentelemetry-proto",
        "client_model",
    ]
    .map(|dir| root.join(dir));
    let includes: Vec<PathBuf> = includes.into_iter().filter(|p| p.is_dir()).collect();
    match protox::compile(["envoy/service/auth/v3/external_auth.proto"], &includes) {
        Ok(set) => prost::Message::encode_to_vec(&set),
        Err(err) => {
            println!("cargo:warning=could not compile Envoy's ext_authz descriptors: {err}");
            Vec::new()
        }
    }
}

/// Looks for the `proto/` folder of the exact `envoy-types` version in Cargo.toml,
/// in the cargo registry and in a `vendor/` folder.
fn find_envoy_proto_root() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(manifest) = std::env::var("CARGO_MANIFEST_DIR") {
        candidates.push(Path::new(&manifest).join("vendor").join(ENVOY_TYPES_DIR));
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(entries) =
        cargo_home.and_then(|home| std::fs::read_dir(home.join("registry").join("src")).ok())
    {
        for entry in entries.flatten() {
            candidates.push(entry.path().join(ENVOY_TYPES_DIR));
        }
    }
    candidates
        .into_iter()
        .map(|c| c.join("proto"))
        .find(|p| p.join("data-plane-api").is_dir())
}
