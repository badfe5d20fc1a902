"""Logical-axis rules kept as data (MaxText style): a table `[logical_name, mesh_axes]`.

Layers name the axes of every parameter with logical names only ("vocab", "embed", "mlp",
"heads", "kv_heads", "norm", see `dfm.models.layers`) and activations with "activation_*" names;
this table says which mesh axes (`dfm.sharding.mesh.MESH_AXES`) each logical name is split over.
A TOML table `rules = [["embed", "fsdp"], ["batch", ["data", "fsdp"]], ["norm", ""]]` parses with
`rules_from_table` ("" or [] = replicated).

Resolution (`logical_to_spec`) is deliberately forgiving so one table fits every mesh and model:
mesh axes absent from the mesh or of size 1 are dropped, a mesh axis already used by an earlier
dimension of the same array is dropped, and a dimension whose size is not divisible by the
product of its mesh axes keeps only the longest prefix of them that divides it (else it is
replicated). So `vocab = 50` on `tensor = 4` is replicated rather than an error.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence

import jax
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import NamedSharding, PartitionSpec

from dfm.sharding.mesh import MESH_AXES

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

DEFAULT_RULES: Rules = (
    # inputs and activations
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # parameters (names used by dfm.models.layers / decoder)
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("norm", None),
    ("layers", None),
)
"""The default table: batch over `data` x `fsdp`; parameters FSDP-sharded on "embed" and
tensor-parallel on "mlp" / "heads" / "kv_heads" / "vocab" (Megatron layout); residual-stream
activations `[batch, length, embed]` split on batch only."""


def _normalize_axes(value, name: str) -> MeshAxes:
    if value is None or value == "" or (isinstance(value, (list, tuple)) and len(value) == 0):
        return None
    axes = (value,) if isinstance(value, str) else tuple(value)
    for axis in axes:
        if axis not in MESH_AXES:
            raise ValueError(f"rules: logical axis {name!r} maps to unknown mesh axis {axis!r}; "
                             f"mesh axes are {list(MESH_AXES)}")
    if len(set(axes)) != len(axes):
        raise ValueError(f"rules: logical axis {name!r} repeats a mesh axis: {list(axes)}")
    return axes[0] if len(axes) == 1 else axes


def rules_from_table(table: Iterable[Sequence] | Mapping[str, object]) -> Rules:
    """Validate and normalize a rules table.

    Args:
      table: rows `[logical_name, mesh_axes]` (lists from TOML, or tuples), or a mapping
        `{logical_name: mesh_axes}`; `mesh_axes` is a mesh axis name, a list of them, or
        None / "" / [] for replicated.
    Returns:
      A hashable `Rules` tuple `((name, None | "axis" | ("a", "b")), ...)`.
    Raises:
      ValueError: (`rules`) a row that is not a pair, a non-string or repeated logical name, an
        unknown or repeated mesh axis.
    """
    rows = table.items() if isinstance(table, Mapping) else table
    out, seen = [], set()
    for row in rows:
        if isinstance(row, str) or len(row) != 2:
            raise ValueError(f"rules: each row must be [logical_name, mesh_axes], got {row!r}")
        name, axes = row
        if not isinstance(name, str) or not name:
            raise ValueError(f"rules: logical names must be non-empty strings, got {name!r}")
        if name in seen:
            raise ValueError(f"rules: logical axis {name!r} appears twice")
        seen.add(name)
        out.append((name, _normalize_axes(axes, name)))
    return tuple(out)


def _as_rules(rules) -> Rules:
    return DEFAULT_RULES if rules is None else rules_from_table(rules)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None, mesh_sizes: Mapping[str, int],
                    rules=None) -> PartitionSpec:
    """The `PartitionSpec` of an array whose dimensions carry logical `names`.

    Args:
      names: one logical name (or None = replicated) per dimension.
      shape: the array shape (None skips the divisibility rule).
      mesh_sizes: `{mesh axis: size}` (`dict(mesh.shape)`).
      rules: a rules table (default `DEFAULT_RULES`).
    Returns:
      `PartitionSpec` with one entry per dimension (None, an axis name, or a tuple of names),
      after the forgiving resolution of the module docstring.
    Raises:
      ValueError: (`names`) a logical name with no rule, or `len(names) != len(shape)`.
    """
    table = dict(_as_rules(rules))
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"names: {len(names)} logical names for an array of shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"names: logical axis {name!r} has no rule; rules cover {sorted(table)}")
        axes = table[name]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        axes = [a for a in axes if mesh_sizes.get(a, 1) > 1 and a not in used]
        if shape is not None:
            while axes and shape[dim] % math.prod(mesh_sizes[a] for a in axes):
                axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def logical_sharding(names: Sequence[str | None], shape: Sequence[int] | None, mesh: jax.sharding.Mesh,
                     rules=None) -> NamedSharding:
    """`NamedSharding(mesh, logical_to_spec(names, shape, mesh sizes, rules))`."""
    return NamedSharding(mesh, logical_to_spec(names, shape, dict(mesh.shape), rules))


def active_rules() -> Rules | None:
    """The rules of the enclosing `use_rules` block, or None outside one (or with no mesh set)."""
    if jax.sharding.get_abstract_mesh().empty:
        return None
    rules = core_spmd.get_logical_axis_rules()
    return tuple(rules) if rules else None


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint(x, spec of names)` inside `use_rules`; `x` unchanged outside.

    Used on activations, e.g. the residual stream `[batch, length, embed]` with
    `("activation_batch", "activation_length", "activation_embed")`. With no mesh (plain CPU,
    `mesh=None` training) this is the identity, so models run unchanged on one device.
    """
    rules = active_rules()
    if rules is None:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    spec = logical_to_spec(names, x.shape, dict(mesh.shape), rules)
    return jax.lax.with_sharding_constraint(x, spec)


@contextlib.contextmanager
def use_rules(mesh: jax.sharding.Mesh, rules=None):
    """Context: `jax.set_mesh(mesh)` plus flax `nnx.logical_axis_rules(rules)`.

    Inside it `constrain` pins activation shardings, and `nnx.get_partition_spec` / eager
    sharding at parameter creation use the same table. The sharded train / eval steps of
    `dfm.train` trace inside this context; code outside it is unaffected. Because `jax.set_mesh`
    is part of jit's cache key, a function traced here is not reused outside.
    """
    with jax.set_mesh(mesh), nnx.logical_axis_rules(_as_rules(rules)):
        yield
