//! What the handler learns about the claim it runs under.

use crate::{FencingToken, IdempotencyKey, RecordId, Scope};

/// Put in the request's extensions before the inner service runs a guarded
/// request: the key, its scope and the claim's fencing token.
///
/// Use it as the second line of defence: pass [`IdempotencyContext::derived_key`]
/// to a payment provider's own idempotency key, or store it in a unique
/// column, so even a bypassed layer cannot charge twice.
///
/// With the `axum` feature it is an extractor; `Option<IdempotencyContext>`
/// extracts `None` for requests without a key.
///
/// # Example
/// ```
/// use tower_idempotency::IdempotencyContext;
///
/// async fn handler(request: http::Request<String>) -> String {
///     match request.extensions().get::<IdempotencyContext>() {
///         Some(context) => format!("key {} token {}", context.key().as_str(), context.fencing_token().get()),
///         None => "unguarded".to_owned(),
///     }
/// }
/// # drop(handler);
/// ```
#[derive(Debug, Clone)]
pub struct IdempotencyContext {
    key: IdempotencyKey,
    scope: Scope,
    id: RecordId,
    fencing_token: FencingToken,
}

impl IdempotencyContext {
    pub(crate) fn new(key: IdempotencyKey, scope: Scope, id: RecordId, fencing_token: FencingToken) -> Self {
        Self { key, scope, id, fencing_token }
    }

    /// The client's key.
    ///
    /// # Example
    /// ```
    /// # fn f(context: &tower_idempotency::IdempotencyContext) -> &str {
    /// context.key().as_str()
    /// # }
    /// ```
    pub fn key(&self) -> &IdempotencyKey {
        &self.key
    }

    /// The scope the key belongs to.
    ///
    /// # Example
    /// ```
    /// # fn f(context: &tower_idempotency::IdempotencyContext) -> &[u8] {
    /// context.scope().as_bytes()
    /// # }
    /// ```
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The claim's fencing token: higher for every later claim of this key.
    ///
    /// # Example
    /// ```
    /// # fn f(context: &tower_idempotency::IdempotencyContext) -> u64 {
    /// context.fencing_token().get()
    /// # }
    /// ```
    pub fn fencing_token(&self) -> FencingToken {
        self.fencing_token
    }

    /// A key unique to (namespace, scope, key), 64 hex digits: safe to hand to
    /// another system, as it reveals neither the scope nor the key.
    ///
    /// # Example
    /// ```
    /// # fn f(context: &tower_idempotency::IdempotencyContext) -> String {
    /// context.derived_key()
    /// # }
    /// ```
    pub fn derived_key(&self) -> String {
        self.id.to_hex()
    }

    /// The storage identity of the record.
    ///
    /// # Example
    /// ```
    /// # fn f(context: &tower_idempotency::IdempotencyContext) -> tower_idempotency::RecordId {
    /// context.record_id()
    /// # }
    /// ```
    pub fn record_id(&self) -> RecordId {
        self.id
    }
}

#[cfg(feature = "axum")]
pub(crate) mod extract {
    use axum_core::{
        extract::{FromRequestParts, OptionalFromRequestParts},
        response::{IntoResponse, Response},
    };
    use http::request::Parts;

    use super::IdempotencyContext;
    use crate::{Rejection, RejectionKind};

    const EXTRACTOR_DETAIL: &str = "Send an Idempotency-Key header with this request: its handler takes an \
                                    IdempotencyContext, and the idempotency layer passes requests without a key \
                                    through unless it requires one (with_key_required).";

    impl<S: Send + Sync> FromRequestParts<S> for IdempotencyContext {
        type Rejection = Response;

        async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
            parts
                .extensions
                .get::<Self>()
                .cloned()
                .ok_or_else(|| missing_key(parts, "IdempotencyContext", EXTRACTOR_DETAIL))
        }
    }

    /// The 400 `missing-key` of an extractor of what only guarded requests
    /// carry, its detail saying why. The layer passed the request through
    /// (keys are optional unless it requires them), so it counted nothing:
    /// this logs it.
    pub(crate) fn missing_key(parts: &Parts, extractor: &'static str, detail: &'static str) -> Response {
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
}
