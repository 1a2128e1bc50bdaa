//! Typed launches of the kernels in kernels.cu, and weight matrices in VRAM ([`DMat`]).
//!
//! Owns the mapping from a `flashmoe_core::weights::Linear` to device bytes and to the kernel
//! that reads them. Never decides what to compute; the backend (backend/) does.
use cudarc::driver::{CudaStream, LaunchConfig};
use flashmoe_core::residency::SlotFormat;
use flashmoe_core::store::DType;
use flashmoe_core::weights::Linear;

use crate::device::{DBuf, Device, Epi, MvBatch, A, MAXP};
use crate::kernel::{Bits, DVar, Dt, Kernel, QVar};
use crate::{CudaError, Result};

thread_local! {
    /// Which decode kernel affine matrices launched from this thread use: 0 = by shape,
    /// 1 = exact float, 3 = tensor cores, 4 = prepared-x dp4a (per thread, so parallel tests do
    /// not see each other's choice).
    static AFFINE_PATH: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
    static MMA_TILE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    static ROWS_PER_WARP: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// On unless turned off for this thread.
    static EPILOGUES: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Whether the token path folds work into a matvec's epilogue ([`Epilogue`]) and has the
/// attention output prepared by `attn_decode`, for launches from this thread, or runs the plain
/// twins (`gdn_conv`, `argmax`, `quant_x3`); tests compare the two, and the `cuda_bench`
/// example turns them off for a bench A/B (`FLASHMOE_CUDA_EPILOGUES=0`, read once in its
/// `main`: nothing on the token path reads the environment).
pub fn set_epilogues(on: bool) {
    EPILOGUES.with(|c| c.set(on));
}

pub fn epilogues() -> bool {
    EPILOGUES.with(|c| c.get())
}

/// Work a decode matvec does with its outputs besides writing them, one launch fewer.
#[derive(Clone, Copy, Debug)]
pub enum Epilogue {
    /// The GatedDeltaNet causal conv (as [`gdn_conv`]) of output rows `< g.conv_dim()`: the
    /// in-projection's q, k and v channels.
    Conv {
        state: u64,
        w: u64,
        u: u64,
        cd: usize,
        k: usize,
    },
    /// Greedy decoding's argmax key (as [`argmax`]), which must be zero before the launch.
    Argmax { key: u64 },
}

/// Longest conv kernel the `mpc` epilogue takes (`CONV_MAXK` in kernels.cu).
const CONV_MAXK: usize = 8;

/// Whether [`matvec_epilogue`] runs `m` with x prepared at `pre`: the `mp` kernel reading x
/// prepared for its width, and (for the conv) a kernel of at most `CONV_MAXK` taps.
pub fn epilogue_fits(m: &DevMat, pre: Option<Prepared>, e: &Epilogue) -> bool {
    let Ok((k, _)) = m.fmt.kernel(true, m.rows, m.cols) else {
        return false;
    };
    let taps = match e {
        Epilogue::Conv { k, cd, .. } => (1..=CONV_MAXK).contains(k) && *cd <= m.rows,
        Epilogue::Argmax { .. } => true,
    };
    epilogues()
        && taps
        && k.qvar() == Some(QVar::Mp)
        && pre.is_some_and(|p| Some(p.bits) == m.prepared_bits())
}

/// y = m x (one token, x prepared at `pre`) with the epilogue `e` (see [`epilogue_fits`]).
pub fn matvec_epilogue(
    dev: &Device,
    m: &DevMat,
    x: u64,
    y: u64,
    pre: Prepared,
    e: Epilogue,
) -> Result<()> {
    if !epilogue_fits(m, Some(pre), &e) {
        return Err(CudaError::Unsupported("matvec epilogue shape".into()));
    }
    let (k, smem) = m.fmt.kernel(true, m.rows, m.cols)?;
    let (k, blocks, threads) = launch_shape(dev.sms, k, m.rows, 1);
    let (var, epi) = match e {
        Epilogue::Conv { state, w, u, cd, k } => (
            QVar::Mpc,
            Epi {
                state,
                w,
                u,
                cd: cd as i32,
                k: k as i32,
                key: 0,
            },
        ),
        Epilogue::Argmax { key } => (
            QVar::Mpa,
            Epi {
                key,
                ..Default::default()
            },
        ),
    };
    let mut p = MvBatch::default();
    (p.w[0], p.s[0], p.b[0], p.x[0], p.y[0]) = (m.w, m.s, m.b, x, y);
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem,
    };
    let k = k.with_qvar(var);
    launch_prepared(dev, m, k, cfg, A::B(&p), Some(pre), false, Some(&epi))
}

/// Decode kernel choice for affine matrices launched from the calling thread (bench and tests
/// force one to compare).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AffinePath {
    /// The prepared-x dp4a kernel where its layout fits, else exact float.
    Auto,
    Float,
    /// The tensor-core kernel wherever its layout fits (else exact float).
    Mma,
    /// dp4a with x prepared once per product as three int8 levels (`mp`) wherever its layout
    /// fits (else exact float).
    Prepared,
}

pub fn set_affine_path(p: AffinePath) {
    let v = match p {
        AffinePath::Auto => 0,
        AffinePath::Float => 1,
        AffinePath::Mma => 3,
        AffinePath::Prepared => 4,
    };
    AFFINE_PATH.with(|c| c.set(v));
}

/// Rows per warp tile of the tensor-core kernel: 16 or 32 (0 = by shape). Bench only.
pub fn set_mma_tile(rows: usize) {
    MMA_TILE.with(|c| c.set(rows));
}

fn mma_tile(rows: usize) -> usize {
    match MMA_TILE.with(|c| c.get()) {
        16 => 16,
        32 => 32,
        _ if rows <= MMA_TILE32_MIN_ROWS => 16,
        _ => 32,
    }
}

/// Above this many rows the tensor-core kernel takes 32-row tiles (x staged once per 32 rows);
/// below, 16-row tiles give more blocks to fill the SMs.
const MMA_TILE32_MIN_ROWS: usize = 8192;

/// Shared memory of the tensor-core kernel's x staging: per 16-byte chunk hi and lo pair
/// fragments (each padded by 16 bytes), a zero fragment, and (scale, sum) per chunk.
fn mma_smem(bits: u32, cols: usize) -> usize {
    let ps = 4 * (16 / bits as usize) + 4;
    let nch = cols * bits as usize / 128;
    (nch * 2 * ps + ps) * 4 + nch * 8
}

/// Whether the tensor-core kernel may run this matrix: its chunk (16 bytes of codes) lies in
/// one group, rows are whole chunks, and the staged x fits 48 KiB of shared memory.
fn mma_fits(bits: u32, lg: u32, cols: usize) -> bool {
    let ce = 128 / bits as usize;
    (1usize << lg) >= ce && cols.is_multiple_of(ce) && mma_smem(bits, cols) <= 48 * 1024
}

/// The tensor-core kernel (`mt`: x as f16 hi + lo parts per 16-byte chunk with a power-of-two
/// scale, about 22 bits, f32 accumulation).
fn use_mma() -> bool {
    // Measured (H200, f23a34d): it beat the float kernel on 8-bit 4096x4096 (0.34 vs 0.25 of
    // D2D) but not on 4-bit. At d5a6068 the prepared-x dp4a kernel beat it on 8-bit too (0.418
    // vs 0.391 and 0.353 vs 0.344 in two runs), so it runs only when forced.
    AFFINE_PATH.with(|c| c.get()) == 3
}

/// Longest row whose input vector the decode kernel stages in shared memory (< 48 KiB).
const XSM_MAX_COLS: usize = 10240;

/// Bytes of one x prepared for the `mp` kernels (`qx_size` in kernels.cu): per chunk of 4 words
/// three int8 levels of its elements plus 16 bytes of padding, then a scale and a sum per x
/// block; rounded up to 16 bytes.
pub fn qx_size(bits: u32, cols: usize) -> usize {
    let epw = 32 / bits as usize;
    let xb = (4 * epw).min(32);
    ((cols / (4 * epw)) * (12 * epw + 16) + cols / xb * 8 + 15) & !15
}

/// The device's scratch for prepared x: [`MAXP`] problems of the longest row the `mp` kernels
/// take (8-bit, the largest per element).
pub const QX_SCRATCH: usize = MAXP * ((XSM_MAX_COLS / 16) * 64 + XSM_MAX_COLS / 16 * 8 + 16);

/// Bytes of one slot of [`Device::qx_slot`]: one prepared x of the longest row.
pub const QX_SLOT: usize = (XSM_MAX_COLS / 16) * 64 + XSM_MAX_COLS / 16 * 8 + 16;

/// Where a producer (a norm, SwiGLU) writes its output prepared for the `mp` matvec that reads
/// it, so that matvec needs no `quant_x3` launch: `bits` is the matvec's code width, `qb` the
/// bytes between problems' prepared x (0: one x shared by every problem).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prepared {
    pub at: u64,
    pub bits: u32,
    pub qb: usize,
}

impl Prepared {
    /// The kernel arguments (pointer, code width); (0, 0) prepares nothing.
    fn args(p: Option<Prepared>) -> [A<'static>; 2] {
        match p {
            Some(p) => [A::P(p.at), A::I(p.bits as i32)],
            None => [A::P(0), A::I(0)],
        }
    }
}

/// Whether the `mp` kernel may run this matrix: whole 16-byte chunks that each lie in one
/// group, and the prepared x fits 48 KiB of shared memory.
fn prep_fits(bits: u32, lg: u32, cols: usize) -> bool {
    let ce = 128 / bits as usize;
    (1usize << lg) >= ce
        && cols.is_multiple_of(ce)
        && cols <= XSM_MAX_COLS
        && qx_size(bits, cols) <= 48 * 1024
}

/// Whether a producer may prepare a row of `cols` for `bits`-wide `mp` kernels (the part of
/// [`prep_fits`] that does not depend on the consumer's group), on this thread's path.
pub fn preparable(bits: u32, cols: usize) -> bool {
    matches!(bits, 2 | 4 | 8)
        && cols.is_multiple_of(128 / bits as usize)
        && cols <= XSM_MAX_COLS
        && qx_size(bits, cols) <= 48 * 1024
        && use_prep()
        && epilogues()
}

/// Measured (H200, d5a6068, same run, 4-bit): 16384x4096 0.49 of D2D against 0.33 for the
/// float kernel, 4096x8192 0.31 against 0.23, lm_head 0.92 against 0.80 (the former two-level dp4a kernel); VRAM decode of
/// the 8-layer 397B-shaped model 1.32 against 1.62 ms/token.
fn use_prep() -> bool {
    matches!(AFFINE_PATH.with(|c| c.get()), 0 | 4)
}

/// How a matrix's bytes are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fmt {
    /// 0 = bf16, 1 = f16, 2 = f32.
    Dense(u8),
    /// MLX affine: `bits`, log2(group), scale dtype (0 = bf16, 1 = f16, 2 = f32).
    Affine { bits: u32, lg: u32, sdt: u8 },
}

fn dt_code(d: DType) -> Result<u8> {
    match d {
        DType::BF16 => Ok(0),
        DType::F16 => Ok(1),
        DType::F32 => Ok(2),
        other => Err(CudaError::Unsupported(format!("weight dtype {other:?}"))),
    }
}

impl Fmt {
    pub fn of(l: &Linear) -> Result<Fmt> {
        Fmt::of_slot(SlotFormat::of(l))
    }

    /// The format of a residency tier's slots (`flashmoe_core::residency`).
    pub fn of_slot(f: SlotFormat) -> Result<Fmt> {
        Ok(match f {
            SlotFormat::Dense(dtype) => Fmt::Dense(dt_code(dtype)?),
            SlotFormat::Affine {
                bits,
                group,
                sdtype,
            } => {
                if !matches!(bits, 2 | 4 | 8) || !group.is_power_of_two() {
                    return Err(CudaError::Unsupported(format!(
                        "affine {bits}-bit group {group}"
                    )));
                }
                Fmt::Affine {
                    bits,
                    lg: group.trailing_zeros(),
                    sdt: dt_code(sdtype)?,
                }
            }
        })
    }

    /// The kernel for this format and its dynamic shared memory. Decode (one token): affine
    /// matrices use the dp4a kernel with x prepared by `quant_x3` (`mp`, see [`AffinePath`]),
    /// or the exact float kernel with x in shared memory (`mv`), or with x read from global
    /// memory for rows too long for shared memory (`mvg`); prefill uses `mm`.
    pub fn kernel(&self, decode: bool, rows: usize, cols: usize) -> Result<(Kernel, u32)> {
        let k = match *self {
            Fmt::Dense(d) => Kernel::Dmv {
                dt: Dt::from_code(d).ok_or_else(|| self.unsupported())?,
                var: if decode { DVar::Mv } else { DVar::Mm },
            },
            Fmt::Affine { bits, lg, sdt } => Kernel::Qmv {
                bits: Bits::of(bits).ok_or_else(|| self.unsupported())?,
                scale: Dt::from_code(sdt).ok_or_else(|| self.unsupported())?,
                var: match () {
                    _ if !decode => QVar::Mm,
                    _ if mma_fits(bits, lg, cols) && use_mma() => {
                        if mma_tile(rows) == 16 {
                            QVar::Mt1
                        } else {
                            QVar::Mt2
                        }
                    }
                    _ if self.prepared_bits(cols).is_some() => QVar::Mp,
                    _ if cols <= XSM_MAX_COLS => QVar::Mv,
                    _ => QVar::Mvg,
                },
            },
        };
        let smem = match (k.qvar(), *self) {
            // xpad(cols) floats (4 of padding every 32).
            (Some(QVar::Mv), _) => ((cols + cols / 32 * 4 + 4) * 4) as u32,
            (Some(QVar::Mt1 | QVar::Mt2), Fmt::Affine { bits, .. }) => mma_smem(bits, cols) as u32,
            (Some(QVar::Mp), Fmt::Affine { bits, .. }) => qx_size(bits, cols) as u32,
            _ => 0,
        };
        Ok((k, smem))
    }

    fn unsupported(&self) -> CudaError {
        CudaError::Unsupported(format!("matrix format {self:?}"))
    }

    /// The code width of the prepared x the decode kernel reads, when it is the `mp` kernel
    /// (rows of `cols` columns).
    fn prepared_bits(&self, cols: usize) -> Option<u32> {
        match *self {
            Fmt::Affine { bits, lg, .. } if prep_fits(bits, lg, cols) && use_prep() => Some(bits),
            _ => None,
        }
    }

    fn lg(&self) -> i32 {
        match self {
            Fmt::Affine { lg, .. } => *lg as i32,
            Fmt::Dense(_) => 0,
        }
    }

    /// Bytes of (weights, scales, biases) for `rows` rows of `cols`.
    pub fn sizes(&self, rows: usize, cols: usize) -> (usize, usize, usize) {
        match *self {
            Fmt::Dense(d) => (rows * cols * if d == 2 { 4 } else { 2 }, 0, 0),
            Fmt::Affine { bits, lg, sdt } => {
                let s = rows * (cols >> lg) * if sdt == 2 { 4 } else { 2 };
                (rows * cols * bits as usize / 8, s, s)
            }
        }
    }
}

/// A matrix in VRAM (pointers into buffers owned elsewhere or by `_own`).
#[derive(Clone, Copy, Debug)]
pub struct DevMat {
    pub fmt: Fmt,
    pub rows: usize,
    pub cols: usize,
    pub w: u64,
    pub s: u64,
    pub b: u64,
}

impl DevMat {
    /// The code width of the prepared x its decode kernel reads, when that is the `mp` kernel.
    pub fn prepared_bits(&self) -> Option<u32> {
        self.fmt.prepared_bits(self.cols)
    }

    /// Same format, rows and columns (the bytes may live anywhere).
    pub fn same_shape(&self, o: &DevMat) -> bool {
        self.fmt == o.fmt && self.rows == o.rows && self.cols == o.cols
    }

    pub fn nbytes(&self) -> usize {
        let (a, b, c) = self.fmt.sizes(self.rows, self.cols);
        a + b + c
    }
}

/// A matrix uploaded to VRAM, owning its buffers.
pub struct DMat {
    pub m: DevMat,
    _own: Vec<DBuf>,
}

pub use flashmoe_core::residency::linear_bytes;

/// Uploads rows `[start, start+n)` of each part, stacked, as one matrix (all parts share format
/// and column count).
pub fn upload_rows(dev: &Device, parts: &[(&Linear, usize, usize)]) -> Result<DMat> {
    let fmt = Fmt::of(parts[0].0)?;
    let cols = parts[0].0.cols();
    let (mut w, mut s, mut b) = (Vec::new(), Vec::new(), Vec::new());
    let mut rows = 0;
    for (l, start, n) in parts {
        if Fmt::of(l)? != fmt || l.cols() != cols {
            return Err(CudaError::Unsupported(
                "stacking matrices of different formats".into(),
            ));
        }
        let sl = l.slice_rows(*start, *n);
        let (a, c, d) = linear_bytes(&sl);
        w.extend_from_slice(a);
        s.extend_from_slice(c);
        b.extend_from_slice(d);
        rows += n;
    }
    let wb = dev.upload(&w)?;
    let sb = dev.upload(&s)?;
    let bb = dev.upload(&b)?;
    Ok(DMat {
        m: DevMat {
            fmt,
            rows,
            cols,
            w: wb.ptr(),
            s: sb.ptr(),
            b: bb.ptr(),
        },
        _own: vec![wb, sb, bb],
    })
}

/// A projection whose output vector is the concatenation of several row blocks, each uploaded as
/// one matrix where neighbouring blocks share a format (one launch per matrix).
pub struct Proj {
    pub mats: Vec<(DMat, usize)>,
    pub rows: usize,
    pub cols: usize,
}

impl Proj {
    pub fn new(dev: &Device, parts: &[(&Linear, usize, usize)]) -> Result<Proj> {
        let mut mats = Vec::new();
        let mut i = 0;
        let mut off = 0;
        while i < parts.len() {
            let f = Fmt::of(parts[i].0)?;
            let mut j = i + 1;
            while j < parts.len() && Fmt::of(parts[j].0)? == f {
                j += 1;
            }
            let m = upload_rows(dev, &parts[i..j])?;
            let r = m.m.rows;
            mats.push((m, off));
            off += r;
            i = j;
        }
        Ok(Proj {
            mats,
            rows: off,
            cols: parts[0].0.cols(),
        })
    }

    /// The matrix, when the projection is one.
    pub fn single(&self) -> Option<DevMat> {
        match self.mats.as_slice() {
            [(m, 0)] => Some(m.m),
            _ => None,
        }
    }

    /// y[0..rows] = P x (one token).
    pub fn run(&self, dev: &Device, x: u64, y: u64) -> Result<()> {
        self.run_prepared(dev, x, y, None)
    }

    /// As `run`, with x already prepared at `pre` (from [`Proj::prepared_bits`]) by its producer.
    pub fn run_prepared(&self, dev: &Device, x: u64, y: u64, pre: Option<Prepared>) -> Result<()> {
        for (m, off) in &self.mats {
            let p = [(m.m.w, m.m.s, m.m.b, x, y + (*off as u64) * 4)];
            matvec_batch_prepared(dev, &dev.compute, &m.m, &p, 1, m.m.cols, m.m.rows, pre)?;
        }
        Ok(())
    }

    /// The code width of the prepared x every matrix of the projection reads, when all of them
    /// run the `mp` kernel with one width (so one prepared x serves them all).
    pub fn prepared_bits(&self) -> Option<u32> {
        let b = self.mats.first()?.0.m.prepared_bits()?;
        self.mats
            .iter()
            .all(|(m, _)| m.m.prepared_bits() == Some(b))
            .then_some(b)
    }
}

/// Rows per warp of the exact float decode kernel: 0 = by shape, else 1, 2 or 4 (bench A/B).
pub fn set_rows_per_warp(r: usize) {
    ROWS_PER_WARP.with(|c| c.set(r));
}

/// Kernel, blocks and threads per block for `rows` rows of each of `nprob` problems.
/// Decode kernels give each warp 4 rows (`mv`, `mp`, `mt2` tiles of 32 rows per 8 warps), 1
/// row (prefill `mm`, 8 tokens per pass) or a 16-row tile (`mt1`). The exact float decode
/// kernel (`mv`) takes fewer rows per warp (`mv2`, `mv1`) and 4-warp blocks when 4-row warps
/// would leave SMs without a couple of blocks: short matrices (routers, shared experts,
/// 4096-row projections) are latency-bound, and more warps in flight is what shortens them.
fn launch_shape(sms: i32, k: Kernel, rows: usize, nprob: usize) -> (Kernel, u32, u32) {
    let sms = sms.max(1) as usize;
    let mut k = k;
    let mut threads = 256usize;
    let per_warp =
        if matches!(k.qvar(), Some(QVar::Mm)) || matches!(k, Kernel::Dmv { var: DVar::Mm, .. }) {
            1
        } else if k.qvar() == Some(QVar::Mt1) {
            2
        } else if k.qvar() == Some(QVar::Mv) {
            let r = match ROWS_PER_WARP.with(|c| c.get()) {
                r @ (1 | 2 | 4) => r,
                _ => {
                    let blocks_at = |r: usize| (rows * nprob).div_ceil(8 * r);
                    if blocks_at(4) >= 2 * sms {
                        4
                    } else if blocks_at(2) >= 2 * sms {
                        2
                    } else {
                        if blocks_at(1) < 2 * sms {
                            threads = 128;
                        }
                        1
                    }
                }
            };
            match r {
                1 => k = k.with_qvar(QVar::Mv1),
                2 => k = k.with_qvar(QVar::Mv2),
                _ => {}
            }
            r
        } else {
            4
        };
    let per_block = per_warp * threads / 32;
    // Row groups are strided over at most a few blocks per SM, so each block stages x once for
    // several groups on tall matrices.
    // (Capping the prepared-x kernel at its two resident blocks per SM measured the same as this
    // cap: H200, d5a6068, 16384x4096 0.494 vs 0.485 of D2D, VRAM decode 1.335 vs 1.319 ms.)
    let blocks = (rows.div_ceil(per_block) as u32).min(sms as u32 * 4 * (256 / threads as u32));
    (k, blocks, threads as u32)
}

/// y = W x for one token.
pub fn matvec(dev: &Device, stream: &CudaStream, m: &DevMat, x: u64, y: u64) -> Result<()> {
    matvec_batch(dev, stream, m, &[(m.w, m.s, m.b, x, y)], 1, m.cols, m.rows)
}

/// Several same-shape products in one launch: each problem is (w, s, b, x, y) with `ntok`
/// inputs at stride `ldx` and outputs at stride `ldy` (floats).
pub fn matvec_batch(
    dev: &Device,
    stream: &CudaStream,
    m: &DevMat,
    probs: &[(u64, u64, u64, u64, u64)],
    ntok: usize,
    ldx: usize,
    ldy: usize,
) -> Result<()> {
    matvec_batch_prepared(dev, stream, m, probs, ntok, ldx, ldy, None)
}

/// As [`matvec_batch`]; when the `mp` kernel runs and `pre` is given, the problems' x were
/// prepared there by their producer.
#[allow(clippy::too_many_arguments)]
pub fn matvec_batch_prepared(
    dev: &Device,
    stream: &CudaStream,
    m: &DevMat,
    probs: &[(u64, u64, u64, u64, u64)],
    ntok: usize,
    ldx: usize,
    ldy: usize,
    pre: Option<Prepared>,
) -> Result<()> {
    if pre.is_some() && probs.len() > MAXP {
        return Err(CudaError::Invalid(
            "prepared x for more than one launch".into(),
        ));
    }
    for chunk in probs.chunks(MAXP) {
        let mut p = MvBatch::default();
        for (i, &(w, s, b, x, y)) in chunk.iter().enumerate() {
            p.w[i] = w;
            p.s[i] = s;
            p.b[i] = b;
            p.x[i] = x;
            p.y[i] = y;
        }
        let (k, smem) = m.fmt.kernel(ntok == 1, m.rows, m.cols)?;
        let (k, blocks, threads) = launch_shape(dev.sms, k, m.rows, chunk.len());
        let cfg = LaunchConfig {
            grid_dim: (blocks, chunk.len() as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem,
        };
        if k.is_prepared() {
            if !std::ptr::eq(stream, &*dev.compute) {
                return Err(CudaError::Invalid(
                    "the prepared-x matvec runs on the compute stream only".into(),
                ));
            }
            launch_prepared(dev, m, k, cfg, A::B(&p), pre, false, None)?;
            continue;
        }
        if std::ptr::eq(stream, &*dev.compute) {
            dev.note_bytes(m.nbytes() * chunk.len());
        }
        dev.launch_on(
            stream,
            k,
            cfg,
            &[
                A::B(&p),
                A::I(m.rows as i32),
                A::I(m.cols as i32),
                A::I(m.fmt.lg()),
                A::I(ntok as i32),
                A::I(ldx as i32),
                A::I(ldy as i32),
            ],
        )?;
    }
    Ok(())
}

/// The `mp` matvec (`k`, `cfg`): `quant_x3` prepares each problem's x into the device's
/// scratch, then the matvec reads it; or, with `pre`, the producer of x has prepared it. `batch`
/// is the kernels' first argument (the `MvBatch` by value, or its device pointer for the `mpi` /
/// `quant_x3_*i` pair). `batch_fresh`: that device batch was written by the launch just before,
/// so the matvec reads it only after its dependent-launch wait. `epi`: the last argument of the
/// `mpc` / `mpa` kernels (see [`matvec_epilogue`]).
#[allow(clippy::too_many_arguments)]
fn launch_prepared(
    dev: &Device,
    m: &DevMat,
    k: Kernel,
    cfg: LaunchConfig,
    batch: A<'_>,
    pre: Option<Prepared>,
    batch_fresh: bool,
    epi: Option<&Epi>,
) -> Result<()> {
    let Fmt::Affine { bits, .. } = m.fmt else {
        unreachable!("mp kernels are affine")
    };
    let indirect = k.qvar().is_some_and(QVar::is_indirect);
    // With `quant_x3` launched between, the batch is two launches old when the matvec starts.
    let early = pre.is_none() || !batch_fresh;
    // The matvec's arguments (on the stack: this runs for most launches of a token).
    let (qx, qb) = match pre {
        Some(p) => (p.at, p.qb),
        None => (dev.qx.ptr(), qx_size(bits, m.cols)),
    };
    let mut args = [A::I(0); 8];
    let mut n = 6;
    args[..n].copy_from_slice(&[
        batch,
        A::I(m.rows as i32),
        A::I(m.cols as i32),
        A::I(m.fmt.lg()),
        A::P(qx),
        A::I(qb as i32),
    ]);
    if indirect {
        args[n] = A::I(early as i32);
        n += 1;
    }
    if let Some(e) = epi {
        args[n] = A::X(e);
        n += 1;
    }
    let nprob = cfg.grid_dim.1;
    if let Some(p) = pre {
        if p.bits != bits {
            return Err(CudaError::Invalid(format!(
                "x prepared for {}-bit codes, matrix has {bits}",
                p.bits
            )));
        }
        dev.note_bytes(m.nbytes() * nprob as usize);
        return dev.launch(k, cfg, &args[..n]);
    }
    assert!(qb * nprob as usize <= dev.qx.len(), "prepared x scratch");
    let Some(b) = Bits::of(bits) else {
        return Err(m.fmt.unsupported());
    };
    dev.launch(
        Kernel::QuantX3 { bits: b, indirect },
        LaunchConfig {
            grid_dim: (m.cols.div_ceil(256) as u32, nprob, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        },
        &[
            batch,
            A::I(m.cols as i32),
            A::P(dev.qx.ptr()),
            A::I(qb as i32),
        ],
    )?;
    // The matvec's blocks start while `quant_x3` runs (it releases them at once) and load their
    // first weights before waiting for the prepared x (every compute-stream launch is a
    // dependent launch on Hopper, see `Device::launch_on`).
    dev.note_bytes(m.nbytes() * nprob as usize);
    dev.launch(k, cfg, &args[..n])
}

/// One x prepared at `at` for `m`'s `mp` kernel (`quant_x3`, as [`launch_prepared`] does
/// into the device's scratch): for a consumer whose producer could not prepare it, such as an
/// epilogue matvec ([`matvec_epilogue`]) reached through core's `Backend`.
pub fn prepare_x(dev: &Device, m: &DevMat, x: u64, at: u64) -> Result<()> {
    let Fmt::Affine { bits, .. } = m.fmt else {
        return Err(CudaError::Invalid("prepared x for a dense matrix".into()));
    };
    if qx_size(bits, m.cols) > QX_SLOT {
        return Err(CudaError::Invalid(format!(
            "prepared x of {} columns exceeds a slot",
            m.cols
        )));
    }
    let Some(b) = Bits::of(bits) else {
        return Err(m.fmt.unsupported());
    };
    let mut p = MvBatch::default();
    p.x[0] = x;
    dev.launch(
        Kernel::QuantX3 {
            bits: b,
            indirect: false,
        },
        LaunchConfig {
            grid_dim: (m.cols.div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        },
        &[A::B(&p), A::I(m.cols as i32), A::P(at), A::I(0)],
    )
}

/// `nprob` products of `m`'s shape and format whose (w, s, b, x, y) are read from an `MvBatch`
/// in device memory at `pd` (written by [`expert_batch`]). One token. With `pre` (and the `mp`
/// kernel), the problems' x were prepared there by their producer; `batch_fresh` says the batch
/// was written by the launch just before this one.
pub fn matvec_indirect(
    dev: &Device,
    m: &DevMat,
    pd: u64,
    nprob: usize,
    pre: Option<Prepared>,
    batch_fresh: bool,
) -> Result<()> {
    let (k, smem) = m.fmt.kernel(true, m.rows, m.cols)?;
    let (k, blocks, threads) = launch_shape(dev.sms, k, m.rows, nprob);
    let Some(k) = k.indirect().filter(|_| nprob <= MAXP) else {
        return Err(CudaError::Unsupported("indirect matvec shape".into()));
    };
    let cfg = LaunchConfig {
        grid_dim: (blocks, nprob as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem,
    };
    if k.is_prepared() {
        return launch_prepared(dev, m, k, cfg, A::P(pd), pre, batch_fresh, None);
    }
    dev.note_bytes(m.nbytes() * nprob);
    dev.launch(
        k,
        cfg,
        &[
            A::P(pd),
            A::I(m.rows as i32),
            A::I(m.cols as i32),
            A::I(m.fmt.lg()),
            A::I(1),
            A::I(m.cols as i32),
            A::I(m.rows as i32),
        ],
    )
}

/// Router top-k (as [`router_topk`]) fused with writing the two `MvBatch` (gate‖up, down) of
/// the layer's K resident experts (and the shared expert as problem K when `a.sh[0] != 0`) to
/// `out` from the slot table `a.tbl` (one u64 base per expert).
#[allow(clippy::too_many_arguments)]
pub fn router_experts(
    dev: &Device,
    logits: u64,
    e: usize,
    k: usize,
    norm: bool,
    ids: u64,
    wts: u64,
    a: crate::device::ExpertBatchArgs,
    out: u64,
) -> Result<()> {
    batch_fits(k, &a)?;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (threads_for(e).min(1024), 1, 1),
        shared_mem_bytes: (e * 12) as u32,
    };
    dev.launch(
        Kernel::RouterExperts,
        cfg,
        &[
            A::P(logits),
            A::I(e as i32),
            A::I(k as i32),
            A::I(norm as i32),
            A::P(ids),
            A::P(wts),
            A::E(&a),
            A::P(out),
        ],
    )
}

/// Refuses more problems (`k` experts, and the shared expert when batched) than one batched
/// launch holds.
fn batch_fits(k: usize, a: &crate::device::ExpertBatchArgs) -> Result<()> {
    if k + (a.sh[0] != 0) as usize > MAXP {
        return Err(CudaError::Unsupported(format!(
            "{k} routed experts per token (at most {MAXP} per batched launch)"
        )));
    }
    Ok(())
}

/// The two `MvBatch` (gate‖up, down) of one token's `k` resident experts, as
/// [`router_experts`] writes them, from ids already on the device (`ids`, i32, a
/// `router_topk`'s) and the slot table `a.tbl`.
pub fn slot_batch(
    dev: &Device,
    ids: u64,
    k: usize,
    a: crate::device::ExpertBatchArgs,
    out: u64,
) -> Result<()> {
    batch_fits(k, &a)?;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    dev.launch(
        Kernel::SlotBatch,
        cfg,
        &[A::P(ids), A::I(k as i32), A::E(&a), A::P(out)],
    )
}

/// out = row `row` of `m` as f32.
pub fn embed_row(dev: &Device, m: &DevMat, row: usize, out: u64) -> Result<()> {
    let (dense, bits, sdt) = match m.fmt {
        Fmt::Dense(d) => (d as i32, 0, 0),
        Fmt::Affine { bits, sdt, .. } => (-1, bits as i32, sdt as i32),
    };
    let cfg = LaunchConfig {
        grid_dim: (m.cols.div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    dev.launch(
        Kernel::EmbedRow,
        cfg,
        &[
            A::P(m.w),
            A::P(m.s),
            A::P(m.b),
            A::I(dense),
            A::I(bits),
            A::I(sdt),
            A::I(m.fmt.lg()),
            A::L(row as i64),
            A::I(m.cols as i32),
            A::P(out),
        ],
    )
}

/// One thread per element in blocks of 256 (at least one block).
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads for a block over `n` elements: whole warps, 32 to 1024.
pub(crate) fn threads_for(n: usize) -> u32 {
    (n.div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// Blocks per row of a norm over `n` elements: 256-element slices when one row is normalised
/// (decode; every block sums the whole row), one block per row otherwise.
fn norm_split(n: usize, rows: usize) -> (u32, u32) {
    if rows == 1 && n >= 512 {
        (n.div_ceil(256) as u32, 256)
    } else {
        (1, threads_for(n).min(512))
    }
}

/// Blocks of a one-row norm over `n` elements (1: the residual can be updated in place).
pub fn norm_blocks(n: usize) -> u32 {
    norm_split(n, 1).0
}

/// out[r] = rmsnorm(x[r]) * w for `rows` rows of `n` at strides ldx, ldo (floats); with `pre`
/// (one row), out is also prepared there for the `mp` matvec that reads it.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_rows(
    dev: &Device,
    x: u64,
    ldx: usize,
    w: u64,
    out: u64,
    ldo: usize,
    n: usize,
    rows: usize,
    eps: f32,
    pre: Option<Prepared>,
) -> Result<()> {
    if pre.is_some() && rows != 1 {
        return Err(CudaError::Invalid("prepared x of several rows".into()));
    }
    let [qa, qbits] = Prepared::args(pre);
    let (split, threads) = norm_split(n, rows);
    let cfg = LaunchConfig {
        grid_dim: (split, rows as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    dev.launch(
        Kernel::RmsnormRows,
        cfg,
        &[
            A::P(x),
            A::I(ldx as i32),
            A::P(w),
            A::P(out),
            A::I(ldo as i32),
            A::I(n as i32),
            A::F(eps),
            qa,
            qbits,
        ],
    )
}

/// Where the residual sum of [`add_rmsnorm`] goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residual {
    /// x += d in the kernel (one block: the others would read the updated x).
    Update,
    /// x + d written to this other buffer (as long as x), x left alone: the norm runs on
    /// several blocks, as the sum pass reads only x and d.
    Into(u64),
    /// x is left alone and the sum goes nowhere: the caller adds d later (several blocks).
    Defer,
}

/// out = rmsnorm(x + d) * w, also prepared at `pre[0]` and `pre[1]` for the `mp` matvecs that
/// read it; x += d here or later, as `res` says.
#[allow(clippy::too_many_arguments)]
pub fn add_rmsnorm(
    dev: &Device,
    x: u64,
    d: u64,
    w: u64,
    out: u64,
    n: usize,
    eps: f32,
    pre: [Option<Prepared>; 2],
    res: Residual,
) -> Result<()> {
    let [q1, b1] = Prepared::args(pre[0]);
    let [q2, b2] = Prepared::args(pre[1]);
    let (split, threads) = match res {
        Residual::Update => (1, threads_for(n)),
        Residual::Into(_) | Residual::Defer => norm_split(n, 1),
    };
    let xo = match res {
        Residual::Update => x,
        Residual::Into(y) => y,
        Residual::Defer => 0,
    };
    let cfg = LaunchConfig {
        grid_dim: (split, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    dev.launch(
        Kernel::AddRmsnorm,
        cfg,
        &[
            A::P(x),
            A::P(d),
            A::P(w),
            A::P(out),
            A::I(n as i32),
            A::F(eps),
            q1,
            b1,
            q2,
            b2,
            A::P(xo),
        ],
    )
}

/// h[j] = silu(gu[j, :I]) * gu[j, I:] for j < nexp; with `pre`, h[j] is also prepared at
/// `pre.at + j * pre.qb` for the `mp` matvec that reads it.
pub fn swiglu(
    dev: &Device,
    gu: u64,
    h: u64,
    i: usize,
    nexp: usize,
    pre: Option<Prepared>,
) -> Result<()> {
    let [qa, qbits] = Prepared::args(pre);
    let n = i * nexp;
    let cfg = elementwise(n);
    dev.launch(
        Kernel::SwigluK,
        cfg,
        &[
            A::P(gu),
            A::P(h),
            A::I(i as i32),
            A::I(nexp as i32),
            qa,
            qbits,
            A::I(pre.map_or(0, |p| p.qb) as i32),
        ],
    )
}

/// The bench's dependent-step probe (`chain_step` in kernels.cu): y = x / rms(x) over `n`
/// floats, 16 blocks each reading all of x and writing its slice, like the token's norms.
pub fn chain_step(dev: &Device, x: u64, y: u64, n: usize) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: (16, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    dev.launch(Kernel::ChainStep, cfg, &[A::P(x), A::P(y), A::I(n as i32)])
}

/// x += Σ_j wts[j] ye[j] + sigmoid(sg) ys (+ add). Null pointers (0) drop a term.
#[allow(clippy::too_many_arguments)]
pub fn moe_combine(
    dev: &Device,
    x: u64,
    ye: u64,
    wts: u64,
    nexp: usize,
    ys: u64,
    sg: u64,
    add: u64,
    n: usize,
) -> Result<()> {
    let cfg = elementwise(n);
    dev.launch(
        Kernel::MoeCombine,
        cfg,
        &[
            A::P(x),
            A::P(ye),
            A::P(wts),
            A::I(nexp as i32),
            A::P(ys),
            A::P(sg),
            A::P(add),
            A::I(n as i32),
        ],
    )
}

/// ids[K], wts[K] = top-k of softmax(logits[E]) (renormalised when `norm`).
pub fn router_topk(
    dev: &Device,
    logits: u64,
    e: usize,
    k: usize,
    norm: bool,
    ids: u64,
    wts: u64,
) -> Result<()> {
    router_topk_rows(dev, logits, 0, e, k, norm, ids, wts, 1)
}

/// [`router_topk`] for `rows` rows of logits `ld` floats apart; picks at ids/wts + row * k.
#[allow(clippy::too_many_arguments)]
pub fn router_topk_rows(
    dev: &Device,
    logits: u64,
    ld: usize,
    e: usize,
    k: usize,
    norm: bool,
    ids: u64,
    wts: u64,
    rows: usize,
) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads_for(e).min(1024), 1, 1),
        shared_mem_bytes: (e * 12) as u32,
    };
    dev.launch(
        Kernel::RouterTopk,
        cfg,
        &[
            A::P(logits),
            A::I(ld as i32),
            A::I(e as i32),
            A::I(k as i32),
            A::I(norm as i32),
            A::P(ids),
            A::P(wts),
        ],
    )
}

/// Launch shape of the row kernels: a block per 256 elements of a row, a grid row per row.
fn rows_cfg(n: usize, rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256) as u32, rows as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// dst[r] = src[rows[r]] for `nr` rows of `n` floats (`src` rows `ld` floats apart).
pub fn gather_rows(
    dev: &Device,
    src: u64,
    ld: usize,
    rows: u64,
    nr: usize,
    n: usize,
    dst: u64,
) -> Result<()> {
    dev.launch(
        Kernel::GatherRows,
        rows_cfg(n, nr),
        &[
            A::P(src),
            A::I(ld as i32),
            A::P(rows),
            A::I(nr as i32),
            A::I(n as i32),
            A::P(dst),
        ],
    )
}

/// x[rows[r]] += w[r] * y[r] for `nr` rows of `n` floats (`x` rows `ld` floats apart).
#[allow(clippy::too_many_arguments)]
pub fn scatter_add_rows(
    dev: &Device,
    x: u64,
    ld: usize,
    rows: u64,
    w: u64,
    nr: usize,
    n: usize,
    y: u64,
) -> Result<()> {
    dev.launch(
        Kernel::ScatterAddRows,
        rows_cfg(n, nr),
        &[
            A::P(x),
            A::I(ld as i32),
            A::P(rows),
            A::P(w),
            A::I(nr as i32),
            A::I(n as i32),
            A::P(y),
        ],
    )
}

/// x[t] += g_t y[t] for `t` < `rows` rows of `n` floats; g_t = sigmoid(sg[t * lds]), or 1 when
/// `sg` is 0.
pub fn add_rows_gated(
    dev: &Device,
    x: u64,
    y: u64,
    sg: u64,
    lds: usize,
    rows: usize,
    n: usize,
) -> Result<()> {
    dev.launch(
        Kernel::AddRowsGated,
        rows_cfg(n, rows),
        &[
            A::P(x),
            A::P(y),
            A::P(sg),
            A::I(lds as i32),
            A::I(rows as i32),
            A::I(n as i32),
        ],
    )
}

/// Greedy pick: `key` (8 bytes) receives the argmax of x[..n] (first index on ties) encoded
/// as in kernels.cu's `argmax_f32`; [`argmax_index`] decodes it.
pub fn argmax(dev: &Device, x: u64, n: usize, key: u64) -> Result<()> {
    dev.memset_async(key, 8)?;
    argmax_zeroed(dev, x, n, key)
}

/// [`argmax`] into a key the caller zeroed earlier on the compute stream (so no copy-engine
/// work sits between this launch and the one before, which would end their overlap).
pub fn argmax_zeroed(dev: &Device, x: u64, n: usize, key: u64) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: (
            n.div_ceil(4096).clamp(1, 2 * dev.sms.max(1) as usize) as u32,
            1,
            1,
        ),
        block_dim: (512, 1, 1),
        shared_mem_bytes: 0,
    };
    dev.launch(
        Kernel::ArgmaxF32,
        cfg,
        &[A::P(x), A::I(n as i32), A::P(key)],
    )
}

/// The index in a key written by [`argmax`].
pub fn argmax_index(key: u64) -> u32 {
    !(key as u32)
}

/// The value of an argmax key (`amax_key` in kernels.cu): NaN where every value was NaN (the
/// key's value half is 0, what the launch zeroed).
pub fn argmax_value(key: u64) -> f32 {
    let o = (key >> 32) as u32;
    f32::from_bits(if o & 0x8000_0000 != 0 {
        o & 0x7fff_ffff
    } else {
        !o
    })
}

/// Shape of a full-attention layer.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
    pub gated: bool,
    pub rot: usize,
    pub theta: f64,
    pub eps: f32,
}

impl AttnShape {
    pub fn qw(&self) -> usize {
        if self.gated {
            2 * self.hd
        } else {
            self.hd
        }
    }
}

/// q/k norm + RoPE at `pos`; writes q, and k/v into the caches at row `pos`.
#[allow(clippy::too_many_arguments)]
pub fn attn_prep(
    dev: &Device,
    a: &AttnShape,
    qkv: u64,
    qn: u64,
    kn: u64,
    pos: usize,
    q: u64,
    kc: u64,
    vc: u64,
) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: ((a.nh + a.nkv) as u32, 1, 1),
        block_dim: (threads_for(a.hd).min(256), 1, 1),
        shared_mem_bytes: (a.hd * 4) as u32,
    };
    dev.launch(
        Kernel::AttnPrep,
        cfg,
        &[
            A::P(qkv),
            A::I(a.nh as i32),
            A::I(a.nkv as i32),
            A::I(a.hd as i32),
            A::I(a.qw() as i32),
            A::P(qn),
            A::P(kn),
            A::F(a.eps),
            A::I(a.rot as i32),
            A::D(a.theta),
            A::L(pos as i64),
            A::P(q),
            A::P(kc),
            A::P(vc),
        ],
    )
}

/// o = attention of q over cache rows 0..n (gated by qkv's gate half when `a.gated`).
#[allow(clippy::too_many_arguments)]
pub fn attn_decode(
    dev: &Device,
    a: &AttnShape,
    q: u64,
    kc: u64,
    vc: u64,
    qkv: u64,
    n: usize,
    o: u64,
    pre: Option<Prepared>,
) -> Result<()> {
    if a.hd > 256 {
        return Err(CudaError::Unsupported(format!("head_dim {} > 256", a.hd)));
    }
    if pre.is_some() && !a.hd.is_multiple_of(32) {
        return Err(CudaError::Invalid(
            "attention output prepared with head_dim not a multiple of 32".into(),
        ));
    }
    let [qx, qbits] = Prepared::args(pre);
    let cfg = LaunchConfig {
        grid_dim: (a.nh as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    dev.launch(
        Kernel::AttnDecode,
        cfg,
        &[
            A::P(q),
            A::P(kc),
            A::P(vc),
            A::P(qkv),
            A::I(a.gated as i32),
            A::I(a.nh as i32),
            A::I(a.nkv as i32),
            A::I(a.hd as i32),
            A::I(a.qw() as i32),
            A::I(n as i32),
            A::F(1.0 / (a.hd as f32).sqrt()),
            A::P(o),
            qx,
            qbits,
        ],
    )
}

/// Shape of a GatedDeltaNet layer.
#[derive(Clone, Copy, Debug)]
pub struct GdnShape {
    pub nk: usize,
    pub nv: usize,
    pub dk: usize,
    pub dv: usize,
    pub kconv: usize,
    pub eps: f32,
}

impl GdnShape {
    pub fn conv_dim(&self) -> usize {
        2 * self.nk * self.dk + self.nv * self.dv
    }
}

pub fn gdn_conv(dev: &Device, g: &GdnShape, mixed: u64, state: u64, w: u64, u: u64) -> Result<()> {
    let cd = g.conv_dim();
    let cfg = elementwise(cd);
    dev.launch(
        Kernel::GdnConv,
        cfg,
        &[
            A::P(mixed),
            A::P(state),
            A::P(w),
            A::I(cd as i32),
            A::I(g.kconv as i32),
            A::P(u),
        ],
    )
}

/// One GatedDeltaNet decode step (arch-spec §6) for every value head: updates the state `s`
/// and writes the raw output to `y` (the backend's `gated_rmsnorm` applies the gated RMSNorm).
#[allow(clippy::too_many_arguments)]
pub fn gdn_step(
    dev: &Device,
    g: &GdnShape,
    u: u64,
    b: u64,
    a: u64,
    dt_bias: u64,
    neg_a: u64,
    s: u64,
    y: u64,
) -> Result<()> {
    // Parts per column: as many as fit 1024 threads (at most 8), each keeping ceil(dk / parts)
    // <= 16 rows of its column in registers; else one part of up to 128 rows (`_wide`).
    let parts = (1024 / g.dv.max(1)).clamp(1, 8);
    let (kernel, parts) = if g.dk.div_ceil(parts) <= 16 {
        (Kernel::GdnStep, parts)
    } else if g.dk <= 128 && g.dv <= 256 {
        (Kernel::GdnStepWide, 1)
    } else {
        return Err(CudaError::Unsupported(format!(
            "GatedDeltaNet head dims dk {} dv {} (dk <= 16 * min(8, 1024 / dv), or dk <= 128 \
             with dv <= 256)",
            g.dk, g.dv
        )));
    };
    // A head's columns are independent: split them over blocks of about 256 threads, so the 64
    // heads of a 397B layer fill 256 blocks instead of 64 (one block per head took 16 us).
    let mut splits = (g.dv * parts / 256).max(1);
    while !g.dv.is_multiple_of(splits) {
        splits -= 1;
    }
    let nc = g.dv / splits;
    let cfg = LaunchConfig {
        grid_dim: (g.nv as u32, splits as u32, 1),
        block_dim: (threads_for(nc * parts), 1, 1),
        shared_mem_bytes: (nc * parts * 4) as u32,
    };
    dev.launch(
        kernel,
        cfg,
        &[
            A::P(u),
            A::P(b),
            A::P(a),
            A::P(dt_bias),
            A::P(neg_a),
            A::P(s),
            A::P(y),
            A::I(g.nk as i32),
            A::I(g.nv as i32),
            A::I(g.dk as i32),
            A::I(g.dv as i32),
            A::I(parts as i32),
            A::I(nc as i32),
        ],
    )
}

#[cfg(test)]
#[path = "ops_tests.rs"]
mod tests;
