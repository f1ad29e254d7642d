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
