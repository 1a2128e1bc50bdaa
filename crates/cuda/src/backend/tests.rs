//! Host-side parts of the backend that need no device: how `upload_group` lays a group out
//! and where its members start, and which code widths producers prepare x for.
use flashmoe_core::backend::conformance::{random_linear, Fmt as CFmt};
use flashmoe_core::store::DType;
use rand::{rngs::StdRng, SeedableRng};

use super::{group_layout, member, prep};
use crate::ops::{DevMat, Fmt};

fn affine(rows: &[usize], cols: usize, bits: u32) -> Vec<flashmoe_core::weights::Linear> {
    let mut rng = StdRng::seed_from_u64(3);
    let f = CFmt::Affine(bits, 64, DType::BF16);
    rows.iter()
        .map(|&r| random_linear(&mut rng, r, cols, f))
        .collect()
}

#[test]
fn a_group_stacks_when_its_members_start_aligned() {
    let ws = affine(&[96, 32, 32], 128, 4);
    let refs: Vec<_> = ws.iter().collect();
    assert_eq!(group_layout(&refs), Some(vec![0, 96, 128]));
    // 4-bit, 128 columns, group 64: 4 bytes of scales per row, so row 3 starts at byte 12.
    let ws = affine(&[3, 5], 128, 4);
    let refs: Vec<_> = ws.iter().collect();
    assert_eq!(
        group_layout(&refs),
        None,
        "a member's scales would start unaligned"
    );
    // Mixed formats and a lone matrix are uploaded apart.
    let (a, b) = (affine(&[64], 128, 4), affine(&[64], 128, 8));
    assert_eq!(group_layout(&[&a[0], &b[0]]), None);
    assert_eq!(group_layout(&[&a[0]]), None);
}

#[test]
fn a_member_points_at_its_rows_of_the_stack() {
    let fmt = Fmt::Affine {
        bits: 4,
        lg: 6,
        sdt: 0,
    };
    let whole = DevMat {
        fmt,
        rows: 160,
        cols: 128,
        w: 0x10_0000,
        s: 0x20_0000,
        b: 0x30_0000,
    };
    let m = member(&whole, 96, 32);
    // 128 4-bit codes are 64 bytes a row; 2 groups of bf16 scales (and biases) are 4 bytes.
    assert_eq!((m.rows, m.cols), (32, 128));
    assert_eq!(m.w, 0x10_0000 + 96 * 64);
    assert_eq!((m.s, m.b), (0x20_0000 + 96 * 4, 0x30_0000 + 96 * 4));
    assert_eq!(m.fmt, fmt);
}

#[test]
fn producers_prepare_for_the_most_used_widths() {
    let mat = |bits| DevMat {
        fmt: Fmt::Affine {
            bits,
            lg: 6,
            sdt: 0,
        },
        rows: 64,
        cols: 256,
        w: 0,
        s: 0,
        b: 0,
    };
    let w = prep::Widths::default();
    assert_eq!(w.top(), [None, None]);
    w.note(&mat(8));
    for _ in 0..3 {
        w.note(&mat(4));
    }
    assert_eq!(w.top(), [Some(4), Some(8)]);
    // A dense matrix runs no `mp` kernel: nothing to prepare for it.
    w.note(&DevMat {
        fmt: Fmt::Dense(0),
        ..mat(4)
    });
    assert_eq!(w.top(), [Some(4), Some(8)]);
}
