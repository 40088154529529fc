"""Every method's training forward (as its recipe calls it: labels, so every loss term, in every
stage of its schedule) traces into one torch.compile graph: fullgraph=True raises on any graph
break. backend="eager" runs dynamo only (no inductor), so this checks tracing, not codegen; the
compiled step times are measured by tools/compile_steps.py."""
import pytest
import torch

from robustmm_fast.data.handwritten import load_handwritten
from robustmm_fast.models.registry import METHODS, get_method


@pytest.fixture(scope="module")
def batch():
    data = load_handwritten(seed=1111)
    return data, data.batch(data.splits["train"][:16])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_training_forward_has_no_graph_break(name, batch):
    data, b = batch
    method = get_method(name)
    config = method.config(None, {})
    torch.manual_seed(0)
    model = method.build(data, config).train()
    recipe = method.recipe(config)
    stages = sorted({recipe.stage(epoch) for epoch in range(recipe.epochs)})
    for stage in stages:
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        out = compiled(b.inputs, b.present, labels=b.labels, padding=b.padding, stage=stage)
        assert out.losses, (name, stage)
        total = sum(out.losses.values())
        assert torch.isfinite(total), (name, stage)
        total.backward()
