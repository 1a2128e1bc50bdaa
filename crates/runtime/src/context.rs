//! The context budget (`--ctx-size`): how many tokens a sequence may hold, and the memory its
//! state takes at that length.
//!
//! The attention KV cache grows with the sequence (f32 keys and values per full-attention
//! layer and token); the GatedDeltaNet state is fixed. A model's own maximum (262,144 tokens
//! for Qwen3.5) can need more memory than the machine has, which used to show up only as an
//! allocation failure deep into a long conversation. The limit is applied by lowering the
//! loaded config's `max_position_embeddings`, which every backend already enforces.
use std::fmt;

use flashmoe_core::config::{LayerKind, ModelConfig};

use crate::error::{Result, RuntimeError};

/// The default never goes below this many tokens (or the model's maximum if smaller) for want
/// of memory: a smaller context is useless, and `--ctx-size` can still set one.
const MIN_DEFAULT_TOKENS: usize = 4096;

/// The chosen context and what it costs.
#[derive(Debug, Clone, PartialEq)]
pub struct ContextPlan {
    /// Tokens a sequence may hold (prompt plus answer).
    pub tokens: usize,
    /// The model's own maximum (`max_position_embeddings`).
    pub model_max: usize,
    /// KV cache bytes per token of context.
    pub kv_bytes_per_token: u64,
    /// Bytes of state that do not grow with the sequence (recurrent and conv state).
    pub fixed_bytes: u64,
    /// `Some(available bytes)` when the default was lowered to fit the available memory.
    pub capped_by_memory: Option<u64>,
    /// Whether `--ctx-size` chose it.
    pub requested: bool,
}

impl ContextPlan {
    /// KV cache bytes with the context full.
    pub fn kv_bytes(&self) -> u64 {
        self.kv_bytes_per_token.saturating_mul(self.tokens as u64)
    }
}

impl fmt::Display for ContextPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gb = |b: u64| b as f64 / 1e9;
        write!(f, "context {} tokens ", self.tokens)?;
        match (self.requested, self.capped_by_memory) {
            (true, _) => write!(f, "(--ctx-size; the model's maximum is {})", self.model_max)?,
            (false, Some(avail)) => write!(
                f,
                "(the model's {} lowered to fit half of the {:.1} GB of memory available; \
                 --ctx-size sets it)",
                self.model_max,
                gb(avail)
            )?,
            (false, None) => write!(f, "(the model's maximum)")?,
        }
        write!(
            f,
            ": KV cache up to {:.2} GB when full, plus {:.2} GB of fixed state; each saved \
             prefix (for reuse) holds a copy of the state at its length",
            gb(self.kv_bytes()),
            gb(self.fixed_bytes)
        )
    }
}

/// KV bytes per token and fixed state bytes of one sequence of this model (CPU layout, f32).
pub fn state_bytes(cfg: &ModelConfig) -> (u64, u64) {
    let mut kv = 0u64;
    let mut fixed = 0u64;
    for k in &cfg.layer_types {
        match k {
            LayerKind::FullAttention => kv += 2 * (cfg.num_kv_heads * cfg.head_dim) as u64 * 4,
            LayerKind::LinearAttention => {
                let conv = cfg.linear_conv_kernel_dim.saturating_sub(1) * cfg.gdn_conv_dim();
                let s = cfg.linear_num_value_heads
                    * cfg.linear_key_head_dim
                    * cfg.linear_value_head_dim;
                fixed += (conv + s) as u64 * 4;
            }
        }
    }
    (kv, fixed)
}

/// Chooses the context: `requested` if given (refused beyond the model's maximum), else the
/// model's maximum, lowered so that a full KV cache takes at most half of `available` bytes
/// (never below 4,096 tokens).
pub fn plan(
    cfg: &ModelConfig,
    requested: Option<usize>,
    available: Option<u64>,
) -> Result<ContextPlan> {
    let model_max = cfg.max_position_embeddings;
    let (kv_bytes_per_token, fixed_bytes) = state_bytes(cfg);
    let mut p = ContextPlan {
        tokens: model_max,
        model_max,
        kv_bytes_per_token,
        fixed_bytes,
        capped_by_memory: None,
        requested: requested.is_some(),
    };
    match requested {
        Some(0) => {
            return Err(RuntimeError::ContextSize(
                "--ctx-size 0: the context must hold at least one token".into(),
            ))
        }
        Some(n) if n > model_max => {
            return Err(RuntimeError::ContextSize(format!(
                "--ctx-size {n} is beyond the model's maximum context of {model_max} tokens"
            )))
        }
        Some(n) => p.tokens = n,
        None => {
            if let (Some(avail), true) = (available, kv_bytes_per_token > 0) {
                let fit = (avail / 2 / kv_bytes_per_token) as usize;
                let floor = MIN_DEFAULT_TOKENS.min(model_max);
                if fit < model_max {
                    p.tokens = fit.max(floor);
                    p.capped_by_memory = Some(avail);
                }
            }
        }
    }
    Ok(p)
}

/// Applies [`plan`] to a loaded model's config, with the memory available now.
pub fn limit(cfg: &mut ModelConfig, requested: Option<usize>) -> Result<ContextPlan> {
    let p = plan(cfg, requested, available_memory())?;
    cfg.max_position_embeddings = p.tokens;
    Ok(p)
}

/// `MemAvailable` from /proc/meminfo, in bytes; `None` where there is no such file.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        let text = r#"{"model_type": "qwen3_5_moe_text", "vocab_size": 1000, "hidden_size": 64,
            "num_hidden_layers": 4, "layer_types": ["linear_attention", "linear_attention",
            "linear_attention", "full_attention"], "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 100000, "linear_num_key_heads": 2,
            "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
            "linear_conv_kernel_dim": 4, "num_experts": 8, "num_experts_per_tok": 2,
            "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
            "hidden_act": "silu", "tie_word_embeddings": false}"#;
        let v: serde_json::Value = serde_json::from_str(text).expect("test config JSON");
        ModelConfig::from_json(&v, std::path::Path::new("config.json")).expect("test config")
    }

    #[test]
    fn default_is_the_model_maximum_when_memory_allows() {
        let c = cfg();
        let p = plan(&c, None, Some(1 << 40)).unwrap();
        assert_eq!(p.tokens, 100_000);
        assert_eq!(p.kv_bytes_per_token, 2 * 2 * 16 * 4);
        assert!(p.capped_by_memory.is_none());
        assert!(p.to_string().contains("the model's maximum"), "{p}");
        let p = plan(&c, None, None).unwrap();
        assert_eq!(p.tokens, 100_000);
    }

    #[test]
    fn default_is_lowered_to_half_the_available_memory() {
        let c = cfg();
        // 256 B/token; 10 MB available -> 5 MB for the cache -> 19531 tokens.
        let p = plan(&c, None, Some(10_000_000)).unwrap();
        assert_eq!(p.tokens, 5_000_000 / 256);
        assert_eq!(p.capped_by_memory, Some(10_000_000));
        assert!(p.to_string().contains("lowered"), "{p}");
        // Never below the floor for want of memory.
        assert_eq!(plan(&c, None, Some(1000)).unwrap().tokens, 4096);
    }

    #[test]
    fn requested_size_is_kept_or_refused() {
        let c = cfg();
        let p = plan(&c, Some(2048), Some(1000)).unwrap();
        assert_eq!((p.tokens, p.requested), (2048, true));
        let e = plan(&c, Some(100_001), None).unwrap_err().to_string();
        assert!(
            e.contains("beyond the model's maximum context of 100000"),
            "{e}"
        );
        assert!(plan(&c, Some(0), None).is_err());
        let mut c2 = c.clone();
        assert_eq!(limit(&mut c2, Some(512)).unwrap().tokens, 512);
        assert_eq!(c2.max_position_embeddings, 512);
    }
}
