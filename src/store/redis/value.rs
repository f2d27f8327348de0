//! The values a record's Redis key holds while in flight: their layout,
//! how a claim writes one, and how a claim's reply reads.

use bytes::Bytes;

use crate::{
    FencingToken, Fingerprint, Record,
    store::{Claim, OwnerToken, StoreError},
};

use super::owner_bytes;

pub(super) const IN_FLIGHT: u8 = b'F';

/// The in-flight value a claim of `owner` writes: `F`, the owner, the
/// fingerprint, a zero waiter count, and the token in decimal (claim.lua,
/// a take-over of a completed record), or none (every other claim).
pub(super) fn in_flight_value(owner: OwnerToken, fingerprint: Fingerprint, token: Option<u64>) -> Vec<u8> {
    let mut value = Vec::with_capacity(50 + 20);
    value.push(IN_FLIGHT);
    value.extend_from_slice(&owner_bytes(owner));
    value.extend_from_slice(fingerprint.as_bytes());
    value.push(0);
    if let Some(token) = token {
        value.extend_from_slice(token.to_string().as_bytes());
    }
    value
}

/// Parses an in-flight value: `F`, owner (16), fingerprint (32), waiter
/// count (1 byte, below 48), then the token in decimal, which only a
/// scripted take-over writes (none reads as `None`). Values written before
/// the waiter count existed have none: their next byte is a digit.
pub(super) fn parse_in_flight(value: &[u8]) -> Result<(Fingerprint, Option<FencingToken>), StoreError> {
    let corrupt = || StoreError::Corrupt(crate::DecodeError::Malformed("in-flight value"));
    if value.len() < 50 || value[0] != IN_FLIGHT {
        return Err(corrupt());
    }
    let mut fingerprint = [0; 32];
    fingerprint.copy_from_slice(&value[17..49]);
    let token = if value[49] < b'0' { &value[50..] } else { &value[49..] };
    if token.is_empty() && value.len() == 50 {
        return Ok((Fingerprint::from_bytes(fingerprint), None));
    }
    let token = std::str::from_utf8(token).ok().and_then(|t| t.parse().ok()).ok_or_else(corrupt)?;
    Ok((Fingerprint::from_bytes(fingerprint), Some(FencingToken::new(token))))
}

/// What a claim found instead of acquiring: an in-flight value, or a
/// completed record.
pub(super) fn found(value: Vec<u8>) -> Result<Claim, StoreError> {
    if value.first() == Some(&IN_FLIGHT) {
        return Ok(Claim::InFlight { fingerprint: parse_in_flight(&value)?.0 });
    }
    Ok(Claim::Completed(Record::decode(Bytes::from(value))?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_values_read_with_and_without_a_waiter_count() {
        let head = [&b"F"[..], &[7; 16], &[9; 32]].concat();
        let counted = [&head[..], &[3], b"42"].concat();
        let uncounted = [&head[..], b"42"].concat();
        for value in [counted, uncounted] {
            let (fingerprint, token) = parse_in_flight(&value).unwrap();
            assert_eq!((fingerprint, token), (Fingerprint::from_bytes([9; 32]), Some(FencingToken::new(42))));
        }
        // A claim without a script writes none.
        let (_, token) = parse_in_flight(&[&head[..], &[3]].concat()).unwrap();
        assert_eq!(token, None);
        assert!(parse_in_flight(&head).is_err(), "no waiter count either");
        assert!(parse_in_flight(&[&head[..], b"4x"].concat()).is_err(), "not a number");
    }
}
