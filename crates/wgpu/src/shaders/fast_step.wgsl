// What the one-token forms (fast_dec.wgsl, fast_half.wgsl) share: each row's first code vec4
// and scale, and a lane step's loads.

// Rows row0..row0+R: the index of each one's first vec4 of codes (`w`) and first scale (`s`).
struct Rows {
    w: array<u32, R>,
    s: array<u32, R>,
}

// Rows row0..row0+R of the matrix whose codes start at vec4 `wbase4` and scales at `sbase`
// (rows past the matrix read its last row, not written), `nv` vec4s and `ng` groups a row;
// their sums in acc cleared.
fn rows_at(wbase4: u32, sbase: u32, rows: u32, row0: u32, nv: u32, ng: u32) -> Rows {
    var rs: Rows;
    for (var r = 0u; r < R; r++) {
        let row = min(row0 + r, rows - 1u);
        rs.w[r] = wbase4 + row * nv;
        rs.s[r] = sbase + row * ng;
        acc[r] = 0.0;
    }
    return rs;
}

// The R * SPAN 16-byte loads of the lane step at chunk i0 (chunk i0 + u * LG of row r at
// u * R + r), all issued before one is used; a chunk past the row reads the row's last, unused.
fn step_loads(rs: Rows, i0: u32, nv: u32) -> array<vec4<u32>, R * SPAN> {
    var wv: array<vec4<u32>, R * SPAN>;
    for (var u = 0u; u < SPAN; u++) {
        let i = min(i0 + u * LG, nv - 1u);
        for (var r = 0u; r < R; r++) {
            wv[u * R + r] = W4[rs.w[r] + i];
        }
    }
    return wv;
}
