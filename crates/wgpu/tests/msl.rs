//! The macOS evidence that runs here: every WGSL kernel parsed and validated by naga and
//! translated to Metal Shading Language by naga's MSL backend (what wgpu does on a Mac). A
//! shader that Metal's translation rejects fails here, not on a user's machine.
#[test]
fn every_kernel_translates_to_msl() {
    let kernels = flashmoe_wgpu::shaders::all();
    assert!(kernels.len() >= 12, "kernels: {}", kernels.len());
    assert!(
        kernels.iter().any(|(n, _)| n.ends_with("_sg")),
        "the subgroup variants of the fast products are translated too"
    );
    let half: Vec<&String> = kernels
        .iter()
        .filter(|(n, _)| n.contains("_h_g"))
        .map(|(n, _)| n)
        .collect();
    assert!(
        half.len() >= 36,
        "the f16 decode form at each width, group and scale dtype, both reductions: {half:?}"
    );
    for (name, src) in kernels {
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{name}: WGSL: {}", e.emit_to_string(&src)));
        // unpack2x16float (the f16 weights and scales) is core WGSL; naga names it a
        // capability, which wgpu grants on every Metal device. Subgroup operations (the fast
        // products' `sg` variants) are what Apple GPUs call SIMD-group functions. f16 in
        // shaders (the `_h` decode form, `enable f16;`) is Metal's native `half`, which wgpu
        // offers as SHADER_F16 on every Metal device.
        let caps = naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32
            | naga::valid::Capabilities::SUBGROUP
            | naga::valid::Capabilities::SHADER_FLOAT16;
        let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name}: validation: {e:?}"));
        let opts = naga::back::msl::Options {
            lang_version: (2, 4),
            ..Default::default()
        };
        let pipe = naga::back::msl::PipelineOptions::default();
        let (msl, _) = naga::back::msl::write_string(&module, &info, &opts, &pipe)
            .unwrap_or_else(|e| panic!("{name}: MSL: {e:?}"));
        assert!(msl.contains("kernel void"), "{name}: no kernel in the MSL");
        if name.contains("_h_g") {
            assert!(
                msl.contains("half4"),
                "{name}: no half-precision vectors in the MSL"
            );
        }
    }
}

/// Every kernel is listed once (the f16 form's 8-bit products run, and are named as, the
/// decode form's).
#[test]
fn kernel_names_are_unique() {
    let kernels = flashmoe_wgpu::shaders::all();
    let mut names: Vec<&String> = kernels.iter().map(|(n, _)| n).collect();
    names.sort();
    let n = names.len();
    names.dedup();
    assert_eq!(names.len(), n, "a kernel listed twice");
}
