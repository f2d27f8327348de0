//! The gRPC payment service of `examples/grpc_payments.rs`, shared with its
//! tests.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tonic::{Request, Response, Status};
use tower_idempotency::{IdempotencyContext, IdempotencyLayer, Store};

/// The code `tonic-prost-build` generated from `examples/proto/payments.proto`.
pub mod pb {
    #![allow(clippy::all, missing_docs, unreachable_pub)]
    include!("../proto/payments.v1.rs");
}

/// Charges cards once per idempotency key.
pub struct PaymentsService {
    /// Charges by derived idempotency key: the second line of defence.
    ledger: Mutex<HashMap<String, pb::Charge>>,
    processor_latency: Duration,
    executions: AtomicU64,
    ids: RandomState,
}

impl PaymentsService {
    pub fn new(processor_latency: Duration) -> Arc<Self> {
        Arc::new(Self {
            ledger: Mutex::default(),
            processor_latency,
            executions: AtomicU64::new(0),
            ids: RandomState::new(),
        })
    }

    /// How many times `CreateCharge` ran.
    pub fn executions(&self) -> u64 {
        self.executions.load(Ordering::SeqCst)
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, HashMap<String, pb::Charge>> {
        self.ledger.lock().unwrap_or_else(|poison| poison.into_inner())
    }
}

/// The idempotency settings of the gRPC service: every call needs an
/// `idempotency-key`; the scope is the default, the SHA-256 of the
/// `authorization` metadata.
pub fn configure<St: Store + Clone>(layer: IdempotencyLayer<St>) -> IdempotencyLayer<St> {
    layer.with_key_required(true)
}

#[tonic::async_trait]
impl pb::payments_server::Payments for Arc<PaymentsService> {
    async fn create_charge(&self, request: Request<pb::CreateChargeRequest>) -> Result<Response<pb::Charge>, Status> {
        self.executions.fetch_add(1, Ordering::SeqCst);
        let context = request
            .extensions()
            .get::<IdempotencyContext>()
            .cloned()
            .ok_or_else(|| Status::invalid_argument("idempotency-key metadata is required"))?;
        let key = context.derived_key();
        if let Some(existing) = self.ledger().get(&key) {
            return Ok(Response::new(existing.clone()));
        }
        let request = request.into_inner();
        if request.source == "tok_chargeDeclined" {
            return Err(Status::failed_precondition("Your card was declined."));
        }
        if request.amount <= 0 || request.currency.is_empty() {
            return Err(Status::invalid_argument("amount must be positive and currency set"));
        }
        if !self.processor_latency.is_zero() {
            tokio::time::sleep(self.processor_latency).await;
        }
        let id = format!("ch_{:016x}{:08x}", self.ids.hash_one(&key), self.executions() as u32);
        let charge = pb::Charge { id, amount: request.amount, currency: request.currency, status: "succeeded".into() };
        let charge = self.ledger().entry(key).or_insert(charge).clone();
        Ok(Response::new(charge))
    }
}
