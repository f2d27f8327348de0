//! The held claim: a claim on its way to the store, and the claim an
//! execution holds while its lease is renewed, until it completes or
//! releases it.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    Fingerprint, NotStored, Record, RecordId,
    config::Config,
    future::BoxFuture,
    store::{Claim, ClaimRequest, OwnerToken, RecordState, Store, StoreError},
    timeout::with_timeout,
};

/// A claim on its way to the store. If it is dropped unfinished (the client
/// went away, or the store timeout fired) it finishes on its own task, and
/// gives the key back if it got it: a claim that lands after its request
/// is gone would otherwise hold the key for a whole lease, and every retry
/// would get 409.
pub(crate) struct PendingClaim<St: Store> {
    claim: Option<BoxFuture<Result<Claim, StoreError>>>,
    config: Arc<Config<St>>,
    id: RecordId,
}

impl<St: Store> PendingClaim<St> {
    pub(crate) fn new(config: &Arc<Config<St>>, request: ClaimRequest) -> Self {
        let owned = config.clone();
        let claim = Box::pin(async move { owned.store.claim(request).await });
        Self { claim: Some(claim), config: config.clone(), id: request.id() }
    }
}

impl<St: Store> Future for PendingClaim<St> {
    type Output = Result<Claim, StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(claim) = self.claim.as_mut() else { return Poll::Ready(Err(StoreError::unavailable("polled twice"))) };
        let output = std::task::ready!(claim.as_mut().poll(cx));
        self.claim = None;
        Poll::Ready(output)
    }
}

impl<St: Store> Drop for PendingClaim<St> {
    fn drop(&mut self) {
        let Some(claim) = self.claim.take() else { return };
        if self.config.store.dropped_claims_hold_nothing() {
            // Not sent yet, or given back as it is dropped: nothing to finish.
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (config, id) = (self.config.clone(), self.id);
        runtime.spawn(async move {
            if let Ok(Claim::Acquired(lease)) = claim.await {
                tracing::debug!(key = %id, "releasing a claim its request no longer waits for");
                config.release(&id, lease.owner()).await;
            }
        });
    }
}

/// A claim held by a running execution: renews its lease while the inner
/// service runs, and releases it if dropped before it completed or released
/// it (a panic).
pub(crate) struct HeldClaim<St: Store> {
    pub(crate) config: Arc<Config<St>>,
    pub(crate) id: RecordId,
    owner: OwnerToken,
    pub(crate) fingerprint: Fingerprint,
    /// Completed or released: nothing is left to give back on drop.
    settled: bool,
    /// Whether the lease is still renewed: until the record is completed or
    /// released, or the key is lost, however long a completion is retried.
    renewing: bool,
    /// The next renewal: kept here, so that it outlives each future run
    /// [`HeldClaim::while_renewing`] (a streaming body's frames, its sends).
    renewal: Option<Renewal>,
    renew_at: Instant,
    renew_until: Instant,
    /// Until when the claim surely holds: its lease from the claim or the
    /// last renewal that the store acknowledged.
    held_until: Instant,
    /// Cleared when the store says another owner holds the key; made only
    /// for a caller that watches it ([`HeldClaim::ownership`]).
    current: Option<Arc<AtomicBool>>,
}

impl<St: Store> HeldClaim<St> {
    pub(crate) fn new(config: Arc<Config<St>>, id: RecordId, owner: OwnerToken, fingerprint: Fingerprint) -> Self {
        let now = Instant::now();
        let renew_at = now + config.lease / 3;
        // A renewal at `t` holds the key until `t + lease`: stop renewing
        // where that would pass the ceiling.
        let renew_until = now + config.lease_ceiling.saturating_sub(config.lease);
        let held_until = now + config.lease;
        Self {
            config,
            id,
            owner,
            fingerprint,
            settled: false,
            renewing: true,
            renewal: None,
            renew_at,
            renew_until,
            held_until,
            current: None,
        }
    }

    /// A flag that stays true while no store call has found another owner
    /// of the key (a renewal, a completion).
    #[cfg(feature = "guard")]
    pub(crate) fn ownership(&mut self) -> Arc<AtomicBool> {
        self.current.get_or_insert_with(|| Arc::new(AtomicBool::new(true))).clone()
    }

    /// Notes that the store found another owner.
    fn lost(&self) {
        if let Some(current) = &self.current {
            current.store(false, Ordering::Relaxed);
        }
    }

    /// Runs `future` while renewing the lease.
    pub(crate) fn while_renewing<F: Future>(&mut self, future: F) -> WhileRenewing<'_, St, F> {
        WhileRenewing { claim: self, future }
    }

    /// Polls `future`, and while it is pending moves the lease's renewals
    /// on: what [`WhileRenewing`] and the recording task do on each poll.
    pub(crate) fn poll_renewing<F: Future>(&mut self, future: Pin<&mut F>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let polled = future.poll(cx);
        if polled.is_pending() {
            self.renew_when_due(cx);
        }
        polled
    }

    /// Moves the lease's renewals on: sleeps until the next one is due,
    /// sends it, and takes its answer. Returns when it has to wait, or when
    /// no renewal is left (the ceiling reached, the key lost, or settled).
    fn renew_when_due(&mut self, cx: &mut Context<'_>) {
        loop {
            match &mut self.renewal {
                None if !self.renewing || self.renew_at > self.renew_until => return,
                // Boxed: see BENCHMARKS.md, "Future sizes".
                None => self.renewal = Some(Renewal::Sleeping(Box::pin(tokio::time::sleep_until(self.renew_at)))),
                Some(Renewal::Sleeping(sleep)) => {
                    if sleep.as_mut().poll(cx).is_pending() {
                        return;
                    }
                    let (config, id, owner) = (self.config.clone(), self.id, self.owner);
                    let call = Box::pin(async move {
                        with_timeout(config.store_timeout, config.store.renew(&id, owner, config.lease)).await
                    });
                    self.renewal = Some(Renewal::Sent { sent: Instant::now(), call });
                }
                Some(Renewal::Sent { sent, call }) => {
                    let Poll::Ready(renewed) = call.as_mut().poll(cx) else { return };
                    let period = self.config.lease / 3;
                    match renewed {
                        Ok(()) => self.held_until = *sent + self.config.lease,
                        // Renewed while a completion is retried: if an
                        // earlier attempt landed, the key has no owner any
                        // more, which is no loss; the retry decides.
                        Err(StoreError::NotOwner) if self.settled => self.renew_until = self.renew_at,
                        Err(error) => {
                            self.config.metrics.store_failed(&self.id, "renew", &error);
                            if matches!(error, StoreError::NotOwner) {
                                // Another request owns the key: renew no more.
                                self.renew_until = self.renew_at;
                                self.lost();
                            }
                        }
                    }
                    self.renew_at += period;
                    self.renewal = None;
                }
            }
        }
    }

    /// Records that the request ran but its body failed midway: its key
    /// must never run again, but there is no response to replay.
    pub(crate) async fn complete_failed_body(&mut self) -> Option<Record> {
        let fingerprint = self.fingerprint;
        self.complete_with(|| Record::not_stored(fingerprint, NotStored::BodyFailed)).await
    }

    /// Gives the key back: a retry runs again.
    pub(crate) async fn release(&mut self) {
        (self.settled, self.renewing, self.renewal) = (true, false, None);
        Box::pin(self.config.release(&self.id, self.owner)).await;
    }

    /// Completes the claim with the record `record` makes. Returns the
    /// record again when the store failed in a way worth retrying after the
    /// client has its answer ([`HeldClaim::retry_completion`]): made twice
    /// then, so that the store keeps the only handle to it otherwise (a
    /// shared handle costs the store a reference count, 32 bytes a record).
    pub(crate) async fn complete_with(&mut self, record: impl Fn() -> Record) -> Option<Record> {
        // A renewal still on its way could land after the completion.
        (self.settled, self.renewal) = (true, None);
        let completed = self.complete(record()).await;
        // Renewed on only while a completion that did not land is retried.
        self.renewing = completed.is_err()
            && !matches!(completed, Err(StoreError::NotOwner | StoreError::Full | StoreError::NotReplicated { .. }));
        match completed {
            Ok(()) => None,
            Err(error @ StoreError::NotReplicated { .. }) => {
                // The record is written; the wait for replicas is retried
                // for as long as the claim could have been held.
                self.held_until = self.held_until.max(self.renew_until + self.config.lease);
                self.config.metrics.store_failed(&self.id, "complete", &error);
                Some(record())
            }
            Err(StoreError::Full) => {
                let marker = Record::not_stored(self.fingerprint, NotStored::StoreFull);
                if let Err(error) = Box::pin(self.complete(marker)).await {
                    self.config.metrics.store_failed(&self.id, "complete", &error);
                }
                None
            }
            Err(error @ StoreError::NotOwner) => {
                self.lost();
                self.config.metrics.store_failed(&self.id, "complete", &error);
                None
            }
            Err(error) => {
                self.config.metrics.store_failed(&self.id, "complete", &error);
                Some(record())
            }
        }
    }

    /// Retries a completion that failed (`unsaved`, from
    /// [`HeldClaim::complete_with`]), backing off from 100 ms to 2 s, and
    /// renews the lease meanwhile, up to its ceiling, for as long as the
    /// claim surely holds: a store that refuses writes for a while (Redis at
    /// `maxmemory`) or comes back (a restarted Redis that kept its data)
    /// still gets the outcome, and a retry of the request gets the replay
    /// instead of a second run.
    pub(crate) async fn retry_completion(&mut self, unsaved: Option<Record>) {
        if let Some(record) = unsaved {
            Box::pin(self.retry_completion_of(record)).await;
        }
    }

    async fn retry_completion_of(&mut self, record: Record) {
        // Never longer than a renewal period, so no wait outlasts the claim.
        let longest = Duration::from_secs(2).min(self.config.lease / 3);
        let mut backoff = Duration::from_millis(100).min(longest);
        loop {
            if Instant::now() >= self.held_until {
                tracing::error!(
                    key = %self.id,
                    "the completion failed until the claim ran out (its ceiling reached, or renewals failing too): \
                     the outcome is lost"
                );
                return;
            }
            self.while_renewing(tokio::time::sleep(backoff)).await;
            match self.complete(record.clone()).await {
                Ok(()) => {
                    self.renewing = false;
                    return;
                }
                Err(error) => {
                    // An earlier attempt failed without an answer: it may
                    // have landed, and then the key holds this very record.
                    let config = self.config.clone();
                    if matches!(error, StoreError::NotOwner) && landed(&config, self.id, &record).await {
                        tracing::debug!(key = %self.id, "an earlier attempt of the completion had landed");
                        self.renewing = false;
                        return;
                    }
                    self.config.metrics.store_failed(&self.id, "complete", &error);
                    if matches!(error, StoreError::NotOwner) {
                        self.lost();
                        self.renewing = false;
                        return;
                    }
                }
            }
            backoff = (backoff * 2).min(longest);
        }
    }

    /// Completes the claim once, with no retry and no store timeout, for a
    /// store that commits the inner service's writes with the record: a
    /// commit that is slow still lands, and the store finds out the outcome
    /// of one it lost sight of ([`StoreError::OutcomeUnknown`] when it
    /// cannot). A failed commit kept nothing and ended the claim with its
    /// transaction, so a retry runs again.
    pub(crate) async fn commit(&mut self, record: Record) -> Result<(), StoreError> {
        (self.settled, self.renewing, self.renewal) = (true, false, None);
        let config = &self.config;
        let committed = Box::pin(config.store.complete(&self.id, self.owner, record, config.retention)).await;
        if let Err(error) = &committed {
            config.metrics.store_failed(&self.id, "commit", error);
        }
        committed
    }

    /// Not an `async fn`: see BENCHMARKS.md, "Future sizes".
    fn complete(&self, record: Record) -> impl Future<Output = Result<(), StoreError>> + '_ {
        let config = &self.config;
        with_timeout(config.store_timeout, config.store.complete(&self.id, self.owner, record, config.retention))
    }
}

/// Whether the key `id` holds `record` already.
async fn landed<St: Store>(config: &Config<St>, id: RecordId, record: &Record) -> bool {
    let found = with_timeout(config.store_timeout, config.store.lookup(&id)).await;
    matches!(found, Ok(Some(RecordState::Completed(kept))) if kept == *record)
}

impl<St: Store> Drop for HeldClaim<St> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // Unwinding from a panic in the inner service or its body, or the
        // runtime shutting down under the task.
        tracing::warn!(key = %self.id, "execution ended before its response: releasing the idempotency key");
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (config, id, owner) = (self.config.clone(), self.id, self.owner);
        runtime.spawn(async move { config.release(&id, owner).await });
    }
}

/// The state of a lease's next renewal.
enum Renewal {
    /// Waiting until it is due.
    Sleeping(Pin<Box<tokio::time::Sleep>>),
    /// Sent at `sent`, its answer not in yet.
    Sent { sent: Instant, call: BoxFuture<Result<(), StoreError>> },
}

pin_project_lite::pin_project! {
    /// A future run while its claim's lease is renewed; made by
    /// [`HeldClaim::while_renewing`]. Written by hand: see BENCHMARKS.md,
    /// "Future sizes". Nothing is armed until the future is found pending:
    /// a handler that answers at once never touches a timer.
    pub(crate) struct WhileRenewing<'a, St: Store, F> {
        claim: &'a mut HeldClaim<St>,
        #[pin]
        future: F,
    }
}

impl<St: Store, F: Future> Future for WhileRenewing<'_, St, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        this.claim.poll_renewing(this.future, cx)
    }
}
