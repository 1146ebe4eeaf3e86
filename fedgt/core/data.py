"""Datasets for organizations and the provider: task domains, real public text, user files, partitions.

Everything here is a ``DomainData``: a named domain with a train and a test part. The provider's data is
the *public* split of the shadow task domains plus real public dialogue text; organizations hold
*private* task data or their own files, and ``partition`` deals any of these out to N organizations.
All shuffles are seeded, so the same arguments always give the same datasets.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedgt.core.examples import Example, task_example, text_example
from fedgt.core.tasks import TaskDomain, generate
from fedgt.core.world import World

SOURCES = ("task", "text", "files", "mixed")  # "mixed": an organization dealt data from several sources
TASK_SPLITS = ("private", "public")
USER_EXTENSIONS = (".txt", ".jsonl")
SCHEMES = ("iid", "domain", "dirichlet")
PUBLIC_TEST_SEED_OFFSET = 1000  # public test examples come from another seed of the same public people
DIRICHLET_TRIES = 100


@dataclass(frozen=True)
class DomainData:
    """A named domain's train and test examples and where they came from."""

    name: str
    train: tuple[Example, ...]
    test: tuple[Example, ...]
    source: str

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"DomainData {self.name!r}: source must be one of {SOURCES}, got {self.source!r}")


class DataFileError(ValueError):
    """A user data file (or folder) that cannot be turned into examples."""

    def __init__(self, path: Path, problem: str, line: int | None = None) -> None:
        where = f"{path}, line {line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.line = line


# --------------------------------------------------------------------------------------------- helpers


def _shuffled(items: Sequence[Example], seed: int, salt: str) -> list[Example]:
    # The salt (a domain name) gives every domain its own permutation for the same seed.
    out = list(items)
    random.Random(f"{salt}|{seed}").shuffle(out)
    return out


def _num_test(n: int, test_fraction: float) -> int:
    """Test-set size: round-half-up of n * fraction, but at least 1 and at most n - 1 when n >= 2."""
    if n < 2:
        return 0
    return min(n - 1, max(1, int(n * test_fraction + 0.5)))


def _train_test(examples: Sequence[Example], test_fraction: float, seed: int,
                salt: str) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test fraction must be in (0, 1), got {test_fraction}")
    shuffled = _shuffled(examples, seed, salt)
    n_test = _num_test(len(shuffled), test_fraction)
    return tuple(shuffled[n_test:]), tuple(shuffled[:n_test])


def _unique(examples: Sequence[Example]) -> list[Example]:
    """Drop repeated texts, keeping first occurrences, so a train text can never reappear in test."""
    seen: set[str] = set()
    out = []
    for ex in examples:
        if ex.text not in seen:
            seen.add(ex.text)
            out.append(ex)
    return out


# ----------------------------------------------------------------------------------------- task domains


def task_domain_data(world: World, domain: TaskDomain, n_train: int = 128, n_test: int = 128, seed: int = 0,
                     split: str = "private") -> DomainData:
    """A task domain's private (train/test people) or public (shadow, provider-side) examples."""
    if split == "private":
        train = generate(world, domain, "train", n_train, seed)
        test = generate(world, domain, "test", n_test, seed)
    elif split == "public":
        # Public has no test people of its own: the provider's test set is another draw from public.
        train = generate(world, domain, "public", n_train, seed)
        test = generate(world, domain, "public", n_test, seed + PUBLIC_TEST_SEED_OFFSET)
    else:
        raise ValueError(f"split must be one of {TASK_SPLITS}, got {split!r}")
    return DomainData(domain.name, tuple(train), tuple(test), "task")


# ------------------------------------------------------------------------------------ real public text


def _corpus_dir() -> Path:
    # Imported lazily: the corpus is only needed by callers that want public text.
    try:
        import chatterbot_corpus
    except ImportError as err:
        raise ImportError("public text needs the chatterbot corpus: pip install chatterbot-corpus") from err
    return Path(chatterbot_corpus.__file__).parent / "data" / "english"


def public_text_categories() -> list[str]:
    """The available public text categories (the corpus file stems), sorted."""
    return sorted(p.stem for p in _corpus_dir().glob("*.yml"))


def conversation_text(turns: Sequence[object]) -> str:
    """One conversation as alternating ``A: ...`` / ``B: ...`` lines; non-string turns are skipped first."""
    said = [t.strip() for t in turns if isinstance(t, str) and t.strip()]
    return "\n".join(f"{'AB'[i % 2]}: {t}" for i, t in enumerate(said))


def _load_category(path: Path) -> list[Example]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader is ~10x faster when present
    doc = yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {}
    texts = (conversation_text(turns) for turns in doc.get("conversations") or [] if isinstance(turns, list))
    return [text_example(t) for t in texts if t]


def _public_text_by_category(categories: Sequence[str] | None) -> dict[str, list[Example]]:
    available = public_text_categories()
    wanted = available if categories is None else list(categories)
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise ValueError(f"unknown public text categories {unknown}; available: {available}")
    corpus = _corpus_dir()
    return {c: _load_category(corpus / f"{c}.yml") for c in sorted(set(wanted))}


def load_public_text(categories: Sequence[str] | None = None) -> list[Example]:
    """Every conversation of the chosen chatterbot-corpus English categories (all when None) as text examples."""
    return [ex for examples in _public_text_by_category(categories).values() for ex in examples]


def public_text_domains(n_test_fraction: float = 0.2, seed: int = 0,
                        categories: Sequence[str] | None = None) -> list[DomainData]:
    """One text domain per corpus category, deduplicated and split train/test; categories under 2 texts are skipped."""
    domains = []
    for category, examples in _public_text_by_category(categories).items():
        # Some categories repeat conversations verbatim (tech_support: 1050 rows, 10 distinct).
        unique = _unique(examples)
        if len(unique) < 2:
            continue
        train, test = _train_test(unique, n_test_fraction, seed, category)
        domains.append(DomainData(category, train, test, "text"))
    return domains


# ----------------------------------------------------------------------------------------- user files


def chunk_line(line: str, chunk_chars: int) -> list[str]:
    """Split a line into consecutive chunks of at most chunk_chars, cutting at the last space when there is one."""
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
    chunks = []
    rest = line.strip()
    while len(rest) > chunk_chars:
        # A space at index chunk_chars still gives a full-length chunk before it.
        cut = rest.rfind(" ", 1, chunk_chars + 1)
        if cut <= 0:
            cut = chunk_chars
        chunks.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        chunks.append(rest)
    return chunks


def _read_lines(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataFileError(path, f"not valid UTF-8 (byte {err.start})", line) from err
    # split("\n") rather than splitlines(): line numbers must match what an editor shows.
    return [ln.rstrip("\r") for ln in text.removeprefix("\ufeff").split("\n")]


def _txt_examples(path: Path, chunk_chars: int) -> list[Example]:
    return [text_example(chunk) for line in _read_lines(path) for chunk in chunk_line(line, chunk_chars)]


def _string_field(obj: dict[str, Any], key: str, path: Path, line: int) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataFileError(path, f"{key!r} must be a string, got {type(value).__name__}", line)
    if not value.strip():
        raise DataFileError(path, f"{key!r} is empty", line)
    return value


def _jsonl_example(obj: object, path: Path, line: int) -> Example:
    if not isinstance(obj, dict):
        raise DataFileError(path, f"expected a JSON object, got {type(obj).__name__}", line)
    has_text = "text" in obj
    has_task = "prompt" in obj or "answer" in obj
    if has_text and has_task:
        raise DataFileError(path, "has both 'text' and 'prompt'/'answer'; use one kind per row", line)
    if has_text:
        return text_example(_string_field(obj, "text", path, line))
    if "prompt" not in obj or "answer" not in obj:
        raise DataFileError(path, f"missing keys: need 'text' or both 'prompt' and 'answer', got {sorted(obj)}", line)
    prompt = _string_field(obj, "prompt", path, line)
    answer = _string_field(obj, "answer", path, line)
    if "\n" in answer or "\r" in answer:
        raise DataFileError(path, "'answer' contains a newline (answers are one line, matched exactly)", line)
    return task_example(prompt, answer)


def _jsonl_examples(path: Path) -> list[Example]:
    out = []
    for i, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFileError(path, f"invalid JSON ({err.msg}, column {err.colno})", i) from err
        out.append(_jsonl_example(obj, path, i))
    return out


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in USER_EXTENSIONS)


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        raise FileNotFoundError(f"data folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {folder}")


def load_user_domain(path: Path, test_fraction: float = 0.2, seed: int = 0, chunk_chars: int = 200) -> DomainData:
    """One domain from a folder's .txt (a text example per line) and .jsonl (text or prompt/answer rows) files."""
    path = Path(path)
    _check_folder(path)
    files = _data_files(path)
    if not files:
        raise DataFileError(path, f"no {' or '.join(USER_EXTENSIONS)} files in the folder")
    examples: list[Example] = []
    for file in files:
        examples += _txt_examples(file, chunk_chars) if file.suffix.lower() == ".txt" else _jsonl_examples(file)
    if not examples:
        raise DataFileError(path, f"no usable examples in {[f.name for f in files]}")
    train, test = _train_test(examples, test_fraction, seed, path.name)
    return DomainData(path.name, train, test, "files")


def load_user_domains(root: Path, test_fraction: float = 0.2, seed: int = 0,
                      chunk_chars: int = 200) -> list[DomainData]:
    """One domain per subfolder of root (sorted, hidden ones skipped); root itself when it has no subfolders."""
    root = Path(root)
    _check_folder(root)
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subfolders:
        return [load_user_domain(root, test_fraction, seed, chunk_chars)]
    loose = _data_files(root)
    if loose:
        # Silently dropping them would lose data; guessing their domain would mislabel it.
        raise DataFileError(root, f"holds both subfolders and data files {[f.name for f in loose]}; "
                                  "move the files into a subfolder")
    return [load_user_domain(sub, test_fraction, seed, chunk_chars) for sub in subfolders]


# ------------------------------------------------------------------------------- public/private guarantee


def assert_disjoint(public: Sequence[DomainData], private: Sequence[DomainData]) -> None:
    """Raise ValueError if any private example text (train or test) also occurs in any public domain."""
    owner = {ex.text: d.name for d in public for ex in (*d.train, *d.test)}
    clashes = [(ex.text, d.name, owner[ex.text]) for d in private for ex in (*d.train, *d.test) if ex.text in owner]
    if clashes:
        shown = "; ".join(f"{text!r} (private {p} / public {q})" for text, p, q in clashes[:3])
        raise ValueError(f"{len(clashes)} private example(s) also occur in public data, e.g. {shown}")


# --------------------------------------------------------------------------------------------- partitions


def _check_partition_args(domains: Sequence[DomainData], num_orgs: int) -> None:
    if num_orgs < 1:
        raise ValueError(f"num_orgs must be >= 1, got {num_orgs}")
    if not domains:
        raise ValueError("no domains to partition")


def _source_of(domains: Sequence[DomainData]) -> str:
    sources = {d.source for d in domains}
    return sources.pop() if len(sources) == 1 else "mixed"


def partition_iid(domains: Sequence[DomainData], num_orgs: int, seed: int = 0) -> list[DomainData]:
    """Pool all train and all test examples, shuffle each, and deal them round-robin to num_orgs organizations."""
    _check_partition_args(domains, num_orgs)
    train = _shuffled([ex for d in domains for ex in d.train], seed, "iid-train")
    test = _shuffled([ex for d in domains for ex in d.test], seed, "iid-test")
    source = _source_of(domains)
    return [DomainData(f"org-{i}", tuple(train[i::num_orgs]), tuple(test[i::num_orgs]), source)
            for i in range(num_orgs)]


def partition_by_domain(domains: Sequence[DomainData], num_orgs: int, seed: int = 0) -> list[DomainData]:
    """Organization i gets domain i's data (domains beyond num_orgs are unused); seed is unused."""
    _check_partition_args(domains, num_orgs)
    if len(domains) < num_orgs:
        raise ValueError(f"partition_by_domain needs at least one domain per organization: "
                         f"{len(domains)} domains for {num_orgs} organizations")
    return [DomainData(f"org-{i}:{d.name}", d.train, d.test, d.source) for i, d in enumerate(domains[:num_orgs])]


def _split_by(examples: Sequence[Example], proportions: np.ndarray) -> list[list[Example]]:
    """Cut examples into len(proportions) consecutive parts sized by the proportions."""
    cuts = (np.cumsum(proportions)[:-1] * len(examples)).round().astype(int)
    bounds = [0, *cuts.tolist(), len(examples)]
    return [list(examples[lo:hi]) for lo, hi in itertools.pairwise(bounds)]


def _dirichlet_draw(domains: Sequence[DomainData], num_orgs: int, alpha: float,
                    rng: np.random.Generator) -> tuple[list[list[Example]], list[list[Example]]]:
    train: list[list[Example]] = [[] for _ in range(num_orgs)]
    test: list[list[Example]] = [[] for _ in range(num_orgs)]
    for d in domains:
        p = rng.dirichlet(np.full(num_orgs, alpha))
        # Shuffle within the domain so which examples an organization gets is random, not file order.
        train_order = rng.permutation(len(d.train))
        test_order = rng.permutation(len(d.test))
        for org, part in enumerate(_split_by([d.train[j] for j in train_order], p)):
            train[org] += part
        for org, part in enumerate(_split_by([d.test[j] for j in test_order], p)):
            test[org] += part
    return train, test


def partition_dirichlet(domains: Sequence[DomainData], num_orgs: int, alpha: float, seed: int = 0,
                        min_size: int = 2) -> list[DomainData]:
    """Split each domain over organizations by Dirichlet(alpha) proportions (small alpha: skewed, non-IID)."""
    _check_partition_args(domains, num_orgs)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    total = sum(len(d.train) for d in domains)
    if total < num_orgs * min_size:
        raise ValueError(f"{total} train examples cannot give {num_orgs} organizations {min_size} each")
    rng = np.random.default_rng(seed)
    for _ in range(DIRICHLET_TRIES):
        train, test = _dirichlet_draw(domains, num_orgs, alpha, rng)
        if min(len(t) for t in train) >= min_size:
            source = _source_of(domains)
            return [DomainData(f"org-{i}", tuple(train[i]), tuple(test[i]), source) for i in range(num_orgs)]
    raise ValueError(f"no Dirichlet(alpha={alpha}) draw in {DIRICHLET_TRIES} tries gave all {num_orgs} "
                     f"organizations >= {min_size} train examples ({total} in all); raise alpha or lower min_size")


def partition(domains: Sequence[DomainData], num_orgs: int, scheme: str, alpha: float = 0.5,
              seed: int = 0) -> list[DomainData]:
    """Deal domains out to num_orgs organizations by scheme: "iid", "domain" or "dirichlet"."""
    if scheme == "iid":
        return partition_iid(domains, num_orgs, seed)
    if scheme == "domain":
        return partition_by_domain(domains, num_orgs, seed)
    if scheme == "dirichlet":
        return partition_dirichlet(domains, num_orgs, alpha, seed)
    raise ValueError(f"unknown partition scheme {scheme!r}; valid schemes: {SCHEMES}")
