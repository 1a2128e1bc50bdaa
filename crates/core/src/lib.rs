//! flashmoe-core: the engine. Formats and weights, expert streaming, CPU kernels, the model's
//! forward pass and the session that drives it. Front ends live in other crates.
pub mod kernels;
