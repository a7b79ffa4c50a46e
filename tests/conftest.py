# One intra-op thread for the whole suite, and for the processes tests start (torchrun, the CLIs).
# The models here are tiny: a second OpenMP thread buys nothing on them, and when tests start
# 2-process DDP runs on a 2-core machine, spinning OpenMP workers oversubscribe the cores and make
# small matmuls hundreds of times slower.
import os

os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)
