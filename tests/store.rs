//! The store conformance suite, once per store.

mod common;

mod memory {
    crate::conformance_tests!(async { (tower_idempotency::store::MemoryStore::new(), ()) });
}
