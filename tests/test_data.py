from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fedgt.core.data import (
    DataFileError,
    DomainData,
    assert_disjoint,
    chunk_line,
    conversation_text,
    load_public_text,
    load_user_domain,
    load_user_domains,
    partition,
    partition_by_domain,
    partition_dirichlet,
    partition_iid,
    public_text_categories,
    public_text_domains,
    task_domain_data,
)
from fedgt.core.examples import Example, text_example
from fedgt.core.splits import make_domain_splits
from fedgt.core.tasks import all_domains, generate
from fedgt.core.world import make_world

WORLD = make_world()


def toy_domains(train_sizes: list[int], test_sizes: list[int]) -> list[DomainData]:
    """Text domains d0, d1, ... whose examples say which domain and split they come from."""
    return [
        DomainData(
            f"d{j}",
            tuple(text_example(f"d{j} train {k}") for k in range(n_train)),
            tuple(text_example(f"d{j} test {k}") for k in range(n_test)),
            "text",
        )
        for j, (n_train, n_test) in enumerate(zip(train_sizes, test_sizes, strict=True))
    ]


def all_texts(domains: list[DomainData], part: str) -> Counter[str]:
    return Counter(ex.text for d in domains for ex in getattr(d, part))


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ task domains


def test_private_task_data_has_requested_sizes_and_no_shared_prompt() -> None:
    # Prepare
    domain = all_domains()[0]

    # Execute
    data = task_domain_data(WORLD, domain, n_train=20, n_test=10)

    # Assert
    assert (data.name, data.source, len(data.train), len(data.test)) == (domain.name, "task", 20, 10)
    assert all(ex.is_task for ex in data.train + data.test)
    assert not {ex.context for ex in data.train} & {ex.context for ex in data.test}


def test_public_task_data_draws_train_and_test_from_the_public_split() -> None:
    # Prepare
    domain = all_domains()[5]

    # Execute
    data = task_domain_data(WORLD, domain, n_train=8, n_test=4, seed=3, split="public")

    # Assert
    assert data.train == tuple(generate(WORLD, domain, "public", 8, 3))
    assert data.test == tuple(generate(WORLD, domain, "public", 4, 1003))


def test_task_data_rejects_an_unknown_split() -> None:
    with pytest.raises(ValueError, match="split"):
        task_domain_data(WORLD, all_domains()[0], split="train")


# ------------------------------------------------------------------------------------------- public text


def test_conversation_text_alternates_speakers_and_skips_non_strings() -> None:
    assert conversation_text(["hi", 3, "yo", None, "bye\n"]) == "A: hi\nB: yo\nA: bye"


def test_public_text_loads_one_category_as_dialogues() -> None:
    # Execute
    examples = load_public_text(["greetings"])

    # Assert
    assert examples
    assert all(not ex.is_task for ex in examples)
    assert all(ex.text.startswith("A: ") and "\nB: " in ex.text for ex in examples)


def test_public_text_domains_cover_many_categories_with_train_and_test() -> None:
    # Execute
    domains = public_text_domains()

    # Assert
    assert len(domains) >= 10
    assert {d.name for d in domains} <= set(public_text_categories())
    for d in domains:
        assert d.source == "text"
        assert d.train
        assert d.test
        assert not {ex.text for ex in d.train} & {ex.text for ex in d.test}


def test_public_text_rejects_an_unknown_category() -> None:
    with pytest.raises(ValueError, match="no-such-topic"):
        load_public_text(["no-such-topic"])


# -------------------------------------------------------------------------------------------- user files


def test_chunk_line_cuts_at_spaces_and_hard_cuts_long_words() -> None:
    assert chunk_line("aaaa bbbb cccc dddd", 10) == ["aaaa bbbb", "cccc dddd"]
    assert chunk_line("abcdefghijkl", 5) == ["abcde", "fghij", "kl"]
    assert chunk_line("   ", 5) == []


def test_user_folder_loads_txt_and_jsonl_rows(tmp_path: Path) -> None:
    # Prepare: 2 txt lines + 1 chunked into 2, 1 text row + 1 task row; README.md is ignored.
    folder = tmp_path / "clinic"
    write_lines(folder / "notes.txt", ["alpha", "", "beta", "aaaa bbbb cccc dddd"])
    rows = [json.dumps({"text": "hello"}), "", json.dumps({"prompt": "2+2?", "answer": "4"})]
    write_lines(folder / "rows.jsonl", rows)
    write_lines(folder / "README.md", ["not data"])

    # Execute
    data = load_user_domain(folder, chunk_chars=10)

    # Assert: 6 examples, test = round(6 * 0.2) = 1
    assert (data.name, data.source, len(data.train), len(data.test)) == ("clinic", "files", 5, 1)
    examples = data.train + data.test
    assert Counter(ex.is_task for ex in examples) == {False: 5, True: 1}
    assert {ex.text for ex in examples} >= {"alpha\n", "aaaa bbbb\n", "cccc dddd\n", "Q: 2+2?\nA: 4\n"}


def test_user_folder_split_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    # Prepare
    write_lines(tmp_path / "a.txt", [f"line {i}" for i in range(20)])

    # Execute
    first, again = load_user_domain(tmp_path, seed=1), load_user_domain(tmp_path, seed=1)

    # Assert
    assert first == again
    assert (len(first.train), len(first.test)) == (16, 4)


@pytest.mark.parametrize(
    ("rows", "line", "problem"),
    [
        ([{"text": "a"}, {"text": "b"}, '{"text": '], 3, "invalid JSON"),
        ([[1, 2]], 1, "JSON object"),
        ([{"text": "a"}, {"prompt": "q"}], 2, "missing keys"),
        ([{"prompt": "q", "answer": 4}], 1, "'answer' must be a string"),
        ([{"text": 7}], 1, "'text' must be a string"),
        ([{"prompt": "q", "answer": "a\nb"}], 1, "newline"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, rows: list[object], line: int, problem: str) -> None:
    # Prepare
    write_lines(tmp_path / "bad.jsonl", [r if isinstance(r, str) else json.dumps(r) for r in rows])

    # Execute
    with pytest.raises(DataFileError) as caught:
        load_user_domain(tmp_path)

    # Assert
    message = str(caught.value)
    assert "bad.jsonl" in message
    assert f"line {line}:" in message
    assert problem in message


def test_non_utf8_file_names_file_and_line(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe broken\n")

    # Execute / Assert
    with pytest.raises(DataFileError, match=r"bad\.txt, line 2: not valid UTF-8"):
        load_user_domain(tmp_path)


def test_folder_without_data_files_is_an_error_naming_it(tmp_path: Path) -> None:
    # Prepare
    folder = tmp_path / "empty-org"
    folder.mkdir()
    write_lines(folder / "README.md", ["no data here"])

    # Execute / Assert
    with pytest.raises(DataFileError, match="empty-org"):
        load_user_domain(folder)


def test_folder_with_only_blank_files_has_no_usable_examples(tmp_path: Path) -> None:
    # Prepare
    write_lines(tmp_path / "blank.txt", ["", "   "])

    # Execute / Assert
    with pytest.raises(DataFileError, match="no usable examples"):
        load_user_domain(tmp_path)


def test_missing_folder_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_user_domain(tmp_path / "nowhere")


def test_user_root_gives_one_domain_per_subfolder(tmp_path: Path) -> None:
    # Prepare
    write_lines(tmp_path / "bank" / "a.txt", ["x", "y"])
    write_lines(tmp_path / "army" / "b.jsonl", [json.dumps({"prompt": "p", "answer": "q"})])

    # Execute
    domains = load_user_domains(tmp_path)

    # Assert
    assert [d.name for d in domains] == ["army", "bank"]


def test_user_root_without_subfolders_is_one_domain(tmp_path: Path) -> None:
    # Prepare
    root = tmp_path / "solo"
    write_lines(root / "a.txt", ["x", "y"])

    # Execute / Assert
    assert [d.name for d in load_user_domains(root)] == ["solo"]


# ------------------------------------------------------------------------------- public/private guarantee


def test_shadow_public_data_is_disjoint_from_private_data_of_the_same_domain() -> None:
    # Prepare
    shadow = make_domain_splits().shadow

    # Execute / Assert: per domain, public and private questions come from disjoint people.
    for domain in shadow:
        public = task_domain_data(WORLD, domain, 32, 32, split="public")
        assert_disjoint([public], [task_domain_data(WORLD, domain, 32, 32)])


def test_shadow_public_data_is_disjoint_from_all_private_task_data() -> None:
    # Prepare
    splits = make_domain_splits()
    public = [task_domain_data(WORLD, d, 32, 32, split="public") for d in splits.shadow]
    private = [task_domain_data(WORLD, d, 32, 32) for d in splits.shadow + splits.private_only]

    # Execute / Assert
    assert_disjoint(public, private)


def test_assert_disjoint_reports_an_injected_overlap() -> None:
    # Prepare
    shared = Example("Q: leaked?\nA: ", "yes\n", True)
    public = [DomainData("pub", (text_example("public only"), shared), (), "task")]
    private = [DomainData("priv", (text_example("private only"),), (shared,), "task")]

    # Execute / Assert
    with pytest.raises(ValueError, match=r"1 private example\(s\).*leaked.*priv.*pub"):
        assert_disjoint(public, private)


# -------------------------------------------------------------------------------------------- partitions


def test_iid_partition_balances_sizes_and_covers_each_example_once() -> None:
    # Prepare: 21 train and 6 test examples for 4 organizations
    domains = toy_domains([10, 7, 4], [3, 2, 1])

    # Execute
    orgs = partition_iid(domains, 4, seed=0)

    # Assert
    assert [o.name for o in orgs] == ["org-0", "org-1", "org-2", "org-3"]
    assert [len(o.train) for o in orgs] == [6, 5, 5, 5]
    assert [len(o.test) for o in orgs] == [2, 2, 1, 1]
    assert all_texts(orgs, "train") == all_texts(domains, "train")
    assert all_texts(orgs, "test") == all_texts(domains, "test")


def test_domain_partition_gives_organization_i_domain_i() -> None:
    # Prepare
    domains = toy_domains([3, 2, 1], [1, 1, 1])

    # Execute
    orgs = partition_by_domain(domains, 2)

    # Assert
    assert [o.name for o in orgs] == ["org-0:d0", "org-1:d1"]
    assert [(o.train, o.test) for o in orgs] == [(d.train, d.test) for d in domains[:2]]


def test_domain_partition_needs_a_domain_per_organization() -> None:
    with pytest.raises(ValueError, match="2 domains for 3 organizations"):
        partition_by_domain(toy_domains([1, 1], [1, 1]), 3)


def dominant_share(org: DomainData) -> float:
    """Fraction of an organization's train examples that come from its most common domain."""
    counts = Counter(ex.text.split()[0] for ex in org.train)
    return max(counts.values()) / len(org.train)


def test_dirichlet_small_alpha_skews_organizations_towards_one_domain() -> None:
    # Prepare
    domains = toy_domains([40] * 4, [10] * 4)

    # Execute
    skewed = partition_dirichlet(domains, 4, alpha=0.1, seed=0)
    balanced = partition_dirichlet(domains, 4, alpha=1000.0, seed=0)

    # Assert: uniform would be 1/4 per domain; with alpha=0.1 most orgs get over half from one domain.
    assert sum(dominant_share(o) > 0.5 for o in skewed) >= 3
    assert all(dominant_share(o) < 0.35 for o in balanced)
    assert all(len(o.train) >= 2 for o in skewed)
    assert all_texts(skewed, "train") == all_texts(domains, "train")
    assert all_texts(skewed, "test") == all_texts(domains, "test")


def test_dirichlet_partition_is_deterministic_for_a_seed() -> None:
    # Prepare
    domains = toy_domains([20] * 3, [5] * 3)

    # Execute
    first, again, other = (partition_dirichlet(domains, 3, 0.5, seed=s) for s in (7, 7, 8))

    # Assert
    assert first == again
    assert first != other


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_dirichlet_rejects_non_positive_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        partition_dirichlet(toy_domains([10], [2]), 2, alpha)


def test_dirichlet_rejects_too_few_examples_for_min_size() -> None:
    with pytest.raises(ValueError, match="5 train examples"):
        partition_dirichlet(toy_domains([5], [1]), 3, 1.0)


def test_partition_dispatches_on_scheme() -> None:
    # Prepare
    domains = toy_domains([6, 6], [2, 2])

    # Execute / Assert
    assert partition(domains, 2, "iid", seed=3) == partition_iid(domains, 2, 3)
    assert partition(domains, 2, "domain") == partition_by_domain(domains, 2)
    assert partition(domains, 2, "dirichlet", alpha=0.3, seed=3) == partition_dirichlet(domains, 2, 0.3, 3)


def test_partition_rejects_unknown_scheme_and_no_organizations() -> None:
    domains = toy_domains([4], [1])
    with pytest.raises(ValueError, match=r"iid.*domain.*dirichlet"):
        partition(domains, 2, "random")
    with pytest.raises(ValueError, match="num_orgs"):
        partition(domains, 0, "iid")
