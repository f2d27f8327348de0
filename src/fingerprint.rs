//! What a request asks for, reduced to a SHA-256, so a key reused for a
//! different payload is caught.

use std::fmt;

use http::{HeaderName, request::Parts};
use sha2::{Digest, Sha256};

/// SHA-256 over the method, path and query, the chosen headers and the body.
///
/// # Example
/// ```
/// use tower_idempotency::Fingerprint;
///
/// let (parts, ()) = http::Request::post("/v1/charges?x=1").body(()).unwrap().into_parts();
/// let a = Fingerprint::of(&parts, &[], b"amount=100");
/// let b = Fingerprint::of(&parts, &[], b"amount=200");
/// assert_ne!(a, b);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Fingerprints a request from its head and its whole body. Every part is
    /// length-prefixed, so no two different requests hash the same input.
    /// Each header in `headers` counts with all its values, in order; an
    /// absent header counts as absent, not as empty.
    ///
    /// # Example
    /// ```
    /// use http::header::CONTENT_TYPE;
    /// use tower_idempotency::Fingerprint;
    ///
    /// let json = http::Request::post("/").header(CONTENT_TYPE, "application/json").body(()).unwrap();
    /// let form = http::Request::post("/").header(CONTENT_TYPE, "application/x-www-form-urlencoded").body(()).unwrap();
    /// let (json, form) = (json.into_parts().0, form.into_parts().0);
    /// assert_ne!(Fingerprint::of(&json, &[CONTENT_TYPE], b"{}"), Fingerprint::of(&form, &[CONTENT_TYPE], b"{}"));
    /// assert_eq!(Fingerprint::of(&json, &[], b"{}"), Fingerprint::of(&form, &[], b"{}"));
    /// ```
    pub fn of(parts: &Parts, headers: &[HeaderName], body: &[u8]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"tower-idempotency/fingerprint/v1");
        let mut part = |bytes: &[u8]| {
            hasher.update((bytes.len() as u64).to_be_bytes());
            hasher.update(bytes);
        };
        part(parts.method.as_str().as_bytes());
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        part(target.as_bytes());
        for name in headers {
            part(name.as_str().as_bytes());
            let values = parts.headers.get_all(name);
            part(&(values.iter().count() as u64).to_be_bytes());
            for value in values {
                part(value.as_bytes());
            }
        }
        part(body);
        Self(hasher.finalize().into())
    }

    /// A fingerprint from its 32 raw bytes, as a store read it back.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::Fingerprint;
    /// assert_eq!(Fingerprint::from_bytes([1; 32]).as_bytes(), &[1; 32]);
    /// ```
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes of the fingerprint.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::Fingerprint;
    /// assert_eq!(Fingerprint::from_bytes([0; 32]).as_bytes().len(), 32);
    /// ```
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", crate::key::hex(&self.0[..8]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str) -> Parts {
        http::Request::builder().method(method).uri(uri).body(()).unwrap().into_parts().0
    }

    #[test]
    fn method_path_query_and_body_all_count() {
        let base = Fingerprint::of(&parts("POST", "/a?q=1"), &[], b"x");
        assert_eq!(base, Fingerprint::of(&parts("POST", "/a?q=1"), &[], b"x"));
        assert_ne!(base, Fingerprint::of(&parts("PATCH", "/a?q=1"), &[], b"x"));
        assert_ne!(base, Fingerprint::of(&parts("POST", "/b?q=1"), &[], b"x"));
        assert_ne!(base, Fingerprint::of(&parts("POST", "/a?q=2"), &[], b"x"));
        assert_ne!(base, Fingerprint::of(&parts("POST", "/a?q=1"), &[], b"y"));
    }

    #[test]
    fn absent_header_differs_from_empty_header() {
        let name = HeaderName::from_static("x-h");
        let bare = parts("POST", "/");
        let mut empty = parts("POST", "/");
        empty.headers.insert(&name, "".parse().unwrap());
        assert_ne!(
            Fingerprint::of(&bare, std::slice::from_ref(&name), b""),
            Fingerprint::of(&empty, std::slice::from_ref(&name), b"")
        );
    }
}
