"""The `batchscale` command. Each subcommand registers itself in `build_parser`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:
    from .batching.distributed import DistributedInfo


def _add_overrides(p: argparse.ArgumentParser, what: str) -> None:
    """``--set KEY=VALUE`` (repeatable), collected in ``overrides``."""
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help=f"override {what}")


def _command(commands: argparse._SubParsersAction, name: str,
             run: Callable[[argparse.Namespace], int], **texts: str) -> argparse.ArgumentParser:
    """Subcommand ``name`` (``help``, ``description``), whose arguments go to ``run``."""
    p = commands.add_parser(name, **texts)
    p.set_defaults(run=run)
    return p


def _error(command: str, message: object) -> int:
    """Report a failed ``batchscale COMMAND`` on stderr; its exit status."""
    print(f"batchscale {command}: error: {message}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchscale",
        description="Batch-softmax contrastive training of sentence encoders at any batch size.",
    )
    parser.add_argument("--version", action="version", version=f"batchscale {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_eval(commands)
    _add_train(commands)
    _add_sweep(commands)
    _add_merge(commands)
    _add_report(commands)
    _add_ship(commands)
    return parser


def _setup_output(no_progress: bool) -> None:
    """Warnings to stderr; with ``--no-progress`` also silence Hugging Face's bars."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


# -- eval --------------------------------------------------------------------------------
def _add_eval(commands: argparse._SubParsersAction) -> None:
    p = _command(
        commands, "eval", _run_eval,
        help="evaluate an encoder on STS-B or a BEIR retrieval set",
        description="Evaluate an encoder: STS-B (Spearman / Pearson of cosine, x100) or BEIR "
                    "retrieval (nDCG@10, MAP@100, Recall@10/@100, MRR@10, x100).")
    p.add_argument("--model", default="default",
                   help="'default' (the packaged all-MiniLM-L6-v2) or a model directory")
    p.add_argument("--task", required=True, help="stsb | scifact | beir:PATH")
    p.add_argument("--split", default="test", help="data split (default: test)")
    p.add_argument("--json", metavar="OUT",
                   help="also write the results as a JSON object to OUT ('-': stdout only)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder holding stsbenchmark/ and scifact/ "
                        "(default: $BATCHSCALE_DATA or ../shared/data)")
    p.add_argument("--pooling", choices=("mean", "cls"), default=None,
                   help="override the model's pooling (default: the model's own, else mean)")
    p.add_argument("--batch-size", type=int, default=256, help="texts per batch (max)")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate texts to this many tokens (default: the model's limit)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype. auto (default): bfloat16 on a CPU with native bf16 "
                        "instructions (~1.8x faster; figures within 0.04 of float32), else "
                        "float32; float32: the exact published computation")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from .data import DataError
    from .encoders import EncoderLoadError, SentenceEncoder
    from .evaluation import run_task

    _setup_output(args.no_progress)
    try:
        encoder = SentenceEncoder.load(args.model, pooling=args.pooling, device=args.device,
                                       dtype=args.dtype)
        result = run_task(encoder, args.task, args.split, data_dir=args.data_dir,
                          batch_size=args.batch_size, max_length=args.max_length,
                          show_progress=not args.no_progress)
    except (DataError, EncoderLoadError, FileNotFoundError, ValueError) as e:
        return _error("eval", e)
    text = json.dumps(result, indent=2)
    if args.json == "-":
        print(text)
        return 0
    print(_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


# -- train -------------------------------------------------------------------------------
def _add_train(commands: argparse._SubParsersAction) -> None:
    p = _command(
        commands, "train", _run_train,
        help="fine-tune an encoder from a YAML config",
        description="Fine-tune an encoder with a contrastive loss, evaluating on dev every "
                    "eval.every_examples examples; the model selected on dev goes to "
                    "OUT/final and is evaluated once on test.")
    p.add_argument("config", type=Path, help="YAML config (see configs/)")
    _add_overrides(p, "a config value, e.g. optim.lr=3e-5 (repeatable; the value is read "
                      "as YAML)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others (at each "
                        "collective, and while rank 0 evaluates) before it fails")


def rank_overrides(info: DistributedInfo) -> list[str]:
    """The config values each rank sets for itself: under NCCL its own GPU (``cuda:LOCAL_RANK``).
    A resume does not compare them (:data:`~batchscale.training.config.PER_RANK_KEYS`), so
    that ranks with different devices resume the run that rank 0 wrote."""
    return [f"train.device={info.device}"] if info.backend == "nccl" else []


def _run_train(args: argparse.Namespace) -> int:
    from .batching.distributed import end_rank_process

    code, ranks = _train(args)
    if ranks > 1:  # a torchrun rank: its process ends here (see end_rank_process)
        end_rank_process(code)
    return code


def _train(args: argparse.Namespace) -> tuple[int, int]:
    """The train command: its exit code, and how many ranks ran it."""
    from .batching.distributed import (
        CollectiveError,
        init_distributed,
        rank,
        shutdown_distributed,
    )
    from .data import DataError
    from .encoders import EncoderLoadError
    from .study import summary_table, train_run
    from .training import ConfigError, RunDirectoryError, TrainingDiverged, load_config

    _setup_output(args.no_progress)
    ranks = 1
    try:
        # Under torchrun: join the process group (a no-op for one plain process).
        info = init_distributed(timeout_s=args.dist_timeout)
        ranks = info.world_size
        overrides = list(args.overrides) + rank_overrides(info)
        config = load_config(args.config, overrides)
        result = train_run(config, args.out, resume=args.resume,
                           show_progress=not args.no_progress)
    except (ConfigError, DataError, EncoderLoadError, RunDirectoryError, TrainingDiverged,
            CollectiveError, FileNotFoundError, ValueError) as e:
        where = f" (rank {rank()})" if ranks > 1 else ""
        return _error(f"train{where}", e), ranks
    finally:
        shutdown_distributed()
    if info.is_main:
        print(summary_table(result))
    return 0, ranks


# -- sweep, merge, report ------------------------------------------------------------------
def _add_sweep(commands: argparse._SubParsersAction) -> None:
    p = _command(
        commands, "sweep", _run_sweep,
        help="run a grid of training runs into a results store",
        description="Run every cell of a sweep config (batch sizes x losses x seeds x lr "
                    "rules at a fixed budget) and record each finished run in an SQLite "
                    "store. Rerunning the command skips finished runs and restarts (or "
                    "resumes) the interrupted one.")
    p.add_argument("config", type=Path, help="sweep YAML (see configs/study-*.yaml)")
    p.add_argument("--store", type=Path, default=None,
                   help="results store (default: runs/NAME/study.sqlite, or "
                        "runs/NAME/study-shard-I-of-N.sqlite with --shard)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only shard I of N (0-based): cells whose grid index is I mod N "
                        "or, under lr_tuning: first_seed, whole settings (balanced by "
                        "estimated cost), so that each shard's store holds its lr choices")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the runs in progress (default: beside the store)")
    _add_overrides(p, "a sweep value, e.g. budget.examples=2000 or "
                      "base.data.data_dir=/data (repeatable)")
    p.add_argument("--keep-runs", action="store_true",
                   help="keep each run's directory (selected model, checkpoints)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's). 1 is much faster on a small "
                        "machine shared with other jobs")
    p.add_argument("--progress", action="store_true", help="progress bars per run")
    p.add_argument("--reuse", action="append", default=[], metavar="STORE",
                   help="take the finished runs of STORE (any grid: an earlier one, a pilot) "
                        "whose resolved config is one of this sweep's cells instead of running "
                        "them again (repeatable)")
    p.add_argument("--plan", action="store_true",
                   help="print what a run of this command would still run, in order, with "
                        "each run's wall-clock estimated from the store's finished runs, and "
                        "exit (nothing is run or written)")


def _run_sweep(args: argparse.Namespace) -> int:
    from .data import DataError
    from .encoders import EncoderLoadError
    from .study.grid import load_sweep, parse_shard
    from .study.store import StoreError
    from .study.sweep import plan_sweep, plan_text, run_sweep
    from .training import ConfigError, RunDirectoryError, TrainingDiverged

    _setup_output(not args.progress)
    if args.threads is not None and args.threads < 1:
        return _error("sweep", "--threads must be >= 1")
    try:
        sweep = load_sweep(args.config, args.overrides)
        shard = parse_shard(args.shard) if args.shard else None
        store = args.store
        if store is None:
            name = "study.sqlite" if shard is None else \
                f"study-shard-{shard[0]}-of-{shard[1]}.sqlite"
            store = Path("runs") / sweep.config.name / name
        if args.plan:
            print(plan_text(plan_sweep(sweep, store, shard), sweep.config.name, shard, store))
            return 0
        summary = run_sweep(sweep, store, work_dir=args.work, shard=shard,
                            show_progress=args.progress, keep_runs=args.keep_runs,
                            threads=args.threads, reuse=args.reuse)
    except (ConfigError, DataError, EncoderLoadError, RunDirectoryError, StoreError,
            TrainingDiverged, FileNotFoundError, ValueError) as e:
        return _error("sweep", e)
    failed = f", {summary.failed} diverged (recorded; a rerun retries them)" \
        if summary.failed else ""
    untuned = f", {summary.not_tuned} not run (another lr won their setting on the first " \
        "seed, or its choice is still open)" if summary.not_tuned else ""
    elsewhere = f", {summary.elsewhere} run by another process sharing the store" \
        if summary.elsewhere else ""
    print(f"{summary.ran} runs done, {summary.skipped} were done before{failed}{untuned}"
          f"{elsewhere}; store: {summary.store}")
    return 0


def _add_merge(commands: argparse._SubParsersAction) -> None:
    p = _command(
        commands, "merge", _run_merge,
        help="combine the stores of several shards",
        description="Combine results stores of the same sweep (e.g. its shards) into OUT; "
                    "stores of different sweeps (another grid) are refused.")
    p.add_argument("out", type=Path, help="the merged store (created, or of the same sweep)")
    p.add_argument("inputs", type=Path, nargs="+", help="stores to merge")


def _run_merge(args: argparse.Namespace) -> int:
    from .study.store import StoreError, merge_stores

    if any(i.resolve() == args.out.resolve() for i in args.inputs):
        return _error("merge", "OUT is also an input")
    try:
        counts = merge_stores(args.out, list(args.inputs))
    except StoreError as e:
        return _error("merge", e)
    print(f"merged {counts['added']} runs into {args.out}"
          + (f" ({counts['skipped']} duplicates skipped)" if counts["skipped"] else ""))
    return 0


def _add_report(commands: argparse._SubParsersAction) -> None:
    p = _command(
        commands, "report", _run_report,
        help="write the study report (Markdown + self-contained HTML)",
        description="Curves, final quality with 95% CIs, convergence speed, throughput and "
                    "memory, the trend against log2(batch size) and paired differences, "
                    "from a results store. Prints the Markdown report's path last.")
    p.add_argument("store", type=Path, help="results store")
    p.add_argument("--out", type=Path, default=None,
                   help="report folder (default: STORE's stem + '-report' beside it)")
    p.add_argument("--answer", action="store_true",
                   help="write nothing; print the Answer as a Markdown blockquote for a "
                        "README, linking the report in --out (default: STORE's folder, "
                        "where `batchscale ship` puts the report beside the store)")


def _run_report(args: argparse.Namespace) -> int:
    from .study.report import answer_quote, compute, load_runs, write_report
    from .study.ship import shown
    from .study.store import StoreError

    try:
        if args.answer:
            data = compute(*load_runs(args.store))
            print(answer_quote(data, shown(args.out or args.store.parent)))
            return 0
        md, page = write_report(args.store, args.out)
    except StoreError as e:
        return _error("report", e)
    print(f"HTML report: {page}")
    print(md)
    return 0


def _add_ship(commands: argparse._SubParsersAction) -> None:
    p = _command(
        commands, "ship", _run_ship,
        help="write a study's results folder: report, store copy, provenance",
        description="Write results/<study>/: the report (as `batchscale report` writes it), "
                    "a copy of the store when it is under --max-store-mb (else a note "
                    "saying where it is), the resolved sweep config (sweep.yaml), "
                    "provenance.json and MANIFEST.md (the commands, the package versions, "
                    "the runs' hosts, the study's wall-clock, this machine). Prints the "
                    "Answer as a README blockquote last.")
    p.add_argument("store", type=Path, help="results store (a finished or merged sweep)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: results/<sweep name>)")
    p.add_argument("--sweep-command", dest="sweep_commands", action="append", default=[],
                   metavar="CMD", help="a command that filled the store, as run (repeatable, "
                                       "in order: e.g. each shard's sweep, then the merge)")
    p.add_argument("--max-store-mb", type=float, default=None, metavar="MB",
                   help="copy the store only up to this size (default: 20)")


def _run_ship(args: argparse.Namespace) -> int:
    from .study.ship import MAX_STORE_MB, quote, ship
    from .study.store import StoreError

    limit = MAX_STORE_MB if args.max_store_mb is None else args.max_store_mb
    if limit < 0:
        return _error("ship", "--max-store-mb must be >= 0")
    try:
        shipped = ship(args.store, args.out, sweep_commands=args.sweep_commands or None,
                       max_store_mb=limit)
    except (StoreError, OSError) as e:
        return _error("ship", e)
    print(f"results: {shipped.folder}")
    print(f"store: {shipped.store or 'not included (see STORE-NOT-INCLUDED.md)'}")
    print(f"manifest: {shipped.manifest}")
    print()
    print(quote(shipped.folder))
    return 0


def _table(result: dict[str, object]) -> str:
    rows = [(k, f"{v:.2f}" if isinstance(v, float) else str(v)) for k, v in result.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except BrokenPipeError:  # the reader went away (`... --plan | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
