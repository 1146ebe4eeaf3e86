"""The Grad-Transformer: TinyLM update tokens in, LLM update tokens out (one token per transformer layer).

Pure PyTorch, nanoGPT-sized. An encoder reads the TinyLM's layer tokens; a decoder emits the LLM's:
- ``parallel``: one learned query per LLM layer, every layer in one pass;
- ``autoregressive`` (the paper's): layer t is predicted from layers < t (teacher forcing in training,
  a KV cache at inference).
A GT with ``anchor_k > 0`` is *residual on retrieval*: it carries a table of shadow updates (the training
domains' final pairs), looks up the ``anchor_k`` nearest by cosine of the normalised TinyLM update, reads their mean
LLM update as extra encoder tokens and predicts a correction to it (an untrained residual GT is k-nearest lookup).
``PaperGT`` is the paper-faithful configuration for comparison: a T5 encoder-decoder built from a
``transformers`` config, autoregressive, recomputing the whole decoder at every step as the paper does.
Both work in a normalised space: per-coordinate mean/std of inputs and targets live in the checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from fedgt.core.manifest import DamagedArtifact

DECODERS = ("parallel", "autoregressive")
KINDS = ("gt", "paper_gt")


@dataclass(frozen=True)
class GTConfig:
    """Shapes of the two update spaces and the size of the network."""

    src_tokens: int
    src_dim: int
    tgt_tokens: int
    tgt_dim: int
    kind: str = "gt"
    decoder: str = "parallel"
    d_model: int = 256
    n_heads: int = 4
    enc_layers: int = 2
    dec_layers: int = 2
    ffn: int = 512
    dropout: float = 0.1
    probe_tokens: int = 0  # extra encoder inputs: ``fedgt.provider.probes`` features (0: read the weights only)
    probe_dim: int = 0
    anchor_k: int = 0  # > 0: residual on the mean of the k nearest shadow updates (parallel decoder only)
    anchor_rows: int = 0  # rows of the retrieval table (``train_gt`` sets it: one per training domain)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"gt.kind must be one of {KINDS}, got {self.kind!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"gt.decoder must be one of {DECODERS}, got {self.decoder!r}")
        if self.kind == "paper_gt" and self.decoder != "autoregressive":
            raise ValueError("gt.kind='paper_gt' is autoregressive by definition (the paper's decoder)")
        if min(self.src_tokens, self.src_dim, self.tgt_tokens, self.tgt_dim, self.d_model, self.n_heads) < 1:
            raise ValueError(f"GTConfig sizes must be >= 1, got {self}")
        if self.kind == "paper_gt" and self.probe_tokens:
            raise ValueError("gt.kind='paper_gt' reads the update only (probe_tokens must be 0)")
        if (self.probe_tokens > 0) != (self.probe_dim > 0):
            raise ValueError(f"gt.probe_tokens and gt.probe_dim must both be 0 or both > 0, got {self}")
        if self.anchor_k < 0 or self.anchor_rows < 0 or (self.anchor_rows and self.anchor_k > self.anchor_rows):
            raise ValueError(f"gt.anchor_k must be >= 0 and at most anchor_rows (the table's size), got {self}")
        if self.anchor_k and (self.kind != "gt" or self.decoder != "parallel"):
            raise ValueError("gt.anchor_k > 0 (residual on retrieval) needs kind='gt' and decoder='parallel'")
        if self.d_model % self.n_heads:
            raise ValueError(f"gt.d_model ({self.d_model}) must be divisible by gt.n_heads ({self.n_heads})")


class TokenNorm(nn.Module):
    """Per-coordinate standardisation of update tokens; the statistics are saved with the model."""

    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(tokens, dim))
        self.register_buffer("std", torch.ones(tokens, dim))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Statistics from a batch ``(N, tokens, dim)``; a constant coordinate gets std 1."""
        self.mean.copy_(x.mean(0))
        std = x.std(0) if x.shape[0] > 1 else torch.ones_like(self.std)
        self.std.copy_(torch.where(std > 1e-12, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Back to the update's own scale."""
        return z * self.std + self.mean


class Attention(nn.Module):
    """Multi-head attention; self-attention may be causal and may use a KV cache."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q, self.kv, self.proj = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, causal: bool = False,
                cache: dict | None = None) -> torch.Tensor:
        q = self._split(self.q(x))
        k, v = (self._split(t) for t in self.kv(x if memory is None else memory).chunk(2, dim=-1))
        if cache is not None:  # incremental decoding: attend to every earlier position as well
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
            causal = False  # the cache only holds the past, so nothing to mask
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(x.shape))


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention, MLP."""

    def __init__(self, cfg: GTConfig, cross: bool):
        super().__init__()
        d = cfg.d_model
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, cfg.n_heads, cfg.dropout)
        self.ln2, self.cross = (nn.LayerNorm(d), Attention(d, cfg.n_heads, cfg.dropout)) if cross else (None, None)
        self.ln3 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.ffn), nn.GELU(), nn.Linear(cfg.ffn, d), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, causal: bool = False,
                cache: dict | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), causal=causal, cache=cache)
        if self.cross is not None:
            x = x + self.cross(self.ln2(x), memory=memory)
        return x + self.mlp(self.ln3(x))


class GradTransformer(nn.Module):
    """Encoder over TinyLM layer tokens, decoder over LLM layer tokens (parallel or autoregressive)."""

    def __init__(self, cfg: GTConfig):
        super().__init__()
        if cfg.kind != "gt":
            raise ValueError("GradTransformer builds kind='gt'; use build_gt for any kind")
        self.cfg = cfg
        d = cfg.d_model
        self.src_norm, self.tgt_norm = TokenNorm(cfg.src_tokens, cfg.src_dim), TokenNorm(cfg.tgt_tokens, cfg.tgt_dim)
        self.src_in = nn.Linear(cfg.src_dim, d)
        self.src_pos = nn.Parameter(torch.zeros(cfg.src_tokens, d))
        if cfg.probe_tokens:
            self.probe_norm = TokenNorm(cfg.probe_tokens, cfg.probe_dim)
            self.probe_in = nn.Linear(cfg.probe_dim, d)
            self.probe_pos = nn.Parameter(torch.zeros(cfg.probe_tokens, d))
        if cfg.anchor_k:
            if cfg.anchor_rows < cfg.anchor_k:
                raise ValueError(f"gt.anchor_k={cfg.anchor_k} needs a retrieval table of >= {cfg.anchor_k} rows, got "
                                 f"anchor_rows={cfg.anchor_rows} (train_gt sets it)")
            self.register_buffer("anchor_keys", torch.zeros(cfg.anchor_rows, cfg.src_tokens * cfg.src_dim))
            self.register_buffer("anchor_values", torch.zeros(cfg.anchor_rows, cfg.tgt_tokens, cfg.tgt_dim))
            self.register_buffer("anchor_domain", torch.full((cfg.anchor_rows,), -1, dtype=torch.long))
            self.anchor_in = nn.Linear(cfg.tgt_dim, d)
            self.anchor_pos = nn.Parameter(torch.zeros(cfg.tgt_tokens, d))
        self.encoder = nn.ModuleList(Block(cfg, cross=False) for _ in range(cfg.enc_layers))
        self.enc_ln = nn.LayerNorm(d)
        if cfg.decoder == "parallel":
            self.queries = nn.Parameter(torch.randn(cfg.tgt_tokens, d) * 0.02)
        else:
            self.tgt_in = nn.Linear(cfg.tgt_dim, d)
        self.tgt_pos = nn.Parameter(torch.zeros(cfg.tgt_tokens, d))
        self.decoder = nn.ModuleList(Block(cfg, cross=True) for _ in range(cfg.dec_layers))
        self.dec_ln = nn.LayerNorm(d)
        self.out = nn.Linear(d, cfg.tgt_dim)
        nn.init.zeros_(self.out.weight)  # start at the mean target: an untrained GT returns the mean update
        nn.init.zeros_(self.out.bias)

    @torch.no_grad()
    def fit_anchors(self, tiny: torch.Tensor, llm: torch.Tensor, domain: torch.Tensor) -> None:
        """Fill the retrieval table: raw TinyLM / LLM tokens of ``anchor_rows`` shadow pairs and their domains."""
        if not self.cfg.anchor_k or len(tiny) != self.cfg.anchor_rows:
            raise ValueError(f"fit_anchors needs exactly anchor_rows={self.cfg.anchor_rows} pairs, got {len(tiny)}")
        self.anchor_keys.copy_(F.normalize(self.src_norm(tiny.to(self.anchor_keys)).flatten(1), dim=1))
        self.anchor_values.copy_(llm)
        self.anchor_domain.copy_(domain)

    def anchor(self, src_z: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised mean LLM update of the ``anchor_k`` nearest table rows; ``exclude[b]`` drops that domain."""
        sim = F.normalize(src_z.flatten(1), dim=1) @ self.anchor_keys.T
        if exclude is not None:
            sim = sim.masked_fill(self.anchor_domain[None, :] == exclude[:, None], float("-inf"))
        top = sim.topk(self.cfg.anchor_k, dim=1).indices
        return self.tgt_norm(self.anchor_values[top].mean(1))

    def encode(self, src_z: torch.Tensor, probe_z: torch.Tensor | None = None,
               anchor_z: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised TinyLM tokens ``(B, Ls, Ds)`` (and probe, anchor tokens) to encoder memory ``(B, L, d)``."""
        x = self.src_in(src_z) + self.src_pos
        if self.cfg.probe_tokens:
            if probe_z is None:
                raise ValueError("this Grad-Transformer reads probe features: pass probe_z (fedgt.provider.probes)")
            x = torch.cat([x, self.probe_in(probe_z) + self.probe_pos], dim=1)
        if anchor_z is not None:
            x = torch.cat([x, self.anchor_in(anchor_z) + self.anchor_pos], dim=1)
        for block in self.encoder:
            x = block(x)
        return self.enc_ln(x)

    def _decode(self, x: torch.Tensor, memory: torch.Tensor, causal: bool, caches: list | None = None) -> torch.Tensor:
        for i, block in enumerate(self.decoder):
            x = block(x, memory=memory, causal=causal, cache=None if caches is None else caches[i])
        return self.out(self.dec_ln(x))

    def forward(self, src_z: torch.Tensor, tgt_z: torch.Tensor | None = None,
                probe_z: torch.Tensor | None = None, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised predictions ``(B, Lt, Dt)``; the autoregressive decoder needs ``tgt_z`` (teacher forcing).

        A residual GT adds its correction to the retrieved anchor; ``exclude`` (training only) hides, per row, one
        domain from the retrieval table (-1: none).
        """
        b = src_z.shape[0]
        if self.cfg.anchor_k:
            anchor_z = self.anchor(src_z, exclude)
            memory = self.encode(src_z, probe_z, anchor_z)
            return anchor_z + self._decode((self.queries + self.tgt_pos).expand(b, -1, -1), memory, causal=False)
        memory = self.encode(src_z, probe_z)
        if self.cfg.decoder == "parallel":
            return self._decode((self.queries + self.tgt_pos).expand(b, -1, -1), memory, causal=False)
        if tgt_z is None:
            raise ValueError("the autoregressive decoder needs the targets for teacher forcing; use generate()")
        shifted = torch.cat([torch.zeros_like(tgt_z[:, :1]), tgt_z[:, :-1]], dim=1)  # start token = zeros
        return self._decode(self.tgt_in(shifted) + self.tgt_pos, memory, causal=True)

    def generate(self, src_z: torch.Tensor, probe_z: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised predictions without targets: one pass (parallel) or layer by layer with a KV cache."""
        if self.cfg.decoder == "parallel":
            return self.forward(src_z, probe_z=probe_z)
        memory = self.encode(src_z, probe_z)
        caches: list[dict] = [{} for _ in self.decoder]
        prev = torch.zeros(src_z.shape[0], 1, self.cfg.tgt_dim, dtype=src_z.dtype, device=src_z.device)
        outs = []
        for t in range(self.cfg.tgt_tokens):
            step = self._decode(self.tgt_in(prev) + self.tgt_pos[t], memory, causal=False, caches=caches)
            outs.append(step)
            prev = step
        return torch.cat(outs, dim=1)


class PaperGT(nn.Module):
    """The paper's configuration: a T5 encoder-decoder (relative position bias only) with three linear maps."""

    def __init__(self, cfg: GTConfig):
        super().__init__()
        from transformers import T5Config, T5Model

        self.cfg = cfg
        t5 = T5Config(vocab_size=2, d_model=cfg.d_model, d_kv=cfg.d_model // cfg.n_heads, d_ff=cfg.ffn,
                      num_layers=cfg.enc_layers, num_decoder_layers=cfg.dec_layers, num_heads=cfg.n_heads,
                      dropout_rate=cfg.dropout, feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0,
                      use_cache=False)
        self.t5 = T5Model(t5)
        self.src_norm, self.tgt_norm = TokenNorm(cfg.src_tokens, cfg.src_dim), TokenNorm(cfg.tgt_tokens, cfg.tgt_dim)
        self.src_in, self.tgt_in = nn.Linear(cfg.src_dim, cfg.d_model), nn.Linear(cfg.tgt_dim, cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.tgt_dim)

    def _run(self, src_z: torch.Tensor, dec_in: torch.Tensor) -> torch.Tensor:
        hidden = self.t5(inputs_embeds=self.src_in(src_z), decoder_inputs_embeds=self.tgt_in(dec_in)).last_hidden_state
        return self.out(hidden)

    def forward(self, src_z: torch.Tensor, tgt_z: torch.Tensor | None = None, probe_z: None = None) -> torch.Tensor:
        """Teacher forcing: the target shifted right behind a zero start token."""
        if tgt_z is None:
            raise ValueError("PaperGT is autoregressive: forward needs the targets; use generate()")
        return self._run(src_z, torch.cat([torch.zeros_like(tgt_z[:, :1]), tgt_z[:, :-1]], dim=1))

    def generate(self, src_z: torch.Tensor, probe_z: None = None) -> torch.Tensor:
        """Autoregressive, re-running the whole forward at each step (no cache), as the paper does."""
        seq = torch.zeros(src_z.shape[0], 1, self.cfg.tgt_dim, dtype=src_z.dtype, device=src_z.device)
        for _ in range(self.cfg.tgt_tokens):
            nxt = self._run(src_z, seq)[:, -1:]
            seq = torch.cat([seq, nxt], dim=1)
        return seq[:, 1:]


def build_gt(cfg: GTConfig) -> GradTransformer | PaperGT:
    """The network for a config."""
    return GradTransformer(cfg) if cfg.kind == "gt" else PaperGT(cfg)


def num_parameters(model: nn.Module) -> int:
    """Trainable parameter count."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def predict(model: GradTransformer | PaperGT, tiny_tokens: torch.Tensor, probes: torch.Tensor | None = None,
            batch_size: int = 256) -> torch.Tensor:
    """The inference API: TinyLM update tokens ``(B, Ls, Ds)`` to LLM update tokens ``(B, Lt, Dt)``.

    A GT built with probe tokens also needs the updates' probe features (``fedgt.provider.probes.probe_features``).
    """
    cfg = model.cfg
    if tiny_tokens.dim() != 3 or tuple(tiny_tokens.shape[1:]) != (cfg.src_tokens, cfg.src_dim):
        raise ValueError(f"Grad-Transformer input must be (batch, {cfg.src_tokens}, {cfg.src_dim}) TinyLM layer "
                         f"tokens, got {tuple(tiny_tokens.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outs = []
    for start in range(0, len(tiny_tokens), batch_size):
        src = tiny_tokens[start:start + batch_size].to(device, torch.float32)
        probe_z = None
        if cfg.probe_tokens:
            if probes is None or len(probes) != len(tiny_tokens):
                raise ValueError("this Grad-Transformer reads probe features: pass one per update (provider.probes)")
            probe_z = model.probe_norm(probes[start:start + batch_size].to(device, torch.float32))
        outs.append(model.tgt_norm.inverse(model.generate(model.src_norm(src), probe_z)).cpu())
    model.train(was_training)
    return torch.cat(outs)


def save_gt(model: GradTransformer | PaperGT, out: Path, extra: dict | None = None) -> None:
    """``model.safetensors`` + ``config.json`` (with any training metadata in ``extra``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "model.safetensors"))  # handles T5's tied embeddings
    (out / "config.json").write_text(json.dumps({"gt": asdict(model.cfg), **(extra or {})}, indent=2))


def load_gt(path: Path, device: str | torch.device = "cpu") -> tuple[GradTransformer | PaperGT, dict]:
    """A saved Grad-Transformer and its config/metadata."""
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} is not a Grad-Transformer checkpoint (needs config.json and model.safetensors;"
                                " run `fedgt train-gt`)")
    try:
        meta = json.loads((path / "config.json").read_text())
        model = build_gt(GTConfig(**meta["gt"]))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise DamagedArtifact(f"{path / 'config.json'}: not a Grad-Transformer config ({err})") from err
    try:
        load_model(model, str(path / "model.safetensors"))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for truncated files
        raise DamagedArtifact(f"{path / 'model.safetensors'}: cannot be read ({type(err).__name__}: {err})") from err
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise DamagedArtifact(f"{path / 'model.safetensors'}: holds non-finite weights")
    return model.to(device).eval(), meta


def best_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
