"""Ordinary prompts on the command line: `sampling.prompt=<any text>` and `sampling.negative_prompt=<any text>`
are taken exactly as typed (shell quoting aside) in a single run, whatever characters they hold; under -m a
free-text prompt stays one job, and prompts are swept with an explicit `choice(...)` or a prompt file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import demo
from contentv_cli.preflight import _compose_job
from tests.helpers import SMALL, run_demo, run_in_process

TINY = ["model=tiny_contentv", "backend=cpu"]

# One prompt per class of character that Hydra's override grammar or OmegaConf would otherwise interpret.
PROMPTS = {
    "comma": "a red fox, walking in snow, at dusk",
    "apostrophe": "the fox's den, the hunters' path",
    "double_quotes": 'a sign that says "open"',
    "mixed_quotes": "it's \"fine\", isn't it?'",
    "brackets": "a cat (sleeping) on [a red] cushion",
    "braces": "json-like {key: value} and {}",
    "colon": "style: watercolor; mood: calm",
    "equals": "speed = fast, size=large",
    "interpolation": "literally ${oops} and $HOME and \\${x}",
    "backslashes": "a path C:\\temp\\ and a trailing backslash\\",
    "unicode": "une forêt enneigée, 雪の森, снежный лес",
    "emoji": "a fox 🦊 under the moon 🌙",
    "spaces": "  leading and trailing spaces  ",
    "sweep_words": "choice of words, range(1,3) and glob(*)",
    "multi_line": "first line\nsecond line\twith a tab",
}


@pytest.mark.parametrize("key", ["sampling.prompt", "sampling.negative_prompt"])
@pytest.mark.parametrize("name", list(PROMPTS))
def test_any_text_composes_exactly(name: str, key: str):
    """load_config (the command line's composition, in-process) gives back the text exactly."""
    text = PROMPTS[name]
    cfg = demo.load_config([*TINY, f"{key}={text}"])
    assert getattr(cfg.sampling, key.split(".")[1]) == text


@pytest.mark.parametrize("name", list(PROMPTS))
def test_any_text_from_the_command_line(name: str, tmp_path: Path, capsys):
    """The command line (demo.main, in this process): the composed job config (`--cfg job`) holds the text exactly,
    and nothing fails."""
    text = PROMPTS[name]
    proc = run_in_process(capsys, [*TINY, f"sampling.prompt={text}", "--cfg", "job"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    composed = OmegaConf.create(proc.stdout)
    assert composed.sampling.prompt == text


# Every class in one prompt, for the one real process.
EVERY_CLASS = " | ".join(PROMPTS.values())


@pytest.mark.slow
def test_any_text_from_the_command_line_of_a_real_process(tmp_path: Path):
    """A real process, once, with every class in one prompt: what only a process shows, argv's bytes (non-ASCII,
    line breaks, quotes) reaching the command line and the config coming back on stdout, exit 0."""
    proc = run_demo(
        [*TINY, f"sampling.prompt={EVERY_CLASS}", "--cfg", "job"], env={"PYTHONWARNINGS": "ignore"}, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    composed = OmegaConf.create(proc.stdout)
    assert composed.sampling.prompt == EVERY_CLASS


@pytest.mark.slow
def test_a_video_from_a_prompt_with_every_class(tmp_path: Path, cache_dir: Path, capsys, single_thread):
    """One generation (in this process): the sidecar records the prompt and negative prompt exactly as typed."""
    prompt = " | ".join(PROMPTS[n] for n in ("comma", "mixed_quotes", "brackets", "braces", "colon", "emoji"))
    negative = PROMPTS["interpolation"] + " " + PROMPTS["equals"]
    args = [*TINY, f"sampling.prompt={prompt}", f"sampling.negative_prompt={negative}", *SMALL]
    proc = run_in_process(capsys, [*args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sidecar,) = (tmp_path / "run").rglob("*.json")
    record = json.loads(sidecar.read_text())
    assert record["prompt"] == prompt and record["negative_prompt"] == negative
    assert sidecar.with_suffix(".mp4").is_file()


def composed_prompts(jobs: list[list[str]]) -> set[str]:
    """Each job's prompt as the sweep's pre-flight composes it."""
    with demo.hydra_context():
        return {_compose_job(job)[0].sampling.prompt for job in jobs}


def test_a_free_text_prompt_under_m_stays_one_job():
    """Under -m, commas in a prompt are text, not a sweep: the seeds make the jobs."""
    argv = [*TINY, "sampling.prompt=a red fox, walking in snow", "sampling.seed=1,2"]
    jobs = demo.expand_jobs(demo.literal_prompts(argv, multirun=True), multirun=True)
    assert len(jobs) == 2
    assert composed_prompts(jobs) == {"a red fox, walking in snow"}


def test_prompts_are_swept_with_an_explicit_choice():
    argv = [*TINY, 'sampling.prompt=choice("a cat, sleeping","the dog\'s bowl")']
    jobs = demo.expand_jobs(demo.literal_prompts(argv, multirun=True), multirun=True)
    assert composed_prompts(jobs) == {"a cat, sleeping", "the dog's bowl"}


def test_a_sweep_without_m_is_a_usage_error_naming_m():
    with pytest.raises(demo.UsageError, match="a sweep needs -m"):
        demo.expand_jobs([*TINY, "sampling.seed=1,2"], multirun=False)
