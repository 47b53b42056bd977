"""torch.compile sees each model whole: one graph, no graph break, for every preset as it trains
(each attention kernel layout a CUDA run may choose), as it validates (expert usage counted) and
as the MAE pre-trains. A graph break splits the step into several compiled pieces with Python
between them: more kernel launches on a GPU, where the tiny presets are launch-bound, and guards
that may recompile. Dynamo traces the same way on every device, so the CPU checks it."""

import pytest
import torch
import torch._dynamo as dynamo

from mmlit_cli.api import create_mae, create_model


def traced(model: torch.nn.Module, *args):
    """(graphs, the graph breaks' reasons) of dynamo tracing `model(*args)`."""
    dynamo.reset()
    try:
        e = dynamo.explain(model)(*args)
    finally:
        dynamo.reset()
    return e.graph_count, [r.reason for r in e.break_reasons]


def images(model_cfg, batch=2):
    return torch.randn(batch, model_cfg.in_chans, model_cfg.image_size, model_cfg.image_size)


@pytest.mark.parametrize("preset", ["xxs", "xs", "s"])
def test_each_preset_trains_as_one_graph(preset):
    model = create_model(preset, num_classes=10).train()
    assert traced(model, images(model.cfg)) == (1, [])


def test_every_attention_layout_is_one_graph():
    """The layouts `runtime.tune_attention` times on CUDA: heads padded to 8, K/V repeated."""
    model = create_model("s", num_classes=10).train()
    layouts = model.blocks[0].attn.kernel_layouts()
    assert len(layouts) == 4  # s: 18-wide grouped heads, so all of them
    for layout in layouts[1:]:
        for block in model.blocks:
            block.attn.set_kernel_layout(*layout)
        assert traced(model, images(model.cfg)) == (1, []), layout


def test_validation_with_expert_usage_is_one_graph():
    model = create_model("xxs", num_classes=10).eval()
    model.set_usage_tracking(True)
    with torch.no_grad():
        assert traced(model, images(model.cfg)) == (1, [])
    assert model.blocks[0].ffn.expert_counts.sum() > 0  # the counting ran in the traced call


def test_mae_pretrains_as_one_graph():
    mae = create_mae("xxs").train()
    assert traced(mae, images(mae.encoder.cfg)) == (1, [])
