use fresco_core::ValidationError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    /// The lease token no longer matches: the task was re-leased, swept, or finished by someone else.
    #[error("lease of task {0} is no longer held")]
    LeaseLost(i64),
    /// The task's job was cancelled while it was leased.
    #[error("task {0} was cancelled")]
    Cancelled(i64),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("{0}")]
    Conflict(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Errors that say nothing about the request itself: the database is down or restarting.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Database(e) if matches!(e, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_)) || is_shutdown(e))
    }
}

fn is_shutdown(e: &sqlx::Error) -> bool {
    // admin_shutdown / crash_shutdown / cannot_connect_now while PostgreSQL restarts.
    e.as_database_error().and_then(|d| d.code()).is_some_and(|c| matches!(c.as_ref(), "57P01" | "57P02" | "57P03"))
}

pub type StoreResult<T> = Result<T, StoreError>;
