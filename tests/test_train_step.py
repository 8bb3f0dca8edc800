"""The trainer's step trains on ``Transformer.loss`` and logs its parts (cross entropy and
the MoE aux loss) as before, when the step added them up itself."""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from growkit.models import ModelConfig, Transformer, causal_lm_loss
from growkit.train.config import TrainConfig
from growkit.train.trainer import Trainer, make_optimizer


@pytest.mark.parametrize("n_experts", [0, 4])
def test_train_step_uses_the_model_loss_and_logs_its_parts(n_experts):
    cfg = TrainConfig(grad_clip=1.0)
    mcfg = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, n_experts=n_experts,
                       top_k=2, aux_loss_coef=0.01)
    x = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))

    def fresh():
        model = Transformer(mcfg)
        model.init_weights(seed=0)
        return model

    # What the step computed before it called model.loss: ce + coef * aux, by hand.
    ref = fresh()
    ce_ref = causal_lm_loss(ref(x), y)
    aux_ref = ref.aux_loss() if n_experts else None
    loss_ref = ce_ref + mcfg.aux_loss_coef * aux_ref if n_experts else ce_ref

    model = fresh()
    fake = SimpleNamespace(model=model, optimizer=make_optimizer(model, cfg, 1e-3), cfg=cfg,
                           _autocast=nullcontext, wrapper=None,
                           _after_backward=lambda: None, _after_optimizer_step=lambda: None)
    loss, ce, aux, gnorm = Trainer._train_step(fake, x, y, 1e-3)
    assert torch.equal(loss, loss_ref.detach())  # the trained loss is bitwise the same
    if n_experts:
        assert torch.equal(aux, aux_ref.detach())
        assert float(ce) == pytest.approx(float(ce_ref.detach()), rel=1e-6, abs=0)
        assert float(aux) > 0
    else:
        assert aux is None and torch.equal(ce, ce_ref.detach())
    assert gnorm is not None and float(gnorm) > 0
    assert fake.optimizer.param_groups[0]["lr"] == 1e-3
