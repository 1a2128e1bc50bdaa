//! A model loaded on the CPU, uploaded to another backend: the CLI and the server load one
//! [`Model`] and hand it to whichever backend runs the sequences, so a device backend builds
//! its own copy from the loaded matrices (no second read of the checkpoint) and reads its
//! routed experts through the CPU model's [`ExpertSource`] (one page cache, one set of
//! counters).
use std::sync::Arc;

use super::attention::Attention;
use super::gdn::{GatedDeltaNet, GdnProj};
use super::moe::{Mlp, Moe};
use super::{Ffn, Layer, Mixer, Model};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::experts::{ExpertCounters, ExpertSource, ExpertWeights};
use crate::weights::Linear;

/// The routed experts of a CPU model, lent to a model on another backend.
struct Lent(Arc<Model>);

impl ExpertSource for Lent {
    fn prefetch(&self, layer: usize, experts: &[usize]) {
        self.0.experts.prefetch(layer, experts)
    }
    fn fetch(&self, layer: usize, experts: &[usize]) -> Result<Vec<ExpertWeights>> {
        self.0.experts.fetch(layer, experts)
    }
    fn counters(&self) -> &ExpertCounters {
        self.0.experts.counters()
    }
    fn expert_bytes(&self) -> usize {
        self.0.experts.expert_bytes()
    }
    fn describe(&self) -> String {
        self.0.experts.describe()
    }
}

fn group<B: Backend, const N: usize>(be: &B, ws: [&Linear; N]) -> Result<[B::Mat; N]> {
    be.upload_group(&ws)?.try_into().map_err(|_| {
        Error::Invalid(format!(
            "{}: upload_group returned a wrong count",
            be.name()
        ))
    })
}

fn mlp<B: Backend>(be: &B, m: &Mlp) -> Result<Mlp<B>> {
    let [gate, up] = group(be, [&m.gate, &m.up])?;
    Ok(Mlp {
        gate,
        up,
        down: be.upload_mat(&m.down)?,
    })
}

/// Uploads `cpu`'s dense weights to `be` (the same matrix groups as the loader forms);
/// routed experts stay behind `cpu`'s source.
pub fn upload_to<B: Backend>(cpu: &Arc<Model>, be: B) -> Result<Model<B>> {
    let mut layers = Vec::with_capacity(cpu.layers.len());
    for l in &cpu.layers {
        let mixer = match &l.mixer {
            Mixer::Attention(a) => {
                let [q_proj, k_proj, v_proj] = group(&be, [&a.q_proj, &a.k_proj, &a.v_proj])?;
                Mixer::Attention(Attention {
                    q_proj,
                    k_proj,
                    v_proj,
                    o_proj: be.upload_mat(&a.o_proj)?,
                    q_norm: be.upload(&a.q_norm)?,
                    k_norm: be.upload(&a.k_norm)?,
                })
            }
            Mixer::DeltaNet(g) => {
                let p = &g.proj;
                let [qkv, z, b, a] = group(&be, [&p.qkv, &p.z, &p.b, &p.a])?;
                Mixer::DeltaNet(GatedDeltaNet {
                    proj: GdnProj { qkv, z, b, a },
                    conv_w: be.upload(&g.conv_w)?,
                    dt_bias: be.upload(&g.dt_bias)?,
                    neg_a: be.upload(&g.neg_a)?,
                    norm_w: be.upload(&g.norm_w)?,
                    out_proj: be.upload_mat(&g.out_proj)?,
                })
            }
        };
        let ffn = match &l.ffn {
            Ffn::Dense(m) => Ffn::Dense(mlp(&be, m)?),
            Ffn::Moe(m) => {
                let (router, shared_gate) = match &m.shared_gate {
                    Some(sg) => {
                        let [r, s] = group(&be, [&m.router, sg])?;
                        (r, Some(s))
                    }
                    None => (be.upload_mat(&m.router)?, None),
                };
                Ffn::Moe(Moe {
                    router,
                    shared: m.shared.as_ref().map(|s| mlp(&be, s)).transpose()?,
                    shared_gate,
                    layer: m.layer,
                })
            }
        };
        layers.push(Layer {
            input_norm: be.upload(&l.input_norm)?,
            post_norm: be.upload(&l.post_norm)?,
            mixer,
            ffn,
        });
    }
    Ok(Model {
        embed: be.upload_mat(&cpu.embed)?,
        lm_head: be.upload_mat(&cpu.lm_head)?,
        final_norm: be.upload(&cpu.final_norm)?,
        layers,
        experts: Box::new(Lent(cpu.clone())),
        cfg: cpu.cfg.clone(),
        top_k: cpu.top_k,
        opts: cpu.opts,
        be,
    })
}
