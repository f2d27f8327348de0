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
