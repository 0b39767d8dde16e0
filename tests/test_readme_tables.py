"""The README's figure tables are generated (benchmarks/readme_tables.py), and the memory presets' comments state
no figure of their own that could contradict them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks import gpu_tables, readme_blocks, readme_tables

ROOT = Path(__file__).resolve().parents[1]
# A figure: a number with a unit of memory, time, speed or share ("~16 GB", "1.05x", "8.5 ms", "50 %").
FIGURE = re.compile(r"(?<![\w.])~?\d+(?:\.\d+)?\s*(?:GiB|GB|MB|ms|s\b|x\b|×|%)")


def test_readme_figure_tables_are_generated_by_the_command():
    """Every generated block of README.md (memory planner tables per model and backend, CPU and speed-up results,
    GPU figures) equals what `python benchmarks/readme_tables.py --write` writes. The planner runs on the meta
    device: no weights, no device."""
    stale = readme_tables.differences()
    assert not stale, (
        f"README.md's generated blocks are out of date: {stale}; run `{readme_tables.COMMAND}` and commit README.md"
    )


def test_readme_names_the_memory_tables_backends_and_auto_choices():
    block = readme_blocks.current_block(*readme_blocks.markers("memory-tables", readme_tables.COMMAND))
    for model, backend in readme_tables.MEMORY_RUNS:
        assert f"model={model} backend={backend}" in block
    assert block.count("`memory=auto`") == len(readme_tables.MEMORY_RUNS)
    text = (ROOT / "README.md").read_text()
    assert "not measured yet" in text  # GPU figures are predictions until a GPU runs the check
    # The hand-written table this replaced: its header must not come back beside the generated one.
    assert "predicted peak, ContentV-8B" not in text


def test_readme_blocks_read_and_replace(tmp_path):
    begin, end = readme_blocks.markers("x", "cmd")
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{begin}\nold\n{end}\nb\n")
    assert readme_blocks.current_block(begin, end, readme) == "old\n"
    assert readme_blocks.write_blocks({(begin, end): "new\n"}, readme)
    assert readme.read_text() == f"a\n{begin}\nnew\n{end}\nb\n"
    assert not readme_blocks.write_blocks({(begin, end): "new\n"}, readme)
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="x:begin"):
        readme_blocks.current_block(begin, end, readme)


@pytest.mark.parametrize("path", sorted((ROOT / "conf" / "memory").glob("*.yaml")), ids=lambda p: p.stem)
def test_memory_preset_comments_state_no_figures_of_their_own(path):
    """A preset's comment may name its card size and its target (the project's targets, as benchmarks/gpu_tables.py
    checks them); predicted peaks, weights and times belong to the README's generated memory table, which each
    preset points to."""
    name = path.stem
    comments = "\n".join(line.partition("#")[2] for line in path.read_text().splitlines() if "#" in line)
    if name != "auto":
        assert "README's memory" in comments, f"{path.name}: point to the README's memory table for figures"
    target = re.search(r"Target: peak <= (\S+) GiB at <= (\S+)x", comments)
    if target is not None:
        assert name in gpu_tables.TARGETS, f"{path.name}: a target that benchmarks/gpu_tables.py doesn't check"
        limit, slower = gpu_tables.TARGETS[name]
        assert (float(target[1]), float(target[2])) == (limit, slower), f"{path.name}: target != gpu_tables.TARGETS"
        comments = comments.replace(target[0], "")
    # "N GB" (no "~") is a card size ("for 16 GB cards"); every other figure is the planner's to state.
    figures = [f for f in FIGURE.findall(comments) if not re.fullmatch(r"\d+ GB", f)]
    assert not figures, f"{path.name}: figures {figures} in a comment; the README memory table has the planner's"
