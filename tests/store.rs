//! The store conformance suite, once per store.

mod common;

mod memory {
    crate::conformance_tests!(async { (tower_idempotency::store::MemoryStore::new(), ()) });
}

#[cfg(feature = "redis")]
mod redis {
    use crate::common::redis::shared_server;
    use tower_idempotency::store::redis::RedisStore;

    crate::conformance_tests!(async { (RedisStore::new(shared_server().pool()), ()) });
}

#[cfg(feature = "redis")]
mod redis_cluster {
    use crate::common::redis::RedisCluster;
    use tower_idempotency::store::redis::RedisStore;

    crate::conformance_tests!(async { (RedisStore::new(RedisCluster::shared().pool()), ()) });
}

#[cfg(feature = "postgres")]
mod postgres {
    use crate::common::postgres::TestDatabase;

    crate::conformance_tests!(async {
        let database = TestDatabase::create().await;
        let store = database.plain_store();
        store.migrate().await.unwrap();
        (store, database)
    });
}

#[cfg(feature = "postgres")]
mod postgres_transactional {
    use crate::common::postgres::TestDatabase;
    use tower_idempotency::store::postgres::TransactionalStore;

    crate::conformance_tests!(transaction_bound: async {
        let database = TestDatabase::create().await;
        let store = TransactionalStore::new(database.pool.clone());
        store.migrate().await.unwrap();
        (store, database)
    });
}

/// Redis with claims that take no fencing token (`with_fencing_tokens(false)`
/// on a layer): one `SET … NX GET` each.
#[cfg(feature = "redis")]
mod redis_without_fencing_tokens {
    use std::time::Duration;

    use crate::common::redis::shared_server;
    use tower_idempotency::{
        Record, RecordId,
        store::{Claim, ClaimRequest, OwnerToken, RecordState, Store, StoreError, redis::RedisStore},
    };

    /// A store whose every claim asks for no fencing token.
    #[derive(Clone)]
    struct NoFencing(RedisStore);

    impl Store for NoFencing {
        async fn claim(&self, request: ClaimRequest) -> Result<Claim, StoreError> {
            self.0.claim(request.with_fencing_token(false)).await
        }
        async fn complete(
            &self,
            id: &RecordId,
            owner: OwnerToken,
            record: Record,
            retention: Duration,
        ) -> Result<(), StoreError> {
            self.0.complete(id, owner, record, retention).await
        }
        async fn release(&self, id: &RecordId, owner: OwnerToken) -> Result<(), StoreError> {
            self.0.release(id, owner).await
        }
        async fn renew(&self, id: &RecordId, owner: OwnerToken, lease: Duration) -> Result<(), StoreError> {
            self.0.renew(id, owner, lease).await
        }
        async fn lookup(&self, id: &RecordId) -> Result<Option<RecordState>, StoreError> {
            self.0.lookup(id).await
        }
        async fn wait(&self, request: &ClaimRequest, timeout: Duration) -> Result<(), StoreError> {
            self.0.wait(request, timeout).await
        }
    }

    crate::conformance_tests!(no_fencing: async { (NoFencing(RedisStore::new(shared_server().pool())), ()) });
}
