//! How a job's prompts become tasks: consecutive prompts whose effective parameters let them share one
//! batched forward pass are grouped, up to the job's batch size. Pure, so the PostgreSQL and SQLite stores
//! plan identically and streaming ingest can feed prompts chunk by chunk.

use crate::params::{GenerationParams, ParamOverrides};

/// What must be equal for two prompts to run in one batched forward (negative prompts and seeds may
/// differ per prompt).
#[derive(Clone, Debug, PartialEq)]
pub struct BatchKey {
    pub steps: Option<u32>,
    pub guidance: Option<f32>,
    pub width: Option<u32>,
    pub height: Option<u32>,
}

impl BatchKey {
    pub fn of(overrides: &ParamOverrides, base: &GenerationParams) -> Self {
        let p = overrides.apply(base);
        Self { steps: p.steps, guidance: p.guidance, width: p.width, height: p.height }
    }

    /// The task-level parameters: the job's, with this batch's shared overrides.
    pub fn params(&self, base: &GenerationParams) -> GenerationParams {
        GenerationParams { steps: self.steps, guidance: self.guidance, width: self.width, height: self.height, ..base.clone() }
    }
}

/// A planned task: prompts `first .. first + count`.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedTask {
    pub first: u64,
    pub count: u32,
    pub key: BatchKey,
}

#[derive(Debug)]
pub struct TaskPlanner {
    batch_size: u32,
    open: Option<PlannedTask>,
    next_index: u64,
}

impl TaskPlanner {
    pub fn new(batch_size: u32) -> Self {
        Self { batch_size: batch_size.max(1), open: None, next_index: 0 }
    }

    /// Index the next pushed prompt will get.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// Adds the next prompt; returns a task that just became full or was closed by a key change.
    pub fn push(&mut self, key: BatchKey) -> Option<PlannedTask> {
        let index = self.next_index;
        self.next_index += 1;
        match &mut self.open {
            Some(t) if t.key == key && t.count < self.batch_size => {
                t.count += 1;
                None
            }
            _ => self.open.replace(PlannedTask { first: index, count: 1, key }),
        }
        .or_else(|| {
            // A batch that reached its size is emitted right away, so callers can flush eagerly.
            if self.open.as_ref().is_some_and(|t| t.count == self.batch_size) {
                self.open.take()
            } else {
                None
            }
        })
    }

    /// Closes the last, partial task.
    pub fn finish(&mut self) -> Option<PlannedTask> {
        self.open.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(steps: u32) -> BatchKey {
        BatchKey { steps: Some(steps), guidance: None, width: None, height: None }
    }

    fn plan(keys: &[u32], batch: u32) -> Vec<(u64, u32)> {
        let mut p = TaskPlanner::new(batch);
        let mut out: Vec<(u64, u32)> = keys.iter().filter_map(|k| p.push(key(*k))).map(|t| (t.first, t.count)).collect();
        out.extend(p.finish().map(|t| (t.first, t.count)));
        out
    }

    #[test]
    fn groups_consecutive_equal_prompts_up_to_batch_size() {
        assert_eq!(plan(&[1, 1, 1, 1, 1], 2), vec![(0, 2), (2, 2), (4, 1)]);
        assert_eq!(plan(&[1, 1, 2, 2, 1], 4), vec![(0, 2), (2, 2), (4, 1)]);
        assert_eq!(plan(&[1, 2, 1], 1), vec![(0, 1), (1, 1), (2, 1)]);
        assert_eq!(plan(&[], 4), vec![]);
    }

    #[test]
    fn every_prompt_is_in_exactly_one_task() {
        let keys: Vec<u32> = (0..1000).map(|i| (i / 7 % 3) as u32).collect();
        let tasks = plan(&keys, 8);
        let mut next = 0;
        for (first, count) in tasks {
            assert_eq!(first, next);
            assert!((1..=8).contains(&count));
            next += count as u64;
        }
        assert_eq!(next, 1000);
    }
}
