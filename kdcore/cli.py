"""The ``kdcore`` command line: demo, predict, analyze, train, compare, recommend, export, runs,
roi, report, dashboard.

With ``--json`` a command prints one JSON document on stdout and nothing else. Errors are one
line on stderr: exit status 2 for bad input, 1 for an internal failure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import NoReturn

import pandas as pd

from kdcore import __version__
from kdcore.errors import DataError, KDCoreError
from kdcore.errors import report as report_error
from kdcore.workspace import ENV_HOME, resolve_workspace


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _clean(obj):
    """NaN/inf become null so the output is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def emit_json(doc: dict) -> None:
    print(json.dumps(_clean(doc), default=_json_default, allow_nan=False, indent=2))


# C0 and C1 control characters except the line break, DEL, and the bidirectional overrides
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def terminal_text(text: object) -> str:
    """Text for a terminal with the control characters of user text (an ANSI escape in a class
    name, a carriage return, a bidi override) written out as ``\\x1b``, ``\\r``, ``\\u202e``:
    a class name cannot recolour the terminal, move the cursor or hide what was printed."""
    return _CONTROL.sub(lambda m: ascii(m.group())[1:-1], str(text))


def say(text: object, *, file=None, flush: bool = False) -> None:
    """print() for text output (tables, messages, errors): through terminal_text."""
    print(terminal_text(text), file=file, flush=flush)


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 100:.1f}%"


def _progress(enabled: bool, total: int, desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, leave=False)


# ----------------------------------------------------------------------------- analyze


def cmd_analyze(args: argparse.Namespace) -> int:
    from kdcore.analysis.analyzer import STREAMED_LABEL_QUALITY, analyze_path, should_stream
    from kdcore.store.overrides import overrides_for

    images = _image_predictions(args)  # an image folder: predict first (cached), then analyze
    path = args.path if images is None else str(images)
    stream = args.stream or None
    if args.label_column or args.teacher_logits:  # features + labels, logits maybe elsewhere
        doc = _analyze_tabular(args)
    else:
        overrides = ({} if should_stream(path, stream)  # streamed: no label check to apply
                     else overrides_for(args.workspace, path))
        doc = analyze_path(path, split=args.split, top=args.top, stream=stream,
                           overrides=overrides)
    doc.setdefault("likely_label_errors", dict(STREAMED_LABEL_QUALITY))
    if images is not None:
        doc["source"], doc["predictions"] = Path(args.path).name, str(images)
    doc["headline_split"] = headline_split(doc, args.split)
    if args.json:
        emit_json(doc)
        return 0
    say(f"{doc['source']}: {doc['n_samples']} samples, {doc['n_classes']} classes"
        + (f", split {args.split}" if args.split else ""))
    if images is not None:
        say(f"  (predictions: {doc['predictions']}; open it in the dashboard's Data page)")
    for name, part in doc.get("splits", {}).items():
        if part.get("labelled") is False:
            say(f"  {name:<11} {part['n_samples']:>7} samples, unlabelled ({part['meaning']})")
        else:
            say(f"  {name:<11} {part['n_samples']:>7} samples, teacher accuracy "
                f"{_pct(part['teacher_accuracy'])} ({part['meaning']})")
    if "teacher_accuracy" not in doc:
        return 0
    head = doc["splits"][doc["headline_split"]] if doc["headline_split"] in doc.get(
        "splits", {}) else doc
    where = {"all": "all labelled rows", "test": "held-out rows (test)",
             "train": "distillation rows (train)"}.get(doc["headline_split"],
                                                        doc["headline_split"])
    say(f"\nTeacher accuracy {_pct(head['teacher_accuracy'])}, bias rate "
        f"{_pct(head['bias_rate'])} on {where}"
        + (f"; on all labelled rows {_pct(doc['teacher_accuracy'])}"
           if head is not doc else "") + "\n")
    per_class = pd.DataFrame(head["per_class"])[
        ["class", "support", "teacher_accuracy", "bias_rate", "most_confused_with"]]
    for column in ("teacher_accuracy", "bias_rate"):
        per_class[column] = per_class[column].map(_pct)
    say(per_class.rename(columns={"teacher_accuracy": "teacher accuracy",
                                  "bias_rate": "bias rate",
                                  "most_confused_with": "most confused with"})
        .fillna("-").to_string(index=False))
    say("\n" + label_error_sentence(doc))
    if head["top_confusions"]:
        say("\nTop confusions (true -> teacher's prediction):")
        top = pd.DataFrame(head["top_confusions"])
        top["share"] = top["share"].map(_pct)
        say(top.to_string(index=False))
    return 0


def _analyze_tabular(args: argparse.Namespace) -> dict:
    """``analyze FILE --label-column C [--teacher-logits LOGITS]``: a features file read the way
    ``train`` and ``compare`` read it, its features used for the label-error check."""
    from kdcore.analysis.analyzer import analyze
    from kdcore.data.bundles import load_dataset
    from kdcore.data.sources import bundle_features, bundle_table, source_key
    from kdcore.store.overrides import load_overrides

    if args.path is None:
        raise DataError("--label-column and --teacher-logits describe a CSV/Parquet file; "
                        "give its path")
    dataset = load_dataset(args.path, label_column=args.label_column,
                           teacher_logits=args.teacher_logits, split_column=args.split_column,
                           test_size=args.test_size, split_seed=args.split_seed)
    table = bundle_table(dataset)
    return analyze(table, split=args.split, top=args.top, label_quality=True,
                   features=bundle_features(dataset),
                   overrides=load_overrides(args.workspace, source_key(table)))


def headline_split(doc: dict, chosen: str | None) -> str:
    """The rows the headline numbers cover, the dashboard's default too: the split asked for,
    else the held-out rows (test) when there are labelled ones, else all labelled rows."""
    if chosen:
        return chosen
    test = doc.get("splits", {}).get("test", {})
    return "test" if test.get("labelled", True) and test.get("n_samples") else "all"


def label_error_sentence(doc: dict) -> str:
    """How many teacher mistakes look like label errors, counting only the mistakes that were
    assessed, and naming the rows that were not."""
    parts = doc.get("splits") or {doc.get("split") or "all": doc}
    assessed = {n: p["likely_label_errors"] for n, p in parts.items()
                if (p.get("likely_label_errors") or {}).get("available")}
    skipped = [n for n, p in parts.items()
               if p.get("labelled", True) and n not in assessed]
    if not assessed:
        reason = (doc.get("likely_label_errors") or {}).get("reason") or "no assessment"
        return f"Label errors vs teacher bias: not assessed ({reason})."
    wrong = sum(lq["n_teacher_wrong"] for lq in assessed.values())
    flagged = sum(lq["count"] for lq in assessed.values())
    method = next(iter(assessed.values()))["method"]
    rows = "" if len(parts) == 1 else f" on the {' and '.join(assessed)} rows"
    text = (f"Of {wrong} teacher mistakes{rows}, {flagged} look like label errors (the teacher "
            f"is probably right) and {wrong - flagged} like teacher bias ({method}).")
    if skipped:
        reason = parts[skipped[0]].get("likely_label_errors", {}).get("reason", "")
        text += (f" The {' and '.join(skipped)} rows were not assessed"
                 + (f": {reason}" if reason else "") + ".")
    return text


# ----------------------------------------------------------------------------- images


_MODEL_FLAGS = ("model", "weights", "model_file")


def _model_flags(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k, None) for k in _MODEL_FLAGS}


def _preprocess(args: argparse.Namespace):
    from kdcore.learning.predict import make_preprocess

    return make_preprocess(normalize=args.normalize, mean=args.mean, std=args.std,
                           image_size=args.image_size)


def _run_predict(args: argparse.Namespace, images: str, out: Path, preprocess):
    """Predict with a progress bar (images/s) on stderr; the summary."""
    from kdcore.learning.predict import predict_path

    flags = _model_flags(args)
    bar = None

    def on_start(total: int) -> None:
        nonlocal bar
        bar = _progress(not args.quiet, total, "predicting", "img")

    try:
        return predict_path(images, out, arch=flags["model"], weights=flags["weights"],
                            model_file=flags["model_file"], preprocess=preprocess,
                            batch_size=args.batch_size, threads=args.threads,
                            on_start=on_start, on_batch=lambda n: bar.update(n))
    finally:
        if bar is not None:
            bar.close()


def _image_predictions(args: argparse.Namespace) -> Path | None:
    """For ``kdcore analyze IMAGES --model...``: the prediction table of the image source in
    ``<workspace>/predictions/`` (made now unless the same source, teacher and options were
    predicted before); None when the path is not an image source."""
    from kdcore.data.bundles import is_bundle

    flags = _model_flags(args)
    given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
    folder = args.path is not None and Path(args.path).is_dir() and not is_bundle(args.path)
    if folder:
        from kdcore.data.images import is_image_source

        folder = is_image_source(args.path)
    if not folder:
        if given:
            raise DataError(f"{given[0]} is for an image folder or CIFAR folder; "
                            f"{args.path or 'the sample'} is a bundle or a table, analyse it "
                            "without model flags")
        return None
    if not given:
        raise DataError(f"{args.path} holds images: add the teacher to predict them, "
                        "--model ARCH --weights FILE or --model-file FILE.ts|.pt2|.onnx")
    from kdcore.learning.predict import prediction_cache_path

    preprocess = _preprocess(args)
    cached = prediction_cache_path(resolve_workspace(args.workspace), args.path,
                                   arch=flags["model"], weights=flags["weights"],
                                   model_file=flags["model_file"], preprocess=preprocess)
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        _run_predict(args, args.path, cached, preprocess)
    return cached


def cmd_predict(args: argparse.Namespace) -> int:
    summary = _run_predict(args, args.images, Path(args.out), _preprocess(args))
    if args.json:
        emit_json(summary.to_dict())
        return 0
    splits = ", ".join(f"{n} {s}" for s, n in summary.splits.items())
    say(f"wrote {summary.out}: {summary.n_images} images ({splits}), {summary.n_classes} "
        f"classes, {summary.model}, {summary.images_per_second:.0f} images/s")
    say(f"next: kdcore analyze {summary.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from kdcore.learning.export import check_out, export_onnx, export_weights
    from kdcore.store.runs import RunStore

    check_out(args.out, args.format)  # a wrong --out is said before any model is loaded
    if args.teacher is not None:
        return _export_teacher(args)
    given = [f"--{k.replace('_', '-')}" for k, v in _model_flags(args).items() if v is not None]
    if args.run_id is None or given:
        why = f"{given[0]} is for --teacher; " if given else ""
        raise DataError(f"{why}give the RUN_ID to export (`kdcore runs` lists them), or "
                        "--teacher [DATA] for a teacher")
    store = RunStore(args.workspace)
    run = store.get(args.run_id)
    if run.status != "done":
        raise DataError(f"run {run.id} is {run.status}, not done; export a finished run "
                        "(`kdcore runs` lists them)")
    weights = store.artifact_dir(run.id) / "student.pt"
    if not weights.is_file():
        raise DataError(f"run {run.id} has no saved weights ({weights} is missing); train it "
                        "again to export it")
    doc = {"run": run.id, "format": args.format}
    if args.format == "onnx":
        from kdcore.value.roi import models_for

        _, student, inputs = models_for(run, store)
        doc.update(export_onnx(student, inputs, args.out))
    else:
        doc["out"] = str(export_weights(weights, Path(args.out), args.format))
    if args.json:
        emit_json(doc)
    else:
        say(f"wrote {doc['out']} ({args.format}) from run {run.id}{_checked(doc)}")
    return 0


def _checked(doc: dict) -> str:
    if "max_abs_diff" not in doc:
        return ""
    return (f"; ONNX Runtime matches torch on {doc['rows_checked']:,} rows at batch "
            f"{' and '.join(map(str, doc['batches_checked']))} (largest difference "
            f"{doc['max_abs_diff']:.2g})")


def _export_teacher(args: argparse.Namespace) -> int:
    """``kdcore export --teacher [DATA] --format onnx``: a teacher that is a model, as ONNX."""
    from kdcore.learning.export import export_onnx, teacher_for_export

    if args.run_id is not None:
        raise DataError(f"give a RUN_ID or --teacher, not both (the run's student is "
                        f"{args.run_id}; drop --teacher to export it)")
    if args.format != "onnx":
        raise DataError(f"--teacher exports the whole model as onnx, not {args.format}: the "
                        "teacher's weights are a file already; give --format onnx")
    flags = _model_flags(args)
    preprocess = _preprocess(args) if any(v is not None for v in flags.values()) else None
    model, inputs, what = teacher_for_export(args.teacher or None, arch=flags["model"],
                                             weights=flags["weights"],
                                             model_file=flags["model_file"],
                                             preprocess=preprocess)
    doc = {"teacher": what, "format": "onnx", **export_onnx(model, inputs, args.out)}
    if args.json:
        emit_json(doc)
    else:
        say(f"wrote {doc['out']} (onnx) from {what}{_checked(doc)}")
    return 0


# ----------------------------------------------------------------------------- train


def _train_overrides(args: argparse.Namespace) -> dict:
    return {
        "epochs": args.epochs, "lr": args.lr, "temperature": args.temperature,
        "lam": args.lam, "normalisation": args.normalisation, "batch_size": args.batch_size,
        "device": args.device, "lq_drop_ce": getattr(args, "lq_drop_ce", None) or None,
        "amp": args.amp or None,
    }


_IMAGE_FLAGS = {"student": "student_arch", "teacher": "teacher_arch",
                "teacher_weights": "teacher_weights", "teacher_model": "teacher_model",
                "preset": "preset", "normalize": "normalize", "image_size": "image_size",
                "augment": "augment", "loader_workers": "loader_workers"}


def _image_overrides(args: argparse.Namespace) -> dict:
    """The image flags (see _add_image_training_options) as TrainConfig fields (None: not
    given)."""
    from kdcore.learning.predict import parse_image_size

    values = {field: getattr(args, flag, None) for flag, field in _IMAGE_FLAGS.items()}
    values["augment"] = values["augment"] or None
    if values["image_size"] is not None:
        values["image_size"] = list(parse_image_size(values["image_size"]))
    return values


def _image_run(args: argparse.Namespace) -> dict | None:
    """The image flags as TrainConfig fields when ``--student`` makes this an image run; None
    for a bundle or tabular run, after refusing image flags or an image folder without it."""
    images = _image_overrides(args)
    if images["student_arch"]:
        if args.bundle is None:
            raise DataError("--student trains on images: give the image folder (train/<class>/,"
                            " test/<class>/) or CIFAR folder first")
        return images
    given = [f"--{flag.replace('_', '-')}" for flag, field in _IMAGE_FLAGS.items()
             if images[field] is not None]
    if args.bundle is not None and Path(args.bundle).is_dir():
        from kdcore.data.images import is_image_source

        if is_image_source(args.bundle):
            raise DataError(f"{args.bundle} holds images: give the student's architecture with "
                            "--student ARCH (e.g. resnet8x4) and its teacher")
    if given:
        raise DataError(f"{given[0]} is for image folders and needs --student ARCH")
    return None


def _training_config(args: argparse.Namespace):
    """The run ``train`` asks for: on an image folder with ``--student``, else on a bundle or
    a tabular file; checked before anything is stored."""
    from kdcore.learning.train import TrainConfig

    images = _image_run(args)
    if images is not None:
        return TrainConfig.for_images(args.bundle, strategy=args.strategy, seed=args.seed,
                                      method_options=_method_options(args.method_option),
                                      **_train_overrides(args), **images)
    bundle = _load_training_data(args)  # checked with the options by for_bundle, before the store
    return TrainConfig.for_bundle(bundle, strategy=args.strategy, seed=args.seed,
                                  method_options=_method_options(args.method_option),
                                  **_train_overrides(args))


def _resumed_config(args: argparse.Namespace, store):
    """``train --resume RUN_ID``: the run's stored config; flags that would change it are
    refused (only --loader-workers, --threads and --nproc may differ)."""
    from kdcore.learning.train import TrainConfig

    images = _image_overrides(args)
    flags = {**_train_overrides(args), "method_option": args.method_option,
             **{flag: images[field] for flag, field in _IMAGE_FLAGS.items()
                if flag != "loader_workers"}}
    changed = [f"--{flag.replace('_', '-')}" for flag, v in flags.items() if v is not None]
    if args.bundle is not None or changed:
        raise DataError(f"--resume goes on with the run's stored settings; drop "
                        f"{changed[0] if changed else args.bundle}")
    return TrainConfig(**store.get(args.resume).config)


def _method_options(pairs: list[str] | None) -> dict | None:
    """``--method-option KEY=VALUE`` flags as TrainConfig.method_options (None: none given); the
    method checks the keys and the values (kdcore.learning.losses.method_for)."""
    options = {}
    for pair in pairs or ():
        key, _, value = pair.partition("=")
        try:
            options[key.strip()] = float(value)
        except ValueError:
            raise DataError(f"--method-option {pair!r}: give KEY=NUMBER, e.g. "
                            "--method-option alpha_temperature=2") from None
    return options or None


def _hidden(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise DataError(f"--hidden {text!r}: give the student's hidden layer sizes as positive "
                        "whole numbers, e.g. --hidden 64 or --hidden 64,32")
    return sizes


def _load_training_data(args: argparse.Namespace):
    """A bundle folder, or a CSV/Parquet tabular file with the --label-column ... options."""
    from kdcore.data.bundles import load_dataset

    return load_dataset(
        args.bundle, label_column=getattr(args, "label_column", None),
        teacher_logits=getattr(args, "teacher_logits", None),
        split_column=getattr(args, "split_column", None),
        test_size=getattr(args, "test_size", None),
        split_seed=getattr(args, "split_seed", None),
        hidden=_hidden(getattr(args, "hidden", None)))


def cmd_train(args: argparse.Namespace) -> int:
    from kdcore.learning import distributed
    from kdcore.learning.train import Cancelled, check_options
    from kdcore.store import overrides as label_overrides
    from kdcore.store.jobs import execute_distributed, execute_run, resume_run
    from kdcore.store.runs import RunStore

    for flag, value in (("--threads", args.threads), ("--nproc", args.nproc)):
        if value < 1:
            raise DataError(f"{flag} {value} is out of range; give 1 or more")
    store = RunStore(args.workspace)
    if args.resume:
        config = _resumed_config(args, store)
    else:
        config = _training_config(args)
        label_overrides.attach(config, store.workspace)
    workers = args.loader_workers
    if workers is not None:  # checked with the config's options, except on --resume
        check_options({"loader_workers": workers})

    def open_run() -> str:
        """The run to train: the resumed one, reopened (see resume_run), or a new one."""
        if args.resume:
            return resume_run(args.resume, workspace=store.workspace)
        return store.create(config.to_dict())

    if distributed.launched_by_torchrun():  # every rank runs this; rank 0 owns the run
        distributed.init_process_group(config.device)
        try:
            lead = distributed.rank_and_world()[0] == 0
            run_id = distributed.broadcast_str(open_run() if lead else None)
            metrics = execute_run(run_id, workspace=store.workspace, threads=args.threads,
                                  loader_workers=workers)
        finally:
            distributed.shutdown()
        if not lead:
            return 0
    elif args.nproc > 1:
        run_id = open_run()
        try:
            distributed.spawn(execute_distributed, args.nproc, run_id, str(store.workspace),
                              args.threads, config.device, not args.quiet, workers)
        except Exception:  # the rank's own error is in the store
            pass
        run = store.get(run_id)
        if run.status != "done":
            raise KDCoreError(f"run {run_id} {run.status}: {run.error or 'see kdcore runs show'}")
        metrics = run.metrics
    else:
        run_id = open_run()
        bar = _progress(not args.quiet, 0, f"{config.strategy} seed {config.seed}", "step")

        def on_step(step: int, total: int) -> None:
            bar.total = total
            bar.update(step - bar.n)

        try:
            metrics = execute_run(run_id, workspace=store.workspace, threads=args.threads,
                                  on_step=on_step, loader_workers=workers)
        except Cancelled:
            say(f"run {run_id} cancelled", file=sys.stderr)
            return 1
        finally:
            bar.close()
    doc = {"run_id": run_id, **metrics, "strategy": config.strategy, "seed": config.seed}
    if args.json:
        emit_json(doc)
    else:
        say(f"run {run_id}: {config.strategy}, seed {config.seed}: test accuracy "
            f"{_pct(metrics['test_accuracy'])} "
            f"(best epoch {_pct(metrics['best_test_accuracy'])}), "
            f"teacher {_pct(metrics['teacher_test_accuracy'])}, copies "
            f"{_pct(metrics['bias_inheritance'])} of the teacher's test errors"
            + (f", {metrics['world_size']} processes" if metrics["world_size"] > 1 else ""))
    return 0


# ----------------------------------------------------------------------------- compare / demo


def _run_compare(args: argparse.Namespace, strategies: list[str], seeds: int,
                 overrides: dict) -> dict:
    from kdcore.store.runs import RunStore
    from kdcore.value.compare import compare

    images = _image_run(args)  # an image folder with --student, else a bundle or table
    data = args.bundle if images is not None else _load_training_data(args)
    store = RunStore(args.workspace)
    bar = _progress(not args.quiet, len(strategies) * seeds, "training students", "run")
    reused = []

    def on_done(run, was_reused: bool) -> None:
        reused.append(was_reused)
        bar.set_postfix_str(f"{run.strategy} seed {run.seed}")
        bar.update(1)

    summary = compare(data, store, strategies, range(seeds), workers=args.workers,
                      on_done=on_done, **overrides, **(images or {}))
    bar.close()
    summary["bundle"] = Path(data).resolve().name if images is not None else data.name
    summary["reused_runs"] = sum(reused)
    return summary


def _signed(delta: dict | None) -> str:
    """A paired difference in points: "+1.2 [+0.5, +2.0]", "" without one."""
    if not delta:
        return ""
    ci = delta["ci95"]
    return f"{delta['mean'] * 100:+.1f}" + (f" [{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}]"
                                             if ci else "")


def _print_summary(summary: dict) -> None:
    decision = summary.get("decision") or {}
    answer = {True: "distil", False: "do not distil"}.get(decision.get("distil"), "cannot tell")
    teacher = {True: "yes", False: "no"}.get(decision.get("beats_teacher"), "cannot tell")
    against_ce = (f": {decision['best_distilled']} vs ce {_signed(decision['delta_vs_ce'])}"
                  if decision.get("delta_vs_ce") else "")
    say(f"Decision: {answer}{against_ce} ({decision.get('adjustment')}); best strategy "
        f"{decision.get('best_strategy')}; beats its teacher: {teacher}")
    calibration = (summary.get("calibration") or {}).get("strategies") or {}
    teacher_ece = ((summary.get("calibration") or {}).get("teacher") or {}).get("ece")
    rows = []
    for name, e in summary["strategies"].items():
        ece = (calibration.get(name) or {}).get("ece")
        rows.append({
            "strategy": name,
            "test acc (mean ± std)": (f"{e['mean'] * 100:.1f}% ± {e['std'] * 100:.1f}"
                                      if len(e["seeds"]) > 1 else f"{e['mean'] * 100:.1f}%"),
            "vs kd (paired, 95% CI)": "" if name == "kd" else _signed(e["delta_vs_kd"]),
            "vs ce (paired, 95% CI)": "" if name == "ce" else _signed(e.get("delta_vs_ce")),
            "copies teacher errors": _pct(e["bias_inheritance"]),
            "excess inheritance": "" if name == "ce" else _pct(e.get("excess_inheritance")),
            "ECE": "n/a" if ece is None else f"{ece:.3f}",
            "best-epoch acc": f"{e['best_epoch_mean'] * 100:.1f}%",
            "seeds": len(e["seeds"]),
        })
    say(f"Teacher test accuracy: {_pct(summary['teacher_test_accuracy'])}"
        + ("" if teacher_ece is None else f", ECE {teacher_ece:.3f}"))
    say(pd.DataFrame(rows).to_string(index=False))
    say("(test acc is the last epoch; best-epoch acc picks the epoch on the test set, "
        "so it is optimistic; excess inheritance is the share of the teacher's errors copied "
        "minus ce's, which never sees the teacher)")
    say(f"\nVerdict: {summary['verdict']}")


def _strategies(text: str) -> list[str]:
    from kdcore.learning.strategies import parse_strategy

    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise DataError("--strategies is empty; give a comma-separated list such as "
                        "ce,kd,kd+be+br+dl")
    for name in names:
        parse_strategy(name)
    return names


def cmd_compare(args: argparse.Namespace) -> int:
    summary = _run_compare(args, _strategies(args.strategies), args.seeds, _train_overrides(args))
    if args.json:
        emit_json(summary)
    else:
        _print_summary(summary)
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    """Successive halving over candidate recipes (kdcore.value.recommend)."""
    from kdcore.store.runs import RunStore
    from kdcore.value.recommend import plan_search, recommend

    if args.workers < 1:
        raise DataError(f"--workers {args.workers} is out of range; give 1 or more")
    search = plan_search(_load_training_data(args), args.candidates, seeds_max=args.seeds_max,
                         budget_runs=args.budget_runs, budget_minutes=args.budget_minutes,
                         workspace=args.workspace, **_train_overrides(args))
    bar = _progress(not args.quiet, search.budget_runs or search.full_grid_runs,
                    "searching", "run")

    def on_run(run, reused: bool, progress: dict) -> None:
        bar.set_postfix_str(f"round {progress['round']}, {len(progress['survivors'])} "
                            f"survivors, {run.strategy} seed {run.seed}")
        bar.update(1)

    try:
        doc = recommend(search, RunStore(search.workspace), workers=args.workers, on_run=on_run)
    finally:
        bar.close()
    if args.json:
        emit_json(doc)
        return 0
    rows = [{"recipe": r["recipe"], "test acc (mean)": _pct(r["mean"]), "seeds": r["seeds"],
             "dropped": (f"round {r['round_dropped']}" if r["round_dropped"] != "survived"
                         else "survived"),
             "vs leader when dropped (Holm)": _signed(r["delta_vs_leader"])}
            for r in doc["ranking"]]
    say(pd.DataFrame(rows).to_string(index=False))
    say(f"\n{doc['summary']}")
    for note in doc["notes"]:
        say(f"note: {note}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kdcore.analysis.analyzer import analyze
    from kdcore.data.sources import load_predictions
    from kdcore.learning.strategies import DEFAULT_STRATEGIES
    from kdcore.store.selection import DEMO_SEEDS

    args.bundle = None
    args.seeds = args.seeds or DEMO_SEEDS
    doc = analyze(load_predictions(None))
    train = doc["splits"]["train"]
    test = doc["splits"]["test"]
    top = test["top_confusions"][:3]
    say(f"Bundled sample {doc['source']}: the teacher is right on "
        f"{_pct(test['teacher_accuracy'])}"
        f" of held-out test images and {_pct(train['teacher_accuracy'])} of the labelled "
        "distillation images.")
    if top:
        say("Its most frequent mistakes on held-out images: " + ", ".join(
            f"{c['true']} read as {c['predicted']} ({c['count']}x)" for c in top))
    say(f"\nTraining {len(DEFAULT_STRATEGIES)} strategies x {args.seeds} seeds "
        "(finished identical runs are reused)...", flush=True)
    summary = _run_compare(args, list(DEFAULT_STRATEGIES), args.seeds, {})
    _print_summary(summary)
    say("\nExplore it: kdcore dashboard   (or: make dashboard)")
    return 0


# ----------------------------------------------------------------------------- runs


def cmd_runs(args: argparse.Namespace) -> int:
    from kdcore.store.jobs import cancel_job
    from kdcore.store.runs import RunStore, to_frame

    store = RunStore(args.workspace)
    action = args.action or "list"
    if action == "list":
        runs = store.list()
        if args.json:
            emit_json({"runs": to_frame(runs).to_dict(orient="records")})
        elif not runs:
            say(f"no runs in {store.workspace}; try `kdcore demo`")
        else:
            table = to_frame(runs)[["id", "created_at", "strategy", "seed", "status",
                                    "test_accuracy", "bias_inheritance"]]
            table["created_at"] = table["created_at"].str.slice(0, 19).str.replace("T", " ")
            say(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
            for run in runs:
                if run.unreadable:
                    say(f"run {run.id}: {run.error}")
        return 0
    if not args.run_id:
        raise DataError(f"`kdcore runs {action}` needs a run id; `kdcore runs` lists them")
    if action == "show":
        run = store.get(args.run_id)
        doc = {"id": run.id, "status": run.status, "strategy": run.strategy, "seed": run.seed,
               "created_at": run.created_at, "started_at": run.started_at,
               "finished_at": run.finished_at, "error": run.error, "config": run.config,
               "metrics": run.metrics, "epochs": store.epochs(run.id).to_dict(orient="records")}
        if args.json:
            emit_json(doc)
        else:
            for key in ("id", "status", "strategy", "seed", "created_at", "finished_at", "error"):
                say(f"{key:>12}: {doc[key]}")
            for key in ("test_accuracy", "best_test_accuracy", "bias_inheritance",
                        "teacher_test_accuracy"):
                if run.metrics and key in run.metrics:
                    say(f"{key:>12}: {_pct(run.metrics[key])}" if len(key) <= 12
                        else f"{key}: {_pct(run.metrics[key])}")
            say("      config: " + json.dumps(run.config))
        return 0
    if action == "rm":
        removed = store.delete(args.run_id)
        say(f"removed run {removed}")
        return 0
    if action == "cancel":
        say(f"cancel requested for run {cancel_job(args.run_id, workspace=store.workspace)}")
        return 0
    raise DataError(f"unknown action {action!r}; use list, show, rm or cancel")


# ----------------------------------------------------------------------------- roi / report


def _assumptions(args: argparse.Namespace):
    from kdcore.value.roi import CostAssumptions

    return CostAssumptions(requests_per_month=args.requests_per_month,
                           cost_per_hour=args.cost_per_hour, utilisation=args.utilisation)


def cmd_roi(args: argparse.Namespace) -> int:
    from kdcore.store.runs import RunStore
    from kdcore.value.formatting import format_money
    from kdcore.value.roi import public, roi, roi_table

    doc = roi(RunStore(args.workspace), args.bundle, args.run, assumptions=_assumptions(args),
              threads=args.threads, repeats=args.repeats, serving_batch=args.serving_batch,
              measurements=args.measurements)
    if args.json:
        emit_json(public(doc))
        return 0
    m, a = doc["measurement"], doc["cost"]["assumptions"]
    say(f"{doc['bundle']}: teacher vs student run {doc['run_id']} ({doc['strategy']}), "
        f"measured now on this machine ({m['device']}, {m['threads']} thread(s)), "
        f"{m['measurements']} measurements of {m['latency_calls']} calls at batch 1 and "
        f"{m['throughput_calls']} at batch {m['throughput_batch']} each; median [95% "
        "interval across measurements]\n")
    say(roi_table(doc).to_string(index=False))
    say(f"\nAssumptions: {a['requests_per_month']:,.0f} requests a month, "
        f"{format_money(a['cost_per_hour'])} per machine-hour, {a['utilisation']:.0%} "
        f"utilisation (change with --requests-per-month, --cost-per-hour, --utilisation).")
    say(f"Cost model: {a['model']}.")
    say(f"\n{doc['summary']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from kdcore.store.runs import RunStore
    from kdcore.value.report import build_report, static_renderer_problem, write_report

    suffix = Path(args.out).suffix.lower().lstrip(".") if args.out else ""
    args.format = args.format or (suffix if suffix in ("pdf", "png") else "html")
    out = args.out or f"kdcore-report.{args.format}"
    if args.format != "html":  # say so before measuring anything
        problem = static_renderer_problem()
        if problem:
            raise DataError(problem)
    data = build_report(RunStore(args.workspace), args.bundle, args.run,
                        assumptions=_assumptions(args), threads=args.threads)
    written = write_report(data, out, args.format)
    if data.roi_error:  # the rest of the report stands; it says why the ROI is missing
        say(f"note: the report has no ROI section: {data.roi_error}", file=sys.stderr)
    if args.json:
        emit_json({"files": [str(p) for p in written], "format": args.format,
                   "bundle": data.bundle.name, "runs": [r.id for r in data.runs],
                   "students_trained": bool(data.runs),
                   "roi_run_id": data.roi["run_id"] if data.roi else None})
        return 0
    for path in written:
        say(path)
    if not data.runs:
        say("note: no students were trained yet; the report holds the teacher-bias analysis "
            "only (run `kdcore demo` first)", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- job


def cmd_job(args: argparse.Namespace) -> int:
    from kdcore.store.jobs import run_job

    return run_job(args.run_id, workspace=args.workspace, max_jobs=args.max_jobs)


# ----------------------------------------------------------------------------- dashboard


def cmd_label_check(args: argparse.Namespace) -> int:
    """The dashboard's background label check: per-row verdicts of a bundle or table file."""
    from kdcore.data.bundles import is_bundle, load_bundle
    from kdcore.data.sources import bundle_features, bundle_table, load_predictions
    from kdcore.store.label_checks import write_label_check

    if is_bundle(args.source):
        bundle = load_bundle(args.source)
        table, features = bundle_table(bundle), bundle_features(bundle)
    else:
        table, features = load_predictions(args.source), None
    meta = write_label_check(table, args.out, features=features)
    found = sum(p["n_label_errors"] for p in meta["splits"].values())
    say(f"wrote {args.out}: {found:,} likely label errors in {table.n_samples:,} rows")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> NoReturn:
    """Become the Streamlit server of the app installed with kdcore (package kdcore_app, the
    repository's dashboard/). An exec, not a child process: stopping this process stops the
    server, and nothing is left behind."""
    try:
        app = Path(str(resources.files("kdcore_app") / "app.py"))
    except ModuleNotFoundError:
        raise DataError("the dashboard (package kdcore_app) is not installed; "
                        "run `pip install -e .` in the repository") from None
    env = dict(os.environ)
    if args.workspace:
        env[ENV_HOME] = str(resolve_workspace(args.workspace))
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", args.host,
           "--server.port", str(args.port), "--server.headless", "true",
           "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal"]
    print(f"kdcore dashboard: http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    os.execve(sys.executable, cmd, env)


# ----------------------------------------------------------------------------- parser


def _add_image_training_options(p: argparse.ArgumentParser) -> None:
    """The flags of training on an image folder (IMAGES) instead of a bundle."""
    g = p.add_argument_group("image folders (IMAGES: train/<class>/ and test/<class>/, or a "
                             "CIFAR folder; program and ONNX teachers are code: load only "
                             "trusted ones)")
    g.add_argument("--student", metavar="ARCH",
                   help="the student's zoo architecture, e.g. resnet8x4 (makes it an image run)")
    g.add_argument("--teacher", metavar="ARCH",
                   help="the teacher's zoo architecture, e.g. resnet32x4, with --teacher-weights")
    g.add_argument("--teacher-weights", metavar="FILE",
                   help="its state dict (.pt/.pth, read weights-only) or .safetensors")
    g.add_argument("--teacher-model", metavar="FILE",
                   help="or the whole teacher: TorchScript (.ts), torch.export (.pt2) or ONNX")
    g.add_argument("--preset", metavar="NAME",
                   help="a training recipe, overridden by any flag: cifar (mdistiller's "
                        "CIFAR-100: batch 64, SGD lr 0.05 /10 at epochs 150, 180, 210 of 240, "
                        "crop and flip)")
    g.add_argument("--loader-workers", type=int, metavar="W",
                   help="processes that decode and augment the images (default 0: the "
                        "training process does it)")
    g.add_argument("--normalize", choices=["none", "cifar10", "cifar100", "imagenet"],
                   help="a mean/std preset (default none; cifar100 with --preset cifar)")
    g.add_argument("--image-size", metavar="H[,W]",
                   help="resize every image (needed when their sizes differ)")
    g.add_argument("--augment", action="store_true",
                   help="random crop (zero padding 4) and horizontal flip, as --preset cifar")


def _add_training_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training options (default: the bundle's recommended values)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--temperature", type=float)
    g.add_argument("--lam", type=float, help="weight of the label loss (CE), 0..1")
    g.add_argument("--normalisation", choices=["batch", "subset"],
                   help="batch (default) or subset (the paper's); see README")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--device", choices=["auto", "cpu", "cuda"])
    g.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast for the student on CUDA (the loss stays float32)")
    g.add_argument("--lq-drop-ce", action="store_true",
                   help="with +lq: also leave likely label errors out of the label loss (CE)")
    t = p.add_argument_group("tabular data (a CSV/Parquet file instead of a bundle folder)")
    t.add_argument("--label-column", help="the column with each row's class (default: label)")
    t.add_argument("--teacher-logits", metavar="PATH",
                   help="a file of sample_id + logit_<class> columns, joined on sample_id "
                        "(default: logit_<class> columns in the data file)")
    t.add_argument("--hidden", help="the student MLP's hidden sizes, e.g. 64,32 (default: 64)")
    t.add_argument("--split-column", help="the column with train/unlabelled/test (default: "
                                          "split; without it, a stratified random split)")
    t.add_argument("--test-size", type=float,
                   help="share of each class held out as test without a split column (0.3)")
    t.add_argument("--split-seed", type=int, help="seed of that random split (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdcore",
        description="Where is the teacher wrong, and does bias-aware distillation pay?")
    parser.add_argument("--version", action="version", version=f"kdcore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    public: list[str] = []

    def command(name: str, fn: Callable, help_text: str, *, workspace=True, quiet=False):
        public.append(name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(fn=fn)
        if workspace:
            p.add_argument("--workspace",
                           help="run store folder (default $KDCORE_HOME or ./.kdcore)")
        if quiet:
            p.add_argument("--quiet", action="store_true", help="no progress bar")
        return p

    p = command("demo", cmd_demo, "the headline on the bundled sample in one command", quiet=True)
    p.add_argument("--seeds", type=int, help="number of seeds (0..N-1; default 5)")
    p.add_argument("--workers", type=int, default=2, help="parallel training processes")

    def image_options(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("teacher (for images; program and ONNX files are code: load "
                                 "only trusted ones)")
        g.add_argument("--model", metavar="ARCH", help="a zoo architecture, e.g. resnet32x4")
        g.add_argument("--weights", metavar="FILE",
                       help="its state dict (.pt, read weights-only) or .safetensors")
        g.add_argument("--model-file", metavar="FILE",
                       help="a whole model: TorchScript (.ts/.pt), torch.export (.pt2) or .onnx")
        g = p.add_argument_group("preprocessing (pixels in [0, 1], then (x - mean) / std)")
        g.add_argument("--batch-size", type=int, default=64, help="images per batch (64)")
        g.add_argument("--image-size", metavar="H[,W]",
                       help="resize every image (needed when their sizes differ)")
        g.add_argument("--normalize", choices=["none", "cifar10", "cifar100", "imagenet"],
                       help="a mean/std preset (default none)")
        g.add_argument("--mean", metavar="R,G,B", help="per-channel mean (with --std)")
        g.add_argument("--std", metavar="R,G,B", help="per-channel std (with --mean)")
        g.add_argument("--threads", type=int, help="torch / ONNX Runtime threads")

    p = command("predict", cmd_predict,
                "run a teacher over an image folder or CIFAR folder into a prediction table",
                workspace=False, quiet=True)
    p.add_argument("images", help="image folder (train/, test/, unlabelled/) or CIFAR folder")
    p.add_argument("--out", required=True, help="the Parquet file to write")
    p.add_argument("--json", action="store_true")
    image_options(p)

    p = command("analyze", cmd_analyze,
                "teacher-bias analysis of a bundle, prediction table or image folder", quiet=True)
    p.add_argument("path", nargs="?",
                   help="bundle folder, CSV/Parquet table, or image folder with a teacher "
                        "(default: the sample)")
    p.add_argument("--split", choices=["train", "unlabelled", "test"])
    p.add_argument("--top", type=int, default=10, help="how many top confusions")
    p.add_argument("--stream", action="store_true",
                   help="read a Parquet table chunk by chunk (automatic above 2,000,000 rows "
                        "or 200 MB of decompressed outputs)")
    p.add_argument("--json", action="store_true")
    image_options(p)
    t = p.add_argument_group("a features file (CSV/Parquet) with labels, as train and compare "
                             "read it")
    t.add_argument("--label-column", help="the column with each row's class")
    t.add_argument("--teacher-logits", metavar="PATH",
                   help="a file of sample_id + logit_<class> columns, joined on sample_id "
                        "(default: logit_<class> columns in the data file)")
    t.add_argument("--split-column", help="the column with train/unlabelled/test (default: "
                                          "split; without it, a stratified random split)")
    t.add_argument("--test-size", type=float,
                   help="share of each class held out as test without a split column (0.3)")
    t.add_argument("--split-seed", type=int, help="seed of that random split (default: 0)")

    p = command("train", cmd_train, "train one student and record the run", quiet=True)
    p.add_argument("bundle", nargs="?", metavar="DATA",
                   help="bundle folder, CSV/Parquet tabular file, or image folder / CIFAR folder "
                        "with --student (default: the sample)")
    p.add_argument("--strategy", default="kd+be+br+dl",
                   help="ce, kd, dkd, ls, dist, rld, with the parts +be +br +dl +lq that apply "
                        "(README); or btkd (the paper's exact recipe)")
    p.add_argument("--method-option", action="append", metavar="KEY=VALUE",
                   help="an option of the strategy's base loss, repeatable, e.g. "
                        "alpha_temperature=2 for rld, beta=2 for dist or dkd (README)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (DDP: gloo on CPU, nccl on CUDA)")
    p.add_argument("--resume", metavar="RUN_ID",
                   help="go on with a stopped image run (interrupted, failed or cancelled) from "
                        "its last checkpoint, with its stored settings")
    p.add_argument("--json", action="store_true")
    _add_training_options(p)
    _add_image_training_options(p)

    p = command("compare", cmd_compare,
                "compare strategies over seeds, paired against ce, kd and the teacher",
                quiet=True)
    p.add_argument("bundle", nargs="?", metavar="DATA",
                   help="bundle folder, CSV/Parquet tabular file, or image folder / CIFAR folder "
                        "with --student (default: the sample)")
    p.add_argument("--strategies", default="ce,kd,kd+be,kd+be+br,kd+be+br+dl")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (0..N-1)")
    p.add_argument("--workers", type=int, default=2, help="parallel training processes")
    p.add_argument("--json", action="store_true")
    _add_training_options(p)
    _add_image_training_options(p)

    p = command("recommend", cmd_recommend,
                "find the best recipe by successive halving over candidates, without the full "
                "grid", quiet=True)
    p.add_argument("bundle", nargs="?",
                   help="bundle folder or CSV/Parquet tabular file (default: the sample)")
    p.add_argument("--candidates", nargs="+", metavar="RECIPE",
                   help="recipes STRATEGY[@KEY=VALUE]..., space- or comma-separated, e.g. ce kd "
                        "kd@T=2 kd+be+br+dl@T=8@lam=0.3 dkd@beta=4; KEY is a training setting "
                        "(T, lam, lr, epochs, ...) or the base loss's own option (default: ce kd "
                        "dkd ls dist rld kd+be+br+dl btkd kd@T=2 kd@T=8 kd+be+br+dl@T=2 "
                        "kd+be+br+dl@T=8); give BUNDLE before --candidates")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-runs", type=int, metavar="N",
                        help="runs to use at most, reused ones included (default: half the "
                             "full grid, candidates x seeds-max)")
    budget.add_argument("--budget-minutes", type=float, metavar="M",
                        help="wall-clock minutes; a round starts only with time left")
    p.add_argument("--seeds-max", type=int, default=5, help="seeds a candidate gets at most")
    p.add_argument("--workers", type=int, default=2, help="parallel training processes")
    p.add_argument("--json", action="store_true")
    _add_training_options(p)

    p = command("export", cmd_export, "write a finished run's student (weights, or the model "
                                      "as ONNX) or a teacher (as ONNX) to a file")
    p.add_argument("run_id", nargs="?", help="the run (a unique prefix is enough)")
    p.add_argument("--teacher", nargs="?", const="", metavar="DATA",
                   help="export a teacher instead: the bundle's (DATA a bundle folder, default "
                        "the sample), or --model/--weights or --model-file checked on the images "
                        "of DATA (an image or CIFAR folder)")
    p.add_argument("--format", required=True, choices=["state_dict", "safetensors", "onnx"],
                   help="state_dict (.pt) or safetensors: the weights; onnx: the whole model "
                        "with a dynamic batch, checked against torch with ONNX Runtime")
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--json", action="store_true")
    g = p.add_argument_group("a teacher given as a model (with --teacher IMAGES)")
    g.add_argument("--model", metavar="ARCH", help="a zoo architecture, e.g. resnet32x4")
    g.add_argument("--weights", metavar="FILE",
                   help="its state dict (.pt, read weights-only) or .safetensors")
    g.add_argument("--model-file", metavar="FILE",
                   help="a whole model to re-export: TorchScript (.ts) or torch.export (.pt2)")
    g.add_argument("--image-size", metavar="H[,W]", help="resize the images it is checked on")
    g.add_argument("--normalize", choices=["none", "cifar10", "cifar100", "imagenet"],
                   help="a mean/std preset for those images (default none)")
    g.add_argument("--mean", metavar="R,G,B", help="per-channel mean (with --std)")
    g.add_argument("--std", metavar="R,G,B", help="per-channel std (with --mean)")

    p = command("runs", cmd_runs, "list, show, remove or cancel runs")
    p.add_argument("action", nargs="?", choices=["list", "show", "rm", "cancel"])
    p.add_argument("run_id", nargs="?")
    p.add_argument("--json", action="store_true")

    def cost_options(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("cost model (monthly serving cost from the measured latency)")
        g.add_argument("--requests-per-month", type=float, default=10_000_000,
                       help="requests served a month (default 10,000,000)")
        g.add_argument("--cost-per-hour", type=float, default=0.10,
                       help="dollars per hour of the serving machine (default 0.10)")
        g.add_argument("--utilisation", type=float, default=0.5,
                       help="share of billed time the machine is busy, 0..1 (default 0.5)")
        p.add_argument("--threads", type=int, default=1,
                       help="torch threads while timing, recorded with the result (default 1)")

    p = command("roi", cmd_roi, "measured size, speed and serving cost: teacher vs student")
    p.add_argument("bundle", nargs="?", metavar="DATA",
                   help="bundle folder or image folder (default: the sample)")
    p.add_argument("--run", help="the student run (default: the best student of the "
                                 "comparison, as the verdict picks it, ce included)")
    p.add_argument("--repeats", type=int, default=100,
                   help="timed calls per model at batch 1, in each measurement (default 100; "
                        "fewer for a model too slow to fit about 3 s)")
    p.add_argument("--measurements", type=int, default=5,
                   help="how many times the whole measurement is repeated, for the interval "
                        "(default 5)")
    p.add_argument("--serving-batch", type=int, default=32,
                   help="the batch size served at, for the throughput figures (default 32)")
    p.add_argument("--json", action="store_true")
    cost_options(p)

    p = command("report", cmd_report,
                "one self-contained report (HTML, opens offline): bias, comparison, ROI, configs")
    p.add_argument("bundle", nargs="?", help="bundle folder (default: the sample)")
    p.add_argument("--run", nargs="+", action="extend", metavar="ID",
                   help="runs to report, each with every finished seed of its settings "
                        "(default: every strategy on the bundle)")
    p.add_argument("--out", help="file to write (default kdcore-report.<format>)")
    p.add_argument("--format", choices=["html", "pdf", "png"],
                   help="html (interactive; the default unless --out ends in .pdf or .png); "
                        "pdf or png render the charts statically and need Chromium and kaleido")
    p.add_argument("--json", action="store_true", help="print the files written as JSON")
    cost_options(p)

    p = command("dashboard", cmd_dashboard, "start the Streamlit dashboard")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8501)

    sub.metavar = "{" + ",".join(public) + "}"  # `job` is internal: not in the help
    p = sub.add_parser("job", description="Train one queued run, then start the next queued "
                                          "ones: the process behind each background job.")
    p.set_defaults(fn=cmd_job)
    p.add_argument("run_id")
    p.add_argument("--workspace")
    p.add_argument("--max-jobs", type=int, help="jobs at once (default: one per core)")
    p = sub.add_parser("label-check", description="Label errors vs teacher bias per row of a "
                       "bundle or prediction table: the dashboard's background check.")
    p.set_defaults(fn=cmd_label_check)
    p.add_argument("source", help="a bundle folder or a CSV/Parquet prediction table")
    p.add_argument("--out", required=True, help="the .npz file to write")
    return parser


def _silence_stdout() -> None:
    """Point stdout at the null device, so the interpreter's final flush into a closed pipe
    neither fails nor prints "Exception ignored ... BrokenPipeError"."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (tests capture it)
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "seeds", 1) is not None and getattr(args, "seeds", 1) < 1:
        say("error: --seeds must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.fn(args)
    except KDCoreError as exc:
        exc.args = (terminal_text(exc),)  # messages quote user text: class names, paths
        return report_error(exc)
    except KeyboardInterrupt:
        say("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kdcore ... | head` closed the pipe: the reader has what it wants
        _silence_stdout()
        return 0
    except Exception as exc:  # one line, never a traceback, unless asked for
        if os.environ.get("KDCORE_DEBUG"):
            raise
        say(f"error: internal failure: {type(exc).__name__}: {exc} "
            "(set KDCORE_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
