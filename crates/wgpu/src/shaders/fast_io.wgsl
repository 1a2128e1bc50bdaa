// What fast.wgsl and fast_dec.wgsl share (after the constants `shaders::Fast` writes): the
// bindings of codes, x and y, the code layout's constants, each lane's sums and each lane
// group's.
@group(0) @binding(1) var<storage, read> W4: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read> X4: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> Y: array<f32>;

// Codes per word and x vec4s per word.
const PER: u32 = 32u / BITS;
const XV: u32 = PER / 4u;
const MASK: u32 = (1u << BITS) - 1u;
// acc[r * TB + tt]: row r, token tt.
var<private> acc: array<f32, R * TB>;
// Each lane group's R * TB sums.
var<workgroup> sums: array<f32, (WGS / LG) * R * TB>;
