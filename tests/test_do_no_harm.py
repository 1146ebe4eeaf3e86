"""Do no harm, end to end on the toy pair: organizations whose text is unlike anything the provider curated.

Two sites hold plain English sentences (a ``data.path`` folder per organization), nothing like the built-in
world's task domains the provider's GT was trained on. Each round runs the real site code (``local_round`` and
``release``), the provider's real GT and coverage, and the server's real evaluator as the acceptance criterion.
"""

from __future__ import annotations

import copy
import itertools
import random
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fedgt.core.data import public_text_domains
from fedgt.core.lora import attach_lora, lora_parameters
from fedgt.core.models import load_model
from fedgt.core.noise import SeededNoise
from fedgt.core.org_data import simulated_organizations
from fedgt.core.run_config import COVERAGE_KEY, FedConfig, from_run_config, pyproject_run_config
from fedgt.core.updates import spec_of
from fedgt.org.policy import simulated_policy
from fedgt.org.release import release
from fedgt.org.site import local_round, tiny_model_dir
from fedgt.provider.provision import published_identity
from fedgt.server.evaluation import LLMEvaluator
from fedgt.server.translator import Translator
from strategies.grad_transformer import GradTransformerStrategy

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 2


@pytest.fixture(autouse=True)
def _flower_task_identity(monkeypatch) -> None:
    """Messages are normally built inside a Flower run, which sets the run id; outside one, set it."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def english_folders(root: Path, orgs: int = 2, lines: int = 80) -> Path:
    """One folder of plain English sentences per organization (the user-folder format: a .txt, one per line)."""
    parts = (["The gardener", "My neighbour", "A small child", "The old teacher", "Our baker", "The tired doctor"],
             ["waters", "paints", "repairs", "sells", "describes", "carries"],
             ["the red roses", "a wooden fence", "fresh bread", "the blue bicycle", "warm soup", "an old map"],
             ["every morning.", "before the rain.", "after lunch.", "on Sundays.", "near the river.", "in spring."])
    sentences = [" ".join(words) for words in itertools.product(*parts)]
    for i in range(orgs):
        random.Random(i).shuffle(sentences)
        (root / f"site-{i}").mkdir(parents=True)
        (root / f"site-{i}" / "notes.txt").write_text("\n".join(sentences[:lines]) + "\n")
    return root


def provider_gt(cfg: FedConfig) -> Path:
    """The provider's GT for the toy pair, curated on 16 built-in shadow domains (seconds; cached per session)."""
    from fedgt.provider.provision import ProviderConfig, provide

    return provide(ProviderConfig(tiny="toy", llm="toy-large", lora=cfg.lora_settings(), finetune=cfg.finetune_config(),
                                  shadow_domains=16, n_examples=16, probes=4, epochs=2, same_val_domains=2,
                                  d_model=32, workers=1), progress=False)


def _model_state(name: str, cfg: FedConfig) -> tuple:
    model = attach_lora(load_model(name)[0], cfg.lora_settings())
    return spec_of(model), lora_parameters(model)


def test_the_shared_llm_never_ends_worse_than_the_untuned_one(toy_pair, tmp_path) -> None:
    cfg = from_run_config({**pyproject_run_config(ROOT / "pyproject.toml"), "model.pair": "toy", "train.steps": 10,
                           "train.batch-size": 4, "data.path": str(english_folders(tmp_path / "sites")),
                           "strategy.aggregator": "mean", "federation.num-organizations": 2,
                           "strategy.accept-rounds": True})
    assert (cfg.strategy.out_of_coverage, cfg.strategy.accept_rounds) == ("skip", True)  # the guard under test
    tiny, llm = (str(p) for p in toy_pair)
    translator = Translator(provider_gt(cfg), "cpu", tiny_model=tiny)
    orgs = simulated_organizations(cfg, 2)
    public = [ex for d in public_text_domains() for ex in d.test][:64]
    evaluator = LLMEvaluator(llm, cfg.lora_settings(), orgs, public, 16, "cpu", cfg.train.max_length)
    (tiny_spec, tiny_init), (llm_spec, llm_init) = _model_state(tiny, cfg), _model_state(llm, cfg)

    def federation(**do_no_harm) -> GradTransformerStrategy:
        return GradTransformerStrategy(translate=translator, tiny_spec=tiny_spec, llm_spec=llm_spec,
                                       tiny_init=tiny_init, llm_init=llm_init, lora=cfg.lora_settings(),
                                       aggregator="mean", space="weights", rounds="fresh", min_available_nodes=2,
                                       tiny_identity=published_identity(translator.meta), **do_no_harm)

    guarded = federation(coverage=translator.coverage, out_of_coverage=cfg.strategy.out_of_coverage,
                         coverage_threshold=cfg.strategy.coverage_threshold, public_loss=evaluator.public_loss)
    unguarded = federation()  # no coverage, no acceptance: every translation applied
    untuned = evaluator(guarded.llm, guarded.llm_weight_change())
    worst_unguarded = -float("inf")
    for server_round in range(1, ROUNDS + 1):
        replies = [site_reply(cfg, org, i, server_round, guarded) for i, org in enumerate(orgs)]
        guarded.aggregate_train(server_round, replies)
        unguarded.aggregate_train(server_round, replies)
        scores = evaluator(guarded.llm, guarded.llm_weight_change())
        assert scores["public-loss"] <= untuned["public-loss"] + 1e-9
        for name, org in scores["orgs"].items():
            assert org["loss"] <= untuned["orgs"][name]["loss"] + 1e-9, (server_round, name)
        log = guarded.round_log[server_round]
        assert sorted(log["coverage"]) == [1, 2] and all(s > 1.0 for s in log["coverage"].values())
        assert log["out-of-coverage"] == [1, 2] and log["llm-unchanged"]
        # Skipped updates still count as the sites' own scores (the reference "each organization's own TinyLM").
        assert log["metrics"]["accepted"] == 0 and log["metrics"]["tiny-test-loss"] > 0
        other = evaluator(unguarded.llm, unguarded.llm_weight_change())
        worst_unguarded = max(worst_unguarded, other["org-loss"] - untuned["org-loss"],
                              other["public-loss"] - untuned["public-loss"])
    # The premise: applying these translations does make the shared LLM worse.
    assert worst_unguarded > 0.005
    # Each site hears how far outside the GT's coverage its last update was.
    grid = type("Grid", (), {"get_node_ids": lambda self: [1, 2]})()
    sent = {m.metadata.dst_node_id: m.content["config"][COVERAGE_KEY]
            for m in guarded.configure_train(ROUNDS + 1, guarded.current_arrays(), ConfigRecord({}), grid)}
    assert sent == {n: pytest.approx(s) for n, s in guarded.coverage_scores.items()}


def site_reply(cfg: FedConfig, org, index: int, server_round: int, strategy: GradTransformerStrategy) -> Message:
    """One site's round through the real site code and release, as a reply message to the server."""
    policy = simulated_policy(cfg.sim_sites, index)
    result = local_round(cfg, org, policy, {}, strategy.tiny.current, server_round, None, SeededNoise(index),
                         tiny_model_dir(cfg, policy), strategy.tiny_identity)
    assert result.decline is None, result.decline
    instruction = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=index + 1, message_type="train")
    return Message(release(result.update, result.spec, result.metrics, policy), reply_to=instruction)


def test_coverage_marks_the_built_in_world_inside_and_english_text_outside(toy_pair, tmp_path) -> None:
    from fedgt.provider.public_data import task_shadow_domains
    from fedgt.provider.shadow import LoraTuner

    cfg = from_run_config({**pyproject_run_config(ROOT / "pyproject.toml"), "model.pair": "toy", "train.steps": 10,
                           "train.batch-size": 4})
    translator = Translator(provider_gt(cfg), "cpu", tiny_model=str(toy_pair[0]))
    tuner = LoraTuner(str(toy_pair[0]), cfg.lora_settings())
    english = simulated_organizations(
        from_run_config({**pyproject_run_config(ROOT / "pyproject.toml"), "model.pair": "toy",
                         "data.path": str(english_folders(tmp_path / "sites")), "federation.num-organizations": 2}), 2)
    world = task_shadow_domains(16, 4, seed=1)  # other shadow domains of the same built-in world

    def score(examples) -> float:
        update = tuner.run(list(examples), cfg.finetune_config()).update
        return float(translator.coverage(tuner.tokens(update)[None])[0])

    assert all(score(d.train) <= 1.0 for d in world)
    assert all(score(o.train) > 1.0 for o in english)
    torch.manual_seed(0)
    assert (translator.coverage(torch.randn(4, *translator.src_shape) * 0.05) > 1.0).all()


def test_the_evaluator_scores_a_candidate_and_forgets_it_when_rolled_back(toy_pair) -> None:
    from fedgt.core.judge import LLMJudge
    from fedgt.core.lora import LoraSettings, merge_into_base
    from fedgt.server.global_adapter import GlobalAdapter

    lora, llm = LoraSettings(), str(toy_pair[1])
    public = [ex for d in public_text_domains() for ex in d.test][:16]
    evaluator = LLMEvaluator(llm, lora, [], public)
    spec, init = _model_state(llm, from_run_config({"model.pair": "toy"}))
    adapter = GlobalAdapter(spec, init, lora, "merge")
    untuned = evaluator.public_loss(adapter)
    accepted = copy.deepcopy(adapter.state_dict())
    g = torch.Generator().manual_seed(0)
    adapter.add({k: 0.05 * torch.randn(v.shape, generator=g) for k, v in init.items()})
    piece = adapter.end_round()  # folded into the LLM's base: the candidate of a merge round
    candidate = evaluator.public_loss(adapter)
    assert candidate != pytest.approx(untuned) and evaluator(adapter)["public-loss"] == pytest.approx(candidate)
    # The naive reference: the piece merged into a fresh LLM's weights.
    reference = LLMJudge(llm, lora)
    merge_into_base(reference.model, piece, lora.scaling)
    zero = torch.zeros(1, spec.num_layers, spec.token_dim)
    assert reference.score(zero, [public])[0]["loss"] == pytest.approx(candidate, rel=1e-5)
    adapter.load_state_dict(accepted)  # rolled back: the evaluator holds no trace of the candidate
    assert evaluator.public_loss(adapter) == pytest.approx(untuned, rel=1e-6)
