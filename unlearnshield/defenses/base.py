"""The defense contract, its registry, and what every defense shares.

A defense is a class registered in :data:`DEFENSES`. It owns a frozen config dataclass,
validated once when the defense is built, and one verb::

    released, report = defense.protect(original, unlearned, forget_x, forget_y, seed=0)

The defender (the server) sees the original model θo, the unlearned model θu and the forget
samples; it releases θu' in place of θu. Only parameters are perturbed, never buffers such as
BatchNorm running statistics (those of θu are kept), and no input is modified: the release
is a new module. Models are used through ``named_parameters()`` and
``torch.func.functional_call``, so any ``nn.Module`` classifier taking images in [0, 1] works.

For the defense-aware attacker, every defense can also run on an attacker's simulated
difference (:meth:`Defense.simulate`): the same algorithm and hyper-parameters, the
attacker's own randomness and dummy images.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call

from unlearnshield._memory import WORK_BUFFERS, BufferPool, zeroed_buffer
from unlearnshield._registry import Registry
from unlearnshield.diff import DifferenceError, check_compatible
from unlearnshield.metrics.forgetting import OUTPUT_SPACE, evaluation_mode, output_distance

logger = logging.getLogger(__name__)

_IMAGE_RANGE_TOLERANCE = 1e-6


class DefenseError(ValueError):
    """A defense cannot run on these models or forget samples (the message says why)."""


# ---------------------------------------------------------------------------------------------
# Config validation


def check_config(config: Any) -> None:
    """Check the field types of a defense config, converting an int given for a float.

    Options arrive from Python and from the CLI's ``--set key=value`` (parsed as JSON), so a
    string where a number belongs fails here with the option's name.

    Args:
        config: a dataclass whose annotations are ``int``, ``float``, ``bool``, ``str`` or one
            of those ``| None``.

    Raises:
        ValueError: a field holds a value of the wrong type.
    """
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        hint = hints[field.name]
        allowed = (
            typing.get_args(hint)
            if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
            else (hint,)
        )
        if value is None and type(None) in allowed:
            continue
        if isinstance(value, bool) and bool not in allowed:
            raise ValueError(f"option {field.name} must be a number, got {value!r}")
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(config, field.name, float(value))
            continue
        if not isinstance(value, tuple(t for t in allowed if t is not type(None))):
            names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
            raise ValueError(f"option {field.name} must be {names}, got {value!r}")


def require(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``: one rule, one message."""
    if not condition:
        raise ValueError(message)


def require_fraction(name: str, value: float, *, closed: bool = False) -> None:
    """Require ``0 ≤ value < 1`` (``0 ≤ value ≤ 1`` when ``closed``)."""
    upper_ok = value <= 1 if closed else value < 1
    bound = "[0, 1]" if closed else "[0, 1)"
    require(
        math.isfinite(value) and value >= 0 and upper_ok, f"{name} must lie in {bound}, got {value}"
    )


# ---------------------------------------------------------------------------------------------
# Parameters as one flat vector


@dataclass(frozen=True)
class ParameterLayout:
    """Where each named parameter sits in the flat vector of all parameters.

    The order is ``model.named_parameters()`` order, as in :mod:`unlearnshield.diff`.

    Attributes:
        names: parameter names.
        shapes: their shapes.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParameterLayout:
        """The layout of ``model``'s parameters."""
        named = list(model.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(p.shape for _, p in named))

    @property
    def sizes(self) -> list[int]:
        """Number of entries of each parameter."""
        return [math.prod(s) for s in self.shapes]

    @property
    def numel(self) -> int:
        """``P``, the total number of parameter entries."""
        return sum(self.sizes)

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat vector ``(P,)`` shaped as each parameter (no copy)."""
        if flat.shape != (self.numel,):
            raise ValueError(f"flat vector must be ({self.numel},), got {tuple(flat.shape)}")
        return [
            piece.view(shape)
            for piece, shape in zip(torch.split(flat, self.sizes), self.shapes, strict=True)
        ]

    def as_dict(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`split` as a name → view mapping."""
        return dict(zip(self.names, self.split(flat), strict=True))

    def flatten(self, tensors: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Copy per-parameter tensors into the flat vector ``out`` ``(P,)``; returns ``out``."""
        for view, t in zip(self.split(out), tensors, strict=True):
            view.copy_(t)
        return out


REDUCTION_CHUNK = 2**18
"""Entries per partial sum of the reductions over all P parameters. A float32 matrix-vector
product or 1-norm over 11M entries at once is off by up to 0.25% (measured against float64);
summing partials of 2^18 entries keeps the error below 1e-5 for about 10% more time."""


def chunked_mv(rows: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``rows @ vector`` for ``rows (r, P)`` and ``vector (P,)``, summed over chunks of
    :data:`REDUCTION_CHUNK` entries (see there); returns ``(r,)``."""
    n = vector.numel()
    count = max(1, -(-n // REDUCTION_CHUNK))
    partial = torch.empty(count, rows.shape[0], dtype=vector.dtype, device=vector.device)
    for i in range(count):
        piece = slice(i * REDUCTION_CHUNK, (i + 1) * REDUCTION_CHUNK)
        torch.mv(rows[:, piece], vector[piece], out=partial[i])
    return partial.sum(0)


def chunked_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """``a · b`` of two flat vectors, in float64 from chunk-wise partial sums."""
    pieces = [
        torch.dot(a[i : i + REDUCTION_CHUNK], b[i : i + REDUCTION_CHUNK])
        for i in range(0, a.numel(), REDUCTION_CHUNK)
    ]
    return float(torch.stack(pieces).double().sum())


def chunked_abs_sum(vector: torch.Tensor) -> float:
    """``Σ |v_i|`` of a flat vector, in float64 from chunk-wise partial sums."""
    pieces = [
        torch.linalg.vector_norm(vector[i : i + REDUCTION_CHUNK], ord=1)
        for i in range(0, vector.numel(), REDUCTION_CHUNK)
    ]
    return float(torch.stack(pieces).double().sum())


def parameters_of(model: nn.Module) -> list[torch.Tensor]:
    """The model's parameters, detached, in ``named_parameters`` order."""
    return [p.detach() for _, p in model.named_parameters()]


def copy_with_fresh_parameters(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters are new, uninitialised tensors.

    The buffers (BatchNorm statistics, ...) are copied; the parameters are allocated but not
    copied, because the caller is about to overwrite them. Saves one full pass over the
    parameters against ``copy.deepcopy`` followed by a write.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


# ---------------------------------------------------------------------------------------------
# The protection problem


@dataclass
class ProtectionProblem:
    """Everything a defense works on, checked once by :func:`prepare_problem`.

    Attributes:
        original: θo.
        unlearned: θu (never modified).
        layout: the parameter layout shared by both.
        workspace: a ``(rows, P)`` buffer whose row 0 is Δ; the other rows (as many as the
            defense's :attr:`Defense.workspace_rows` asks for) are zero-filled scratch,
            allocated together so that a defense can reduce against Δ with one matrix-vector
            product (:func:`~unlearnshield._memory.zeroed_buffer`: untouched rows cost
            nothing).
        delta: Δ = θu − θo as one flat vector ``(P,)`` (``workspace[0]``), in the models'
            dtype and device.
        delta_norm: ‖Δ‖₂ as a 0-dim tensor.
        forget_x: the forget images on the models' device and dtype, ``(k, C, H, W)``.
        forget_y: their labels, int64 ``(k,)``.
        reference_logits: f_θu(x) in eval mode, ``(k, num_classes)``, no gradient.
    """

    original: nn.Module
    unlearned: nn.Module
    layout: ParameterLayout
    workspace: torch.Tensor
    delta: torch.Tensor
    delta_norm: torch.Tensor
    forget_x: torch.Tensor
    forget_y: torch.Tensor
    reference_logits: torch.Tensor

    @property
    def device(self) -> torch.device:
        """Where the models live."""
        return self.delta.device


def _float_dtype_and_device(model: nn.Module, what: str) -> tuple[torch.dtype, torch.device]:
    params = [p for p in model.parameters()]
    if not params:
        raise DefenseError(f"the {what} model has no parameters")
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) != 1 or not params[0].is_floating_point():
        raise DefenseError(
            f"the {what} model's parameters must share one floating dtype, found "
            f"{sorted(map(str, dtypes))}"
        )
    if len(devices) != 1:
        raise DefenseError(f"the {what} model's parameters lie on several devices: {devices}")
    return params[0].dtype, params[0].device


def check_forget_set(
    forget_x: torch.Tensor, forget_y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the forget samples: float images in [0, 1] ``(k, C, H, W)``, int labels ``(k,)``.

    Returns:
        ``(forget_x, forget_y)`` with the labels as int64.

    Raises:
        DefenseError: wrong types, shapes, non-finite pixels or pixels outside [0, 1].
    """
    if not isinstance(forget_x, torch.Tensor) or not isinstance(forget_y, torch.Tensor):
        raise DefenseError("forget_x and forget_y must be torch tensors")
    if not forget_x.is_floating_point() or forget_x.dim() != 4 or forget_x.shape[0] < 1:
        raise DefenseError(
            f"forget_x must be float images (k, C, H, W) with k ≥ 1, got {forget_x.dtype} "
            f"{tuple(forget_x.shape)}"
        )
    if forget_y.dtype.is_floating_point or forget_y.dtype == torch.bool:
        raise DefenseError(f"forget_y must hold integer labels, got {forget_y.dtype}")
    if forget_y.shape != (forget_x.shape[0],):
        raise DefenseError(
            f"forget_y must be ({forget_x.shape[0]},) for {forget_x.shape[0]} images, got "
            f"{tuple(forget_y.shape)}"
        )
    if not torch.isfinite(forget_x).all():
        raise DefenseError("forget_x has non-finite pixels")
    low, high = float(forget_x.min()), float(forget_x.max())
    if low < -_IMAGE_RANGE_TOLERANCE or high > 1 + _IMAGE_RANGE_TOLERANCE:
        raise DefenseError(
            f"forget_x must hold images in [0, 1] (the models normalise inside), got values in "
            f"[{low:.3g}, {high:.3g}]"
        )
    return forget_x, forget_y.to(torch.int64)


def _difference_into(
    workspace: torch.Tensor, layout: ParameterLayout, original: nn.Module, unlearned: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write Δ = θu − θo into ``workspace[0]`` and check it; returns ``(Δ, ‖Δ‖)``."""
    delta = workspace[0]
    pairs = zip(parameters_of(unlearned), parameters_of(original), layout.split(delta), strict=True)
    for theta_u, theta_o, out in pairs:
        torch.sub(theta_u, theta_o, out=out)

    # one reduction answers both checks: ‖Δ‖ is NaN/inf iff an entry is (or it overflowed)
    delta_norm = chunked_mv(workspace[:1], delta)[0].sqrt()
    if not torch.isfinite(delta_norm) and not torch.isfinite(delta).all():
        bad = [n for n, d in layout.as_dict(delta).items() if not torch.isfinite(d).all()]
        raise DefenseError(f"non-finite parameters (NaN or inf) in {bad[:5]}")
    if not torch.isfinite(delta_norm):
        delta_norm = torch.linalg.vector_norm(delta.double()).to(delta.dtype)
    if delta_norm == 0:
        if torch.any(delta != 0):
            raise DefenseError(
                f"Δ is too small to measure in {delta.dtype} (‖Δ‖² underflows to 0); use "
                f"float64 models"
            )
        raise DefenseError(
            "the unlearned model is identical to the original (Δ = 0): nothing was unlearned, "
            "so there is nothing to protect"
        )

    return delta, delta_norm


@torch.no_grad()
def prepare_problem(
    original: nn.Module,
    unlearned: nn.Module,
    forget_x: torch.Tensor,
    forget_y: torch.Tensor,
    *,
    workspace_rows: int = 1,
    buffers: BufferPool | None = None,
) -> ProtectionProblem:
    """Check the inputs of :meth:`Defense.protect` and compute Δ and f_θu(x) once.

    Args:
        original: θo.
        unlearned: θu.
        forget_x: the forget images, float in [0, 1], ``(k, C, H, W)``.
        forget_y: their labels, int ``(k,)``.
        workspace_rows: rows of the flat workspace whose row 0 receives Δ; default 1.
        buffers: take the workspace from this pool (the caller gives it back); default
            None, a fresh zero-filled buffer. A pooled workspace's other rows hold whatever
            its last user left.

    Raises:
        DefenseError: different parameter names or shapes, mixed dtypes or devices, non-finite
            parameters, Δ = 0 (nothing was unlearned), bad forget samples, a label outside
            ``[0, num_classes)``.
    """
    if not isinstance(original, nn.Module) or not isinstance(unlearned, nn.Module):
        raise DefenseError("original and unlearned must be nn.Module classifiers")
    try:
        check_compatible(original, unlearned)
    except DifferenceError as err:
        raise DefenseError(str(err)) from None
    dtype, device = _float_dtype_and_device(unlearned, "unlearned")
    if _float_dtype_and_device(original, "original") != (dtype, device):
        raise DefenseError("the original and unlearned models differ in dtype or device")
    forget_x, forget_y = check_forget_set(forget_x, forget_y)

    # Δ = θu − θo, written straight into row 0 of the flat workspace
    layout = ParameterLayout.of(unlearned)
    shape = (workspace_rows, layout.numel)
    if buffers is None:
        workspace = zeroed_buffer(shape, dtype=dtype, device=device)
    else:
        workspace, _ = buffers.take(shape, dtype=dtype, device=device)
    try:
        delta, delta_norm = _difference_into(workspace, layout, original, unlearned)
        forget_x = forget_x.to(device=device, dtype=dtype)
        forget_y = forget_y.to(device)
        with evaluation_mode(unlearned):
            reference = unlearned(forget_x)
        if reference.dim() != 2:
            raise DefenseError(
                f"the model must output logits (k, classes), got {tuple(reference.shape)}"
            )
        classes = reference.shape[1]
        if int(forget_y.min()) < 0 or int(forget_y.max()) >= classes:
            raise DefenseError(
                f"forget labels must lie in [0, {classes}) for this {classes}-class model, got "
                f"{forget_y.tolist()}"
            )
        return ProtectionProblem(
            original, unlearned, layout, workspace, delta, delta_norm, forget_x, forget_y, reference
        )
    except BaseException:
        if buffers is not None:
            buffers.give(workspace)
        raise


def forward_with(
    model: nn.Module, layout: ParameterLayout, params: Sequence[torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """``model(x)`` with its parameters replaced by ``params`` (``torch.func.functional_call``).

    The module's own buffers are used and its mode is whatever it is in (call it on a model
    in eval mode).
    """
    return functional_call(model, dict(zip(layout.names, params, strict=True)), (x,))


# ---------------------------------------------------------------------------------------------
# The defense contract


class Defense(ABC):
    """Base class of the defenses.

    Subclasses set :attr:`name` and :attr:`Config` (a frozen dataclass validated in its
    ``__post_init__``), and implement :meth:`_protect` and :meth:`simulate`.

    Args:
        config: the defense's config; default: built from ``options``.
        **options: config fields (``lambda_acc=0.5``, ``std=0.1`` ...); unknown names are
            refused with the list of valid ones.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    workspace_rows: ClassVar[int] = 1
    """Rows of :attr:`ProtectionProblem.workspace` the defense needs (row 0 is Δ)."""

    def __init__(self, config: Any = None, **options: Any) -> None:
        if config is None:
            config = build_config(self.Config, options, self.name)
        elif options:
            raise TypeError("give either a config or options, not both")
        if not isinstance(config, self.Config):
            raise TypeError(f"{self.name} needs a {self.Config.__name__}, got {type(config)}")
        self.config = config

    def describe(self) -> dict[str, Any]:
        """Every hyper-parameter, for records."""
        return dataclasses.asdict(self.config)

    def protect(
        self,
        original: nn.Module,
        unlearned: nn.Module,
        forget_x: torch.Tensor,
        forget_y: torch.Tensor,
        *,
        seed: int = 0,
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Release a protected copy θu' of the unlearned model.

        Args:
            original: θo, an ``nn.Module`` classifier taking images in [0, 1].
            unlearned: θu, the same architecture (names and shapes of parameters).
            forget_x: the forgotten images, float in [0, 1], ``(k, C, H, W)``.
            forget_y: their labels, int ``(k,)``.
            seed: seeds every random draw of the defense; the same seed gives the same
                release bit for bit on the CPU.

        Returns:
            ``(released, report)``: a new module (θu's buffers, perturbed parameters, eval
            mode) and a JSON-serialisable dict with ``defense``, ``hyperparameters``,
            ``seed``, ``num_forget``, ``num_parameters``, ``cosine`` (cos(Δ, Δ*)),
            ``delta_norm`` (‖Δ‖₂), ``released_delta_norm`` (‖Δ*‖₂), ``perturbation_norm``
            (‖δ‖₂ = ‖θu' − θu‖₂), ``outdiff`` (mean OutDiff on the forget samples, softmax
            space) and ``outdiff_per_sample``, ``seconds`` (wall time of the whole call),
            plus the defense's own measurements.

        Raises:
            DefenseError: see :func:`prepare_problem`.
        """
        start = time.perf_counter()
        problem = prepare_problem(
            original,
            unlearned,
            forget_x,
            forget_y,
            workspace_rows=self.workspace_rows,
            buffers=WORK_BUFFERS,
        )
        try:
            generator = make_generator(seed, problem.device)
            released, measured = self._protect(problem, generator)
            with torch.no_grad():
                distances = output_distance(problem.reference_logits, released(problem.forget_x))
        finally:
            WORK_BUFFERS.give(problem.workspace)
            problem.workspace = problem.delta = torch.empty(0)
        seconds = time.perf_counter() - start
        report: dict[str, Any] = {
            "defense": self.name,
            "hyperparameters": self.describe(),
            "seed": seed,
            "num_forget": int(problem.forget_x.shape[0]),
            "num_parameters": problem.layout.numel,
            "delta_norm": float(problem.delta_norm),
            **measured,
            "outdiff": float(distances.mean()),
            "outdiff_per_sample": distances.tolist(),
            "output_space": OUTPUT_SPACE,
            "seconds": seconds,
        }
        logger.info(
            "%s: cos(Δ, Δ*) %+.4f, ‖δ‖ %.3g (‖Δ‖ %.3g), OutDiff %.4f, %.2f s",
            self.name,
            report["cosine"],
            report["perturbation_norm"],
            report["delta_norm"],
            report["outdiff"],
            seconds,
        )
        return released, report

    @abstractmethod
    def _protect(
        self, problem: ProtectionProblem, generator: torch.Generator
    ) -> tuple[nn.Module, dict[str, Any]]:
        """The defense proper: the release (eval mode) and a record that holds at least
        ``cosine``, ``released_delta_norm`` and ``perturbation_norm``."""

    @abstractmethod
    def simulate(
        self,
        original: nn.Module,
        delta: torch.Tensor,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Apply the defense to simulated differences, as a defense-aware attacker would.

        Args:
            original: θo, in eval mode (the attacker's copy); not modified.
            delta: simulated differences Δ¹ ``(B, P)``, one row per reconstruction, in
                ``named_parameters`` order.
            images: the dummy images that produced them, ``(B, k, C, H, W)`` in [0, 1]: they
                stand in for the forget samples the defense would see.
            labels: their labels ``(B, k)``, or None where the attacker has none (no defense
                here needs them).
            generator: the attacker's own random source (never the defender's).

        Returns:
            The defended differences ``(B, P)`` (a new tensor).
        """


DEFENSES: Registry[type[Defense]] = Registry("defense")
"""Defense classes by name: ``none``, ``noise``, ``pruning``, ``soteria``, ``outpost``,
``dgp`` and ``shield`` (UnlearnShield)."""


def build_config(config_cls: type, options: Mapping[str, Any], name: str) -> Any:
    """``config_cls(**options)``, refusing unknown option names with the valid ones listed."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for defense {name!r}; valid options: "
            f"{', '.join(sorted(known))}"
        )
    return config_cls(**options)


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return torch.Generator(device=device).manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Defenses that transform Δ tensor by tensor (the gradient-leakage baselines)


class DifferenceDefense(Defense):
    """A defense that maps the released difference Δ ↦ Δ' = D(Δ) and releases θo + Δ'.

    Subclasses implement :meth:`defend` on named tensors. Tensors that ``defend`` returns
    unchanged (the same object) are released as θu's own values, bit for bit; the others as
    θo + Δ', so an entry set to zero in Δ' is exactly θo's.
    """

    @abstractmethod
    def defend(
        self,
        delta: dict[str, torch.Tensor],
        *,
        original: nn.Module,
        forget_x: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Δ' from Δ, tensor by tensor.

        Args:
            delta: Δ per parameter name (read only).
            original: θo in eval mode (not modified).
            forget_x: the forget images (or an attacker's dummy images), ``(k, C, H, W)``.
            generator: the random source.

        Returns:
            ``(Δ', record)``: Δ' per parameter name (return an input tensor itself where it is
            unchanged) and JSON-serialisable measurements of the defense.
        """

    def _protect(
        self, problem: ProtectionProblem, generator: torch.Generator
    ) -> tuple[nn.Module, dict[str, Any]]:
        delta = problem.layout.as_dict(problem.delta)
        with evaluation_mode(problem.original):
            defended, record = self.defend(
                delta, original=problem.original, forget_x=problem.forget_x, generator=generator
            )
        released = copy_with_fresh_parameters(problem.unlearned).eval()
        new_delta = torch.empty_like(problem.delta)
        params = zip(
            problem.layout.names,
            parameters_of(problem.original),
            parameters_of(problem.unlearned),
            parameters_of(released),
            problem.layout.split(new_delta),
            strict=True,
        )
        with torch.no_grad():
            for name, theta_o, theta_u, out, flat in params:
                if defended[name] is delta[name]:
                    out.copy_(theta_u)
                    flat.copy_(delta[name])
                else:
                    torch.add(theta_o, defended[name], out=out)
                    flat.copy_(defended[name])
        return released, {**difference_record(problem.delta, new_delta), **record}

    def simulate(
        self,
        original: nn.Module,
        delta: torch.Tensor,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        layout = ParameterLayout.of(original)
        out = torch.empty_like(delta)
        with torch.no_grad():
            for b in range(delta.shape[0]):
                defended, _ = self.defend(
                    layout.as_dict(delta[b]),
                    original=original,
                    forget_x=images[b],
                    generator=generator,
                )
                layout.flatten([defended[n] for n in layout.names], out[b])
        return out


def difference_record(delta: torch.Tensor, released_delta: torch.Tensor) -> dict[str, float]:
    """cos(Δ, Δ*), ‖Δ*‖₂ and ‖δ‖₂ = ‖Δ* − Δ‖₂ for flat ``(P,)`` differences (float64 sums)."""
    delta_sq = chunked_dot(delta, delta)
    released_sq = chunked_dot(released_delta, released_delta)
    cross = chunked_dot(delta, released_delta)
    denom = math.sqrt(delta_sq * released_sq)
    perturbation = released_delta - delta
    return {
        "cosine": cross / denom if denom > 0 else 0.0,
        "released_delta_norm": math.sqrt(released_sq),
        "perturbation_norm": math.sqrt(chunked_dot(perturbation, perturbation)),
    }


def top_magnitude_mask(values: torch.Tensor, count: int) -> torch.Tensor:
    """A boolean mask of the ``count`` entries of largest ``|values|`` (exactly ``count``).

    Ties are broken by ``torch.topk``; ``count`` is clamped to ``[0, numel]``.
    """
    flat = values.reshape(-1)
    count = max(0, min(count, flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if count:
        mask[flat.abs().topk(count, sorted=False).indices] = True
    return mask.view(values.shape)


def percentile_rank(numel: int, q: float) -> int:
    """The 0-based ascending rank at which ``numpy.percentile(values, 100·q)`` sits.

    ``numpy.percentile`` interpolates at position ``(n − 1)·q`` of the sorted values; for
    distinct values, ``values ≥ threshold`` keeps ranks ``⌈(n − 1)·q⌉ … n − 1`` and
    ``values ≤ threshold`` keeps ranks ``0 … ⌊(n − 1)·q⌋``. This returns ``⌈(n − 1)·q⌉``
    (float rounding at exact grid points is ignored).
    """
    return max(0, math.ceil((numel - 1) * q - 1e-9))


def kept_count(numel: int, drop_fraction: float) -> int:
    """Entries kept by ``|values| ≥ percentile(|values|, 100·drop_fraction)`` for ``numel``
    distinct magnitudes: ``n − ⌈(n − 1)·drop_fraction⌉`` (at least one entry; 10.00% of a
    64×32×3×3 tensor at a drop fraction of 0.9), the reference implementations' rule."""
    return numel - percentile_rank(numel, drop_fraction) if numel else 0
