"""Shadow curation (``fedgt curate``): the provider's own (TinyLM update, LLM update) training pairs.

For each public shadow domain both models are fine-tuned from the same seeded LoRA init on the same
examples in the same order; the updates at the late snapshot steps are paired by step (the paper's
step-offset pairing), so one domain yields ``len(snapshot_steps)`` pairs. Results are appended as
safetensors shards listed in ``manifest.json``: a killed run resumes where it stopped, and a finished
domain is never computed twice. Domains run in worker processes (one torch thread each), one at a time by default;
``group_domains > 1`` trains that many adapters together in one forward/backward per step
(``fedgt.core.grouped_finetune``; same results up to float summation order; not under DP-SGD or with LoRA
dropout). On 2 CPU cores grouping measured slower, not faster (``docs/results/performance.md``), so it is opt-in.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from fedgt.core.dp import DPConfig
from fedgt.core.examples import Example
from fedgt.core.finetune import FinetuneConfig, FinetuneResult, finetune
from fedgt.core.grouped_finetune import finetune_grouped, supports_grouped
from fedgt.core.lora import LoraSettings, attach_lora, lora_parameters, set_lora_parameters
from fedgt.core.manifest import DamagedArtifact, check_file, sha256_file
from fedgt.core.models import load_model
from fedgt.core.updates import UpdateSpec, flatten, spec_of

MANIFEST = "manifest.json"
log = logging.getLogger("fedgt.provider")
DEFAULT_SNAPSHOTS = (60, 70, 80, 90, 100)


@dataclass(frozen=True)
class CurationConfig:
    """Everything that determines a curated pair (stored in the manifest; a resume must match it)."""

    tiny_model: str = "tinylm"
    llm_model: str = "llm"
    lora: LoraSettings = field(default_factory=LoraSettings)
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(snapshot_steps=DEFAULT_SNAPSHOTS))
    tiny_lr: float | None = None  # the TinyLM's own lr (None: finetune.lr)
    llm_lr: float | None = None
    tiny_dp: DPConfig = field(default_factory=DPConfig)  # curate under the organizations' DP-SGD settings
    n_examples: int = 128

    def to_json(self) -> dict:
        """A JSON-serialisable dict (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))


class LoraTuner:
    """A model with seeded LoRA attached once; each ``run`` starts again from the seeded init."""

    def __init__(self, model_spec: str, lora: LoraSettings):
        model, self.tokenizer = load_model(model_spec)
        self.model = attach_lora(model, lora)
        self.init = lora_parameters(self.model)
        self.spec: UpdateSpec = spec_of(self.model)

    def reset(self) -> None:
        """Back to the seeded init (B = 0)."""
        set_lora_parameters(self.model, self.init)

    def run(self, examples: Sequence[Example], cfg: FinetuneConfig, dp: DPConfig = DPConfig()) -> FinetuneResult:
        """Fine-tune from the seeded init; the model is left fine-tuned."""
        self.reset()
        return finetune(self.model, self.tokenizer, examples, cfg, dp)

    def run_many(self, domains: Sequence[Sequence[Example]], cfg: FinetuneConfig, dp: DPConfig = DPConfig(),
                 grouped: bool = True) -> list[FinetuneResult]:
        """One fine-tune per domain from the seeded init: all in one grouped loop when the model and DP allow it."""
        self.reset()
        if grouped and len(domains) > 1 and dp.mode == "none" and supports_grouped(self.model):
            return finetune_grouped(self.model, self.tokenizer, domains, cfg)
        return [self.run(examples, cfg, dp) for examples in domains]

    def tokens(self, update: dict[str, torch.Tensor]) -> torch.Tensor:
        """An update as layer tokens ``(num_layers, token_dim)``."""
        return flatten(update, self.spec)


def _with_lr(cfg: FinetuneConfig, lr: float | None) -> FinetuneConfig:
    return cfg if lr is None else FinetuneConfig(**{**asdict(cfg), "lr": lr})


def curate_domains(tiny: LoraTuner, llm: LoraTuner, domains: Sequence[Sequence[Example]], cfg: CurationConfig,
                   llm_tokens: Sequence[torch.Tensor | None] | None = None, grouped: bool = True,
                   ) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, float]]]:
    """Fine-tune both models on each domain; per domain (tiny tokens, llm tokens) stacked over snapshot steps.

    ``llm_tokens[i]`` given: reuse an earlier curation's LLM side of domain i (e.g. re-curating only the TinyLM
    under DP-SGD). ``grouped``: train the domains' adapters together (``LoraTuner.run_many``).
    """
    steps = cfg.finetune.snapshot_steps or (cfg.finetune.steps,)
    snaps = lambda r: [r.snapshots.get(s, r.update) for s in steps]  # noqa: E731
    reuse = list(llm_tokens) if llm_tokens is not None else [None] * len(domains)
    tiny_runs = tiny.run_many(domains, _with_lr(cfg.finetune, cfg.tiny_lr), cfg.tiny_dp, grouped)
    todo = [i for i, r in enumerate(reuse) if r is None]
    llm_runs = dict(zip(todo, llm.run_many([domains[i] for i in todo], _with_lr(cfg.finetune, cfg.llm_lr),
                                           grouped=grouped), strict=True)) if todo else {}
    out = []
    for i, t in enumerate(tiny_runs):
        metrics = {"tiny-train-loss": t.metrics["train-loss"], "seconds": t.metrics["train-seconds"]}
        tokens = reuse[i]
        if tokens is None:
            g = llm_runs[i]
            tokens = torch.stack([llm.tokens(u) for u in snaps(g)])
            metrics.update({"llm-train-loss": g.metrics["train-loss"],
                            "seconds": metrics["seconds"] + g.metrics["train-seconds"]})
        metrics.update({k: v for k, v in t.metrics.items() if k.startswith("dp-")})
        out.append((torch.stack([tiny.tokens(u) for u in snaps(t)]), tokens, metrics))
    return out


def curate_domain(tiny: LoraTuner, llm: LoraTuner, examples: Sequence[Example], cfg: CurationConfig,
                  llm_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Fine-tune both models on one domain; (tiny tokens, llm tokens) stacked over snapshot steps."""
    return curate_domains(tiny, llm, [examples], cfg, [llm_tokens])[0]


# --- worker processes ---------------------------------------------------------------------------------------------

_WORKER: dict[str, object] = {}


def _init_worker(cfg: CurationConfig, cache: str | None, grouped: bool) -> None:
    torch.set_num_threads(1)
    _WORKER["grouped"] = grouped
    if cache is not None:
        os.environ["FEDGT_CACHE"] = cache
    _WORKER["cfg"] = cfg
    _WORKER["tiny"] = LoraTuner(cfg.tiny_model, cfg.lora)
    _WORKER["llm"] = LoraTuner(cfg.llm_model, cfg.lora)


def _work(chunk: list[tuple[str, list[Example], torch.Tensor | None]]) -> list[tuple[str, torch.Tensor, torch.Tensor,
                                                                                      dict]]:
    t0 = time.process_time()
    results = curate_domains(_WORKER["tiny"], _WORKER["llm"], [ex for _, ex, _ in chunk], _WORKER["cfg"],
                             [reuse for _, _, reuse in chunk], grouped=bool(_WORKER["grouped"]))
    cpu = (time.process_time() - t0) / len(chunk)
    return [(name, t, g, {**m, "cpu-seconds": cpu}) for (name, _, _), (t, g, m) in zip(chunk, results, strict=True)]


# --- the store ----------------------------------------------------------------------------------------------------


def read_manifest(out: Path) -> dict | None:
    """The manifest of a curation folder, or None when there is none yet."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedArtifact(f"{path}: not valid JSON ({err}); delete the folder to curate again") from err


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _flush(out: Path, manifest: dict, results: list) -> None:
    """Write one shard, then list it in the manifest (a shard not in the manifest does not exist)."""
    index = len(manifest["shards"])
    file = f"shard-{index:05d}.safetensors"
    names = [r[0] for r in results]
    steps = manifest["config"]["finetune"]["snapshot_steps"] or [manifest["config"]["finetune"]["steps"]]
    tensors = {
        "tiny": torch.cat([r[1] for r in results]).contiguous(),
        "llm": torch.cat([r[2] for r in results]).contiguous(),
        "domain": torch.cat([torch.full((len(r[1]),), i) for i, r in enumerate(results)]),
        "step": torch.tensor(steps * len(results)),
    }
    save_file(tensors, str(out / file), metadata={"domains": json.dumps(names)})
    manifest["shards"].append({"file": file, "domains": names, "pairs": int(tensors["tiny"].shape[0]),
                               "sha256": sha256_file(out / file)})
    manifest["cpu_seconds"] += sum(r[3]["cpu-seconds"] for r in results)
    manifest["metrics"].update({r[0]: r[3] for r in results})
    _write_json_atomic(out / MANIFEST, manifest)


def curate(domains: Sequence[tuple[str, list[Example]]], cfg: CurationConfig, out: Path, workers: int = 2,
           shard_domains: int = 16, progress: bool = True, reuse_llm: ShadowPairs | None = None,
           group_domains: int = 1) -> dict:
    """Curate every (name, examples) domain not yet in ``out``; returns the manifest.

    ``group_domains``: domains a worker trains together per forward/backward (1: one at a time).

    ``reuse_llm``: pairs of an earlier curation with the same LLM, LoRA and fine-tuning settings, whose LLM
    updates are reused as they are (only the TinyLM side is computed; e.g. the TinyLM under DP-SGD).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n, _ in domains]
    if len(set(names)) != len(names):
        raise ValueError("curate: domain names must be unique")
    manifest = read_manifest(out)
    if manifest is None:
        probe_tiny, probe_llm = LoraTuner(cfg.tiny_model, cfg.lora), LoraTuner(cfg.llm_model, cfg.lora)
        manifest = {"version": 1, "config": cfg.to_json(), "tiny_spec": probe_tiny.spec.to_json(),
                    "llm_spec": probe_llm.spec.to_json(), "shards": [], "cpu_seconds": 0.0, "wall_seconds": 0.0,
                    "metrics": {}}
    elif manifest["config"] != cfg.to_json():
        raise ValueError(f"{out} holds pairs curated with another config; pick another folder or delete it "
                         f"(stored: {manifest['config']}, asked: {cfg.to_json()})")
    done = {n for s in manifest["shards"] for n in s["domains"]}
    if reuse_llm is not None:
        mismatch = {k: (cfg.to_json()[k], reuse_llm.manifest["config"][k]) for k in ("llm_model", "lora", "finetune",
                    "llm_lr", "n_examples") if cfg.to_json()[k] != reuse_llm.manifest["config"][k]}
        if mismatch:
            raise ValueError(f"reuse_llm: the earlier curation differs in {mismatch}")
        manifest["reused_llm_from"] = str(reuse_llm.manifest.get("dir", "?"))
    if group_domains < 1:
        raise ValueError(f"curate: group_domains must be >= 1, got {group_domains}")
    todo = [(n, ex, _llm_side(reuse_llm, n)) for n, ex in domains if n not in done]
    if not todo:
        return manifest
    # Chunks no larger than an even share per worker, so a few domains still keep every worker busy.
    size = max(1, min(group_domains, -(-len(todo) // workers)))
    chunks = [todo[i:i + size] for i in range(0, len(todo), size)]
    t0 = time.time()
    pending: list = []
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker,
                  initargs=(cfg, os.environ.get("FEDGT_CACHE"), group_domains > 1)) as pool:
        bar = tqdm(total=len(domains), initial=len(domains) - len(todo), desc="curate", disable=not progress)
        for results in pool.imap_unordered(_work, chunks):
            pending += results
            bar.update(len(results))
            while len(pending) >= shard_domains:
                manifest["wall_seconds"] += time.time() - t0
                t0 = time.time()
                _flush(out, manifest, pending[:shard_domains])
                pending = pending[shard_domains:]
        bar.close()
    if pending:
        manifest["wall_seconds"] += time.time() - t0
        _flush(out, manifest, pending)
    return manifest


def _llm_side(pairs: ShadowPairs | None, name: str) -> torch.Tensor | None:
    if pairs is None:
        return None
    if name not in pairs.names:
        raise ValueError(f"reuse_llm: domain {name!r} is not in the earlier curation")
    rows = pairs.domain == pairs.names.index(name)
    return pairs.llm[rows][torch.argsort(pairs.step[rows])]


@dataclass
class ShadowPairs:
    """All curated pairs of a folder: tokens, the domain and step of each pair."""

    tiny: torch.Tensor  # (P, L_tiny, D_tiny)
    llm: torch.Tensor  # (P, L_llm, D_llm)
    domain: torch.Tensor  # (P,) index into ``names``
    step: torch.Tensor  # (P,)
    names: list[str]
    tiny_spec: UpdateSpec
    llm_spec: UpdateSpec
    manifest: dict
    probes: torch.Tensor | None = None  # (P, probe_tokens, probe_dim): ``fedgt.provider.probes`` features of ``tiny``

    def _rows(self, rows: torch.Tensor, domain: torch.Tensor, names: list[str]) -> ShadowPairs:
        return ShadowPairs(self.tiny[rows], self.llm[rows], domain, self.step[rows], names, self.tiny_spec,
                           self.llm_spec, self.manifest, None if self.probes is None else self.probes[rows])

    def select_domains(self, keep: Iterable[str]) -> ShadowPairs:
        """The pairs of some domains only (domain indices renumbered)."""
        keep_names = [n for n in self.names if n in set(keep)]
        new_index = {self.names.index(n): i for i, n in enumerate(keep_names)}
        rows = torch.tensor([int(d) in new_index for d in self.domain])
        domain = torch.tensor([new_index[int(d)] for d in self.domain[rows]], dtype=torch.long)
        return self._rows(rows, domain, keep_names)

    def final(self) -> ShadowPairs:
        """Only the pairs at the last snapshot step (one per domain)."""
        rows = self.step == self.step.max()
        return self._rows(rows, self.domain[rows], self.names)


def load_pairs(out: Path) -> ShadowPairs:
    """Read every shard listed in a curation folder's manifest."""
    manifest = read_manifest(Path(out))
    if manifest is None or not manifest["shards"]:
        raise FileNotFoundError(f"no curated pairs in {out} (run `fedgt curate` first)")
    tiny, llm, domain, step, names = [], [], [], [], []
    for shard in manifest["shards"]:
        if "sha256" in shard:  # verified before parsing: a damaged shard is named, never half-read
            check_file(Path(out) / shard["file"], shard["sha256"], Path(out) / MANIFEST)
        else:
            log.warning("%s: no sha256 listed for %s; it cannot be verified", Path(out) / MANIFEST, shard["file"])
        t = load_file(str(Path(out) / shard["file"]))
        tiny.append(t["tiny"])
        llm.append(t["llm"])
        domain.append(t["domain"] + len(names))
        step.append(t["step"])
        names += shard["domains"]
    manifest["dir"] = str(out)
    return ShadowPairs(torch.cat(tiny), torch.cat(llm), torch.cat(domain).long(), torch.cat(step), names,
                       UpdateSpec.from_json(manifest["tiny_spec"]), UpdateSpec.from_json(manifest["llm_spec"]),
                       manifest)
