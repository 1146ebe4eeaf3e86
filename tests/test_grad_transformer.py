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


def _residual(rows: int = 6, k: int = 2) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_gt(_cfg(anchor_k=k, anchor_rows=rows))
    tiny, llm = torch.randn(rows, 2, 12), torch.randn(rows, 4, 20) * 2 + 1
    model.src_norm.fit(tiny)
    model.tgt_norm.fit(llm)
    model.fit_anchors(tiny, llm, torch.arange(rows))
    return model, tiny, llm


def _nearest_mean(model, query: torch.Tensor, tiny: torch.Tensor, llm: torch.Tensor, k: int) -> torch.Tensor:
    """Brute-force k-nearest by cosine of the normalised TinyLM updates, written out independently."""
    keys = model.src_norm(tiny).flatten(1)
    q = model.src_norm(query).flatten(1)
    sim = torch.stack([torch.nn.functional.cosine_similarity(qi[None], keys) for qi in q])
    return torch.stack([llm[row.argsort(descending=True)[:k]].mean(0) for row in sim])


def test_untrained_residual_gt_is_k_nearest_lookup() -> None:
    model, tiny, llm = _residual()
    query = torch.randn(3, 2, 12)
    torch.testing.assert_close(predict(model, query), _nearest_mean(model, query, tiny, llm, 2))


def test_residual_gt_can_hide_a_domain_from_retrieval() -> None:
    model, tiny, llm = _residual(k=1)
    z = model.src_norm(tiny)
    own = model.tgt_norm.inverse(model.anchor(z))
    torch.testing.assert_close(own, llm)  # each shadow update's nearest row is itself
    hidden = model.tgt_norm.inverse(model.anchor(z, exclude=torch.arange(6)))
    assert not any(torch.allclose(hidden[i], llm[i]) for i in range(6))  # ... unless its domain is hidden


def test_residual_gt_learns_a_correction_and_round_trips(tmp_path) -> None:
    model, tiny, llm = _residual()
    target = llm + 0.5  # lookup alone is off by a constant the GT must learn
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    src, tgt = model.src_norm(tiny), model.tgt_norm(target)
    before = torch.nn.functional.mse_loss(model(src), tgt).item()
    for _ in range(150):
        loss = torch.nn.functional.mse_loss(model(src), tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * before
    save_gt(model, tmp_path)
    again, meta = load_gt(tmp_path)  # the retrieval table travels in the checkpoint
    torch.testing.assert_close(predict(again, tiny), predict(model, tiny))
    assert meta["gt"]["anchor_k"] == 2 and meta["gt"]["anchor_rows"] == 6


def test_residual_gt_configs_are_checked() -> None:
    with pytest.raises(ValueError, match="anchor_k"):
        _cfg(anchor_k=3, anchor_rows=2)
    with pytest.raises(ValueError, match="train_gt sets it"):
        build_gt(_cfg(anchor_k=2))
    with pytest.raises(ValueError, match="parallel"):
        _cfg(anchor_k=1, anchor_rows=4, decoder="autoregressive")
    with pytest.raises(ValueError, match="anchor_rows=6"):
        _residual()[0].fit_anchors(torch.randn(5, 2, 12), torch.randn(5, 4, 20), torch.arange(5))


def test_train_gt_fills_the_retrieval_table_with_its_training_domains(tmp_path) -> None:
    from fedgt.provider.shadow import ShadowPairs
    from fedgt.provider.train_gt import TrainConfig, split_domains, train_gt

    torch.manual_seed(0)
    domains, steps = 10, 3
    names = [f"d{i}" for i in range(domains)]
    pairs = ShadowPairs(torch.randn(domains * steps, 2, 12), torch.randn(domains * steps, 4, 20),
                        torch.arange(domains).repeat_interleave(steps), torch.arange(steps).repeat(domains), names,
                        None, None, {})
    cfg = TrainConfig(objective="mse", select_on="mse", epochs=2, batch_size=8, seed=3, split_seed=0)
    record = train_gt(pairs, _cfg(anchor_k=2), cfg, None, None, dict.fromkeys(names, ()), tmp_path,
                      progress=False)
    model, meta = load_gt(tmp_path)
    train_names, _ = split_domains(names, cfg.val_fraction, 0)  # split_seed, not seed, picks validation
    assert meta["gt"]["anchor_rows"] == len(train_names) == record["train_domains"]
    final = pairs.select_domains(train_names).final()
    torch.testing.assert_close(model.anchor_values, final.llm)
