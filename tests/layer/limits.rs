//! Large bodies and full stores.

use super::*;

#[tokio::test]
async fn a_large_body_that_is_ready_at_once_still_streams_and_replays_whole() {
    let layer = IdempotencyLayer::memory();
    let (app, calls) = {
        let (app, calls) = counted(&layer, move |_, _| {
            async {
                // 200 chunks of 1 KiB, never pending: more than is gathered
                // before the head goes out.
                let frames = (0..200u8).map(|i| Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![i; 1024]))));
                Response::new(BodyExt::boxed(StreamBody::new(stream::iter(frames))))
            }
        });
        (app, calls)
    };
    let first = send(&app, post(KEY, "a")).await;
    let replay = send(&app, post(KEY, "a")).await;
    assert_eq!(first.body.len(), 200 * 1024);
    assert_eq!((&replay.body, replay.replayed()), (&first.body, true));
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn a_response_too_big_for_a_full_store_is_never_rerun() {
    let layer = IdempotencyLayer::new(MemoryStore::with_limits(10, 2_000));
    let (app, calls) = counted(&layer, move |_, _| async { respond(201, vec![b'x'; 5_000]) });
    assert_eq!(send(&app, post(KEY, "a")).await.body.len(), 5_000);
    let duplicate = send(&app, post(KEY, "a")).await;
    assert_eq!((duplicate.status.as_u16(), duplicate.problem().as_str()), (410, "response-not-stored"));
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn a_custom_responder_replaces_rejections() {
    use tower_idempotency::{Rejection, RejectionKind};

    let layer = IdempotencyLayer::memory().with_key_required(true).with_responder(|rejection: &Rejection| {
        if rejection.kind() == RejectionKind::MissingKey {
            let mut response = Response::new(Bytes::from_static(b"send a key, please"));
            *response.status_mut() = http::StatusCode::PRECONDITION_REQUIRED;
            return response;
        }
        rejection.default_response()
    });
    let (app, calls) = counting(&layer);
    let custom = send(&app, post(None, "a")).await;
    assert_eq!((custom.status.as_u16(), &custom.body[..]), (428, &b"send a key, please"[..]));
    assert_eq!(send(&app, post(Some(""), "a")).await.problem(), "invalid-key", "other cases keep the default");
    assert_eq!(calls.get(), 0);
}

#[tokio::test]
async fn a_claim_that_lands_after_its_request_gave_up_is_given_back() {
    let store = Slowed { first_claim: Duration::from_millis(100), ..Slowed::default() };
    let layer = IdempotencyLayer::new(store.clone())
        .with_store_timeout(Duration::from_millis(20))
        .unwrap()
        .with_in_flight(InFlightPolicy::Wait(Duration::from_secs(10)));
    let (app, calls) = counting(&layer);
    // The claim outlives its request's store timeout: 503, nothing ran.
    assert_eq!(send(&app, post(KEY, "a")).await.status, 503);
    store.landed.notified().await;
    // The retry finds the late claim in flight and waits; the late claim
    // must be given back (not held for its 30 s lease), so the retry runs.
    let retry = send(&app, post(KEY, "a")).await;
    assert_eq!((retry.status.as_u16(), retry.replayed()), (201, false));
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn a_claim_whose_client_left_is_given_back() {
    let store = Slowed { first_claim: Duration::from_millis(100), ..Slowed::default() };
    let layer = IdempotencyLayer::new(store.clone()).with_in_flight(InFlightPolicy::Wait(Duration::from_secs(10)));
    let (app, calls) = counting(&layer);
    let first = tokio::spawn(send_owned(app.clone(), post(KEY, "a")));
    // Hang up while the first claim is on its way.
    while store.claims.get() == 0 {
        tokio::task::yield_now().await;
    }
    first.abort();
    store.landed.notified().await;
    let retry = send(&app, post(KEY, "a")).await;
    assert_eq!((retry.status.as_u16(), retry.replayed()), (201, false));
    assert_eq!(calls.get(), 1);
}

/// A body that sends `before` chunks (pausing after each), then panics.
fn panicking_body(before: usize) -> TestBody {
    let frames = stream::iter(0..=before).then(move |i| async move {
        assert!(i < before, "response body bug");
        tokio::task::yield_now().await;
        Ok::<_, std::io::Error>(Frame::data(Bytes::from("part ")))
    });
    BodyExt::boxed(StreamBody::new(frames))
}

#[tokio::test]
async fn a_body_that_panics_is_recorded_as_run_and_never_rerun() {
    for before in [0, 2] {
        let layer = IdempotencyLayer::memory();
        let (app, calls) = counted(&layer, move |n, _| async move {
            if n == 1 { Response::new(panicking_body(before)) } else { respond(201, "second try") }
        });
        let response = app.clone().oneshot(post(KEY, "a")).await.unwrap();
        assert!(response.into_body().collect().await.is_err(), "the client sees the body break");
        let retry = send(&app, post(KEY, "a")).await;
        assert_eq!(
            (retry.status.as_u16(), retry.problem().as_str()),
            (410, "response-not-stored"),
            "panic after {before} chunks: the handler ran, it does not run again"
        );
        assert_eq!(calls.get(), 1);
    }
}

#[tokio::test]
async fn a_panic_in_user_code_before_the_claim_leaves_nothing_claimed() {
    use futures_util::FutureExt;

    let calls = Calls::default();
    let scope_calls = calls.clone();
    let layer = IdempotencyLayer::memory().with_scope(move |_: &http::request::Parts| {
        assert!(scope_calls.bump() > 1, "scope function bug");
        Some(tower_idempotency::Scope::anonymous())
    });
    let (app, executions) = counting(&layer);
    let crashed = std::panic::AssertUnwindSafe(app.clone().oneshot(post(KEY, "a"))).catch_unwind().await;
    assert!(crashed.is_err(), "the panic reaches the server, as any handler panic would");
    let retry = send(&app, post(KEY, "a")).await;
    assert_eq!((retry.status.as_u16(), retry.replayed()), (201, false), "nothing was left claimed");
    assert_eq!(executions.get(), 1);
}

#[tokio::test]
async fn a_store_full_by_bytes_drops_old_records_rather_than_leave_a_new_one_unstored() {
    // Room for about three records of 1 KB.
    let layer = IdempotencyLayer::new(MemoryStore::with_limits(1_000, 4_000));
    let (app, calls) = counted(&layer, |n, _| async move { respond(201, vec![b'0' + (n % 10) as u8; 1_000]) });
    for n in 0..10 {
        let key = format!("order-{n}");
        let first = send(&app, post(Some(key.as_str()), "")).await;
        let again = send(&app, post(Some(key.as_str()), "")).await;
        assert!(again.replayed(), "key {n}: {} instead of a replay", again.status);
        assert_eq!(again.body, first.body, "key {n}: one answer");
    }
    assert_eq!(calls.get(), 10);
    assert!(layer.store().bytes() <= 4_000);
}
