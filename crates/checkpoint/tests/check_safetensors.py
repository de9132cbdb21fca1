"""Reads or writes a safetensors file with the reference Python package, for
the checkpoint crate's interop test (tests/it/main.rs).

    check_safetensors.py check FILE EXPECTED_JSON   # {name: {"shape": [...], "bits": [u32...]}}
    check_safetensors.py write FILE                 # writes the tensors the test expects
"""

import json
import sys

try:
    import numpy as np
    from safetensors.numpy import load_file, save_file
except ImportError as e:
    print(f"missing Python package ({e}); run `pip install safetensors numpy`", file=sys.stderr)
    sys.exit(3)


def check(path, expected):
    tensors = load_file(path)
    if sorted(tensors) != sorted(expected):
        sys.exit(f"{path}: tensors {sorted(tensors)}, expected {sorted(expected)}")
    for name, want in expected.items():
        t = tensors[name]
        if t.dtype != np.float32:
            sys.exit(f"{path}: {name} has dtype {t.dtype}, expected float32")
        if list(t.shape) != want["shape"]:
            sys.exit(f"{path}: {name} has shape {list(t.shape)}, expected {want['shape']}")
        bits = np.array(want["bits"], dtype=np.uint32).reshape(want["shape"])
        if not np.array_equal(t.view(np.uint32), bits):
            sys.exit(f"{path}: {name} holds {t.tolist()}, expected {bits.view(np.float32).tolist()}")
    print(f"ok {len(tensors)} tensors")


def write(path):
    save_file(
        {
            "layers.0.weight": np.arange(6, dtype=np.float32).reshape(2, 3) / 4,
            "layers.0.bias": np.array([-1.5, 0.0, 2.25], dtype=np.float32),
        },
        path,
    )
    print("ok written")


if __name__ == "__main__":
    if sys.argv[1:2] == ["check"] and len(sys.argv) == 4:
        check(sys.argv[2], json.loads(sys.argv[3]))
    elif sys.argv[1:2] == ["write"] and len(sys.argv) == 3:
        write(sys.argv[2])
    else:
        sys.exit(__doc__)
