//! Completed-record strategies.

use super::*;

#[tokio::test]
async fn reject_strategy_refuses_reuse() {
    let (app, calls) = counting(&IdempotencyLayer::memory().with_completed(CompletedStrategy::Reject));
    send(&app, post(KEY, "a")).await;
    let again = send(&app, post(KEY, "a")).await;
    assert_eq!((again.status.as_u16(), again.problem().as_str()), (409, "key-already-used"));
    assert!(!again.headers.contains_key(header::RETRY_AFTER));
    assert_eq!(send(&app, post(KEY, "b")).await.status, 422, "a different payload is still a mismatch");
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn rerun_strategy_runs_a_finished_key_again_with_a_higher_fencing_token() {
    let layer = IdempotencyLayer::memory().with_completed(CompletedStrategy::Rerun);
    let tokens = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = tokens.clone();
    let app = app(&layer, move |request: HandlerRequest| {
        let context = request.extensions().get::<IdempotencyContext>().cloned().unwrap();
        seen.lock().unwrap().push(context.fencing_token());
        async { respond(200, "ran") }
    });
    send(&app, post(KEY, "a")).await;
    assert!(!send(&app, post(KEY, "a")).await.replayed());
    assert!(!send(&app, post(KEY, "another payload")).await.replayed());
    let tokens = tokens.lock().unwrap().clone();
    assert_eq!(tokens.len(), 3);
    assert!(tokens.windows(2).all(|pair| pair[0] < pair[1]), "{tokens:?}");
}

#[tokio::test]
async fn rerun_with_wait_replays_the_first_answer_to_a_waiting_duplicate() {
    let store = Slowed::default();
    let layer = IdempotencyLayer::new(store.clone())
        .with_completed(CompletedStrategy::Rerun)
        .with_in_flight(InFlightPolicy::Wait(Duration::from_secs(5)));
    let (app, gate, calls) = gated(&layer);
    let (first, waiter) = first_then_waiting_duplicate(&app, &gate, &store, "k").await;
    assert!(waiter.replayed(), "a concurrent duplicate waits for the first answer: {}", waiter.status);
    assert_eq!(waiter.body, first.body);
    assert_eq!(calls.get(), 1);
}
