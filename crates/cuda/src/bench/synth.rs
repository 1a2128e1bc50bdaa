//! The bench's synthetic models, built in memory so the bench needs no files: Qwen3.5-397B
//! shapes ([`synth_config`]) with random 4-bit weights (8-bit routers) and a small pool of
//! distinct host experts behind an [`ExpertSource`] ([`synth_model`]), and the same model with
//! each MoE block replaced by its shared expert as a dense MLP ([`dense_synth`]).
use half::bf16;
use serde_json::json;

use flashmoe_core::backend::Cpu;
use flashmoe_core::buf::Buf;
use flashmoe_core::config::ModelConfig;
use flashmoe_core::experts::{ExpertCounters, ExpertSource, ExpertWeights};
use flashmoe_core::model::attention::Attention;
use flashmoe_core::model::gdn::{GatedDeltaNet, GdnProj};
use flashmoe_core::model::moe::{Mlp, Moe};
use flashmoe_core::model::{Ffn, Layer, Mixer, Model};
use flashmoe_core::store::DType;
use flashmoe_core::weights::Linear;

use crate::{CudaError, Result};

/// xorshift64*: fast, reproducible filler for synthetic weights.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
}

pub(super) fn rand_u32(n: usize, seed: u64) -> Vec<u32> {
    use rayon::prelude::*;
    let mut v = vec![0u32; n];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| {
        let mut r =
            Rng(seed.wrapping_mul(0x9E3779B97F4A7C15)
                ^ (i as u64 + 1).wrapping_mul(0xD1B54A32D192ED03));
        for x in c.iter_mut() {
            *x = r.next() as u32;
        }
    });
    v
}

/// A random 4-bit (group 64, bf16 scales) matrix with weights in about ±1/sqrt(cols).
pub(super) fn synth_affine(rows: usize, cols: usize, bits: u32, seed: u64) -> Linear {
    let w = rand_u32(rows * cols * bits as usize / 32, seed);
    let ng = rows * cols / 64;
    let a = 1.0 / (cols as f32).sqrt();
    let levels = ((1u32 << bits) - 1) as f32;
    let sc = vec![bf16::from_f32(2.0 * a / levels); ng];
    let bi = vec![bf16::from_f32(-a); ng];
    Linear::Affine {
        bits,
        group: 64,
        rows,
        cols,
        w: Buf::from_vec(&w),
        scales: Buf::from_vec(&sc),
        biases: Buf::from_vec(&bi),
        sdtype: DType::BF16,
    }
}

/// Experts of a synthetic model: a pool of distinct host buffers, expert (l, e) = pool[(l*E+e) % P].
struct SynthExperts {
    pool: Vec<ExpertWeights>,
    ne: usize,
    counters: ExpertCounters,
}

impl ExpertSource for SynthExperts {
    fn fetch(&self, layer: usize, experts: &[usize]) -> flashmoe_core::Result<Vec<ExpertWeights>> {
        Ok(experts
            .iter()
            .map(|&e| self.pool[(layer * self.ne + e) % self.pool.len()].clone())
            .collect())
    }
    fn counters(&self) -> &ExpertCounters {
        &self.counters
    }
    fn expert_bytes(&self) -> usize {
        self.pool[0].nbytes()
    }
    fn describe(&self) -> String {
        format!("synthetic ({} distinct host experts)", self.pool.len())
    }
}

/// Qwen3.5-397B-A17B shapes (arch-spec §1.1) with `layers` layers.
pub fn synth_config(layers: usize, k: usize) -> ModelConfig {
    let types: Vec<&str> = (0..layers)
        .map(|i| {
            if (i + 1) % 4 == 0 {
                "full_attention"
            } else {
                "linear_attention"
            }
        })
        .collect();
    let j = json!({
        "model_type": "qwen3_5_moe",
        "text_config": {
            "model_type": "qwen3_5_moe_text",
            "hidden_size": 4096, "num_hidden_layers": layers, "layer_types": types,
            "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 256,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
            "linear_num_key_heads": 16, "linear_num_value_heads": 64, "linear_key_head_dim": 128,
            "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
            "num_experts": 512, "num_experts_per_tok": k, "moe_intermediate_size": 1024,
            "shared_expert_intermediate_size": 1024, "rms_norm_eps": 1e-6, "vocab_size": 248320,
            "tie_word_embeddings": false, "max_position_embeddings": 262144, "eos_token_id": 248044
        }
    });
    ModelConfig::from_json(&j, std::path::Path::new("<synthetic>")).expect("synthetic config")
}

/// A synthetic model with random 4-bit weights (8-bit router) of `cfg`'s shapes.
pub fn synth_model(cfg: ModelConfig, pool: usize) -> Model {
    let h = cfg.hidden_size;
    let mut seed = 1u64;
    let mut m = |r: usize, c: usize, bits: u32| {
        seed += 1;
        synth_affine(r, c, bits, seed)
    };
    let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let (nk, nv, dk, dv) = (
        cfg.linear_num_key_heads,
        cfg.linear_num_value_heads,
        cfg.linear_key_head_dim,
        cfg.linear_value_head_dim,
    );
    let (ne, ei, si) = (
        cfg.num_experts,
        cfg.moe_intermediate_size,
        cfg.shared_expert_intermediate_size,
    );
    let cd = cfg.gdn_conv_dim();
    let mut layers = Vec::new();
    for l in 0..cfg.num_layers {
        let mixer = if (l + 1) % 4 == 0 {
            Mixer::Attention(Attention {
                q_proj: m(nh * hd * 2, h, 4),
                k_proj: m(nkv * hd, h, 4),
                v_proj: m(nkv * hd, h, 4),
                o_proj: m(h, nh * hd, 4),
                q_norm: vec![1.0; hd],
                k_norm: vec![1.0; hd],
            })
        } else {
            Mixer::DeltaNet(GatedDeltaNet {
                proj: GdnProj {
                    qkv: m(cd, h, 4),
                    z: m(nv * dv, h, 4),
                    b: m(nv, h, 4),
                    a: m(nv, h, 4),
                },
                conv_w: (0..cd * cfg.linear_conv_kernel_dim)
                    .map(|i| ((i % 7) as f32 - 3.0) * 0.1)
                    .collect(),
                dt_bias: vec![0.0; nv],
                neg_a: vec![-1.0; nv],
                norm_w: vec![1.0; dv],
                out_proj: m(h, nv * dv, 4),
            })
        };
        let _ = (nk, dk);
        layers.push(Layer {
            input_norm: vec![1.0; h],
            post_norm: vec![1.0; h],
            mixer,
            ffn: Ffn::Moe(Moe {
                router: m(ne, h, 8),
                shared: Some(Mlp {
                    gate: m(si, h, 4),
                    up: m(si, h, 4),
                    down: m(h, si, 4),
                }),
                shared_gate: Some(m(1, h, 8)),
                layer: l,
            }),
        });
    }
    let experts: Vec<ExpertWeights> = (0..pool)
        .map(|_| ExpertWeights {
            gate: m(ei, h, 4),
            up: m(ei, h, 4),
            down: m(h, ei, 4),
        })
        .collect();
    let top_k = cfg.num_experts_per_tok;
    Model {
        be: Cpu,
        embed: m(cfg.vocab_size, h, 4),
        lm_head: m(cfg.vocab_size, h, 4),
        final_norm: vec![1.0; h],
        layers,
        experts: Box::new(SynthExperts {
            pool: experts,
            ne,
            counters: ExpertCounters::default(),
        }),
        top_k,
        opts: Default::default(),
        cfg,
    }
}

/// Distinct host experts of the synthetic model (450 MB at 397B shapes: beyond the CPU caches).
pub const POOL: usize = 64;

/// The synthetic model of `layers` layers with every MoE block's shared expert as its FFN
/// (no routed experts: everything but the expert tier of the token path).
pub fn dense_synth(layers: usize) -> Result<Model> {
    let mut m = synth_model(synth_config(layers, 1), 1);
    for l in &mut m.layers {
        if let Ffn::Moe(moe) = &mut l.ffn {
            let mlp = moe.shared.take().ok_or_else(|| {
                CudaError::Invalid("synthetic MoE block without a shared expert".into())
            })?;
            l.ffn = Ffn::Dense(mlp);
        }
    }
    Ok(m)
}
