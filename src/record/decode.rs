//! Decoding a record: every part of it checked, and no length or count a
//! store holds can make the decoder allocate or panic.

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::{DecodeError, FINGERPRINT, KIND_NOT_STORED, KIND_RESPONSE, NotStored, StoredResponse, VERSION};

/// Reads a whole record, checking every part of it: its response, or why
/// it has none.
pub(super) fn read(bytes: Bytes) -> Result<Result<StoredResponse, NotStored>, DecodeError> {
    let mut input = Reader(bytes);
    let version = input.u8()?;
    if version != VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    let kind = input.u8()?;
    input.skip(FINGERPRINT.len())?;
    let read = match kind {
        KIND_NOT_STORED => Err(NotStored::from_code(input.u8()?)?),
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
            Ok(StoredResponse::new(status, headers, body, trailers))
        }
        _ => return Err(DecodeError::Malformed("unknown record kind")),
    };
    if !input.0.is_empty() {
        return Err(DecodeError::Malformed("trailing bytes"));
    }
    Ok(read)
}

struct Reader(Bytes);

impl Reader {
    // Moving on (`advance`) touches no reference count; only what the
    // record hands out (`take`: header values, the body) shares the buffer.
    fn u8(&mut self) -> Result<u8, DecodeError> {
        let first = *self.0.first().ok_or(DecodeError::Truncated)?;
        self.0.advance(1);
        Ok(first)
    }

    fn skip(&mut self, len: usize) -> Result<(), DecodeError> {
        if len > self.0.len() {
            return Err(DecodeError::Truncated);
        }
        self.0.advance(len);
        Ok(())
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
        let too_many = |_| DecodeError::Malformed("more headers than a header map holds");
        let count = self.len()?;
        // Room for a replay's marker and the `content-length` axum adds: no regrowth.
        let mut headers = HeaderMap::try_with_capacity(count + 2).map_err(too_many)?;
        for _ in 0..count {
            let len = self.len()?;
            let name = HeaderName::from_bytes(&self.0[..len]).map_err(|_| DecodeError::Malformed("header name"))?;
            self.skip(len)?;
            let len = self.len()?;
            let value = self.take(len)?;
            let value = HeaderValue::from_maybe_shared(value).map_err(|_| DecodeError::Malformed("header value"))?;
            headers.try_append(name, value).map_err(too_many)?;
        }
        Ok(headers)
    }
}

#[cfg(test)]
mod tests {
    use super::{super::put_varint, *};
    use crate::Record;

    /// A response record with `count` headers named by `name`, each empty.
    fn with_headers(count: u64, name: impl Fn(u64) -> String) -> Bytes {
        let mut out = vec![VERSION, KIND_RESPONSE];
        out.extend_from_slice(&[0; 32]);
        out.extend_from_slice(&200u16.to_be_bytes());
        put_varint(&mut out, count);
        for n in 0..count {
            let name = name(n);
            put_varint(&mut out, name.len() as u64);
            out.extend_from_slice(name.as_bytes());
            put_varint(&mut out, 0);
        }
        out.extend_from_slice(&[0, 0]);
        Bytes::from(out)
    }

    #[test]
    fn a_replayed_response_has_room_for_its_marker_and_content_length() {
        for count in 0..8 {
            let response = Record::decode(with_headers(count, |n| format!("h{n}"))).unwrap().into_response().unwrap();
            let (_, headers, _, _) = response.into_parts();
            assert!(headers.capacity() >= headers.len() + 2, "{} of {}", headers.len(), headers.capacity());
        }
    }

    #[test]
    fn more_headers_than_a_header_map_holds_decode_to_an_error() {
        // Past http's limits: its capacity (about 24,575 and up) and its
        // distinct names (32,768).
        for (count, distinct) in [(30_000, false), (40_000, true)] {
            let bytes = with_headers(count, |n| if distinct { format!("h{n}") } else { "h".to_owned() });
            let decoded = Record::decode(bytes);
            assert!(matches!(decoded, Err(DecodeError::Malformed(_))), "{count} headers: {decoded:?}");
        }
    }
}
