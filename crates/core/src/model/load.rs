//! Loading a [`Model`] onto a backend: every tensor read from the [`TensorStore`] with its
//! shape checked against the config, family differences resolved here once (zero-centred norms
//! folded to plain weights, Qwen3-Next's interleaved in-projections reordered into Qwen3.5's
//! layout, arch-spec §6.2), then handed to the backend's memory.
use crate::backend::{Backend, Cpu};
use crate::config::{Arch, LayerKind, ModelConfig};
use crate::error::{Error, Result};
use crate::experts::ExpertSource;
use crate::store::{SourceLayout, TensorStore};
use crate::weights::{load_linear, load_vec, Linear};

use super::attention::Attention;
use super::gdn::{GatedDeltaNet, GdnProj};
use super::moe::{Mlp, Moe};
use super::{Ffn, ForwardOptions, Layer, Mixer, Model};

fn norm(store: &TensorStore, cfg: &ModelConfig, name: &str, len: usize) -> Result<Vec<f32>> {
    let mut w = load_vec(store, name, len)?;
    // Zero-centred norms (y = x̂(1+w)) are stored as w by transformers and as 1+w by MLX
    // converters (arch-spec §4.1, §11.2); the forward pass always uses a plain weight.
    if cfg.norm_zero_centered && store.layout == SourceLayout::HuggingFace {
        for v in w.iter_mut() {
            *v += 1.0;
        }
    }
    Ok(w)
}

impl Model<Cpu> {
    /// Loads the model for the CPU (weights stay views of the checkpoint's mapping).
    pub fn load(
        cfg: ModelConfig,
        store: &TensorStore,
        experts: Box<dyn ExpertSource>,
    ) -> Result<Self> {
        Self::load_on(Cpu, cfg, store, experts)
    }
}

impl<B: Backend> Model<B> {
    /// Loads the model's dense weights into `be`'s memory; routed experts stay behind
    /// `experts`.
    pub fn load_on(
        be: B,
        cfg: ModelConfig,
        store: &TensorStore,
        experts: Box<dyn ExpertSource>,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let embed = load_linear(store, "embed_tokens", cfg.vocab_size, h)?;
        let lm_head = if store.has("lm_head.weight") {
            load_linear(store, "lm_head", cfg.vocab_size, h)?
        } else if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            return Err(Error::MissingTensor {
                name: "lm_head.weight".into(),
                where_: store.dir.display().to_string(),
            });
        };
        let final_norm = be.upload(&norm(store, &cfg, "norm.weight", h)?)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("layers.{l}");
            let mixer = match cfg.layer_types[l] {
                LayerKind::FullAttention => Mixer::Attention(load_attention(&be, store, &cfg, &p)?),
                LayerKind::LinearAttention => Mixer::DeltaNet(load_gdn(&be, store, &cfg, &p)?),
            };
            let ffn = if cfg.is_moe_layer(l) {
                Ffn::Moe(load_moe(&be, store, &cfg, &p, l)?)
            } else {
                let i = cfg.intermediate_size;
                Ffn::Dense(mlp(
                    &be,
                    load_linear(store, &format!("{p}.mlp.gate_proj"), i, h)?,
                    load_linear(store, &format!("{p}.mlp.up_proj"), i, h)?,
                    load_linear(store, &format!("{p}.mlp.down_proj"), h, i)?,
                )?)
            };
            let post = format!("{p}.post_attention_layernorm.weight");
            layers.push(Layer {
                input_norm: be.upload(&norm(
                    store,
                    &cfg,
                    &format!("{p}.input_layernorm.weight"),
                    h,
                )?)?,
                post_norm: be.upload(&norm(store, &cfg, &post, h)?)?,
                mixer,
                ffn,
            });
        }
        let top_k = cfg.num_experts_per_tok;
        Ok(Model {
            embed: be.upload_mat(&embed)?,
            lm_head: be.upload_mat(&lm_head)?,
            be,
            cfg,
            final_norm,
            layers,
            experts,
            top_k,
            opts: ForwardOptions::default(),
        })
    }
}

fn mlp<B: Backend>(be: &B, gate: Linear, up: Linear, down: Linear) -> Result<Mlp<B>> {
    let [gate, up] = group(be, [&gate, &up])?;
    Ok(Mlp {
        gate,
        up,
        down: be.upload_mat(&down)?,
    })
}

pub(super) fn group<B: Backend, const N: usize>(be: &B, ws: [&Linear; N]) -> Result<[B::Mat; N]> {
    be.upload_group(&ws)?.try_into().map_err(|_| {
        Error::Invalid(format!(
            "{}: upload_group returned a wrong count",
            be.name()
        ))
    })
}

fn load_attention<B: Backend>(
    be: &B,
    store: &TensorStore,
    cfg: &ModelConfig,
    p: &str,
) -> Result<Attention<B>> {
    let (h, nh, nkv, hd) = (
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    );
    let qrows = nh * hd * if cfg.attn_output_gate { 2 } else { 1 };
    let a = format!("{p}.self_attn");
    let [q_proj, k_proj, v_proj] = group(
        be,
        [
            &load_linear(store, &format!("{a}.q_proj"), qrows, h)?,
            &load_linear(store, &format!("{a}.k_proj"), nkv * hd, h)?,
            &load_linear(store, &format!("{a}.v_proj"), nkv * hd, h)?,
        ],
    )?;
    Ok(Attention {
        q_proj,
        k_proj,
        v_proj,
        o_proj: be.upload_mat(&load_linear(store, &format!("{a}.o_proj"), h, nh * hd)?)?,
        q_norm: be.upload(&norm(store, cfg, &format!("{a}.q_norm.weight"), hd)?)?,
        k_norm: be.upload(&norm(store, cfg, &format!("{a}.k_norm.weight"), hd)?)?,
    })
}

/// Qwen3-Next's `in_proj_qkvz [nk*(2dk + 2*rep*dv), H]` and `in_proj_ba [nk*2*rep, H]`,
/// interleaved per key-head group (arch-spec §6.2), as Qwen3.5's `(qkv, z, b, a)`.
pub fn deinterleave(cfg: &ModelConfig, qkvz: &Linear, ba: &Linear) -> [Linear; 4] {
    let (nk, nv) = (cfg.linear_num_key_heads, cfg.linear_num_value_heads);
    let (dk, dv) = (cfg.linear_key_head_dim, cfg.linear_value_head_dim);
    let rep = nv / nk;
    let gw = 2 * dk + 2 * rep * dv;
    let per_group = |off: usize, n: usize, stride: usize| -> Vec<(usize, usize)> {
        (0..nk).map(|g| (g * stride + off, n)).collect()
    };
    let qkv: Vec<(usize, usize)> = [
        per_group(0, dk, gw),
        per_group(dk, dk, gw),
        per_group(2 * dk, rep * dv, gw),
    ]
    .concat();
    [
        qkvz.gather_rows(&qkv),
        qkvz.gather_rows(&per_group(2 * dk + rep * dv, rep * dv, gw)),
        ba.gather_rows(&per_group(0, rep, 2 * rep)),
        ba.gather_rows(&per_group(rep, rep, 2 * rep)),
    ]
}

fn load_gdn<B: Backend>(
    be: &B,
    store: &TensorStore,
    cfg: &ModelConfig,
    p: &str,
) -> Result<GatedDeltaNet<B>> {
    let h = cfg.hidden_size;
    let (nk, nv) = (cfg.linear_num_key_heads, cfg.linear_num_value_heads);
    let (dk, dv) = (cfg.linear_key_head_dim, cfg.linear_value_head_dim);
    let g = format!("{p}.linear_attn");
    let [qkv, z, b, a] =
        if cfg.arch == Arch::Qwen3Next || store.has(&format!("{g}.in_proj_qkvz.weight")) {
            let rep = nv / nk;
            let qkvz_rows = nk * (2 * dk + 2 * rep * dv);
            let qkvz = load_linear(store, &format!("{g}.in_proj_qkvz"), qkvz_rows, h)?;
            let ba = load_linear(store, &format!("{g}.in_proj_ba"), nk * 2 * rep, h)?;
            deinterleave(cfg, &qkvz, &ba)
        } else {
            [
                load_linear(store, &format!("{g}.in_proj_qkv"), cfg.gdn_conv_dim(), h)?,
                load_linear(store, &format!("{g}.in_proj_z"), nv * dv, h)?,
                load_linear(store, &format!("{g}.in_proj_b"), nv, h)?,
                load_linear(store, &format!("{g}.in_proj_a"), nv, h)?,
            ]
        };
    let [qkv, z, b, a] = group(be, [&qkv, &z, &b, &a])?;
    let kk = cfg.linear_conv_kernel_dim;
    // [C,1,K] (HF) and [C,K,1] (MLX) have the same memory order: c*K + j.
    let conv_w = load_vec(
        store,
        &format!("{g}.conv1d.weight"),
        cfg.gdn_conv_dim() * kk,
    )?;
    let a_log = load_vec(store, &format!("{g}.A_log"), nv)?;
    let neg_a: Vec<f32> = a_log.iter().map(|a| -a.exp()).collect();
    Ok(GatedDeltaNet {
        proj: GdnProj { qkv, z, b, a },
        conv_w: be.upload(&conv_w)?,
        dt_bias: be.upload(&load_vec(store, &format!("{g}.dt_bias"), nv)?)?,
        neg_a: be.upload(&neg_a)?,
        norm_w: be.upload(&load_vec(store, &format!("{g}.norm.weight"), dv)?)?,
        out_proj: be.upload_mat(&load_linear(store, &format!("{g}.out_proj"), h, nv * dv)?)?,
    })
}

fn load_moe<B: Backend>(
    be: &B,
    store: &TensorStore,
    cfg: &ModelConfig,
    p: &str,
    layer: usize,
) -> Result<Moe<B>> {
    let h = cfg.hidden_size;
    let m = format!("{p}.mlp");
    let router = load_linear(store, &format!("{m}.gate"), cfg.num_experts, h)?;
    if cfg.shared_expert_intermediate_size == 0 {
        return Ok(Moe {
            router: be.upload_mat(&router)?,
            shared: None,
            shared_gate: None,
            layer,
        });
    }
    let s = cfg.shared_expert_intermediate_size;
    let sgate = load_linear(store, &format!("{m}.shared_expert_gate"), 1, h)?;
    let [router, sgate] = group(be, [&router, &sgate])?;
    Ok(Moe {
        router,
        shared: Some(mlp(
            be,
            load_linear(store, &format!("{m}.shared_expert.gate_proj"), s, h)?,
            load_linear(store, &format!("{m}.shared_expert.up_proj"), s, h)?,
            load_linear(store, &format!("{m}.shared_expert.down_proj"), h, s)?,
        )?),
        shared_gate: Some(sgate),
        layer,
    })
}
