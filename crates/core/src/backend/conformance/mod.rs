//! The conformance harness (llama.cpp's test-backend-ops): one body, generic over [`Backend`],
//! that runs every primitive and every fused operation of a backend against [`Reference`] on
//! random inputs of every shape class and weight format, compares by normalised mean squared
//! error (`Σ(got-want)² / Σwant²`) against a bound per kind of op, and names each op that
//! disagrees. A backend is instantiated with one line:
//!
//! ```ignore
//! flashmoe_core::backend::conformance::run(&MyBackend::new()?).assert_ok();
//! ```
//!
//! Inputs are seeded, so a run is deterministic; the bounds sit orders of magnitude above
//! what an f32 backend reaches and orders below what a wrong op gives (NMSE ~1).
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::{AttnShape, Backend, GdnShape, Reference, Routes};
use crate::buf::Buf;
use crate::error::Result;
use crate::experts::{ExpertCounters, ExpertSource, ExpertWeights};
use crate::kernels::quantize_affine;
use crate::residency::SlotBackend;
use crate::store::DType;
use crate::weights::Linear;

/// NMSE bounds by kind of op.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Copies and lookups (embed, copy_rows): the same values either way.
    pub exact: f64,
    /// Elementwise and per-row f32 ops (norms, RoPE, SwiGLU, router, combine).
    pub f32_ops: f64,
    /// Ops that accumulate over a sequence (attention, conv, the delta rule, both forms).
    pub seq_ops: f64,
    /// Products with f32 weights.
    pub mat_f32: f64,
    /// Products with bf16/f16 weights: a kernel may round activations to 16 bits (~5e-6).
    pub mat_half: f64,
    /// Products with affine weights: a kernel may quantise activations to int8 per group
    /// (~5e-6, CUDA's prepared x, `--int8-activations`).
    pub mat_affine: f64,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            exact: 1e-12,
            f32_ops: 1e-9,
            seq_ops: 1e-8,
            mat_f32: 1e-9,
            mat_half: 1e-4,
            mat_affine: 1e-4,
        }
    }
}

/// One comparison: op, shape class and format, worst NMSE, bound.
#[derive(Clone, Debug)]
pub struct Check {
    pub op: &'static str,
    pub class: String,
    pub nmse: f64,
    pub bound: f64,
}

/// What [`run`] found.
#[derive(Debug, Default)]
pub struct Report {
    pub backend: &'static str,
    pub checks: Vec<Check>,
    /// "op [class]: why", one per disagreement or error.
    pub failures: Vec<String>,
}

impl Report {
    /// Every op run, worst NMSE first within each.
    pub fn summary(&self) -> String {
        let mut s = format!("{}: {} checks\n", self.backend, self.checks.len());
        let mut ops: Vec<&str> = Vec::new();
        for c in &self.checks {
            if !ops.contains(&c.op) {
                ops.push(c.op);
            }
        }
        for op in ops {
            let (worst, n) =
                self.checks
                    .iter()
                    .filter(|c| c.op == op)
                    .fold((None::<&Check>, 0), |(w, n), c| {
                        let worse = w.is_none_or(|w| c.nmse / c.bound > w.nmse / w.bound);
                        (if worse { Some(c) } else { w }, n + 1)
                    });
            match worst {
                Some(w) if w.bound == 0.0 => {
                    s += &format!("  {op:<18} {n:>3} cases, all equal to the reference\n")
                }
                Some(w) => {
                    s += &format!(
                        "  {op:<18} {n:>3} cases, worst {:.1e} (bound {:.0e}) at {}\n",
                        w.nmse, w.bound, w.class
                    )
                }
                None => {}
            }
        }
        s
    }

    /// Panics naming every failing op.
    pub fn assert_ok(&self) {
        assert!(
            self.failures.is_empty(),
            "backend {} disagrees with the reference:\n  {}\n{}",
            self.backend,
            self.failures.join("\n  "),
            self.summary()
        );
    }
}

/// Normalised mean squared error of `got` against `want`.
pub fn nmse(got: &[f32], want: &[f32]) -> f64 {
    let (mut e, mut w) = (0f64, 0f64);
    for (&g, &r) in got.iter().zip(want) {
        e += (g as f64 - r as f64).powi(2);
        w += (r as f64).powi(2);
    }
    if e == 0.0 {
        0.0
    } else {
        e / w.max(1e-30)
    }
}

/// Weight formats the harness covers.
#[derive(Clone, Copy, Debug)]
pub enum Fmt {
    F32,
    Bf16,
    F16,
    /// MLX affine: bits, group, scale dtype.
    Affine(u32, usize, DType),
}

impl Fmt {
    /// Every supported format: dense f32/bf16/f16, affine 2/4/8-bit at groups 32/64/128 with
    /// bf16 scales, and 4-bit g64 with f16 and f32 scales.
    pub fn all() -> Vec<Fmt> {
        let mut v = vec![Fmt::F32, Fmt::Bf16, Fmt::F16];
        for bits in [2, 4, 8] {
            for group in [32, 64, 128] {
                v.push(Fmt::Affine(bits, group, DType::BF16));
            }
        }
        v.push(Fmt::Affine(4, 64, DType::F16));
        v.push(Fmt::Affine(4, 64, DType::F32));
        v
    }

    fn label(&self) -> String {
        match self {
            Fmt::F32 => "f32".into(),
            Fmt::Bf16 => "bf16".into(),
            Fmt::F16 => "f16".into(),
            Fmt::Affine(b, g, s) => format!("affine{b}-g{g}-{s:?}"),
        }
    }
}

/// A random matrix `[rows, cols]` in `fmt` (affine: MLX's quantiser applied to random values).
pub fn random_linear(rng: &mut StdRng, rows: usize, cols: usize, fmt: Fmt) -> Linear {
    let v: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-0.5..0.5)).collect();
    let dense = |dtype, data| Linear::Dense {
        dtype,
        rows,
        cols,
        data,
    };
    match fmt {
        Fmt::F32 => dense(DType::F32, Buf::from_vec(&v)),
        Fmt::Bf16 => {
            let h: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
            dense(DType::BF16, Buf::from_vec(&h))
        }
        Fmt::F16 => {
            let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
            dense(DType::F16, Buf::from_vec(&h))
        }
        Fmt::Affine(bits, group, sdtype) => {
            let (w, s, b) = quantize_affine(&v, rows, cols, bits, group);
            let conv = |x: &[half::bf16]| match sdtype {
                DType::F16 => Buf::from_vec(
                    &x.iter()
                        .map(|v| half::f16::from_f32(v.to_f32()))
                        .collect::<Vec<_>>(),
                ),
                DType::F32 => Buf::from_vec(&x.iter().map(|v| v.to_f32()).collect::<Vec<_>>()),
                _ => Buf::from_vec(x),
            };
            Linear::Affine {
                bits,
                group,
                rows,
                cols,
                w: Buf::from_vec(&w),
                scales: conv(&s),
                biases: conv(&b),
                sdtype,
            }
        }
    }
}

/// Experts held in memory (tests of the MoE path without files).
pub struct MemExperts {
    pub experts: Vec<ExpertWeights>,
    pub counters: ExpertCounters,
}

impl ExpertSource for MemExperts {
    fn fetch(&self, _layer: usize, ids: &[usize]) -> Result<Vec<ExpertWeights>> {
        Ok(ids.iter().map(|&i| self.experts[i].clone()).collect())
    }
    fn counters(&self) -> &ExpertCounters {
        &self.counters
    }
    fn expert_bytes(&self) -> usize {
        self.experts.first().map_or(0, |e| e.nbytes())
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

/// `n` random experts (gate, up `[inter, h]`, down `[h, inter]`) in `f`, held in memory.
pub fn random_experts(rng: &mut StdRng, n: usize, inter: usize, h: usize, f: Fmt) -> MemExperts {
    MemExperts {
        experts: (0..n)
            .map(|_| ExpertWeights {
                gate: random_linear(rng, inter, h, f),
                up: random_linear(rng, inter, h, f),
                down: random_linear(rng, h, inter, f),
            })
            .collect(),
        counters: ExpertCounters::default(),
    }
}

/// The harness's state: the backend under test, the twin, the inputs' generator, findings.
struct Ctx<'a, B: Backend> {
    be: &'a B,
    r: Reference,
    rng: StdRng,
    bounds: Bounds,
    report: Report,
}

impl<B: Backend> Ctx<'_, B> {
    fn randv(&mut self, n: usize, s: f32) -> Vec<f32> {
        (0..n).map(|_| self.rng.gen_range(-s..s)).collect()
    }
    /// `t` random inputs of `h` and their routing by the reference over `e` experts, `k` each
    /// (renormalised): `(x, router logits, routes)`.
    fn routed(
        &mut self,
        t: usize,
        h: usize,
        e: usize,
        k: usize,
    ) -> Result<(Vec<f32>, Vec<f32>, Routes)> {
        let x = self.randv(t * h, 1.0);
        let lg = self.randv(t * e, 3.0);
        let mut routes = Routes::default();
        self.r.router_topk(&lg, e, k, true, &mut routes)?;
        Ok((x, lg, routes))
    }
    /// Weights of a norm: 1 ± 0.5.
    fn normw(&mut self, n: usize) -> Vec<f32> {
        self.randv(n, 0.5).iter().map(|v| 1.0 + v).collect()
    }
    fn up(&self, v: &[f32]) -> Result<B::Buf> {
        self.be.upload(v)
    }
    fn down(&self, b: &B::Buf) -> Result<Vec<f32>> {
        self.be.download(b)
    }
    fn cmp(&mut self, op: &'static str, class: &str, got: &[f32], want: &[f32], bound: f64) {
        if got.len() != want.len() {
            self.report.failures.push(format!(
                "{op} [{class}]: {} elements, the reference has {}",
                got.len(),
                want.len()
            ));
            return;
        }
        let e = nmse(got, want);
        // NaN compares false: a NaN error fails too.
        if e.is_nan() || e > bound {
            self.report
                .failures
                .push(format!("{op} [{class}]: NMSE {e:.3e} > bound {bound:.0e}"));
        }
        self.report.checks.push(Check {
            op,
            class: class.to_string(),
            nmse: e,
            bound,
        });
    }
    fn same<T: PartialEq + std::fmt::Debug>(&mut self, op: &'static str, class: &str, a: T, b: T) {
        if a != b {
            self.report
                .failures
                .push(format!("{op} [{class}]: {a:?}, the reference gives {b:?}"));
        }
        self.report.checks.push(Check {
            op,
            class: class.to_string(),
            nmse: 0.0,
            bound: 0.0,
        });
    }
    fn mat_bound(&self, f: Fmt) -> f64 {
        match f {
            Fmt::F32 => self.bounds.mat_f32,
            Fmt::Bf16 | Fmt::F16 => self.bounds.mat_half,
            Fmt::Affine(..) => self.bounds.mat_affine,
        }
    }
    /// Runs one section; an error from either side is a failure naming the section.
    fn section(&mut self, name: &str, f: impl FnOnce(&mut Self) -> Result<()>) {
        if let Err(e) = f(self) {
            self.report.failures.push(format!("{name}: error: {e}"));
        }
    }
}

/// Runs every operation of `be` against [`Reference`] with the default [`Bounds`].
pub fn run<B: Backend>(be: &B) -> Report {
    run_with(be, Bounds::default())
}

/// [`run`] with other bounds.
pub fn run_with<B: Backend>(be: &B, bounds: Bounds) -> Report {
    let mut c = Ctx {
        be,
        r: Reference,
        rng: StdRng::seed_from_u64(0x5eed),
        bounds,
        report: Report {
            backend: be.name(),
            ..Report::default()
        },
    };
    c.section("matmul", ops::matmul);
    c.section("embed", ops::embed);
    c.section("norms", ops::norms);
    c.section("attention", ops::attention);
    c.section("attention from projections", ops::attention_proj);
    c.section("gdn", ops::gdn);
    c.section("gdn fused", ops::gdn_fused);
    c.section("moe", ops::moe);
    c.section("fused moe", |c| {
        let shape = MoeShape {
            hidden: 128,
            inter: 64,
            experts: 8,
            fmt: Fmt::Affine(4, 64, DType::BF16),
        };
        let src = random_experts(
            &mut c.rng,
            shape.experts,
            shape.inter,
            shape.hidden,
            shape.fmt,
        );
        fused_moe::fused_moe(c, &src, 0, shape)
    });
    c.section("head", ops::head);
    c.report
}

/// The slot-batch op of a [`SlotBackend`] (expert residency, `crate::residency`) against
/// [`Reference`], with the default [`Bounds`]; a backend with slots runs this beside [`run`].
pub fn run_slots<B: SlotBackend>(be: &B) -> Report {
    run_slots_with(be, Bounds::default())
}

/// [`run_slots`] with other bounds.
pub fn run_slots_with<B: SlotBackend>(be: &B, bounds: Bounds) -> Report {
    let mut c = Ctx {
        be,
        r: Reference,
        rng: StdRng::seed_from_u64(0x5107),
        bounds,
        report: Report {
            backend: be.name(),
            ..Report::default()
        },
    };
    c.section("slots", slots::slots);
    c.report
}

/// [`Backend::fused_moe`] over `src`'s experts of `layer` (of `shape`) against [`Reference`]'s
/// composition, with the default [`Bounds`]: for a backend that fuses the block only for
/// experts it holds (CUDA with every expert of `layer` in VRAM), which [`run`]'s bare backend
/// does not.
pub fn run_fused_moe<B: Backend>(
    be: &B,
    src: &MemExperts,
    layer: usize,
    shape: MoeShape,
) -> Report {
    let mut c = Ctx {
        be,
        r: Reference,
        rng: StdRng::seed_from_u64(0xf05e),
        bounds: Bounds::default(),
        report: Report {
            backend: be.name(),
            ..Report::default()
        },
    };
    c.section("fused moe", |c| fused_moe::fused_moe(c, src, layer, shape));
    c.report
}

/// Shapes of the attention cases: Qwen3.5-like (gated, GQA 2, partial rotary) and
/// Qwen3-MoE-like (no gate, full rotary).
fn attn_shapes() -> [AttnShape; 2] {
    [
        AttnShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 32,
            rotary_dim: 8,
            rope_theta: 1e7,
            gated: true,
            eps: 1e-6,
        },
        AttnShape {
            heads: 4,
            kv_heads: 4,
            head_dim: 64,
            rotary_dim: 64,
            rope_theta: 1e4,
            gated: false,
            eps: 1e-6,
        },
    ]
}

/// GatedDeltaNet shape of the cases (value heads 2 per key head, like the 397B's 4 at scale).
const GDN: GdnShape = GdnShape {
    nk: 2,
    nv: 4,
    dk: 16,
    dv: 24,
    kconv: 4,
};

mod fused_moe;
mod ops;
mod slots;

pub use fused_moe::MoeShape;
