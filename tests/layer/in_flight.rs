//! In-flight duplicates.

use super::*;

#[tokio::test]
async fn in_flight_conflict_is_409_with_retry_after() {
    let layer = IdempotencyLayer::memory().with_retry_after(Duration::from_secs(3)).unwrap();
    let (app, gate, calls, first) = parked(layer.clone()).await;
    let duplicate = send(&app, post(KEY, "amount=100")).await;
    assert_eq!((duplicate.status.as_u16(), duplicate.problem().as_str()), (409, "in-flight"));
    assert_eq!(duplicate.headers[header::RETRY_AFTER], "3");
    gate.open(1);
    let first = first.await.unwrap();
    assert_eq!(first.body, "charge 1");
    assert_eq!(send(&app, post(KEY, "amount=100")).await.body, "charge 1");
    assert_eq!(calls.get(), 1);
    assert_eq!(layer.metrics().get(Outcome::InFlight), 1);
}

#[tokio::test]
async fn in_flight_accepted_is_202_with_status_url() {
    let policy = InFlightPolicy::Accepted { status_url: Some("/v1/idempotency/{key}".into()) };
    let (app, gate, calls, first) = parked(IdempotencyLayer::memory().with_in_flight(policy)).await;
    let duplicate = send(&app, post(KEY, "amount=100")).await;
    assert_eq!(duplicate.status, 202);
    assert_eq!(duplicate.headers[header::LOCATION], "/v1/idempotency/order-1");
    assert!(duplicate.headers.contains_key(header::RETRY_AFTER));
    gate.open(1);
    first.await.unwrap();
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn in_flight_wait_replays_the_first_answer() {
    let layer = IdempotencyLayer::memory().with_in_flight(InFlightPolicy::Wait(Duration::from_secs(30)));
    let (app, gate, calls, first) = parked(layer).await;
    let waiters: Vec<_> = (0..3).map(|_| tokio::spawn(send_owned(app.clone(), post(KEY, "amount=100")))).collect();
    gate.open(1);
    let first = first.await.unwrap();
    for waiter in waiters {
        let answer = waiter.await.unwrap();
        assert!(answer.replayed());
        assert_eq!((answer.status, &answer.body), (first.status, &first.body));
    }
    assert_eq!(calls.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn in_flight_wait_times_out_to_409() {
    let layer = IdempotencyLayer::memory().with_in_flight(InFlightPolicy::Wait(Duration::from_secs(2)));
    let (app, gate, calls, first) = parked(layer).await;
    let duplicate = send(&app, post(KEY, "amount=100")).await;
    assert_eq!(duplicate.status, 409);
    gate.open(1);
    first.await.unwrap();
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn waiting_duplicate_runs_itself_when_the_first_fails() {
    let layer = IdempotencyLayer::memory().with_in_flight(InFlightPolicy::Wait(Duration::from_secs(30)));
    let gate = Gate::default();
    let calls = Calls::default();
    let (held, counter) = (gate.clone(), calls.clone());
    let app = app(&layer, move |_| {
        let (held, n) = (held.clone(), counter.bump());
        async move {
            if n == 1 {
                held.pass().await;
                return respond(503, "processor down");
            }
            respond(201, "charged by the retry")
        }
    });
    let first = tokio::spawn(send_owned(app.clone(), post(KEY, "a")));
    gate.entered(1).await;
    let waiter = tokio::spawn(send_owned(app.clone(), post(KEY, "a")));
    gate.open(1);
    assert_eq!(first.await.unwrap().status, 503);
    let retried = waiter.await.unwrap();
    assert_eq!((retried.status.as_u16(), &retried.body[..]), (201, &b"charged by the retry"[..]));
    assert_eq!(calls.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_simultaneous_duplicates_execute_once() {
    let (app, gate, calls) = held_at_gate(&IdempotencyLayer::memory());
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (app, barrier) = (app.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                send(&app, post(KEY, "amount=100")).await
            })
        })
        .collect();
    gate.entered(1).await;
    gate.open(1);
    let mut executed = 0;
    for task in tasks {
        let answer = task.await.unwrap();
        match answer.status.as_u16() {
            201 => {
                assert_eq!(answer.body, "charge 1");
                executed += usize::from(!answer.replayed());
            }
            409 => assert_eq!(answer.problem(), "in-flight"),
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((calls.get(), executed), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_waiting_duplicates_all_get_the_same_bytes() {
    let layer = IdempotencyLayer::memory().with_in_flight(InFlightPolicy::Wait(Duration::from_secs(30)));
    let (app, calls) = counting(&layer);
    let tasks: Vec<_> = (0..64).map(|_| tokio::spawn(send_owned(app.clone(), post(KEY, "amount=100")))).collect();
    let mut bodies = std::collections::HashSet::new();
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(answer.status, 201);
        bodies.insert(answer.body);
    }
    assert_eq!((calls.get(), bodies.len()), (1, 1));
}
