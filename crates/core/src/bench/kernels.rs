//! Kernel benchmark: GB/s of each matvec format (4-, 2-, 8-bit affine with bf16 scales, group
//! 64; bf16) on the model's own expert shape and a dense shape, beside the memory read
//! bandwidth measured in the same run. Each measurement cycles over enough distinct random
//! matrices (`kernel_mb`) that nothing is served from the CPU caches, as experts aren't.
//! The 4- and 2-bit formats are measured twice: the exact f32 kernel (`q4_matvec_bw`) and
//! the opt-in int8-activation one (`q4_int8_matvec_bw`, `--int8-activations`).
use std::time::Instant;

use half::bf16;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::kernels::{matvec_act, ActQuant, AffineView, Scales, WeightView};
use crate::model::Model;

use super::{BenchOptions, Limits, Section};

const GROUP: usize = 64;

/// One matrix's storage in a chosen format.
enum Stored {
    Affine {
        bits: u32,
        w: Vec<u32>,
        s: Vec<bf16>,
        b: Vec<bf16>,
    },
    Bf16(Vec<bf16>),
}

impl Stored {
    fn random(bits: u32, rows: usize, cols: usize, rng: &mut impl Rng) -> Stored {
        if bits == 16 {
            return Stored::Bf16(
                (0..rows * cols)
                    .map(|_| bf16::from_f32(rng.gen_range(-0.05..0.05)))
                    .collect(),
            );
        }
        let ng = rows * cols / GROUP;
        Stored::Affine {
            bits,
            w: (0..rows * cols * bits as usize / 32)
                .map(|_| rng.gen())
                .collect(),
            s: (0..ng)
                .map(|_| bf16::from_f32(rng.gen_range(0.001..0.01)))
                .collect(),
            b: (0..ng)
                .map(|_| bf16::from_f32(rng.gen_range(-0.05..0.0)))
                .collect(),
        }
    }
    fn nbytes(&self) -> usize {
        match self {
            Stored::Affine { w, s, b, .. } => w.len() * 4 + (s.len() + b.len()) * 2,
            Stored::Bf16(d) => d.len() * 2,
        }
    }
    fn view(&self, rows: usize, cols: usize) -> WeightView<'_> {
        match self {
            Stored::Affine { bits, w, s, b } => WeightView::Affine(AffineView {
                bits: *bits,
                group: GROUP,
                rows,
                cols,
                w,
                scales: Scales::Bf16(s),
                biases: Scales::Bf16(b),
            }),
            Stored::Bf16(d) => WeightView::Bf16 {
                rows,
                cols,
                data: d,
            },
        }
    }
}

/// Best-of-4 GB/s of `y = W x` over `copies` distinct matrices of one format and shape.
fn measure(bits: u32, rows: usize, cols: usize, budget: usize, seed: u64, aq: ActQuant) -> f64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let one = Stored::random(bits, rows, cols, &mut rng);
    let copies = (budget / one.nbytes().max(1)).clamp(2, 4096);
    let mats: Vec<Stored> = std::iter::once(one)
        .chain((1..copies).map(|_| Stored::random(bits, rows, cols, &mut rng)))
        .collect();
    let bytes: usize = mats.iter().map(Stored::nbytes).sum();
    let x: Vec<f32> = (0..cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let mut y = vec![0f32; rows];
    let mut best = f64::INFINITY;
    for _ in 0..4 {
        let t = Instant::now();
        for m in &mats {
            matvec_act(aq, &m.view(rows, cols), &x, &mut y);
        }
        std::hint::black_box(&y);
        best = best.min(t.elapsed().as_secs_f64());
    }
    bytes as f64 / best / 1e9
}

pub(crate) fn bench(model: &Model, limits: &Limits, opts: &BenchOptions) -> Value {
    let cfg = &model.cfg;
    let h = cfg.hidden_size;
    let inter = cfg.moe_intermediate_size.max(GROUP);
    // The largest dense projection a token reads per layer: GDN in_proj_qkv, else q_proj.
    let dense_rows = if cfg.linear_num_value_heads > 0 {
        cfg.gdn_conv_dim()
    } else {
        cfg.num_heads * cfg.head_dim * 2
    }
    .max(GROUP);
    let cols_ok = |c: usize| c.is_multiple_of(GROUP);
    let budget = opts.kernel_mb << 20;
    let mut s = Section::default();
    s.num("mem_read_bw_gbs", limits.mem_gbs);
    s.val(
        "expert_shape",
        format!("{inter}x{h} (gate/up of one expert)"),
    );
    s.val("dense_shape", format!("{dense_rows}x{h}"));
    s.num("stream_mb", opts.kernel_mb as f64);
    let formats = [
        ("q4", 4, ActQuant::Exact),
        ("q4_int8", 4, ActQuant::Int8),
        ("q2", 2, ActQuant::Exact),
        ("q2_int8", 2, ActQuant::Int8),
        ("q8", 8, ActQuant::Exact),
        ("bf16", 16, ActQuant::Exact),
    ];
    for (name, bits, aq) in formats {
        if !cols_ok(h) {
            break;
        }
        let e = measure(bits, inter, h, budget, bits as u64, aq);
        s.fig(&format!("{name}_matvec_bw"), "gbs", e, limits.mem_gbs);
        let d = measure(bits, dense_rows, h, budget, 100 + bits as u64, aq);
        s.fig(&format!("{name}_dense_matvec_bw"), "gbs", d, limits.mem_gbs);
    }
    s.into_value()
}
