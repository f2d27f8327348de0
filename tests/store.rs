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
    use tower_idempotency::store::postgres::PostgresStore;

    crate::conformance_tests!(async {
        let database = TestDatabase::create().await;
        let store = PostgresStore::new(database.pool.clone());
        store.migrate().await.unwrap();
        (store, database)
    });
}

#[cfg(feature = "postgres")]
mod postgres_transactional {
    use crate::common::postgres::TestDatabase;
    use tower_idempotency::store::postgres::PostgresStore;

    crate::conformance_tests!(session_bound: async {
        let database = TestDatabase::create().await;
        let store = PostgresStore::transactional(database.pool.clone());
        store.migrate().await.unwrap();
        (store, database)
    });
}
