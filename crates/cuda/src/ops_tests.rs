//! The decode and prefill kernel a matrix takes ([`Fmt::kernel`], [`launch_shape`], the
//! indirect and epilogue twins), by the names kernels.cu gives them: the typed selection must
//! pick the kernels the name-built one picked (the bench tables and `launched_by` tests read
//! these names).
use super::*;

fn affine(bits: u32, sdt: u8) -> Fmt {
    Fmt::Affine { bits, lg: 6, sdt }
}

/// (kernel name, blocks, threads) for `rows` x `cols` of `f` over `nprob` problems on `sms`.
fn pick(f: Fmt, decode: bool, rows: usize, cols: usize, nprob: usize) -> (String, u32, u32) {
    let (k, _) = f.kernel(decode, rows, cols).unwrap();
    let (k, b, t) = launch_shape(132, k, rows, nprob);
    (k.name(), b, t)
}

#[test]
fn matrices_take_the_kernels_named_before() {
    set_affine_path(AffinePath::Auto);
    let n = |v: (String, u32, u32)| v.0;
    assert_eq!(n(pick(affine(4, 0), true, 4096, 4096, 1)), "qmv4_bf16_mp");
    assert_eq!(n(pick(affine(8, 1), true, 4096, 20480, 1)), "qmv8_f16_mvg");
    assert_eq!(n(pick(affine(2, 2), false, 4096, 4096, 1)), "qmv2_f32_mm");
    assert_eq!(n(pick(Fmt::Dense(0), true, 64, 4096, 1)), "dmv_bf16_mv");
    assert_eq!(n(pick(Fmt::Dense(2), false, 64, 4096, 1)), "dmv_f32_mm");
    set_affine_path(AffinePath::Float);
    // Short matrices: fewer rows per warp, and 4-warp blocks below two blocks an SM.
    assert_eq!(
        pick(affine(4, 0), true, 64, 4096, 1),
        ("qmv4_bf16_mv1".into(), 16, 128)
    );
    assert_eq!(
        pick(affine(4, 0), true, 4096, 4096, 1),
        ("qmv4_bf16_mv1".into(), 512, 256)
    );
    assert_eq!(
        pick(affine(4, 0), true, 8192, 4096, 1),
        ("qmv4_bf16_mv2".into(), 512, 256)
    );
    assert_eq!(n(pick(affine(4, 0), true, 16384, 4096, 1)), "qmv4_bf16_mv");
    set_affine_path(AffinePath::Mma);
    set_mma_tile(16);
    assert_eq!(
        pick(affine(4, 0), true, 4096, 4096, 1),
        ("qmv4_bf16_mt1".into(), 256, 256)
    );
    set_mma_tile(0);
    set_affine_path(AffinePath::Auto);
}

#[test]
fn twins_keep_their_names() {
    set_affine_path(AffinePath::Auto);
    let (k, _) = affine(4, 0).kernel(true, 4096, 4096).unwrap();
    assert!(k.is_prepared());
    assert_eq!(
        k.indirect().map(Kernel::name).as_deref(),
        Some("qmv4_bf16_mpi")
    );
    assert_eq!(k.with_qvar(QVar::Mpc).name(), "qmv4_bf16_mpc");
    assert_eq!(k.with_qvar(QVar::Mpa).name(), "qmv4_bf16_mpa");
    let (g, _) = affine(4, 0).kernel(true, 4096, 20480).unwrap();
    assert_eq!(g.indirect(), None, "mvg has no indirect twin");
    let (d, _) = Fmt::Dense(1).kernel(true, 64, 4096).unwrap();
    assert_eq!(
        d.indirect().map(Kernel::name).as_deref(),
        Some("dmv_f16_mvi")
    );
    let (m, _) = affine(4, 0).kernel(false, 64, 4096).unwrap();
    assert_eq!(m.indirect(), None, "mm has no indirect twin");
}

#[test]
fn a_format_with_no_kernel_is_an_error_not_a_panic() {
    let bad = Fmt::Affine {
        bits: 3,
        lg: 6,
        sdt: 0,
    };
    assert!(matches!(
        bad.kernel(true, 64, 4096),
        Err(CudaError::Unsupported(_))
    ));
    assert!(Fmt::Dense(7).kernel(true, 64, 4096).is_err());
}

/// What a matvec launch does on the host before the driver call (kernel choice, launch
/// shape, twins, the function's index, the parameter array over its struct arguments)
/// allocates nothing; it formatted the kernel's name (one to three `String`s), hashed it,
/// collected a `Vec` of parameters and boxed its `MvBatch` before.
#[test]
fn a_launchs_host_work_allocates_nothing() {
    use crate::alloc_count::allocations;
    use crate::device::params;
    set_affine_path(AffinePath::Auto);
    let f = affine(4, 0);
    let batch = MvBatch::default();
    let epi = Epi::default();
    let mut sink = 0usize;
    let n = allocations(|| {
        for (rows, cols) in [(4096, 4096), (64, 20480), (151936, 2048)] {
            let (k, smem) = f.kernel(true, rows, cols).unwrap();
            let (k, blocks, threads) = launch_shape(132, k, rows, 1);
            let k = k.indirect().unwrap_or(k).with_qvar(QVar::Mpc);
            let [qa, qb] = Prepared::args(None);
            let args = [
                A::B(&batch),
                A::I(rows as i32),
                A::I(cols as i32),
                A::P(0),
                qa,
                qb,
                A::X(&epi),
            ];
            let p = params(k, &args).unwrap();
            sink += k.index() + smem as usize + (blocks + threads) as usize;
            sink += p.iter().filter(|p| !p.is_null()).count();
        }
    });
    assert!(sink > 0);
    assert_eq!(n, 0, "host work of a launch allocated {n} times");
    // The counter counts.
    assert_eq!(allocations(|| drop(std::hint::black_box(vec![1u8]))), 1);
}

#[test]
fn more_arguments_than_the_bound_is_an_error() {
    use crate::device::{params, MAX_ARGS};
    let args = [A::I(0); MAX_ARGS + 1];
    assert!(params(Kernel::ChainStep, &args).is_err());
    assert!(params(Kernel::ChainStep, &args[..MAX_ARGS]).is_ok());
}

/// kernels.cu's `amax_key`, for the decoding test below.
fn amax_key(v: f32, i: u32) -> u64 {
    let b = v.to_bits();
    let o = if v.is_nan() {
        0
    } else if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    };
    (o as u64) << 32 | !i as u64
}

/// The argmax key gives back its index and value (which greedy decoding checks is finite);
/// an all-NaN key (value half 0) decodes to NaN, and keys order as their values do.
#[test]
fn argmax_keys_decode_to_index_and_value() {
    let vals = [
        f32::NEG_INFINITY,
        -1.5,
        -0.0,
        0.0,
        3.25,
        f32::MAX,
        f32::INFINITY,
    ];
    for (i, &v) in vals.iter().enumerate() {
        let k = amax_key(v, i as u32 * 7);
        assert_eq!(argmax_index(k), i as u32 * 7);
        assert_eq!(argmax_value(k).to_bits(), v.to_bits(), "{v}");
    }
    for w in vals.windows(2) {
        assert!(amax_key(w[0], 0) < amax_key(w[1], 0) || w[0] == w[1]);
    }
    assert!(argmax_value(amax_key(f32::NAN, 3)).is_nan());
    assert!(argmax_value(0).is_nan());
}
