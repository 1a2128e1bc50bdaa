//! Prompt products (T > 1 rows) on the tensor cores: the `qgemm` kernels of kernels.cu.
//!
//! A product `Y[n] = W x[n]` over an affine-quantised `W` (2/4/8-bit codes, groups of 32-128,
//! bf16/f16/f32 scales) runs in two launches: `gemm_prep_x` stages x once per product (each
//! row as f16 hi + lo of `x * 2^k` with one power of two per (row, group), plus `2^-k` and the
//! group's sum of x), then `qgemm*` tiles 128 weight rows by 64 tokens per block, streams
//! 64-column k-tiles of codes and staged x through a four-stage `cp.async` ring in shared
//! memory (about 100 KB per block, two blocks per SM on sm_90), turns codes into exact f16 integers and multiplies on `mma.sync.m16n8k16` with f32
//! accumulation; each group is folded in f32 (`acc += s 2^-k sum(q x 2^k) + b sum(x)`), so the
//! result stays near f32 (about 22 bits of x, exact codes). Each weight is read once per
//! 64 tokens, instead of once per 8 tokens by the `mm` kernel it replaces for T > 1 (kept as
//! the fallback for dense matrices, older GPUs and shapes this one does not take, and as the
//! twin the device tests compare it with).
use std::cell::Cell;

use cudarc::driver::LaunchConfig;

use crate::device::{Device, A, MAXP};
use crate::kernel::{Bits, Dt, Kernel};
use crate::ops::{DevMat, Fmt};
use crate::{CudaError, Result};

/// One product of a batched launch (mirrors `GemmProb` in kernels.cu): the matrix, where its
/// first token's output row goes (token n at `y + n * ldy` floats), its rows, its tokens, and
/// the first row of the staged x they read.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct GemmProb {
    pub w: u64,
    pub s: u64,
    pub b: u64,
    pub y: u64,
    pub rows: i32,
    pub ldy: i32,
    pub ntok: i32,
    pub x0: i32,
}

impl GemmProb {
    /// The 12 words of its `repr(C)` layout, for a table in device memory
    /// ([`products_table`]).
    pub fn words(&self) -> [u32; 12] {
        let mut v = [0u32; 12];
        for (i, q) in [self.w, self.s, self.b, self.y].into_iter().enumerate() {
            v[2 * i] = q as u32;
            v[2 * i + 1] = (q >> 32) as u32;
        }
        for (i, n) in [self.rows, self.ldy, self.ntok, self.x0]
            .into_iter()
            .enumerate()
        {
            v[8 + i] = n as u32;
        }
        v
    }
}

/// Up to [`MAXP`] products passed by value (mirrors `GemmBatch` in kernels.cu).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct GemmBatch {
    pub p: [GemmProb; MAXP],
}

const _: () = assert!(std::mem::size_of::<GemmProb>() == 48);
const _: () = assert!(std::mem::size_of::<GemmBatch>() == 48 * MAXP);

/// Rows, tokens and columns of one block's tile, and stages of its ring (`QG_BM`, `QG_BN`,
/// `QG_BK`, `QG_NST` in kernels.cu).
const BM: usize = 128;
const BN: usize = 64;
const BK: usize = 64;
const NST: usize = 4;

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether T > 1 products launched from this thread may take the tensor-core GEMM (tests and
/// the bench turn it off to run the `mm` twin).
pub fn set_enabled(on: bool) {
    ENABLED.with(|c| c.set(on));
}

pub fn enabled() -> bool {
    ENABLED.with(|c| c.get())
}

/// Whether the GEMM runs `m` on `dev`: sm_80+ with room for its shared memory, affine
/// 2/4/8-bit codes in groups of 32-128, rows of whole 64-column k-tiles, and codes 16-byte
/// aligned (the `cp.async` copies).
pub fn fits(dev: &Device, m: &DevMat) -> bool {
    let Fmt::Affine { bits, lg, .. } = m.fmt else {
        return false;
    };
    dev.arch.0 >= 8
        && enabled()
        && matches!(bits, 2 | 4 | 8)
        && smem(bits) as usize <= smem_optin(dev)
        && (5..=7).contains(&lg)
        && m.cols.is_multiple_of(BK)
        && m.cols <= (i32::MAX as usize) / 2
        && m.w.is_multiple_of(16)
}

/// The most dynamic shared memory a block may opt in to on `dev`.
fn smem_optin(dev: &Device) -> usize {
    use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN as A;
    dev.ctx.attribute(A).map_or(48 << 10, |v| v.max(0) as usize)
}

/// Lets `qgemm` kernel `k`'s function `f` use its shared memory beyond the default 48 KiB;
/// where the device has less, nothing is set and [`fits`] says no. Other kernels: nothing.
pub fn opt_in(k: Kernel, f: &cudarc::driver::CudaFunction, optin: usize) -> Result<()> {
    use cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as A;
    let Some(bits) = k.qgemm_bits() else {
        return Ok(());
    };
    let need = smem(bits.bits());
    if need as usize > optin {
        return Ok(());
    }
    f.set_attribute(A, need as i32)
        .map_err(|e| CudaError::Driver {
            what: format!("shared memory of {k}"),
            msg: format!("{e:?}"),
        })
}

/// f32 elements of the staged x of `nrows` rows of `cols` (group `2^lg`): per row `cols`
/// elements of f16 hi/lo pairs, then per (row, group) two floats.
pub fn staged_len(nrows: usize, cols: usize, lg: u32) -> usize {
    nrows * cols + 2 * nrows * (cols >> lg)
}

/// `m`'s code width, log2 group, and its `qgemm` kernel (`table`: the `_t` form).
fn parts(m: &DevMat, table: bool) -> Result<(u32, u32, Kernel)> {
    let (bits, lg, sdt) = match m.fmt {
        Fmt::Affine { bits, lg, sdt } => (bits, lg, sdt),
        Fmt::Dense(_) => unreachable!("qgemm takes affine matrices (gemm::fits)"),
    };
    let (Some(b), Some(scale)) = (Bits::of(bits), Dt::from_code(sdt)) else {
        return Err(CudaError::Unsupported(format!(
            "qgemm of {bits}-bit codes, scale code {sdt}"
        )));
    };
    let k = Kernel::Qgemm {
        bits: b,
        scale,
        table,
    };
    Ok((bits, lg, k))
}

/// Stages `nrows` rows of x (row i at `x + idx[i] * ldx` floats when `idx` is not 0, else
/// `x + i * ldx`) for products over `m`'s format and width, at `xq` (room for
/// [`staged_len`] floats).
pub fn stage_x(
    dev: &Device,
    m: &DevMat,
    x: u64,
    ldx: usize,
    idx: u64,
    nrows: usize,
    xq: u64,
) -> Result<()> {
    let (bits, lg, _) = parts(m, false)?;
    let pairs = nrows * (m.cols >> lg);
    if pairs == 0 {
        return Ok(());
    }
    let meta = xq + (nrows * m.cols * 4) as u64;
    dev.launch(
        Kernel::GemmPrepX,
        LaunchConfig {
            grid_dim: (
                pairs.div_ceil(8).min(dev.sms.max(1) as usize * 16) as u32,
                1,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        },
        &[
            A::P(x),
            A::I(ldx as i32),
            A::P(idx),
            A::I(nrows as i32),
            A::I(m.cols as i32),
            A::I(lg as i32),
            A::I(bits as i32),
            A::P(xq),
            A::P(meta),
        ],
    )
}

/// Dynamic shared memory of a `qgemm` block: per stage 128 rows of codes (`QG_WROW`) and 64
/// token rows of staged x (`QG_XROW`).
fn smem(bits: u32) -> u32 {
    let wrow = if bits == 2 { 48 } else { 8 * bits + 16 };
    (NST * (BM * wrow as usize + BN * 288)) as u32
}

fn config(bits: u32, rows: usize, ntok: usize, nprob: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            rows.div_ceil(BM) as u32,
            ntok.div_ceil(BN) as u32,
            nprob as u32,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: smem(bits),
    }
}

/// The products `probs` (all of `m`'s format and width; their own rows, tokens and outputs)
/// over x staged at `xq` for `nrows` rows, in launches of up to [`MAXP`].
pub fn products(dev: &Device, m: &DevMat, probs: &[GemmProb], xq: u64, nrows: usize) -> Result<()> {
    let (bits, lg, kernel) = parts(m, false)?;
    let meta = xq + (nrows * m.cols * 4) as u64;
    for chunk in probs.chunks(MAXP) {
        let mut b = GemmBatch::default();
        b.p[..chunk.len()].copy_from_slice(chunk);
        let rows = chunk.iter().map(|p| p.rows as usize).max().unwrap_or(0);
        let ntok = chunk.iter().map(|p| p.ntok as usize).max().unwrap_or(0);
        if rows == 0 || ntok == 0 {
            continue;
        }
        dev.note_bytes(m.nbytes() * chunk.len());
        dev.launch(
            kernel,
            config(bits, rows, ntok, chunk.len()),
            &[
                A::G(&b),
                A::I(m.cols as i32),
                A::I(lg as i32),
                A::P(xq),
                A::P(meta),
            ],
        )?;
    }
    Ok(())
}

/// `nprob` products read from a [`GemmProb`] table in device memory at `tbl` (each of
/// `m`'s format and width, at most `rows` rows and `ntok` tokens), over x staged at `xq` for
/// `nrows` rows: the routed experts of a prompt in one launch.
#[allow(clippy::too_many_arguments)]
pub fn products_table(
    dev: &Device,
    m: &DevMat,
    tbl: u64,
    nprob: usize,
    rows: usize,
    ntok: usize,
    xq: u64,
    nrows: usize,
) -> Result<()> {
    let (bits, lg, kernel) = parts(m, true)?;
    if nprob == 0 || rows == 0 || ntok == 0 {
        return Ok(());
    }
    if nprob > 65535 {
        return Err(CudaError::Invalid(format!(
            "{nprob} products in one GEMM launch"
        )));
    }
    let meta = xq + (nrows * m.cols * 4) as u64;
    dev.note_bytes(m.nbytes() * nprob);
    dev.launch(
        kernel,
        config(bits, rows, ntok, nprob),
        &[
            A::P(tbl),
            A::I(m.cols as i32),
            A::I(lg as i32),
            A::P(xq),
            A::P(meta),
        ],
    )
}

/// `out[n] += sum_j w[n k + j] y[idx[n k + j]]` over the j < k with `idx >= 0`, in j order, for
/// `t` rows of `h` (`idx` i32 and `w` f32 in device memory).
#[allow(clippy::too_many_arguments)]
pub fn rows_combine(
    dev: &Device,
    out: u64,
    y: u64,
    idx: u64,
    w: u64,
    k: usize,
    t: usize,
    h: usize,
) -> Result<()> {
    if t == 0 || h == 0 {
        return Ok(());
    }
    dev.launch(
        Kernel::GemmRowsCombine,
        LaunchConfig {
            grid_dim: (h.div_ceil(256) as u32, t as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        },
        &[
            A::P(out),
            A::P(y),
            A::P(idx),
            A::P(w),
            A::I(k as i32),
            A::I(h as i32),
        ],
    )
}
