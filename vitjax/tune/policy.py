"""Compression policies: what to do to every layer, as a shareable JSON file.

A `CompressionPolicy` holds
  - `layers`: `LayerRule(pattern, setting)`s over linear-layer paths
    (`re.fullmatch`, first match wins; a layer no rule matches stays fp32);
  - `heads`, `mlp`: per-block counts of attention heads and MLP neurons to
    keep (structured pruning by L2 norm, applied first; None keeps all);
  - `sites`: op-level activation quantizers in the format of
    `vitjax.transforms.ptq` policy files (a named site `recipe` with its
    `a_bits`, and/or explicit `rules` over site addresses such as
    `.*/softmax`), applied before the layers' own `a_bits` rules.

`apply_policy` turns it into the compressed model; `save`/`load` read and
write the file that `vitjax compress --policy FILE CKPT` applies and that
`vitjax tune` writes. A rule that matches no layer, a rule shadowed by
earlier ones, and a policy that changes nothing are errors.

File format:
  {"format": "vitjax-policy", "version": 1,
   "layers": [{"pattern": REGEX, "w_bits": 4, "n_m": [2, 4], "a_bits": 8}, ...],
   "structured": {"heads": [4, 3, ...], "mlp": [256, 128, ...]},
   "sites": {"recipe": "fqvit", "a_bits": 8, "rules": [...]},
   "about": {...}}   (free-form notes, e.g. what the tuner measured)
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any

from vitjax.model import Model
from vitjax.models.arch import require_vit
from vitjax.transforms import ptq, reparam, structured
from vitjax.transforms.select import layer_transform, linear_layers
from vitjax.transforms.sites import SiteRule, quantize_sites
from vitjax.tune import emulate, space
from vitjax.tune.space import LayerSetting

FORMAT = "vitjax-policy"
VERSION = 1
SITE_KEYS = ("recipe", "a_bits", "edge_bits", "layernorm_inputs", "rules")


@dataclasses.dataclass(frozen=True)
class LayerRule:
  """Layers whose path fully matches `pattern` get `setting`."""

  pattern: str
  setting: LayerSetting

  def __post_init__(self) -> None:
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"layer pattern {self.pattern!r} is not a valid regex: {e}") from e


@dataclasses.dataclass(frozen=True)
class CompressionPolicy:
  """See the module docstring. `sites` is the JSON object of op-level rules
  (kept as given, so the file round-trips)."""

  layers: tuple[LayerRule, ...] = ()
  heads: tuple[int, ...] | None = None
  mlp: tuple[int, ...] | None = None
  sites: tuple[tuple[str, Any], ...] = ()
  about: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self) -> None:
    object.__setattr__(self, "sites", tuple(sorted(self.sites)))
    object.__setattr__(self, "about", tuple(sorted(self.about)))
    if not self.layers and self.heads is None and self.mlp is None and not self.sites:
      raise ValueError("the policy changes nothing: give layer rules, structured counts or "
                       "site rules")

  def site_rules(self) -> tuple[tuple[SiteRule, ...], bool]:
    """(the op-level site rules, whether the recipe needs RepQ-ViT's
    reparameterization first)."""
    doc = dict(self.sites)
    if not doc:
      return (), False
    rules = ptq.rules_from_json(doc.get("rules", []), "sites")
    if "recipe" in doc:
      if doc["recipe"] not in ptq.SITE_RECIPES:
        raise ValueError(f"sites.recipe={doc['recipe']!r}; choose one of {ptq.SITE_RECIPES}")
      rules = ptq.before(rules, ptq.site_rules(
          doc["recipe"], doc.get("a_bits", 8), edge_bits=doc.get("edge_bits", 8),
          layernorm_inputs=doc.get("layernorm_inputs", False)))
    return tuple(rules), doc.get("recipe") == "repqvit"


def resolve(policy: CompressionPolicy, layers: list[str]) -> dict[str, LayerSetting]:
  """Layer -> setting of the first rule matching it (unmatched layers absent).

  Raises:
    ValueError: a rule that matches no layer, or one every layer of which an
      earlier rule already took.
  """
  chosen: dict[str, LayerSetting] = {}
  for i, rule in enumerate(policy.layers):
    hits = [layer for layer in layers if re.fullmatch(rule.pattern, layer)]
    if not hits:
      raise ValueError(f"layers[{i}] pattern {rule.pattern!r} matches no linear layer; the "
                       f"layers are {layers[:3]} ... {layers[-2:]} ({len(layers)} in all)")
    fresh = [layer for layer in hits if layer not in chosen]
    if not fresh:
      raise ValueError(f"layers[{i}] pattern {rule.pattern!r} decides no layer: earlier "
                       "rules already match all of its layers")
    chosen.update({layer: rule.setting for layer in fresh})
  return chosen


def plan_of(policy: CompressionPolicy, model: Model) -> emulate.Plan:
  """The emulator's plan of a policy without op-level site rules.

  Raises:
    ValueError: the policy has site rules (the emulator covers linear inputs
      only), or what `resolve` refuses.
  """
  if policy.sites:
    raise ValueError("policies with op-level site rules are measured on the real model, "
                     "not emulated")
  return emulate.Plan(resolve(policy, linear_layers(model.params)), policy.heads, policy.mlp)


def policy_of(plan: emulate.Plan, about: dict[str, Any] | None = None) -> CompressionPolicy:
  """A policy with one exact rule per compressed layer of `plan`."""
  rules = tuple(LayerRule(re.escape(layer), s) for layer, s in plan.settings.items()
                if s != LayerSetting())
  return CompressionPolicy(rules, plan.heads, plan.mlp,
                           about=tuple(sorted((about or {}).items())))


def apply_policy(policy: CompressionPolicy, model: Model, calibration: Any, *,
                 progress: bool = False) -> Model:
  """The model compressed as `policy` says: reparameterization (RepQ-ViT
  site recipe), structured pruning, each layer's `space.compress`, then the
  site quantizers (op-level rules first, then the layers' `a_bits`),
  calibrated on `calibration` (training split).

  Raises:
    ValueError: an already compressed model, a CNN, what `resolve`,
      `structured.keep_counts`, `space.compress` and `quantize_sites` refuse.
  """
  require_vit(model.config, "a compression policy")
  emulate.check_uncompressed(model)
  site_rules, needs_reparam = policy.site_rules()
  if needs_reparam:
    model = reparam.reparameterize(calibration, progress=progress)(model)
  if policy.heads is not None or policy.mlp is not None:
    model = structured.heads_and_neurons(
        head_keep=list(policy.heads) if policy.heads is not None else 1.0,
        mlp_keep=list(policy.mlp) if policy.mlp is not None else 1.0)(model)
  settings = resolve(policy, linear_layers(model.params))
  weights = {layer: s for layer, s in settings.items()
             if dataclasses.replace(s, a_bits=None) != LayerSetting()}
  if weights:
    model = layer_transform(
        "policy", lambda layer, w, _: space.compress(w, weights[layer], layer),
        layers=tuple(re.escape(layer) for layer in weights))(model)
  rules = list(site_rules) + [
      SiteRule(re.escape(layer) + "/input", emulate.activation_spec(s.a_bits))
      for layer, s in settings.items() if s.a_bits is not None]
  if rules:
    model = quantize_sites(rules, calibration, progress=progress)(model)
  return model


def to_dict(policy: CompressionPolicy) -> dict[str, Any]:
  """The JSON form (see the module docstring)."""
  doc: dict[str, Any] = {"format": FORMAT, "version": VERSION,
                         "layers": [{"pattern": r.pattern, **r.setting.to_dict()}
                                    for r in policy.layers]}
  if policy.heads is not None or policy.mlp is not None:
    doc["structured"] = {k: list(v) for k, v in (("heads", policy.heads),
                                                  ("mlp", policy.mlp)) if v is not None}
  if policy.sites:
    doc["sites"] = dict(policy.sites)
  if policy.about:
    doc["about"] = dict(policy.about)
  return doc


def from_dict(doc: Any, where: str = "policy") -> CompressionPolicy:
  """A policy from its JSON form.

  Raises:
    ValueError: a wrong format or version, unknown keys, or any bad entry
      (named by its place in the file).
  """
  keys = {"format", "version", "layers", "structured", "sites", "about"}
  if not isinstance(doc, dict) or set(doc) - keys:
    raise ValueError(f"{where}: expected an object with keys from {sorted(keys)}, got "
                     f"{sorted(doc) if isinstance(doc, dict) else type(doc).__name__}")
  if doc.get("format") != FORMAT or doc.get("version") != VERSION:
    raise ValueError(f"{where}: format={doc.get('format')!r} version={doc.get('version')!r}; "
                     f"expected {FORMAT!r} version {VERSION}")
  rules = []
  for i, entry in enumerate(doc.get("layers", [])):
    if not isinstance(entry, dict) or "pattern" not in entry:
      raise ValueError(f"{where}: layers[{i}] must be an object with a 'pattern', got "
                       f"{entry!r}")
    setting = space.from_dict({k: v for k, v in entry.items() if k != "pattern"},
                              f"{where}: layers[{i}]")
    rules.append(LayerRule(entry["pattern"], setting))
  counts = doc.get("structured", {})
  if not isinstance(counts, dict) or set(counts) - {"heads", "mlp"}:
    raise ValueError(f"{where}: structured takes 'heads' and 'mlp' lists, got {counts!r}")
  for key, value in counts.items():
    if not isinstance(value, list) or not all(isinstance(c, int) for c in value):
      raise ValueError(f"{where}: structured.{key}={value!r} must be a list of per-block "
                       "integer counts")
  site_doc = doc.get("sites", {})
  if not isinstance(site_doc, dict) or set(site_doc) - set(SITE_KEYS):
    raise ValueError(f"{where}: sites takes keys from {list(SITE_KEYS)}, got {site_doc!r}")
  policy = CompressionPolicy(
      tuple(rules),
      tuple(counts["heads"]) if "heads" in counts else None,
      tuple(counts["mlp"]) if "mlp" in counts else None,
      tuple(sorted(site_doc.items())), tuple(sorted(doc.get("about", {}).items())))
  try:
    policy.site_rules()
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{where}: sites: {e}") from e
  return policy


def save(policy: CompressionPolicy, path: str | os.PathLike) -> pathlib.Path:
  """Writes the policy file atomically (a temporary file renamed into place)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(to_dict(policy), indent=1) + "\n")
  os.replace(tmp, path)
  return path


def load(path: str | os.PathLike) -> CompressionPolicy:
  """A policy from a file written by `save` (or by hand).

  Raises:
    ValueError: unreadable JSON or what `from_dict` refuses, naming the file.
  """
  path = pathlib.Path(path)
  try:
    doc = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"policy file {path} cannot be read: {e}") from e
  return from_dict(doc, f"policy file {path}")

