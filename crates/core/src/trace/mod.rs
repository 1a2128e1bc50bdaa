//! Routing traces (`--trace-routing FILE`, issue 22): every token's routed experts and router
//! weights per MoE layer (and the shared-expert gate, and optionally the router's input hidden
//! state), with position, request id and phase, recorded through the forward pass's tap seam
//! (`model/tap.rs`), never inside the math. `format.rs` is the file, `record.rs` the tap that
//! writes it. Analysis (stats, cache simulation, prediction) lives in the CLI's `trace`
//! command; the cache policies it compares are `crate::cache`'s, the ones the engine runs.
pub mod format;
pub mod record;

pub use format::{Header, Phase, Record, RecordParts, Trace, TraceWriter};
pub use record::{active, header_of, install, RecordTap, Recorder};
