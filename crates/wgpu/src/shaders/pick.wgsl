// What argmax and the router's top-k rank by (prepended to both): no index is NONE.
const NONE: u32 = 0xffffffffu;

// (v, i) ranks above (w, j): larger, then the lower index; NONE never does, and anything
// else beats NONE. NaN compares false, so it never wins against a number.
fn better(v: f32, i: u32, w: f32, j: u32) -> bool {
    if i == NONE {
        return false;
    }
    if j == NONE {
        return true;
    }
    return v > w || (v == w && i < j);
}
