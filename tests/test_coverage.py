"""Coverage scores: hand-computed values, inside vs far away, saved with a trained GT, and old GT directories."""

from __future__ import annotations

import pytest
import torch

from fedgt.provider.coverage import COVERAGE_FILE, Coverage, load_coverage, nearest_other
from fedgt.provider.grad_transformer import GTConfig, TokenNorm, build_gt, load_gt, save_gt

SHAPE = (2, 12)  # (TinyLM layer tokens, token width)


def _curated(n: int = 40, seed: int = 0) -> torch.Tensor:
    """Curated TinyLM updates: a spread-out cloud, each coordinate with its own scale and offset."""
    g = torch.Generator().manual_seed(seed)
    scale, offset = torch.rand(SHAPE, generator=g) + 0.1, torch.randn(SHAPE, generator=g)
    return offset + scale * torch.randn(n, *SHAPE, generator=g)


def _fit(tiny: torch.Tensor, quantile: float = 0.95) -> Coverage:
    norm = TokenNorm(*SHAPE)
    norm.fit(tiny)
    return Coverage.fit(norm.mean, norm.std, tiny, quantile)


def test_the_score_is_the_nearest_distance_over_the_quantile_of_leave_one_out_distances() -> None:
    # Three 1-d curated updates at 0, 1, 3 (identity normalisation): leave-one-out nearest distances 1, 1, 2.
    tiny = torch.tensor([0.0, 1.0, 3.0]).view(3, 1, 1)
    torch.testing.assert_close(nearest_other(tiny.flatten(1)), torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
    cov = Coverage.fit(torch.zeros(1, 1), torch.ones(1, 1), tiny, quantile=0.95)
    assert cov.reference == pytest.approx(1.9)  # linear interpolation: 1 + 0.9 * (2 - 1)
    scores = cov(torch.tensor([5.0, 1.5, 0.0]).view(3, 1, 1))  # nearest: 3 (distance 2), 1 (0.5), 0 (0)
    torch.testing.assert_close(scores, torch.tensor([2 / 1.9, 0.5 / 1.9, 0.0]))
    # The distance is measured after the GT's normalisation: std 2 halves every distance, and the reference too.
    halved = Coverage.fit(torch.zeros(1, 1), torch.full((1, 1), 2.0), tiny, quantile=0.95)
    torch.testing.assert_close(halved(torch.tensor([5.0]).view(1, 1, 1)), torch.tensor([2 / 1.9]))


def test_in_distribution_updates_score_inside_and_far_or_random_ones_outside() -> None:
    curated = _curated()
    cov = _fit(curated)
    fresh = _curated(n=40, seed=0)  # the very curated updates: distance 0
    assert (cov(fresh) < 1e-6).all()
    g = torch.Generator().manual_seed(0)
    same_kind = curated[:20] + 0.05 * curated.std(0) * torch.randn(20, *SHAPE, generator=g)
    assert (cov(same_kind) <= 1.0).all()
    far = curated.mean(0) + 10 * curated.std(0) * torch.randn(10, *SHAPE, generator=g)
    random = torch.randn(10, *SHAPE, generator=g) * 5
    assert (cov(far) > 1.0).all() and (cov(random) > 1.0).all()
    # Further draws of the same cloud, never seen: about 95 % fall inside (by construction of the reference).
    held_out = _curated(n=80, seed=0)[40:]
    inside = float((cov(held_out) <= 1.0).float().mean())
    assert inside >= 0.7, inside


def test_bad_inputs_fail_clearly() -> None:
    with pytest.raises(ValueError, match=">= 2 curated"):
        _fit(_curated(n=1))
    with pytest.raises(ValueError, match=r"\(batch, 2, 12\)"):
        _fit(_curated())(torch.zeros(1, 3, 12))


def test_train_gt_saves_the_coverage_of_its_training_domains_for_a_plain_gt(tmp_path) -> None:
    from fedgt.provider.shadow import ShadowPairs
    from fedgt.provider.train_gt import TrainConfig, split_domains, train_gt

    torch.manual_seed(0)
    domains, steps = 10, 3
    names = [f"d{i}" for i in range(domains)]
    pairs = ShadowPairs(torch.randn(domains * steps, *SHAPE), torch.randn(domains * steps, 4, 20),
                        torch.arange(domains).repeat_interleave(steps), torch.arange(steps).repeat(domains), names,
                        None, None, {})
    gt_cfg = GTConfig(*SHAPE, 4, 20, d_model=32, n_heads=4, ffn=64, dropout=0.0)  # anchor_k = 0: a plain GT
    cfg = TrainConfig(objective="mse", select_on="mse", epochs=1, batch_size=8, split_seed=0)
    record = train_gt(pairs, gt_cfg, cfg, None, None, dict.fromkeys(names, ()), tmp_path, progress=False)
    model, _ = load_gt(tmp_path)
    cov = load_coverage(tmp_path, model.src_norm.mean, model.src_norm.std)
    train_names, _ = split_domains(names, cfg.val_fraction, 0)
    final = pairs.select_domains(train_names).final().tiny  # one key per training domain: its final update
    torch.testing.assert_close(cov.keys, model.src_norm(final).flatten(1))
    assert record["coverage"]["reference"] == pytest.approx(cov.reference) and record["coverage"]["rows"] == 9
    assert (cov(final) < 1e-6).all()


def test_an_old_gt_directory_gets_coverage_from_its_prompt_pool_or_reports_it_unknown(tmp_path) -> None:
    from fedgt.provider.prompt_pool import PromptPool

    curated = _curated()
    model = build_gt(GTConfig(*SHAPE, 4, 20, d_model=32, n_heads=4, ffn=64))
    model.src_norm.fit(curated)
    save_gt(model, tmp_path)  # a checkpoint without coverage.safetensors
    assert not (tmp_path / COVERAGE_FILE).exists()
    assert load_coverage(tmp_path, model.src_norm.mean, model.src_norm.std) is None  # unknown
    PromptPool([f"d{i}" for i in range(len(curated))], [["Q"]] * len(curated), curated).save(tmp_path)
    cov = load_coverage(tmp_path, model.src_norm.mean, model.src_norm.std)
    assert cov is not None and cov.reference == pytest.approx(_fit(curated).reference)
    cov.save(tmp_path)
    again = Coverage.load(tmp_path)
    x = _curated(n=5, seed=3)
    torch.testing.assert_close(again(x), cov(x))
    assert again.quantile == 0.95
