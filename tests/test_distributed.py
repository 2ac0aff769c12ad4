"""The headless trainer (`python -m tuneqdm_train`) under torchrun on this machine's CPUs (gloo), with the
embedded default model saved as a quantized-model file and a folder of images with captions, pre-encoded once.

* Two ranks at batch 1 per rank compute what one process at batch 2 computes when it draws the same samples
  and timesteps (the two ranks' seed streams, `--streams 2`): the same loss at every step (each step's loss
  is computed with the scales of the step before, so it checks them too), the same experts updated, scales
  equal within float tolerance, the experts no rank drew bit-identical to the start; rank 0's file loads in
  Load Scales.
* A rank that raises (here with `--model default`: each rank quantizes the embedded model itself) stops
  both processes within seconds, non-zero, with the rank and the error in the output; no half-written file
  is left, the file rank 0 kept is marked partial, and a new run resumes it.

Every process runs with one thread (OMP_NUM_THREADS=1, as torchrun sets it): the machine has two cores.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tuneqdm_fixtures.host import import_pack
from tuneqdm_fixtures.paths import checkout

REPO_ROOT = checkout()

STEPS = 3
CAPTION = "a sks digit"


@pytest.fixture(scope="module")
def pack():
    """The pack imported as ComfyUI imports it (as tests/test_lifecycle_inprocess.py does)."""
    return import_pack()


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), **extra)


def _run(args: list[str], timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def _torchrun(*args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    return _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args], timeout, **env)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def files(pack, tmp_path_factory) -> dict[str, Path]:
    """The default model quantized to W4 with 4 experts and saved (Save Quantized UNet's format), its five
    held-out zeros as PNGs (three with a .txt caption, two taking --caption), encoded once by `encode`."""
    from PIL import Image
    from tuneqdm_pack.nodes import model_files
    from tuneqdm_pack.nodes.default_model import load_model
    from tuneqdm_pack.nodes.patcher import quantize_patcher
    from tuneqdm_pack.tuneqdm_core import TuneQDMConfig
    from tuneqdm_pack.tuneqdm_demo import data

    root = tmp_path_factory.mktemp("distributed")
    images = root / "images"
    images.mkdir()
    for i, image in enumerate(data.subject_images()):
        Image.fromarray((image.numpy() * 255).round().astype(np.uint8)).save(images / f"zero{i}.png")
        if i < 3:
            (images / f"zero{i}.txt").write_text(CAPTION)
    model, _ = quantize_patcher(load_model(), TuneQDMConfig(bits=4, experts=4))
    model_files.save(str(root / "w4.safetensors"), model)
    _ok(_run(["-m", "tuneqdm_train", "encode", "--model", str(root / "w4.safetensors"), "--data", str(images),
              "--caption", "a handwritten digit", "--out", str(root / "data.safetensors")]))
    return {"root": root, "model": root / "w4.safetensors", "data": root / "data.safetensors"}


def _train_args(files: dict[str, Path], out: Path, batch: int, *extra: str) -> list[str]:
    return ["train", "--model", str(files["model"]), "--data", str(files["data"]), "--out", str(out),
            "--steps", str(STEPS), "--batch-size", str(batch), "--seed", "0", "--report", str(out.with_suffix(".json")),
            *extra]


def _load_scales_node(pack, model, path: Path):
    """Load Scales as a graph runs it, with `path`'s folder added to its scales folder."""
    import folder_paths
    from tuneqdm_pack.nodes import folders
    from tuneqdm_pack.nodes.file_nodes import LoadScales

    folder_paths.add_model_folder_path(folders.SCALES, str(path.parent))
    out = LoadScales.execute(model, path.name)
    return out.result[1], out.ui.as_dict()["text"][0]


def test_two_gloo_ranks_at_batch_1_equal_one_process_at_batch_2_on_the_same_draws(pack, files):
    from tuneqdm_pack.nodes import model_files
    from tuneqdm_pack.tuneqdm_core import scales_of

    root = files["root"]
    two, one = root / "two_ranks.safetensors", root / "one_process.safetensors"
    _ok(_torchrun("-m", "tuneqdm_train", *_train_args(files, two, 1)))
    _ok(_run(["-m", "tuneqdm_train", *_train_args(files, one, 2, "--streams", "2")]))
    r2, r1 = (json.loads(p.with_suffix(".json").read_text()) for p in (two, one))
    assert (r2["world_size"], r2["backend"], r1["world_size"]) == (2, "gloo", 1)

    assert r2["experts"] == r1["experts"]
    np.testing.assert_allclose(r2["losses"], r1["losses"], rtol=1e-5)
    # Only the rows of experts some rank drew travel: one expert's rows are a quarter of the scales.
    values = r2["scales_values"]
    for experts, payload in zip(r2["experts"], r2["payload_bytes"]):
        rows = 4 * (values // 4) * len(experts)  # float32 gradients of the drawn experts' rows
        assert rows <= payload < rows + 4096
    unused = set(range(4)) - {e for step in r2["experts"] for e in step}
    assert unused, "seed 0 was chosen so that some expert is never drawn in these steps"

    model = model_files.load(str(files["model"]))
    start = scales_of(model.model.diffusion_model)
    loaded = {}
    for path in (two, one):
        scales, text = _load_scales_node(pack, model, path)
        assert f"complete: {STEPS}/{STEPS} steps" in text
        assert scales.info["world_size"] == ("2" if path == two else "1") and scales.info["sample_streams"] == "2"
        loaded[path] = scales

    lrs = (3e-6, 1e-4)  # s_out, s_in: the defaults
    for kind in (0, 1):
        used = sorted(set(range(4)) - unused)
        a = torch.cat([(loaded[two].tensors[n][kind] - start.tensors[n][kind])[used].flatten() for n in start.tensors])
        b = torch.cat([(loaded[one].tensors[n][kind] - start.tensors[n][kind])[used].flatten() for n in start.tensors])
        assert (a != 0).float().mean() > 0.5, "training moved most scales of the experts it drew"
        diff = (a - b).abs()
        # The files hold fp16 offsets from the start: equal up to their rounding, except where a gradient is
        # within float noise of zero, whose sign Adam's normalised first steps follow (well under 1%).
        beyond = diff > 1e-3 * torch.maximum(a.abs(), b.abs()) + 6e-8
        assert beyond.float().mean() < 0.01, f"{int(beyond.sum())} of {a.numel()} differ"
        assert diff.max() <= 2 * STEPS * lrs[kind]
        for n, (s_out, s_in) in start.tensors.items():
            for e in unused:
                for path in (two, one):
                    assert torch.equal(loaded[path].tensors[n][kind][e], (s_out, s_in)[kind][e]), (n, e)


def test_a_failing_rank_stops_both_ranks_with_its_error_and_the_run_resumes(pack, files):
    from tuneqdm_pack.nodes import model_files

    root = files["root"]
    out = root / "failed.safetensors"
    started = time.time()
    proc = _torchrun(str(REPO_ROOT / "tests" / "distributed_fail_worker.py"),
                     # The embedded default, quantized by each rank: the same model as the saved file (the
                     # resumed run below loads that file, and the partial scales' fingerprint must fit it).
                     "train", "--model", "default", "--data", str(files["data"]), "--out", str(out),
                     "--steps", "200", "--batch-size", "1",
                     TUNEQDM_TEST_FAIL_RANK="1", TUNEQDM_TEST_FAIL_CALL="3")
    ended = time.time()
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    failed_at = float(re.search(r"INJECTED_FAILURE_AT (\d+\.\d+)", log)[1])
    assert started < failed_at and ended - failed_at < 20, f"{ended - failed_at:.1f} s from the failure to the exit"
    # torchrun's summary lists every rank that exited non-zero, with its exit code.
    exits = dict(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s*\n\s*exitcode\s*: (-?\d+)", log))
    assert set(exits) == {"0", "1"} and all(code != "0" for code in exits.values()), log[-3000:]
    assert "[rank 1/2] failed: RuntimeError: injected failure for the test" in log
    assert "[rank 0/2] stopped: rank 1 failed: RuntimeError: injected failure for the test" in log

    # No temporary file left behind; rank 0 kept the scales of the last complete step (2: rank 1 failed in its
    # third forward), a complete file marked partial.
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tuneqdm-")]
    model = model_files.load(str(files["model"]))
    _, text = _load_scales_node(pack, model, out)
    assert "PARTIAL: 2/200 steps (a rank failed)" in text

    resumed = root / "resumed.safetensors"
    _ok(_run(["-m", "tuneqdm_train", "train", "--model", str(files["model"]), "--data", str(files["data"]),
              "--out", str(resumed), "--steps", "4", "--resume", str(out)]))
    scales, text = _load_scales_node(pack, model, resumed)
    assert "complete: 4/4 steps" in text and scales.info["resumed_from"] == str(out)


def test_a_periodic_save_holds_the_scales_of_its_step(pack, files):
    """--save-every: what a restarted run resumes from when rank 0 itself fails (here in its second step)."""
    from safetensors.torch import load_file

    root = files["root"]
    one_step, saved = root / "one_step.safetensors", root / "periodic.safetensors"
    _ok(_run(["-m", "tuneqdm_train", "train", "--model", str(files["model"]), "--data", str(files["data"]),
              "--out", str(one_step), "--steps", "1"]))
    proc = _run([str(REPO_ROOT / "tests" / "distributed_fail_worker.py"), "train", "--model", str(files["model"]),
                 "--data", str(files["data"]), "--out", str(saved), "--steps", "5", "--save-every", "1"],
                TUNEQDM_TEST_FAIL_RANK="0", TUNEQDM_TEST_FAIL_CALL="2")
    assert proc.returncode != 0 and "RuntimeError: injected failure for the test" in proc.stderr
    a, b = load_file(one_step), load_file(saved)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from tuneqdm_pack.nodes import model_files

    _, text = _load_scales_node(pack, model_files.load(str(files["model"])), saved)
    assert "PARTIAL: 1/5 steps (checkpoint)" in text


# ---- the hooks train_scales gained for this (in process, a tiny model) ------------------------------------

def _tiny_run(**kwargs):
    from test_train import make_loss, quantized_denoiser
    from tuneqdm_core import TuneQDMConfig, scales_of
    from tuneqdm_core.train import SampleSet, TrainConfig, train_scales

    model = quantized_denoiser(TuneQDMConfig(bits=4, experts=4))
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    config = TrainConfig(steps=4, batch_size=2, lr_s_out=1e-3, lr_s_in=1e-3, checkpointing=False)
    start = scales_of(model)
    return start, train_scales(model, start, [SampleSet(images, 0)], make_loss(model, noise_seed=5), config, **kwargs)


def test_one_explicit_stream_is_the_plain_run():
    from tuneqdm_core.train import _generator

    _, plain = _tiny_run()
    _, streamed = _tiny_run(generators=[_generator(0, 0)])
    assert plain.history == streamed.history and plain.losses == streamed.losses
    for name, (o, i) in plain.scales.tensors.items():
        assert torch.equal(o, streamed.scales.tensors[name][0]) and torch.equal(i, streamed.scales.tensors[name][1])


def test_sync_decides_the_step_loss_and_which_experts_move():
    calls = []

    def only_expert_0(params, used, loss):
        calls.append((len(params), set(used), loss))
        return {0}, 42.0

    start, result = _tiny_run(sync=only_expert_0)
    assert len(calls) == 4 and result.losses == [42.0] * 4
    assert any(used - {0} for _, used, _ in calls), "the draws used other experts too"
    for name, (o, i) in result.scales.tensors.items():
        assert torch.equal(o[1:], start.tensors[name][0][1:]) and torch.equal(i[1:], start.tensors[name][1][1:])
        assert not torch.equal(o[0], start.tensors[name][0][0])


def test_a_batch_that_does_not_split_over_the_streams_is_refused():
    with pytest.raises(ValueError, match="batch size 2 cannot be split evenly over 3 sample streams"):
        _tiny_run(generators=[torch.Generator() for _ in range(3)])


def test_training_data_files_are_safetensors_only_and_checked(tmp_path):
    from tuneqdm_core.errors import FileFormatError
    from tuneqdm_train import data

    with pytest.raises(FileFormatError, match="pickle shards"):
        data.load(tmp_path / "shard_0000.pkl")
    original = data.TrainingData([(torch.randn(2, 4, 8, 8), (0, 1))],
                                 [[torch.randn(1, 16, 384), {"pooled_output": torch.randn(1, 384)}],
                                  [torch.randn(1, 16, 384), {}]], ["a sks digit", "a handwritten digit"])
    path = tmp_path / "data.safetensors"
    data.save(path, original)
    back = data.load(path)
    assert back.captions == original.captions and back.digest() == original.digest()
    assert torch.equal(back.groups[0][0], original.groups[0][0]) and back.groups[0][1] == (0, 1)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(FileFormatError, match="corrupted"):
        data.load(path)


def test_training_data_files_hold_video_latents_and_refuse_other_ranks(tmp_path):
    from tuneqdm_core.errors import FileFormatError
    from tuneqdm_train import data

    conds = [[torch.randn(1, 16, 64), {}]]
    video = data.TrainingData([(torch.randn(2, 16, 3, 4, 4), (0, 0))], conds, ["a sks clip"])
    data.save(tmp_path / "video.safetensors", video)
    back = data.load(tmp_path / "video.safetensors")
    assert torch.equal(back.groups[0][0], video.groups[0][0])
    data.save(tmp_path / "flat.safetensors", data.TrainingData([(torch.randn(2, 16), (0, 0))], conds, ["x"]))
    with pytest.raises(FileFormatError, match=r"latents.0 \(2, 16\)"):
        data.load(tmp_path / "flat.safetensors")
