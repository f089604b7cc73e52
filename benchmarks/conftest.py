import os

# No GPU here: the triton backend is timed through its CPU interpreter (a correctness tool, so its
# times say nothing about GPU speed). Must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.manual_seed(0)
