"""The ``dicom-node`` command line. This is the only place that configures logging."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from config.node import ConfigError, Destination, NodeConfig, load_node_config, parse_peer
from dicom_node import __version__
from dicom_node.audit import verify_chain
from dicom_node.store import Store, utc_iso

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, help="A DICOM node for automated contouring.")
config_app = typer.Typer(no_args_is_help=True, help="Check configuration files.")
app.add_typer(config_app, name="config")
audit_app = typer.Typer(invoke_without_command=True, help="Read the audit log (and verify its hash chain).")
app.add_typer(audit_app, name="audit")
rules_app = typer.Typer(no_args_is_help=True, help="Check routing rules and dry-run them on DICOM files.")
app.add_typer(rules_app, name="rules")
models_app = typer.Typer(no_args_is_help=True, help="Model packages used by the organs pipeline.")
app.add_typer(models_app, name="models")

log = logging.getLogger("dicom_node")

ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", envvar="DICOM_NODE_CONFIG",
                 help="Node config (YAML). Default: ./node.yaml if present, else the embedded defaults."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbose else logging.WARNING)
    # "skipped: maximum number of running instances" is how a busy sender looks; not worth a warning
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


def _load(config: Path | None) -> tuple[NodeConfig, str]:
    if config is None and Path("node.yaml").exists():
        config = Path("node.yaml")
    if config is None:
        return NodeConfig().resolve(Path.cwd()), "<embedded defaults>"
    try:
        return load_node_config(config), str(config)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None


def _peer(name: str, config: NodeConfig) -> Destination:
    if name in config.destinations:
        return config.destinations[name]
    peer = parse_peer(name)
    if peer is None:
        known = ", ".join(sorted(config.destinations)) or "none configured"
        typer.echo(f"unknown destination {name!r}: give a configured name ({known}) or AE@HOST:PORT", err=True)
        raise typer.Exit(2)
    return peer


@app.command()
def serve(config: ConfigOption = None,
          verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Run the node: receive, store, complete series, forward, audit. SIGHUP reloads the peers."""
    from dicom_node.runtime import Node

    _setup_logging(verbose)
    cfg, source = _load(config)
    node = Node(cfg, config_source=source)
    stop = threading.Event()

    def _reload(*_: Any) -> None:
        if config is None:
            return
        try:
            node.reload(load_node_config(config), str(config))
            log.info("configuration reloaded from %s", config)
        except ConfigError as exc:
            log.error("configuration reload refused, previous settings stay in force:\n%s", exc)
            node.store.record("config.rejected", "failed", actor="node", detail={"problems": exc.problems})
        node.reload_rules()

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, _reload)
    node.start()
    log.info("dicom-node %s serving as %s on port %d (storage %s)", __version__, cfg.node.ae_title, node.port,
             cfg.node.storage)
    try:
        stop.wait()
    finally:
        node.stop()


@config_app.command("check")
def config_check(file: Path) -> None:
    """Validate a node config; print every problem with its key path (exit 1 if any)."""
    try:
        cfg = load_node_config(file)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{file}: OK ({len(cfg.accept)} accepted AE(s), {len(cfg.destinations)} destination(s))")


def _fmt_time(epoch: float | None) -> str:
    return utc_iso(epoch)[:19].replace("T", " ") if epoch else "-"


@app.command()
def status(config: ConfigOption = None, json_output: JsonOption = False) -> None:
    """Series with their state and instance count; sends not yet delivered, with attempts and last error."""
    cfg, _ = _load(config)
    store = Store(cfg.node.database)
    data = store.status()
    if json_output:
        typer.echo(json.dumps(data, indent=1, default=str))
        return
    typer.echo(f"{'SERIES':<45} {'STATE':<11} {'N':>5}  {'FIRST (UTC)':<19}  {'LAST (UTC)':<19}  FROM")
    for s in data["series"]:
        typer.echo(f"{s['series_uid'][:45]:<45} {s['state']:<11} {s['instance_count']:>5}  "
                   f"{_fmt_time(s['first_received_at']):<19}  {_fmt_time(s['last_received_at']):<19}  "
                   f"{s['calling_ae'] or ''}")
    typer.echo(f"\nJOBS: {len(data['jobs'])}")
    for j in data["jobs"]:
        typer.echo(f"  #{j['id']:<6} {j['state']:<9} {j['rule'][:24]:<24} {j['pipeline']:<10} attempts={j['attempts']}"
                   f"  {(j['error'] or '').splitlines()[0][:80] if j['error'] else ''}")
    typer.echo(f"\nOUTBOX: {len(data['outbox'])} not delivered, {data['sent_total']} sent")
    for o in data["outbox"]:
        typer.echo(f"  #{o['id']:<6} {o['state']:<8} {o['destination']:<12} attempts={o['attempts']:<3} "
                   f"next={_fmt_time(o['next_attempt_at'])}  {o['last_error'] or ''}")


@audit_app.callback()
def audit(ctx: typer.Context, config: ConfigOption = None,
          since: Annotated[Optional[str], typer.Option(help="ISO time (UTC), e.g. 2026-11-01 or 2026-11-01T12:00")] = None,
          series: Annotated[Optional[str], typer.Option(help="Only this Series Instance UID.")] = None,
          event: Annotated[Optional[str], typer.Option(help="Event type, '*' wildcard (e.g. 'send.*').")] = None,
          limit: Annotated[Optional[int], typer.Option(help="Only the last N records.")] = None,
          json_output: JsonOption = False) -> None:
    """Print audit records, oldest first."""
    ctx.obj = config
    if ctx.invoked_subcommand is not None:
        return
    cfg, _ = _load(config)
    records = Store(cfg.node.database).audit_records(since=since, series_uid=series, event=event, limit=limit)
    if json_output:
        typer.echo(json.dumps(records, indent=1))
        return
    for r in records:
        subject = r["sop_instance_uid"] or r["series_uid"] or r["study_uid"] or ""
        typer.echo(f"{r['id']:>7} {r['ts']} {r['event']:<22} {r['outcome']:<8} {r['actor'] or '':<28} "
                   f"{subject} {r['detail'] or ''}")


@audit_app.command("verify")
def audit_verify(ctx: typer.Context) -> None:
    """Recompute the audit hash chain; exit 1 if any record was altered, removed or reordered."""
    cfg, _ = _load(ctx.obj)
    store = Store(cfg.node.database)
    count = 0
    records = []
    for record in store.audit_chain():
        count += 1
        records.append(record)
    problems = verify_chain(records)
    if problems:
        for p in problems[:50]:
            typer.echo(f"record {p.record_id}: {p.reason}", err=True)
        typer.echo(f"audit chain BROKEN: {len(problems)} problem(s) in {count} records", err=True)
        raise typer.Exit(1)
    typer.echo(f"audit chain OK: {count} records")


def _rules_for(config: Path | None, rules_file: Path | None):
    from dicom_node.runtime import load_checked_rules

    cfg, _ = _load(config)
    path = rules_file or cfg.rules
    if path is None:
        typer.echo("no rules file: give one, or set 'rules:' in the node config", err=True)
        raise typer.Exit(2)
    try:
        return cfg, path, load_checked_rules(path, cfg)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None


@rules_app.command("check")
def rules_check(rules_file: Annotated[Optional[Path], typer.Argument(help="Default: the config's rules.")] = None,
                config: ConfigOption = None) -> None:
    """Validate a rules file against the node config: schema, destinations, pipelines and parameters."""
    _, path, rules = _rules_for(config, rules_file)
    typer.echo(f"{path}: OK ({len(rules.rules)} rule(s): {', '.join(r.name for r in rules.rules)})")


@rules_app.command("test")
def rules_test(args: Annotated[list[Path], typer.Argument(help="[RULES_FILE] PATH: DICOM files or folders.")],
               config: ConfigOption = None,
               calling_ae: Annotated[str, typer.Option(help="Pretend the series came from this AE.")] = "TPS",
               has_structure_set: Annotated[bool, typer.Option(help="Pretend an RTSTRUCT is held.")] = False) -> None:
    """Dry run: for each series under PATH, which rules match, why the others don't, what would be done."""
    from dicom_node.dryrun import describe_series, scan_series

    rules_file = args[0] if len(args) == 2 else None
    cfg, path, rules = _rules_for(config, rules_file)
    for series in scan_series(args[-1]):
        for line in describe_series(series, rules, cfg, calling_ae=calling_ae,
                                    has_structure_set=has_structure_set):
            typer.echo(line)


@app.command()
def pipelines() -> None:
    """List the registered pipelines (built-ins and plug-ins)."""
    from pipeline.base import available_pipelines, load_pipeline

    for name in available_pipelines():
        p = load_pipeline(name)
        params = ", ".join(p.Params.model_fields) or "-"
        typer.echo(f"{name:<12} {p.version:<10} params: {params}")


@models_app.command("list")
def models_list(path: Annotated[Optional[list[Path]], typer.Option("--path", help="Also look in this folder.")] = None,
                verify: Annotated[bool, typer.Option(help="Check every weights file's SHA-256.")] = True,
                as_json: JsonOption = False) -> None:
    """List installed model packages (built-in zoo, $DICOM_NODE_MODEL_PATH, --path); exit 1 if one is broken."""
    from models.package import list_packages, load_package

    found = list_packages(path, verify=verify)
    rows = []
    for info in found:
        row: dict[str, Any] = {"name": info.name, "version": info.version, "path": str(info.path),
                               "structures": list(info.labels), "error": info.error}
        if info.error is None:
            metrics = load_package(info.path, verify=False).manifest.metrics
            row["validation_mean_dice"] = metrics.get("validation_mean_dice")
        rows.append(row)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
    else:
        for r in rows:
            if r["error"]:
                typer.echo(f"{r['name']:<12} BROKEN  {r['error']}")
                continue
            dice = r.get("validation_mean_dice")
            score = f"  validation Dice {dice:.3f}" if isinstance(dice, float) else ""
            typer.echo(f"{r['name']:<12} {r['version']:<8} {', '.join(r['structures'])}{score}\n{'':<12} {r['path']}")
        if not rows:
            typer.echo("no model packages found")
    raise typer.Exit(1 if any(r["error"] for r in rows) else 0)


@app.command()
def train(config: Annotated[Path, typer.Option("--config", "-c", help="Training config (YAML), see "
                                               "config/train.example.yaml.")],
          no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False) -> None:
    """Train an organ model from NPZ folders; resumes a stopped run; writes a model package."""
    from config.training import load_training_config
    from models.errors import ModelError
    from models.train import train as run_training

    _setup_logging(False)
    try:
        cfg = load_training_config(config)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    if no_progress:
        cfg = cfg.model_copy(update={"progress": False})
    try:
        result = run_training(cfg)
    except ModelError as exc:
        typer.echo(f"training failed: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"model package: {result.package.path}")
    if result.best_epoch >= 0 and result.best_dice >= 0:
        typer.echo(f"best epoch {result.best_epoch}: validation mean Dice {result.best_dice:.3f} (model grid)")


@app.command()
def finetune(config: Annotated[Path, typer.Option("--config", "-c", help="Fine-tuning config (YAML), see "
                                                  "config/finetune.example.yaml.")],
             engine: Annotated[Optional[str], typer.Option(help="Engine to fine-tune (default: the config's).")] = None,
             no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False) -> None:
    """Fine-tune a promptable engine (LiteMedSAM) on NPZ contours; caches crop encodings, resumes, writes a package."""
    from config.finetune import load_finetune_config
    from models.errors import ModelError
    from models.finetune import finetune as run_finetune

    _setup_logging(False)
    try:
        cfg = load_finetune_config(config)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    if engine is not None and engine != cfg.engine:
        typer.echo(f"--engine {engine!r}: only 'litemedsam' can be fine-tuned (config engine: {cfg.engine!r})",
                   err=True)
        raise typer.Exit(1)
    if no_progress:
        cfg = cfg.model_copy(update={"progress": False})
    try:
        result = run_finetune(cfg)
    except ModelError as exc:
        typer.echo(f"fine-tuning failed: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"model package: {result.package.path}")
    for label, row in (("zero-shot", result.zero_shot), (f"best (epoch {result.best_epoch})", result.best)):
        if row is not None:
            dice = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in row["mean"].items())
            typer.echo(f"{label}: validation mean Dice {dice}")
    for row in (result.package.manifest.metrics or {}).get("on_policy", []) if cfg.on_policy.rounds else []:
        typer.echo(f"on-policy round {row['round']}: held decode Dice {row['base_held_decode_dice']:.3f} -> "
                   f"{row['held_decode_dice']:.3f}, validation mean slice Dice "
                   f"{row['base_validation_mean_slice_dice']:.3f} -> {row['validation_mean_slice_dice']:.3f}")


@app.command()
def evaluate(model: Annotated[str, typer.Argument(help="Installed package name or a package folder.")],
             data: Annotated[list[Path], typer.Argument(help="NPZ files or folders of them.")],
             out: Annotated[Path, typer.Option("--out", "-o", help="Report folder.")] = Path("evaluation"),
             tta: Annotated[bool, typer.Option(help="Mirror test-time augmentation.")] = False,
             limit: Annotated[Optional[int], typer.Option(help="Only the first N cases.")] = None,
             device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto") -> None:
    """Per case and structure Dice, HD95 and surface Dice (2 mm); CSV, summary, box plot and overlays."""
    from models.errors import ModelError
    from models.evaluate import evaluate as run_evaluation, summary_markdown
    from models.organs import resolve_device
    from models.package import find_package, load_package

    try:
        package = load_package(model) if Path(model).is_dir() else find_package(model)
        summary = run_evaluation(package, data, out, tta=tta, device=resolve_device(device), limit=limit,
                                 progress=typer.echo)
    except ModelError as exc:
        typer.echo(f"evaluation failed: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(summary_markdown(summary))
    typer.echo(f"report: {out}")


def _labels(structures: list[str] | None):  # type: ignore[no-untyped-def]
    """--structure NAME or NAME=SOURCE1,SOURCE2 (other names of the same mask in the NPZ)."""
    from models.data import LabelSource
    from models.evaluate_propagation import HN_ORGANS

    if not structures:
        return HN_ORGANS
    out = []
    for item in structures:
        name, _, sources = item.partition("=")
        out.append(LabelSource(name.strip(), tuple(s.strip() for s in sources.split(",") if s.strip())))
    return tuple(out)


@app.command("evaluate-propagation")
def evaluate_propagation(
        data: Annotated[list[Path], typer.Argument(help="NPZ files or folders of them.")],
        engine: Annotated[str, typer.Option(help="Promptable engine by name.")] = "litemedsam",
        checkpoint: Annotated[Optional[list[str]], typer.Option(
            help="A fine-tuned model package (name or folder); repeat for several. Each is a column beside "
                 "the zero-shot one.")] = None,
        mode: Annotated[str, typer.Option(help="seed: propagate from the clinical contour on --seed-slices "
                                               "slices; truebox: every slice prompted with its true box; prior: "
                                               "register the case to a simulated follow-up and propagate from "
                                               "3 key slices, beside registration alone.")] = "seed",
        seed_slices: Annotated[int, typer.Option(help="Seed slices per structure: 1 (middle) or 3.")] = 1,
        slice_step: Annotated[Optional[int], typer.Option(
            help="Fronts decode every n-th slice and interpolate between (the propagate pipeline's slice_step; "
                 "default: its default).")] = None,
        long_slice_step: Annotated[Optional[int], typer.Option(
            help="The slice_step of long structures (the propagate pipeline's long_slice_step; default: its "
                 "default); 0: slice_step.")] = None,
        crop_reuse: Annotated[Optional[float], typer.Option(
            help="Share crops between structures within this size factor (the propagate pipeline's crop_reuse; "
                 "default: its default).")] = None,
        reach_fraction: Annotated[Optional[float], typer.Option(
            help="Fronts of structures a checkpoint learned go this fraction of their learned reach (the propagate "
                 "pipeline's reach_fraction; default: its default); 0: max_travel for every structure.")] = None,
        follow_anatomy: Annotated[Optional[float], typer.Option(
            help="Structures learned to reach at least this far shift prompt boxes by the image's motion between "
                 "slices (the propagate pipeline's follow_anatomy; default: its default); -1: none.")] = None,
        refine: Annotated[Optional[int], typer.Option(
            help="Structures whose seed fills its box badly (a mandible) decode each new slice again this many "
                 "times on its own mask's box (the propagate pipeline's refine; default: its default).")] = None,
        abut: Annotated[Optional[bool], typer.Option(
            help="Structures a checkpoint learned to end beside another end there (the propagate pipeline's "
                 "abut; default: its default).")] = None,
        learned_growth: Annotated[Optional[bool], typer.Option(
            help="Structures a checkpoint learned to grow more than max_growth from one slice to the next stop "
                 "only beyond that (the propagate pipeline's learned_growth; default: its default).")] = None,
        truebox: Annotated[bool, typer.Option(help="Add the zero-shot true-box-per-slice upper bound "
                                                    "column.")] = True,
        zero_shot: Annotated[bool, typer.Option(help="Run the engine's default weights too (off: only the "
                                                      "checkpoints, e.g. to add a column to a finished report).")] = True,
        structure: Annotated[Optional[list[str]], typer.Option(
            help="Structure NAME or NAME=NPZNAME,... (repeat); default: the seven OpenKBP organs.")] = None,
        limit: Annotated[Optional[int], typer.Option(help="Only the first N cases.")] = None,
        threads: Annotated[int, typer.Option(help="CPU threads for inference.")] = 2,
        out: Annotated[Path, typer.Option("--out", "-o", help="Report folder.")] = Path("evaluation-propagation"),
) -> None:
    """Seed-mode propagation (or true boxes) on NPZ cases: per case and structure Dice and HD95, zero-shot and
    fine-tuned side by side, with the true-box upper bound; CSV and summary table."""
    from models.errors import ModelError
    from models.evaluate_propagation import MODES, Run, comparison_markdown, evaluate_propagation as run_eval
    from models.prompting import load_engine
    from models.propagate import PropagationSettings
    from models.threads import set_thread_count

    if mode not in MODES:
        typer.echo(f"--mode must be one of {', '.join(sorted(MODES))}, got {mode!r}", err=True)
        raise typer.Exit(2)
    if seed_slices not in (1, 3):
        typer.echo(f"--seed-slices must be 1 or 3, got {seed_slices}", err=True)
        raise typer.Exit(2)
    chosen = {"slice_step": slice_step, "long_slice_step": long_slice_step, "crop_reuse": crop_reuse,
              "reach_fraction": reach_fraction, "follow_anatomy": follow_anatomy, "refine": refine,
              "abut": abut, "use_learned_growth": learned_growth}
    turned_off = {"long_slice_step": 0, "reach_fraction": 0, "follow_anatomy": -1}  # the value that means "none"
    try:  # an option not given keeps the pipeline's default
        settings = PropagationSettings(**{k: None if v == turned_off.get(k) else v
                                          for k, v in chosen.items() if v is not None})
    except ValueError as exc:
        typer.echo(f"propagation settings: {exc}", err=True)
        raise typer.Exit(2) from None
    _setup_logging(False)
    set_thread_count(threads)
    try:
        default = load_engine(engine)
        runs = [Run(f"zero-shot {mode}", default, mode)] if zero_shot else []
        runs += [Run(f"{Path(c).name} {mode}", load_engine(engine, c), mode) for c in checkpoint or []]
        if truebox and mode == "seed":  # prior mode scores a moved image: the case's true boxes do not apply
            runs.append(Run("zero-shot truebox", default, "truebox"))
        if not runs:
            typer.echo("nothing to run: --no-zero-shot needs a --checkpoint", err=True)
            raise typer.Exit(2)
        summaries = run_eval(runs, data, out, labels=_labels(structure), seed_count=seed_slices, limit=limit,
                             settings=settings, progress=typer.echo)
    except ModelError as exc:
        typer.echo(f"evaluation failed: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(comparison_markdown(summaries))
    typer.echo(f"report: {out}")


@app.command()
def send(paths: Annotated[list[Path], typer.Argument(help="Files or folders (recursive).")],
         to: Annotated[str, typer.Option("--to", help="Destination name or AE@HOST:PORT.")],
         config: ConfigOption = None) -> None:
    """Send DICOM files to a peer now (C-STORE); exit 1 if any file was not accepted."""
    from dicom_node.sender import collect_files, send_files

    cfg, _ = _load(config)
    files = collect_files(paths)
    if not files:
        typer.echo("no files found", err=True)
        raise typer.Exit(1)
    results = send_files(_peer(to, cfg), files, calling_ae=cfg.node.ae_title)
    failed = [r for r in results if not r.ok]
    for r in failed:
        code = f"0x{r.status:04X}" if r.status is not None else "not sent"
        typer.echo(f"FAILED {r.path}: {code} {r.error or ''}", err=True)
    typer.echo(f"sent {len(results) - len(failed)}/{len(results)} file(s) to {to}")
    raise typer.Exit(1 if failed else 0)


@app.command()
def echo(peer: Annotated[str, typer.Argument(help="Destination name or AE@HOST:PORT.")],
         config: ConfigOption = None) -> None:
    """Verify a peer with C-ECHO."""
    from dicom_node.sender import echo as c_echo

    cfg, _ = _load(config)
    destination = _peer(peer, cfg)
    result = c_echo(destination, calling_ae=cfg.node.ae_title)
    if result == 0:
        typer.echo(f"{destination}: echo OK")
        return
    typer.echo(f"{destination}: " + ("no association" if result is None else f"status 0x{result:04X}"), err=True)
    raise typer.Exit(1)


@app.command()
def retry(ids: Annotated[Optional[list[int]], typer.Argument(help="Outbox ids (see status).")] = None,
          series: Annotated[Optional[str], typer.Option(help="All failed sends of this series.")] = None,
          all_failed: Annotated[bool, typer.Option("--all-failed", help="Every failed send.")] = False,
          config: ConfigOption = None) -> None:
    """Requeue failed sends; a running node picks them up at its next poll."""
    if not ids and not series and not all_failed:
        typer.echo("give outbox ids, --series UID or --all-failed", err=True)
        raise typer.Exit(2)
    cfg, _ = _load(config)
    count = Store(cfg.node.database).requeue(ids or None, series_uid=series)
    typer.echo(f"requeued {count} send(s)")
    raise typer.Exit(0 if count else 1)


@app.command()
def demo(keep: Annotated[bool, typer.Option(help="Keep the node running afterwards (Ctrl-C to stop).")] = False,
         folder: Annotated[Path, typer.Option(help="Where the demo's SQLite and storage go.")] = Path("var/demo")) -> None:
    """Run the node on embedded defaults and push a real CT through it to a local 'TPS'."""
    from dicom_node.demo import run_demo

    _setup_logging(False)
    raise typer.Exit(run_demo(folder, keep=keep, echo=typer.echo))


# `convert` lives in its own module (offline training-data export); registered here like the other commands.
from dicom_node.convert_cli import convert as _convert  # noqa: E402

app.command("convert")(_convert)


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit(0)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
