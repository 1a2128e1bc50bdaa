//! The int8-activation affine product of many inputs (prefill; `ActQuant::Int8`): 2- and 4-bit
//! codes times int8 activations in integer multiply-adds, the way llama.cpp's repacked
//! `q4_0` GEMMs do it. This file holds the preparation of the inputs and of the weight tiles,
//! the plain twin of the SIMD tile kernels (`x86/int8mm.rs`: AVX2 `maddubs` and AVX512-VNNI
//! `vpdpbusd`; `neon_int8mm.rs`: NEON `sdot`), and the driver that picks one.
//!
//! - Inputs (`Batch`): each quantised per weight group as the matvec's `Int8Prep` does
//!   (`unit_g = max|x_g| / 127`, ties to even), kept in natural element order with each
//!   group's unit and bias-term sum `unit_g Σ x_q` (`int8::quantised_sum`).
//! - Weights: a tile of `TILE` = 8 rows at a time is unpacked to one byte per code and
//!   interleaved by 4 columns, `ws[(j * 8 + l) * 4 + c] = code(row r0 + l, col 4 j + c)`, so that
//!   one 32-byte load holds 4 columns of all 8 rows and one broadcast 4-byte load holds the same
//!   4 columns of an input: a `vpdpbusd` of the two is 32 multiply-adds whose 8 lanes are the 8
//!   rows' partial dot products. No horizontal sums: a tile's 8 lanes are 8 outputs.
//! - Per group `g`, each lane's integer dot `d` (at most `64 * 15 * 127`, exact in f32) meets
//!   its factor once: `acc = fma(d, scale_g * unit_g, acc)`, then
//!   `acc = fma(bias_g, unit_g Σ x_q, acc)`.
//!   Every ISA does these f32 operations in this order, so all of them give the same bits (the
//!   tests compare them exactly).
//!
//! Accuracy is the matvec's (`int8.rs` header): each element of `x` off by at most half a unit.
use super::AffineView;

/// Rows per tile: one 256-bit register of i32 (two NEON registers).
pub(crate) const TILE: usize = 8;

/// From this many inputs up, an int8 product takes this kernel; below, the f32 kernels (the
/// unpacking of each weight tile is then not paid back). Measured by CPU time on one core of
/// the dev VM (AVX512-VNNI, `matvec_probe` q4 768x2048, 7 passes, load average ~15), int8
/// against f32 GMAC/s: 16 inputs 36 / 38, 32: 43 / 41, 64: 49 / 34, 256: 51 / 36.
pub(crate) const MIN_N: usize = 32;

/// `n` inputs quantised for the tile kernels.
pub(crate) struct Batch {
    pub n: usize,
    pub cols: usize,
    /// Groups per input (`cols / group`).
    pub ng: usize,
    /// Quads of columns per group (`group / 4`).
    pub qpg: usize,
    /// `[n, cols]`, natural order.
    pub xq: Vec<i8>,
    /// `[n, ng]`: `max|x_g| / 127`.
    pub unit: Vec<f32>,
    /// `[n, ng]`: `unit_g Σ x_q` (`int8::quantised_sum`).
    pub xsum: Vec<f32>,
}

impl Batch {
    /// `None` when an input holds a non-finite value (the f32 kernels then propagate it) or
    /// the shape does not suit the tile kernels (a group not a multiple of 4 columns).
    pub fn new(group: usize, x: &[f32], n: usize, cols: usize) -> Option<Batch> {
        if group == 0 || !group.is_multiple_of(4) || !cols.is_multiple_of(group) {
            return None;
        }
        assert_eq!(x.len(), n * cols, "Batch: x length vs n * cols");
        let ng = cols / group;
        let mut b = Batch {
            n,
            cols,
            ng,
            qpg: group / 4,
            xq: vec![0; n * cols],
            unit: Vec::with_capacity(n * ng),
            xsum: Vec::with_capacity(n * ng),
        };
        for (xi, qi) in x.chunks_exact(cols).zip(b.xq.chunks_exact_mut(cols)) {
            if !super::int8::quantize_groups(group, xi, qi, &mut b.unit, &mut b.xsum) {
                return None;
            }
        }
        Some(b)
    }
}

/// One tile of weights as the kernels read it.
pub(crate) struct Tile {
    /// `[cols / 4][TILE][4]` codes, one per byte (rows past the matrix are zero).
    pub ws: Vec<u8>,
    /// `[ng][TILE]`: the rows' scales and biases (zero past the matrix).
    pub sl: Vec<f32>,
    pub bl: Vec<f32>,
}

impl Tile {
    pub fn new(cols: usize, ng: usize) -> Tile {
        Tile {
            ws: vec![0; cols * TILE],
            sl: vec![0.0; ng * TILE],
            bl: vec![0.0; ng * TILE],
        }
    }

    /// Rows `r0 .. r0 + TILE` of `a` (those that exist). On x86-64 the codes are spread to
    /// bytes by BMI2's `pdep` (one instruction per 4 codes instead of eight), else by `spread`.
    pub fn load(&mut self, a: &AffineView, r0: usize) {
        #[cfg(target_arch = "x86_64")]
        if super::x86::available() {
            // SAFETY: `available` includes BMI2.
            return unsafe { self.load_bmi2(a, r0) };
        }
        self.load_plain(a, r0)
    }

    /// `load` with the plain `spread` (its twin; the tests compare them).
    pub fn load_plain(&mut self, a: &AffineView, r0: usize) {
        self.load_with(a, r0, spread)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "bmi2")]
    unsafe fn load_bmi2(&mut self, a: &AffineView, r0: usize) {
        self.load_with(a, r0, |bits, w, k| {
            use std::arch::x86_64::_pdep_u32;
            match bits {
                4 => _pdep_u32(w >> (16 * k), 0x0F0F_0F0F),
                _ => _pdep_u32(w >> (8 * k), 0x0303_0303),
            }
        })
    }

    #[inline(always)]
    fn load_with(&mut self, a: &AffineView, r0: usize, spread: impl Fn(u32, u32, usize) -> u32) {
        assert!(
            matches!(a.bits, 2 | 4),
            "int8 tiles take 2- and 4-bit codes"
        );
        let (ng, wpr) = (a.groups_per_row(), a.words_per_row());
        let quads_per_word = 8 / a.bits as usize;
        let ws: &mut [u32] = bytemuck::cast_slice_mut(&mut self.ws);
        for l in 0..TILE {
            let row = r0 + l;
            if row >= a.rows {
                for j in 0..a.cols / 4 {
                    ws[j * TILE + l] = 0;
                }
                self.sl[l..].iter_mut().step_by(TILE).for_each(|v| *v = 0.0);
                self.bl[l..].iter_mut().step_by(TILE).for_each(|v| *v = 0.0);
                continue;
            }
            for (wi, &w) in a.w[row * wpr..(row + 1) * wpr].iter().enumerate() {
                for k in 0..quads_per_word {
                    ws[(wi * quads_per_word + k) * TILE + l] = spread(a.bits, w, k);
                }
            }
            for g in 0..ng {
                self.sl[g * TILE + l] = a.scales.get(row * ng + g);
                self.bl[g * TILE + l] = a.biases.get(row * ng + g);
            }
        }
    }
}

/// The `k`-th quad of codes of word `w` (codes LSB-first), one code per byte.
#[inline]
fn spread(bits: u32, w: u32, k: usize) -> u32 {
    match bits {
        4 => {
            let v = w >> (16 * k);
            (v & 0xF) | ((v & 0xF0) << 4) | ((v & 0xF00) << 8) | ((v & 0xF000) << 12)
        }
        2 => {
            let v = w >> (8 * k);
            (v & 0x3) | ((v & 0xC) << 6) | ((v & 0x30) << 12) | ((v & 0xC0) << 18)
        }
        b => unreachable!("int8 tiles take 2- and 4-bit codes, not {b}"),
    }
}

/// Plain twin of the tile kernels: `out[i * TILE + l]` = row `l` of the tile times input `i`.
pub(crate) fn tile_plain(t: &Tile, b: &Batch, out: &mut [f32]) {
    assert!(out.len() >= b.n * TILE);
    for i in 0..b.n {
        let xq = &b.xq[i * b.cols..(i + 1) * b.cols];
        let mut acc = [0f32; TILE];
        for g in 0..b.ng {
            let mut d = [0i32; TILE];
            for j in g * b.qpg..(g + 1) * b.qpg {
                for (l, dl) in d.iter_mut().enumerate() {
                    for c in 0..4 {
                        *dl += t.ws[(j * TILE + l) * 4 + c] as i32 * xq[4 * j + c] as i32;
                    }
                }
            }
            let (u, s) = (b.unit[i * b.ng + g], b.xsum[i * b.ng + g]);
            for l in 0..TILE {
                let f = t.sl[g * TILE + l] * u;
                acc[l] = (d[l] as f32).mul_add(f, acc[l]);
                acc[l] = t.bl[g * TILE + l].mul_add(s, acc[l]);
            }
        }
        out[i * TILE..(i + 1) * TILE].copy_from_slice(&acc);
    }
}

/// Which tile kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    Plain,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni,
    #[cfg(target_arch = "aarch64")]
    Sdot,
}

impl Kernel {
    /// The fastest this CPU has.
    pub fn best() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if super::x86::int8mm::vnni_available() {
                return Kernel::Vnni;
            }
            if super::x86::available() {
                return Kernel::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        if super::neon_int8mm::available() {
            return Kernel::Sdot;
        }
        Kernel::Plain
    }

    /// Every kernel this CPU can run (tests).
    #[cfg(test)]
    pub fn all() -> Vec<Kernel> {
        let mut v = vec![Kernel::Plain];
        #[cfg(target_arch = "x86_64")]
        {
            if super::x86::available() {
                v.push(Kernel::Avx2);
            }
            if super::x86::int8mm::vnni_available() {
                v.push(Kernel::Vnni);
            }
        }
        #[cfg(target_arch = "aarch64")]
        if super::neon_int8mm::available() {
            v.push(Kernel::Sdot);
        }
        v
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Plain => "plain",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => "avx2-maddubs",
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => "avx512-vnni",
            #[cfg(target_arch = "aarch64")]
            Kernel::Sdot => "neon-sdot",
        }
    }

    pub(crate) fn tile(self, t: &Tile, b: &Batch, out: &mut [f32]) {
        match self {
            Kernel::Plain => tile_plain(t, b, out),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => super::x86::int8mm::tile(false, t, b, out),
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => super::x86::int8mm::tile(true, t, b, out),
            #[cfg(target_arch = "aarch64")]
            Kernel::Sdot => super::neon_int8mm::tile(t, b, out),
        }
    }
}

/// Rows `r0 .. r0 + yt.len() / n` of `W x[i]` into `yt [rows, n]` with `kernel`.
pub(crate) fn rows(kernel: Kernel, a: &AffineView, b: &Batch, r0: usize, yt: &mut [f32]) {
    assert!(matches!(a.bits, 2 | 4) && a.cols == b.cols && a.groups_per_row() == b.ng);
    let n = b.n;
    let nrows = yt.len() / n;
    let mut tile = Tile::new(a.cols, b.ng);
    let mut out = vec![0f32; n * TILE];
    for t0 in (0..nrows).step_by(TILE) {
        tile.load(a, r0 + t0);
        kernel.tile(&tile, b, &mut out);
        for l in 0..TILE.min(nrows - t0) {
            for i in 0..n {
                yt[(t0 + l) * n + i] = out[i * TILE + l];
            }
        }
    }
}
