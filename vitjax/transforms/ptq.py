"""Named post-training quantization recipes for the whole ViT, and policies.

A `Policy` says everything a PTQ run does: fold RepQ-ViT's reparameterization
first or not, quantize the weights by round-to-nearest (AQT's per-channel
abs-max grid) or by GPTQ, and which quantizer every activation site gets
(`SiteRule`s, first match wins). `recipe_policy` spells out the named recipes;
`load_policy` reads a user's own mix from a JSON file; `ptq` turns a policy
into one transform.

Every recipe quantizes the inputs of all matmuls: each linear layer's input,
q and k of q.kT, probs and v of probs.v (`a_bits`), and the linear weights
(`w_bits`). The patch embedding and the heads keep `edge_bits` (8), as
PTQ4ViT and RepQ-ViT do. With `layernorm_inputs`, the residual stream into
every LayerNorm is quantized too (FQ-ViT's "fully quantized" setting).

  minmax   uniform, per tensor, min/max ranges (asymmetric where a shift is
           free: activations that are not a matmul's right operand);
  fqvit    minmax, plus log2 post-softmax values and power-of-two factors
           for LayerNorm inputs;
  ptq4vit  twin-uniform post-softmax and post-GELU values with Hessian-
           guided scales; other sites uniform with OMSE ranges;
  repqvit  post-LayerNorm scale reparameterization (per-tensor quantizers
           after it), log-sqrt2 post-softmax values, OMSE elsewhere;
  (the post-softmax and post-GELU quantizers sit on probs.v's left operand
  and Dense_1's input, so those matmuls stay integer dots: see
  `quantizers.planes`)
  gptq     the weights by GPTQ instead of round-to-nearest; alone, with
           minmax sites.

Names combine with "+": one site recipe and optionally gptq, e.g.
"repqvit+gptq".
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import typing
from typing import Any, Literal

from vitjax.model import Model
from vitjax.quantizers import (LogarithmicSpec, OperandsSpec, PowerOfTwoSpec,
                               TwinUniformSpec, UniformSpec)
from vitjax.quantizers.uniform import check_bits
from vitjax.transforms import quantize, reparam
from vitjax.transforms.gptq import gptq
from vitjax.transforms.select import Chain, Transform
from vitjax.transforms.sites import SiteRule, quantize_sites

SiteRecipe = Literal["minmax", "fqvit", "ptq4vit", "repqvit"]
SITE_RECIPES: tuple[str, ...] = typing.get_args(SiteRecipe)
RECIPES = SITE_RECIPES + ("gptq",)
Weights = Literal["rtn", "gptq"]
WEIGHT_METHODS: tuple[str, ...] = typing.get_args(Weights)
EDGE = r"(embedding|head|head_dist)"
LAYERNORM_INPUT = r".*(LayerNorm_\d+|encoder_norm|embedding_norm)/input"


@dataclasses.dataclass(frozen=True)
class Policy:
  """What a PTQ run does (see the module docstring)."""

  rules: tuple[SiteRule, ...]
  weights: Weights = "rtn"
  reparam: bool = False
  w_bits: int = 8
  edge_bits: int = 8

  def __post_init__(self) -> None:
    if self.weights not in WEIGHT_METHODS:
      raise ValueError(f"weights={self.weights!r}; choose one of {WEIGHT_METHODS}")
    check_bits(self.w_bits, "w_bits")
    check_bits(self.edge_bits, "edge_bits")
    if not self.rules:
      raise ValueError("a policy needs at least one site rule")


def parse_recipe(name: str) -> tuple[SiteRecipe, Weights]:
  """'repqvit+gptq' -> ('repqvit', 'gptq'); 'gptq' -> ('minmax', 'gptq').

  Raises:
    ValueError: an unknown part, a repeated part, or two site recipes.
  """
  parts = [p.strip() for p in str(name).split("+")]
  unknown = [p for p in parts if p not in RECIPES]
  if unknown or len(set(parts)) != len(parts):
    raise ValueError(f"recipe={name!r}: parts must be distinct names from {RECIPES} "
                     "joined by '+'")
  sites = [p for p in parts if p in SITE_RECIPES]
  if len(sites) > 1:
    raise ValueError(f"recipe={name!r} names two site recipes {sites}; choose one")
  return (sites[0] if sites else "minmax"), ("gptq" if "gptq" in parts else "rtn")


def _uniform(bits: int, method: str, symmetric: bool = False) -> UniformSpec:
  return UniformSpec(bits=bits, method=method, symmetric=symmetric)


def site_rules(recipe: SiteRecipe, a_bits: int, *, edge_bits: int = 8,
               layernorm_inputs: bool = False) -> tuple[SiteRule, ...]:
  """The site rules of a named site recipe (first match wins).

  Raises:
    ValueError: an unknown recipe, or bits outside 2..8.
  """
  if recipe not in SITE_RECIPES:
    raise ValueError(f"recipe={recipe!r}; choose one of {SITE_RECIPES}")
  check_bits(a_bits, "a_bits")
  check_bits(edge_bits, "edge_bits")
  method = "minmax" if recipe in ("minmax", "fqvit") else "omse"
  sym = lambda: _uniform(a_bits, method, symmetric=True)  # noqa: E731
  asym = lambda: _uniform(a_bits, method)  # noqa: E731
  rules = [SiteRule(f"{EDGE}/input", _uniform(edge_bits, "minmax")),
           SiteRule(".*/qk", OperandsSpec(sym(), sym()))]
  # A log or twin-uniform quantizer sits on its matmul's left operand (pv's
  # lhs, Dense_1's input), where the matmul multiplies its int8 planes; the
  # value sites softmax and gelu then stay float (the same tensors).
  if recipe == "minmax":
    rules += [SiteRule(".*/pv", OperandsSpec(asym(), sym()))]
    ln = asym()
  elif recipe == "fqvit":
    rules += [SiteRule(".*/pv", OperandsSpec(LogarithmicSpec(a_bits, "2"), sym()))]
    ln = PowerOfTwoSpec(a_bits)
  elif recipe == "ptq4vit":
    rules += [SiteRule(".*/pv", OperandsSpec(TwinUniformSpec(a_bits, "softmax"), sym())),
              SiteRule(".*/Dense_1/input", TwinUniformSpec(a_bits, "gelu"))]
    ln = asym()
  else:  # repqvit: per-tensor ranges after the reparameterization
    rules += [SiteRule(".*/pv", OperandsSpec(LogarithmicSpec(a_bits, "sqrt2"), sym())),
              SiteRule(".*/(query|key|value|Dense_0)/input", _uniform(a_bits, "minmax"))]
    ln = asym()
  rules += [SiteRule(".*/(softmax|gelu)", None)]
  rules += [SiteRule(LAYERNORM_INPUT, ln if layernorm_inputs else None),
            SiteRule(".*/input", asym())]
  return tuple(rules)


def recipe_policy(recipe: str, *, w_bits: int = 8, a_bits: int = 8, edge_bits: int = 8,
                  layernorm_inputs: bool = False) -> Policy:
  """The policy of a named recipe (see `parse_recipe` and the module docstring).

  Raises:
    ValueError: an unknown recipe, or bits outside 2..8.
  """
  sites, weights = parse_recipe(recipe)
  return Policy(site_rules(sites, a_bits, edge_bits=edge_bits,
                           layernorm_inputs=layernorm_inputs),
                weights=weights, reparam=sites == "repqvit", w_bits=w_bits,
                edge_bits=edge_bits)


SPEC_KINDS = {"uniform": UniformSpec, "log": LogarithmicSpec, "twin": TwinUniformSpec,
              "ptf": PowerOfTwoSpec}


def spec_from_dict(entry: Any, where: str) -> Any:
  """A quantizer spec from its JSON form: {"kind": "uniform"|"log"|"twin"|"ptf",
  options...}, {"kind": "operands", "lhs": ..., "rhs": ...} or {"kind": "float"}.

  Raises:
    ValueError: not an object, an unknown kind or option, or a bad value;
      `where` names the entry.
  """
  if not isinstance(entry, dict) or "kind" not in entry:
    raise ValueError(f"{where}: a quantizer is an object with a 'kind', got {entry!r}")
  options = {k: v for k, v in entry.items() if k != "kind"}
  kind = entry["kind"]
  if kind == "float":
    if options:
      raise ValueError(f"{where}: kind 'float' takes no options, got {sorted(options)}")
    return None
  if kind == "operands":
    extra = set(options) - {"lhs", "rhs"}
    if extra:
      raise ValueError(f"{where}: kind 'operands' takes 'lhs' and 'rhs', got {sorted(extra)}")
    return OperandsSpec(*(spec_from_dict(options.get(side, {"kind": "float"}),
                                         f"{where}.{side}") for side in ("lhs", "rhs")))
  if kind not in SPEC_KINDS:
    raise ValueError(f"{where}: kind={kind!r}; choose one of "
                     f"{sorted(SPEC_KINDS) + ['operands', 'float']}")
  cls = SPEC_KINDS[kind]
  allowed = {f.name for f in dataclasses.fields(cls)}
  if set(options) - allowed:
    raise ValueError(f"{where}: {kind} takes options {sorted(allowed)}, got "
                     f"{sorted(set(options) - allowed)}")
  try:
    return cls(**options)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: {e}") from e


def rules_from_json(entries: Any, where: str) -> list[SiteRule]:
  """Site rules from their JSON form, [{"pattern": regex, "quantizer": {...}}]
  (see `spec_from_dict`).

  Raises:
    ValueError: an entry without exactly those two keys, or a bad quantizer;
      `where` and the entry's index name it.
  """
  rules = []
  for i, r in enumerate(entries):
    if not isinstance(r, dict) or set(r) != {"pattern", "quantizer"}:
      raise ValueError(f"{where}: rules[{i}] must have exactly 'pattern' and "
                       f"'quantizer', got {r!r}")
    rules.append(SiteRule(r["pattern"], spec_from_dict(r["quantizer"], f"rules[{i}]")))
  return rules


def before(own: list[SiteRule], recipe: tuple[SiteRule, ...]) -> list[SiteRule]:
  """`own` rules first, then the recipe's rules whose pattern `own` does not
  already have (an own rule replaces the recipe's rule of the same pattern)."""
  patterns = {r.pattern for r in own}
  return own + [r for r in recipe if r.pattern not in patterns]


def load_policy(path: str | os.PathLike) -> Policy:
  """A policy from a JSON file: {"weights": "rtn"|"gptq", "reparam": bool,
  "w_bits": int, "edge_bits": int, "rules": [{"pattern": regex, "quantizer":
  {...}} ...]} (see `spec_from_dict`; "recipe": NAME with "a_bits" and
  "layernorm_inputs" starts from a named recipe's rules: the file's rules
  come first, and replace the recipe's rule of the same pattern).

  Raises:
    ValueError: unreadable JSON, unknown keys, or any bad entry (named).
  """
  path = pathlib.Path(path)
  try:
    doc = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"policy file {path} cannot be read: {e}") from e
  keys = {"weights", "reparam", "w_bits", "edge_bits", "rules", "recipe", "a_bits",
          "layernorm_inputs"}
  if not isinstance(doc, dict) or set(doc) - keys:
    raise ValueError(f"policy file {path}: expected an object with keys from "
                     f"{sorted(keys)}, got {sorted(doc) if isinstance(doc, dict) else doc!r}")
  rules = rules_from_json(doc.get("rules", []), f"policy file {path}")
  base = {}
  if "recipe" in doc:
    named = recipe_policy(doc["recipe"], w_bits=doc.get("w_bits", 8),
                          a_bits=doc.get("a_bits", 8), edge_bits=doc.get("edge_bits", 8),
                          layernorm_inputs=doc.get("layernorm_inputs", False))
    rules = before(rules, named.rules)
    base = {"weights": named.weights, "reparam": named.reparam}
  try:
    return Policy(tuple(rules), weights=doc.get("weights", base.get("weights", "rtn")),
                  reparam=bool(doc.get("reparam", base.get("reparam", False))),
                  w_bits=doc.get("w_bits", 8), edge_bits=doc.get("edge_bits", 8))
  except ValueError as e:
    raise ValueError(f"policy file {path}: {e}") from e


def ptq(policy: Policy, calibration: Any, *, progress: bool = True) -> Transform:
  """The transform a policy describes: reparameterize (if asked), quantize
  the weights (round-to-nearest or GPTQ; edge layers at `edge_bits`), then
  calibrate and install the site quantizers, all on `calibration` (a
  training-split `data.Split`).

  Raises:
    ValueError: calibration not from the training split; when applied, what
      each step refuses (e.g. weights that are not float, a rule matching no
      site).
  """
  steps: list[Transform] = []
  if policy.reparam:
    steps.append(reparam.reparameterize(calibration, progress=progress))
  inner = f"(?!{EDGE}$).*"
  if policy.weights == "gptq":
    steps.append(gptq(calibration, bits=policy.w_bits, layers=inner, progress=progress))
  else:
    steps.append(quantize.weight_only(policy.w_bits, layers=inner))
  steps.append(quantize.weight_only(policy.edge_bits, layers=f"{EDGE}"))
  steps.append(quantize_sites(policy.rules, calibration, progress=progress))
  return Chain(tuple(steps))


def quantize_model(model: Model, recipe: str, calibration: Any, *, w_bits: int = 8,
                   a_bits: int = 8, layernorm_inputs: bool = False,
                   progress: bool = True) -> Model:
  """`model` quantized by a named recipe (see `recipe_policy`, `ptq`)."""
  policy = recipe_policy(recipe, w_bits=w_bits, a_bits=a_bits,
                         layernorm_inputs=layernorm_inputs)
  return ptq(policy, calibration, progress=progress)(model)
