"""`kdcore predict` on an image folder: images/s against a plain PyTorch loop, and memory.

Run: ``python benchmarks/bench_predict.py`` (``--images 10000`` for a bigger folder). It

1. writes a folder of N random 32x32 RGB PNG images (10 classes; 80% train, 20% test) and
   the state dict of a zoo architecture (``--arch``, default resnet8x4, random weights) into a
   temporary folder;
2. times, in interleaved rounds, the engine function behind ``kdcore predict``
   (:func:`kdcore.learning.predict.predict_path`: opening the folder, loading the teacher,
   decoding batch by batch, writing the Parquet table) against a plain PyTorch loop over the
   same files with the same model, batch size and threads (list the files, ``PIL.Image.open``
   -> numpy -> ``torch.from_numpy`` -> the model under ``inference_mode``, logits kept in a
   list; NCHW-contiguous tensors as torchvision's ``ToTensor`` gives, the layout kdcore feeds,
   since a channels-last tensor alone changes a CPU convolution's speed by 20-30%); prints
   the images/s of each (best round) and the ratio (median over rounds, and its range);
3. in a fresh process for each, predicts the folder of N images and one of 5N images and
   prints the peak RSS growth during the call (``ru_maxrss`` against the RSS before it) and
   the peak of Python's own allocations (``tracemalloc``): bounded memory means the 5N figure
   is about the N one, not five times it;
4. times ``kdcore analyze`` streaming (:func:`~kdcore.analysis.analyzer.analyze_stream`) of
   the 5N table, in that process too, and its peak RSS growth;
5. deletes the folder.

Ratios, not absolute targets: the machine's speed varies between spells.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import peak_rss_mb, rss_mb  # noqa: E402
from timing import interleaved, ratio  # noqa: E402

N_CLASSES = 10
SIDE = 32
TRAIN_SHARE = 0.8


def make_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``root/train/<class>/*.png`` and ``root/test/<class>/*.png``: n images in all."""
    rng = np.random.default_rng(seed)
    n_train = int(n * TRAIN_SHARE)
    for i in range(n):
        split = "train" if i < n_train else "test"
        folder = root / split / f"class{i % N_CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"{i:06d}.png")
    return root


def make_weights(path: Path, arch: str) -> Path:
    import torch

    from kdcore.learning.models import build_model

    torch.manual_seed(0)
    model = build_model({"type": arch, "n_classes": N_CLASSES, "in_channels": 3})
    torch.save(model.state_dict(), path)
    return path


def engine(folder: Path, out: Path, arch: str, weights: Path, batch_size: int,
           threads: int) -> int:
    from kdcore.learning.predict import predict_path

    return predict_path(folder, out, arch=arch, weights=weights, batch_size=batch_size,
                        threads=threads).n_images


def plain_loop(folder: Path, arch: str, weights: Path, batch_size: int, threads: int) -> int:
    """What one would write by hand: the files, Pillow, numpy, torch, the model."""
    import torch

    from kdcore.learning.models import build_model

    torch.set_num_threads(threads)
    files = sorted(p for split in ("train", "test") for p in (folder / split).rglob("*.png"))
    model = build_model({"type": arch, "n_classes": N_CLASSES, "in_channels": 3})
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(files), batch_size):
            batch = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)
                              for f in files[start:start + batch_size]])
            # NCHW, contiguous, as torchvision's ToTensor makes it (and as kdcore feeds it)
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous() / 255.0
            out = model(x)
            outputs.append((out[0] if isinstance(out, tuple) else out).numpy())
    return sum(len(o) for o in outputs)


def _memory_child(folder: str, out: str, arch: str, weights: str, batch_size: int,
                  threads: int, analyse: bool, queue) -> None:
    """In a fresh process: RSS growth and Python's peak allocations while predicting (and
    streaming the analysis of the result)."""
    import torch  # noqa: F401  (imported before the baseline, as the CLI has it loaded)

    from kdcore.analysis.analyzer import analyze_stream
    from kdcore.learning.predict import predict_path  # noqa: F401

    before = rss_mb()
    tracemalloc.start()
    start = time.perf_counter()
    n = engine(Path(folder), Path(out), arch, Path(weights), batch_size, threads)
    seconds = time.perf_counter() - start
    py_peak = tracemalloc.get_traced_memory()[1] / 1024**2
    tracemalloc.stop()
    result = {"n": n, "seconds": seconds, "rss_growth": peak_rss_mb() - before,
              "py_peak": py_peak}
    if analyse:
        before = rss_mb()
        start = time.perf_counter()
        doc = analyze_stream(out)
        result.update(analyze_seconds=time.perf_counter() - start,
                      analyze_rss_growth=peak_rss_mb() - before, analyzed=doc["n_samples"])
    queue.put(result)


def in_fresh_process(*args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2_000, help="images in the folder")
    parser.add_argument("--arch", default="resnet8x4", help="zoo architecture of the teacher")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (both loops)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    args = parser.parse_args()

    import torch

    with tempfile.TemporaryDirectory(prefix="kdcore-bench-predict-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        small = make_folder(tmp / "small", args.images)
        weights = make_weights(tmp / "teacher.pt", args.arch)
        print(f"{args.images} images of {SIDE}x{SIDE} written in "
              f"{time.perf_counter() - start:.1f} s; teacher {args.arch} (random weights), "
              f"batch {args.batch_size}, {args.threads} thread(s), torch {torch.__version__}")

        out = tmp / "preds.parquet"
        times = interleaved({
            "predict": lambda: engine(small, out, args.arch, weights, args.batch_size,
                                      args.threads),
            "plain": lambda: plain_loop(small, args.arch, weights, args.batch_size,
                                        args.threads),
        }, rounds=args.rounds)
        for name, label in (("predict", "kdcore predict (engine, Parquet written)"),
                            ("plain", "plain PyTorch loop (Pillow -> numpy -> torch)")):
            best = min(times[name])
            print(f"{label:<48} {args.images / best:8.0f} images/s (best of "
                  f"{args.rounds}: {best:.2f} s; median {statistics.median(times[name]):.2f} s)")
        med, low, high = ratio(times, "plain", "predict")
        print(f"speed of predict / plain loop: {med:.2f}x (median over rounds; "
              f"range {low:.2f}-{high:.2f}x)")

        big = make_folder(tmp / "big", 5 * args.images, seed=1)
        print("\nmemory, each in a fresh process (peak RSS growth during the call; "
              "Python's own peak allocations):")
        results = {}
        for name, folder, analyse in (("1x", small, False), ("5x", big, True)):
            r = in_fresh_process(str(folder), str(tmp / f"mem-{name}.parquet"), args.arch,
                                 str(weights), args.batch_size, args.threads, analyse)
            results[name] = r
            print(f"  {name} ({r['n']:>6} images): RSS +{r['rss_growth']:6.1f} MB, "
                  f"tracemalloc peak {r['py_peak']:6.1f} MB, {r['n'] / r['seconds']:.0f} "
                  "images/s")
        growth = results["5x"]["rss_growth"] / max(results["1x"]["rss_growth"], 1e-9)
        print(f"  5x the images -> {growth:.2f}x the RSS growth (bounded: about 1x, not 5x)")
        r = results["5x"]
        print(f"\nkdcore analyze (streamed) of the {r['analyzed']}-row table: "
              f"{r['analyze_seconds']:.2f} s, RSS +{r['analyze_rss_growth']:.1f} MB")


if __name__ == "__main__":
    main()
