"""`LongContextGRPOConfig`'s fields are described once, by their `metadata["help"]`: the class docstring and the
README's field table are generated from it (`tools/gen_config_table.py` writes the table), under the headings of
`FIELD_GROUPS`, in the class body's order.
"""

import dataclasses
import importlib.util
import inspect
import re
from pathlib import Path

import pytest
from transformers import HfArgumentParser
from trl import GRPOConfig

from trl_longctx import longctx_grpo_config
from trl_longctx.longctx_grpo_config import FIELD_GROUPS, LongContextGRPOConfig, fields_markdown, grouped_fields

REPO = Path(__file__).resolve().parents[3]
README = REPO / "packages" / "trl_longctx" / "README.md"
GENERATOR = REPO / "tools" / "gen_config_table.py"
# Help texts and docstrings name nothing outside the package: no machine, no repository path (measured numbers and
# the benchmarks that took them live in docs/benchmarks.md).
OUTSIDE = re.compile(r"H100|H200|lent |docs/|tools/|shared/|/work")


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_config_table", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entry_text(doc: str, name: str) -> str:
    """The text of the docstring entry `name (...):`, its lines joined."""
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"    {name} ("))
    body = []
    for line in lines[start + 1 :]:
        if not line.startswith(" " * 8):
            break
        body.append(line.strip())
    return " ".join(body)


def our_fields() -> list[dataclasses.Field]:
    inherited = {f.name for f in dataclasses.fields(GRPOConfig)}
    return [f for f in dataclasses.fields(LongContextGRPOConfig) if f.name not in inherited]


def test_readme_table_is_generated_from_the_help():
    generator = load_generator()
    text = README.read_text()
    assert generator.START in text and generator.END in text, f"{README} lacks the config-table markers"
    assert generator.render(text) == text, (
        f"The config table in {README.relative_to(REPO)} differs from LongContextGRPOConfig's field help; "
        f"regenerate it with `{generator.COMMAND}` (from the repository root)."
    )


def test_generator_rewrites_and_checks(tmp_path, capsys):
    generator = load_generator()
    readme = tmp_path / "README.md"
    stale = f"intro\n{generator.START}\n| `old` | table |\n{generator.END}\noutro\n"
    readme.write_text(stale)
    assert generator.main(["--check", "--readme", str(readme)]) == 1
    assert generator.COMMAND in capsys.readouterr().err
    assert readme.read_text() == stale  # --check changes nothing
    assert generator.main(["--readme", str(readme)]) == 0
    assert readme.read_text() == f"intro\n{generator.START}\n{fields_markdown()}\n{generator.END}\noutro\n"
    assert generator.main(["--check", "--readme", str(readme)]) == 0
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="config-table:start"):
        generator.main(["--readme", str(readme)])


def test_groups_follow_the_class_body():
    names = [f.name for f in our_fields()]
    assert [name for _, group in FIELD_GROUPS for name in group] == names
    assert [heading for heading, _ in grouped_fields()] == [heading for heading, _ in FIELD_GROUPS]
    assert all(f.metadata.get("help") for f in our_fields())


def test_groups_must_name_every_field_in_order(monkeypatch):
    (first, names), *rest = FIELD_GROUPS
    monkeypatch.setattr(longctx_grpo_config, "FIELD_GROUPS", ((first, names[::-1]), *rest))
    with pytest.raises(RuntimeError, match="FIELD_GROUPS must list the fields of LongContextGRPOConfig"):
        grouped_fields()
    monkeypatch.setattr(longctx_grpo_config, "FIELD_GROUPS", tuple(rest))
    with pytest.raises(RuntimeError, match=f"got \\['{rest[0][1][0]}'"):
        grouped_fields()


def test_docstring_is_the_help_under_trl_style_headings():
    doc = inspect.getdoc(LongContextGRPOConfig)
    assert doc.startswith("Configuration class for [`LongContextGRPOTrainer`]")
    headings = re.findall(r"^    > Parameters that control (.+)$", doc, flags=re.MULTILINE)
    assert headings == [heading for heading, _ in FIELD_GROUPS]
    entries = re.findall(r"^    (\w+) \(", doc, flags=re.MULTILINE)
    assert entries == [f.name for f in our_fields()]
    for f in our_fields():
        assert entry_text(doc, f.name) == " ".join(f.metadata["help"].split()), f.name
    assert "compile_decoder_layers (`str` or `None`, *optional*, defaults to `None`):" in doc
    assert 'logprob_backend (`str`, *optional*, defaults to `"auto"`):' in doc
    assert "max_consecutive_nonfinite (`int`, *optional*, defaults to `3`):" in doc
    assert max(len(line) for line in LongContextGRPOConfig.__doc__.splitlines()) <= 119


def test_help_shows_the_same_text():
    # HfArgumentParser passes each field's metadata to argparse: the help must render (no bare "%") and be the text.
    # argparse rewraps it (breaking at hyphens, too): compared without whitespace.
    text = "".join(HfArgumentParser(LongContextGRPOConfig).format_help().split())
    for f in our_fields():
        assert "".join(f.metadata["help"].split()) in text, f.name


def test_texts_name_nothing_outside_the_package():
    sources = [inspect.getsource(longctx_grpo_config), LongContextGRPOConfig.__doc__, fields_markdown()]
    from trl_longctx import compile_regions

    sources.append(inspect.getsource(compile_regions))
    for text in sources:
        assert not OUTSIDE.search(text), OUTSIDE.search(text)
