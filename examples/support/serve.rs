//! How the examples serve HTTP: what a production server adds to
//! `axum::serve`'s defaults, a time limit on reading a request's headers
//! (a client sending them a byte a second is cut off) and a bound on the
//! connections served at once (idle half-sent requests cannot take every
//! file descriptor).

use std::{future::Future, pin::pin, sync::Arc, time::Duration};

use axum::Router;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore};

/// The limits a server keeps.
#[derive(Clone, Copy)]
pub struct Limits {
    /// How long a client may take to send a request's headers.
    pub header_read_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { header_read_timeout: Duration::from_secs(10), max_connections: 1024 }
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` is done.
pub async fn serve(listener: TcpListener, router: Router, limits: Limits, shutdown: impl Future<Output = ()>) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut shutdown = pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = async {
                let permit = permits.clone().acquire_owned().await;
                (permit, listener.accept().await)
            } => accepted,
            () = &mut shutdown => return,
        };
        let (stream, permit) = match accepted {
            (Ok(permit), Ok((stream, _))) => (stream, permit),
            (_, Err(error)) => {
                // Out of file descriptors, say: wait a little, go on.
                eprintln!("accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            (Err(_), _) => return,
        };
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
            let _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await;
            drop(permit);
        });
    }
}
