//! Rejections: `application/problem+json` (RFC 9457) for HTTP, a gRPC status
//! in a trailers-only response for gRPC, and the [`Responder`] that turns one
//! into the other.

use std::{fmt::Write as _, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::{IdempotencyKey, KeyError, NotStored, ResponseBody};

/// Why the layer answered instead of the inner service.
///
/// | kind | HTTP | gRPC |
/// |---|---|---|
/// | `MissingKey` | 400 | `INVALID_ARGUMENT` (3) |
/// | `InvalidKey` | 400 | `INVALID_ARGUMENT` (3) |
/// | `MissingScope` | 400 | `UNAUTHENTICATED` (16) |
/// | `InvalidBody` | 400 | `INVALID_ARGUMENT` (3) |
/// | `BodyTooLarge` | 413 | `RESOURCE_EXHAUSTED` (8) |
/// | `BodyTimeout` | 408 | `DEADLINE_EXCEEDED` (4) |
/// | `KeyReused` | 422 | `INVALID_ARGUMENT` (3) |
/// | `InFlight` | 409 + `Retry-After` | `ABORTED` (10) |
/// | `InFlightAccepted` | 202 + `Retry-After` | `ABORTED` (10) |
/// | `KeyAlreadyUsed` | 409 | `ALREADY_EXISTS` (6) |
/// | `ResponseNotStored` | 410 | `FAILED_PRECONDITION` (9) |
/// | `StoreUnavailable` | 503 + `Retry-After` | `UNAVAILABLE` (14) |
/// | `StoreFull` | 503 + `Retry-After` | `RESOURCE_EXHAUSTED` (8) |
/// | `PoolExhausted` | 503 + `Retry-After` | `UNAVAILABLE` (14) |
/// | `HandlerPanicked` | 500 | `INTERNAL` (13) |
/// | `NotCommitted` | 503 + `Retry-After` | `UNAVAILABLE` (14) |
/// | `CommitUnknown` | 503 + `Retry-After` | `UNAVAILABLE` (14) |
///
/// # Example
/// ```
/// use tower_idempotency::RejectionKind;
///
/// assert_eq!(RejectionKind::KeyReused.status().as_u16(), 422);
/// assert_eq!(RejectionKind::InFlight.problem_type(), "urn:tower-idempotency:problem:in-flight");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectionKind {
    /// The request needs an idempotency key and has none.
    MissingKey,
    /// The key is malformed, or sent twice.
    InvalidKey(KeyError),
    /// The scope function found no caller identity.
    MissingScope,
    /// The request body could not be read.
    InvalidBody,
    /// The request body is larger than the cap; nothing ran.
    BodyTooLarge,
    /// The request body did not arrive in time (a slow client); nothing ran.
    BodyTimeout,
    /// The key was used before for a different request.
    KeyReused,
    /// A request with this key is still running.
    InFlight,
    /// A request with this key is still running; the `Accepted` policy.
    InFlightAccepted,
    /// The key finished before and the `Reject` strategy refuses reuse.
    KeyAlreadyUsed,
    /// The key's request ran but its response was not kept.
    ResponseNotStored(NotStored),
    /// The store could not be reached; nothing ran.
    StoreUnavailable,
    /// The store answered but has no room for a new key (a memory store
    /// full of in-flight records); nothing ran.
    StoreFull,
    /// The store did not answer in time while all its pool's connections
    /// were busy with other requests; nothing ran.
    PoolExhausted {
        /// The pool's size.
        size: u32,
    },
    /// The inner service panicked; its claim was released.
    HandlerPanicked,
    /// The request's database transaction did not commit (a transactional
    /// store: a serialization failure, a deadlock, the database gone): nothing
    /// it wrote was kept and its key was given back.
    NotCommitted,
    /// The request's database transaction was sent to commit, and whether
    /// it did could not be found out (a transactional store lost its
    /// connection and the database did not answer since): a retry with the
    /// same key is safe, never one with a new key.
    CommitUnknown,
}

impl RejectionKind {
    /// The HTTP status of this rejection.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::RejectionKind;
    /// assert_eq!(RejectionKind::BodyTooLarge.status().as_u16(), 413);
    /// ```
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingKey | Self::InvalidKey(_) | Self::MissingScope | Self::InvalidBody => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::InFlight | Self::KeyAlreadyUsed => StatusCode::CONFLICT,
            Self::InFlightAccepted => StatusCode::ACCEPTED,
            Self::ResponseNotStored(_) => StatusCode::GONE,
            Self::StoreUnavailable
            | Self::StoreFull
            | Self::PoolExhausted { .. }
            | Self::NotCommitted
            | Self::CommitUnknown => StatusCode::SERVICE_UNAVAILABLE,
            Self::HandlerPanicked => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The gRPC status code of this rejection.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::RejectionKind;
    /// assert_eq!(RejectionKind::StoreUnavailable.grpc_code(), 14);
    /// ```
    pub fn grpc_code(&self) -> u32 {
        match self {
            Self::MissingKey | Self::InvalidKey(_) | Self::InvalidBody | Self::KeyReused => 3,
            Self::MissingScope => 16,
            Self::BodyTooLarge => 8,
            Self::BodyTimeout => 4,
            Self::InFlight | Self::InFlightAccepted => 10,
            Self::KeyAlreadyUsed => 6,
            Self::ResponseNotStored(_) => 9,
            Self::StoreUnavailable | Self::PoolExhausted { .. } | Self::NotCommitted | Self::CommitUnknown => 14,
            Self::StoreFull => 8,
            Self::HandlerPanicked => 13,
        }
    }

    /// The problem `type` URI, one per kind.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::RejectionKind;
    /// assert!(RejectionKind::MissingKey.problem_type().ends_with(":missing-key"));
    /// ```
    pub fn problem_type(&self) -> &'static str {
        match self {
            Self::MissingKey => "urn:tower-idempotency:problem:missing-key",
            Self::InvalidKey(_) => "urn:tower-idempotency:problem:invalid-key",
            Self::MissingScope => "urn:tower-idempotency:problem:missing-scope",
            Self::InvalidBody => "urn:tower-idempotency:problem:invalid-body",
            Self::BodyTooLarge => "urn:tower-idempotency:problem:body-too-large",
            Self::BodyTimeout => "urn:tower-idempotency:problem:body-timeout",
            Self::KeyReused => "urn:tower-idempotency:problem:key-reused",
            Self::InFlight => "urn:tower-idempotency:problem:in-flight",
            Self::InFlightAccepted => "urn:tower-idempotency:problem:in-flight-accepted",
            Self::KeyAlreadyUsed => "urn:tower-idempotency:problem:key-already-used",
            Self::ResponseNotStored(_) => "urn:tower-idempotency:problem:response-not-stored",
            Self::StoreUnavailable => "urn:tower-idempotency:problem:store-unavailable",
            Self::StoreFull => "urn:tower-idempotency:problem:store-full",
            Self::PoolExhausted { .. } => "urn:tower-idempotency:problem:pool-exhausted",
            Self::HandlerPanicked => "urn:tower-idempotency:problem:handler-panicked",
            Self::NotCommitted => "urn:tower-idempotency:problem:not-committed",
            Self::CommitUnknown => "urn:tower-idempotency:problem:commit-unknown",
        }
    }

    /// A short, fixed summary of the problem.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::RejectionKind;
    /// assert_eq!(RejectionKind::KeyReused.title(), "Idempotency key reused with a different request");
    /// ```
    pub fn title(&self) -> &'static str {
        match self {
            Self::MissingKey => "Idempotency key required",
            Self::InvalidKey(_) => "Invalid idempotency key",
            Self::MissingScope => "No caller identity for the idempotency key",
            Self::InvalidBody => "Request body could not be read",
            Self::BodyTooLarge => "Request body too large",
            Self::BodyTimeout => "Request body too slow",
            Self::KeyReused => "Idempotency key reused with a different request",
            Self::InFlight => "A request with this idempotency key is in progress",
            Self::InFlightAccepted => "A request with this idempotency key is in progress",
            Self::KeyAlreadyUsed => "Idempotency key already used",
            Self::ResponseNotStored(_) => "The response for this idempotency key was not stored",
            Self::StoreUnavailable => "Idempotency store unavailable",
            Self::StoreFull => "Idempotency store full",
            Self::PoolExhausted { .. } => "Idempotency store busy",
            Self::HandlerPanicked => "The request failed",
            Self::NotCommitted => "The request's transaction did not commit",
            Self::CommitUnknown => "Whether the request's transaction committed is unknown",
        }
    }

    /// A longer explanation for the client.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{KeyError, RejectionKind};
    /// assert!(RejectionKind::InvalidKey(KeyError::Empty).detail().contains("empty"));
    /// ```
    pub fn detail(&self) -> String {
        match self {
            Self::MissingKey => "Send an Idempotency-Key header with this request.".into(),
            Self::InvalidKey(error) => format!("{error}."),
            Self::MissingScope => "The request carries no identity to scope its idempotency key to: send an \
                                   Authorization header. (Operators: IdempotencyLayer::with_scope sets who a key \
                                   belongs to; with_scope(|_| Some(Scope::anonymous())) shares one scope for a \
                                   public endpoint.)"
                .into(),
            Self::InvalidBody => "The request body ended with an error before it was complete.".into(),
            Self::BodyTooLarge => "The request body exceeds the size this endpoint accepts; nothing was done.".into(),
            Self::BodyTimeout => "The request body did not arrive in time; nothing was done.".into(),
            Self::KeyReused => {
                "This key was already used for a request with a different method, path, headers or body.".into()
            }
            Self::InFlight | Self::InFlightAccepted => {
                "The first request with this key has not finished yet; retry later to get its result.".into()
            }
            Self::KeyAlreadyUsed => "Requests with this key have finished; use a new key.".into(),
            Self::ResponseNotStored(reason) => {
                let why = match reason {
                    NotStored::TooLarge => "it was larger than the storage limit",
                    NotStored::BodyFailed => "its body failed while it was sent",
                    NotStored::StoreFull => "the store was full",
                    NotStored::Unreadable => "it could not be read back",
                };
                format!("The request with this key was processed, but its response cannot be replayed because {why}.")
            }
            Self::StoreUnavailable => {
                "The idempotency store could not be reached; nothing was done. Retry later.".into()
            }
            Self::StoreFull => {
                "The idempotency store has no room for a new key while the requests it holds run; nothing was done. \
                 Retry later."
                    .into()
            }
            Self::PoolExhausted { size } => format!(
                "All {size} connections to the idempotency store are busy with other requests; nothing was done. \
                 Retry later. (Operators: size the pool for the requests in flight.)"
            ),
            Self::HandlerPanicked => "The request failed on the server; it may be retried with the same key.".into(),
            Self::NotCommitted => "The request's database transaction did not commit, so nothing it did was kept; \
                                   retry it with the same key."
                .into(),
            Self::CommitUnknown => "The request's database transaction may or may not have committed: the \
                                    connection to the database was lost while it committed. Retry with the same \
                                    key, which is safe: it returns the result if it committed, and runs the \
                                    request otherwise. Do not retry with a new key."
                .into(),
        }
    }
}

/// A rejection about to be sent: its kind and what the response needs.
///
/// # Example
/// ```
/// use tower_idempotency::{Rejection, RejectionKind};
///
/// let rejection = Rejection::new(RejectionKind::MissingKey, false);
/// let response = rejection.default_response();
/// assert_eq!(response.status(), 400);
/// assert_eq!(response.headers()["content-type"], "application/problem+json");
/// ```
#[derive(Debug, Clone)]
pub struct Rejection {
    kind: RejectionKind,
    grpc: bool,
    retry_after: Option<Duration>,
    location: Option<HeaderValue>,
    /// Replaces the kind's own detail.
    detail: Option<&'static str>,
}

impl Rejection {
    /// A rejection of `kind`, for a gRPC request when `grpc` is true.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{Rejection, RejectionKind};
    /// assert!(Rejection::new(RejectionKind::InFlight, true).is_grpc());
    /// ```
    pub fn new(kind: RejectionKind, grpc: bool) -> Self {
        Self { kind, grpc, retry_after: None, location: None, detail: None }
    }

    #[must_use]
    pub(crate) fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }

    #[must_use]
    pub(crate) fn with_detail(mut self, detail: &'static str) -> Self {
        self.detail = Some(detail);
        self
    }

    #[must_use]
    pub(crate) fn with_location(mut self, location: Option<HeaderValue>) -> Self {
        self.location = location;
        self
    }

    /// The response through `responder`, telling the client when to retry
    /// where waiting helps (in flight, store unavailable).
    pub(crate) fn respond<B>(self, responder: &dyn Responder, retry_after: Duration) -> Response<ResponseBody<B>> {
        let rejection = match self.kind {
            RejectionKind::InFlight
            | RejectionKind::InFlightAccepted
            | RejectionKind::StoreUnavailable
            | RejectionKind::StoreFull
            | RejectionKind::PoolExhausted { .. }
            | RejectionKind::NotCommitted
            | RejectionKind::CommitUnknown => self.with_retry_after(retry_after),
            _ => self,
        };
        responder.respond(&rejection).map(ResponseBody::full)
    }

    /// What went wrong.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{Rejection, RejectionKind};
    /// assert_eq!(Rejection::new(RejectionKind::KeyReused, false).kind(), RejectionKind::KeyReused);
    /// ```
    pub fn kind(&self) -> RejectionKind {
        self.kind
    }

    /// Whether the request was gRPC (`content-type: application/grpc*`).
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{Rejection, RejectionKind};
    /// assert!(!Rejection::new(RejectionKind::KeyReused, false).is_grpc());
    /// ```
    pub fn is_grpc(&self) -> bool {
        self.grpc
    }

    /// When the client should retry, for in-flight and store rejections.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{Rejection, RejectionKind};
    /// assert_eq!(Rejection::new(RejectionKind::KeyReused, false).retry_after(), None);
    /// ```
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The default response: problem+json, or a trailers-only gRPC status.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{Rejection, RejectionKind};
    /// let response = Rejection::new(RejectionKind::StoreUnavailable, true).default_response();
    /// assert_eq!(response.headers()["grpc-status"], "14");
    /// assert!(response.body().is_empty());
    /// ```
    pub fn default_response(&self) -> Response<Bytes> {
        let mut response = if self.grpc { self.grpc_response() } else { self.problem_response() };
        if let Some(retry_after) = self.retry_after {
            let seconds = retry_after.as_secs().saturating_add(u64::from(retry_after.subsec_nanos() > 0));
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        if let Some(location) = &self.location {
            response.headers_mut().insert(header::LOCATION, location.clone());
        }
        response
    }

    fn problem_response(&self) -> Response<Bytes> {
        let kind = &self.kind;
        let mut body = String::with_capacity(256);
        body.push_str("{\"type\":");
        json_string(&mut body, kind.problem_type());
        body.push_str(",\"title\":");
        json_string(&mut body, kind.title());
        let _ = write!(body, ",\"status\":{},\"detail\":", kind.status().as_u16());
        match self.detail {
            Some(detail) => json_string(&mut body, detail),
            None => json_string(&mut body, &kind.detail()),
        }
        body.push('}');
        let mut response = Response::new(Bytes::from(body));
        *response.status_mut() = kind.status();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        response
    }

    fn grpc_response(&self) -> Response<Bytes> {
        let mut response = Response::new(Bytes::new());
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from(self.kind.grpc_code()));
        if let Ok(message) = HeaderValue::try_from(grpc_percent_encode(self.kind.title())) {
            headers.insert("grpc-message", message);
        }
        response
    }
}

/// Turns a [`Rejection`] into the response the client gets. Any
/// `Fn(&Rejection) -> Response<Bytes>` is a responder.
///
/// # Example
/// ```
/// use bytes::Bytes;
/// use tower_idempotency::{IdempotencyLayer, Rejection, RejectionKind};
///
/// let layer = IdempotencyLayer::memory().with_responder(|rejection: &Rejection| {
///     if rejection.kind() == RejectionKind::InFlight {
///         let mut response = axum::http::Response::new(Bytes::from("busy, try again"));
///         *response.status_mut() = axum::http::StatusCode::CONFLICT;
///         return response;
///     }
///     rejection.default_response()
/// });
/// # drop(layer);
/// ```
pub trait Responder: Send + Sync + 'static {
    /// The response for `rejection`.
    fn respond(&self, rejection: &Rejection) -> Response<Bytes>;
}

impl<F> Responder for F
where
    F: Fn(&Rejection) -> Response<Bytes> + Send + Sync + 'static,
{
    fn respond(&self, rejection: &Rejection) -> Response<Bytes> {
        self(rejection)
    }
}

/// The responder the layer uses unless told otherwise:
/// [`Rejection::default_response`].
///
/// # Example
/// ```
/// use tower_idempotency::{DefaultResponder, Rejection, RejectionKind, Responder};
///
/// let response = DefaultResponder.respond(&Rejection::new(RejectionKind::KeyReused, false));
/// assert_eq!(response.status(), 422);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultResponder;

impl Responder for DefaultResponder {
    fn respond(&self, rejection: &Rejection) -> Response<Bytes> {
        rejection.default_response()
    }
}

/// The `Location` for the `Accepted` policy: `{key}` in `template` replaced
/// by the key, percent-encoded but for unreserved characters.
pub(crate) fn status_location(template: &str, key: &IdempotencyKey) -> Option<HeaderValue> {
    let mut encoded = String::with_capacity(key.as_str().len());
    for b in key.as_str().bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::try_from(template.replace("{key}", &encoded)).ok()
}

fn json_string(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// gRPC's `grpc-message` encoding: printable ASCII but `%` as is, the rest
/// percent-encoded.
fn grpc_percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_json_has_the_rfc_9457_members() {
        let response = Rejection::new(RejectionKind::InFlight, false)
            .with_retry_after(Duration::from_millis(1500))
            .default_response();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body["type"], "urn:tower-idempotency:problem:in-flight");
        assert_eq!(body["status"], 409);
        assert!(body["title"].is_string() && body["detail"].is_string());
    }

    #[test]
    fn every_kind_has_its_own_type() {
        let kinds = [
            RejectionKind::MissingKey,
            RejectionKind::InvalidKey(KeyError::Empty),
            RejectionKind::MissingScope,
            RejectionKind::InvalidBody,
            RejectionKind::BodyTooLarge,
            RejectionKind::BodyTimeout,
            RejectionKind::KeyReused,
            RejectionKind::InFlight,
            RejectionKind::InFlightAccepted,
            RejectionKind::KeyAlreadyUsed,
            RejectionKind::ResponseNotStored(NotStored::TooLarge),
            RejectionKind::StoreUnavailable,
            RejectionKind::StoreFull,
            RejectionKind::HandlerPanicked,
            RejectionKind::NotCommitted,
            RejectionKind::CommitUnknown,
        ];
        let types: std::collections::HashSet<_> = kinds.iter().map(RejectionKind::problem_type).collect();
        assert_eq!(types.len(), kinds.len());
        for kind in kinds {
            let body = Rejection::new(kind, false).default_response().into_body();
            serde_json::from_slice::<serde_json::Value>(&body).expect("valid JSON");
        }
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(grpc_percent_encode("a 100% é"), "a 100%25 %C3%A9");
    }
}
