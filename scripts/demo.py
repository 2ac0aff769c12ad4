"""The README's first command (after `make setup`): start a headless ComfyUI with the pack, run
example_workflows/api/default_model_demo.json on the embedded default model (load -> quantize W4 -> train TuneQDM
scales on the five held-out subject images -> sample "a sks digit" and two ordinary prompts, float vs W4 vs
W4 TuneQDM), then write a PNG grid and a report (subject and prompt fidelity, memory, time) to
out/demo-<time>/ and stop the server."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tuneqdm_demo import data  # noqa: E402
from tuneqdm_demo.metrics import Judge, load_classifier  # noqa: E402
from tuneqdm_fixtures.graph import output_files, read_images, texts  # noqa: E402
from tuneqdm_fixtures.paths import checkout  # noqa: E402
from tuneqdm_fixtures.server import ComfyServer  # noqa: E402

REPO = checkout()
WORKFLOW = REPO / "example_workflows" / "api" / "default_model_demo.json"
MODELS = (("float", "float"), ("w4", "W4, before training"), ("w4_tuneqdm", "W4 TuneQDM"))
PROMPTS = (("sks", data.SUBJECT_PROMPT, None), ("three", data.caption(3), 3), ("seven", data.caption(7), 7))


class LogFollower:
    """Prints the server log's training and sampling progress lines as they appear."""

    def __init__(self, server: ComfyServer) -> None:
        self.server, self.seen, self.last_print = server, 0, 0.0

    def __call__(self) -> None:
        if time.monotonic() - self.last_print < 2.0:
            return
        self.last_print = time.monotonic()
        lines = self.server.log_text().replace("\r", "\n").splitlines()
        for line in lines[self.seen:]:
            if "TuneQDM" in line or "Prompt executed" in line:
                print(f"[demo]   {line.strip()}", flush=True)
        self.seen = len(lines)


def main() -> int:
    out = REPO / "out" / time.strftime("demo-%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    judge = Judge(load_classifier(), data.subject_images(), data.SUBJECT_CLASS)
    graph = json.loads(WORKFLOW.read_text())
    with ComfyServer() as server:
        print(f"[demo] ComfyUI running at {server.url}; posting {WORKFLOW.relative_to(REPO)}", flush=True)
        start = time.perf_counter()
        entry = server.run(graph, timeout=900, check=True, on_poll=LogFollower(server))
        seconds = time.perf_counter() - start
        rss = server.memory().get("VmHWM")
        files = {p.name: p for p in output_files(entry, server.output_dir)}
        for name, path in files.items():
            shutil.copyfile(path, out / name)
        shutil.copytree(server.models_dir / "tuneqdm", out / "tuneqdm")
        reports = texts(entry)
    images = {(m, k): read_images(sorted(out / n for n in files if n.startswith(f"{m}_{k}_")))
              for m, _ in MODELS for k, _, _ in PROMPTS}
    rows = ["| model | subject fidelity (cos) | 'a sks digit' drawn as a zero | 'three' drawn as 3 | 'seven' drawn as 7 |",
            "|---|---|---|---|---|"]
    grid = []
    for m, title in MODELS:
        sks = images[(m, "sks")]
        cells = [f"{judge.subject_fidelity(sks):.3f}", f"{judge.subject_accuracy(sks):.0%}"]
        cells += [f"{judge.accuracy(images[(m, k)], d):.0%}" for k, _, d in PROMPTS if d is not None]
        rows.append(f"| {title} | " + " | ".join(cells) + " |")
        grid.append(torch.cat([torch.cat(list(images[(m, k)]), dim=1) for k, _, _ in PROMPTS], dim=1))
    # Top line: the five training images of the subject, on white.
    subject = torch.cat(list(data.subject_images()), dim=1)
    top = torch.ones(subject.shape[0], grid[0].shape[1], 3)
    top[:, :subject.shape[1]] = subject
    grid_img = torch.cat([top, *grid], dim=0)
    Image.fromarray((grid_img * 255).round().byte().numpy()).save(out / "grid.png")
    report = [f"# TuneQDM demo on the embedded default model ({time.strftime('%Y-%m-%d %H:%M')})", "",
              f"Workflow {WORKFLOW.relative_to(REPO)}: {seconds:.0f} s in ComfyUI. Grid: grid.png (rows: "
              "the five subject images, then " + ", ".join(t for _, t in MODELS) + "; columns: 8 samples each of "
              + ", ".join(f"'{p}'" for _, p, _ in PROMPTS) + ").", "",
              "Fidelity, judged by the bundled digit classifier (the subject is a zero, a digit the base model never saw):", "",
              *rows, "",
              f"Peak memory of the whole ComfyUI process (RSS, torch and the text encoder included): "
              f"{rss / 1e9:.2f} GB" if rss else "Peak memory: not available on this system", ""]
    for node_id, text in reports.items():
        title = graph[node_id].get("_meta", {}).get("title", graph[node_id]["class_type"])
        if graph[node_id]["class_type"] == "PreviewAny":  # the save nodes' texts are server-side paths
            report += [f"{title}:", "```", text.strip(), "```", ""]
    (out / "report.md").write_text("\n".join(report))
    print("\n".join(report))
    print(f"[demo] done: grid, images and report in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
