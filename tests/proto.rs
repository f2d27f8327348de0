//! The gRPC example's generated code is checked in (so building it needs no
//! `protoc`, and the library no build script); this test compiles the proto
//! with protox, a pure-Rust compiler, and fails when the checked-in code is
//! stale. `UPDATE_PROTO=1 cargo test --test proto` rewrites it.

use std::path::Path;

#[test]
fn generated_grpc_code_is_up_to_date() {
    let proto_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/proto");
    let descriptors = protox::compile(["payments.proto"], [&proto_dir]).expect("the proto compiles");
    let out = std::env::temp_dir().join(format!("tower-idempotency-proto-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(&out)
        .compile_fds(descriptors)
        .expect("code generation");
    let generated = std::fs::read_to_string(out.join("payments.v1.rs")).unwrap();
    let _ = std::fs::remove_dir_all(&out);
    let checked_in = proto_dir.join("payments.v1.rs");
    if std::env::var_os("UPDATE_PROTO").is_some() {
        std::fs::write(&checked_in, &generated).unwrap();
        return;
    }
    let current = std::fs::read_to_string(&checked_in).unwrap_or_default();
    assert!(
        current == generated,
        "examples/proto/payments.v1.rs is stale: run UPDATE_PROTO=1 cargo test --all-features --test proto"
    );
}
