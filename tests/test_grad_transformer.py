"""The Grad-Transformer network: shapes, decoding modes, checkpoints, and that it can learn."""

from __future__ import annotations

import pytest
import torch

from fedgt.provider.grad_transformer import GTConfig, build_gt, load_gt, predict, save_gt

SHAPES = dict(src_tokens=2, src_dim=12, tgt_tokens=4, tgt_dim=20)


def _cfg(**kw) -> GTConfig:
    return GTConfig(**{**SHAPES, "d_model": 32, "n_heads": 4, "ffn": 64, "dropout": 0.0, **kw})


@pytest.mark.parametrize(("kind", "decoder"), [("gt", "parallel"), ("gt", "autoregressive"),
                                               ("paper_gt", "autoregressive")])
def test_shapes_and_generation_agree_with_teacher_forcing(kind: str, decoder: str) -> None:
    torch.manual_seed(0)
    model = build_gt(_cfg(kind=kind, decoder=decoder)).eval()
    for p in model.parameters():  # the GT's output layer starts at zero; give it something to say
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else None
    src = torch.randn(3, 2, 12)
    out = model.generate(src)
    assert out.shape == (3, 4, 20)
    # Teacher forcing on the model's own outputs reproduces generation: the cache / recompute loop is exact.
    tf = model(src, out) if decoder == "autoregressive" else model(src)
    torch.testing.assert_close(tf, out, atol=1e-5, rtol=1e-4)
    if decoder == "autoregressive":
        # Layer t depends only on layers < t: changing the last target leaves every prediction unchanged.
        other = out.clone()
        other[:, -1] += 1.0
        torch.testing.assert_close(model(src, other), tf)


def test_untrained_gt_returns_the_mean_update() -> None:
    model = build_gt(_cfg())
    targets = torch.randn(50, 4, 20) * 3 + 1
    model.tgt_norm.fit(targets)
    pred = predict(model, torch.randn(5, 2, 12))
    torch.testing.assert_close(pred, targets.mean(0).expand(5, -1, -1))


def test_predict_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(batch, 2, 12\)"):
        predict(build_gt(_cfg()), torch.zeros(1, 3, 12))


@pytest.mark.parametrize(("kind", "decoder"), [("gt", "parallel"), ("gt", "autoregressive"),
                                               ("paper_gt", "autoregressive")])
def test_a_tiny_gt_overfits_a_few_pairs(kind: str, decoder: str) -> None:
    torch.manual_seed(0)
    src, tgt = torch.randn(6, 2, 12), torch.randn(6, 4, 20)
    model = build_gt(_cfg(kind=kind, decoder=decoder))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = torch.nn.functional.mse_loss(model(src, tgt), tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.nn.functional.mse_loss(model.eval().generate(src), tgt) < 0.05  # vs ~1.0 for the mean


def test_checkpoint_round_trip(tmp_path) -> None:
    model = build_gt(_cfg(decoder="autoregressive"))
    model.src_norm.fit(torch.randn(10, 2, 12))
    save_gt(model, tmp_path, {"note": "x"})
    again, meta = load_gt(tmp_path)
    x = torch.randn(2, 2, 12)
    torch.testing.assert_close(predict(again, x), predict(model, x))
    assert meta["note"] == "x" and meta["gt"]["decoder"] == "autoregressive"
    with pytest.raises(FileNotFoundError, match="train-gt"):
        load_gt(tmp_path / "missing")


def test_bad_configs_name_the_key() -> None:
    with pytest.raises(ValueError, match="gt.decoder"):
        _cfg(decoder="sideways")
    with pytest.raises(ValueError, match="paper_gt"):
        _cfg(kind="paper_gt", decoder="parallel")
    with pytest.raises(ValueError, match="divisible"):
        _cfg(d_model=30)


def test_probe_tokens_are_read_and_required() -> None:
    torch.manual_seed(0)
    model = build_gt(_cfg(probe_tokens=3, probe_dim=8)).eval()
    torch.nn.init.normal_(model.out.weight, std=0.2)
    src = torch.randn(2, 2, 12)
    a, b = predict(model, src, torch.randn(2, 3, 8)), predict(model, src, torch.randn(2, 3, 8))
    assert a.shape == (2, 4, 20) and not torch.allclose(a, b)  # the probes change the generated update
    with pytest.raises(ValueError, match="probe features"):
        predict(model, src)
    with pytest.raises(ValueError, match="paper_gt"):
        _cfg(kind="paper_gt", decoder="autoregressive", probe_tokens=3, probe_dim=8)
