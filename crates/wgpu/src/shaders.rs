//! The WGSL sources, by kernel name. The products and embed are `mat.wgsl` (weight access)
//! followed by their own file; [`all`] is what the MSL translation test walks.

const MAT: &str = include_str!("shaders/mat.wgsl");

/// `(name, full WGSL source)` of every kernel.
pub fn all() -> Vec<(&'static str, String)> {
    let with_mat = |s: &str| format!("{MAT}\n{s}");
    vec![
        ("matmul", with_mat(include_str!("shaders/matmul.wgsl"))),
        ("expert", with_mat(include_str!("shaders/expert.wgsl"))),
        ("embed", with_mat(include_str!("shaders/embed.wgsl"))),
        ("norm", include_str!("shaders/norm.wgsl").into()),
        ("ew", include_str!("shaders/ew.wgsl").into()),
        ("rope", include_str!("shaders/rope.wgsl").into()),
        ("attention", include_str!("shaders/attention.wgsl").into()),
        ("conv", include_str!("shaders/conv.wgsl").into()),
        ("delta", include_str!("shaders/delta.wgsl").into()),
        ("topk", include_str!("shaders/topk.wgsl").into()),
        ("argmax", include_str!("shaders/argmax.wgsl").into()),
        ("esum", include_str!("shaders/esum.wgsl").into()),
    ]
}

/// The source of kernel `name` and its entry point: `matmul_rows` and `expert_rows` are the
/// one-thread-per-row entry points (`per_row`) of `matmul.wgsl` and `expert.wgsl`.
pub fn source(name: &str) -> Option<(String, &'static str)> {
    let (file, entry) = match name {
        "matmul_rows" => ("matmul", "per_row"),
        "expert_rows" => ("expert", "per_row"),
        n => (n, "main"),
    };
    all()
        .into_iter()
        .find(|(n, _)| *n == file)
        .map(|(_, s)| (s, entry))
}
