//! CPU kernels: matrix-vector and matrix-matrix products in f32 arithmetic over the weight
//! formats flashmoe reads (f32, bf16, f16 and MLX affine 2/4/8-bit, arch-spec §11.3), affine
//! quantisation, and the elementwise ops of a forward pass.
//!
//! Owns arithmetic only. It never does I/O, never knows about models or tensors' names, and
//! allocates only per-call scratch (a permuted or packed copy of `x`, per-row scale buffers; the
//! blocked product keeps its packed inputs per thread between calls).
//!
//! Layout of the module:
//! - `mod.rs`: the weight views, the public entry points and the choice of kernel (ISA, threads).
//! - `reference.rs`: the plain twins. They document the formats and are what the tests trust.
//! - `int8.rs`: the int8-activation affine matvec (`ActQuant::Int8`, the CLI default):
//!   preparation of `x` and the portable twin of its AVX2 kernel.
//! - `int8mm.rs`: the int8-activation affine product of many inputs (prefill): input and
//!   weight-tile preparation, the plain twin of its tile kernels (`x86/int8mm.rs`: AVX2 and
//!   AVX512-VNNI; `neon_int8mm.rs`: NEON `sdot`).
//! - `lanes.rs`: the portable fast kernels, written over 8-lane arrays so LLVM vectorises them;
//!   also the per-call preparation of `x` shared by every ISA.
//! - `x86.rs`: AVX2+FMA(+F16C) kernels, picked at run time with `is_x86_feature_detected!`;
//!   `x86/affine.rs` the exact affine matvec (codes read as `lanes::CodeRead` says);
//!   `x86/few.rs` the affine product of a few inputs (prefill's routed experts).
//! - `peak.rs`: the machine's measured f32 and int8 multiply-add peaks (prefill's bound).
//! - `quantize.rs`: MLX's affine rule and a min-max baseline.
//! - `blocked.rs`: the AVX2 prefill product (many inputs): dequantised weight tiles against
//!   packed input panels in a 6x16 register tile.
//! - `gemm.rs`: small register-blocked f32 products (the chunked gated delta rule).
//! - `elementwise.rs`: rmsnorm, silu, swiglu, softmax, top-k, dot, axpy.
//!
//! Shapes: weights are row-major `W [rows, cols]` as in a PyTorch Linear, `y = W x`.

#[cfg(target_arch = "x86_64")]
mod blocked;
mod elementwise;
mod gemm;
mod int8;
pub(crate) mod int8mm;
mod lanes;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "aarch64")]
mod neon_int8mm;
pub mod peak;
mod quantize;
mod reference;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_int8mm;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use elementwise::{axpy, dot, rmsnorm, silu, softmax_inplace, swiglu, top_k};
pub use gemm::{gemm_acc, gemm_acc_ref, Mat};
pub use quantize::{quantize_affine, quantize_minmax};
pub use reference::{dequantize, dequantize_row, matmul_ref, matvec_ref};

use half::{bf16, f16};
#[cfg(target_arch = "x86_64")]
use rayon::prelude::*;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

/// Per-group scales or biases of an affine-quantised matrix, `[rows, cols / group]`.
/// MLX stores them in the dtype the model was converted from (bf16, f16 or f32).
#[derive(Clone, Copy, Debug)]
pub enum Scales<'a> {
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
    F32(&'a [f32]),
}

impl Scales<'_> {
    pub fn len(&self) -> usize {
        match self {
            Scales::Bf16(s) => s.len(),
            Scales::F16(s) => s.len(),
            Scales::F32(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Value `i` widened to f32 (exact for every stored dtype).
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Scales::Bf16(s) => s[i].to_f32(),
            Scales::F16(s) => s[i].to_f32(),
            Scales::F32(s) => s[i],
        }
    }

    /// Widens `out.len()` values starting at `start` into `out`.
    #[inline]
    pub fn to_f32_into(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            Scales::Bf16(s) => {
                for (o, v) in out.iter_mut().zip(&s[start..start + n]) {
                    *o = f32::from_bits((v.to_bits() as u32) << 16);
                }
            }
            Scales::F16(s) => {
                for (o, v) in out.iter_mut().zip(&s[start..start + n]) {
                    *o = v.to_f32();
                }
            }
            Scales::F32(s) => out.copy_from_slice(&s[start..start + n]),
        }
    }
}

/// An MLX affine-quantised matrix `W [rows, cols]` (arch-spec §11.3).
///
/// Element `(r, j)` is `scale[r, j / group] * q + bias[r, j / group]` with
/// `q = (w[r * cols * bits / 32 + j * bits / 32] >> ((j * bits) % 32)) & (2^bits - 1)`.
#[derive(Clone, Copy, Debug)]
pub struct AffineView<'a> {
    /// 2, 4 or 8.
    pub bits: u32,
    /// 32, 64 or 128 elements per (scale, bias) pair.
    pub group: usize,
    pub rows: usize,
    pub cols: usize,
    /// `[rows, cols * bits / 32]`, LSB-first packing.
    pub w: &'a [u32],
    /// `[rows, cols / group]`; may be negative.
    pub scales: Scales<'a>,
    /// `[rows, cols / group]`.
    pub biases: Scales<'a>,
}

impl AffineView<'_> {
    pub fn words_per_row(&self) -> usize {
        self.cols * self.bits as usize / 32
    }

    pub fn groups_per_row(&self) -> usize {
        self.cols / self.group
    }

    /// Panics with a message naming the mismatch if the view is not a well-formed matrix.
    pub fn check(&self) {
        assert!(
            matches!(self.bits, 2 | 4 | 8),
            "affine: bits {} not in {{2, 4, 8}}",
            self.bits
        );
        assert!(
            matches!(self.group, 32 | 64 | 128),
            "affine: group {} not in {{32, 64, 128}}",
            self.group
        );
        assert!(
            self.cols.is_multiple_of(self.group),
            "affine: cols {} not a multiple of group {}",
            self.cols,
            self.group
        );
        assert_eq!(
            self.w.len(),
            self.rows * self.words_per_row(),
            "affine: w length"
        );
        let ng = self.rows * self.groups_per_row();
        assert_eq!(self.scales.len(), ng, "affine: scales length");
        assert_eq!(self.biases.len(), ng, "affine: biases length");
    }
}

/// A borrowed weight matrix `W [rows, cols]`, row-major, in one of the supported formats.
#[derive(Clone, Copy, Debug)]
pub enum WeightView<'a> {
    F32 {
        rows: usize,
        cols: usize,
        data: &'a [f32],
    },
    Bf16 {
        rows: usize,
        cols: usize,
        data: &'a [bf16],
    },
    F16 {
        rows: usize,
        cols: usize,
        data: &'a [f16],
    },
    Affine(AffineView<'a>),
}

impl WeightView<'_> {
    pub fn rows(&self) -> usize {
        match self {
            WeightView::F32 { rows, .. }
            | WeightView::Bf16 { rows, .. }
            | WeightView::F16 { rows, .. } => *rows,
            WeightView::Affine(a) => a.rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            WeightView::F32 { cols, .. }
            | WeightView::Bf16 { cols, .. }
            | WeightView::F16 { cols, .. } => *cols,
            WeightView::Affine(a) => a.cols,
        }
    }

    /// Panics with a message naming the mismatch if the view is not a well-formed matrix.
    pub fn check(&self) {
        let (r, c) = (self.rows(), self.cols());
        match self {
            WeightView::F32 { data, .. } => assert_eq!(data.len(), r * c, "f32 weight length"),
            WeightView::Bf16 { data, .. } => assert_eq!(data.len(), r * c, "bf16 weight length"),
            WeightView::F16 { data, .. } => assert_eq!(data.len(), r * c, "f16 weight length"),
            WeightView::Affine(a) => a.check(),
        }
    }
}

/// Below this many weights a product runs on the calling thread. From earlier measurements
/// (a since-removed timing probe, best of many, 4-bit g64) on the 2-core EPYC dev VM while
/// other builds ran:
/// a rayon fork-join costs 10-25 us there, so 2 threads lost at 512x512 (21 us serial vs 37 us)
/// and only broke even from about 1M weights (1024x1024: 105 us vs 118 us; 4096x4096 tied,
/// both ~1 ms, i.e. memory-bound). An idle machine with more cores would favour a lower
/// threshold; measure there (`flashmoe bench kernels`/`decode`) before lowering it.
const PAR_MIN_WEIGHTS: usize = 1 << 20;

/// The instruction set a product runs with, detected at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "aarch64")]
    Neon,
}

pub(crate) fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if x86::available() {
            return Isa::Avx2;
        }
    }
    // NEON is part of every aarch64 target Rust builds for Linux.
    #[cfg(target_arch = "aarch64")]
    return Isa::Neon;
    #[allow(unreachable_code)]
    Isa::Portable
}

/// The instruction set products run with on this CPU, for reports.
pub fn isa_name() -> &'static str {
    match isa() {
        Isa::Portable => "portable",
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => "avx2+fma",
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => "neon",
    }
}

/// Runs `f(first_row, y_chunk)` over `y` (one value per row, or `per_row` values per row),
/// in parallel on rayon's global pool when `work` weights are enough to pay for it.
///
/// The calling thread takes part: it and `threads - 1` helpers spawned on the pool claim
/// chunks of rows from a shared counter until none is left. From a thread outside the pool
/// (decode's main thread) a rayon `par_chunks` would instead block the caller and wake every
/// worker, and a product of a few hundred microseconds (an expert's 1024x4096 4-bit matrix is
/// ~2.3 MB, ~0.2 ms) lost a good part of its second core to those wake-ups (futex and
/// `sched_yield` were ~15% of a profile of `bench kernels`). A helper that wakes late simply
/// claims fewer chunks.
fn for_row_chunks(
    par_min: usize,
    work: usize,
    rows: usize,
    per_row: usize,
    y: &mut [f32],
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    let threads = rayon::current_num_threads();
    if work < par_min || threads <= 1 || rows < 2 {
        f(0, y);
        return;
    }
    // Enough chunks per thread that a late or preempted helper costs little, few enough that
    // claiming one is nothing next to computing it.
    let chunk = rows.div_ceil(threads * CHUNKS_PER_THREAD);
    let parts: Vec<std::sync::Mutex<&mut [f32]>> = y
        .chunks_mut(chunk * per_row)
        .map(std::sync::Mutex::new)
        .collect();
    let n = parts.len();
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let claim = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        // Each index is claimed once, so the lock is never contended.
        let mut yc = parts[i].lock().unwrap_or_else(|e| e.into_inner());
        // Counted even if `f` panics, so that the caller's wait below ends and the scope
        // passes the panic on instead of the caller spinning forever.
        let _counted = CountOnDrop(&done);
        f(i * chunk, &mut yc);
    };
    rayon::in_place_scope(|s| {
        for _ in 1..threads.min(n) {
            s.spawn(|_| claim());
        }
        claim();
        // The helpers' last chunks are at most one chunk's time away: wait for them spinning
        // rather than sleeping in the scope's latch, whose wake-up costs tens of microseconds
        // on a VM. (A helper that never started claims nothing, so `done` reaches `n`.)
        let mut spins = 0u32;
        while done.load(Ordering::Acquire) < n {
            spins += 1;
            if spins < 1 << 14 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    });
}

/// Adds one to its counter when dropped (at the end of a chunk, or while unwinding from it).
struct CountOnDrop<'a>(&'a AtomicUsize);

impl Drop for CountOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// Chunks of rows per thread in `for_row_chunks`.
const CHUNKS_PER_THREAD: usize = 8;

/// How `matvec` treats the activations of 2- and 4-bit affine products; process-wide, set once
/// at start-up. The library's default is `Exact`; the `flashmoe` binary sets `Int8` unless
/// `--exact` is given (`bench decode` reports the KL divergence and top-1 agreement of the two).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ActQuant {
    /// f32 arithmetic on the exact `x` (within 1e-5 relative of `matvec_ref`): what the golden
    /// tests hold to 1e-3 of transformers.
    #[default]
    Exact,
    /// `x` quantised to int8 per weight group (`max|x_g|` to 127), integer dot products with
    /// the codes (as llama.cpp's q4_0 x q8_0 dot does), the bias term on the same quantised `x`
    /// (as its q4_1 x q8_1 does). Faster when the f32 kernel is compute-bound (AVX2 without
    /// VNNI: one f32 FMA and one code extraction, plus for 2-bit codes a conversion, per 8
    /// weights), but each element of `x` moves by up to `max|x_g| / 254`: row `r` is off by up
    /// to `Σ_j |w_rj| max|x_g| / 254`, and in RMS by what rounding `x` costs, no more
    /// (`tests/int8_accuracy.rs`); on the same model about what llama.cpp's Q8_0 activations
    /// cost (`Q8_0Ref`). On tiny-a (MLX 4-bit, hidden 128, random weights,
    /// `tests/int8_activations.rs`) that moves the logits of the first decode step by 0.6 and,
    /// compounding through the KV cache and recurrent state, by up to 1.5 after 24 steps
    /// (logits up to ~3): golden tests cannot run with it. `matvec` (decode, experts'
    /// single-token products) uses it, and so does `matmul` from `int8mm::MIN_N` inputs up
    /// (prefill's dense products and well-used experts: `int8mm.rs`); 8-bit weights stay
    /// exact.
    Int8,
    /// A yardstick, not a speed path: the products `Int8` applies to take llama.cpp's Q8_0
    /// activations instead (`x` rounded in blocks of 32 elements, an f16 scale each:
    /// `int8::q8_0_round`) and then the exact f32 kernels. `bench decode` measures it beside
    /// `Int8` against `Exact` on the same model, so that "within llama.cpp's accuracy" is one
    /// model's figure rather than two models'.
    Q8_0Ref,
}

impl ActQuant {
    /// `exact`, `int8` or `q8_0-ref`, as reports and `--json` name it.
    pub fn name(self) -> &'static str {
        match self {
            ActQuant::Exact => "exact",
            ActQuant::Int8 => "int8",
            ActQuant::Q8_0Ref => "q8_0-ref",
        }
    }
}

static ACT_QUANT: AtomicU8 = AtomicU8::new(0);

/// Sets how every later `matvec` of 2- and 4-bit affine weights treats `x` (see `ActQuant`).
pub fn set_act_quant(q: ActQuant) {
    ACT_QUANT.store(q as u8, Ordering::Relaxed);
}

/// The current `ActQuant`; `Exact` unless `set_act_quant` changed it.
pub fn act_quant() -> ActQuant {
    match ACT_QUANT.load(Ordering::Relaxed) {
        0 => ActQuant::Exact,
        1 => ActQuant::Int8,
        _ => ActQuant::Q8_0Ref,
    }
}

/// `y = W x` with `x [cols]`, `y [rows]`, f32 accumulation (activations quantised to int8 for
/// 2/4-bit affine weights when `act_quant()` is `Int8`). Picks the fastest kernel for this CPU
/// and parallelises over output rows when the matrix is large.
pub fn matvec(w: &WeightView, x: &[f32], y: &mut [f32]) {
    matvec_with(isa(), PAR_MIN_WEIGHTS, w, x, y)
}

/// `matvec` with the activation treatment given here instead of by the process-wide switch
/// (benchmarks that measure both, tests that must not depend on global state).
pub fn matvec_act(aq: ActQuant, w: &WeightView, x: &[f32], y: &mut [f32]) {
    matvec_impl(isa(), PAR_MIN_WEIGHTS, aq, w, x, y)
}

/// `matvec` on a chosen ISA, parallel from `par_min` weights up (tests and threshold probes).
pub(crate) fn matvec_with(isa: Isa, par_min: usize, w: &WeightView, x: &[f32], y: &mut [f32]) {
    matvec_impl(isa, par_min, act_quant(), w, x, y)
}

/// `matvec_with` with the activation treatment chosen by the caller instead of the
/// process-wide switch (tests, benchmarks). `Int8` applies to 2- and 4-bit affine weights with
/// finite `x`; everything else takes the exact kernels.
pub(crate) fn matvec_impl(
    isa: Isa,
    par_min: usize,
    aq: ActQuant,
    w: &WeightView,
    x: &[f32],
    y: &mut [f32],
) {
    w.check();
    let (rows, cols) = (w.rows(), w.cols());
    assert_eq!(x.len(), cols, "matvec: x length vs cols");
    assert_eq!(y.len(), rows, "matvec: y length vs rows");
    let rounded;
    let x = match w {
        WeightView::Affine(a) if aq == ActQuant::Q8_0Ref && matches!(a.bits, 2 | 4) => {
            rounded = int8::q8_0_round(x);
            &rounded[..]
        }
        _ => x,
    };
    match w {
        WeightView::Affine(a) => {
            if aq == ActQuant::Int8 && matches!(a.bits, 2 | 4) {
                if let Some(prep) = int8_prep(isa, a.bits, a.group, x) {
                    for_row_chunks(par_min, rows * cols, rows, 1, y, |r0, yc| {
                        int8_rows(isa, a, &prep, r0, yc)
                    });
                    return;
                }
            }
            let isa = affine_isa(isa);
            let prep = affine_prep(isa, a.bits, a.group, x);
            for_row_chunks(par_min, rows * cols, rows, 1, y, |r0, yc| {
                affine_rows(isa, a, &prep, r0, yc)
            });
        }
        _ => for_row_chunks(par_min, rows * cols, rows, 1, y, |r0, yc| {
            for (i, yi) in yc.iter_mut().enumerate() {
                *yi = dense_row_dot(isa, w, r0 + i, x);
            }
        }),
    }
}

/// `x` prepared for the int8 kernel on `isa`; `None` when `x` is not finite.
fn int8_prep(isa: Isa, bits: u32, group: usize, x: &[f32]) -> Option<int8::Int8Prep> {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86::int8_prep(bits, group, x),
        _ => int8::Int8Prep::new(bits, group, x),
    }
}

fn int8_rows(isa: Isa, a: &AffineView, prep: &int8::Int8Prep, r0: usize, y: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86::int8_rows(a, prep, r0, y),
        _ => int8::int8_rows(a, prep, r0, y),
    }
}

/// `y[i] = W x[i]` for `n` inputs: `x [n, cols]`, `y [n, rows]`. Each weight row is read (and
/// dequantised) once and applied to all `n` inputs, so this is the prefill kernel.
pub fn matmul(w: &WeightView, x: &[f32], n: usize, y: &mut [f32]) {
    matmul_with(isa(), PAR_MIN_WEIGHTS, w, x, n, y)
}

/// `matmul` on a chosen ISA, parallel from `par_min` weights up (tests and threshold probes).
pub(crate) fn matmul_with(
    isa: Isa,
    par_min: usize,
    w: &WeightView,
    x: &[f32],
    n: usize,
    y: &mut [f32],
) {
    let kernel = match w {
        WeightView::Affine(a) if act_quant() == ActQuant::Int8 && int8mm_applies(a, n) => {
            Many::Int8
        }
        WeightView::Affine(a) if act_quant() == ActQuant::Q8_0Ref && int8mm_applies(a, n) => {
            // Each input rounded on its own (`cols` is a multiple of the group, so of 32).
            let rounded: Vec<f32> = x.chunks(a.cols).flat_map(int8::q8_0_round).collect();
            return matmul_impl(isa, par_min, Many::pick(isa, w, n), w, &rounded, n, y);
        }
        _ => Many::pick(isa, w, n),
    };
    matmul_impl(isa, par_min, kernel, w, x, n, y)
}

/// Whether an int8-activation product of `n` inputs takes `int8mm` (2- and 4-bit codes, enough
/// inputs to pay for unpacking each weight tile).
fn int8mm_applies(a: &AffineView, n: usize) -> bool {
    matches!(a.bits, 2 | 4) && n >= int8mm::MIN_N
}

/// `matmul_impl` by `int8mm` with its `kernel`; false (nothing written) when an input is not
/// finite or the shape does not suit it.
pub(crate) fn matmul_int8(
    kernel: int8mm::Kernel,
    par_min: usize,
    a: &AffineView,
    x: &[f32],
    n: usize,
    y: &mut [f32],
) -> bool {
    let Some(batch) = int8mm::Batch::new(a.group, x, n, a.cols) else {
        return false;
    };
    let (rows, cols) = (a.rows, a.cols);
    let mut yt = vec![0f32; rows * n];
    for_row_chunks(par_min, rows * cols * n, rows, n, &mut yt, |r0, ytc| {
        int8mm::rows(kernel, a, &batch, r0, ytc)
    });
    transpose_into(&yt, rows, n, y);
    true
}

/// The kernel of a product of several inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Many {
    /// Rows dequantised a few at a time, one dot product per row and input (`matmul_rows`).
    Rows,
    /// AVX2: `blocked.rs`, for many inputs.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Blocked,
    /// AVX2, affine weights: `x86/few.rs`, for a few inputs.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Few,
    /// 2- and 4-bit affine weights with int8 activations: `int8mm.rs`, the best tile kernel
    /// this CPU has.
    Int8,
}

impl Many {
    /// The fastest kernel for `n` inputs on `isa`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn pick(isa: Isa, w: &WeightView, n: usize) -> Many {
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx2 {
            if matches!(w, WeightView::Affine(_)) && n <= x86::FEW_MAX {
                return Many::Few;
            }
            if n >= BLOCKED_MIN_N {
                return Many::Blocked;
            }
        }
        Many::Rows
    }
}

/// `matmul_with`, with the kernel chosen by the caller (`Blocked` and `Few` are AVX2 only,
/// `Few` affine only).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub(crate) fn matmul_impl(
    isa: Isa,
    par_min: usize,
    kernel: Many,
    w: &WeightView,
    x: &[f32],
    n: usize,
    y: &mut [f32],
) {
    w.check();
    let (rows, cols) = (w.rows(), w.cols());
    assert_eq!(x.len(), n * cols, "matmul: x length vs n * cols");
    assert_eq!(y.len(), n * rows, "matmul: y length vs n * rows");
    if n == 0 || rows == 0 {
        return;
    }
    if n == 1 {
        return matvec_with(isa, par_min, w, x, y);
    }
    let kernel = match (kernel, w) {
        (Many::Int8, WeightView::Affine(a)) => {
            let k = match isa {
                Isa::Portable => int8mm::Kernel::Plain,
                _ => int8mm::Kernel::best(),
            };
            if matmul_int8(k, par_min, a, x, n, y) {
                return;
            }
            Many::pick(isa, w, n)
        }
        (Many::Int8, _) => Many::pick(isa, w, n),
        (k, _) => k,
    };
    // Computed transposed, yt [rows, n], so that each parallel task owns a contiguous slice;
    // the transpose back costs n * rows, nothing next to n * rows * cols.
    #[cfg(target_arch = "x86_64")]
    if let (Isa::Avx2, Many::Few, WeightView::Affine(a)) = (isa, kernel, w) {
        return matmul_few(par_min, a, x, n, y);
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 && kernel == Many::Blocked {
        return with_scratch(rows, n, y, |xp, yt| {
            let perm_bits = match w {
                WeightView::Affine(a) => Some(a.bits),
                _ => None,
            };
            blocked::pack_inputs(x, n, cols, perm_bits, xp);
            let xp: &[f32] = xp;
            // Row chunks in whole register tiles, so that only a chunk's last tile is partial.
            let threads = rayon::current_num_threads();
            let chunk = rows.div_ceil(threads * 4).next_multiple_of(blocked::MR);
            let run = |r0: usize, ytc: &mut [f32]| blocked::rows_blocked(w, xp, n, r0, ytc);
            if rows * cols * n < par_min || threads <= 1 || rows <= chunk {
                run(0, yt);
            } else {
                yt.par_chunks_mut(chunk * n)
                    .enumerate()
                    .for_each(|(i, ytc)| run(i * chunk, ytc));
            }
        });
    }
    let mut yt = vec![0f32; rows * n];
    // Affine rows are dequantised in the lane-permuted order of `lanes::permute_x`, so the inputs
    // are permuted the same way once per call (a dot product does not care about the order).
    let xp: Vec<f32>;
    let xs: &[f32] = match w {
        WeightView::Affine(a) => {
            let mut buf = vec![0f32; n * cols];
            for (src, dst) in x.chunks_exact(cols).zip(buf.chunks_exact_mut(cols)) {
                lanes::permute_x(a.bits, src, dst);
            }
            xp = buf;
            &xp
        }
        _ => x,
    };
    for_row_chunks(par_min, rows * cols * n, rows, n, &mut yt, |r0, ytc| {
        matmul_rows(isa, w, xs, n, r0, ytc)
    });
    transpose_into(&yt, rows, n, y);
}

/// `matmul_impl` by `x86/few.rs`.
#[cfg(target_arch = "x86_64")]
fn matmul_few(par_min: usize, a: &AffineView, x: &[f32], n: usize, y: &mut [f32]) {
    let (rows, cols) = (a.rows, a.cols);
    with_scratch(rows, n, y, |xp, yt| {
        let off = x86::few_pack(a.bits, x, n, cols, xp);
        let xg = &xp[off..off + n * cols];
        for_row_chunks(par_min, rows * cols * n, rows, n, yt, |r0, ytc| {
            x86::affine_few(a, xg, n, r0, ytc)
        });
    });
}

/// Runs `f(xp, yt)` on this thread's kept scratch (`blocked::take_scratch`): `xp` for the
/// packed inputs, `yt [rows, n]` for the transposed result, which is then written to `y`.
#[cfg(target_arch = "x86_64")]
fn with_scratch(rows: usize, n: usize, y: &mut [f32], f: impl FnOnce(&mut Vec<f32>, &mut [f32])) {
    let (mut xp, mut yt_buf) = blocked::take_scratch();
    yt_buf.resize(rows * n, 0.0);
    f(&mut xp, &mut yt_buf[..rows * n]);
    transpose_into(&yt_buf[..rows * n], rows, n, y);
    blocked::put_scratch((xp, yt_buf));
}

/// From this many inputs up, AVX2 products use the blocked kernel of `blocked.rs`; below, the
/// per-row kernel wastes less of its register tile (16 inputs wide).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const BLOCKED_MIN_N: usize = 8;

/// `y [n, rows]` from `yt [rows, n]`, in tiles of `TR` x `TR`: row by row, a prefill
/// chunk's product (512 x 12288) wrote each float to a different cache line and page.
fn transpose_into(yt: &[f32], rows: usize, n: usize, y: &mut [f32]) {
    for r0 in (0..rows).step_by(TR) {
        for i0 in (0..n).step_by(TR) {
            for r in r0..rows.min(r0 + TR) {
                for i in i0..n.min(i0 + TR) {
                    y[i * rows + r] = yt[r * n + i];
                }
            }
        }
    }
}

/// Side of `transpose_into`'s tiles: 16 floats are a cache line.
const TR: usize = 16;

/// Rows per step of `matmul_rows`: each loaded input element is used against this many rows.
const MM_ROWS: usize = 4;

fn matmul_rows(isa: Isa, w: &WeightView, xs: &[f32], n: usize, r0: usize, yt: &mut [f32]) {
    let cols = w.cols();
    let nrows = yt.len() / n;
    let mut buf = vec![0f32; MM_ROWS * cols];
    let mut sbuf = vec![0f32; cols + 8];
    let mut bbuf = vec![0f32; cols + 8];
    let mut r = 0;
    while r < nrows {
        let m = MM_ROWS.min(nrows - r);
        for k in 0..m {
            let row = r0 + r + k;
            let out = &mut buf[k * cols..(k + 1) * cols];
            match w {
                WeightView::F32 { data, .. } => {
                    out.copy_from_slice(&data[row * cols..(row + 1) * cols])
                }
                WeightView::Bf16 { data, .. } => {
                    lanes::bf16_to_f32(&data[row * cols..(row + 1) * cols], out)
                }
                WeightView::F16 { data, .. } => {
                    lanes::f16_to_f32(&data[row * cols..(row + 1) * cols], out)
                }
                WeightView::Affine(a) => {
                    let ng = a.groups_per_row();
                    a.scales.to_f32_into(row * ng, &mut sbuf[..ng]);
                    a.biases.to_f32_into(row * ng, &mut bbuf[..ng]);
                    let wpr = a.words_per_row();
                    let wrow = &a.w[row * wpr..(row + 1) * wpr];
                    match isa {
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx2 => x86::dequant_row_permuted(a, wrow, &sbuf, &bbuf, out),
                        _ => lanes::dequant_row_permuted(a, wrow, &sbuf, &bbuf, out),
                    }
                }
            }
        }
        for i in 0..n {
            let xi = &xs[i * cols..(i + 1) * cols];
            let mut d = [0f32; MM_ROWS];
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => x86::dot_rows(&buf, cols, m, xi, &mut d),
                #[cfg(target_arch = "aarch64")]
                Isa::Neon => neon::dot_rows(&buf, cols, m, xi, &mut d),
                Isa::Portable => lanes::dot_rows(&buf, cols, m, xi, &mut d),
            }
            for k in 0..m {
                yt[(r + k) * n + i] = d[k];
            }
        }
        r += m;
    }
}

/// The ISA for an affine product: `isa`, unless the AVX2 kernel cannot read its codes as
/// denormal f32s (see `x86::denormal_inputs`).
fn affine_isa(isa: Isa) -> Isa {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if !x86::denormal_inputs() => Isa::Portable,
        _ => isa,
    }
}

/// `x` prepared for `isa`'s affine kernel (see `lanes::AffinePrep`).
fn affine_prep(isa: Isa, bits: u32, group: usize, x: &[f32]) -> lanes::AffinePrep {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86::affine_prep(bits, group, x),
        _ => lanes::AffinePrep::new(bits, group, x, lanes::CodeRead::Converted),
    }
}

fn affine_rows(isa: Isa, a: &AffineView, prep: &lanes::AffinePrep, r0: usize, y: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86::affine_rows(a, prep, r0, y),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => neon::affine_rows(a, prep, r0, y),
        Isa::Portable => lanes::affine_rows(a, prep, r0, y),
    }
}

fn dense_row_dot(isa: Isa, w: &WeightView, row: usize, x: &[f32]) -> f32 {
    let cols = x.len();
    let range = row * cols..(row + 1) * cols;
    match (isa, w) {
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, WeightView::F32 { data, .. }) => x86::dot_f32(&data[range], x),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, WeightView::Bf16 { data, .. }) => x86::dot_bf16(&data[range], x),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, WeightView::F16 { data, .. }) => x86::dot_f16(&data[range], x),
        #[cfg(target_arch = "aarch64")]
        (Isa::Neon, WeightView::F32 { data, .. }) => neon::dot_f32(&data[range], x),
        #[cfg(target_arch = "aarch64")]
        (Isa::Neon, WeightView::Bf16 { data, .. }) => neon::dot_bf16(&data[range], x),
        (_, WeightView::F32 { data, .. }) => lanes::dot_f32(&data[range], x),
        (_, WeightView::Bf16 { data, .. }) => lanes::dot_bf16(&data[range], x),
        (_, WeightView::F16 { data, .. }) => lanes::dot_f16(&data[range], x),
        (_, WeightView::Affine(_)) => unreachable!("affine rows go through affine_rows"),
    }
}
