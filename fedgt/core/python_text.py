"""Real English text that ships with Python itself: standard-library docstrings and the language reference topics.

Both are public and installed everywhere fedgt runs, so they need no download:

- ``stdlib_text_domains``: one domain per standard-library package or large module (``email``, ``asyncio``, ``typing``
  ...), made of its module, class and function docstrings, read with ``ast`` (nothing is imported, nothing runs).
- ``reference_topic_domains``: the language reference topics of ``pydoc_data.topics`` (what ``help("if")`` prints),
  grouped into domains. fedgt keeps this source entirely out of curation and distillation: it is the held-out text
  the real pair is tested on.

The exact text depends on the Python version (docstrings change between releases); the domains are deterministic
for one interpreter.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

from fedgt.core.data import DomainData, _train_test, _unique, chunk_line
from fedgt.core.examples import Example, text_example

SKIPPED_PACKAGES = ("test", "idlelib", "lib2to3", "turtledemo", "pydoc_data", "__phello__", "ensurepip", "distutils",
                    "site-packages")


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
    docs = (ast.get_docstring(n) for n in nodes)
    return [" ".join(d.split()) for d in docs if d and len(d.split()) >= 8]


def _chunks(texts: list[str], chunk_chars: int, min_words: int = 4) -> list[Example]:
    # A chunk of a few words (the tail of a long text, "loop.") says nothing and recurs across sources.
    return [text_example(c) for t in texts for c in chunk_line(t, chunk_chars) if len(c.split()) >= min_words]


def stdlib_text_domains(min_examples: int = 32, chunk_chars: int = 200, test_fraction: float = 0.2,
                        seed: int = 0) -> list[DomainData]:
    """One text domain per standard-library package or module with at least ``min_examples`` docstring chunks."""
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = {p.name: sorted(f for f in p.rglob("*.py") if "test" not in f.parts[len(root.parts):])
               for p in root.iterdir() if (p / "__init__.py").is_file() and p.name not in SKIPPED_PACKAGES}
    sources |= {f.stem: [f] for f in root.glob("*.py") if not f.stem.startswith("_")}
    domains = []
    for name in sorted(sources):
        examples = _unique(_chunks([d for f in sources[name] for d in _docstrings(f)], chunk_chars))
        if len(examples) >= min_examples:
            train, test = _train_test(examples, test_fraction, seed, f"stdlib/{name}")
            domains.append(DomainData(f"stdlib/{name}", train, test, "text"))
    return domains


def reference_topic_domains(num_domains: int = 4, chunk_chars: int = 200, test_fraction: float = 0.2,
                            seed: int = 0) -> list[DomainData]:
    """The language reference topics (``pydoc_data.topics``), dealt round-robin by name into ``num_domains`` domains."""
    from pydoc_data.topics import topics

    if num_domains < 1:
        raise ValueError(f"num_domains must be >= 1, got {num_domains}")
    names = sorted(topics)
    domains = []
    for i in range(num_domains):
        texts = [" ".join(p.split()) for name in names[i::num_domains] for p in topics[name].split("\n\n")]
        examples = _unique(_chunks([t for t in texts if len(t.split()) >= 8], chunk_chars))
        train, test = _train_test(examples, test_fraction, seed, f"reference/{i}")
        domains.append(DomainData(f"reference/{i}", train, test, "text"))
    return domains
