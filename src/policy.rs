//! What the layer does with duplicates, with finished keys and when the store
//! fails.

use std::time::Duration;

use http::{HeaderMap, HeaderName, StatusCode, header};

/// What a duplicate gets while the first request with its key still runs.
///
/// # Example
/// ```
/// use std::time::Duration;
/// use tower_idempotency::{IdempotencyLayer, InFlightPolicy};
///
/// let layer = IdempotencyLayer::memory().with_in_flight(InFlightPolicy::Wait(Duration::from_secs(5)));
/// # drop(layer);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum InFlightPolicy {
    /// 409 Conflict with `Retry-After` (the default).
    #[default]
    Conflict,
    /// 202 Accepted with `Retry-After`, and a `Location` when a status URL
    /// template is set: `{key}` in it is replaced by the percent-encoded key.
    Accepted {
        /// For example `/v1/idempotency/{key}`.
        status_url: Option<String>,
    },
    /// Wait up to this long for the first request to finish and replay its
    /// response; 409 when it has not finished by then. If the first request
    /// fails without storing a response, the waiting duplicate runs instead.
    Wait(Duration),
}

impl InFlightPolicy {
    /// `Accepted` without a status URL.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::InFlightPolicy;
    /// assert_eq!(InFlightPolicy::accepted(), InFlightPolicy::Accepted { status_url: None });
    /// ```
    pub fn accepted() -> Self {
        Self::Accepted { status_url: None }
    }
}

/// What a request gets when its key's first request has finished.
///
/// # Example
/// ```
/// use tower_idempotency::{CompletedStrategy, IdempotencyLayer};
///
/// let layer = IdempotencyLayer::memory().with_completed(CompletedStrategy::Reject);
/// # drop(layer);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum CompletedStrategy {
    /// Replay the stored response (the default).
    #[default]
    Replay,
    /// Refuse any reuse of a finished key: 409 `key-already-used`.
    Reject,
    /// Run a finished key again, whatever its payload; only concurrent
    /// duplicates are refused.
    Rerun,
}

/// What happens when the store cannot be reached or answers too slowly.
///
/// # Example
/// ```
/// use tower_idempotency::{FailureMode, IdempotencyLayer};
///
/// let layer = IdempotencyLayer::memory().with_failure_mode(FailureMode::FailOpen);
/// # drop(layer);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureMode {
    /// Answer 503 with `Retry-After` and run nothing (the default).
    #[default]
    FailClosed,
    /// Forward the request unguarded; counted as `FailedOpen` and logged.
    FailOpen,
}

/// Put in a response's extensions by the inner service to overrule the
/// layer's decision to store that response.
///
/// # Example
/// ```
/// use tower_idempotency::StoreResponse;
///
/// let mut response = axum::http::Response::new(());
/// *response.status_mut() = axum::http::StatusCode::SERVICE_UNAVAILABLE;
/// // This 503 is a final business answer: replay it to retries.
/// response.extensions_mut().insert(StoreResponse::Always);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreResponse {
    /// Store this response whatever its status.
    Always,
    /// Do not store it: release the key so a retry runs again.
    Never,
}

/// The default storage rule: store everything but 5xx and the transient 4xx
/// (408 Request Timeout, 425 Too Early, 429 Too Many Requests).
///
/// # Example
/// ```
/// use http::StatusCode;
/// use tower_idempotency::policy::default_store_rule;
///
/// assert!(default_store_rule(StatusCode::PAYMENT_REQUIRED));
/// assert!(!default_store_rule(StatusCode::TOO_MANY_REQUESTS));
/// assert!(!default_store_rule(StatusCode::BAD_GATEWAY));
/// ```
pub fn default_store_rule(status: StatusCode) -> bool {
    !(status.is_server_error()
        || matches!(status.as_u16(), 408 | 425 | 429)
        // 499: what a cancelled gRPC call maps to.
        || status.as_u16() == 499)
}

/// The HTTP status a gRPC status code stands for, as gRPC gateways map them,
/// so one storage rule serves both protocols.
///
/// # Example
/// ```
/// use tower_idempotency::policy::grpc_to_http;
///
/// assert_eq!(grpc_to_http(0).as_u16(), 200);
/// assert_eq!(grpc_to_http(14).as_u16(), 503);
/// ```
pub fn grpc_to_http(code: u32) -> StatusCode {
    let status = match code {
        0 => 200,
        1 => 499,
        3 | 9 | 11 => 400,
        4 => 504,
        5 => 404,
        6 | 10 => 409,
        7 => 403,
        8 => 429,
        12 => 501,
        14 => 503,
        16 => 401,
        _ => 500,
    };
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// The rule [`crate::IdempotencyLayer::with_store_if`] sets.
pub(crate) type StoreIf = dyn Fn(StatusCode) -> bool + Send + Sync;

/// Whether a response is stored: the inner service's own `verdict` when it
/// gave one, else the rule `store_if` on its (effective) status.
pub(crate) fn is_stored(store_if: &StoreIf, verdict: Option<StoreResponse>, status: StatusCode) -> bool {
    match verdict {
        Some(StoreResponse::Always) => true,
        Some(StoreResponse::Never) => false,
        None => store_if(status),
    }
}

/// Whether a request or response is gRPC (`content-type: application/grpc*`).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

/// A name, not a `&str`: a `&str` lookup parses the name on every response.
pub(crate) const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The status a response counts as for the storage rule: its `grpc-status`
/// when it has one (a trailers-only gRPC response), else its HTTP status.
pub(crate) fn effective_status(status: StatusCode, headers: &HeaderMap) -> StatusCode {
    headers.get(GRPC_STATUS).and_then(|value| value.to_str().ok()?.parse().ok()).map_or(status, grpc_to_http)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_statuses_are_not_stored() {
        for status in [408, 425, 429, 499, 500, 502, 503, 504] {
            assert!(!default_store_rule(StatusCode::from_u16(status).unwrap()), "{status}");
        }
        for status in [200, 201, 400, 402, 404, 409, 422] {
            assert!(default_store_rule(StatusCode::from_u16(status).unwrap()), "{status}");
        }
    }

    #[test]
    fn grpc_codes_follow_the_gateway_mapping() {
        assert!(default_store_rule(grpc_to_http(9))); // FAILED_PRECONDITION
        assert!(!default_store_rule(grpc_to_http(1))); // CANCELLED
        assert!(!default_store_rule(grpc_to_http(13))); // INTERNAL
        assert!(!default_store_rule(grpc_to_http(99)));
    }
}
