"""The embedded default's pieces, in process: the pixel codec, the shipped files, the text encoder,
the metrics and the quality benchmark's path (tiny settings)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tuneqdm_core import FileFormatError
from tuneqdm_demo import data, files
from tuneqdm_demo.metrics import Judge, load_classifier

REPO = files.ASSETS.parent


def test_codec_is_an_exact_rearrangement_of_the_16x16_image():
    grey = torch.rand(3, 1, 16, 16)
    latent = data.grey_to_latent(grey)
    assert latent.shape == (3, 4, 8, 8)
    torch.testing.assert_close(data.latent_to_grey(latent), grey)
    # What the model sees after ComfyUI's SD1.5 process_latent_in is the image in [-1, 1].
    assert float((latent * data.LATENT_SCALE).abs().max()) <= 1.0 + 1e-6


def test_subject_images_are_five_held_out_digits_as_comfy_images():
    images = data.subject_images()
    assert images.shape == (data.SUBJECT_IMAGES, data.IMAGE_SIZE, data.IMAGE_SIZE, 3)
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    with pytest.raises(ValueError, match="empty"):
        data.image_to_grey(images[:0])


def test_shipped_unet_file_matches_its_config_and_size_budget():
    tensors, info = files.load_file(files.UNET_FILE, files.UNET_FORMAT)
    assert files.UNET_FILE.stat().st_size <= 8 * 1024 * 1024
    assert info["unet_config"] == files.UNET_CONFIG
    assert info["subject_class"] == data.SUBJECT_CLASS
    assert sum(t.numel() for t in tensors.values()) == info["parameters"]
    assert all(t.dtype == torch.float16 for t in tensors.values())


def test_corrupted_or_wrong_default_files_are_refused(tmp_path):
    bad = tmp_path / "digits_unet.safetensors"
    shutil.copyfile(files.UNET_FILE, bad)
    raw = bytearray(bad.read_bytes())
    raw[-10] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(FileFormatError, match="corrupted"):
        files.load_file(bad, files.UNET_FORMAT)
    with pytest.raises(FileFormatError, match="expected a digits-classifier file"):
        files.load_file(files.UNET_FILE, files.CLASSIFIER_FORMAT)
    with pytest.raises(FileNotFoundError, match="tuneqdm_demo.train"):
        files.load_file(tmp_path / "missing.safetensors", files.UNET_FORMAT)


def test_classifier_recognises_real_digits_and_scores_the_subject():
    classifier = load_classifier()
    digits = data.load_digits()
    images = data.grey_to_image(digits.images)
    judge = Judge(classifier, data.subject_images(), data.SUBJECT_CLASS)
    assert judge.accuracy(images[digits.labels == 3], 3) > 0.9
    assert judge.subject_accuracy(data.subject_images()) == 1.0
    zeros, sevens = images[digits.labels == 0][5:37], images[digits.labels == 7][:32]
    assert judge.subject_fidelity(zeros) > judge.subject_fidelity(sevens) + 0.2


def test_text_encoder_gives_fixed_length_minilm_states():
    from tuneqdm_demo.text import TOKENS, WIDTH, TextEncoder

    encoder = TextEncoder()
    states, pooled = encoder.encode(data.SUBJECT_PROMPT)
    assert states.shape == (1, TOKENS, WIDTH) and pooled.shape == (1, WIDTH)
    other, _ = encoder.encode(data.caption(7))
    assert not torch.allclose(states, other)


def test_quality_benchmark_runs_end_to_end_with_tiny_settings():
    cmd = [sys.executable, "-m", "tuneqdm_bench", "quality", "--seeds", "1", "--steps", "3", "--samples", "4",
           "--prompt-samples", "1", "--sample-steps", "3", "--rows", "1,12", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)["rows"]
    assert [r["row"] for r in rows] == ["float, no fine-tuning", "TuneQDM W4, 4 experts"]
    for r in rows:
        for metric in ("subject_fidelity", "subject_accuracy", "prompt_fidelity"):
            mean, spread = r[metric]
            assert -1.0 <= mean <= 1.0 and spread == 0.0  # one seed: no spread
    assert rows[1]["weight_bytes"] < 0.3 * rows[0]["weight_bytes"]
