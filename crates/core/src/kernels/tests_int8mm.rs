//! The int8-activation product of many inputs (`int8mm.rs`): every tile kernel this CPU has
//! against the plain twin, bit for bit, and the whole product against the int8 matvec of each
//! input (the same integers, summed in another order) and against the exact product (within
//! the int8 bound of `tests::int8_activations_bound`).
use super::tests::{gauss, norm, Affine};
use super::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

#[test]
fn int8_tile_kernels_match_the_plain_twin_exactly() {
    let mut rng = StdRng::seed_from_u64(21);
    let names: Vec<_> = int8mm::Kernel::all().iter().map(|k| k.name()).collect();
    // A CPU without AVX2 / VNNI / sdot checks fewer kernels: say which ran.
    eprintln!("int8 tile kernels checked: {names:?}");
    for bits in [2u32, 4] {
        for group in [32usize, 64, 128] {
            // 21 rows: two whole tiles and a partial one; 1, 3, 4, 5, 9 inputs: the kernels'
            // passes of 4 and their remainders.
            let (rows, cols) = (21, 256.max(group));
            let a = Affine::random(&mut rng, bits, group, rows, cols);
            for k in [0usize, 2] {
                let WeightView::Affine(av) = a.view(k) else {
                    unreachable!()
                };
                for n in [1usize, 3, 4, 5, 9] {
                    let mut x = gauss(&mut rng, n * cols);
                    x[..group].fill(0.0); // a zero group: unit 0
                    let b = int8mm::Batch::new(group, &x, n, cols).expect("finite");
                    let mut tile = int8mm::Tile::new(cols, b.ng);
                    let mut plain = int8mm::Tile::new(cols, b.ng);
                    for r0 in [0usize, 8, 16] {
                        tile.load(&av, r0);
                        plain.load_plain(&av, r0);
                        assert!(tile.ws == plain.ws && tile.sl == plain.sl && tile.bl == plain.bl);
                        let mut want = vec![0f32; n * int8mm::TILE];
                        int8mm::tile_plain(&tile, &b, &mut want);
                        for kern in int8mm::Kernel::all() {
                            let mut got = vec![f32::NAN; n * int8mm::TILE];
                            kern.tile(&tile, &b, &mut got);
                            assert!(
                                got.iter()
                                    .zip(&want)
                                    .all(|(g, w)| g.to_bits() == w.to_bits()),
                                "{} b{bits} g{group} n{n} r0 {r0}: {got:?} vs {want:?}",
                                kern.name()
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn int8_product_matches_int8_matvec_and_the_exact_bound() {
    let mut rng = StdRng::seed_from_u64(22);
    for bits in [2u32, 4] {
        for group in [32usize, 64] {
            let (rows, cols, n) = (37, 512, 13);
            let a = Affine::random(&mut rng, bits, group, rows, cols);
            let w = a.view(0);
            let WeightView::Affine(av) = w else {
                unreachable!()
            };
            let dense = dequantize(&w);
            let x = gauss(&mut rng, n * cols);
            for kern in int8mm::Kernel::all() {
                for par_min in [usize::MAX, 0] {
                    let mut got = vec![f32::NAN; n * rows];
                    assert!(matmul_int8(kern, par_min, &av, &x, n, &mut got));
                    for i in 0..n {
                        let xi = &x[i * cols..(i + 1) * cols];
                        let mut mv = vec![0f32; rows];
                        matvec_impl(Isa::Portable, usize::MAX, ActQuant::Int8, &w, xi, &mut mv);
                        let mut exact = vec![0f32; rows];
                        matvec_ref(&w, xi, &mut exact);
                        let prep = int8::Int8Prep::new(bits, group, xi).expect("finite");
                        let qmax = ((1u32 << bits) - 1) as f64;
                        for r in 0..rows {
                            let g = got[i * rows + r];
                            let wr = &dense[r * cols..(r + 1) * cols];
                            let fl = 1e-5 * norm(wr) * norm(xi) + 1e-6;
                            let tag = format!("{} b{bits} g{group} input {i} row {r}", kern.name());
                            assert!(
                                ((g - mv[r]) as f64).abs() <= fl,
                                "{tag}: {g} vs matvec {}",
                                mv[r]
                            );
                            let qb: f64 = (0..cols / group)
                                .map(|gi| {
                                    let s = av.scales.get(r * cols / group + gi).abs() as f64;
                                    s * qmax * group as f64 * prep.unit[gi] as f64 / 2.0
                                })
                                .sum();
                            assert!(
                                ((g - exact[r]) as f64).abs() <= qb + fl,
                                "{tag}: {g} vs exact {}",
                                exact[r]
                            );
                        }
                    }
                }
            }
        }
    }
    // A non-finite input: not taken (the f32 kernels propagate it).
    let a = Affine::random(&mut rng, 4, 64, 8, 128);
    let WeightView::Affine(av) = a.view(0) else {
        unreachable!()
    };
    let mut x = gauss(&mut rng, 16 * 128);
    x[700] = f32::NAN;
    let mut y = vec![0f32; 16 * 8];
    assert!(!matmul_int8(
        int8mm::Kernel::Plain,
        usize::MAX,
        &av,
        &x,
        16,
        &mut y
    ));
    // Through `matmul` with the switch on: the NaN reaches the outputs of its input.
    let mut y = vec![0f32; 16 * 8];
    matmul_impl(isa(), usize::MAX, Many::Int8, &a.view(0), &x, 16, &mut y);
    assert!(y[5 * 8..6 * 8].iter().all(|v| v.is_nan()), "{y:?}");
}
