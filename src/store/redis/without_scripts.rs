//! The calls that need no script: a claim (`SET … NX GET`, in a
//! transaction with the fencing counter's `INCR`), and a completion where
//! the server takes `SET … IFEQ`.

use std::sync::atomic::Ordering;

use redis::{Cmd, ErrorKind, ServerErrorKind, Value};

use super::{
    IFEQ_NO, IFEQ_UNKNOWN, IFEQ_YES, RedisPool, RedisStore, Replicate, Request,
    keys::KeyKind,
    millis, unexpected,
    value::{found, in_flight_value},
};
use crate::{
    FencingToken, Record, RecordId,
    store::{Claim, ClaimRequest, Lease, OwnerToken, Store, StoreError},
};

impl<P: RedisPool> RedisStore<P> {
    /// A claim without a script. With a fencing token, one transaction in
    /// one write: `MULTI`, `INCR` of the slot's counter, `SET record
    /// <in-flight value> NX GET PX <lease>`, `EXEC` (the `INCR` runs even
    /// when the `SET` finds a record: tokens only need to grow). Without one,
    /// the `SET` alone. The in-flight value carries no token: the owner
    /// alone knows it. The `SET`'s reply is nil when it acquired, else the
    /// value found.
    pub(super) async fn claim_without_script(
        &self,
        request: ClaimRequest,
        owner: OwnerToken,
    ) -> Result<Claim, StoreError> {
        let id = request.id();
        let value = in_flight_value(owner, request.fingerprint(), None);
        let lease = millis(request.lease());
        let key = self.key(&id, KeyKind::Record);
        let mut set = Cmd::with_capacity(7, key.len() + value.len() + lease.len() + 11);
        set.arg("SET").arg(key).arg(&value[..]).arg("NX").arg("GET").arg("PX").arg(&lease[..]);
        let fencing = request.fencing_token();
        let (request, replicate) = if fencing {
            let mut transaction = redis::pipe();
            transaction.atomic().cmd("INCR").arg(key.sibling(KeyKind::Fence)).add_command(set);
            (Request::Transaction(transaction), Replicate::IfSetInTransaction)
        } else {
            (Request::Command(set), Replicate::IfSet)
        };
        let sent = self.send(request, &key, replicate).await;
        let (reply, replicated) = match sent {
            Ok((Ok(reply), replicated)) => (reply, replicated),
            Ok((Err(error), _)) => {
                // A lone command refused, or `EXECABORT` (a command refused
                // while queued), wrote nothing; any other error of a
                // transaction came after its `SET … NX GET` may have run.
                if fencing && error.kind() != ErrorKind::Server(ServerErrorKind::ExecAbort) {
                    let _ = self.release(&id, owner).await;
                }
                return Err(StoreError::unavailable(error));
            }
            Err(error) => {
                // It may have landed all the same: give it back.
                let _ = self.release(&id, owner).await;
                return Err(error);
            }
        };
        // A transaction answers the token and the `SET`'s reply; anything
        // else may still have written, so the claim is given back.
        let parts = match reply {
            reply if !fencing => Ok((0, reply)),
            Value::Array(replies) => match <[Value; 2]>::try_from(replies) {
                Ok([Value::Int(token), reply]) if token > 0 => Ok((token.unsigned_abs(), reply)),
                Ok(replies) => Err(Value::Array(replies.into())),
                Err(replies) => Err(Value::Array(replies)),
            },
            other => Err(other),
        };
        let (token, reply) = match parts {
            Ok(parts) => parts,
            Err(other) => {
                let _ = self.release(&id, owner).await;
                return Err(unexpected(&other));
            }
        };
        match reply {
            Value::Nil => {
                if let Err(error) = replicated {
                    let _ = self.release(&id, owner).await;
                    return Err(error);
                }
                self.inner.remember_token(owner, None, self.ifeq());
                Ok(Claim::Acquired(Lease::new(owner, FencingToken::new(token))))
            }
            Value::BulkString(value) => found(value),
            other => Err(unexpected(&other)),
        }
    }

    /// Completes with one `SET record … IFEQ <in-flight value>` where the
    /// server takes it (Valkey 8.1, Redis 8.4): no script. `None` when the
    /// value was not the one this claim wrote (a waiter counted itself in
    /// it, a stale owner, a completion retried) or the server does not
    /// take `IFEQ`: the completion script decides then.
    pub(super) async fn complete_if_equal(
        &self,
        id: &RecordId,
        owner: OwnerToken,
        token: Option<u64>,
        record: &Record,
        encoded: &[u8],
        retention: &[u8],
    ) -> Result<Option<Result<(), StoreError>>, StoreError> {
        let in_flight = in_flight_value(owner, record.fingerprint(), token);
        let key = self.key(id, KeyKind::Record);
        let mut set = Cmd::with_capacity(7, key.len() + encoded.len() + in_flight.len() + retention.len() + 12);
        set.arg("SET").arg(key).arg(encoded).arg("IFEQ").arg(&in_flight[..]).arg("PX").arg(retention);
        let (reply, replicated) = self.command(set, &key, Replicate::Always).await?;
        let ifeq = &self.connection.facts().ifeq;
        // Known from an answer, on this connection; a "yes" never undoes a
        // "no" (a cluster of mixed versions settles on scripts until it
        // reconnects, rather than trying `IFEQ` on every completion).
        let takes_ifeq = || {
            let _ = ifeq.compare_exchange(IFEQ_UNKNOWN, IFEQ_YES, Ordering::Relaxed, Ordering::Relaxed);
        };
        match reply {
            Ok(Value::Okay) => {
                takes_ifeq();
                Ok(Some(replicated))
            }
            Ok(Value::Nil) => {
                takes_ifeq();
                Ok(None)
            }
            // A refused `SET` wrote nothing: the script decides. A server
            // without `IFEQ` refuses its syntax; any other refusal (out of
            // memory, say) says nothing of `IFEQ`.
            Err(error) => {
                if refuses_syntax(&error) && ifeq.swap(IFEQ_NO, Ordering::Relaxed) != IFEQ_NO {
                    tracing::debug!(%error, "the Redis server does not take SET IFEQ: completions run a script");
                    self.inner.tokens().clear();
                }
                Ok(None)
            }
            Ok(other) => Err(unexpected(&other)),
        }
    }
}

/// Whether `error` is a server's refusal of a command's syntax (`ERR syntax
/// error`, what servers without `SET … IFEQ` answer it).
fn refuses_syntax(error: &redis::RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::ResponseError)
        && error.detail().is_some_and(|detail| detail.to_ascii_lowercase().contains("syntax"))
}
