"""The main job: the survey's comparison of every method and combination.

Trains (or reuses) the teacher, builds every entry of `METHODS` from it, saves
each as an orbax checkpoint under `<out>/<method>/`, measures top-1 on the test
split, bytes on disk, parameters, FLOPs, batch-1 latency and batch-256
throughput of all of them side by side in one process, and writes
`results.json`, `results.md` and `pareto.png`.

A method is one `Method` entry: a name, its family, the methods it starts
from, and a `build(context, sources) -> Model` function. Adding a method or a
combination is adding one entry.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import time
import typing
from typing import Any, Callable, Literal

import jax

from vitjax import data as data_lib
from vitjax import distill, evaluate, export, plots, recipes, train, tune, xla_cpu
from vitjax import model as model_lib
from vitjax import progress as progress_lib
from vitjax.model import Model
from vitjax.transforms import lowrank, prune, ptq, quantize, structured
from vitjax.tune import search


StudentTeacher = Literal["cnn", "vit", "cnn+vit"]
STUDENT_TEACHERS: tuple[str, ...] = typing.get_args(StudentTeacher)
StudentTargets = Literal["hard", "hard+soft"]
TARGETS: dict[str, distill.DistillConfig] = {
    "hard": distill.DistillConfig(ce=0.5, hard=0.5),
    "hard+soft": distill.DistillConfig(ce=0.5, hard=0.5, soft=0.5, temperature=4.0),
}
CNN_TEACHER = "cnn-teacher"
NO_TEACHER = "student (no teacher)"


@dataclasses.dataclass(frozen=True)
class Settings:
  """Budgets of one survey run.

  Attributes:
    preset: teacher preset ("tiny" on CPU; "s16"/"b16" on GPU/TPU).
    finetune_steps: steps of fine-tuning after pruning, low-rank and QAT.
    student_epochs: epochs of both student rows; None: the recipe's.
    teacher_epochs: the ViT teacher's epochs; None: the recipe's.
    calibration: images for static quantization and the PTQ recipes.
    student_teacher: who teaches the "student" row: "cnn" (the ResNet of
      `recipes.CNN_PRESETS`, DeiT's convnet teacher), "vit" (the survey's
      teacher) or "cnn+vit" (their ensemble); with `student_targets`, the
      validation winner of experiments/distill_teacher_smoothing.py: the CNN
      teacher trained without label smoothing, soft targets (2026-12-02,
      90.82% against 89.42% without a teacher, and 89.76% from the teacher
      trained with smoothing 0.1); experiments/distill_objective.py kept it
      against soft KL without the hard term (89.62%), soft at T=1 (90.18%),
      the teacher alone (88.88%) and the CNN + ViT ensemble (90.18%).
      Before it, experiments/distill_cnn_teacher.py
      (teachers with smoothing 0.1) had chosen cnn+vit with hard targets
      (2026-11-30: 89.94% against 89.16%). The teachers never saw the
      validation images. The "student (no teacher)" row trains the same
      student the same way on labels alone.
    student_targets: "hard" (DeiT hard distillation: ce 0.5 + hard 0.5) or
      "hard+soft" (the same plus soft KL 0.5 at T=4), chosen with
      `student_teacher`.
    cnn_epochs: the CNN teacher's epochs; None: the recipe's.
    ptq_w6a6, ptq_w4a4: the PTQ recipes (`vitjax.transforms.ptq`) of the W6A6
      and W4A4 rows: the teacher's validation winners in
      experiments/ptq_table.py (2026-12-01, on the teacher trained without the
      validation images).
    tune_seconds: the "tuned" row's time budget: no new policy is scored
      after it (the sensitivity table counts; the final build comes on top).
    tune_evaluations: policies the "tuned" row's search evaluates at most.
    train_images: train everything on the first this many training images
      (None: all of them).
    test_images: measure on the first this many test images (None: all).
    quick: a smoke run (few steps, small subsets, XLA's default compile
      options) that checks the plumbing.
  """

  preset: str = "tiny"
  finetune_steps: int = 100
  student_epochs: float | None = None
  teacher_epochs: float | None = None
  calibration: int = 512
  student_teacher: StudentTeacher = "cnn"
  student_targets: StudentTargets = "hard+soft"
  cnn_epochs: float | None = None
  ptq_w6a6: str = "repqvit+gptq"
  ptq_w4a4: str = "ptq4vit+gptq"
  tune_seconds: float = 120.0
  tune_evaluations: int = 48
  train_images: int | None = None
  test_images: int | None = None
  quick: bool = False

  def __post_init__(self) -> None:
    for name in ("train_images", "test_images"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"Settings.{name} must be None (all images) or >= 1, got {value}")
    if self.student_targets not in TARGETS:
      raise ValueError(f"Settings.student_targets={self.student_targets!r}; choose one of "
                       f"{tuple(TARGETS)}")
    if self.student_teacher not in STUDENT_TEACHERS:
      raise ValueError(f"Settings.student_teacher={self.student_teacher!r}; choose one of "
                       f"{STUDENT_TEACHERS}")

  @classmethod
  def quick_mode(cls, preset_name: str = "tiny") -> Settings:
    return cls(preset=preset_name, finetune_steps=4, student_epochs=0.5,
               teacher_epochs=1.0, cnn_epochs=0.5, calibration=64, tune_seconds=10.0,
               tune_evaluations=8, train_images=2048, test_images=500, quick=True)


@dataclasses.dataclass
class Context:
  """What the methods are built from."""

  teacher: Model
  dataset: data_lib.Dataset
  settings: Settings
  out: pathlib.Path
  progress: bool = True
  cnn_teacher: Model | None = None
  # A sentence per row whose figures need one beside the table.
  notes: dict[str, str] = dataclasses.field(default_factory=dict)

  def student_teacher(self) -> Any:
    """The teacher (a Model or an ensemble tuple) of the "student" row."""
    team = {"cnn": (self.cnn_teacher,), "vit": (self.teacher,),
            "cnn+vit": (self.cnn_teacher, self.teacher)}[self.settings.student_teacher]
    return team[0] if len(team) == 1 else team

  def student_setup(self) -> tuple[Any, data_lib.Split, Any]:
    """(student config, training images, TrainConfig) of both student rows;
    the training split only, validation held out."""
    name = recipes.STUDENT_PRESETS[self.settings.preset]
    config = recipes.student_config(name, self.teacher.config)
    images = recipes.student_images(name, self.dataset, hold_out_validation=True).take(
        slice(0, self.settings.train_images))
    tcfg = recipes.student_train_config(name, len(images), epochs=self.settings.student_epochs)
    return config, images, tcfg

  def finetune(self, model: Model, name: str, post_update: Any = None,
               learning_rate: float = 3e-4) -> Model:
    return recipes.finetune(model, self.dataset.train, self.settings.finetune_steps,
                            self.out / name / recipes.TRAIN_DIR, learning_rate=learning_rate,
                            post_update=post_update, name=name, progress=self.progress)


Build = Callable[[Context, dict[str, Model]], Model]


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the survey table."""

  name: str
  family: str
  build: Build
  sources: tuple[str, ...] = ()
  description: str = ""


def _student(ctx: Context, _: dict[str, Model]) -> Model:
  config, images, tcfg = ctx.student_setup()
  teacher = ctx.student_teacher()
  cache = distill.cached_teacher(teacher, images, tcfg,
                                 ctx.out / "student" / "teacher_cache.npz",
                                 progress=ctx.progress)
  return distill.fit_student(teacher, model_lib.init(config, 0), images, tcfg,
                             TARGETS[ctx.settings.student_targets], cache=cache,
                             workdir=ctx.out / "student" / recipes.TRAIN_DIR,
                             progress=ctx.progress)


def _student_without_teacher(ctx: Context, _: dict[str, Model]) -> Model:
  config, images, tcfg = ctx.student_setup()
  return train.fit(model_lib.init(config, 0), images, tcfg,
                   workdir=ctx.out / NO_TEACHER / recipes.TRAIN_DIR, progress=ctx.progress,
                   run_name="student without teacher", desc="no teacher")


def _ptq(ctx: Context, model: Model, recipe: str, bits: int,
         layernorm_inputs: bool = False) -> Model:
  calibration = ctx.dataset.calibration.take(slice(0, ctx.settings.calibration))
  return ptq.quantize_model(model, recipe, calibration, w_bits=bits, a_bits=bits,
                            layernorm_inputs=layernorm_inputs, progress=ctx.progress)


def _static_int8(ctx: Context, model: Model) -> Model:
  calib = ctx.dataset.calibration.take(slice(0, ctx.settings.calibration))
  return quantize.static_int8(calib, progress=ctx.progress)(model)


# QAT starts from converged weights, which a fine-tune at the pruning rate
# (3e-4) moves away from: on the tiny teacher, 100 such float steps alone cost
# 0.50 pt, at 3e-5 only 0.26 pt.
QAT_LEARNING_RATE = 3e-5


def _qat_int4(ctx: Context, src: dict[str, Model]) -> Model:
  wrapped = quantize.qat(4, act_bits=None)(src["teacher"])
  return quantize.convert_qat()(ctx.finetune(wrapped, "qat-int4",
                                             learning_rate=QAT_LEARNING_RATE))


def _structured(ctx: Context, src: dict[str, Model], name: str, source: str,
                head_keep: float, mlp_keep: float) -> Model:
  small = structured.heads_and_neurons(head_keep=head_keep, mlp_keep=mlp_keep)(src[source])
  return ctx.finetune(small, name, learning_rate=5e-4)


# The "tuned" row's search: a menu of the settings that pay on disk here
# (experiments/tune_tiny.py searches the full default menu).
TUNED_MENU = ("fp32", "w8", "w4", "2:4+w8", "50%+w4", "75%+w4")


def _tuned(ctx: Context, src: dict[str, Model]) -> Model:
  quick = ctx.settings.quick
  config = tune.TuneConfig(
      menu=TUNED_MENU, keeps=(0.5,), sensitivity_a_bits=(),
      eval_images=200 if quick else 2000, sensitivity_images=100 if quick else 500,
      calibration=min(ctx.settings.calibration, 256), hessian_probes=2 if quick else 8,
      time_budget_s=ctx.settings.tune_seconds,
      search=search.SearchConfig(population=4 if quick else 12,
                                 evaluations=ctx.settings.tune_evaluations))
  result = tune.tune(src["teacher"], ctx.dataset, tune.Budget(max_drop=1.0),
                     ctx.out / "tuned" / "search", config, replace_other=True,
                     progress=ctx.progress)
  if not result.feasible:
    ctx.notes["tuned"] = (
        f"no policy met the 1 pt validation budget within {ctx.settings.tune_seconds:g} s "
        f"({result.evaluations} evaluated); the row is the closest one "
        f"({result.chosen['drop']:.2f} pt validation drop)")
  return result.model


METHODS: list[Method] = [
    Method("dynamic-int8", "quantization",
           lambda ctx, src: quantize.dynamic_int8()(src["teacher"]), ("teacher",),
           "int8 weights, int8 activations scaled per token at run time (AQT)"),
    Method("static-int8", "quantization",
           lambda ctx, src: _static_int8(ctx, src["teacher"]), ("teacher",),
           "W8A8 PTQ, activation scales from 99.99th-percentile calibration"),
    Method("w8a8-all-sites", "quantization",
           lambda ctx, src: _ptq(ctx, src["teacher"], "minmax", 8, layernorm_inputs=True),
           ("teacher",), "W8A8 at every site: linear inputs, q.kT and probs.v as integer "
           "dots, LayerNorm inputs; minmax"),
    Method("w6a6", "quantization",
           lambda ctx, src: _ptq(ctx, src["teacher"], ctx.settings.ptq_w6a6, 6),
           ("teacher",), "W6A6 over every matmul (weights and both operands), recipe "
           "Settings.ptq_w6a6 (chosen on validation)"),
    Method("w4a4", "quantization",
           lambda ctx, src: _ptq(ctx, src["teacher"], ctx.settings.ptq_w4a4, 4),
           ("teacher",), "W4A4 over every matmul, recipe Settings.ptq_w4a4 (chosen on "
           "validation)"),
    Method("weight-int4", "quantization",
           lambda ctx, src: quantize.weight_only(4)(src["teacher"]), ("teacher",),
           "int4 weights (packed), float activations, no training"),
    Method("qat-int4", "quantization", _qat_int4, ("teacher",),
           "int4 weights fine-tuned through AQT fake quantization"),
    Method("lowrank-50%", "low-rank",
           lambda ctx, src: ctx.finetune(lowrank.svd(param_budget=0.5)(src["teacher"]),
                                         "lowrank-50%"), ("teacher",),
           "SVD keeping half the block parameters, fine-tuned"),
    Method("prune-50%", "pruning",
           lambda ctx, src: ctx.finetune(prune.magnitude(0.5, exclude=("embedding", "head"))(
               src["teacher"]), "prune-50%"), ("teacher",),
           "50% unstructured magnitude masks, fine-tuned"),
    Method("prune-2:4", "pruning",
           lambda ctx, src: ctx.finetune(prune.n_m(2, 4, exclude=("embedding", "head"))(
               src["teacher"]), "prune-2:4"), ("teacher",),
           "2:4 sparsity, fine-tuned"),
    Method("structured", "pruning",
           lambda ctx, src: _structured(ctx, src, "structured", "teacher", 0.75, 0.5),
           ("teacher",), "25% of heads and 50% of MLP neurons removed (L2), fine-tuned"),
    Method("student", "distillation", _student, (),
           "DeiT student (distillation token) from the cached logits of "
           "Settings.student_teacher with Settings.student_targets (the CNN teacher, "
           "hard + soft targets, chosen on validation)"),
    Method(NO_TEACHER, "distillation", _student_without_teacher, (),
           "the same student, steps, batches and augmentation, trained on labels alone"),
    Method("student+int8", "combination",
           lambda ctx, src: _static_int8(ctx, src["student"]), ("student",),
           "distilled student, static W8A8 PTQ"),
    Method("prune-50%+int8", "combination",
           lambda ctx, src: _static_int8(ctx, src["prune-50%"]), ("prune-50%",),
           "50% pruned, then static W8A8 PTQ"),
    Method("lowrank-50%+int8", "combination",
           lambda ctx, src: _static_int8(ctx, src["lowrank-50%"]), ("lowrank-50%",),
           "low-rank factors, then static W8A8 PTQ (int8 input to the first factor)"),
    Method("tuned", "auto-tuner", _tuned, ("teacher",),
           "vitjax tune: per-layer int8/int4/sparse+int4 and block keep ratios, "
           "smallest bytes within 1 pt validation drop (ILP-seeded NSGA-II, "
           "Settings.tune_seconds)"),
    Method("student+structured+int4", "combination",
           lambda ctx, src: quantize.weight_only(4)(
               _structured(ctx, src, "student+structured", "student", 0.5, 0.5)),
           ("student",), "student, half its heads and neurons removed, fine-tuned, int4"),
]


def _order(methods: list[Method]) -> list[Method]:
  """Methods sorted so every source is built before it is used."""
  done, ordered, pending = {"teacher"}, [], list(methods)
  while pending:
    ready = [m for m in pending if set(m.sources) <= done]
    if not ready:
      raise ValueError(f"methods with missing sources: {[m.name for m in pending]}")
    for m in ready:
      ordered.append(m)
      done.add(m.name)
      pending.remove(m)
  return ordered


def run(settings: Settings, out: str | pathlib.Path = "checkpoints/survey", *,
        dataset: data_lib.Dataset | None = None, methods: list[Method] | None = None,
        teacher_dir: str | pathlib.Path | None = None,
        cnn_teacher_dir: str | pathlib.Path | None = None, progress: bool = True
        ) -> dict[str, Any]:
  """Runs the survey; returns (and writes) the results.

  Args:
    settings: budgets (see `Settings`).
    out: where the teacher run, each method's checkpoint and the results go.
    dataset: defaults to Fashion-MNIST from local files.
    methods: defaults to `METHODS`.
    teacher_dir: a run directory holding a trained teacher (default
      `<out>/teacher`, trained there if absent).
    cnn_teacher_dir: the same for the CNN teacher (default `<out>/cnn-teacher`),
      trained when `settings.student_teacher` uses it.
  """
  out = pathlib.Path(out)
  methods = _order(methods if methods is not None else METHODS)
  dataset = dataset or data_lib.load("fashion_mnist")
  if settings.train_images is not None:
    dataset = dataclasses.replace(dataset,
                                  train=dataset.train.take(slice(0, settings.train_images)))
  test = dataset.test if settings.test_images is None else \
      dataset.test.take(slice(0, settings.test_images))
  started = time.perf_counter()
  stages = progress_lib.bar(len(methods) + 3, "survey", enabled=progress, position=0)

  stages.set_postfix_str("teacher")
  teacher_run = pathlib.Path(teacher_dir or out / "teacher")
  config = recipes.model_config(settings.preset, dataset)
  # No model of the survey sees the validation images (unlike the teacher and
  # student recipes' final fits): rows choose on them (the tuned row's drop
  # budget), and the distillation recipe was chosen so (distill_cnn_teacher).
  images = recipes.teacher_images(settings.preset, dataset, hold_out_validation=True).take(
      slice(0, settings.train_images))
  tcfg = recipes.teacher_train_config(settings.preset, len(images),
                                      epochs=settings.teacher_epochs)
  seconds: dict[str, float] = {}
  t = time.perf_counter()
  teacher = recipes.train_teacher(teacher_run, config, images, tcfg, progress=progress)
  seconds["teacher"] = time.perf_counter() - t
  stages.update(1)
  built: dict[str, Model] = {"teacher": teacher}
  references = {"teacher": teacher_run}
  cnn = None
  if "cnn" in settings.student_teacher:
    stages.set_postfix_str(CNN_TEACHER)
    references[CNN_TEACHER] = pathlib.Path(cnn_teacher_dir or out / CNN_TEACHER)
    t = time.perf_counter()
    cnn = built[CNN_TEACHER] = _cnn_teacher(settings, dataset, references[CNN_TEACHER],
                                            progress)
    seconds[CNN_TEACHER] = time.perf_counter() - t
  ctx = Context(teacher, dataset, settings, out, progress, cnn)
  for m in methods:
    stages.set_postfix_str(m.name)
    t = time.perf_counter()
    built[m.name] = m.build(ctx, {s: built[s] for s in m.sources})
    seconds[m.name] = time.perf_counter() - t
    stages.update(1)

  stages.set_postfix_str("measure")
  disk = {name: export.disk_bytes(run_dir / recipes.MODEL_DIR)
          for name, run_dir in references.items()}
  for name, model in built.items():
    if name not in references:
      disk[name] = export.save_model(model, out / name / recipes.MODEL_DIR, overwrite=True,
                                     metadata={"survey_method": name})
  # A quick run compiles with XLA's defaults: its figures are not meaningful,
  # and choosing options compiles every model twice more.
  reports = evaluate.compare(built, test, disk_bytes=disk, rounds=3 if settings.quick else 9,
                             choose_options=None if settings.quick else
                             evaluate.fastest_options)
  stages.update(1)
  stages.close()
  results = _results(settings, methods, reports, seconds, time.perf_counter() - started,
                     ctx.notes)
  write(results, out)
  return results


def _cnn_teacher(settings: Settings, dataset: data_lib.Dataset, run_dir: pathlib.Path,
                 progress: bool) -> Model:
  """The CNN teacher of the preset, trained (or reused) in `run_dir`."""
  name = recipes.cnn_preset(settings.preset)
  images = recipes.recipe_images(recipes.teacher_recipe(name), dataset).take(
      slice(0, settings.train_images))
  tcfg = recipes.teacher_train_config(name, len(images), epochs=settings.cnn_epochs)
  return recipes.train_teacher(run_dir, recipes.model_config(name, dataset), images, tcfg,
                               progress=progress)


def _results(settings: Settings, methods: list[Method], reports: dict[str, evaluate.Report],
             seconds: dict[str, float], total: float,
             notes: dict[str, str]) -> dict[str, Any]:
  ref = reports["teacher"]
  families = {m.name: m.family for m in methods}
  descriptions = {m.name: m.description for m in methods}
  rows = {}
  for name, r in reports.items():
    rows[name] = {
        "family": families.get(name, "reference"),
        "description": descriptions.get(name, "fp32 CNN teacher (ResNet)" if
                                        name == CNN_TEACHER else "fp32 teacher"),
        "accuracy": r.accuracy * 100, "accuracy_drop": (ref.accuracy - r.accuracy) * 100,
        "disk_bytes": r.disk_bytes, "size_ratio": r.disk_bytes / ref.disk_bytes,
        "raw_fp32_ratio": r.disk_bytes / (4 * ref.params),
        "params": r.params, "flops": r.flops, "latency_ms": r.latency_ms,
        "speedup": ref.latency_ms / r.latency_ms, "throughput": r.throughput,
        "throughput_ratio": r.throughput / ref.throughput,
        "speedup_spread": evaluate.ratio_spread(ref.latency_rounds_ms, r.latency_rounds_ms),
        "throughput_ratio_spread": evaluate.ratio_spread(r.throughput_rounds,
                                                         ref.throughput_rounds),
        "compile_options": r.options,
        "build_seconds": round(seconds.get(name, 0.0), 1)}
  return {
      "date": datetime.date.today().isoformat(),
      "machine": f"{xla_cpu.cpu_description()}, {jax.default_backend()} "
                 f"({jax.devices()[0].device_kind}), {len(jax.devices())} device(s)",
      "settings": dataclasses.asdict(settings),
      "total_seconds": round(total, 1),
      "rows": rows,
      "notes": notes,
  }


def markdown(results: dict[str, Any]) -> str:
  """The results as a Markdown table (ratios to the fp32 teacher)."""
  lines = [f"Survey run of {results['date']} on {results['machine']}, "
           f"{results['total_seconds'] / 60:.1f} min"
           + (" (QUICK smoke run: figures are not meaningful)" if results["settings"]["quick"]
              else ""), "",
           "| method | family | top-1 % | Δ pt | disk bytes | size vs fp32 checkpoint "
           "/ vs raw fp32 | params | MFLOPs "
           "| latency b=1 (speedup, min-max) | throughput b=256 (ratio, min-max) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, r in results["rows"].items():
    (s_lo, _, s_hi), (t_lo, _, t_hi) = r["speedup_spread"], r["throughput_ratio_spread"]
    lines.append(
        f"| {name} | {r['family']} | {r['accuracy']:.2f} | {-r['accuracy_drop']:+.2f} "
        f"| {r['disk_bytes']:,} | {r['size_ratio']:.3f}x / {r['raw_fp32_ratio']:.3f}x "
        f"| {r['params']:,} "
        f"| {r['flops'] / 1e6:.1f} | {r['latency_ms']:.2f} ms "
        f"({r['speedup']:.2f}x, {s_lo:.2f}-{s_hi:.2f}) "
        f"| {r['throughput']:.0f}/s ({r['throughput_ratio']:.2f}x, {t_lo:.2f}-{t_hi:.2f}) |")
  lines += ["", "Size: bytes on disk against the fp32 teacher's checkpoint, and against "
            "raw fp32 bytes (4 B per teacher parameter). "
            "Speed: median over timing rounds in which every model ran in turn; "
            "min-max: the lowest and highest ratio of a single round. Each model "
            "ran with the fastest of its candidates on this machine "
            "(`evaluate.fastest_options`: XLA's CPU option, or, for integer matmuls, "
            "vitjax's CPU int8 kernel; per row in results.json), except in a "
            "quick run (XLA's defaults)."]
  lines += [f"\n**Note on {name}:** {note}." for name, note in results.get("notes", {}).items()]
  return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out: pathlib.Path) -> None:
  """results.json, results.md and pareto.png under `out`."""
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(results, indent=1))
  (out / "results.md").write_text(markdown(results))
  plots.pareto(results["rows"], out / "pareto.png",
               f"vitjax survey, {results['date']}, {results['machine']}")
