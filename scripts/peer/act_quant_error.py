#!/usr/bin/env python3
"""Per-product error of the two activation quantizations, modelled in numpy (issue 20):

- flashmoe's int8 path (crates/core/src/kernels/int8.rs): 4-bit affine weights w = s q + b in
  groups of 64 (b = -7.5 s, as `flashmoe synth` draws), x quantized per group of 64 to
  round(x / (max|x| / 127)), the scale term on the quantized x and the bias term b Σx exact;
- llama.cpp's Q4_0 x Q8_0 (`ggml_vec_dot_q4_0_q8_0`): w = d (q - 8) in blocks of 32, x quantized
  per block of 32 the same way.

Prints each scheme's relative RMS error of W x against the exact product on Gaussian x. The
peer benchmark's accuracy row (peer.py --cases accuracy) measures the same quantizations at the
logits of whole models; this says how far apart the schemes themselves are.

    python3 scripts/peer/act_quant_error.py [--rows 512] [--cols 2048] [--seed 0]
"""
import argparse

import numpy as np


def quantize(x, group):
    """x with each group of `group` values rounded to int8 steps of max|x_g| / 127."""
    xg = x.reshape(-1, group)
    unit = np.abs(xg).max(axis=1, keepdims=True) / 127
    unit[unit == 0] = 1
    return (np.round(xg / unit) * unit).reshape(-1)


def rel(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    x = rng.standard_normal(a.cols)
    q = rng.integers(0, 16, (a.rows, a.cols)).astype(np.float64)
    # flashmoe: scale per group of 64 (+-25%), bias -7.5 s.
    s = np.repeat((0.02 / 4.6) * (1 + 0.25 * rng.uniform(-1, 1, (a.rows, a.cols // 64))), 64,
                  axis=1)
    b = -7.5 * s
    exact = (s * q + b) @ x
    flashmoe = (s * q) @ quantize(x, 64) + b @ x
    # llama.cpp: d (q - 8), block 32.
    w = (0.02 / 4.6) * (q - 8)
    llama = w @ quantize(x, 32)
    print(f"flashmoe int8 (group 64, bias term exact): {rel(flashmoe, exact):.4f}")
    print(f"llama.cpp Q4_0 x Q8_0 (block 32):          {rel(llama, w @ x):.4f}")


if __name__ == "__main__":
    main()
