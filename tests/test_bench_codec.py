"""bench_codec's fraction-of-peak helpers: every convolution is logged, and its FLOPs match torch's counter."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from types import ModuleType

import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import small_config
from vaekit.models import build
from vaekit.ops import precision as prec

ROOT = Path(__file__).resolve().parents[1]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_codec", ROOT / "benchmarks" / "bench_codec.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_conv_log_matches_flop_counter_after_rewrites() -> None:
    bench = _bench()
    cfg = dataclasses.replace(small_config("sd1"), base_channels=16, norm_groups=8)
    torch.manual_seed(0)
    model = prec.execution_model(build(cfg), torch.float32, torch.device("cpu"), True, fast=True)
    for op, x in (("decode", torch.randn(1, 4, 6, 8)), ("encode", torch.rand(1, 3, 48, 64) * 2 - 1)):
        x = x.contiguous(memory_format=torch.channels_last)
        calls = bench._conv_calls(model, op, x)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            getattr(model, op)(x)
        conv_flops = counter.get_flop_counts()["Global"].get(torch.ops.aten.convolution, 0)
        assert calls and sum(bench._conv_flops(c) for c in calls) == conv_flops > 0
    # the decoder's upsampling runs as 2x2 phase convolutions with 4x the output channels (vaekit's rewrite)
    dec = bench._conv_calls(model, "decode", torch.randn(1, 4, 6, 8).contiguous(memory_format=torch.channels_last))
    phase = [c for c in dec if c[1][2:] == (2, 2)]
    assert len(phase) == len(cfg.channel_mult) - 1 and all(c[1][0] == 4 * c[0][1] for c in phase)
    # a convolution timed alone gives a positive duration
    assert bench._conv_alone(dec[0], torch.float32, repeats=1) > 0
