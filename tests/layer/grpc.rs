//! GRPC rejections.

use super::*;

#[tokio::test]
async fn grpc_requests_get_grpc_statuses_not_problem_json() {
    let (app, calls) = counting(&IdempotencyLayer::memory());
    let grpc = |key: &str| {
        Request::post("/payments.v1.Payments/CreateCharge")
            .header("content-type", "application/grpc+proto")
            .header("idempotency-key", key)
            .header("authorization", AUTH)
            .body(Full::default())
            .unwrap()
    };
    let invalid = send(&app, grpc("")).await;
    assert_eq!(invalid.status, 200);
    assert_eq!(invalid.headers["grpc-status"], "3"); // INVALID_ARGUMENT
    assert_eq!(invalid.headers["content-type"], "application/grpc");
    assert!(invalid.body.is_empty(), "trailers-only");
    assert_eq!(calls.get(), 0);
}
