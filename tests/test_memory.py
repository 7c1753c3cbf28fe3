"""The memory preflight's estimate (uda_ray.memory) on cases a person can check by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from uda_ray.memory import saved_bytes_per_pixel, step_bytes
from uda_ray.models import build_model


def test_saved_bytes_per_pixel_on_a_hand_case():
    # conv1 saves its input (the image: counted with the batch) and its weight (a parameter);
    # the ReLU saves its output, which conv2 saves as its input: one 5-channel float32 map
    model = nn.Sequential(nn.Conv2d(3, 5, 1), nn.ReLU(), nn.Conv2d(5, 2, 1))
    assert saved_bytes_per_pixel(model) == 5 * 4


def test_step_bytes_on_a_hand_case():
    # 2 images of 10x10: float32 RGB (12 B/px) + int64 labels (8 B/px) + 20 B/px of activations
    assert step_bytes(batch_size=2, pixels=100, act_per_pixel=20) == 2 * 100 * (12 + 8 + 20) == 8000
    assert step_bytes(batch_size=2, pixels=100, labels=False) == 2400


@pytest.mark.parametrize("arch", ["tiny", "tiny_ppm"])
def test_the_estimate_is_a_lower_bound_and_leaves_the_model_as_it_was(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=19).train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    per_px = saved_bytes_per_pixel(model)
    assert per_px > 0
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())  # no BatchNorm update
    assert torch.equal(torch.get_rng_state(), rng)
    # what autograd really keeps (every saved tensor, parameters aside) on a larger image, in
    # train mode: at least the estimate scaled to it (the PPM's pooled maps do not scale)
    seen, params = {}, {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.zeros(1, 3, 96, 160))
    assert per_px * 96 * 160 <= sum(seen.values())
