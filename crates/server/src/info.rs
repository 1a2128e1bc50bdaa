//! What `/v1/models` says about the loaded model beyond its name: its context and its
//! quantization, read once at start from the packed manifest or the checkpoint's config.
use flashmoe_core::packed::{self, Manifest};
use flashmoe_runtime::Engine;
use serde_json::{json, Value};

/// Weight precision of the served model. 16 bits means float (bf16/f16) weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantization {
    pub experts_bits: u32,
    /// Bits of the lowest-precision dense matrix (the packer keeps the router and output
    /// head at 8 bits or more, so this is what `--dense-bits` chose).
    pub dense_bits: u32,
    /// Affine group size; None for float weights.
    pub group_size: Option<usize>,
}

impl Quantization {
    pub fn json(&self) -> Value {
        json!({
            "experts_bits": self.experts_bits,
            "dense_bits": self.dense_bits,
            "group_size": self.group_size,
        })
    }
}

/// The quantization of `engine`'s model; None (the field is left out) when a packed model's
/// manifest cannot be read again after loading, which only a file changed under us causes.
pub fn quantization(engine: &Engine) -> Option<Quantization> {
    let dir = engine.model_dir();
    if packed::is_packed_dir(dir) {
        return match Manifest::read(dir) {
            Ok(m) => Some(from_manifest(&m)),
            Err(e) => {
                eprintln!("flashmoe serve: /v1/models leaves out the quantization: {e}");
                None
            }
        };
    }
    // A checkpoint: MLX quantized (one default spec) or float.
    Some(
        match engine
            .model()
            .cfg
            .quantization
            .as_ref()
            .and_then(|q| q.default)
        {
            Some(q) => Quantization {
                experts_bits: q.bits,
                dense_bits: q.bits,
                group_size: Some(q.group_size),
            },
            None => Quantization {
                experts_bits: 16,
                dense_bits: 16,
                group_size: None,
            },
        },
    )
}

fn from_manifest(m: &Manifest) -> Quantization {
    let dense_bits = m
        .dense
        .tensors
        .iter()
        .filter_map(|t| t.quant.map(|q| q.bits))
        .min()
        .unwrap_or(16);
    Quantization {
        experts_bits: m.experts.bits,
        dense_bits,
        group_size: (m.experts.bits != 16).then_some(m.experts.group_size),
    }
}
