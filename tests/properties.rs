//! Hostile input, as properties: key parsing accepts exactly the SPEC's
//! grammar, records decode without panicking whatever the bytes, encoding
//! round-trips, and distinct (scope, key) pairs never share a store name.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use proptest::prelude::*;
use tower_idempotency::{Fingerprint, IdempotencyKey, NotStored, Record, RecordId, Scope, StoredResponse};

/// The SPEC's grammar, written out plainly: optional spaces or tabs around
/// the value; a bare token, or an RFC 8941 string in quotes with `\"` and
/// `\\` escapes; after unquoting, 1 to 255 bytes of visible ASCII.
fn spec_key(raw: &[u8]) -> Option<String> {
    let text: Vec<u8> = {
        let start = raw.iter().position(|b| *b != b' ' && *b != b'\t').unwrap_or(raw.len());
        let end = raw.iter().rposition(|b| *b != b' ' && *b != b'\t').map_or(start, |i| i + 1);
        raw[start..end.max(start)].to_vec()
    };
    let unquoted = if text.first() == Some(&b'"') {
        if text.len() < 2 || text.last() != Some(&b'"') {
            return None;
        }
        let mut out = Vec::new();
        let mut escaped = false;
        for &b in &text[1..text.len() - 1] {
            if escaped {
                if b != b'"' && b != b'\\' {
                    return None;
                }
                out.push(b);
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                return None;
            } else {
                out.push(b);
            }
        }
        if escaped {
            return None;
        }
        out
    } else {
        text
    };
    let visible = unquoted.iter().all(|b| (0x21..=0x7e).contains(b));
    (visible && (1..=255).contains(&unquoted.len())).then(|| String::from_utf8(unquoted).unwrap())
}

/// Bytes that are mostly key-like, with quotes, escapes, spaces and
/// control and non-ASCII bytes mixed in.
fn key_like() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        8 => 0x21u8..=0x7e,
        1 => Just(b'"'),
        1 => Just(b'\\'),
        1 => Just(b' '),
        1 => Just(b'\t'),
        1 => any::<u8>(),
    ];
    prop::collection::vec(byte, 0..300)
}

fn header_name() -> impl Strategy<Value = HeaderName> {
    "[a-z][a-z0-9-]{0,20}".prop_map(|name| HeaderName::try_from(name).unwrap())
}

fn header_value() -> impl Strategy<Value = HeaderValue> {
    prop::collection::vec(prop_oneof![0x20u8..=0x7e, Just(b'\t'), 0x80u8..=0xff], 0..60)
        .prop_map(|bytes| HeaderValue::from_bytes(&bytes).unwrap())
}

fn headers() -> impl Strategy<Value = HeaderMap> {
    prop::collection::vec((header_name(), header_value()), 0..8).prop_map(|pairs| {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(name, value);
        }
        map
    })
}

fn record() -> impl Strategy<Value = Record> {
    let fingerprint = any::<[u8; 32]>().prop_map(Fingerprint::from_bytes);
    let response = (100u16..1000, headers(), prop::collection::vec(any::<u8>(), 0..4096), prop::option::of(headers()))
        .prop_map(|(status, headers, body, trailers)| {
            StoredResponse::new(StatusCode::from_u16(status).unwrap(), headers, Bytes::from(body), trailers)
        });
    let not_stored = prop_oneof![
        Just(NotStored::TooLarge),
        Just(NotStored::BodyFailed),
        Just(NotStored::StoreFull),
        Just(NotStored::Unreadable)
    ];
    prop_oneof![
        4 => (fingerprint.clone(), response).prop_map(|(fp, response)| Record::new(fp, response)),
        1 => (fingerprint, not_stored).prop_map(|(fp, reason)| Record::not_stored(fp, reason)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn key_parsing_accepts_exactly_the_spec_grammar(raw in key_like()) {
        let parsed = IdempotencyKey::parse(&raw).ok().map(|key| key.as_str().to_owned());
        prop_assert_eq!(parsed, spec_key(&raw));
    }

    #[test]
    // A value that starts with `"` is read as a quoted string, so bare keys
    // start with any other visible character.
    fn every_visible_ascii_key_is_accepted_bare_and_quoted(key in "[!#-~][!-~]{0,254}") {
        let bare = IdempotencyKey::parse(key.as_bytes()).unwrap();
        prop_assert_eq!(bare.as_str(), key.as_str());
        let quoted = format!("\"{}\"", key.replace('\\', "\\\\").replace('"', "\\\""));
        let unquoted = IdempotencyKey::parse(quoted.as_bytes()).unwrap();
        prop_assert_eq!(unquoted.as_str(), key.as_str());
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Record::decode(Bytes::from(bytes));
    }

    #[test]
    fn decoding_a_corrupted_record_never_panics(record in record(), at in any::<prop::sample::Index>(), flip in 1u8..) {
        let mut bytes = record.encode().to_vec();
        let i = at.index(bytes.len());
        bytes[i] ^= flip;
        let _ = Record::decode(Bytes::from(bytes));
    }

    #[test]
    fn encoding_then_decoding_is_the_identity(record in record()) {
        let encoded = record.encode();
        prop_assert_eq!(encoded.len(), record.encoded_len());
        prop_assert_eq!(Record::decode(encoded).unwrap(), record);
    }

    #[test]
    fn distinct_scope_and_key_pairs_get_distinct_ids(
        scope_a in prop::collection::vec(any::<u8>(), 0..40),
        scope_b in prop::collection::vec(any::<u8>(), 0..40),
        key_a in "[!#-~][!-~]{0,39}",
        key_b in "[!#-~][!-~]{0,39}",
        split in 0usize..40,
    ) {
        let id = |scope: &[u8], key: &str| RecordId::new("", &Scope::new(scope.to_vec()), &key.parse().unwrap());
        if (&scope_a, &key_a) != (&scope_b, &key_b) {
            prop_assert_ne!(id(&scope_a, &key_a), id(&scope_b, &key_b));
        }
        // Moving bytes between scope and key makes another identity.
        let joined: Vec<u8> = scope_a.iter().copied().chain(key_a.bytes()).collect();
        let cut = split.min(joined.len() - 1);
        if let Ok(other_key) = std::str::from_utf8(&joined[cut..]) {
            let bare = other_key.bytes().all(|b| (0x21..=0x7e).contains(&b)) && !other_key.starts_with('"');
            if cut != scope_a.len() && !other_key.is_empty() && bare {
                prop_assert_ne!(id(&scope_a, &key_a), id(&joined[..cut], other_key));
            }
        }
    }

    #[test]
    fn distinct_credentials_get_distinct_scopes(a in "[ -~]{1,60}", b in "[ -~]{1,60}") {
        let scope = |auth: &str| {
            let request = http::Request::post("/").header("authorization", auth).body(()).unwrap();
            Scope::from_authorization(&request.into_parts().0)
        };
        prop_assume!(a != b);
        prop_assert_ne!(scope(&a), scope(&b));
    }
}

#[cfg(feature = "redis")]
#[test]
fn redis_names_of_ten_thousand_keys_are_distinct_and_never_hold_the_key() {
    use tower_idempotency::store::redis::{RedisStore, deadpool_redis};
    // A pool connects lazily: no server is needed to derive names.
    let pool = deadpool_redis::Config::from_url("redis://127.0.0.1:1")
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .unwrap();
    let store = RedisStore::new(pool);
    let mut names = std::collections::HashSet::new();
    for n in 0..10_000 {
        let key = format!("order-{n}");
        let name = store.record_key(&RecordId::new("", &Scope::new("tenant"), &key.parse().unwrap()));
        assert!(!name.contains(&key), "{name} holds the key");
        assert!(names.insert(name), "two keys share a Redis name");
    }
}

/// The bytes of a response record (format version 1) with `count` headers,
/// each with an empty value: named `h{n}` when `distinct`, else all `h`.
fn record_with_headers(count: u64, distinct: bool) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, mut value: u64) {
        while value >= 0x80 {
            out.push((value as u8 & 0x7f) | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }
    let mut out = vec![1, 0];
    out.extend_from_slice(&[0; 32]);
    out.extend_from_slice(&200u16.to_be_bytes());
    varint(&mut out, count);
    for n in 0..count {
        let name = if distinct { format!("h{n}") } else { "h".to_owned() };
        varint(&mut out, name.len() as u64);
        out.extend_from_slice(name.as_bytes());
        varint(&mut out, 0);
    }
    out.extend_from_slice(&[0, 0]);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// A hostile or corrupt store value may claim more headers than http's
    /// maps hold (about 24,575 by capacity, 32,768 distinct names).
    #[test]
    fn decoding_a_record_with_any_number_of_headers_never_panics(count in 0u64..45_000, distinct in any::<bool>()) {
        let decoded = Record::decode(Bytes::from(record_with_headers(count, distinct)));
        if count < 20_000 {
            prop_assert!(decoded.is_ok(), "{} headers: {:?}", count, decoded);
        }
    }
}
