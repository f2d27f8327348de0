//! The client's `Idempotency-Key`, who it belongs to, and the storage identity
//! derived from both.

use std::fmt;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, request::Parts};
use sha2::{Digest, Sha256};

/// The longest key accepted, in bytes after unquoting.
pub const MAX_KEY_LEN: usize = 255;

/// A validated idempotency key: 1 to 255 bytes of visible ASCII (0x21–0x7E).
///
/// Keys are compared byte for byte: `ABC` and `abc` are different keys.
///
/// # Example
/// ```
/// use tower_idempotency::IdempotencyKey;
///
/// let key: IdempotencyKey = "order-42".parse().unwrap();
/// assert_eq!(key.as_str(), "order-42");
/// assert!("".parse::<IdempotencyKey>().is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(Box<str>);

/// Why a key was refused.
///
/// # Example
/// ```
/// use tower_idempotency::{IdempotencyKey, KeyError};
///
/// assert_eq!("a b".parse::<IdempotencyKey>(), Err(KeyError::InvalidCharacter));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key is empty after unquoting.
    #[error("The idempotency key is empty")]
    Empty,
    /// The key is longer than 255 bytes after unquoting.
    #[error("The idempotency key is longer than {MAX_KEY_LEN} bytes")]
    TooLong,
    /// The key holds a byte outside visible ASCII (0x21–0x7E).
    #[error("The idempotency key must be visible ASCII (0x21-0x7E)")]
    InvalidCharacter,
    /// A quoted key is not a well-formed structured-field string.
    #[error("The idempotency key is a malformed quoted string")]
    MalformedQuotes,
    /// The request carries the key header more than once.
    #[error("The request carries more than one idempotency key field")]
    Repeated,
}

impl IdempotencyKey {
    /// Parses a header value: a structured-field string (`"abc"`) or a bare
    /// token (`abc`). A value that starts with `"` is read as a quoted
    /// string and must be a well-formed one; spaces and tabs around the
    /// value are ignored.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::IdempotencyKey;
    ///
    /// let quoted = IdempotencyKey::parse(br#""a\"b""#).unwrap();
    /// assert_eq!(quoted.as_str(), "a\"b");
    /// assert_eq!(IdempotencyKey::parse(b"abc").unwrap().as_str(), "abc");
    /// ```
    pub fn parse(value: &[u8]) -> Result<Self, KeyError> {
        let value = trim_ows(value);
        let key = match value {
            [b'"', ..] => unquote(value)?,
            _ => value.to_vec(),
        };
        validate(&key)?;
        // `validate` admits only ASCII, so this conversion cannot fail.
        String::from_utf8(key).map(|key| Self(key.into_boxed_str())).map_err(|_| KeyError::InvalidCharacter)
    }

    /// Reads the key from `headers`: `Ok(None)` when the header is absent.
    ///
    /// # Example
    /// ```
    /// use http::{HeaderMap, HeaderName};
    /// use tower_idempotency::IdempotencyKey;
    ///
    /// let name = HeaderName::from_static("idempotency-key");
    /// let mut headers = HeaderMap::new();
    /// assert_eq!(IdempotencyKey::from_headers(&headers, &name), Ok(None));
    /// headers.insert(&name, "k1".parse().unwrap());
    /// assert_eq!(IdempotencyKey::from_headers(&headers, &name).unwrap().unwrap().as_str(), "k1");
    /// ```
    pub fn from_headers(headers: &HeaderMap, name: &HeaderName) -> Result<Option<Self>, KeyError> {
        let mut values = headers.get_all(name).iter();
        let Some(first) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(KeyError::Repeated);
        }
        Self::parse(first.as_bytes()).map(Some)
    }

    /// The key as sent, unquoted.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::IdempotencyKey;
    /// assert_eq!(IdempotencyKey::parse(b"\"k\"").unwrap().as_str(), "k");
    /// ```
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for IdempotencyKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s.as_bytes())
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys may be guessable handles into cached responses: keep them out
        // of logs that print `Debug`.
        f.write_str("IdempotencyKey(..)")
    }
}

fn trim_ows(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

/// Unquotes an RFC 8941 sf-string: `"` ... `"`, with `\"` and `\\` escapes.
fn unquote(value: &[u8]) -> Result<Vec<u8>, KeyError> {
    let inner = match value {
        [b'"', inner @ .., b'"'] if value.len() >= 2 => inner,
        _ => return Err(KeyError::MalformedQuotes),
    };
    let mut out = Vec::with_capacity(inner.len());
    let mut bytes = inner.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => match bytes.next() {
                Some(&escaped @ (b'"' | b'\\')) => out.push(escaped),
                _ => return Err(KeyError::MalformedQuotes),
            },
            b'"' => return Err(KeyError::MalformedQuotes),
            _ => out.push(b),
        }
    }
    Ok(out)
}

fn validate(key: &[u8]) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    if !key.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(KeyError::InvalidCharacter);
    }
    Ok(())
}

/// Who a key belongs to: a tenant, an account, an API key.
///
/// Two requests share a record only when both their scope and their key are
/// equal, so one caller can never replay another caller's response.
///
/// # Example
/// ```
/// use tower_idempotency::Scope;
///
/// let tenant = Scope::new("tenant-7");
/// assert_ne!(tenant, Scope::anonymous());
/// ```
#[derive(Clone)]
pub struct Scope(ScopeBytes);

/// A digest sits inline: the default scope is one per guarded request, and a
/// `Bytes` of it would be an allocation each time.
#[derive(Clone)]
enum ScopeBytes {
    Shared(Bytes),
    Digest([u8; 32]),
}

impl Scope {
    /// A scope from any bytes that identify the caller.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::Scope;
    /// assert_eq!(Scope::new("a").as_bytes(), b"a");
    /// ```
    pub fn new(id: impl Into<Bytes>) -> Self {
        Self(ScopeBytes::Shared(id.into()))
    }

    /// The scope of requests that carry no credentials.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::Scope;
    /// assert!(Scope::anonymous().as_bytes().is_empty());
    /// ```
    pub fn anonymous() -> Self {
        Self(ScopeBytes::Shared(Bytes::new()))
    }

    /// A scope derived from a secret (an API key, a bearer token): only its
    /// SHA-256 is kept, so the secret never sits in memory or in a store.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::Scope;
    /// assert_eq!(Scope::hashed(b"sk_test_1"), Scope::hashed(b"sk_test_1"));
    /// assert_ne!(Scope::hashed(b"sk_test_1"), Scope::new("sk_test_1"));
    /// ```
    pub fn hashed(secret: &[u8]) -> Self {
        Self(ScopeBytes::Digest(Sha256::digest(secret).into()))
    }

    /// The default scope: the SHA-256 of the request's `Authorization`
    /// header; `None` when it has none, and the layer then refuses the
    /// request (400 `missing-scope`), so that callers without credentials
    /// never share each other's records.
    ///
    /// Callers that authenticate some other way (cookies, mTLS, a tenant an
    /// auth layer puts in the extensions) set their own scope with
    /// `IdempotencyLayer::with_scope`; a public endpoint whose callers may
    /// share records opts in with `with_scope(|_| Some(Scope::anonymous()))`.
    ///
    /// # Example
    /// ```
    /// use tower_idempotency::Scope;
    ///
    /// let (parts, ()) = http::Request::post("/")
    ///     .header("authorization", "Bearer sk_1")
    ///     .body(())
    ///     .unwrap()
    ///     .into_parts();
    /// assert_eq!(Scope::from_authorization(&parts), Some(Scope::hashed(b"Bearer sk_1")));
    /// let (anonymous, ()) = http::Request::post("/").body(()).unwrap().into_parts();
    /// assert_eq!(Scope::from_authorization(&anonymous), None);
    /// ```
    pub fn from_authorization(parts: &Parts) -> Option<Self> {
        let mut values = parts.headers.get_all(http::header::AUTHORIZATION).iter();
        Some(match (values.next(), values.next()) {
            (None, _) => return None,
            (Some(one), None) => Self::hashed(one.as_bytes()),
            (Some(first), Some(second)) => {
                let mut hasher = Sha256::new();
                for value in [first, second].into_iter().chain(values) {
                    hasher.update((value.len() as u64).to_be_bytes());
                    hasher.update(value.as_bytes());
                }
                Self(ScopeBytes::Digest(hasher.finalize().into()))
            }
        })
    }

    /// A keyed 64-bit digest of the scope, never 0 (0 stands for "no
    /// scope given" in a [`crate::store::ClaimRequest`]).
    pub(crate) fn tag(&self) -> u64 {
        static KEYS: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
        let tag = std::hash::BuildHasher::hash_one(KEYS.get_or_init(Default::default), self.as_bytes());
        tag.max(1)
    }

    /// The scope's bytes.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::Scope;
    /// assert_eq!(Scope::new(vec![1u8, 2]).as_bytes(), &[1, 2]);
    /// ```
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            ScopeBytes::Shared(bytes) => bytes,
            ScopeBytes::Digest(digest) => digest,
        }
    }
}

impl PartialEq for Scope {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Scope {}

impl std::hash::Hash for Scope {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Scope(..)")
    }
}

/// The storage identity of a (namespace, scope, key): a SHA-256, so client
/// bytes never reach a store's key names and every name has the same length.
///
/// # Example
/// ```
/// use tower_idempotency::{IdempotencyKey, RecordId, Scope};
///
/// let key: IdempotencyKey = "k".parse().unwrap();
/// let a = RecordId::new("payments", &Scope::new("alice"), &key);
/// let b = RecordId::new("payments", &Scope::new("bob"), &key);
/// assert_ne!(a, b);
/// assert_eq!(a.to_hex().len(), 64);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordId([u8; 32]);

impl RecordId {
    /// Derives the identity of `key` within `scope` under `namespace`.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{IdempotencyKey, RecordId, Scope};
    /// let key: IdempotencyKey = "k".parse().unwrap();
    /// assert_eq!(RecordId::new("", &Scope::anonymous(), &key), RecordId::new("", &Scope::anonymous(), &key));
    /// ```
    pub fn new(namespace: &str, scope: &Scope, key: &IdempotencyKey) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"tower-idempotency/record/v1");
        for part in [namespace.as_bytes(), scope.as_bytes(), key.as_str().as_bytes()] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        Self(hasher.finalize().into())
    }

    /// An identity from its 32 raw bytes, as a store read it back.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::RecordId;
    /// assert_eq!(RecordId::from_bytes([7; 32]).as_bytes(), &[7; 32]);
    /// ```
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes of the identity.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::RecordId;
    /// assert_eq!(RecordId::from_bytes([0; 32]).as_bytes().len(), 32);
    /// ```
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The identity as 64 lowercase hex digits, for store key names.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::RecordId;
    /// assert!(RecordId::from_bytes([0xab; 32]).to_hex().starts_with("abab"));
    /// ```
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Debug for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordId({})", &hex(&self.0[..8]))
    }
}

impl fmt::Display for RecordId {
    /// The first 8 bytes in hex: enough to correlate log lines, never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0[..8]))
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}

/// Appends `bytes` to `out` in lowercase hex.
pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    for b in bytes {
        out.extend(hex_pair(*b).map(char::from));
    }
}

/// Writes `bytes` in lowercase hex into the start of `out`, which holds at
/// least twice as many.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn write_hex(out: &mut [u8], bytes: &[u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&hex_pair(*b));
    }
}

fn hex_pair(b: u8) -> [u8; 2] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xf)]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_is_its_bytes_however_it_was_made() {
        let digest = Sha256::digest(b"Bearer sk_1");
        let shared = Scope::new(Bytes::copy_from_slice(&digest));
        assert_eq!(shared, Scope::hashed(b"Bearer sk_1"));
        use std::hash::BuildHasher as _;
        let state = std::hash::RandomState::new();
        assert_eq!(state.hash_one(&shared), state.hash_one(Scope::hashed(b"Bearer sk_1")));
        assert_ne!(shared, Scope::hashed(b"Bearer sk_2"));
    }

    #[test]
    fn accepts_bare_tokens_and_sf_strings() {
        assert_eq!(IdempotencyKey::parse(b"abc").unwrap().as_str(), "abc");
        assert_eq!(IdempotencyKey::parse(b"\"abc\"").unwrap().as_str(), "abc");
        assert_eq!(IdempotencyKey::parse(b" abc\t").unwrap().as_str(), "abc");
        assert_eq!(IdempotencyKey::parse(br#""a\\b""#).unwrap().as_str(), "a\\b");
        let longest = vec![b'k'; MAX_KEY_LEN];
        assert_eq!(IdempotencyKey::parse(&longest).unwrap().as_str().len(), 255);
    }

    #[test]
    fn refuses_what_the_spec_refuses() {
        assert_eq!(IdempotencyKey::parse(b""), Err(KeyError::Empty));
        assert_eq!(IdempotencyKey::parse(b"\"\""), Err(KeyError::Empty));
        assert_eq!(IdempotencyKey::parse(&[b'k'; 256]), Err(KeyError::TooLong));
        assert_eq!(IdempotencyKey::parse("clé".as_bytes()), Err(KeyError::InvalidCharacter));
        assert_eq!(IdempotencyKey::parse(b"a\x01b"), Err(KeyError::InvalidCharacter));
        assert_eq!(IdempotencyKey::parse(b"a b"), Err(KeyError::InvalidCharacter));
        assert_eq!(IdempotencyKey::parse(b"\"a b\""), Err(KeyError::InvalidCharacter));
        assert_eq!(IdempotencyKey::parse(b"\"abc"), Err(KeyError::MalformedQuotes));
        assert_eq!(IdempotencyKey::parse(b"\"a\"b\""), Err(KeyError::MalformedQuotes));
        assert_eq!(IdempotencyKey::parse(br#""a\b""#), Err(KeyError::MalformedQuotes));
        assert_eq!(IdempotencyKey::parse(b"\""), Err(KeyError::MalformedQuotes));
    }

    #[test]
    fn two_fields_are_refused() {
        let name = HeaderName::from_static("idempotency-key");
        let mut headers = HeaderMap::new();
        headers.append(&name, "a".parse().unwrap());
        headers.append(&name, "a".parse().unwrap());
        assert_eq!(IdempotencyKey::from_headers(&headers, &name), Err(KeyError::Repeated));
    }

    #[test]
    fn identity_separates_namespace_scope_and_key() {
        let k = |s: &str| s.parse::<IdempotencyKey>().unwrap();
        // Length prefixes keep ("ab", "c") and ("a", "bc") apart.
        assert_ne!(RecordId::new("", &Scope::new("ab"), &k("c")), RecordId::new("", &Scope::new("a"), &k("bc")));
        assert_ne!(RecordId::new("x", &Scope::anonymous(), &k("c")), RecordId::new("", &Scope::anonymous(), &k("c")));
    }

    #[test]
    fn debug_output_never_shows_the_key_or_scope() {
        let key: IdempotencyKey = "secret-key".parse().unwrap();
        assert!(!format!("{key:?}").contains("secret"));
        assert!(!format!("{:?}", Scope::new("tenant-secret")).contains("secret"));
    }
}
