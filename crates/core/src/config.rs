//! Model configuration: parses Hugging Face `config.json` (nested `text_config` or flat) and
//! MLX `quantization` blocks into one [`ModelConfig`]. Unknown architectures and settings the
//! engine does not implement are refused here, never ignored.
use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// Qwen3.5-MoE: gated attention + GatedDeltaNet (separate projections), shared expert.
    Qwen35Moe,
    /// Qwen3-Next: as Qwen3.5 but fused, interleaved `in_proj_qkvz` / `in_proj_ba`.
    Qwen3Next,
    /// Qwen3-MoE: plain attention with q/k norm, plain-weight RMSNorm, no shared expert.
    Qwen3Moe,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    FullAttention,
    LinearAttention,
}

/// Affine quantization of one module (MLX `quantization` block entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantSpec {
    pub bits: u32,
    pub group_size: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QuantConfig {
    pub default: Option<QuantSpec>,
    /// Per-module overrides keyed by MLX module path (e.g. `language_model.model.layers.0.mlp.gate`).
    /// `None` means the module is explicitly left unquantized.
    pub overrides: BTreeMap<String, Option<QuantSpec>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub layer_types: Vec<LayerKind>,
    pub rms_norm_eps: f32,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    // Full attention.
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Number of leading head dims rotated (head_dim * partial_rotary_factor).
    pub rotary_dim: usize,
    pub rope_theta: f64,
    /// q_proj emits [q ‖ gate] per head and the output is multiplied by sigmoid(gate).
    pub attn_output_gate: bool,
    /// Norm weights stored zero-centred (y = x̂ * (1 + w)). MLX checkpoints store 1+w; the
    /// loader folds the offset in so the forward pass always multiplies by a plain weight.
    pub norm_zero_centered: bool,
    // GatedDeltaNet.
    pub linear_num_key_heads: usize,
    pub linear_num_value_heads: usize,
    pub linear_key_head_dim: usize,
    pub linear_value_head_dim: usize,
    pub linear_conv_kernel_dim: usize,
    // MoE.
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub shared_expert_intermediate_size: usize,
    pub norm_topk_prob: bool,
    /// Layers that use a dense MLP (`intermediate_size`) instead of MoE.
    pub dense_mlp_layers: Vec<usize>,
    pub intermediate_size: usize,
    pub eos_token_ids: Vec<u32>,
    pub quantization: Option<QuantConfig>,
}

impl ModelConfig {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        Self::from_json(&v, &path)
    }

    pub fn from_json(root: &Value, path: &Path) -> Result<Self> {
        let err = |m: String| Error::config(path, m);
        let top_type = root.get("model_type").and_then(Value::as_str).unwrap_or("");
        let t = match root.get("text_config") {
            Some(tc) if tc.is_object() => tc,
            _ => root,
        };
        let ty = t
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or(top_type);
        let arch = match ty {
            "qwen3_5_moe" | "qwen3_5_moe_text" => Arch::Qwen35Moe,
            "qwen3_next" => Arch::Qwen3Next,
            "qwen3_moe" => Arch::Qwen3Moe,
            other => {
                return Err(err(format!(
                "unknown model_type `{other}` (supported: qwen3_5_moe, qwen3_5_moe_text, qwen3_next, qwen3_moe)"
            )))
            }
        };
        let us = |k: &str| -> Result<usize> {
            t.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| err(format!("missing or non-integer field `{k}`")))
                .and_then(|x| within_limit(k, x).map_err(err))
        };
        // An optional field that is present (not null) must have the right type: read as its
        // default instead, a quoted `"rms_norm_eps": "1e-5"` or `"head_dim": 128.0` would run
        // the model with the wrong value and no warning.
        let present = |k: &str| t.get(k).filter(|v| !v.is_null());
        let us_or = |k: &str, d: usize| -> Result<usize> {
            match present(k) {
                None => Ok(d),
                Some(v) => v
                    .as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| {
                        err(format!(
                            "field `{k}` must be a non-negative integer, found {v}"
                        ))
                    })
                    .and_then(|x| within_limit(k, x).map_err(err)),
            }
        };
        let typed_or = |v: Option<&Value>, k: &str, d: f64| -> Result<f64> {
            match v.filter(|v| !v.is_null()) {
                None => Ok(d),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| err(format!("field `{k}` must be a finite number, found {v}"))),
            }
        };
        let bool_of = |v: Option<&Value>, k: &str| -> Result<Option<bool>> {
            match v.filter(|v| !v.is_null()) {
                None => Ok(None),
                Some(v) => v
                    .as_bool()
                    .map(Some)
                    .ok_or_else(|| err(format!("field `{k}` must be true or false, found {v}"))),
            }
        };
        let hidden_size = us("hidden_size")?;
        // Bounded (LIMITS) before the per-layer tables below are built from it.
        let num_layers = us("num_hidden_layers")?;
        let num_heads = us("num_attention_heads")?;
        let num_kv_heads = us_or("num_key_value_heads", num_heads)?;
        let head_dim = us_or("head_dim", hidden_size / num_heads.max(1))?;
        for (k, v) in [
            ("hidden_size", hidden_size),
            ("num_hidden_layers", num_layers),
            ("num_attention_heads", num_heads),
            ("head_dim", head_dim),
        ] {
            if v == 0 {
                return Err(err(format!("field `{k}` must be at least 1")));
            }
        }

        // RoPE: `rope_parameters` (transformers v5) or legacy top-level fields + `rope_scaling`.
        let rp = t.get("rope_parameters").filter(|v| v.is_object());
        let get_rope = |k: &str| rp.and_then(|r| r.get(k)).or_else(|| t.get(k));
        let rope_theta = typed_or(get_rope("rope_theta"), "rope_theta", 10000.0)?;
        if rope_theta <= 0.0 {
            return Err(err(format!("rope_theta {rope_theta} must be positive")));
        }
        let default_prf = if arch == Arch::Qwen3Moe { 1.0 } else { 0.25 };
        let prf = typed_or(
            get_rope("partial_rotary_factor"),
            "partial_rotary_factor",
            default_prf,
        )?;
        if !(0.0..=1.0).contains(&prf) {
            return Err(err(format!(
                "partial_rotary_factor {prf} must be between 0 and 1"
            )));
        }
        let rope_type = rp
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if rope_type != "default" {
            return Err(err(format!(
                "rope_type `{rope_type}` is not implemented (only `default`)"
            )));
        }
        if let Some(rs) = t.get("rope_scaling").filter(|v| !v.is_null()) {
            let ty = rs
                .get("rope_type")
                .or_else(|| rs.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("?");
            if ty != "default" {
                return Err(err(format!(
                    "rope_scaling type `{ty}` is not implemented (only unscaled RoPE)"
                )));
            }
        }
        if let Some(ms) = rp.and_then(|r| r.get("mrope_section")) {
            // Text-only input makes the three MRoPE position rows equal, so MRoPE is 1-D RoPE
            // (arch-spec §5.1). Its sections must still fit the rotary frequencies.
            let sum: u64 = ms
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_u64)
                        .fold(0u64, u64::saturating_add)
                })
                .unwrap_or(0);
            let rot = (head_dim as f64 * prf) as u64;
            if sum.saturating_mul(2) > rot {
                return Err(err(format!(
                    "mrope_section sums to {sum}, more than rotary_dim/2 = {}",
                    rot / 2
                )));
            }
        }
        let rotary_dim = (head_dim as f64 * prf) as usize;
        if !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
            return Err(err(format!(
                "rotary dim {rotary_dim} must be even and <= head_dim {head_dim}"
            )));
        }

        let layer_types = match t.get("layer_types").and_then(Value::as_array) {
            Some(a) => a
                .iter()
                .map(|x| match x.as_str() {
                    Some("full_attention") => Ok(LayerKind::FullAttention),
                    Some("linear_attention") => Ok(LayerKind::LinearAttention),
                    other => Err(err(format!("unknown layer type {other:?} in layer_types"))),
                })
                .collect::<Result<Vec<_>>>()?,
            None if arch == Arch::Qwen3Moe => vec![LayerKind::FullAttention; num_layers],
            None => {
                let interval = us_or("full_attention_interval", 4)?.max(1);
                (0..num_layers)
                    .map(|i| {
                        if (i + 1) % interval == 0 {
                            LayerKind::FullAttention
                        } else {
                            LayerKind::LinearAttention
                        }
                    })
                    .collect()
            }
        };
        if layer_types.len() != num_layers {
            return Err(err(format!(
                "layer_types has {} entries but num_hidden_layers is {num_layers}",
                layer_types.len()
            )));
        }
        if arch == Arch::Qwen3Moe && layer_types.contains(&LayerKind::LinearAttention) {
            return Err(err("qwen3_moe has no linear-attention layers".into()));
        }
        if bool_of(t.get("use_sliding_window"), "use_sliding_window")? == Some(true) {
            return Err(err("use_sliding_window=true is not implemented".into()));
        }
        if let Some(act) = t.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(err(format!(
                    "hidden_act `{act}` is not implemented (only silu)"
                )));
            }
        }
        if bool_of(t.get("attention_bias"), "attention_bias")? == Some(true) {
            return Err(err("attention_bias=true is not implemented".into()));
        }

        let num_experts =
            t.get("num_experts")
                .or_else(|| t.get("num_local_experts"))
                .and_then(Value::as_u64)
                .ok_or_else(|| err("missing field `num_experts`".into()))? as usize;
        within_limit("num_experts", num_experts).map_err(err)?;
        let num_experts_per_tok = us("num_experts_per_tok")?;
        if num_experts_per_tok == 0 || num_experts_per_tok > num_experts {
            return Err(err(format!(
                "num_experts_per_tok {num_experts_per_tok} must be in 1..={num_experts}"
            )));
        }
        let moe_intermediate_size = us("moe_intermediate_size")?;
        let shared_expert_intermediate_size = match arch {
            Arch::Qwen3Moe => 0,
            _ => us("shared_expert_intermediate_size")?,
        };
        let norm_topk_prob = match arch {
            // HF Qwen3.5 always renormalises (no flag in the code).
            Arch::Qwen35Moe => true,
            // Absent: transformers' defaults (Qwen3MoeConfig False, Qwen3NextConfig True).
            _ => bool_of(t.get("norm_topk_prob"), "norm_topk_prob")?
                .unwrap_or(arch == Arch::Qwen3Next),
        };
        let sparse_step = us_or("decoder_sparse_step", 1)?;
        let mlp_only: Vec<usize> = t
            .get("mlp_only_layers")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64().map(|x| x as usize))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(&l) = mlp_only.iter().find(|&&l| l >= num_layers) {
            return Err(err(format!(
                "mlp_only_layers names layer {l}, but num_hidden_layers is {num_layers}"
            )));
        }
        // HF: a layer is sparse iff not in mlp_only_layers and (i+1) % decoder_sparse_step == 0.
        let dense_mlp_layers: Vec<usize> = (0..num_layers)
            .filter(|&i| mlp_only.contains(&i) || sparse_step == 0 || (i + 1) % sparse_step != 0)
            .collect();
        let intermediate_size = us_or("intermediate_size", 0)?;
        if !dense_mlp_layers.is_empty() && intermediate_size == 0 {
            return Err(err(
                "dense MLP layers configured but intermediate_size is missing".into(),
            ));
        }

        let mut eos = Vec::new();
        for src in [t.get("eos_token_id"), root.get("eos_token_id")]
            .into_iter()
            .flatten()
        {
            match src {
                Value::Number(n) => eos.extend(n.as_u64()),
                Value::Array(a) => eos.extend(a.iter().filter_map(Value::as_u64)),
                _ => {}
            }
        }
        eos.dedup();
        let vocab_size = us("vocab_size")?;
        // An id past the vocabulary can never be sampled (and one past u32 would wrap).
        if let Some(id) = eos.iter().find(|&&id| id >= vocab_size as u64) {
            return Err(err(format!(
                "eos_token_id {id} is outside the vocabulary (vocab_size {vocab_size})"
            )));
        }
        let eos: Vec<u32> = eos.into_iter().map(|id| id as u32).collect();

        let quantization = match root
            .get("quantization")
            .or_else(|| root.get("quantization_config"))
        {
            Some(q) if q.is_object() => Some(parse_quant(q).map_err(err)?),
            _ => None,
        };

        let cfg = ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            num_layers,
            layer_types,
            rms_norm_eps: match typed_or(t.get("rms_norm_eps"), "rms_norm_eps", 1e-6)? {
                e if (0.0..1.0).contains(&e) => e as f32,
                e => return Err(err(format!("rms_norm_eps {e} must be in [0, 1)"))),
            },
            tie_word_embeddings: bool_of(
                present("tie_word_embeddings").or_else(|| root.get("tie_word_embeddings")),
                "tie_word_embeddings",
            )?
            .unwrap_or(false),
            max_position_embeddings: us_or("max_position_embeddings", 32768)?,
            num_heads,
            num_kv_heads,
            head_dim,
            rotary_dim,
            rope_theta,
            attn_output_gate: arch != Arch::Qwen3Moe,
            norm_zero_centered: arch != Arch::Qwen3Moe,
            linear_num_key_heads: us_or("linear_num_key_heads", 0)?,
            linear_num_value_heads: us_or("linear_num_value_heads", 0)?,
            linear_key_head_dim: us_or("linear_key_head_dim", 0)?,
            linear_value_head_dim: us_or("linear_value_head_dim", 0)?,
            linear_conv_kernel_dim: us_or("linear_conv_kernel_dim", 4)?,
            num_experts,
            num_experts_per_tok,
            moe_intermediate_size,
            shared_expert_intermediate_size,
            norm_topk_prob,
            dense_mlp_layers,
            intermediate_size,
            eos_token_ids: eos,
            quantization,
        };
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.max_position_embeddings == 0 {
            return Err("max_position_embeddings must be at least 1".into());
        }
        if self.num_kv_heads > self.num_heads {
            return Err(format!(
                "num_key_value_heads {} is more than num_attention_heads {}",
                self.num_kv_heads, self.num_heads
            ));
        }
        if (0..self.num_layers).any(|l| self.is_moe_layer(l)) && self.moe_intermediate_size == 0 {
            return Err("moe_intermediate_size must be at least 1".into());
        }
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.layer_types.contains(&LayerKind::LinearAttention) {
            let (nk, nv) = (self.linear_num_key_heads, self.linear_num_value_heads);
            if nk == 0 || nv == 0 || nv % nk != 0 {
                return Err(format!(
                    "linear_num_value_heads {nv} must be a non-zero multiple of linear_num_key_heads {nk}"
                ));
            }
            if self.linear_key_head_dim == 0 || self.linear_value_head_dim == 0 {
                return Err("linear_key_head_dim / linear_value_head_dim missing".into());
            }
            if self.linear_conv_kernel_dim < 1 {
                return Err("linear_conv_kernel_dim must be >= 1".into());
            }
        }
        Ok(())
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        !self.dense_mlp_layers.contains(&layer)
    }
    pub fn gdn_key_dim(&self) -> usize {
        self.linear_num_key_heads * self.linear_key_head_dim
    }
    pub fn gdn_value_dim(&self) -> usize {
        self.linear_num_value_heads * self.linear_value_head_dim
    }
    pub fn gdn_conv_dim(&self) -> usize {
        2 * self.gdn_key_dim() + self.gdn_value_dim()
    }
}

/// Upper bounds on config.json's integers, far above every released model (Qwen3.5-397B:
/// hidden 4096, 60 layers, 512 experts, vocabulary 248,320, 262,144 positions) and far below
/// what would exhaust memory or overflow a size computation: a typo or a corrupt file is
/// refused by name before anything is allocated from it. Tensor shapes are checked against
/// these numbers when the weights load (and before `pack` writes anything).
pub const LIMITS: [(&str, usize); 18] = [
    ("vocab_size", 1 << 22),
    ("hidden_size", 1 << 16),
    ("num_hidden_layers", 1024),
    ("num_attention_heads", 1024),
    ("num_key_value_heads", 1024),
    ("head_dim", 1024),
    ("linear_num_key_heads", 1024),
    ("linear_num_value_heads", 1024),
    ("linear_key_head_dim", 1024),
    ("linear_value_head_dim", 1024),
    ("linear_conv_kernel_dim", 64),
    ("num_experts", 1 << 14),
    ("moe_intermediate_size", 1 << 17),
    ("shared_expert_intermediate_size", 1 << 17),
    ("intermediate_size", 1 << 18),
    ("max_position_embeddings", 1 << 24),
    ("decoder_sparse_step", 1024),
    ("full_attention_interval", 1024),
];

/// `value` of integer field `key` against [`LIMITS`] (fields without a limit pass).
fn within_limit(key: &str, value: usize) -> std::result::Result<usize, String> {
    match LIMITS.iter().find(|(k, _)| *k == key) {
        Some(&(_, max)) if value > max => Err(format!(
            "field `{key}` is {value}, beyond this engine's limit of {max} (a corrupt config?)"
        )),
        _ => Ok(value),
    }
}

fn parse_quant(q: &Value) -> std::result::Result<QuantConfig, String> {
    // Hugging Face quantized checkpoints (fp8, gptq, awq, bitsandbytes, ...) name their method;
    // MLX blocks never do. Read as MLX affine they would load with the wrong norm convention.
    if let Some(m) = q.get("quant_method") {
        return Err(format!(
            "quantization_config.quant_method {m} is not implemented (only MLX affine checkpoints \
             and unquantized bf16/f16/f32 ones)"
        ));
    }
    let spec = |v: &Value| -> std::result::Result<QuantSpec, String> {
        let bits = v.get("bits").and_then(Value::as_u64).unwrap_or(4) as u32;
        let group_size = v.get("group_size").and_then(Value::as_u64).unwrap_or(64) as usize;
        if let Some(mode) = v.get("mode").and_then(Value::as_str) {
            if mode != "affine" {
                return Err(format!(
                    "quantization mode `{mode}` is not implemented (only affine)"
                ));
            }
        }
        if ![2, 4, 8].contains(&bits) {
            return Err(format!(
                "quantization bits {bits} is not implemented (only 2, 4 and 8)"
            ));
        }
        if ![32, 64, 128].contains(&group_size) {
            return Err(format!(
                "quantization group_size {group_size} not supported (32, 64, 128)"
            ));
        }
        Ok(QuantSpec { bits, group_size })
    };
    let mut qc = QuantConfig {
        default: Some(spec(q)?),
        overrides: BTreeMap::new(),
    };
    if let Some(obj) = q.as_object() {
        for (k, v) in obj {
            match v {
                Value::Object(_) => {
                    qc.overrides.insert(k.clone(), Some(spec(v)?));
                }
                Value::Bool(false) => {
                    qc.overrides.insert(k.clone(), None);
                }
                _ => {}
            }
        }
    }
    Ok(qc)
}
