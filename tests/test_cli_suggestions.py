"""Help where the user is: an unknown key or group names the nearest one; additions the schema doesn't know are
refused (they were dropped without a word); Hydra's own quoting of a prompt means its content."""

from __future__ import annotations

import pytest

import demo

TINY = ["model=tiny_contentv", "backend=cpu"]


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("prompt=a dog", "did you mean sampling.prompt?"),
        ("modle=tiny_contentv", "did you mean model=tiny_contentv?"),
        ("memroy=auto", "did you mean memory=auto?"),
        ("sampling.promt=x", "did you mean sampling.prompt?"),
        ("+sampling.foo=1", "+sampling.foo: no such option to add"),
        ("+sampling.seed=3", "sampling.seed exists: set it without +"),
    ],
)
def test_unknown_keys_point_at_the_nearest(override, hint):
    with pytest.raises(demo.UsageError, match=None) as info:
        demo.load_config([*TINY, override])
    assert hint in str(info.value)
    assert "\n" not in str(info.value)


def test_additions_where_the_schema_takes_free_keys_still_work():
    cfg = demo.load_config([*TINY, "+model.sampling_defaults.seed=7"])
    assert cfg.model.sampling_defaults["seed"] == 7


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ('"a cat, sitting"', "a cat, sitting"),  # Hydra's documented quoting: the content
        ("'it\\'s a cat'", "it's a cat"),
        ('"a" and "b"', '"a" and "b"'),  # not one quoted string: as typed
        ('a cat\'s "nap"', 'a cat\'s "nap"'),
    ],
)
def test_a_hydra_quoted_prompt_means_its_content(value, text):
    assert demo.load_config([*TINY, f"sampling.prompt={value}"]).sampling.prompt == text


def test_an_empty_hydra_quoted_prompt_is_refused():
    from contentv.errors import ConfigError
    from contentv.validation import check_settings

    cfg = demo.load_config([*TINY, "sampling.prompt=''"])
    assert cfg.sampling.prompt == ""
    with pytest.raises(ConfigError, match="sampling.prompt='' is not valid: a non-empty text"):
        check_settings(cfg)


def test_the_readmes_choice_sweep_expands_to_each_prompt_as_typed():
    from contentv_cli.preflight import _compose_job

    argv = [*TINY, 'sampling.prompt=choice("a red fox, in snow","the cat\'s nap")', "sampling.seed=1,2"]
    jobs = demo.expand_jobs(demo.literal_prompts(argv, multirun=True), multirun=True)
    with demo.hydra_context():
        prompts = [_compose_job(job)[0].sampling.prompt for job in jobs]
    assert prompts == ["a red fox, in snow", "a red fox, in snow", "the cat's nap", "the cat's nap"]


def test_a_missing_launcher_plugin_is_named_with_its_install_line(monkeypatch, capsys, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if "joblib_launcher" in name else find_spec(name, *a)
    )
    argv = ["-m", *TINY, "sampling.seed=1,2", "hydra/launcher=local_parallel", f"hydra.sweep.dir={tmp_path}/s"]
    assert demo.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: hydra/launcher=local_parallel is not valid: it needs hydra-joblib-launcher")
    assert "pip install 'matplotlib" in line and "(the sweep extra)" in line
    assert not (tmp_path / "s").exists()


def test_the_installed_commands_help_names_it(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["/usr/bin/contentv", "--help"])
    assert demo.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage: contentv [GROUP=OPTION" in out and "python demo.py [GROUP" not in out


def test_a_bad_byte_inside_choice_is_one_line_before_anything_is_written(tmp_path, capsys):
    argv = ["-m", *TINY, 'sampling.prompt=choice("caf\udce9","a dog")', f"hydra.sweep.dir={tmp_path / 's'}"]
    assert demo.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: sampling.prompt='caf\\udce9' is not valid: UTF-8 text")
    assert not (tmp_path / "s").exists()  # no multirun.yaml, nothing


def test_the_readmes_sweep_lines_expand_as_they_say(tmp_path):
    """Every `python demo.py -m ...` line of the README's Sweeps section, as a shell splits it, expands into the
    jobs its comment promises (the prompt line: 4 jobs, each prompt as typed); each job composes."""
    import re
    import shlex
    from pathlib import Path

    from contentv_cli.preflight import _compose_job

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Sweeps") :]
    section = section[: section.index("```", section.index("```bash") + 7)]
    line = next(ln for ln in section.splitlines() if "choice(" in ln)
    command, comment = line.split("  # ")
    args = [a for a in shlex.split(command)[2:] if a != "-m"]  # after "python demo.py -m"
    jobs = demo.expand_jobs(demo.literal_prompts(args, multirun=True), multirun=True)
    assert len(jobs) == int(re.match(r"(\d+) jobs", comment).group(1))
    with demo.hydra_context():
        prompts = {_compose_job(job)[0].sampling.prompt for job in jobs}
    assert prompts == {"a red fox, in snow", "the cat's nap"}


@pytest.mark.slow
def test_the_readmes_first_sweep_line_runs_verbatim(tmp_path, cache_dir):
    """The README's first sweep line, as typed (plus a sweep folder of the test's), runs its 4 jobs on the tiny model."""
    import shlex
    from pathlib import Path

    from tests.helpers import run_demo

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Sweeps") :]
    line = next(ln for ln in section.splitlines() if ln.startswith("python demo.py -m model=tiny_contentv"))
    args = shlex.split(line.split("  #")[0])[2:]
    proc = run_demo([*args, f"hydra.sweep.dir={tmp_path / 'sweep'}"], cache_dir, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep: 4 jobs, 0 done, 4 to run" in proc.stderr
    assert len(list((tmp_path / "sweep").glob("*/*.mp4"))) == 4
