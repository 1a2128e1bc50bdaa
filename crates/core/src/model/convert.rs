//! A loaded CPU model onto another backend: every matrix and vector uploaded with the same
//! groups the loader forms (`load.rs`), so a backend that stacks a group sees the same calls
//! either way. Family differences were resolved when the CPU model was loaded (zero-centred
//! norms folded, the Qwen3-Next in-projection de-interleaved); nothing here knows a family.
use super::attention::Attention;
use super::gdn::{GatedDeltaNet, GdnProj};
use super::load::group;
use super::moe::{Mlp, Moe};
use super::{Ffn, Layer, Mixer, Model};
use crate::backend::{Backend, Cpu};
use crate::error::Result;
use crate::experts::{ExpertCounters, ExpertSource, ExpertWeights};
use std::sync::Arc;

impl Model<Cpu> {
    /// This model's weights on `be`, its experts read from `experts` (for example
    /// [`SharedExperts`] of this model).
    pub fn to_backend<B: Backend>(
        &self,
        be: B,
        experts: Box<dyn ExpertSource>,
    ) -> Result<Model<B>> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            layers.push(Layer {
                input_norm: be.upload(&l.input_norm)?,
                post_norm: be.upload(&l.post_norm)?,
                mixer: mixer(&be, &l.mixer)?,
                ffn: ffn(&be, &l.ffn)?,
            });
        }
        Ok(Model {
            embed: be.upload_mat(&self.embed)?,
            lm_head: be.upload_mat(&self.lm_head)?,
            final_norm: be.upload(&self.final_norm)?,
            be,
            cfg: self.cfg.clone(),
            layers,
            experts,
            top_k: self.top_k,
            opts: self.opts,
        })
    }
}

fn mixer<B: Backend>(be: &B, m: &Mixer) -> Result<Mixer<B>> {
    Ok(match m {
        Mixer::Attention(a) => {
            let [q_proj, k_proj, v_proj] = group(be, [&a.q_proj, &a.k_proj, &a.v_proj])?;
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
            let [qkv, z, b, a] = group(be, [&p.qkv, &p.z, &p.b, &p.a])?;
            Mixer::DeltaNet(GatedDeltaNet {
                proj: GdnProj { qkv, z, b, a },
                conv_w: be.upload(&g.conv_w)?,
                dt_bias: be.upload(&g.dt_bias)?,
                neg_a: be.upload(&g.neg_a)?,
                norm_w: be.upload(&g.norm_w)?,
                out_proj: be.upload_mat(&g.out_proj)?,
            })
        }
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

fn ffn<B: Backend>(be: &B, f: &Ffn) -> Result<Ffn<B>> {
    Ok(match f {
        Ffn::Dense(m) => Ffn::Dense(mlp(be, m)?),
        Ffn::Moe(m) => {
            let (router, shared_gate) = match &m.shared_gate {
                Some(sg) => {
                    let [r, g] = group(be, [&m.router, sg])?;
                    (r, Some(g))
                }
                None => (be.upload_mat(&m.router)?, None),
            };
            Ffn::Moe(Moe {
                router,
                shared: m.shared.as_ref().map(|s| mlp(be, s)).transpose()?,
                shared_gate,
                layer: m.layer,
            })
        }
    })
}

/// A model loaded on the CPU, on `be`: how the CLI and the server hand one loaded model to a
/// device backend. Its copy is built from the loaded matrices (no second read of the
/// checkpoint) and reads its routed experts through `cpu`'s source (one page cache, one set
/// of counters).
pub fn upload_to<B: Backend>(cpu: &Arc<Model>, be: B) -> Result<Model<B>> {
    cpu.to_backend(be, Box::new(SharedExperts(cpu.clone())))
}

/// The experts of a CPU model, read by its copy on another backend ([`Model::to_backend`]).
pub struct SharedExperts(pub Arc<Model>);

impl ExpertSource for SharedExperts {
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
