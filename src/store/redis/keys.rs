//! The Redis key names of a record: its record, wake queue and fencing
//! counter, and the hashtag that puts all three in one hash slot.

use std::{fmt, sync::OnceLock};

use crate::RecordId;

/// One of a record's Redis keys, written straight into a command's
/// arguments: building each as a string of its own first cost an allocation
/// per key per call.
#[derive(Clone, Copy)]
pub(super) struct Key<'a> {
    prefix: &'a str,
    tag: &'static str,
    /// The first 16 bytes of the record id, in hex.
    hex: [u8; 32],
    kind: KeyKind,
}

#[derive(Clone, Copy)]
pub(super) enum KeyKind {
    /// `{prefix}{tag}:{32 hex digits}`: the record.
    Record,
    /// The record's key and `:q`: its wake queue.
    Queue,
    /// `{prefix}{tag}:fence`: the fencing counter of the record's hash slot.
    Fence,
}

impl<'a> Key<'a> {
    /// The key of `kind` of the record `id`, under `prefix`.
    pub(super) fn new(prefix: &'a str, id: &RecordId, kind: KeyKind) -> Self {
        let mut hex = [0; 32];
        crate::key::write_hex(&mut hex, &id.as_bytes()[..16]);
        Key { prefix, tag: tag(id), hex, kind }
    }

    /// The record's other key of `kind`, without encoding its id again.
    pub(super) fn sibling(self, kind: KeyKind) -> Self {
        Self { kind, ..self }
    }

    /// The key's bytes, in pieces.
    fn parts(&self) -> [&[u8]; 6] {
        let (name, suffix): (&[u8], &[u8]) = match self.kind {
            KeyKind::Record => (&self.hex, b""),
            KeyKind::Queue => (&self.hex, b":q"),
            KeyKind::Fence => (b"fence", b""),
        };
        [self.prefix.as_bytes(), b"{", self.tag.as_bytes(), b"}:", name, suffix]
    }

    pub(super) fn len(&self) -> usize {
        self.parts().iter().map(|part| part.len()).sum()
    }
}

impl fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Every part is UTF-8: the prefix is a `str`, the rest ASCII.
        self.parts().iter().try_for_each(|part| f.write_str(&String::from_utf8_lossy(part)))
    }
}

impl redis::ToRedisArgs for Key<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write as _;
        let mut arg = out.writer_for_next_arg();
        for part in self.parts() {
            // The writer appends to the command's buffer: it cannot fail.
            let _ = arg.write_all(part);
        }
    }
}

/// The hashtag of a record: a short string whose Redis hash slot is picked
/// by the record id's first bits, so records spread evenly over slots and a
/// record shares its slot with that slot's fencing counter.
pub(super) fn tag(id: &RecordId) -> &'static str {
    let bytes = id.as_bytes();
    let slot = usize::from(u16::from_be_bytes([bytes[0], bytes[1]]) & 0x3fff);
    let (len, digits) = &slot_tags()[slot];
    // Hex digits: always UTF-8.
    std::str::from_utf8(&digits[..usize::from(*len)]).unwrap_or_default()
}

/// The longest tag: the search below finds every slot's first tag by
/// `0x4cd70` (a unit test checks it).
const TAG_LEN: usize = 5;

/// For each of the 16,384 slots, a short tag that hashes to it (the first
/// number, in hex, that does), as its length and digits: one table of
/// 96 KiB, so a lookup is one memory access rather than two.
fn slot_tags() -> &'static [(u8, [u8; TAG_LEN])] {
    static TAGS: OnceLock<Vec<(u8, [u8; TAG_LEN])>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags = vec![(0, [0; TAG_LEN]); 16384];
        let mut missing = tags.len();
        let mut n = 0u64;
        while missing > 0 {
            let candidate = format!("{n:x}");
            let slot = usize::from(slot_of(candidate.as_bytes()));
            if tags[slot].0 == 0 && candidate.len() <= TAG_LEN {
                tags[slot].1[..candidate.len()].copy_from_slice(candidate.as_bytes());
                tags[slot].0 = candidate.len() as u8;
                missing -= 1;
            }
            n += 1;
        }
        tags
    })
}

/// Redis Cluster's hash slot of a key: CRC16 (XMODEM) of its hashtag, mod
/// 16384 (the `crc16` crate, as redis-rs uses for routing).
pub(super) fn slot_of(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16::State::<crc16::XMODEM>::calculate(hashed) & 0x3fff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_redis() {
        // Values from the Redis Cluster specification.
        assert_eq!(crc16::State::<crc16::XMODEM>::calculate(b"123456789"), 0x31c3);
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
    }

    #[test]
    fn every_slot_has_a_tag_that_hashes_to_it() {
        assert_eq!(slot_tags().len(), 16384);
        for slot in 0..16384u16 {
            let mut id = [0; 32];
            id[..2].copy_from_slice(&slot.to_be_bytes());
            let tag = tag(&RecordId::from_bytes(id));
            assert!(!tag.is_empty() && tag.len() <= TAG_LEN, "slot {slot}: {tag:?}");
            assert_eq!(slot_of(tag.as_bytes()), slot);
        }
    }

    #[test]
    fn a_record_and_its_counter_share_a_slot() {
        let id = RecordId::from_bytes([0x5a; 32]);
        let tag = tag(&id);
        let record = format!("idem:{{{tag}}}:{}", id.to_hex());
        let fence = format!("idem:{{{tag}}}:fence");
        assert_eq!(slot_of(record.as_bytes()), slot_of(fence.as_bytes()));
    }
}
