//! Transaction handling both backends share.

use sqlx::{Database, Transaction};

use crate::StoreResult;

/// Commits on success and rolls back on error, right away: a dropped transaction would otherwise keep
/// its row locks until its connection is next used, and `SKIP LOCKED` lessees would skip those tasks.
pub(crate) async fn finish<DB: Database, T>(tx: Transaction<'static, DB>, result: StoreResult<T>) -> StoreResult<T> {
    match result {
        Ok(v) => {
            tx.commit().await?;
            Ok(v)
        }
        Err(e) => {
            rollback(tx).await;
            Err(e)
        }
    }
}

/// Rolls back now, logging (not failing) if the connection is already gone.
pub(crate) async fn rollback<DB: Database>(tx: Transaction<'static, DB>) {
    if let Err(e) = tx.rollback().await {
        tracing::warn!(error = %e, "rollback failed");
    }
}

/// The error for a submission that ended without a single prompt.
pub(crate) fn empty_job() -> crate::StoreError {
    crate::StoreError::Invalid(fresco_core::ValidationError::new("prompts", "a job needs at least one prompt"))
}

/// Fencing by lease token: whether a report about `task` may proceed. `Ok(true)` means the same report was
/// already recorded (a completion whose answer was lost on the way back), so there is nothing to do.
pub(crate) fn check_fence(
    task: fresco_core::TaskId,
    state: fresco_core::TaskState,
    token_matches: bool,
    allow_done: bool,
) -> StoreResult<bool> {
    use fresco_core::TaskState;
    match (state, token_matches) {
        (TaskState::Leased, true) => Ok(false),
        (TaskState::Succeeded, true) if allow_done => Ok(true),
        (TaskState::Cancelled, true) => Err(crate::StoreError::Cancelled(task.0)),
        _ => Err(crate::StoreError::LeaseLost(task.0)),
    }
}
