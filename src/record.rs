//! What the store keeps for a finished request, and its compact binary form.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::Fingerprint;

const VERSION: u8 = 1;
const KIND_RESPONSE: u8 = 0;
const KIND_NOT_STORED: u8 = 1;

/// A recorded response: status, headers, body and trailers, replayed byte for
/// byte to later duplicates.
///
/// # Example
/// ```
/// use bytes::Bytes;
/// use http::{HeaderMap, StatusCode};
/// use tower_idempotency::StoredResponse;
///
/// let response = StoredResponse::new(StatusCode::CREATED, HeaderMap::new(), Bytes::from("{}"), None);
/// assert_eq!(response.status(), StatusCode::CREATED);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl StoredResponse {
    /// A response to store.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::StoredResponse;
    /// let r = StoredResponse::new(http::StatusCode::OK, Default::default(), "hi".into(), None);
    /// assert_eq!(r.body(), "hi");
    /// ```
    pub fn new(status: StatusCode, headers: HeaderMap, body: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self { status, headers, body, trailers }
    }

    /// The status code.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::StoredResponse;
    /// # let r = StoredResponse::new(http::StatusCode::OK, Default::default(), "".into(), None);
    /// assert!(r.status().is_success());
    /// ```
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The headers, hop-by-hop ones already removed.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::StoredResponse;
    /// # let r = StoredResponse::new(http::StatusCode::OK, Default::default(), "".into(), None);
    /// assert!(r.headers().is_empty());
    /// ```
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The whole body.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::StoredResponse;
    /// # let r = StoredResponse::new(http::StatusCode::OK, Default::default(), "abc".into(), None);
    /// assert_eq!(r.body().len(), 3);
    /// ```
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The trailers, if the response had any (gRPC's `grpc-status` lives here).
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::StoredResponse;
    /// # let r = StoredResponse::new(http::StatusCode::OK, Default::default(), "".into(), None);
    /// assert!(r.trailers().is_none());
    /// ```
    pub fn trailers(&self) -> Option<&HeaderMap> {
        self.trailers.as_ref()
    }

    /// Takes the response apart: status, headers, body, trailers.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::StoredResponse;
    /// # let r = StoredResponse::new(http::StatusCode::OK, Default::default(), "x".into(), None);
    /// let (status, _headers, body, trailers) = r.into_parts();
    /// assert_eq!((status.as_u16(), &body[..], trailers), (200, &b"x"[..], None));
    /// ```
    pub fn into_parts(self) -> (StatusCode, HeaderMap, Bytes, Option<HeaderMap>) {
        (self.status, self.headers, self.body, self.trailers)
    }
}

/// Why a finished request has no replayable response.
///
/// Duplicates of such a record get a `response-not-stored` rejection (410):
/// the request ran, so running it again would be a second execution.
///
/// # Example
/// ```
/// use tower_idempotency::{Fingerprint, NotStored, Record};
///
/// let record = Record::not_stored(Fingerprint::from_bytes([0; 32]), NotStored::TooLarge);
/// assert_eq!(record.not_stored_reason(), Some(NotStored::TooLarge));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotStored {
    /// The response was larger than the storage cap.
    TooLarge,
    /// The response body failed while it streamed.
    BodyFailed,
    /// The store refused the full record (it was full).
    StoreFull,
}

impl NotStored {
    fn code(self) -> u8 {
        match self {
            Self::TooLarge => 0,
            Self::BodyFailed => 1,
            Self::StoreFull => 2,
        }
    }

    fn from_code(code: u8) -> Result<Self, DecodeError> {
        Ok(match code {
            0 => Self::TooLarge,
            1 => Self::BodyFailed,
            2 => Self::StoreFull,
            _ => return Err(DecodeError::Malformed("unknown not-stored reason")),
        })
    }
}

/// What the store keeps for a completed request.
///
/// # Example
/// ```
/// use tower_idempotency::{Fingerprint, Record, StoredResponse};
///
/// let response = StoredResponse::new(http::StatusCode::OK, Default::default(), "paid".into(), None);
/// let record = Record::new(Fingerprint::from_bytes([9; 32]), response);
/// let decoded = Record::decode(record.encode()).unwrap();
/// assert_eq!(decoded, record);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    fingerprint: Fingerprint,
    outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// Shared, so that cloning a record (a store handing one out, the
    /// layer keeping one to retry its completion) copies nothing.
    Response(Arc<StoredResponse>),
    NotStored(NotStored),
}

/// A stored record could not be decoded.
///
/// # Example
/// ```
/// use tower_idempotency::Record;
///
/// assert!(Record::decode(bytes::Bytes::from_static(b"\x07junk")).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes end before the record does.
    #[error("record is truncated")]
    Truncated,
    /// The record was written by an unknown format version.
    #[error("unknown record format version {0}")]
    UnknownVersion(u8),
    /// The record is not well formed.
    #[error("malformed record: {0}")]
    Malformed(&'static str),
}

impl Record {
    /// A record holding the response to replay.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{Fingerprint, Record, StoredResponse};
    /// let response = StoredResponse::new(http::StatusCode::OK, Default::default(), "".into(), None);
    /// assert!(Record::new(Fingerprint::from_bytes([0; 32]), response).response().is_some());
    /// ```
    pub fn new(fingerprint: Fingerprint, response: StoredResponse) -> Self {
        Self { fingerprint, outcome: Outcome::Response(Arc::new(response)) }
    }

    /// A record of a request that ran but whose response was not kept.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{Fingerprint, NotStored, Record};
    /// let record = Record::not_stored(Fingerprint::from_bytes([0; 32]), NotStored::BodyFailed);
    /// assert!(record.response().is_none());
    /// ```
    pub fn not_stored(fingerprint: Fingerprint, reason: NotStored) -> Self {
        Self { fingerprint, outcome: Outcome::NotStored(reason) }
    }

    /// The fingerprint of the request that made this record.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{Fingerprint, NotStored, Record};
    /// let fp = Fingerprint::from_bytes([3; 32]);
    /// assert_eq!(Record::not_stored(fp, NotStored::TooLarge).fingerprint(), fp);
    /// ```
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The stored response, if there is one.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{Fingerprint, NotStored, Record};
    /// assert!(Record::not_stored(Fingerprint::from_bytes([0; 32]), NotStored::TooLarge).response().is_none());
    /// ```
    pub fn response(&self) -> Option<&StoredResponse> {
        match &self.outcome {
            Outcome::Response(response) => Some(response),
            Outcome::NotStored(_) => None,
        }
    }

    /// Why there is no stored response, if there is none.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{Fingerprint, NotStored, Record};
    /// let r = Record::not_stored(Fingerprint::from_bytes([0; 32]), NotStored::StoreFull);
    /// assert_eq!(r.not_stored_reason(), Some(NotStored::StoreFull));
    /// ```
    pub fn not_stored_reason(&self) -> Option<NotStored> {
        match &self.outcome {
            Outcome::Response(_) => None,
            Outcome::NotStored(reason) => Some(*reason),
        }
    }

    /// Takes the stored response out of the record (a copy of its headers
    /// when another clone of the record still holds them; the body is
    /// never copied).
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{Fingerprint, Record, StoredResponse};
    /// let response = StoredResponse::new(http::StatusCode::OK, Default::default(), "x".into(), None);
    /// let record = Record::new(Fingerprint::from_bytes([0; 32]), response.clone());
    /// assert_eq!(record.into_response(), Ok(response));
    /// ```
    pub fn into_response(self) -> Result<StoredResponse, NotStored> {
        match self.outcome {
            Outcome::Response(response) => Ok(Arc::unwrap_or_clone(response)),
            Outcome::NotStored(reason) => Err(reason),
        }
    }

    /// The exact length of [`Record::encode`]'s output, without encoding.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{Fingerprint, Record, StoredResponse};
    /// let response = StoredResponse::new(http::StatusCode::OK, Default::default(), vec![0u8; 1024].into(), None);
    /// let record = Record::new(Fingerprint::from_bytes([0; 32]), response);
    /// assert_eq!(record.encoded_len(), record.encode().len());
    /// ```
    pub fn encoded_len(&self) -> usize {
        let head = 2 + 32;
        match &self.outcome {
            Outcome::NotStored(_) => head + 1,
            Outcome::Response(r) => {
                head + 2
                    + headers_len(&r.headers)
                    + 1
                    + r.trailers.as_ref().map_or(0, headers_len)
                    + varint_len(r.body.len() as u64)
                    + r.body.len()
            }
        }
    }

    /// Encodes the record compactly: a version byte, the fingerprint, then
    /// length-prefixed fields; the body is stored as raw bytes, last.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{Fingerprint, Record, StoredResponse};
    /// let response = StoredResponse::new(http::StatusCode::OK, Default::default(), vec![0u8; 1024].into(), None);
    /// let encoded = Record::new(Fingerprint::from_bytes([0; 32]), response).encode();
    /// assert!(encoded.len() < 1024 + 48);
    /// ```
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        out.put_u8(VERSION);
        match &self.outcome {
            Outcome::NotStored(reason) => {
                out.put_u8(KIND_NOT_STORED);
                out.put_slice(self.fingerprint.as_bytes());
                out.put_u8(reason.code());
            }
            Outcome::Response(r) => {
                out.put_u8(KIND_RESPONSE);
                out.put_slice(self.fingerprint.as_bytes());
                out.put_u16(r.status.as_u16());
                put_headers(&mut out, &r.headers);
                match &r.trailers {
                    None => out.put_u8(0),
                    Some(trailers) => {
                        out.put_u8(1);
                        put_headers(&mut out, trailers);
                    }
                }
                put_varint(&mut out, r.body.len() as u64);
                out.put_slice(&r.body);
            }
        }
        out.freeze()
    }

    /// Decodes what [`Record::encode`] wrote. Never panics, whatever the
    /// bytes; the body and header values share `bytes`' buffer.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::Record;
    /// assert!(Record::decode(bytes::Bytes::new()).is_err());
    /// ```
    pub fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        let mut input = Reader(bytes);
        let version = input.u8()?;
        if version != VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let kind = input.u8()?;
        let mut fingerprint = [0; 32];
        fingerprint.copy_from_slice(&input.take(32)?);
        let fingerprint = Fingerprint::from_bytes(fingerprint);
        let outcome = match kind {
            KIND_NOT_STORED => Outcome::NotStored(NotStored::from_code(input.u8()?)?),
            KIND_RESPONSE => {
                let status = u16::from_be_bytes([input.u8()?, input.u8()?]);
                let status = StatusCode::from_u16(status).map_err(|_| DecodeError::Malformed("status code"))?;
                let headers = input.headers()?;
                let trailers = match input.u8()? {
                    0 => None,
                    1 => Some(input.headers()?),
                    _ => return Err(DecodeError::Malformed("trailer flag")),
                };
                let len = input.len()?;
                let body = input.take(len)?;
                Outcome::Response(Arc::new(StoredResponse { status, headers, body, trailers }))
            }
            _ => return Err(DecodeError::Malformed("unknown record kind")),
        };
        if !input.0.is_empty() {
            return Err(DecodeError::Malformed("trailing bytes"));
        }
        Ok(Self { fingerprint, outcome })
    }
}

fn headers_len(headers: &HeaderMap) -> usize {
    varint_len(headers.len() as u64)
        + headers
            .iter()
            .map(|(name, value)| {
                let (n, v) = (name.as_str().len(), value.len());
                varint_len(n as u64) + n + varint_len(v as u64) + v
            })
            .sum::<usize>()
}

fn put_headers(out: &mut BytesMut, headers: &HeaderMap) {
    put_varint(out, headers.len() as u64);
    for (name, value) in headers {
        put_varint(out, name.as_str().len() as u64);
        out.put_slice(name.as_str().as_bytes());
        put_varint(out, value.len() as u64);
        out.put_slice(value.as_bytes());
    }
}

fn varint_len(mut value: u64) -> usize {
    let mut len = 1;
    while value >= 0x80 {
        value >>= 7;
        len += 1;
    }
    len
}

fn put_varint(out: &mut BytesMut, mut value: u64) {
    while value >= 0x80 {
        out.put_u8((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.put_u8(value as u8);
}

struct Reader(Bytes);

impl Reader {
    fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&first, _) = self.0.split_first().ok_or(DecodeError::Truncated)?;
        self.0 = self.0.slice(1..);
        Ok(first)
    }

    fn take(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        if len > self.0.len() {
            return Err(DecodeError::Truncated);
        }
        Ok(self.0.split_to(len))
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(DecodeError::Malformed("varint overflows"));
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::Malformed("varint too long"))
    }

    /// A length that must fit in what is left, so a hostile length can
    /// never make the decoder allocate.
    fn len(&mut self) -> Result<usize, DecodeError> {
        let len = self.varint()?;
        usize::try_from(len).ok().filter(|&len| len <= self.0.len()).ok_or(DecodeError::Truncated)
    }

    fn headers(&mut self) -> Result<HeaderMap, DecodeError> {
        let count = self.len()?;
        let mut headers = HeaderMap::with_capacity(count);
        for _ in 0..count {
            let len = self.len()?;
            let name = self.take(len)?;
            let name = HeaderName::from_bytes(&name).map_err(|_| DecodeError::Malformed("header name"))?;
            let len = self.len()?;
            let value = self.take(len)?;
            let value = HeaderValue::from_maybe_shared(value).map_err(|_| DecodeError::Malformed("header value"))?;
            headers.append(name, value);
        }
        Ok(headers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/json".parse().unwrap());
        headers.append("set-cookie", "a=1".parse().unwrap());
        headers.append("set-cookie", "b=2".parse().unwrap());
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let body = Bytes::from((0..=255u8).cycle().take(3000).collect::<Vec<_>>());
        let response = StoredResponse::new(StatusCode::CREATED, headers, body, Some(trailers));
        Record::new(Fingerprint::from_bytes([5; 32]), response)
    }

    #[test]
    fn round_trips_with_repeated_headers_and_trailers() {
        let record = sample();
        let encoded = record.encode();
        assert_eq!(encoded.len(), record.encoded_len());
        assert_eq!(Record::decode(encoded).unwrap(), record);
    }

    #[test]
    fn body_is_raw_bytes_not_text() {
        let record = sample();
        let response = record.response().unwrap();
        let encoded = record.encode();
        assert!(encoded.ends_with(response.body()), "the body is stored as is, last");
        let text: usize = [response.headers(), response.trailers().unwrap()]
            .iter()
            .flat_map(|map| map.iter())
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        let framing = encoded.len() - response.body().len() - text;
        assert!(framing <= 50, "{framing} bytes of framing");
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let encoded = sample().encode();
        for len in 0..encoded.len() {
            assert!(Record::decode(encoded.slice(..len)).is_err(), "prefix of {len} bytes decoded");
        }
    }

    #[test]
    fn corrupted_bytes_never_panic() {
        let encoded = sample().encode().to_vec();
        for i in 0..encoded.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut corrupt = encoded.clone();
                corrupt[i] ^= flip;
                let _ = Record::decode(Bytes::from(corrupt));
            }
        }
    }

    #[test]
    fn huge_declared_lengths_are_refused() {
        let mut bytes = vec![VERSION, KIND_RESPONSE];
        bytes.extend([0; 32]);
        bytes.extend(200u16.to_be_bytes());
        bytes.extend([0xff, 0xff, 0xff, 0xff, 0x0f]); // header count ~ 4 billion
        assert_eq!(Record::decode(Bytes::from(bytes)), Err(DecodeError::Truncated));
    }
}
