//! Elementwise and reduction ops of a forward pass: rmsnorm, silu, swiglu, softmax, top-k,
//! dot, axpy. Bodies are plain loops over 8-lane chunks, compiled twice: once for the baseline
//! target and once inside an AVX2+FMA `#[target_feature]` wrapper picked at run time, so LLVM
//! vectorises both. Plain twins live in the tests.

use super::lanes;
#[cfg(target_arch = "x86_64")]
use super::{isa, Isa};

/// Runs `$body` (a call to an `#[inline(always)]` function) in an AVX2+FMA context when the CPU
/// has it, so the inlined loop is vectorised 8 wide.
macro_rules! multiversion {
    ($name:ident, ($($arg:ident : $ty:ty),*) -> $ret:ty, $body:ident) => {
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if isa() == Isa::Avx2 {
                    // SAFETY: `isa()` detected AVX2 and FMA on this CPU.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

/// `a · b` in f32 with 8 partial sums.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: lengths");
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx2 {
        return super::x86::dot_f32(a, b);
    }
    #[cfg(target_arch = "aarch64")]
    return super::neon::dot_f32(a, b);
    #[allow(unreachable_code)]
    lanes::dot8(a, b)
}

/// `y += a * x`.
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy: lengths");
    axpy_mv(a, x, y)
}

#[inline(always)]
fn axpy_body(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}
multiversion!(axpy_mv, (a: f32, x: &[f32], y: &mut [f32]) -> (), axpy_body);

/// RMSNorm: `out = x / sqrt(mean(x^2) + eps) * w'` with `w' = 1 + w` when `add_one`
/// (HF's zero-centred "RMSNorm1p", arch-spec §4.1) and `w' = w` otherwise (MLX checkpoints,
/// which store `1 + w`). All in f32.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, add_one: bool, out: &mut [f32]) {
    assert_eq!(x.len(), w.len(), "rmsnorm: x vs w length");
    assert_eq!(x.len(), out.len(), "rmsnorm: x vs out length");
    if x.is_empty() {
        return;
    }
    let inv = 1.0 / (dot(x, x) / x.len() as f32 + eps).sqrt();
    let off = if add_one { 1.0 } else { 0.0 };
    scale_mul_mv(x, w, inv, off, out)
}

#[inline(always)]
fn scale_mul_body(x: &[f32], w: &[f32], inv: f32, off: f32, out: &mut [f32]) {
    for ((o, xi), wi) in out.iter_mut().zip(x).zip(w) {
        *o = xi * inv * (wi + off);
    }
}
multiversion!(scale_mul_mv, (x: &[f32], w: &[f32], inv: f32, off: f32, out: &mut [f32]) -> (), scale_mul_body);

/// `e^x` for f32 without branches, so loops over it vectorise: `x = n ln2 + r`, `|r| <= ln2/2`,
/// `e^x = 2^n e^r` with `e^r` from its Taylor series to `r^7` (truncation < 1e-8 relative).
/// Inputs are clamped to [-87, 88], the range where `2^n` is a normal f32.
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    // Cody-Waite split of ln 2: the high part has few mantissa bits so n * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + SHIFTER;
    let n_bits = t.to_bits() as i32 - SHIFTER.to_bits() as i32;
    let n = t - SHIFTER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    f32::from_bits(((n_bits + 127) << 23) as u32) * p
}

#[inline(always)]
fn silu1(v: f32) -> f32 {
    v / (1.0 + exp_approx(-v))
}

/// `out = x * sigmoid(x)`.
pub fn silu(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "silu: lengths");
    silu_mv(x, out)
}

#[inline(always)]
fn silu_body(x: &[f32], out: &mut [f32]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o = silu1(*v);
    }
}
multiversion!(silu_mv, (x: &[f32], out: &mut [f32]) -> (), silu_body);

/// SwiGLU: `out = silu(gate) * up`.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert_eq!(gate.len(), up.len(), "swiglu: gate vs up length");
    assert_eq!(gate.len(), out.len(), "swiglu: gate vs out length");
    swiglu_mv(gate, up, out)
}

#[inline(always)]
fn swiglu_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu1(*g) * u;
    }
}
multiversion!(swiglu_mv, (gate: &[f32], up: &[f32], out: &mut [f32]) -> (), swiglu_body);

/// `x = exp(x - max x) / Σ exp(x - max x)`, in place.
pub fn softmax_inplace(x: &mut [f32]) {
    if x.is_empty() {
        return;
    }
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum = exp_sub_mv(x, max);
    axpy_scale_mv(x, 1.0 / sum)
}

#[inline(always)]
fn exp_sub_body(x: &mut [f32], max: f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut it = x.chunks_exact_mut(8);
    for c in &mut it {
        for l in 0..8 {
            c[l] = exp_approx(c[l] - max);
            acc[l] += c[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for v in it.into_remainder() {
        *v = exp_approx(*v - max);
        s += *v;
    }
    s
}
multiversion!(exp_sub_mv, (x: &mut [f32], max: f32) -> f32, exp_sub_body);

#[inline(always)]
fn scale_body(x: &mut [f32], s: f32) {
    for v in x.iter_mut() {
        *v *= s;
    }
}
multiversion!(axpy_scale_mv, (x: &mut [f32], s: f32) -> (), scale_body);

/// Ranking key of `top_k`: NaN ranks as -inf.
#[inline]
fn key(v: f32) -> f32 {
    if v.is_nan() {
        f32::NEG_INFINITY
    } else {
        v
    }
}

/// The `k` largest values as `(index, value)`, descending by value, ties by lower index
/// (NaN ranks lowest). Returns `min(k, len)` entries. O(len * k), for the router's small k.
pub fn top_k(probs: &[f32], k: usize) -> Vec<(usize, f32)> {
    let k = k.min(probs.len());
    let mut best: Vec<(usize, f32)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return best;
    }
    for (i, &v) in probs.iter().enumerate() {
        let kv = key(v);
        if best.len() == k && kv <= key(best[k - 1].1) {
            continue;
        }
        // Strictly greater moves ahead: an equal value found later has a higher index.
        let pos = best
            .iter()
            .position(|&(_, b)| kv > key(b))
            .unwrap_or(best.len());
        best.insert(pos, (i, v));
        best.truncate(k);
    }
    best
}
