"""The `epd-ray` command line: parse, call one function per command, print where results went.

A mistake the user can fix (unknown preset or key, value out of range, missing folder, an output folder
that holds something else) is one line on stderr and exit code 2, with nothing written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml

from epd_ray.config import ConfigError, default_preset, load_config, preset_names
from epd_ray.data.sources import DataError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="EPD-Net face de-identification, trained and tuned with Ray.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare face data sets as Parquet shards.")
app.add_typer(data_app, name="data")

USER_ERRORS = (ConfigError, DataError, FileNotFoundError, NotADirectoryError)
INTERRUPTED = 130  # what a shell reports for a command stopped by Ctrl-C (128 + SIGINT)


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def stopped(message: str) -> None:
    """Ctrl-C: the command's one line on how to go on, and a shell's exit status for it."""
    typer.echo(message, err=True)
    raise typer.Exit(code=INTERRUPTED)


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--set {pair}: expected KEY=VALUE, for example train.steps=300")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def parse_pairs(option: str, text: str, form: str, example: str) -> dict[str, str]:
    """`A=B,C=D` as {A: B, C: D}; a malformed one fails naming the option, its form and an example."""
    pairs = [pair.partition("=") for pair in text.split(",") if pair.strip()]
    if not pairs or any(not sep or not key.strip() or not value.strip() for key, sep, value in pairs):
        fail(f"{option} {text}: expected {form}[,{form}...], for example {example}")
    return {key.strip(): value.strip() for key, _, value in pairs}


ConfigOption = Annotated[Optional[str], typer.Option(
    "--config", "-c", help=f"preset ({', '.join(preset_names())}) or YAML file; default quick, or faces when "
                           "--data holds real faces")]
OutputOption = Annotated[Optional[Path], typer.Option("--output", "-o", help="run folder; default runs/<name>-<time>")]
AddressOption = Annotated[Optional[str], typer.Option("--address",
                                                      help="join this Ray cluster ('auto' for the local one)")]
DataOption = Annotated[Optional[Path], typer.Option("--data", help="a folder made by `epd-ray data prepare`")]
SetOption = Annotated[list[str], typer.Option("--set", help="override a config key, e.g. --set train.steps=300")]
StrictOption = Annotated[bool, typer.Option(
    "--strict", help="stop after pretraining (exit 2, nothing kept) if a verifier or evaluator is not clearly above "
                     "chance or the warm start reconstructs poorly")]
TimeBudgetOption = Annotated[Optional[str], typer.Option(
    "--time-budget", metavar="DURATION", help="end in about this wall time (90s, 15m, 1h or seconds), pretraining, "
                                              "search and report included; sets search.time_budget_s")]
ResumeOption = Annotated[Optional[Path], typer.Option(
    "--resume", metavar="OUTPUT", help="continue the stopped run in this folder (its config and data)")]


@app.command()
def tune(config: ConfigOption = None, output: OutputOption = None, address: AddressOption = None,
         data: DataOption = None, set_: SetOption = [], resume: ResumeOption = None,
         strict: StrictOption = False, time_budget: TimeBudgetOption = None) -> None:
    """Search EPD-Net's loss weights with Ray Tune; save the best model and a report."""
    _experiment(config, output, address, data, set_, resume, strict, time_budget, search=True)


@app.command()
def train(config: ConfigOption = None, output: OutputOption = None, address: AddressOption = None,
          data: DataOption = None, set_: SetOption = [], resume: ResumeOption = None,
          strict: StrictOption = False, time_budget: TimeBudgetOption = None) -> None:
    """Train EPD-Net with one setting, no search: the config's loss.* weights and evaluation.mu (default the
    paper's; change them with --set loss.lambda2=0.5 --set evaluation.mu=0.2). Saves the best round's model
    and a report, as `tune` does."""
    _experiment(config, output, address, data, set_, resume, strict, time_budget, search=False)


def _preset_for(data: Optional[Path]) -> str:
    """With no --config: `quick`, or the real-faces preset when --data holds real faces (said in one line)."""
    from epd_ray.artifacts import MANIFEST
    from epd_ray.data.shards import read_manifest

    if data is None:
        return default_preset(None)
    if not (data / MANIFEST).is_file():
        raise FileNotFoundError(f"{data}: no prepared data set here ({MANIFEST} missing); "
                                "run `epd-ray data prepare --out DIR` first")
    source = read_manifest(data).get("source", "synthetic")
    preset = default_preset(source)
    if preset != default_preset(None):
        typer.echo(f"config: preset {preset!r} for real faces (source {source}); choose another with --config")
    return preset


def _experiment(config: Optional[str], output: Optional[Path], address: Optional[str], data: Optional[Path],
                set_: list[str], resume: Optional[Path], strict: bool, time_budget: Optional[str], *,
                search: bool) -> None:
    overrides = parse_overrides(set_)
    if resume is not None and (config or output or data or set_ or strict or time_budget):
        fail("--resume OUTPUT takes the run's own config and data: give only --address with it")
    if address:
        # Ray reads its auth mode when it is imported: joining a token-authenticated cluster (the default
        # since Ray 2.59) needs it set before that, not at ray.init.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        overrides["ray.address"] = address
    if time_budget is not None:
        overrides["search.time_budget_s"] = time_budget  # '15m' etc.: the config parses it
    from epd_ray.experiment import Interrupted, OutputError, default_output, resume_tune, run_tune
    from epd_ray.train.run import PretrainingError
    from epd_ray.tune.search import fixed_params

    try:
        if resume is not None:
            run = resume_tune(resume, address=address)
        else:
            exp = load_config(config or _preset_for(data), overrides)
            run = run_tune(exp, output or default_output(exp), prepared_dir=data,
                           fixed=None if search else fixed_params(exp), strict=strict)
    except (*USER_ERRORS, OutputError, PretrainingError) as exc:
        fail(str(exc))
    except Interrupted as exc:
        stopped(str(exc))
    typer.echo(f"done: best model in {run.best_dir}, report in {run.report_dir}")


@data_app.command("prepare")
def data_prepare(
    out: Path = typer.Option(..., "--out", help="folder to write the shards, dataset.json and rejects.csv to"),
    source: Optional[str] = typer.Option(None, "--source", help="synthetic | folder | manifest | rafd | fer2013"),
    path: Optional[Path] = typer.Option(None, "--path", help="the source's folder (folder, rafd) or file "
                                                             "(manifest CSV/Parquet, FER2013 CSV)"),
    size: Optional[int] = typer.Option(None, "--size", help="training image size, px (32, 64, 128, 256)"),
    strict: bool = typer.Option(False, "--strict", help="stop at the first rejected file, naming it"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="take the data section of this preset/file"),
    label_map: Optional[str] = typer.Option(None, "--label-map", help="the set's own emotion labels to class names, "
                                            "e.g. mad=angry,joy=happy (anger, happiness, surprise... are known)"),
    columns: Optional[str] = typer.Option(None, "--columns", help="a manifest's columns by role, where not one of "
                                          "their usual names, e.g. path=picture,emotion=mood (path, file, image...; "
                                          "identity, subject, person...; emotion, expression, label... are found)"),
    set_: list[str] = typer.Option([], "--set", help="override a data key, e.g. --set data.rafd_angles=[090,045]"),
) -> None:
    """Write Parquet shards, dataset.json (classes, splits, counts, content hash) and rejects.csv."""
    from epd_ray.data.prepare import prepare_dataset, summary_line

    overrides = parse_overrides(set_)
    for key, value in (("source", source), ("path", path and str(path)), ("image_size", size),
                       ("label_map", label_map and parse_pairs("--label-map", label_map, "LABEL=CLASS",
                                                               "mad=angry,joy=happy")),
                       ("manifest_columns", columns and parse_pairs("--columns", columns, "ROLE=COLUMN",
                                                                    "path=picture,emotion=mood"))):
        if value is not None:
            overrides[f"data.{key}"] = value
    try:
        exp = load_config(config, overrides)
        prepared = prepare_dataset(exp.data, out, strict=strict, echo=lambda line: typer.echo(line, err=True))
    except USER_ERRORS as exc:
        fail(str(exc))
    typer.echo(summary_line(prepared))


@app.command("pretrain")
def pretrain(
    config: Optional[str] = typer.Option(None, "--config", "-c", help="preset or YAML file; default quick, or faces "
                                         "when --data holds real faces"),
    data: Optional[Path] = typer.Option(None, "--data", help="a folder made by `epd-ray data prepare`; "
                                                             "default the config's data section"),
    emotion_data: Optional[Path] = typer.Option(None, "--emotion-data",
                                                help="a prepared emotion-labelled set (e.g. `data prepare --source "
                                                     "fer2013`) for the emotion networks: S, S_e, the pickers"),
    set_: list[str] = typer.Option([], "--set", help="override a config key, e.g. --set verifiers.steps=500"),
    judges_only: bool = typer.Option(False, "--judges-only", help="only V, S, V_e and S_e: the networks "
                                     "`epd-ray evaluate --pretrained` judges a model with on this set (its people)"),
    strict: StrictOption = False,
) -> None:
    """Pretrain V, S, the evaluators V_e, S_e and the warm start into the cache that `tune` reuses."""
    from epd_ray.config import JUDGES_ONLY
    from epd_ray.experiment import Interrupted, run_pretrain
    from epd_ray.train.run import PretrainingError

    overrides = {**(JUDGES_ONLY if judges_only else {}), **parse_overrides(set_)}
    if emotion_data is not None:
        overrides["verifiers.emotion_data"] = str(emotion_data)
    try:
        path = run_pretrain(load_config(config or _preset_for(data), overrides), prepared_dir=data, strict=strict,
                            echo=typer.echo)
    except (*USER_ERRORS, PretrainingError) as exc:
        fail(str(exc))
    except Interrupted as exc:
        stopped(str(exc))
    if judges_only:
        typer.echo(f"done: judges in {path} (`epd-ray evaluate --model MODEL --data {data or 'DATA'} "
                   f"--pretrained {path}` judges a model on these people)")
        return
    typer.echo(f"done: pretrained networks in {path} (`epd-ray tune` with the same settings reuses them"
               + (f"; add --set verifiers.emotion_data={emotion_data}" if emotion_data else "") + ")")


@app.command("export")
def export(
    source: Path = typer.Argument(..., metavar="RUN_DIR|CHECKPOINT",
                                  help="a run folder (uses RUN/best/), its best/ folder or a checkpoint file"),
    out: Path = typer.Option(..., "--out", help="new model folder to write (must not exist or be empty)"),
) -> None:
    """Write a self-contained model folder: generator weights (tensors only), config, model card, README."""
    from epd_ray.checkpoints import CheckpointError
    from epd_ray.deploy.export import CARD_FILE, DeployError, export_model
    from epd_ray.evaluate.verdicts import targets_line

    try:
        model_dir = export_model(source, out)
    except (*USER_ERRORS, CheckpointError, DeployError) as exc:
        fail(str(exc))
    typer.echo(f"exported generator to {model_dir} (use: epd-ray deidentify {model_dir} INPUT OUTPUT)")
    targets = targets_line(json.loads((model_dir / CARD_FILE).read_text()).get("targets"))
    if targets:  # whoever ships the model reads how it did on the test split
        typer.echo(f"its test evaluation: {targets}")


@app.command("deidentify")
def deidentify_command(
    model: Path = typer.Argument(..., metavar="MODEL_DIR", help="a model folder made by `epd-ray export`"),
    input_path: Path = typer.Argument(..., metavar="INPUT", help="an image, a folder (recursive) or a video"),
    output: Path = typer.Argument(..., metavar="OUTPUT", help="output file, or folder (relative names kept)"),
    aligned: bool = typer.Option(False, "--aligned", help="inputs are face crops: no detection, whole image replaced"),
    detector: str = typer.Option("centerface", "--detector", help="face detector: centerface | haar"),
    min_face: Optional[int] = typer.Option(None, "--min-face", help="smallest face side to detect, px "
                                           "(default 16 with centerface, 40 with haar)"),
    max_faces: int = typer.Option(20, "--max-faces", help="faces replaced per image/frame, largest first; "
                                  "the rest are blurred"),
    min_score: float = typer.Option(0.2, "--min-score", help="CenterFace confidence a face needs (0-1): lower "
                                    "finds more (and more false) faces"),
    detector_threshold: int = typer.Option(5, "--detector-threshold",
                                           help="Haar minNeighbors: higher = fewer (false) detections"),
    scale_factor: float = typer.Option(1.1, "--scale-factor", help="Haar pyramid step (> 1; smaller finds more)"),
    cascade: Optional[Path] = typer.Option(None, "--cascade", help="an OpenCV cascade XML instead of the bundled "
                                           "one (with --detector haar)"),
    margin: Optional[float] = typer.Option(None, "--margin", help="context around each detected face, fraction of "
                                           "its side; default: the context the model's training faces had "
                                           "(its generator.json), else 0"),
    on_no_face: str = typer.Option("blur", "--on-no-face", help="image with no face found: blur | copy | skip"),
    detect_every: int = typer.Option(1, "--detect-every", help="video: detect on every N-th frame, track faces "
                                     "in between"),
    track_hold: int = typer.Option(10, "--track-hold", help="video: frames a face the detector misses stays "
                                   "covered where its track moves"),
    crf: int = typer.Option(18, "--crf", help="video quality, 0-51 (H.264 constant rate factor; lower = better, "
                            "larger)"),
    batch_size: int = typer.Option(16, "--batch-size", help="faces per generator call"),
    device: str = typer.Option("auto", "--device", help="cpu | cuda | auto"),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 | auto"),
    seed: int = typer.Option(0, "--seed", help="seed of the noise z (per face and file)"),
    noise: bool = typer.Option(True, "--noise/--no-noise", help="keep the generator's dropout noise z "
                               "(--no-noise: one deterministic draw, even for a model of several)"),
    draws: Optional[int] = typer.Option(None, "--draws", help="draws of z per face, the one its expression "
                                        "readers read surest published; default the model's (its generator.json). "
                                        "Fewer are faster and keep fewer expressions"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar on stderr"),
) -> None:
    """De-identify the faces in an image, a folder of images and videos, or a video."""
    from epd_ray.checkpoints import CheckpointError
    from epd_ray.deploy.deidentify import DeidentifyOptions, deidentify
    from epd_ray.deploy.export import DeployError

    options = DeidentifyOptions(aligned=aligned, detector=detector, min_face=min_face, max_faces=max_faces,
                                min_score=min_score, detector_threshold=detector_threshold, scale_factor=scale_factor,
                                cascade=cascade, margin=margin, on_no_face=on_no_face, detect_every=detect_every,
                                track_hold=track_hold, crf=crf, batch_size=batch_size, device=device,
                                precision=precision, seed=seed, noise=noise, draws=draws,
                                progress=progress)
    try:
        summary = deidentify(model, input_path, output, options,
                             warn=lambda message: typer.echo(f"warning: {message}", err=True))
    except (*USER_ERRORS, CheckpointError, DeployError) as exc:
        fail(str(exc))
    for line in summary.lines():
        typer.echo(line)
    typer.echo(f"done: {summary.written} files written to {output}")


@app.command("evaluate")
def evaluate(
    model: Optional[Path] = typer.Option(None, "--model", metavar="RUN_DIR|CHECKPOINT",
                                         help="a run folder (uses RUN/best/), its best/ folder "
                                              "or a generator checkpoint"),
    baseline: list[str] = typer.Option([], "--baseline", help="evaluate this classical baseline instead of the model "
                                       "(identity | blur | pixelate | ksame; repeatable)"),
    data: Optional[Path] = typer.Option(None, "--data", help="prepared data set; default the run's (model card)"),
    pretrained: Optional[Path] = typer.Option(None, "--pretrained", help="pretrained networks file (verifiers and "
                                              "evaluators); default the run's"),
    split: str = typer.Option("test", "--split", help="train | val | test"),
    out: Path = typer.Option(..., "--out", help="folder for metrics.json, per_image.parquet and samples.npz"),
    mu: Optional[float] = typer.Option(None, "--mu", help="threshold mu; default the run's best mu"),
    blur_sigma: Optional[float] = typer.Option(None, "--blur-sigma", help="Gaussian blur std, px"),
    pixelate_blocks: Optional[int] = typer.Option(None, "--pixelate-blocks", help="pixelation grid side, blocks"),
    k: int = typer.Option(10, "--k", help="k of k-Same-Pixel (nearest train faces of other identities)"),
    judge: Optional[str] = typer.Option(None, "--judge", help="main judge: auto | evaluators | recogniser; default "
                                        "the run's (auto: the pretrained recogniser on real faces)"),
    probes: Optional[int] = typer.Option(None, "--probes", help="judge at most this many faces of the split, as "
                                         "many of every person (0: all); default the run's evaluation.test_probes"),
) -> None:
    """Measure a checkpoint or a classical baseline on a split with every judge: the objective J (zero for doing
    nothing), the pretrained recogniser, the parrot attack and the paper's figures, with a mu sweep."""
    from epd_ray.checkpoints import CheckpointError
    from epd_ray.evaluate.evaluate import EvaluationError, evaluate_command, judged_images, summary_lines

    try:
        evaluation, paths = evaluate_command(model, out, baselines=baseline, data=data, pretrained=pretrained,
                                             split=split, mu=mu, blur_sigma=blur_sigma,
                                             pixelate_blocks=pixelate_blocks, k=k, judge=judge, probes=probes,
                                             echo=typer.echo)
    except (*USER_ERRORS, CheckpointError, EvaluationError) as exc:
        fail(str(exc))
    m = evaluation.metrics
    typer.echo(f"{split} split, {judged_images(m)} images, every judge (mu = {m['mu']:.3f} for the paper's figures):")
    for line in summary_lines(m):
        typer.echo(line)
    typer.echo(f"done: {paths['metrics']}, {paths['per_image']}")


@app.command("ablate")
def ablate(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="an `epd-ray tune` run folder"),
    address: Optional[str] = typer.Option(None, "--address", help="join this Ray cluster ('auto' for the local one)"),
) -> None:
    """Retrain the tuned model, without SSIM (Phi = 0), without the emotion verifier (lambda3 = 0) and, when the
    run trained with it, without L_diversity, on the run's budget; evaluate them on the test split into
    RUN_DIR/ablation/."""
    if address:
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # before Ray is imported, as for `tune`
    from epd_ray.ablation import AblationError, run_ablation

    try:
        run = run_ablation(run_dir, address=address, echo=typer.echo)
    except (*USER_ERRORS, AblationError) as exc:
        fail(str(exc))
    typer.echo(f"done: {run.out / 'metrics.json'} in {run.wall_seconds:.0f} s; "
               f"`epd-ray report {run_dir}` adds the ablation table")


@app.command("report")
def report(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR",
                                   help="an `epd-ray tune` run folder or an `epd-ray evaluate` output"),
    show_originals: bool = typer.Option(False, "--show-originals",
                                        help="put the original faces in the sample grid "
                                             "(never on real data you protect)"),
) -> None:
    """Markdown report and figures in RUN_DIR/report/: CMC, SSIM, emotion MSE, mu sweep, trials, Pareto, samples."""
    from epd_ray.checkpoints import CheckpointError
    from epd_ray.evaluate.evaluate import EvaluationError
    from epd_ray.evaluate.report import build_report

    try:
        path = build_report(run_dir, show_originals=show_originals, echo=typer.echo)
    except (*USER_ERRORS, CheckpointError, EvaluationError) as exc:
        fail(str(exc))
    typer.echo(f"done: report in {path}")


def main() -> None:
    app()

