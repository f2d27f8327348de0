//! What the store keeps for a finished request, and its compact binary form.

mod decode;

use std::fmt;

use bytes::{BufMut, Bytes};
use http::{HeaderMap, HeaderName, StatusCode};

use self::decode::read;
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
    /// The recorded response could not be read back: it had a header value
    /// made with the unsafe `HeaderValue::from_maybe_shared_unchecked` that
    /// is not a valid one (`http` checks that only in debug builds). Safe
    /// code cannot make such a record.
    Unreadable,
}

impl NotStored {
    fn code(self) -> u8 {
        match self {
            Self::TooLarge => 0,
            Self::BodyFailed => 1,
            Self::StoreFull => 2,
            Self::Unreadable => 3,
        }
    }

    fn from_code(code: u8) -> Result<Self, DecodeError> {
        Ok(match code {
            0 => Self::TooLarge,
            1 => Self::BodyFailed,
            2 => Self::StoreFull,
            3 => Self::Unreadable,
            _ => return Err(DecodeError::Malformed("unknown not-stored reason")),
        })
    }
}

/// What the store keeps for a completed request, in its compact binary
/// form: one buffer holding the fingerprint, then the status, headers,
/// trailers and body, so that keeping or cloning a record allocates nothing
/// per header, and a store writes it out as it is.
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
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    /// Always well framed: every way to make a record writes or checks it.
    /// (Its header values read back too, unless one was made unchecked:
    /// see [`NotStored::Unreadable`].)
    encoded: Bytes,
}

/// Where the fingerprint sits in an encoded record: after the version and
/// kind bytes.
const FINGERPRINT: std::ops::Range<usize> = 2..34;

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
        let headers = HeaderSection::of(&response.headers, |_| true);
        Self::recorded(fingerprint, response.status, &headers, response.trailers.as_ref(), &[response.body])
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
        let mut out = Vec::with_capacity(FINGERPRINT.end + 1);
        out.put_u8(VERSION);
        out.put_u8(KIND_NOT_STORED);
        out.put_slice(fingerprint.as_bytes());
        out.put_u8(reason.code());
        Self { encoded: Bytes::from(out) }
    }

    /// The record of a response whose end-to-end headers are already
    /// encoded, its body in `chunks`: the one copy of the body into the
    /// record, into a buffer of the exact size.
    pub(crate) fn recorded(
        fingerprint: Fingerprint,
        status: StatusCode,
        headers: &HeaderSection,
        trailers: Option<&HeaderMap>,
        chunks: &[Bytes],
    ) -> Self {
        let body_len: usize = chunks.iter().map(Bytes::len).sum();
        let trailers = trailers.map(|trailers| HeaderSection::of(trailers, |_| true));
        let len = FINGERPRINT.end
            + 2
            + headers.0.len()
            + 1
            + trailers.as_ref().map_or(0, |t| t.0.len())
            + varint_len(body_len as u64)
            + body_len;
        let mut out = Vec::with_capacity(len);
        out.put_u8(VERSION);
        out.put_u8(KIND_RESPONSE);
        out.put_slice(fingerprint.as_bytes());
        out.put_u16(status.as_u16());
        out.put_slice(&headers.0);
        match &trailers {
            None => out.put_u8(0),
            Some(trailers) => {
                out.put_u8(1);
                out.put_slice(&trailers.0);
            }
        }
        put_varint(&mut out, body_len as u64);
        for chunk in chunks {
            out.put_slice(chunk);
        }
        debug_assert_eq!(out.len(), len);
        Self { encoded: Bytes::from(out) }
    }

    /// A copy of the record in a buffer of its own, which leaves this one
    /// unshared.
    pub(crate) fn copied(&self) -> Self {
        Self { encoded: Bytes::copy_from_slice(&self.encoded) }
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
        let mut bytes = [0; 32];
        bytes.copy_from_slice(&self.encoded[FINGERPRINT]);
        Fingerprint::from_bytes(bytes)
    }

    /// A copy of the stored response, if there is one (the body and header
    /// values share the record's buffer; nothing of them is copied).
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{Fingerprint, NotStored, Record};
    /// assert!(Record::not_stored(Fingerprint::from_bytes([0; 32]), NotStored::TooLarge).response().is_none());
    /// ```
    pub fn response(&self) -> Option<StoredResponse> {
        self.clone().into_response().ok()
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
        match self.encoded[1] {
            KIND_NOT_STORED => NotStored::from_code(self.encoded[FINGERPRINT.end]).ok(),
            _ => None,
        }
    }

    /// The stored response, read out of the record: its body and header
    /// values share the record's buffer.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{Fingerprint, Record, StoredResponse};
    /// let response = StoredResponse::new(http::StatusCode::OK, Default::default(), "x".into(), None);
    /// let record = Record::new(Fingerprint::from_bytes([0; 32]), response.clone());
    /// assert_eq!(record.into_response(), Ok(response));
    /// ```
    pub fn into_response(self) -> Result<StoredResponse, NotStored> {
        // A record is checked when decoded, and written from valid parts
        // otherwise; only a header value made unchecked can fail here.
        read(self.encoded).unwrap_or(Err(NotStored::Unreadable))
    }

    /// The length of [`Record::encode`]'s output.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{Fingerprint, Record, StoredResponse};
    /// let response = StoredResponse::new(http::StatusCode::OK, Default::default(), vec![0u8; 1024].into(), None);
    /// let record = Record::new(Fingerprint::from_bytes([0; 32]), response);
    /// assert_eq!(record.encoded_len(), record.encode().len());
    /// ```
    pub fn encoded_len(&self) -> usize {
        self.encoded.len()
    }

    /// The record's compact form: a version byte, the fingerprint, then
    /// length-prefixed fields; the body is stored as raw bytes, last. It is
    /// what the record holds, so this copies nothing.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::{Fingerprint, Record, StoredResponse};
    /// let response = StoredResponse::new(http::StatusCode::OK, Default::default(), vec![0u8; 1024].into(), None);
    /// let encoded = Record::new(Fingerprint::from_bytes([0; 32]), response).encode();
    /// assert!(encoded.len() < 1024 + 48);
    /// ```
    pub fn encode(&self) -> Bytes {
        self.encoded.clone()
    }

    /// Checks what [`Record::encode`] wrote and makes it a record again.
    /// Never panics, whatever the bytes; the record keeps `bytes` as they are.
    ///
    /// # Example
    /// ```
    /// # use tower_idempotency::Record;
    /// assert!(Record::decode(bytes::Bytes::new()).is_err());
    /// ```
    pub fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        // The response read here only proves that the bytes are whole.
        let _checked = read(bytes.clone())?;
        Ok(Self { encoded: bytes })
    }
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut record = f.debug_struct("Record");
        record.field("fingerprint", &self.fingerprint());
        match self.not_stored_reason() {
            Some(reason) => record.field("not_stored", &reason),
            None => {
                let status = &self.encoded[FINGERPRINT.end..FINGERPRINT.end + 2];
                record.field("status", &u16::from_be_bytes([status[0], status[1]]))
            }
        };
        record.field("encoded_len", &self.encoded.len()).finish()
    }
}

/// A header section in the record's encoding: a count, then each name and
/// value, length-prefixed.
pub(crate) struct HeaderSection(Vec<u8>);

impl HeaderSection {
    /// The encoding of the headers of `headers` that `keep` keeps.
    pub(crate) fn of(headers: &HeaderMap, keep: impl Fn(&HeaderName) -> bool) -> Self {
        let kept = || headers.iter().filter(|(name, _)| keep(name));
        let (count, len) = kept().fold((0u64, 0usize), |(count, len), (name, value)| {
            let (n, v) = (name.as_str().len(), value.len());
            (count + 1, len + varint_len(n as u64) + n + varint_len(v as u64) + v)
        });
        let mut out = Vec::with_capacity(varint_len(count) + len);
        put_varint(&mut out, count);
        for (name, value) in kept() {
            put_varint(&mut out, name.as_str().len() as u64);
            out.put_slice(name.as_str().as_bytes());
            put_varint(&mut out, value.len() as u64);
            out.put_slice(value.as_bytes());
        }
        Self(out)
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

fn put_varint(out: &mut impl BufMut, mut value: u64) {
    while value >= 0x80 {
        out.put_u8((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.put_u8(value as u8);
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
    fn a_record_that_does_not_read_back_is_unreadable_not_a_panic() {
        // As a header value made with `from_maybe_shared_unchecked` (in a
        // release build, where it is not checked) would be written.
        let mut headers = HeaderMap::new();
        headers.insert("x-ok", "fine".parse().unwrap());
        let response = StoredResponse::new(StatusCode::OK, headers, Bytes::from_static(b"paid"), None);
        let mut bytes = Record::new(Fingerprint::from_bytes([1; 32]), response).encode().to_vec();
        let at = bytes.windows(4).position(|w| w == b"fine").unwrap();
        bytes[at + 2] = b'\n';
        let record = Record { encoded: Bytes::from(bytes.clone()) };
        assert_eq!(record.into_response(), Err(NotStored::Unreadable));
        assert!(Record::decode(Bytes::from(bytes)).is_err(), "decoding refuses it outright");
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
