//! Hostile requests: huge and slow bodies, floods of keys, injection
//! attempts in the key.

mod common;

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use common::*;
use http::{HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tower::{Layer, ServiceExt};
use tower_idempotency::{IdempotencyLayer, InFlightPolicy, RequestBody, store::MemoryStore};

const MIB: u64 = 1 << 20;

/// A request body of `total` bytes made lazily, 64 KiB at a time, that
/// counts what was taken from it; `declared` makes its length known.
struct Huge {
    left: u64,
    declared: bool,
    produced: Arc<AtomicU64>,
}

impl Body for Huge {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let chunk = self.left.min(64 * 1024);
        self.left -= chunk;
        self.produced.fetch_add(chunk, Ordering::SeqCst);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; chunk as usize])))))
    }

    fn size_hint(&self) -> SizeHint {
        if self.declared { SizeHint::with_exact(self.left) } else { SizeHint::default() }
    }
}

/// A body that sends one byte and then nothing, ever.
struct Slowloris {
    sent: bool,
}

impl Body for Slowloris {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.sent {
            return Poll::Pending;
        }
        self.sent = true;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"a")))))
    }
}

async fn call_with<B>(layer: &IdempotencyLayer, body: B) -> (Answer, usize)
where
    B: Body<Data = Bytes, Error = std::io::Error> + Send + 'static,
{
    let calls = Calls::default();
    let counter = calls.clone();
    let inner = tower::service_fn(move |_: Request<RequestBody<B>>| {
        counter.bump();
        async { Ok::<_, std::convert::Infallible>(respond(201, "ran")) }
    });
    let request =
        Request::post("/upload").header("idempotency-key", "big-1").header("authorization", AUTH).body(body).unwrap();
    let answer = read(layer.layer(inner).oneshot(request).await.unwrap()).await;
    (answer, calls.get())
}

#[tokio::test]
async fn a_100_mib_body_is_refused_without_reading_past_the_cap() {
    let layer = IdempotencyLayer::memory();
    for declared in [true, false] {
        let produced = Arc::new(AtomicU64::new(0));
        let body = Huge { left: 100 * MIB, declared, produced: produced.clone() };
        let (answer, calls) = call_with(&layer, body).await;
        assert_eq!((answer.status.as_u16(), answer.problem().as_str(), calls), (413, "body-too-large", 0));
        let read = produced.load(Ordering::SeqCst);
        if declared {
            assert_eq!(read, 0, "a declared 100 MiB body is refused before a byte is read");
        } else {
            assert!(read <= MIB + 64 * 1024, "read {read} bytes of a body capped at 1 MiB");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_slowloris_body_is_cut_off_by_the_body_timeout() {
    let layer = IdempotencyLayer::memory().with_body_timeout(Duration::from_secs(5)).unwrap();
    let (answer, calls) = call_with(&layer, Slowloris { sent: false }).await;
    assert_eq!((answer.status.as_u16(), answer.problem().as_str(), calls), (408, "body-timeout", 0));
}

#[tokio::test]
async fn ten_thousand_keys_from_one_client_fill_the_store_to_its_bound_and_no_further() {
    let store = MemoryStore::with_limits(5_000, usize::MAX);
    let layer = IdempotencyLayer::new(store.clone());
    let (app, calls) = counting(&layer);
    let mut statuses = std::collections::BTreeMap::new();
    for n in 0..10_000 {
        let key = format!("flood-{n}");
        let request = Request::post("/")
            .header("idempotency-key", key.as_str())
            .header("authorization", AUTH)
            .body(Default::default())
            .unwrap();
        *statuses.entry(send(&app, request).await.status.as_u16()).or_insert(0) += 1;
    }
    // Full, the store drops its oldest records: every new key still runs.
    assert_eq!(statuses, [(201, 10_000)].into_iter().collect());
    assert!(store.len() <= 5_000, "the store grew past its bound: {}", store.len());
    assert_eq!(calls.get(), 10_000);
    // The newest keys still replay.
    let request = Request::post("/")
        .header("idempotency-key", "flood-9999")
        .header("authorization", AUTH)
        .body(Default::default())
        .unwrap();
    assert!(send(&app, request).await.replayed());
    assert_eq!(calls.get(), 10_000);
}

#[tokio::test]
async fn injection_attempts_in_the_key_stay_inert() {
    // Raw CR/LF cannot reach the layer: the HTTP stack refuses such values.
    assert!(HeaderValue::from_bytes(b"k\r\nset-cookie: x=1").is_err());
    // Encoded ones are visible ASCII: a valid key, percent-encoded again
    // where the key is echoed, in the Accepted policy's Location.
    let policy = InFlightPolicy::Accepted { status_url: Some("/v1/idempotency/{key}".into()) };
    let layer = IdempotencyLayer::memory().with_in_flight(policy);
    let gate = Gate::default();
    let held = gate.clone();
    let app = app(&layer, move |_| {
        let held = held.clone();
        async move {
            held.pass().await;
            Response::new(full("done"))
        }
    });
    const HOSTILE: &str = "k%0d%0aSet-Cookie:%20x=1/../admin?{key}";
    let request = || {
        Request::post("/")
            .header("idempotency-key", HOSTILE)
            .header("authorization", AUTH)
            .body(Default::default())
            .unwrap()
    };
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request()).await }
    });
    gate.entered(1).await;
    let accepted = send(&app, request()).await;
    assert_eq!(accepted.status, 202);
    assert_eq!(
        accepted.headers["location"],
        "/v1/idempotency/k%250d%250aSet-Cookie%3A%2520x%3D1%2F..%2Fadmin%3F%7Bkey%7D"
    );
    assert!(!accepted.headers.contains_key("set-cookie"));
    gate.open(1);
    assert_eq!(first.await.unwrap().body, "done");
}
