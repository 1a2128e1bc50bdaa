//! flashmoe-core: the engine. Formats and weights, expert streaming, CPU kernels, the model's
//! forward pass and the session that drives it. Front ends live in other crates.
pub mod backend;
pub mod bench;
pub mod buf;
pub mod cache;
pub mod clock;
pub mod config;
pub mod error;
pub mod experts;
pub mod kernels;
pub mod loader;
pub mod mapguard;
pub mod model;
pub mod model_seq;
pub mod os;
pub mod packed;
pub mod probe;
pub mod residency;
pub mod session;
pub mod store;
pub mod trace;
pub mod weights;

pub use error::{Error, Result};
