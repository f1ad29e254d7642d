//! Job and task lifecycles as typed state machines. Stores persist states as the lowercase names below and
//! consult [`TaskState::can_become`] / [`JobState::can_become`] before writing one, so an illegal move is a
//! bug caught in one place rather than a corrupt row.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Accepted; no task has been leased yet (possibly because no worker serves its model).
    Queued,
    Running,
    Succeeded,
    /// Every task ended and at least one failed permanently.
    Failed,
    Cancelled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Pending,
    Leased,
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("illegal transition {from} -> {to}")]
pub struct TransitionError {
    pub from: String,
    pub to: String,
}

impl JobState {
    pub const ALL: [JobState; 5] = [Self::Queued, Self::Running, Self::Succeeded, Self::Failed, Self::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    pub fn can_become(self, to: JobState) -> bool {
        use JobState::*;
        match (self, to) {
            (Queued, Running | Succeeded | Failed | Cancelled) => true,
            (Running, Succeeded | Failed | Cancelled) => true,
            // RetryFailed re-opens a failed job.
            (Failed, Queued | Running) => true,
            _ => false,
        }
    }

    pub fn transition(self, to: JobState) -> Result<JobState, TransitionError> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(TransitionError { from: self.to_string(), to: to.to_string() })
        }
    }
}

impl TaskState {
    pub const ALL: [TaskState; 5] = [Self::Pending, Self::Leased, Self::Succeeded, Self::Failed, Self::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Leased => "leased",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    pub fn can_become(self, to: TaskState) -> bool {
        use TaskState::*;
        match (self, to) {
            (Pending, Leased | Cancelled | Failed) => true,
            // Leased -> Pending: a retryable failure or an expired lease puts it back in the queue.
            (Leased, Pending | Succeeded | Failed | Cancelled) => true,
            // RetryFailed.
            (Failed, Pending) => true,
            _ => false,
        }
    }

    pub fn transition(self, to: TaskState) -> Result<TaskState, TransitionError> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(TransitionError { from: self.to_string(), to: to.to_string() })
        }
    }
}

macro_rules! text_enum {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| format!("unknown {} {s:?}", stringify!($t)))
            }
        }
    };
}
text_enum!(JobState);
text_enum!(TaskState);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_task_states_do_not_move_except_failed_retry() {
        for to in TaskState::ALL {
            assert!(!TaskState::Succeeded.can_become(to));
            assert!(!TaskState::Cancelled.can_become(to));
        }
        assert!(TaskState::Failed.can_become(TaskState::Pending));
        assert!(TaskState::Pending.transition(TaskState::Succeeded).is_err());
    }

    #[test]
    fn states_round_trip_through_text() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), s);
        }
        for s in TaskState::ALL {
            assert_eq!(s.as_str().parse::<TaskState>().unwrap(), s);
        }
        assert!("bogus".parse::<JobState>().is_err());
    }

    #[test]
    fn cancelled_job_is_final() {
        for to in JobState::ALL {
            assert!(!JobState::Cancelled.can_become(to));
        }
        assert!(JobState::Queued.transition(JobState::Running).is_ok());
    }
}
