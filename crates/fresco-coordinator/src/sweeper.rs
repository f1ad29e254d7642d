//! The lease sweeper. Every replica runs one; the store makes concurrent sweeps safe.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::Coordinator;

pub async fn run_sweeper(c: Arc<Coordinator>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(c.config.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        match c.store.sweep_expired().await {
            Ok(o) if o.requeued + o.quarantined > 0 => {
                tracing::info!(requeued = o.requeued, quarantined = o.quarantined, "expired leases swept");
                c.metrics.lease_expirations.inc_by(o.requeued + o.quarantined);
                c.metrics.quarantined.inc_by(o.quarantined);
                c.work_available.notify_waiters();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "lease sweep failed; retrying next interval"),
        }
    }
}
