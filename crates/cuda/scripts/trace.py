#!/usr/bin/env python3
"""Prints the VRAM decode figures and the per-kernel trace of one token from a cuda_bench JSON."""
import json
import sys

d = json.load(open(sys.argv[1]))
m = d["synthetic"]["modes"]["experts_in_vram"]
t = m["kernel_trace"]
print("ms/token", round(m["ms_per_token"], 4), "ratio", round(m["time_over_bound_ratio"], 3),
      "float", m.get("ms_per_token_float_kernels"), "traced us", round(t["total_us"], 1),
      "launches", t["launches"])
for k in t["kernels"]:
    print(f'{k["kernel"][:34]:34} {str(k["grid"]):14} {k["launches"]:4} {k["total_us"]:8.1f} {k["per_launch_us"]:7.2f}')
