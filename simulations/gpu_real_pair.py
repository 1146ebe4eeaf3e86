"""Timing on a real model pair: the provider's stages, translating vs fine-tuning the LLM, GT decoders at paper size.

    python -m simulations.gpu_real_pair --tiny DIR/Qwen2.5-0.5B --llm DIR/Qwen2.5-1.5B   # CUDA when present
    python -m simulations.gpu_real_pair --quick                                          # toy presets, CPU, ~1 min
Writes ``<out>.json`` and ``<out>.md`` (``--out``, default ``docs/results/gpu``).

Pipeline (``--tiny`` / ``--llm``: local Hugging Face directories or prepared presets such as ``toy`` / ``toy-large``):
1. curation: both models LoRA-fine-tuned on each of N public shadow domains (``fedgt.provider.shadow``, in process);
2. GT training (``fedgt.provider.train_gt``), reading updates with probe features as ``fedgt provide`` does;
3. per organization (a private held-out domain): the site's TinyLM fine-tune, then translating its update the way
   ``fedgt.server.translator`` does (probe features through the rebuilt TinyLM + ``predict``), against one LoRA
   fine-tune of the LLM itself on the same data with the same budget.
Decoding: random-weight GTs at the update sizes of a Qwen2.5-3B -> 7B pair (36 layer tokens of 12,800 -> 28 of
22,528, LoRA r=2 on q/v), timed for the parallel decoder (one pass), the autoregressive decoder with a KV cache, the
same decoder recomputing its whole prefix at every step (a T5 ``generate`` without cache), and ``PaperGT`` (which
re-runs encoder and decoder at every step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from fedgt.core.data import DomainData, task_domain_data
from fedgt.core.finetune import FinetuneConfig
from fedgt.core.judge import LLMJudge
from fedgt.core.lora import LoraSettings
from fedgt.core.mixture import PretrainData
from fedgt.core.splits import make_domain_splits
from fedgt.core.world import make_world
from fedgt.provider.grad_transformer import GradTransformer, GTConfig, PaperGT, load_gt, num_parameters, predict
from fedgt.provider.probes import probe_features, probe_prompts
from fedgt.provider.provision import model_name, resolve_model, snapshot_steps
from fedgt.provider.public_data import shadow_domains
from fedgt.provider.shadow import CurationConfig, LoraTuner, ShadowPairs, curate_domain
from fedgt.provider.train_gt import TrainConfig, gt_config_for, train_gt

ROOT = Path(__file__).resolve().parents[1]
RATIO_TARGET = 10.0  # the parallel decoder should be at least this much faster than recomputing


# --- decoding at paper size ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeDims:
    """Update-token shapes a GT maps between: source (TinyLM) and target (LLM) layer tokens."""

    src_tokens: int
    src_dim: int
    tgt_tokens: int
    tgt_dim: int


PAPER_DIMS = DecodeDims(36, 12_800, 28, 22_528)  # Qwen2.5-3B -> 7B: r * (3 * hidden + kv_dim), r = 2
SMALL_DIMS = DecodeDims(6, 256, 8, 384)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_gt(dims: DecodeDims, decoder: str, d_model: int, kind: str = "gt",
              seed: int = 0) -> GradTransformer | PaperGT:
    """A GT with random weights (its zero-initialised output layer too, so decoding feeds back real values)."""
    torch.manual_seed(seed)
    cfg = GTConfig(**asdict(dims), kind=kind, decoder=decoder, d_model=d_model, ffn=2 * d_model, dropout=0.0)
    model = GradTransformer(cfg) if kind == "gt" else PaperGT(cfg)
    torch.nn.init.normal_(model.out.weight, std=0.02)
    return model.eval()


@torch.no_grad()
def generate_recompute(model: GradTransformer, src_z: torch.Tensor) -> torch.Tensor:
    """Autoregressive decoding without a cache: the decoder re-runs over the whole prefix at every step."""
    if model.cfg.decoder != "autoregressive":
        raise ValueError("generate_recompute needs an autoregressive GT")
    memory = model.encode(src_z)  # (B, Ls, d), once, as a T5 generate keeps the encoder outputs
    # (B, 1 + t, Dt): the zero start token, then the outputs so far.
    seq = torch.zeros(src_z.shape[0], 1, model.cfg.tgt_dim, dtype=src_z.dtype, device=src_z.device)
    for t in range(model.cfg.tgt_tokens):
        x = model.tgt_in(seq) + model.tgt_pos[:t + 1]  # (B, t + 1, d): the whole prefix embedded again
        step = model._decode(x, memory, causal=True)[:, -1:]  # (B, 1, Dt): every position decoded, the last kept
        seq = torch.cat([seq, step], dim=1)
    return seq[:, 1:]


def decoders(dims: DecodeDims, d_model: int, seed: int = 0) -> dict[str, tuple[torch.nn.Module, Callable]]:
    """The decoders compared: name -> (model, ``fn(model, src_z)`` returning ``(B, Lt, Dt)``)."""
    parallel = random_gt(dims, "parallel", d_model, seed=seed)
    ar = random_gt(dims, "autoregressive", d_model, seed=seed)
    paper = random_gt(dims, "autoregressive", d_model, kind="paper_gt", seed=seed)
    return {
        "parallel (one pass)": (parallel, lambda m, s: m.generate(s)),
        "autoregressive, KV cache": (ar, lambda m, s: m.generate(s)),
        "autoregressive, recompute prefix each step": (ar, generate_recompute),
        "PaperGT (T5, encoder + decoder re-run each step)": (paper, lambda m, s: m.generate(s)),
    }


def time_decoders(dims: DecodeDims, batch: int, d_model: int, device: torch.device, repeats: int,
                  seed: int = 0) -> dict:
    """Median seconds per decoder for one batch of random normalised TinyLM tokens, plus the checks."""
    src = torch.randn(batch, dims.src_tokens, dims.src_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    rows, outputs = {}, {}
    with torch.inference_mode():
        for name, (model, fn) in decoders(dims, d_model, seed).items():
            model.to(device)
            outputs[name] = fn(model, src)
            rows[name] = {"seconds": median_seconds(lambda m=model, f=fn: f(m, src), device, repeats),
                          "parameters": num_parameters(model), "shape": list(outputs[name].shape)}
    kv, re, par = (rows[k]["seconds"] for k in ("autoregressive, KV cache",
                                                "autoregressive, recompute prefix each step", "parallel (one pass)"))
    diff = (outputs["autoregressive, KV cache"] - outputs["autoregressive, recompute prefix each step"]).abs().max()
    return {"dims": asdict(dims), "batch": batch, "d_model": d_model, "repeats": repeats, "decoders": rows,
            "recompute_over_parallel": re / par, "recompute_over_kv_cache": re / kv,
            "target_met": re / par >= RATIO_TARGET, "kv_vs_recompute_max_abs_diff": float(diff)}


# --- the pipeline on a real pair ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineConfig:
    """The pair and the budget of each stage."""

    tiny: str
    llm: str
    domains: int = 16  # shadow domains curated
    orgs: int = 2  # organizations timed (held-out-combination domains)
    steps: int = 100  # LoRA fine-tuning steps, the same for curation, sites and the LLM baseline
    n_examples: int = 128
    epochs: int = 5
    objective: str = "functional"
    probes: int = 8  # public probe prompts the GT reads updates through (0: the update's weights only)
    anchor_k: int = 3  # residual on the k nearest shadow updates (the provider default; 0: a plain GT)
    d_model: int = 256
    repeats: int = 5  # of each translation timing
    seed: int = 0


def load_tuner(spec: str, lora: LoraSettings, device: torch.device) -> LoraTuner:
    """A model with seeded LoRA on ``device``."""
    tuner = LoraTuner(spec, lora)
    tuner.model.to(device)
    return tuner


def curate_shadow(tiny: LoraTuner, llm: LoraTuner, cfg: PipelineConfig, ccfg: CurationConfig,
                  device: torch.device) -> tuple[ShadowPairs, dict, list[float]]:
    """Curate every shadow domain in process; the pairs, each domain's examples, and per-domain seconds."""
    shadow = shadow_domains(cfg.n_examples, cfg.domains, cfg.seed, tiny_model=cfg.tiny)
    tiny_t, llm_t, domain, step, seconds = [], [], [], [], []
    for i, d in enumerate(shadow):
        sync(device)
        t0 = time.perf_counter()
        t, g, _ = curate_domain(tiny, llm, list(d.train), ccfg)
        sync(device)
        seconds.append(time.perf_counter() - t0)
        tiny_t.append(t.cpu())
        llm_t.append(g.cpu())
        domain.append(torch.full((len(t),), i))
        step.append(torch.tensor(ccfg.finetune.snapshot_steps))
        print(f"curated {d.name} ({seconds[-1]:.1f}s)", flush=True)
    pairs = ShadowPairs(torch.cat(tiny_t), torch.cat(llm_t), torch.cat(domain), torch.cat(step),
                        [d.name for d in shadow], tiny.spec, llm.spec, {"config": ccfg.to_json()})
    return pairs, {d.name: d for d in shadow}, seconds


def org_domains(cfg: PipelineConfig) -> list[DomainData]:
    """The organizations' private data: held-out-combination domains (never curated, never pretrained on)."""
    data = PretrainData()
    world = make_world(data.num_people, seed=data.world_seed)
    held = make_domain_splits(data.splits_seed).held_out_combination[:cfg.orgs]
    return [task_domain_data(world, d, cfg.n_examples, cfg.n_examples, cfg.seed) for d in held]


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """``fn()`` once and its wall seconds."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def run_pipeline(cfg: PipelineConfig, device: torch.device, work: Path) -> dict:
    """Curation, GT training, and per organization translation vs an LLM fine-tune; seconds per stage."""
    lora = LoraSettings()
    tiny_dir, llm_dir = resolve_model(cfg.tiny), resolve_model(cfg.llm)
    (tiny, llm), load_s = timed(lambda: (load_tuner(tiny_dir, lora, device), load_tuner(llm_dir, lora, device)),
                                device)
    ft = FinetuneConfig(steps=cfg.steps)
    ccfg = CurationConfig(tiny_model=tiny_dir, llm_model=llm_dir, lora=lora, n_examples=cfg.n_examples,
                          finetune=replace(ft, snapshot_steps=snapshot_steps(cfg.steps)))
    pairs, shadow, curate_s = curate_shadow(tiny, llm, cfg, ccfg, device)
    judge, tiny_judge = LLMJudge(llm_dir, lora, device=device), LLMJudge(tiny_dir, lora, device=device)
    prompts = probe_prompts(list(shadow.values()), cfg.probes, cfg.seed) if cfg.probes else []
    probe = {}
    if prompts:
        pairs.probes, shadow_probe_s = timed(lambda: probe_features(tiny_judge, pairs.tiny, prompts), device)
        probe = dict(probe_tokens=len(prompts), probe_dim=pairs.probes.shape[-1])
    tcfg = TrainConfig(objective=cfg.objective, epochs=cfg.epochs, patience=cfg.epochs, seed=cfg.seed)
    n_train = len(pairs.names) - max(1, round(len(pairs.names) * tcfg.val_fraction))
    anchor_k = min(cfg.anchor_k, n_train)  # the retrieval table has one row per training domain
    gcfg = gt_config_for(pairs, decoder="parallel", d_model=cfg.d_model, ffn=2 * cfg.d_model, anchor_k=anchor_k,
                         **probe)
    record, train_s = timed(lambda: train_gt(pairs, gcfg, tcfg, judge, {n: list(d.train) for n, d in shadow.items()},
                                             {n: list(d.test) for n, d in shadow.items()}, work / "gt"), device)
    gt, _ = load_gt(work / "gt", device)
    orgs = [time_org(d, tiny, llm, gt, tiny_judge, prompts, ft, cfg.repeats, device) for d in org_domains(cfg)]
    return {"config": asdict(cfg), "tiny_model": model_name(cfg.tiny), "llm_model": model_name(cfg.llm),
            "tiny_spec": [tiny.spec.num_layers, tiny.spec.token_dim], "llm_spec": [llm.spec.num_layers,
                                                                                   llm.spec.token_dim],
            "anchor_k": anchor_k, "gt_parameters": num_parameters(gt),
            "seconds": {"load models": load_s, "curation": sum(curate_s),
                        "shadow probe features": shadow_probe_s if prompts else 0.0, "GT training": train_s},
            "curation_seconds_per_domain": curate_s, "gt_epochs_run": len(record["history"]), "orgs": orgs}


def time_org(data: DomainData, tiny: LoraTuner, llm: LoraTuner, gt: GradTransformer | PaperGT, tiny_judge: LLMJudge,
             prompts: list[str], ft: FinetuneConfig, repeats: int, device: torch.device) -> dict:
    """One organization: its TinyLM fine-tune, translating its update, and the LLM fine-tune it replaces."""
    result, site_s = timed(lambda: tiny.run(list(data.train), ft), device)
    tokens = tiny.tokens(result.update).cpu().unsqueeze(0)  # (1, Ls, Ds): one organization's update
    probes = probe_features(tiny_judge, tokens, prompts) if prompts else None
    probe_s = median_seconds(lambda: probe_features(tiny_judge, tokens, prompts), device, repeats) if prompts else 0.0
    predict_s = median_seconds(lambda: predict(gt, tokens, probes), device, repeats)
    llm_update, llm_s = timed(lambda: llm.run(list(data.train), ft), device)
    translate_s = probe_s + predict_s
    return {"domain": data.name, "site TinyLM fine-tune": site_s, "probe features": probe_s, "GT predict": predict_s,
            "translate": translate_s, "LLM fine-tune": llm_s, "finetune_over_translate": llm_s / translate_s,
            "llm_train_loss": llm_update.metrics["train-loss"]}


# --- report -------------------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        cpu = next((ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    return f"CPU: {cpu}, {os.cpu_count()} cores, torch threads: {torch.get_num_threads()}"


def pipeline_table(p: dict) -> list[str]:
    """Markdown lines for the pipeline stages and the per-organization comparison."""
    c = p["config"]
    lines = [f"## Pipeline: {p['tiny_model']} -> {p['llm_model']}", "",
             f"Update tokens {p['tiny_spec'][0]}x{p['tiny_spec'][1]} -> {p['llm_spec'][0]}x{p['llm_spec'][1]}; "
             f"LoRA r=2 on q/v; {c['steps']} fine-tuning steps of batch 16 everywhere; GT d_model {c['d_model']}, "
             f"{p['gt_parameters']:,} parameters, {c['probes']} probe prompts, anchor_k {p['anchor_k']}.", "",
             "| provider stage (once) | seconds |", "|---|---|",
             f"| load both models | {p['seconds']['load models']:.2f} |",
             f"| curation: {c['domains']} shadow domains, both models fine-tuned | {p['seconds']['curation']:.2f} "
             f"({statistics.median(p['curation_seconds_per_domain']):.2f} per domain) |",
             f"| probe features of the shadow pairs | {p['seconds']['shadow probe features']:.2f} |",
             f"| GT training: {p['gt_epochs_run']} epochs, {c['objective']} objective | "
             f"{p['seconds']['GT training']:.2f} |", "",
             f"Per organization (translation: median of {c['repeats']} after a warm-up; fine-tunes: one run):", "",
             "| organization's domain | site TinyLM fine-tune | probe features | GT predict | translate | "
             "LLM LoRA fine-tune | fine-tune / translate |", "|---|---|---|---|---|---|---|"]
    for o in p["orgs"]:
        lines.append(f"| {o['domain']} | {o['site TinyLM fine-tune']:.3f} | {o['probe features']:.4f} | "
                     f"{o['GT predict']:.4f} | {o['translate']:.4f} | {o['LLM fine-tune']:.3f} | "
                     f"{o['finetune_over_translate']:.0f}x |")
    return lines + ["", "Translating runs the TinyLM (a few forward passes for the probe features) and the GT once; "
                    "fine-tuning runs the LLM forward and backward at every step, so the ratio grows with the LLM."]


def decode_table(d: dict) -> list[str]:
    """Markdown lines for one decode timing."""
    dims = d["dims"]
    par = d["decoders"]["parallel (one pass)"]["seconds"]
    lines = [f"## GT decoding: {dims['src_tokens']}x{dims['src_dim']} -> {dims['tgt_tokens']}x{dims['tgt_dim']}, "
             f"batch {d['batch']}", "",
             f"Random weights, d_model {d['d_model']}, 2 encoder + 2 decoder layers; median of {d['repeats']} after a "
             "warm-up.", "", "| decoder | parameters | seconds | / parallel |", "|---|---|---|---|"]
    for name, r in d["decoders"].items():
        lines.append(f"| {name} | {r['parameters']:,} | {r['seconds']:.4f} | {r['seconds'] / par:.1f}x |")
    verdict = "met" if d["target_met"] else "missed"
    lines += ["", f"Recompute / parallel: **{d['recompute_over_parallel']:.1f}x** (target >= {RATIO_TARGET:.0f}x: "
              f"{verdict}); recompute / KV cache: {d['recompute_over_kv_cache']:.1f}x; KV cache vs recompute outputs: "
              f"max |diff| {d['kv_vs_recompute_max_abs_diff']:.1e}."]
    return lines


def write_report(result: dict, out: Path) -> None:
    """``<out>.json`` and ``<out>.md``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=2))
    lines = ["# GT timing: translating vs fine-tuning the LLM, and the GT's decoders", "",
             f"Command: `{result['command']}`  ", f"Device: {result['device_name']}; torch {result['torch']}; "
             f"date {result['date']}.", ""]
    if result["device"] == "cpu":
        why = "run on the CPU by choice" if result["cuda_available"] else "no GPU was available to this run"
        lines += [f"These are CPU figures ({os.cpu_count()} cores, torch threads: {torch.get_num_threads()}): {why}. "
                  "On a GPU: "
                  "`python -m simulations.gpu_real_pair --tiny DIR/Qwen2.5-0.5B --llm DIR/Qwen2.5-1.5B "
                  "--device cuda`.", ""]
    if result.get("pipeline"):
        lines += pipeline_table(result["pipeline"]) + [""]
    for d in result["decode"]:
        lines += decode_table(d) + [""]
    Path(f"{out}.md").write_text("\n".join(lines))


# --- command line -------------------------------------------------------------------------------------------------

QUICK = dict(tiny="toy", llm="toy-large", domains=6, orgs=1, steps=10, n_examples=32, epochs=2, probes=4, repeats=3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags; ``--quick`` fills every pipeline flag not given with the toy settings."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", help="TinyLM: a local HF causal-LM directory or a preset (e.g. toy)")
    p.add_argument("--llm", help="LLM: a local HF causal-LM directory or a preset (e.g. toy-large)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quick", action="store_true", help="toy presets and small budgets: about a minute on a CPU")
    p.add_argument("--no-pipeline", action="store_true", help="time the decoders only")
    p.add_argument("--no-decode", action="store_true", help="time the pipeline only")
    for name, kind in (("domains", int), ("orgs", int), ("steps", int), ("n-examples", int), ("epochs", int),
                       ("probes", int), ("repeats", int)):
        p.add_argument(f"--{name}", type=kind)
    p.add_argument("--objective", choices=("functional", "mse", "mix"), default="functional")
    p.add_argument("--anchor-k", type=int, default=3)
    p.add_argument("--d-model", type=int, default=256, help="GT width (pipeline and decode timing)")
    p.add_argument("--decode-dims", choices=("paper", "small"), default="paper")
    p.add_argument("--decode-batch", type=int, nargs="+", help="batch sizes to decode (default 1 8; quick: 1)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "gpu", help="writes <out>.json, <out>.md")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else {"domains": 16, "orgs": 2, "steps": 100, "n_examples": 128, "epochs": 5,
                                         "probes": 8, "repeats": 5}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.decode_batch = args.decode_batch or ([1] if args.quick else [1, 8])
    if not args.no_pipeline and (args.tiny is None or args.llm is None):
        p.error("give --tiny and --llm (or --quick, or --no-pipeline)")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the chosen parts and write the report."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    result = {"command": "python -m simulations.gpu_real_pair " + shlex.join(sys.argv[1:] if argv is None else argv),
              "date": time.strftime("%Y-%m-%d"), "device": device.type, "device_name": device_name(device),
              "torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "pipeline": None, "decode": []}
    if not args.no_pipeline:
        cfg = PipelineConfig(tiny=args.tiny, llm=args.llm, domains=args.domains, orgs=args.orgs, steps=args.steps,
                             n_examples=args.n_examples, epochs=args.epochs, objective=args.objective,
                             probes=args.probes, anchor_k=args.anchor_k, d_model=args.d_model, repeats=args.repeats,
                             seed=args.seed)
        with tempfile.TemporaryDirectory() as work:
            result["pipeline"] = run_pipeline(cfg, device, Path(work))
    if not args.no_decode:
        dims = PAPER_DIMS if args.decode_dims == "paper" else SMALL_DIMS
        for batch in args.decode_batch:
            result["decode"].append(time_decoders(dims, batch, args.d_model, device, args.repeats, args.seed))
            print(json.dumps(result["decode"][-1]), flush=True)
    write_report(result, args.out)
    return result


if __name__ == "__main__":
    main()
