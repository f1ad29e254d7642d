//! The vocabulary every other fresco crate shares: identifiers, job and task states with their legal
//! transitions, generation parameters and their validation, seed derivation and the object-key layout.
//!
//! Nothing here performs I/O, so every rule can be unit-tested and reused by the store, the coordinator,
//! the worker and the CLI without dragging their dependencies along.

pub mod batch;
pub mod ids;
pub mod keys;
pub mod params;
pub mod seed;
pub mod state;

pub use ids::{JobId, LeaseToken, TaskId};
pub use keys::{ImageFormat, ObjectKeys};
pub use params::{
    validate_model_name, validate_output_url, validate_prompt, GenerationParams, ParamOverrides, ValidationError, MAX_PROMPT_CHARS,
    SCHEDULERS,
};
pub use seed::derive_seed;
pub use state::{JobState, TaskState, TransitionError};
