//! The axum extractors (feature `axum`): [`IdempotencyContext`] and, with
//! the `postgres` feature, the request's transaction. Both exist only for
//! requests the layer guards; each has an optional form.
//!
//! [`IdempotencyContext`]: crate::IdempotencyContext

use axum_core::{
    extract::{FromRequestParts, OptionalFromRequestParts},
    response::{IntoResponse, Response},
};
use http::request::Parts;

use crate::{IdempotencyContext, Rejection, RejectionKind};

const EXTRACTOR_DETAIL: &str = "Send an Idempotency-Key header with this request: its handler takes an \
                                IdempotencyContext, and the idempotency layer passes requests without a key \
                                through unless it requires one (with_key_required).";

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyContext {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        guarded(parts, "IdempotencyContext", EXTRACTOR_DETAIL)
    }
}

/// What only guarded requests carry, from the request's extensions; else
/// the 400 `missing-key`, its detail saying why. The layer passed the
/// request through (keys are optional unless it requires them), so it
/// counted nothing: this logs it.
#[allow(clippy::result_large_err, reason = "what an extractor returns: axum rejects with the response")]
fn guarded<T: Clone + Send + Sync + 'static>(
    parts: &Parts,
    extractor: &'static str,
    detail: &'static str,
) -> Result<T, Response> {
    parts.extensions.get::<T>().cloned().ok_or_else(|| missing_key(parts, extractor, detail))
}

fn missing_key(parts: &Parts, extractor: &'static str, detail: &'static str) -> Response {
    tracing::debug!(outcome = "rejected", rejection = "missing-key", extractor, "extractor without a key");
    let grpc = crate::policy::is_grpc(&parts.headers);
    Rejection::new(RejectionKind::MissingKey, grpc)
        .with_detail(detail)
        .default_response()
        .map(axum_core::body::Body::from)
        .into_response()
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for IdempotencyContext {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<Self>().cloned())
    }
}

#[cfg(feature = "postgres")]
mod transaction {
    use axum_core::{
        extract::{FromRequestParts, OptionalFromRequestParts},
        response::Response,
    };
    use http::request::Parts;

    use super::guarded;
    use crate::store::postgres::RequestTransaction;

    const EXTRACTOR_DETAIL: &str = "Send an Idempotency-Key header with this request: its handler writes in the \
                                    request's transaction, which only requests the idempotency layer guards have \
                                    (with a key, and while its store answers).";

    impl<S: Send + Sync> FromRequestParts<S> for RequestTransaction {
        type Rejection = Response;

        async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
            guarded(parts, "RequestTransaction", EXTRACTOR_DETAIL)
        }
    }

    impl<S: Send + Sync> OptionalFromRequestParts<S> for RequestTransaction {
        type Rejection = std::convert::Infallible;

        async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Option<Self>, Self::Rejection> {
            Ok(parts.extensions.get::<Self>().cloned())
        }
    }
}
