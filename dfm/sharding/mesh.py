"""The device mesh: `MeshConfig(data, fsdp, tensor)` and `make_mesh`.

Three named mesh axes, in this order (MaxText / flax `examples/gemma` naming):

- `data`: pure data parallelism (batch split, parameters replicated);
- `fsdp`: fully-sharded data parallelism (batch split *and* parameters split on "embed");
- `tensor`: tensor (model) parallelism (parameters split on "mlp", "heads", "kv_heads", "vocab").

Which logical axis goes to which mesh axis is data, not code: see `dfm.sharding.rules`.

Axis types are explicit: every mesh built here uses `jax.sharding.AxisType.Auto` on all three
axes (note `jax.make_mesh` defaults to `Explicit`). With Auto axes the compiler (GSPMD /
Shardy) propagates shardings from the `NamedSharding`s we pin on jit inputs/outputs and from
`jax.lax.with_sharding_constraint` on activations; array types do not carry shardings and no
`out_sharding=` arguments are needed inside the model.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")
"""Names of the mesh axes, in mesh order."""


@dataclass(frozen=True)
class MeshConfig:
    """Sizes of the `data`, `fsdp` and `tensor` mesh axes.

    Attributes:
      data: size of the data-parallel axis.
      fsdp: size of the fully-sharded data-parallel axis.
      tensor: size of the tensor-parallel axis.

    Exactly one size may be -1: it is filled so that the product equals the device count
    (`MeshConfig()` = all devices on `data`). The same fields can come from a TOML table
    `[mesh] data = -1, fsdp = 1, tensor = 1` via `MeshConfig.from_mapping`.

    Raises:
      ValueError: naming the field, when a size is not a positive int or -1, or more than one
        size is -1.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        for name in MESH_AXES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
                raise ValueError(f"{name}: must be a positive int or -1 (fill), got {value!r}")
        if sum(getattr(self, name) == -1 for name in MESH_AXES) > 1:
            raise ValueError(f"MeshConfig: at most one axis size may be -1, got {asdict(self)}")

    @classmethod
    def from_mapping(cls, table: Mapping[str, int]) -> "MeshConfig":
        """Build from a dict such as a parsed TOML `[mesh]` table; unknown keys are a ValueError."""
        unknown = sorted(set(table) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"mesh: unknown keys {unknown}; expected a subset of {list(MESH_AXES)}")
        return cls(**dict(table))

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """`(data, fsdp, tensor)` with the -1 filled for `num_devices` devices.

        Raises ValueError (`num_devices`) when the sizes do not multiply to `num_devices` or the
        fixed sizes do not divide it.
        """
        if not isinstance(num_devices, int) or num_devices < 1:
            raise ValueError(f"num_devices: must be a positive int, got {num_devices!r}")
        sizes = [getattr(self, name) for name in MESH_AXES]
        fixed = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % fixed:
                raise ValueError(
                    f"num_devices: {num_devices} devices are not divisible by the fixed mesh sizes "
                    f"{dict(zip(MESH_AXES, sizes))} (product {fixed})")
            sizes = [num_devices // fixed if s == -1 else s for s in sizes]
        elif fixed != num_devices:
            raise ValueError(
                f"num_devices: mesh sizes {dict(zip(MESH_AXES, sizes))} need {fixed} devices, got {num_devices}")
        return tuple(sizes)


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `jax.sharding.Mesh` with axes `("data", "fsdp", "tensor")`, all of type `AxisType.Auto`.

    Args:
      config: axis sizes (default `MeshConfig()`: every device on `data`).
      devices: the devices to use (default `jax.devices()`, i.e. all devices of all processes).
        With the default, `jax.make_mesh` orders devices for the physical topology (ICI / NVLink
        neighbours on the last axes); an explicit list is used in the order given.

    Returns:
      A mesh of shape `config.shape(len(devices))`. Auto axis types: shardings are pinned on jit
      inputs/outputs and by `with_sharding_constraint` (see the module docstring).

    Raises:
      ValueError: (`num_devices`) the sizes do not fit the device count.
    """
    config = MeshConfig() if config is None else config
    if not isinstance(config, MeshConfig):
        raise ValueError(f"config: expected a MeshConfig, got {type(config).__name__}")
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if devices is None:
        shape = config.shape(jax.device_count())
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
    devices = list(devices)
    shape = config.shape(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def mesh_shape(mesh) -> dict[str, int]:
    """`{axis name: size}` of a concrete or abstract mesh."""
    return dict(mesh.shape)

