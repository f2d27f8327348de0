//! Logs for the examples, on stderr: `RUST_LOG` picks what is shown
//! (default `warn`), for example `RUST_LOG=tower_idempotency=debug`.

pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
