//! Per-sequence state: KV cache for full-attention layers, conv and recurrent state for
//! GatedDeltaNet layers. Cloning a `State` is a snapshot (used for prefix reuse).
use crate::config::{LayerKind, ModelConfig};

#[derive(Clone, Debug)]
pub enum LayerState {
    Attn {
        /// [pos, n_kv_heads * head_dim], post-norm post-RoPE keys.
        k: Vec<f32>,
        /// [pos, n_kv_heads * head_dim].
        v: Vec<f32>,
    },
    Gdn {
        /// [K-1, conv_dim]: the last K-1 pre-convolution inputs, oldest first.
        conv: Vec<f32>,
        /// [nv, dk, dv] fp32 recurrent state.
        s: Vec<f32>,
    },
}

#[derive(Clone, Debug)]
pub struct State {
    /// Tokens consumed so far (the next token's position).
    pub pos: usize,
    pub layers: Vec<LayerState>,
}

impl State {
    pub fn new(cfg: &ModelConfig) -> Self {
        let layers = cfg
            .layer_types
            .iter()
            .map(|k| match k {
                LayerKind::FullAttention => LayerState::Attn {
                    k: Vec::new(),
                    v: Vec::new(),
                },
                LayerKind::LinearAttention => LayerState::Gdn {
                    conv: vec![0.0; (cfg.linear_conv_kernel_dim - 1) * cfg.gdn_conv_dim()],
                    s: vec![
                        0.0;
                        cfg.linear_num_value_heads
                            * cfg.linear_key_head_dim
                            * cfg.linear_value_head_dim
                    ],
                },
            })
            .collect();
        State { pos: 0, layers }
    }

    /// Bytes held (KV cache grows with the sequence; the rest is fixed).
    pub fn nbytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                LayerState::Attn { k, v } => (k.len() + v.len()) * 4,
                LayerState::Gdn { conv, s } => (conv.len() + s.len()) * 4,
            })
            .sum()
    }
}
