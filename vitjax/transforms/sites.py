"""Rules that put activation quantizers on quantization sites, and the
transform that calibrates and installs them.

A `SiteRule(pattern, spec)` matches site addresses (`re.fullmatch`, as in
qwix and big_vision), e.g. `.*/softmax` or `Transformer/encoderblock_3/.*`;
the first rule that matches a site decides it, and `spec=None` keeps a site
in float. Before anything runs, `assign` refuses a pattern that is not a
regex, a rule that decides no site (a typo, or a rule shadowed by earlier
ones), a rule set that selects no site, and a spec of the wrong kind (a
matmul of two activations, `qk` or `pv`, takes an `OperandsSpec`; every other
site a single quantizer).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax

from vitjax import model as model_lib
from vitjax.model import Model
from vitjax.quantizers import OperandsSpec, UniformSpec
from vitjax.transforms import site_calibration

MATMUL_OPS = ("qk", "pv")


def is_matmul_site(address: str) -> bool:
  """True for the sites of a matmul of two activations (q.kT, probs.v)."""
  return address.rsplit("/", 1)[-1] in MATMUL_OPS


def is_linear_input(model: Model, address: str) -> bool:
  """True for the input site of a linear layer."""
  return address.endswith("/input") and model_lib.is_linear_layer(
      model.params, address[:-len("/input")])


@dataclasses.dataclass(frozen=True)
class SiteRule:
  """Sites whose address fully matches `pattern` get a quantizer fitted by
  `spec` (a `*Spec` of `vitjax.quantizers`), or stay float (`spec=None`)."""

  pattern: str
  spec: Any

  def __post_init__(self) -> None:
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"site pattern {self.pattern!r} is not a valid regex: {e}") from e
    if self.spec is not None and not hasattr(self.spec, "fit"):
      raise TypeError(f"SiteRule({self.pattern!r}) spec must be a quantizer spec "
                      f"(e.g. UniformSpec) or None, got {self.spec!r}")


def assign(model: Model, rules: Sequence[SiteRule]) -> dict[str, Any]:
  """Site address -> the spec of the first rule that matches it (sites
  matched by a `spec=None` rule or by no rule are left out).

  Raises:
    ValueError: no rules, a rule that decides no site, rules that select no
      site, a matmul site given a single-quantizer spec (or the reverse), or
      a per-channel scale on a linear layer's input (no integer matmul has it).
  """
  if not rules:
    raise ValueError("no site rules given")
  addresses = model_lib.site_addresses(model)
  used: set[int] = set()
  chosen: dict[str, Any] = {}
  for address in addresses:
    for i, rule in enumerate(rules):
      if re.fullmatch(rule.pattern, address):
        used.add(i)
        if rule.spec is not None:
          chosen[address] = rule.spec
        break
  unused = [rules[i].pattern for i in range(len(rules)) if i not in used]
  if unused:
    raise ValueError(f"site rules {unused} match no site (or only sites an earlier rule "
                     f"already decided); sites look like {addresses[:2]} ... "
                     f"({len(addresses)} in all)")
  if not chosen:
    raise ValueError("the site rules select no site to quantize")
  for address, spec in chosen.items():
    if is_matmul_site(address) != isinstance(spec, OperandsSpec):
      want = "an OperandsSpec(lhs, rhs)" if is_matmul_site(address) else "a single spec"
      raise ValueError(f"site {address} takes {want}, got {type(spec).__name__}")
    if (is_linear_input(model, address) and isinstance(spec, UniformSpec)
        and spec.granularity == "channel"):
      raise ValueError(f"site {address} is a linear layer's input: a per-channel scale there "
                       "has no integer matmul; use granularity 'tensor' or 'token' (or "
                       "reparameterize() first, as RepQ-ViT does)")
  return chosen


@dataclasses.dataclass(frozen=True)
class QuantizeSites:
  """`Model -> Model` fitting the quantizer of every site the rules choose
  on calibration images (see `quantize_sites`)."""

  rules: tuple[SiteRule, ...]
  calibration: Any
  batch_size: int = 64
  max_rows: int = 8192
  progress: bool = True

  def __call__(self, model: Model) -> Model:
    chosen = assign(model, self.rules)
    already = sorted(set(chosen) & set(model.sites))
    if already:
      raise ValueError(f"sites {already[:3]} already have quantizers; quantize each site "
                       "once (start from the unquantized model)")
    gradients = frozenset(a for a, spec in chosen.items() if spec.needs_gradients)
    samples = site_calibration.record(model, self.calibration, list(chosen),
                                      gradients=gradients, batch_size=self.batch_size,
                                      max_rows=self.max_rows, progress=self.progress)
    fitted = {}
    for address, spec in chosen.items():
      s = samples[address]
      if isinstance(s, dict):
        fitted[address] = spec.fit({k: v.values for k, v in s.items()},
                                   {k: v.weights for k, v in s.items()}, address)
      else:
        fitted[address] = spec.fit(s.values, s.weights, address)
    quantized = model.replace(sites={**model.sites, **fitted})
    # Trace one forward pass now, so a site that cannot serve with its layer
    # (e.g. a weight that quantizes its own activations) fails here.
    jax.eval_shape(model_lib.apply, quantized, model_lib.image_spec(model.config))
    return quantized


def quantize_sites(rules: Sequence[SiteRule], calibration: Any, *, batch_size: int = 64,
                   max_rows: int = 8192, progress: bool = True) -> QuantizeSites:
  """The transform that quantizes the activations at the sites `rules` choose,
  calibrated on `calibration` (a `data.Split` from the training split).

  Raises:
    ValueError: no rules, batch_size or max_rows < 1, or (when applied) what
      `assign` and `site_calibration.record` refuse, a site that already
      has a quantizer, or a quantized model that cannot run (e.g. an input
      site on a layer whose weight quantizes its own activations).
  """
  if not rules:
    raise ValueError("no site rules given")
  if batch_size < 1 or max_rows < 1:
    raise ValueError(f"batch_size={batch_size} and max_rows={max_rows} must be >= 1")
  site_calibration.check_training_split(calibration)
  return QuantizeSites(tuple(rules), calibration, batch_size, max_rows, progress)
