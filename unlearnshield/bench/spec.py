"""Sweep specifications: TOML presets, ``--set`` overrides, and their expansion into cells.

A sweep specification is a nested dict (a TOML file under ``presets/``) with the sections
``sweep``, ``data``, ``model``, ``training``, ``unlearning``, ``defenses``, ``attack``,
``metrics`` and ``runtime``. Every preset is merged onto :data:`SPEC_DEFAULTS`, whose
comments document each setting. The axes of a sweep are lists: ``data.datasets``,
``unlearning`` (a list of tables), ``defenses`` (a list of tables, each optionally with a
``grid`` of option values), ``attack.attackers``, ``sweep.seeds``, and the forget samples
(``data.forget_samples`` draws from θo's training members). :func:`plan_cells` resolves
every name to the settings it stands for (a training recipe, an unlearning preset, an attack
budget, a defense's defaults), so a cell's key changes when the settings behind a name do.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover (Python 3.10)
    import tomli as tomllib  # type: ignore[no-redef]

from unlearnshield.attacks import ATTACKERS, BUDGETS, ENGINES, DefenseAwareAttacker
from unlearnshield.attacks.config import KEYLESS_AT_DEFAULT, AttackConfig
from unlearnshield.data import DATASETS
from unlearnshield.defenses import build_defense
from unlearnshield.models import MODELS
from unlearnshield.training import RECIPES
from unlearnshield.unlearning import UNLEARNERS

KEY_LENGTH = 16
"""Hex digits of a cell key (64 bits of SHA-256)."""

ATTACK_OFF = "off"
"""``attack.budget`` value that skips the reconstruction (cost sweeps): no privacy metrics."""

LABEL_MODES = ("given", "inferred")
"""``attack.labels``: the threat model grants the label, or the attacker infers it."""

SPEC_DEFAULTS: dict[str, Any] = {
    "sweep": {
        # name and description of the sweep, for reports
        "name": "custom",
        "description": "",
        # report layout (a name of unlearnshield.bench.report.LAYOUTS) and the paper's table
        # to print beside ours ("" = none)
        "layout": "table1",
        "paper": "",
        # seeds of the cells: each seeds the unlearning, the defense and the attack
        "seeds": [0],
    },
    "data": {
        "datasets": ["digits"],
        # training images drawn for θo: "recipe" = the recipe's subset, 0 = all, N = N
        "train_subset": "recipe",
        # forget samples per (dataset, model, θo): drawn from θo's training members
        "forget_samples": 4,
        "forget_seed": 0,
    },
    "model": {"name": "convnet", "options": {"width": 16, "stem_stride": 2}},
    "training": {"recipe": "cpu", "seed": 0, "options": {}},
    "unlearning": [{"method": "ga-step", "preset": "cpu", "options": {}}],
    "defenses": [{"name": "none"}, {"name": "shield"}],
    "attack": {
        "attackers": ["standard"],
        # a name of BUDGETS, or "off"; options override fields of that budget
        "budget": "cpu",
        "options": {},
        # options per attacker name, e.g. {"defense-aware": {"refresh_every": 50}}; the
        # defense-aware attacker simulates the cell's own defense with its settings
        "attacker_options": {},
        # defense names per attacker name, e.g. {"defense-aware": ["shield"]}: that attacker
        # is paired only with those defenses (default: every attacker with every defense)
        "only_against": {},
        "labels": "given",
        "engine": "batched",
        # forget samples attacked in one batched run (cells that differ only in the sample)
        "batch": 8,
    },
    "metrics": {
        "lpips": True,
        "mia": True,
        # shadow members of the SVC MIA (0 = as many as shadow non-members, SalUn's balance)
        "mia_shadow_size": 2000,
        "mia_holdout_fraction": 0.5,
        "mia_seed": 0,
    },
    "runtime": {
        # where things are; none of these enter a cell's key
        "data_root": "",
        "data_roots": {},
        "lpips_backbone": "",
        "device": "auto",
        "threads": 1,
        "gpus_per_task": 1.0,
        # tqdm bars of training, unlearning and attack: true, false, or "auto" (terminal)
        "progress": False,
        # other run folders: their finished records and cached models with the same keys
        # are copied instead of recomputed
        "reuse": [],
    },
}


class SpecError(ValueError):
    """A sweep specification or override is invalid (the message names the setting)."""


# ---------------------------------------------------------------------------------------------
# Presets and overrides


def preset_names() -> list[str]:
    """The names of the TOML presets shipped with the package, sorted."""
    folder = resources.files("unlearnshield.bench") / "presets"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_preset(preset: str | Path) -> dict[str, Any]:
    """A preset by name (``"table1-cpu"``) or TOML path, merged onto :data:`SPEC_DEFAULTS`.

    Raises:
        SpecError: unknown preset name, unreadable file or invalid TOML.
    """
    path = Path(preset)
    if path.suffix == ".toml" or path.exists():
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise SpecError(f"cannot read preset file {path}: {err}") from None
    else:
        if preset not in preset_names():
            raise SpecError(
                f"unknown preset {preset!r}; choose one of: {', '.join(preset_names())}"
            )
        text = (resources.files("unlearnshield.bench") / "presets" / f"{preset}.toml").read_text(
            encoding="utf-8"
        )
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"preset {preset}: invalid TOML: {err}") from None
    return merge_spec(raw)


def merge_spec(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` merged onto :data:`SPEC_DEFAULTS` (tables merge key by key, lists replace).

    Raises:
        SpecError: a top-level section or a section key that the defaults do not know.
    """
    spec = copy.deepcopy(SPEC_DEFAULTS)
    for section, value in raw.items():
        if section not in spec:
            raise SpecError(f"unknown section [{section}]; sections are: {', '.join(sorted(spec))}")
        if isinstance(spec[section], dict) and isinstance(value, Mapping):
            for key, item in value.items():
                if key not in spec[section]:
                    raise SpecError(
                        f"unknown setting {section}.{key}; known: "
                        f"{', '.join(sorted(spec[section]))}"
                    )
                spec[section][key] = copy.deepcopy(item)
        else:
            spec[section] = copy.deepcopy(value)
    return spec


def apply_overrides(spec: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a copy of ``spec``: ``{"attack.budget": "paper"}``.

    A numeric path segment indexes a list (``defenses.1.options.lr``). Every segment but the
    last must exist; the last may be new only inside an ``options`` or ``grid`` table, or
    be one of :data:`_ENTRY_KEYS` of a list entry. A string given
    where the specification holds a list of tables (``defenses=none,shield``) is split at
    commas into tables of names; any other scalar given for a list becomes a one-item list.

    Raises:
        SpecError: a path that does not exist, or a new key outside an ``options`` table.
    """
    out = copy.deepcopy(dict(spec))
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node: Any = out
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, ".".join(parts[: depth + 1]))
        last = parts[-1]
        if isinstance(node, list):
            index = _index(node, last, dotted)
            node[index] = value
            continue
        if not isinstance(node, dict):
            raise SpecError(f"--set {dotted}: {'.'.join(parts[:-1])} is not a table")
        in_table = len(parts) >= 2 and parts[-2] in ("options", "grid")
        in_entry = len(parts) >= 2 and parts[-2].isdigit() and last in _ENTRY_KEYS
        if last not in node and not (in_table or in_entry):
            known = ", ".join(sorted(node)) or "(none)"
            raise SpecError(f"--set {dotted}: no setting {last!r} here; known: {known}")
        node[last] = _coerce(node.get(last), value, parts[0])
    return out


_ENTRY_KEYS = ("label", "options", "grid", "preset")
"""Keys an entry of ``defenses`` or ``unlearning`` may gain from an override."""


def _child(node: Any, part: str, where: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, where)]
    if not isinstance(node, dict) or part not in node:
        raise SpecError(f"--set: no setting {where!r}")
    return node[part]


def _index(node: list[Any], part: str, where: str) -> int:
    try:
        index = int(part)
    except ValueError:
        raise SpecError(f"--set {where}: {part!r} must be a list index") from None
    if not -len(node) <= index < len(node):
        raise SpecError(f"--set {where}: index {index} outside a list of {len(node)}")
    return index


def _coerce(current: Any, value: Any, section: str) -> Any:
    """A ``--set`` value shaped like the setting it replaces."""
    if not isinstance(current, list) or isinstance(value, list):
        return value
    if current and isinstance(current[0], dict) and isinstance(value, str):
        field = "method" if section == "unlearning" else "name"
        return [{field: name.strip()} for name in value.split(",") if name.strip()]
    if isinstance(value, str) and "," in value:
        return [v.strip() for v in value.split(",") if v.strip()]
    return [value]


# ---------------------------------------------------------------------------------------------
# Keys


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the text a key is hashed from."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def stable_key(obj: Any) -> str:
    """The first :data:`KEY_LENGTH` hex digits of SHA-256 of :func:`canonical_json`."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:KEY_LENGTH]


# ---------------------------------------------------------------------------------------------
# Cells


@dataclasses.dataclass(frozen=True)
class Cell:
    """One result of a sweep: one forget sample through one full pipeline.

    Attributes:
        key: :func:`stable_key` of ``config``.
        config: the resolved, JSON-serialisable settings (nested); every setting that
            changes the result is here, nothing else.
        display: labels for reports (sweep name, layout, defense label); not hashed.
        index: position in the sorted sweep.
    """

    key: str
    config: dict[str, Any]
    display: dict[str, Any]
    index: int

    @property
    def group_key(self) -> str:
        """Key of the cell's settings without the forget sample: cells sharing it can be
        attacked in one batched run."""
        config = {k: v for k, v in self.config.items() if k != "forget"}
        return stable_key({**config, "forget_seed": self.config["forget"]["seed"]})

    @property
    def original_key(self) -> str:
        """Key of θo's settings (dataset, model, training)."""
        return original_key(self.config)

    @property
    def unlearned_key(self) -> str:
        """Key of θu's settings (θo, unlearning, forget sample, seed)."""
        c = self.config
        return stable_key(
            {
                "original": original_key(c),
                "unlearning": c["unlearning"],
                "forget": c["forget"],
                "seed": c["seed"],
            }
        )


def original_key(config: Mapping[str, Any]) -> str:
    """Key of the settings θo depends on: dataset, model and training."""
    return stable_key(
        {"dataset": config["dataset"], "model": config["model"], "training": config["training"]}
    )


@dataclasses.dataclass(frozen=True)
class Unit:
    """Cells executed together: same settings but the forget sample, attacked in one batch.

    Attributes:
        key: :func:`stable_key` of the member cells' keys.
        cells: the member cells, in sweep order.
        index: position among the sweep's units (``--shard`` takes units by this index).
    """

    key: str
    cells: tuple[Cell, ...]
    index: int


def _listify(value: Any, name: str) -> list[Any]:
    if isinstance(value, list):
        if not value:
            raise SpecError(f"{name} is an empty list: a sweep needs at least one value")
        return value
    return [value]


def _jsonable(obj: Any) -> Any:
    """Tuples to lists, recursively, so a resolved setting survives a JSON round trip."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def _resolve_training(spec: Mapping[str, Any]) -> dict[str, Any]:
    training = spec["training"]
    try:
        recipe = RECIPES.get(training["recipe"]).replace(**dict(training.get("options") or {}))
    except KeyError as err:
        raise SpecError(str(err.args[0])) from None
    except (TypeError, ValueError) as err:
        raise SpecError(f"training.options: {err}") from None
    subset = spec["data"]["train_subset"]
    if subset == "recipe":
        subset = recipe.subset
    elif isinstance(subset, bool) or not isinstance(subset, int) or subset < 0:
        raise SpecError(f"data.train_subset must be 'recipe', 0 (all) or N > 0, got {subset!r}")
    return {
        "recipe": training["recipe"],
        "hyperparameters": _jsonable(dataclasses.asdict(recipe)),
        "subset": subset or None,
        "seed": int(training["seed"]),
    }


def _resolve_unlearning(entry: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(entry, Mapping) or "method" not in entry:
        raise SpecError(f"each [[unlearning]] entry needs a method, got {entry!r}")
    unknown = sorted(set(entry) - {"method", "preset", "options", "label"})
    if unknown:
        raise SpecError(f"[[unlearning]] {entry['method']}: unknown keys {unknown}")
    try:
        unlearner = UNLEARNERS.get(entry["method"]).from_options(
            entry.get("preset"), **dict(entry.get("options") or {})
        )
    except KeyError as err:
        raise SpecError(str(err.args[0])) from None
    except ValueError as err:
        raise SpecError(f"[[unlearning]] {entry['method']}: {err}") from None
    return {
        "method": entry["method"],
        "preset": entry.get("preset"),
        "hyperparameters": _jsonable(dataclasses.asdict(unlearner.config)),
    }


def _expand_defense(entry: Mapping[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """One (resolved defense, label) per point of the entry's option grid."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, Mapping) or "name" not in entry:
        raise SpecError(f"each [[defenses]] entry needs a name, got {entry!r}")
    unknown = sorted(set(entry) - {"name", "label", "options", "grid"})
    if unknown:
        raise SpecError(f"[[defenses]] {entry['name']}: unknown keys {unknown}")
    grid = dict(entry.get("grid") or {})
    names = sorted(grid)
    points = itertools.product(*(_listify(grid[n], f"grid.{n}") for n in names))
    out = []
    for point in points:
        options = {**dict(entry.get("options") or {}), **dict(zip(names, point, strict=True))}
        try:
            defense = build_defense(entry["name"], **options)
        except KeyError as err:
            raise SpecError(str(err.args[0])) from None
        except (TypeError, ValueError) as err:
            raise SpecError(f"[[defenses]] {entry['name']} {options}: {err}") from None
        label = entry.get("label") or entry["name"]
        if names:
            label += " (" + ", ".join(f"{n}={v}" for n, v in zip(names, point, strict=True)) + ")"
        resolved = {"name": entry["name"], "hyperparameters": _jsonable(defense.describe())}
        out.append((resolved, label))
    return out


def _resolve_attack(spec: Mapping[str, Any], attacker: str) -> dict[str, Any]:
    attack = spec["attack"]
    if attacker not in ATTACKERS:
        raise SpecError(f"unknown attacker {attacker!r}; choose one of: {ATTACKERS.names()}")
    if attack["labels"] not in LABEL_MODES:
        raise SpecError(f"attack.labels must be one of {LABEL_MODES}, got {attack['labels']!r}")
    if attack["engine"] not in ENGINES:
        raise SpecError(f"attack.engine must be one of {ENGINES.names()}")
    batch = attack["batch"]
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise SpecError(f"attack.batch must be an integer ≥ 1, got {batch!r}")
    per_attacker = dict(attack.get("attacker_options") or {})
    unknown = sorted(set(per_attacker) - set(ATTACKERS.names()))
    if unknown:
        raise SpecError(f"attack.attacker_options: unknown attackers {unknown}")
    options = dict(per_attacker.get(attacker) or {})
    try:
        if attacker == DefenseAwareAttacker.name:
            DefenseAwareAttacker("none", **options)
        else:
            ATTACKERS.get(attacker)(**options)
    except (TypeError, ValueError) as err:
        raise SpecError(f"attack.attacker_options {options} for {attacker}: {err}") from None
    budget = attack["budget"]
    config: dict[str, Any] | None = None
    if budget != ATTACK_OFF:
        try:
            resolved = BUDGETS.get(budget).replace(**dict(attack.get("options") or {}))
        except KeyError as err:
            raise SpecError(str(err.args[0])) from None
        except (TypeError, ValueError) as err:
            raise SpecError(f"attack.options: {err}") from None
        config = _jsonable(dataclasses.asdict(resolved))
        for f in dataclasses.fields(AttackConfig):
            if f.metadata.get(KEYLESS_AT_DEFAULT) and config[f.name] == f.default:
                del config[f.name]
    return {
        "attacker": attacker,
        "attacker_options": options,
        "budget": budget,
        "config": config,
        "labels": attack["labels"],
        "engine": attack["engine"],
        "batch": batch,
    }


def attack_config(attack: Mapping[str, Any]) -> AttackConfig | None:
    """The :class:`AttackConfig` a cell's resolved ``attack`` settings describe (None: off)."""
    if attack["config"] is None:
        return None
    values = dict(attack["config"])
    values["lr_decay_at"] = tuple(values["lr_decay_at"])
    return AttackConfig(**values)


def _check_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    shadow = metrics["mia_shadow_size"]
    if isinstance(shadow, bool) or not isinstance(shadow, int) or shadow < 0:
        raise SpecError(f"metrics.mia_shadow_size must be an integer ≥ 0, got {shadow!r}")
    if not 0 < float(metrics["mia_holdout_fraction"]) < 1:
        raise SpecError("metrics.mia_holdout_fraction must lie in (0, 1)")
    return {k: metrics[k] for k in sorted(SPEC_DEFAULTS["metrics"])}


def _check_only_against(
    attack: Mapping[str, Any],
    attackers: Sequence[Mapping[str, Any]],
    defenses: Sequence[tuple[Mapping[str, Any], str]],
) -> dict[str, set[str]]:
    """``attack.only_against`` checked: attacker name → the defense names it is paired with."""
    only = attack.get("only_against") or {}
    if not isinstance(only, Mapping):
        raise SpecError(f"attack.only_against must be a table, got {only!r}")
    named = {a["attacker"] for a in attackers}
    present = {d["name"] for d, _ in defenses}
    out: dict[str, set[str]] = {}
    for attacker, names in only.items():
        if attacker not in named:
            raise SpecError(
                f"attack.only_against names {attacker!r}, which is not in attack.attackers "
                f"{sorted(named)}"
            )
        names = _listify(names, f"attack.only_against.{attacker}")
        missing = sorted(set(names) - present)
        if missing:
            raise SpecError(
                f"attack.only_against.{attacker}: {missing} not among the sweep's defenses "
                f"{sorted(present)}"
            )
        out[attacker] = set(names)
    return out


def plan_cells(spec: Mapping[str, Any]) -> list[Cell]:
    """Expand a specification into its sorted list of cells, validating every setting once.

    The order sorts cells that share everything but the forget sample next to each other,
    in the order of the forget draw; the list is the same on every machine.

    Raises:
        SpecError: any invalid setting, with its name.
    """
    sweep, data = spec["sweep"], spec["data"]
    datasets = _listify(data["datasets"], "data.datasets")
    for name in datasets:
        if name not in DATASETS:
            raise SpecError(f"unknown dataset {name!r}; choose one of: {DATASETS.names()}")
    model = spec["model"]
    if model["name"] not in MODELS:
        raise SpecError(f"unknown model {model['name']!r}; choose one of: {MODELS.names()}")
    n_forget = data["forget_samples"]
    if isinstance(n_forget, bool) or not isinstance(n_forget, int) or n_forget < 1:
        raise SpecError(f"data.forget_samples must be an integer ≥ 1, got {n_forget!r}")
    training = _resolve_training(spec)
    unlearning = [
        (_resolve_unlearning(e), str(e.get("label") or e["method"]))
        for e in _listify(spec["unlearning"], "unlearning")
    ]
    defenses = [d for e in _listify(spec["defenses"], "defenses") for d in _expand_defense(e)]
    attackers = [
        _resolve_attack(spec, a) for a in _listify(spec["attack"]["attackers"], "attack.attackers")
    ]
    seeds = _listify(sweep["seeds"], "sweep.seeds")
    metrics = _check_metrics(spec["metrics"])
    only_against = _check_only_against(spec["attack"], attackers, defenses)

    cells: list[tuple[str, int, dict[str, Any], dict[str, Any]]] = []
    axes = itertools.product(datasets, unlearning, defenses, attackers, seeds)
    for dataset, (unlearn, unlearn_label), (defense, label), attack, seed in axes:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise SpecError(f"sweep.seeds must hold integers ≥ 0, got {seed!r}")
        allowed = only_against.get(attack["attacker"])
        if allowed is not None and defense["name"] not in allowed:
            continue
        base = {
            "dataset": dataset,
            "model": {"name": model["name"], "options": dict(model.get("options") or {})},
            "training": training,
            "unlearning": unlearn,
            "defense": defense,
            "attack": attack,
            "metrics": metrics,
            "seed": seed,
        }
        display = {
            "sweep": sweep["name"],
            "description": sweep["description"],
            "layout": sweep["layout"],
            "paper": sweep["paper"],
            "defense_label": label,
            "unlearning_label": unlearn_label,
        }
        group = canonical_json(base)
        for rank in range(n_forget):
            config = {**base, "forget": {"seed": int(data["forget_seed"]), "rank": rank}}
            cells.append((group, rank, config, display))
    cells.sort(key=lambda c: (c[0], c[1]))
    out = [
        Cell(stable_key(config), config, display, i)
        for i, (_, _, config, display) in enumerate(cells)
    ]
    keys = [c.key for c in out]
    if len(set(keys)) != len(keys):
        raise SpecError("two cells of the sweep have identical settings; remove the duplicate")
    return out


def plan_units(cells: Iterable[Cell]) -> list[Unit]:
    """Chunk consecutive cells of one group into units of at most ``attack.batch`` cells."""
    units: list[Unit] = []
    current: list[Cell] = []
    for cell in cells:
        if current and (
            cell.group_key != current[0].group_key or len(current) >= cell.config["attack"]["batch"]
        ):
            units.append(Unit(stable_key([c.key for c in current]), tuple(current), len(units)))
            current = []
        current.append(cell)
    if current:
        units.append(Unit(stable_key([c.key for c in current]), tuple(current), len(units)))
    return units


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` → ``(i, n)`` with 0 ≤ i < n; None stays None.

    Raises:
        SpecError: malformed text or i outside [0, n).
    """
    if text is None:
        return None
    head, sep, tail = text.partition("/")
    try:
        i, n = int(head), int(tail)
    except ValueError:
        raise SpecError(f"--shard expects i/n such as 0/4, got {text!r}") from None
    if not sep or n < 1 or not 0 <= i < n:
        raise SpecError(f"--shard {text}: need 0 ≤ i < n")
    return i, n


def select_shard(units: list[Unit], shard: tuple[int, int] | None) -> list[Unit]:
    """The units whose index ``% n == i`` (all of them without a shard)."""
    if shard is None:
        return list(units)
    i, n = shard
    return [u for u in units if u.index % n == i]
