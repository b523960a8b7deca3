#!/usr/bin/env python3
"""Writes the reference files tests/recall/test_loaders.cpp reads, with the real writers (numpy, safetensors, torch).

  python3 tests/data/make_reference_files.py OUTDIR

Values are arithmetic sequences, so the C++ test recomputes them (fp8/fp16/bf16 through keysel's own rounding).
"""
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

out = sys.argv[1]
os.makedirs(out, exist_ok=True)

# safetensors: every dtype keysel reads, values (i - 12) / 4 for i in 0..23, shape [2, 3, 4].
base = (torch.arange(24, dtype=torch.float64) - 12) / 4
tensors = {
    "f32": base.to(torch.float32).reshape(2, 3, 4),
    "f16": base.to(torch.float16).reshape(2, 3, 4),
    "bf16": base.to(torch.bfloat16).reshape(2, 3, 4),
    "f8_e4m3": base.to(torch.float8_e4m3fn).reshape(2, 3, 4),
    "f8_e5m2": base.to(torch.float8_e5m2).reshape(2, 3, 4),
    "f64": base.reshape(2, 3, 4),
    "i32": torch.arange(-5, 7, dtype=torch.int32),
    "i64": torch.arange(0, 12, dtype=torch.int64) * 1000,
    "i8": torch.arange(-6, 6, dtype=torch.int8),
}
save_file(tensors, os.path.join(out, "reference.safetensors"), metadata={"writer": "safetensors.torch.save_file"})

# .npy in format versions 1, 2 and 3, and the two layouts keysel rejects.
def write(name, array, version=None):
    with open(os.path.join(out, name), "wb") as f:
        np.lib.format.write_array(f, array, version=version, allow_pickle=False)

write("np_f4_v1.npy", (np.arange(12) / 7).astype("<f4").reshape(3, 4), (1, 0))
write("np_f2_v2.npy", ((np.arange(6) - 3) / 4).astype("<f2").reshape(2, 3), (2, 0))
write("np_i8_v3.npy", (np.arange(5) - 2).astype("<i8"), (3, 0))
write("np_f8.npy", (np.arange(4) / 3).astype("<f8"))
write("np_i4.npy", np.arange(-3, 3).astype("<i4").reshape(2, 3))
write("np_i1.npy", np.arange(-3, 3).astype("i1"))
write("np_fortran.npy", np.asfortranarray(np.arange(6, dtype="<f4").reshape(2, 3)))
write("np_bigendian.npy", np.arange(3).astype(">f4"))
print("numpy", np.__version__, "files:", sorted(os.listdir(out)))
