"""`polyp-ssl train`: the seed's training command on an ingested root, plus trainer settings.

The flags are built from the fields of the config's parts (polyp_ssl.config: type hints, help in
field metadata, flat names); settings resolve as defaults < --config YAML < flags (and, with
--resume, the run's own config.yaml for what is not given). `train` is wiring: the run folder
(polyp_ssl.run_folder.RunFolder.segment) owns the lock, what --resume continues, the cleanup of a
failed start and the failure notes; `_fit` builds data, model and trainer inside it.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import logging
import os
import signal
import sys
import typing
from pathlib import Path
from typing import Any

from polyp_ssl.config import (
    FLAT_ORDER,
    SETTING_FIELDS,
    SETTING_PART,
    SETTING_TYPES,
    TrainConfig,
    apply_reference_settings,
    check_config_file,
    setting_help,
    type_parts,
)
from polyp_ssl.config_parts import RunSettings
from polyp_ssl.reference_flags import TRAIN_FLAGS, add_flag, flag_help
from polyp_ssl.run_folder import RunFolder, check_run_folder, skip_summary_path, write_skip_summary
from polyp_ssl.shards.cli_help import DefaultsHelpFormatter
from polyp_ssl.shards.cli_parser import FlagParser
from polyp_ssl.shards.textio import TextInputError, load_yaml

log = logging.getLogger(__name__)


def _add_setting(p: argparse.ArgumentParser, name: str, default: object) -> None:
    """The flag of the setting `name`, from its field: type (the real type hint), help, aliases."""
    meta = SETTING_FIELDS[name].metadata
    help_ = setting_help(name) + f" (default: {default})"
    base, _ = type_parts(SETTING_TYPES[name])
    flags = [f"--{name}", *meta.get("aliases", ())]
    if base is bool:
        p.add_argument(*flags, action="store_true", help=help_)
    elif typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        p.add_argument(*flags, type=item, nargs="+", metavar=meta.get("metavar"), help=help_)
    else:
        p.add_argument(*flags, type=base, help=help_)


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        formatter_class=DefaultsHelpFormatter,
        prog="polyp-ssl train",
        description="Streaming contrastive training (NT-SSL) on an ingested root. Takes the reference "
        "code's training flags with the same names and meaning. Settings: defaults < --config YAML < flags.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="YAML file of settings (keys = flag names without --); flags override it")
    p.add_argument("--debug", action="store_true", help="on an error, also show the traceback")
    defaults = TrainConfig().to_dict()
    for name in FLAT_ORDER:
        _add_setting(p, name, defaults[name])
    g = p.add_argument_group("other flags of the reference training command (see docs/training.md)")
    for ref in TRAIN_FLAGS.values():
        if ref.name not in SETTING_PART:
            add_flag(g, ref, flag_help(ref))
    return p


def _read_config_file(config_file: str) -> dict[str, Any]:
    """The settings of a --config YAML, checked (`polyp_ssl.config.check_config_file`)."""
    try:  # a FIFO refused by name; size, nesting, aliases and python tags bounded/refused
        loaded = load_yaml(config_file, "config file") or {}
    except TextInputError as exc:  # names the file and the line
        raise ValueError(f"--config {exc}") from None
    except OSError as exc:
        raise ValueError(f"--config {config_file}: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {config_file}: expected a mapping of settings")
    return check_config_file(loaded, str(config_file))


def resolve_config(argv: list[str]) -> TrainConfig:
    """Defaults, then the YAML of --config, then the flags given; with --resume, the settings not
    given come from the run's config.yaml, not the defaults."""
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config", None)
    values: dict[str, Any] = _read_config_file(config_file) if config_file else {}
    values.update(args)
    values = apply_reference_settings(values)
    exp_source = (
        "--exp_name" if "exp_name" in args or not config_file else f"--config {config_file}: exp_name"
    )
    saved, run = None, None
    if values.get("resume"):
        runs_dir = values.get("runs_dir", RunSettings.runs_dir)
        run = RunFolder(runs_dir, values.get("exp_name", RunSettings.exp_name), exp_source)
        saved = run.saved_settings()
        if saved is not None:
            values = {**saved, **values}
    if saved is not None and "storage_options" not in args and _has_redacted(saved.get("storage_options")):
        raise ValueError(
            "--resume: the run's --storage_options held values that its config.yaml does not keep "
            "(shown as ***): pass --storage_options again"
        )
    cfg = TrainConfig.from_dict(values)
    check_run_folder(cfg.run.runs_dir, cfg.run.exp_name, exp_source)
    if not cfg.data.dataset_root:
        raise ValueError("--dataset_root is required")
    cfg.validate()
    from polyp_ssl.shards.remote import parse_storage_options, remote_root, use_storage_options

    use_storage_options(parse_storage_options(cfg.data.storage_options))  # the catalog's reads too
    if run is not None and saved is not None:
        run.check_resume_settings(TrainConfig.from_dict(saved), cfg)  # before anything is written
    from polyp_ssl.checkpoint import check_model_config  # imports torch: not for --help
    from polyp_ssl.transforms import check_crop_scale

    # the allow-listed backbones and the size estimate of every model config (CheckpointError: exit 2)
    settings = f"--config {config_file} with the flags" if config_file else "the flags"
    check_model_config(cfg.to_dict(), settings)
    if remote_root(cfg.data.dataset_root) is None:  # a remote root: checked in `train`, once it is read
        check_crop_scale(cfg.stream.bbox_scale_factor, cfg.data.dataset_root)
    return cfg


def _has_redacted(text: Any) -> bool:
    from polyp_ssl.shards.remote import REDACTED

    return isinstance(text, str) and REDACTED in text


def check_remote_crop_scale(bbox_scale_factor: float, root: str, manifest: dict[str, Any]) -> None:
    """transforms.check_crop_scale for a remote root, from its manifest as read."""
    params = manifest.get("parameters") if isinstance(manifest.get("parameters"), dict) else {}
    crop_scale = params.get("crop_scale")
    if isinstance(crop_scale, int | float) and bbox_scale_factor > crop_scale + 1e-9:
        raise ValueError(
            f"--bbox_scale_factor {bbox_scale_factor:g} is larger than the crop scale {crop_scale:g} that "
            f"{root} was ingested with (catalog/manifest.json: parameters.crop_scale): pass "
            f"--bbox_scale_factor <= {crop_scale:g} or re-ingest with --crop-scale {bbox_scale_factor:g}"
        )


def single_log_output() -> None:
    """Each log line once. Lightning adds its own console handler to the `lightning` logger (and to
    `lightning.pytorch` / `lightning.fabric` when the root logger has none) while still propagating to
    the root logger, so with our root handler every Lightning INFO line was printed twice. When the
    root logger has a handler, Lightning's loggers that propagate lose their own handlers."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        if lg.propagate:
            for handler in list(lg.handlers):
                if type(handler) is logging.StreamHandler:
                    lg.removeHandler(handler)


# Messages that every run printed and that say nothing about it: warnings about what this stack
# does on purpose, and advertisements. Filtered here, for every train process (DDP ranks included).
KNOWN_HARMLESS_WARNINGS = (
    # the streaming dataset's __len__ is its batches per rank; each worker takes its own share
    r"Your `IterableDataset` has `__len__` defined",
    # a resumed run's checkpoint folder holds its checkpoints: last.ckpt is managed here
    r"Checkpoint directory .* exists and is not empty",
    # validation embeds a few whole tracklets in the main process, on purpose
    r"The 'val_dataloader' does not have many workers",
    # Lightning's own pytree helper on a newer torch: nothing a user can change
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
KNOWN_HARMLESS_LOG_PREFIXES = ("\N{ELECTRIC LIGHT BULB} Tip:",)  # Lightning's product advertisements


class _DropKnownHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(KNOWN_HARMLESS_LOG_PREFIXES)


def quiet_known_messages() -> None:
    """Filter the known harmless warnings and log lines of Lightning and torch (the one place)."""
    import warnings

    for pattern in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownHarmless) for f in logger.filters):
            logger.addFilter(_DropKnownHarmless())


def _is_rank_zero() -> bool:
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _val_batches(limit: float) -> int | float | None:
    """Lightning's limit_val_batches: a count above 1, a fraction up to 1; None for all of them
    (Lightning's default, without its "configured so 100% of the batches will be used" line)."""
    if limit > 1:
        return int(limit)
    return None if limit == 1.0 else limit


def _devices(text: str) -> Any:
    if text == "auto":
        return "auto"
    if "," in text:
        return [int(x) for x in text.split(",") if x]
    return int(text)


def _logger(cfg: TrainConfig, run_dir: Path) -> Any:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    if cfg.run.logger == "csv":
        # written as logged (not every 100 steps): an interrupted segment keeps its metrics
        return CSVLogger(save_dir=str(run_dir), name="logs", flush_logs_every_n_steps=1)
    if cfg.run.logger == "tensorboard":
        if (
            importlib.util.find_spec("tensorboard") is None
            and importlib.util.find_spec("tensorboardX") is None
        ):
            raise ValueError(
                "--logger tensorboard needs the tensorboard package: pip install 'polyp-ssl[tensorboard]'"
            )
        return TensorBoardLogger(save_dir=str(run_dir), name="logs")
    if importlib.util.find_spec("wandb") is None:
        raise ValueError("--logger wandb needs the wandb package (pip install wandb) and an account")
    return WandbLogger(
        project=cfg.run.wandb_project or "polyp-ssl",
        name=cfg.run.exp_name,
        id=cfg.run.exp_id,
        save_dir=str(run_dir),
    )


def last_checkpoint_callbacks(ckpt_dir: Path, every_n_steps: int) -> list[Any]:
    """ModelCheckpoints writing ``last.ckpt`` at every epoch end and, with `every_n_steps`, every N
    training steps (Lightning allows one trigger per callback, hence two callbacks on one file).

    ``save_last=True`` with ``save_top_k=0`` would write ``last.ckpt`` only when training ends (in
    Lightning 2.6 "last" follows a top-k save, and there is none); a top-1 save without a monitor
    named "last" is what keeps the newest checkpoint under that name."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    common: dict[str, Any] = {
        "dirpath": str(ckpt_dir),
        "filename": "last",
        "monitor": None,
        "save_top_k": 1,
        "save_last": False,
        "auto_insert_metric_name": False,
        "enable_version_counter": False,
        "save_on_train_epoch_end": True,
    }
    out = [ModelCheckpoint(every_n_epochs=1, **common)]
    if every_n_steps:
        out.append(ModelCheckpoint(every_n_train_steps=every_n_steps, **common))
    return out


def train(cfg: TrainConfig) -> Path:
    """Run training; returns the checkpoint folder. Rank 0 holds the run folder's lock throughout
    (a second train on the folder is refused, naming the holder). A run that fails before training
    starts removes the run folder it created (`RunFolder.segment`)."""
    from polyp_ssl.shards.remote import remote_root
    from polyp_ssl.shards.tables import CatalogError, read_manifest

    url = remote_root(cfg.data.dataset_root)
    try:
        manifest = read_manifest(url or Path(cfg.data.dataset_root))
    except CatalogError as exc:
        raise ValueError(str(exc)) from exc
    if url is not None:
        check_remote_crop_scale(cfg.stream.bbox_scale_factor, url, manifest)
    rank_zero = _is_rank_zero()
    if rank_zero:
        from polyp_ssl.memory import check_before_training

        # before anything is built or written: our message, not the kernel's OOM killer or a CUDA error
        check_before_training(cfg, skip_memory=cfg.trainer.skip_memory_check)
    from polyp_ssl.callbacks import TrainingStarted

    run = RunFolder(cfg.run.runs_dir, cfg.run.exp_name)
    started = TrainingStarted()
    with run.segment(cfg.run.resume, rank_zero, lambda: started.started) as plan:
        _fit(run, cfg, plan.checkpoint, started)
    return run.ckpt_dir


def _monitor(setting: str, has_val_identities: bool) -> str | None:
    """The metric choosing best.ckpt (--monitor; auto: val/map when validation knows identities)."""
    if setting == "auto":
        return "val/map" if has_val_identities else None
    return None if setting == "none" else setting


def _fit(run: RunFolder, cfg: TrainConfig, resume_from: Path | None, started: Any) -> None:
    """Build the data, the model and the trainer of `cfg` and fit, in the run folder `run`
    (continuing the checkpoint `resume_from`); writes the run's config.yaml and skip summary."""
    import lightning as L

    from polyp_ssl.ckpt_io import AtomicCheckpointIO
    from polyp_ssl.datamodule import StreamDataModule
    from polyp_ssl.module import NTSSLModule
    from polyp_ssl.run_folder import check_checkpoint_fits

    L.seed_everything(cfg.stream.seed, workers=True, verbose=False)
    dm = StreamDataModule(cfg)
    monitor = _monitor(cfg.trainer.monitor, dm.has_val_identities)
    logger = _logger(cfg, run.path)
    model = NTSSLModule(cfg)
    if resume_from is not None:
        check_checkpoint_fits(resume_from, model)  # one line naming the key, before any write
    if _is_rank_zero():
        run.write_config(cfg, monitor)
    t = cfg.trainer
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=_devices(t.devices),
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        max_epochs=cfg.stream.max_epochs,
        max_steps=t.max_steps,
        deterministic=t.deterministic or None,
        callbacks=_callbacks(run, dm, monitor, started, t.ckpt_every_n_steps),
        logger=logger,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(run.path),
        log_every_n_steps=t.log_every_n_steps,
        limit_val_batches=_val_batches(t.limit_val_batches),
        check_val_every_n_epoch=t.val_every_n_epochs,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )
    ckpt_path = str(resume_from) if resume_from else None
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    write_skip_summary(run.ckpt_dir, trainer.global_rank, cfg.stream.on_shard_error, dm.skip_counts())


def _callbacks(run: RunFolder, dm: Any, monitor: str | None, started: Any, every_n_steps: int) -> list[Any]:
    """The callbacks of a training segment: epoch numbering of the streams, the initial checkpoint,
    RNG state, log flushing, the start marker, best.ckpt (with a monitor) and last.ckpt."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from polyp_ssl.callbacks import INIT_CKPT, FlushLogs, InitialCheckpoint, RngStateCallback
    from polyp_ssl.datamodule import StreamEpochCallback, failure_hooks_from_env

    ckpt_dir = run.ckpt_dir
    callbacks: list[Any] = [
        StreamEpochCallback(dm, run.path),
        *failure_hooks_from_env(),
        InitialCheckpoint(ckpt_dir / INIT_CKPT),
        RngStateCallback(),
        FlushLogs(),
        started,
    ]
    if monitor:
        callbacks.append(
            ModelCheckpoint(
                dirpath=str(ckpt_dir),
                filename="best",
                monitor=monitor,
                mode="max",
                save_top_k=1,
                save_last=False,
                auto_insert_metric_name=False,
                enable_version_counter=False,
            )
        )
    callbacks.extend(last_checkpoint_callbacks(ckpt_dir, every_n_steps))
    return callbacks


def _last_line(exc: BaseException) -> str:
    """The message of an exception re-raised from a DataLoader worker (whose text carries the
    worker's traceback) without that traceback."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    name = type(exc).__name__ + ": "
    return last.split(name, 1)[1] if name in last else last


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM reached `polyp-ssl train`. A BaseException, so that no
    ``except Exception`` on the way swallows it; Lightning still runs its on_exception hooks."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_HANDLER_PID: list[int] = []  # the process that installed the handlers (forked workers inherit them)


def _raise_interrupted(signum: int, frame: Any) -> None:
    if _HANDLER_PID and os.getpid() != _HANDLER_PID[0]:
        # a forked DataLoader worker: behave as Python's defaults (torch ends a worker quietly on
        # KeyboardInterrupt; SIGTERM ends it)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise Interrupted(signum)


def _install_interrupt_handlers() -> dict[int, Any]:
    """SIGINT and SIGTERM raise `Interrupted` (from the main thread only; returns the old handlers)."""
    import threading

    old: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return old
    _HANDLER_PID[:] = [os.getpid()]
    for signum in (signal.SIGINT, signal.SIGTERM):
        old[signum] = signal.signal(signum, _raise_interrupted)
    return old


OS_ERROR_HINTS = {
    errno.ENOSPC: "disk full; the checkpoints written before are kept: free space and rerun with --resume",
    errno.EDQUOT: "disk quota exceeded; the checkpoints written before are kept: rerun with --resume",
    errno.EROFS: "the runs folder must be writable: choose another --runs_dir",
    errno.EACCES: "the runs folder must be writable: choose another --runs_dir",
    errno.EPERM: "the runs folder must be writable: choose another --runs_dir",
}


def os_error_line(exc: OSError) -> str:
    """One line naming the path and the cause of an I/O failure (disk full, read-only folder, ...)."""
    where = f"{exc.filename}: " if exc.filename else ""
    cause = exc.strerror or _last_line(exc)
    hint = OS_ERROR_HINTS.get(exc.errno or 0)
    return f"{where}{cause}" + (f" ({hint})" if hint else "")


def _kept_line(cfg: TrainConfig | None) -> str:
    """Which checkpoint a failed run leaves to continue from (its last.ckpt, never overwritten
    by the failure), for the end of its one error line."""
    from polyp_ssl.ckpt_io import LAST

    if cfg is None:
        return ""
    last = Path(cfg.run.runs_dir) / cfg.run.exp_name / "checkpoints" / LAST
    return f" ({last} is the last good checkpoint)" if last.is_file() else ""


def _interrupted_line(cfg: TrainConfig | None) -> str:
    from polyp_ssl.ckpt_io import LAST, previous_path

    if cfg is not None:
        last = Path(cfg.run.runs_dir) / cfg.run.exp_name / "checkpoints" / LAST
        if last.is_file() or previous_path(last).is_file():
            return "polyp-ssl train: interrupted; rerun with --resume"
    return "polyp-ssl train: interrupted before the first checkpoint; rerun the same command"


def main(argv: list[str] | None = None) -> int:
    """`polyp-ssl train`. Every failure ends with one line on stderr (no traceback unless --debug):
    exit 2 for a configuration or input refused before training, 1 for a failure while training
    (damaged data, disk full, read-only runs folder, another rank's failure), 130 for Ctrl-C/SIGTERM."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    # --help, and usage errors (an unknown flag: one line), before torch or Lightning is imported
    build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import time

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    single_log_output()
    quiet_known_messages()

    from polyp_ssl.datamodule import read_failure_notes
    from polyp_ssl.device_decode import FrameDecodeError
    from polyp_ssl.module import NonFiniteLossError
    from polyp_ssl.shards.remote import RemoteError
    from polyp_ssl.stream import DataConfigError, ShardError

    started = time.time()
    cfg: TrainConfig | None = None
    old_handlers = _install_interrupt_handlers()
    try:
        cfg = resolve_config(argv)
        ckpt_dir = train(cfg)
    except (ShardError, FrameDecodeError) as exc:
        print(
            f"polyp-ssl train: error: damaged data: {_last_line(exc)} "
            "(--on_shard_error warn skips such samples and counts them)",
            file=sys.stderr,
        )
        if debug:
            raise
        return 1
    except (ValueError, DataConfigError) as exc:
        print(f"polyp-ssl train: error: {exc}", file=sys.stderr)
        if debug:
            raise
        return 2
    except NonFiniteLossError as exc:
        print(f"polyp-ssl train: error: {exc}{_kept_line(cfg)}", file=sys.stderr)
        if debug:
            raise
        return 1
    except (Interrupted, KeyboardInterrupt, SIGTERMException):
        print(_interrupted_line(cfg), file=sys.stderr)
        if debug:
            raise
        return 130
    except RemoteError as exc:  # an object store: no credentials, no such bucket, no answer
        print(f"polyp-ssl train: error: {exc.strerror}", file=sys.stderr)
        if debug:
            raise
        return 2 if exc.bad_input else 1
    except OSError as exc:
        print(f"polyp-ssl train: error: {os_error_line(exc)}", file=sys.stderr)
        if debug:
            raise
        return 1
    except Exception as exc:
        # another rank's failure reaches this one as a broken collective; name the failure itself
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
        notes = read_failure_notes(Path(cfg.run.runs_dir) / cfg.run.exp_name, started, rank) if cfg else {}
        if notes:
            named = "; ".join(f"rank {r} failed: {note}" for r, note in sorted(notes.items()))
            print(f"polyp-ssl train: error: {named} (this rank {rank}: {_last_line(exc)})", file=sys.stderr)
        else:
            print(
                f"polyp-ssl train: error: {type(exc).__name__}: {_last_line(exc)} "
                "(--debug shows the traceback)",
                file=sys.stderr,
            )
        if debug:
            raise
        return 1
    finally:
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)
    if _is_rank_zero():
        found = sorted(p.name for p in ckpt_dir.glob("*.ckpt")) if ckpt_dir.exists() else []
        print(f"checkpoints in {ckpt_dir}: {', '.join(found) or 'none'}")
        summary = skip_summary_path(ckpt_dir, 0)
        if summary.exists():
            import json

            skipped = json.loads(summary.read_text())["skipped"]
            mode = cfg.stream.on_shard_error if cfg else "fail"
            print(f"damaged data skipped (rank 0, --on_shard_error {mode}): {skipped or 'none'}")
    return 0
