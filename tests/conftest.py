import os

# OpenMP threads spin-wait at barriers by default; on a shared 2-core machine that turns every
# small op into a scheduler tick (measured: 28 s vs 0.4 s for 25 tiny LLaMA steps). Must be set
# before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# torch 2.13's oneDNN float16 convolution kernels for CPUs with AVX512-FP16 (Sapphire Rapids and
# later) segfault on some strided, dilated, padded shapes the property tests draw, plain
# F.conv2d included (x 2×4×2×1, w 4×2×2×1, stride 2, padding 1, dilation 2, groups 2). Cap
# oneDNN below that instruction set in the test process; other CPUs are not affected.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
