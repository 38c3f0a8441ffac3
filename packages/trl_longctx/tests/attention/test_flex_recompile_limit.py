"""`flex_sinks.compile_failing_loudly`: past its recompile limit a compiled function raises, naming the setting that
turns flex attention off, where torch.compile would run it uncompiled without a word (for flex attention: `[T, T]`
scores per head, out of memory at long context). Both dynamo settings hold only while the function runs. Exact
checks: no tolerances (the function is `x * 2`)."""

import pytest
import torch

from trl_longctx.attention.flex_sinks import RECOMPILE_LIMIT, FlexRecompileLimitError, compile_failing_loudly


def test_the_call_past_the_limit_raises_and_the_ones_before_compute():
    double = compile_failing_loudly(lambda x: x * 2, limit=2, backend="eager")
    for dtype in (torch.float32, torch.float64):  # a dtype change recompiles
        x = torch.arange(4, dtype=dtype)
        assert torch.equal(double(x), x * 2)
    with pytest.raises(FlexRecompileLimitError, match="flex_attention=False"):
        double(torch.arange(4, dtype=torch.int32))


def test_dynamo_settings_are_unchanged_outside_the_call():
    config = torch._dynamo.config
    before = (config.recompile_limit, config.fail_on_recompile_limit_hit)
    seen = []

    def probe(x):
        seen.append((config.recompile_limit, config.fail_on_recompile_limit_hit))
        return x + 1

    compile_failing_loudly(probe, limit=5, backend="eager")(torch.zeros(2))
    assert seen == [(5, True)]  # dynamo traced the body under the call's settings
    assert (config.recompile_limit, config.fail_on_recompile_limit_hit) == before
    assert before[0] < RECOMPILE_LIMIT  # flex attention gets more than torch's default
