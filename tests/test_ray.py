"""``decodekit generate --engine ray`` / ``decodekit.ray.generate_dataset`` on ONE local Ray
instance (2 CPUs) started by a module fixture: the same records as the single-process CLI,
resume, a worker killed mid-batch, and the one-line errors (those need no Ray at all)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from decodekit.cli import main
from decodekit.processors import LogitsPipeline

ray = pytest.importorskip("ray", reason="the Ray tests need the ray extra: pip install 'decodekit[ray]'")

PROMPTS = ["What is 2+2?", "Name a colour.", "Say hello.", "hi", "Why is the sky blue?",
           "List three primes.", "Write a haiku.", "What is HTML?"]
TIMING = ("seconds", "first_token_seconds", "tokens_per_s")  # the only fields that differ run to run


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance (2 CPUs) for every test of this module."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", configure_logging=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def _argv(model_dir, prompts_file, out, *extra):
    return ["generate", "--model_path", str(model_dir), "--prompts_file", str(prompts_file), "--output_file",
            str(out), "--dtype", "float32", "--device", "cpu", "--max_new_tokens", "6", "--batch_size", "2",
            "--max_display", "0", *extra]


def _records(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _without_timing(record: dict) -> dict:
    stats = {k: v for k, v in record["stats"].items() if k not in TIMING}
    return {**record, "stats": stats}


def _by_index(records) -> list[dict]:
    return [_without_timing(r) for r in sorted(records, key=lambda r: r["index"])]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ray_prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(tiny_model_dir, prompts_file, tmp_path_factory):
    """The single-process CLI's records for ``PROMPTS``."""
    out = tmp_path_factory.mktemp("ray_ref") / "single.jsonl"
    assert main(_argv(tiny_model_dir, prompts_file, out)) == 0
    return _records(out)


# ----------------------------------------------------------------- no Ray needed


def test_missing_ray_is_one_line_error_with_the_install_command(monkeypatch, capsys, tiny_model_dir, tmp_path):
    import decodekit.models

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.setattr(decodekit.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--engine", "ray", "--prompt", "hi", "--model_path", str(tiny_model_dir),
                 "--output_file", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("decodekit: error:")
    assert "pip install 'decodekit[ray]'" in err
    assert not out.exists()


@pytest.mark.parametrize("extra,match", [
    (["--engine", "ray", "--num_workers", "0"], "num_workers must be >= 1"),
    (["--engine", "ray", "--worker_cpus", "0"], "worker_cpus must be > 0"),
    (["--engine", "ray", "--worker_gpus", "-1"], "worker_gpus must be >= 0"),
    (["--engine", "ray", "--worker_threads", "0"], "worker_threads must be >= 1"),
    (["--engine", "ray", "--ray_address", " "], "ray_address"),
    (["--engine", "ray", "--debug"], "not with --engine ray"),
    (["--engine", "spark"], "engine must be one of"),
    (["--num_workers", "2"], "--num_workers needs --engine ray"),
])
def test_engine_flags_are_checked_before_anything_starts(monkeypatch, capsys, extra, match):
    import decodekit.models

    monkeypatch.setattr(decodekit.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray started"))
    assert main(["generate", "--prompt", "hi", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


# ----------------------------------------------------------------- on the local Ray instance


def test_ray_records_equal_the_single_process_cli(ray_local, tiny_model_dir, prompts_file, reference, tmp_path,
                                                  capsys):
    out = tmp_path / "ray.jsonl"
    assert main(_argv(tiny_model_dir, prompts_file, out, "--engine", "ray", "--num_workers", "2")) == 0
    got = _records(out)
    assert sorted(r["index"] for r in got) == list(range(len(PROMPTS)))
    assert _by_index(got) == _by_index(reference)
    err = capsys.readouterr().err
    assert f"ray: {len(PROMPTS)} prompts" in err and "tokens/s overall" in err
    assert err.count("  worker ") >= 1


@pytest.mark.slow  # a Ray job of its own (~15 s on 2 busy cores)
def test_resume_after_a_killed_job_runs_every_prompt_exactly_once(ray_local, tiny_model_dir, prompts_file,
                                                                   reference, tmp_path, capsys):
    out = tmp_path / "ray.jsonl"
    lines = [json.dumps(r) for r in reference[:3]]
    out.write_text("\n".join(lines) + "\n" + lines[0][: len(lines[0]) // 2])  # killed mid-write of a 4th
    assert main(_argv(tiny_model_dir, prompts_file, out, "--engine", "ray", "--resume")) == 0
    got = _records(out)
    assert sorted(r["index"] for r in got) == list(range(len(PROMPTS)))
    assert got[:3] == reference[:3]  # kept as they were
    assert _by_index(got) == _by_index(reference)
    assert f"ray: {len(PROMPTS) - 3} prompts" in capsys.readouterr().err


class KillOnce:
    """A logits processor step that changes nothing, except that its first call anywhere
    kills its process (``os._exit``) in the middle of a batch; the marker file makes it once."""

    def __init__(self, marker: str):
        self.marker = marker

    def __call__(self, input_ids, logits):
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return logits
        os.close(fd)
        os._exit(1)


@pytest.mark.slow  # a Ray job of its own (~15 s on 2 busy cores)
def test_a_worker_killed_mid_batch_is_restarted_and_every_prompt_comes_once(ray_local, tiny_model_dir,
                                                                           reference, tmp_path):
    from decodekit.ray import RayEngine, generate_dataset, prompt_dataset

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # KillOnce, for the actors
    marker = tmp_path / "killed"
    dataset = prompt_dataset(PROMPTS, list(range(len(PROMPTS))), 2)
    results = generate_dataset(dataset, str(tiny_model_dir), "greedy", batch_size=2, dtype="float32",
                               device="cpu", engine=RayEngine(num_workers=1), max_new_tokens=6,
                               logits_processor=LogitsPipeline([KillOnce(str(marker))], greedy=True))
    rows = results.take_all()
    assert marker.exists()  # a worker did die
    got = [json.loads(row["record"]) for row in rows]
    assert sorted(r["index"] for r in got) == list(range(len(PROMPTS)))
    assert _by_index(got) == _by_index(reference)


def test_generate_options_include_the_logits_processors():
    """generate_dataset / --engine ray take what generate takes, processors included."""
    from decodekit.ray import _check_generate_options
    from decodekit.validation import DecodeKitError

    _check_generate_options("prompt_lookup", {"max_new_tokens": 4, "repetition_penalty": 1.2, "gamma": 3,
                                              "logprobs": 2})
    with pytest.raises(DecodeKitError, match="unknown option"):
        _check_generate_options("greedy", {"not_an_option": 1})
