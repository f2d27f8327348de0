//! Replay.

use super::*;

#[tokio::test]
async fn duplicate_replays_status_headers_and_body_byte_for_byte() {
    let layer = IdempotencyLayer::memory();
    let (app, calls) = counting(&layer);
    let first = send(&app, post(KEY, "amount=100")).await;
    let second = send(&app, post(KEY, "amount=100")).await;
    assert_eq!(first.status, 201);
    assert!(!first.replayed());
    assert!(second.replayed());
    assert_eq!(second.status, first.status);
    assert_eq!(second.headers_but_replayed(), first.headers);
    assert_eq!(second.body, first.body);
    assert_eq!(calls.get(), 1);
    let metrics = layer.metrics();
    assert_eq!((metrics.get(Outcome::Executed), metrics.get(Outcome::Replayed)), (1, 1));
}

#[tokio::test]
async fn multi_chunk_bodies_and_trailers_replay_identically() {
    let layer = IdempotencyLayer::memory();
    let (app, calls) = counted(&layer, move |_, _| async {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert("x-checksum", "abc".parse().unwrap());
        let mut response = Response::new(streaming_body(&["part one, ", "part two, ", "part three"], Some(trailers)));
        response.headers_mut().append("set-cookie", "a=1".parse().unwrap());
        response.headers_mut().append("set-cookie", "b=2".parse().unwrap());
        response
    });
    let first = send(&app, post(KEY, "x")).await;
    let second = send(&app, post(KEY, "x")).await;
    assert_eq!(first.body, "part one, part two, part three");
    assert_eq!(second.body, first.body);
    assert_eq!(second.trailers, first.trailers);
    assert_eq!(second.trailers.as_ref().unwrap()["x-checksum"], "abc");
    assert_eq!(second.headers.get_all("set-cookie").iter().count(), 2);
    assert!(second.replayed());
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_replayed() {
    let layer = IdempotencyLayer::memory();
    let app = app(&layer, |_| async {
        let mut response = respond(200, "ok");
        response.headers_mut().insert("connection", "x-private".parse().unwrap());
        response.headers_mut().insert("x-private", "1".parse().unwrap());
        response.headers_mut().insert("keep-alive", "timeout=5".parse().unwrap());
        response.headers_mut().insert("x-kept", "1".parse().unwrap());
        response
    });
    send(&app, post(KEY, "")).await;
    let replay = send(&app, post(KEY, "")).await;
    for name in ["connection", "x-private", "keep-alive"] {
        assert!(!replay.headers.contains_key(name), "{name} replayed");
    }
    assert_eq!(replay.headers["x-kept"], "1");
}

#[tokio::test]
async fn trailers_after_the_declared_length_are_kept_without_a_trailer_header() {
    let layer = IdempotencyLayer::memory();
    let (app, calls) = counted(&layer, |_, _| async {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "abc".parse().unwrap());
        let mut response = Response::new(streaming_body(&["hello ", "world"], Some(trailers)));
        response.headers_mut().insert(header::CONTENT_LENGTH, "11".parse().unwrap());
        response
    });
    let first = send(&app, post(KEY, "a")).await;
    assert_eq!(first.body, "hello world");
    assert_eq!(first.trailers.as_ref().map(|t| t["x-checksum"].clone()), Some("abc".parse().unwrap()));
    let replay = send(&app, post(KEY, "a")).await;
    assert!(replay.replayed());
    assert_eq!((replay.body, replay.trailers), (first.body, first.trailers));
    assert_eq!(calls.get(), 1);
}
