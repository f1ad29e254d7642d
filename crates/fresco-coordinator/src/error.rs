//! The one place service errors become gRPC status codes.

use fresco_core::ValidationError;
use fresco_store::StoreError;
use tonic::Status;

pub fn status_from_validation(e: ValidationError) -> Status {
    Status::invalid_argument(format!("{}: {}", e.field, e.message))
}

pub fn status_from_store(e: StoreError) -> Status {
    match e {
        StoreError::NotFound(what) => Status::not_found(format!("{what} not found")),
        StoreError::Invalid(v) => status_from_validation(v),
        // A worker that lost its lease must drop the task; Aborted tells it "your view is stale".
        StoreError::LeaseLost(t) => Status::aborted(format!("lease of task {t} is no longer held")),
        StoreError::Cancelled(t) => Status::failed_precondition(format!("task {t} was cancelled")),
        StoreError::Conflict(m) => Status::failed_precondition(m),
        e if e.is_transient() => {
            tracing::warn!(error = %e, "database unavailable");
            Status::unavailable("database unavailable, retry later")
        }
        e => {
            tracing::error!(error = %e, "store error");
            Status::internal("internal error")
        }
    }
}
