//! fresco's sampler pipeline: (model folder, prompts, parameters, seeds) → images.
//!
//! It knows nothing about jobs, queues or storage, so it works as a library on its own:
//!
//! ```no_run
//! use fresco_pipeline::{Pipeline, Request, DeviceSpec};
//! let pipe = Pipeline::load("models/fresco-tiny".as_ref(), &DeviceSpec::Cpu).unwrap();
//! let images = pipe.generate(&Request::new(vec!["a red circle".into()], vec![42])).unwrap();
//! std::fs::write("out.png", images[0].encode_png(None).unwrap()).unwrap();
//! ```

pub mod error;
pub mod image;
pub mod loader;
pub mod models;
pub mod noise;
pub mod pipeline;
pub mod schedulers;
pub mod tokenizer;

pub use error::{PipelineError, Result};
pub use image::{GeneratedImage, ParametersText};
pub use pipeline::{
    on_compute_pool, set_process_defaults, DeviceSpec, Family, InitLatents, LateGuidance, ModelDefaults, Pipeline, Request, Resolved,
    StageTimings,
};
pub use schedulers::SchedulerKind;
