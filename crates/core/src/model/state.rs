//! Per-sequence state in a backend's memory: KV cache for full-attention layers, conv and
//! recurrent state for GatedDeltaNet layers. A copy of a `State` is a snapshot (used for prefix
//! reuse).
use crate::backend::{Backend, Cpu};
use crate::config::{LayerKind, ModelConfig};
use crate::error::Result;
use crate::model::gdn;

pub enum LayerState<B: Backend = Cpu> {
    Attn {
        /// [pos, n_kv_heads * head_dim], post-norm post-RoPE keys (grown by the backend).
        k: B::Buf,
        /// [pos, n_kv_heads * head_dim].
        v: B::Buf,
    },
    Gdn {
        /// [K-1, conv_dim]: the last K-1 pre-convolution inputs, oldest first.
        conv: B::Buf,
        /// [nv, dk, dv] fp32 recurrent state.
        s: B::Buf,
    },
}

pub struct State<B: Backend = Cpu> {
    /// Tokens consumed so far (the next token's position).
    pub pos: usize,
    pub layers: Vec<LayerState<B>>,
}

impl<B: Backend> State<B> {
    /// A fresh state (position 0) in `be`'s memory.
    pub fn new_on(be: &B, cfg: &ModelConfig) -> Result<Self> {
        let g = gdn::shape(cfg);
        let layers = cfg
            .layer_types
            .iter()
            .map(|k| {
                Ok(match k {
                    LayerKind::FullAttention => LayerState::Attn {
                        k: be.alloc(0)?,
                        v: be.alloc(0)?,
                    },
                    LayerKind::LinearAttention => LayerState::Gdn {
                        conv: be.alloc(g.conv_state_len())?,
                        s: be.alloc(g.state_len())?,
                    },
                })
            })
            .collect::<Result<_>>()?;
        Ok(State { pos: 0, layers })
    }

    /// A copy in `be`'s memory.
    pub fn copy_on(&self, be: &B) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(match l {
                    LayerState::Attn { k, v } => LayerState::Attn {
                        k: be.copy_buf(k)?,
                        v: be.copy_buf(v)?,
                    },
                    LayerState::Gdn { conv, s } => LayerState::Gdn {
                        conv: be.copy_buf(conv)?,
                        s: be.copy_buf(s)?,
                    },
                })
            })
            .collect::<Result<_>>()?;
        Ok(State {
            pos: self.pos,
            layers,
        })
    }

    /// Bytes held (KV cache grows with the sequence; the rest is fixed).
    pub fn nbytes_on(&self, be: &B) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                LayerState::Attn { k, v } => (be.buf_len(k) + be.buf_len(v)) * 4,
                LayerState::Gdn { conv, s } => (be.buf_len(conv) + be.buf_len(s)) * 4,
            })
            .sum()
    }
}

impl State<Cpu> {
    pub fn new(cfg: &ModelConfig) -> Self {
        Self::new_on(&Cpu, cfg).expect("the CPU backend's allocations cannot fail")
    }

    /// Bytes held (KV cache grows with the sequence; the rest is fixed).
    pub fn nbytes(&self) -> usize {
        self.nbytes_on(&Cpu)
    }
}

impl<B: Backend> Clone for LayerState<B>
where
    B::Buf: Clone,
{
    fn clone(&self) -> Self {
        match self {
            LayerState::Attn { k, v } => LayerState::Attn {
                k: k.clone(),
                v: v.clone(),
            },
            LayerState::Gdn { conv, s } => LayerState::Gdn {
                conv: conv.clone(),
                s: s.clone(),
            },
        }
    }
}

impl<B: Backend> Clone for State<B>
where
    B::Buf: Clone,
{
    fn clone(&self) -> Self {
        State {
            pos: self.pos,
            layers: self.layers.clone(),
        }
    }
}

impl<B: Backend> std::fmt::Debug for State<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "State {{ pos: {}, layers: {} }}",
            self.pos,
            self.layers.len()
        )
    }
}
