"""The update step's input: one typed batch with optional per-token fields.

Every field's leading axis is the batch ``B = prompts x G`` (rows of a group are
contiguous). The schema is written once, in :data:`FIELDS`: its symbolic shape and dtype.
A method declares the optional fields it needs (``Method.fields``), the run adds
``ref_logprobs`` when the policy loss has a KL term, and a field that is not needed stays
``None`` (an empty pytree node: it is neither sharded, transferred nor traced).

Shapes: ``P`` student prompt width, ``N`` response length, ``Pt`` teacher prompt width.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .sharding import DEFAULT_RULES

#: field -> (symbolic shape, dtype). ``B`` rows, ``P``/``Pt`` prompt widths, ``N`` response.
FIELDS: dict[str, tuple[tuple[str, ...], object]] = {
    "prompt_ids": (("B", "P"), jnp.int32),  # left-padded student prompts
    "prompt_mask": (("B", "P"), jnp.int32),
    "response_ids": (("B", "N"), jnp.int32),  # right-padded responses
    "response_mask": (("B", "N"), jnp.int32),
    "rewards": (("B",), jnp.float32),
    "sampler_logprobs": (("B", "N"), jnp.float32),  # the rollout sampler's own log-probs
    "old_logprobs": (("B", "N"), jnp.float32),  # the policy before this step
    # optional
    "ref_logprobs": (("B", "N"), jnp.float32),  # frozen reference (policy.kl_beta > 0)
    "teacher_logprobs": (("B", "N"), jnp.float32),  # the response re-scored with context
    "entropy": (("B", "N"), jnp.float32),  # the old policy's per-token entropy
    "importance": (("B", "N"), jnp.float32),  # OAR's per-token outcome importance
    "answer_mask": (("B", "N"), jnp.int32),  # 1 on the verifier's final-answer span (OAR)
    "teacher_prompt_ids": (("B", "Pt"), jnp.int32),  # in-step teacher prompts (SDPO)
    "teacher_prompt_mask": (("B", "Pt"), jnp.int32),
    "teacher_valid": (("B",), jnp.int32),  # 1 where the row has a teacher context
}
REQUIRED = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "rewards",
            "sampler_logprobs", "old_logprobs")
OPTIONAL = tuple(k for k in FIELDS if k not in REQUIRED)


@struct.dataclass
class UpdateBatch:
    """One optimizer step's rows (see :data:`FIELDS` for every field's shape)."""

    prompt_ids: jax.Array
    prompt_mask: jax.Array
    response_ids: jax.Array
    response_mask: jax.Array
    rewards: jax.Array
    sampler_logprobs: jax.Array
    old_logprobs: jax.Array
    ref_logprobs: jax.Array | None = None
    teacher_logprobs: jax.Array | None = None
    entropy: jax.Array | None = None
    importance: jax.Array | None = None
    answer_mask: jax.Array | None = None
    teacher_prompt_ids: jax.Array | None = None
    teacher_prompt_mask: jax.Array | None = None
    teacher_valid: jax.Array | None = None

    @property
    def present(self) -> tuple[str, ...]:
        """Names of the fields that are set."""
        return tuple(k for k in FIELDS if getattr(self, k) is not None)

    @property
    def num_rows(self) -> int:
        return int(self.rewards.shape[0])

    def require(self, fields: Iterable[str]) -> "UpdateBatch":
        """``self``, or a ``ValueError`` naming the missing fields."""
        missing = [k for k in fields if getattr(self, k) is None]
        if missing:
            raise ValueError(f"update batch lacks {missing}; it has {list(self.present)}")
        return self

    def shardings(self, mesh: Mesh, rules=DEFAULT_RULES) -> "UpdateBatch":
        """The same structure with a ``NamedSharding`` per field: rows over the batch axes
        (``data`` x ``fsdp``), the other axes replicated."""
        axes = dict(rules)["batch"]
        return jax.tree.map(
            lambda x: NamedSharding(mesh, PartitionSpec(axes, *([None] * (x.ndim - 1)))), self)

    def to_host(self) -> "UpdateBatch":
        return jax.tree.map(np.asarray, self)


def validate_fields(fields: Iterable[str]) -> tuple[str, ...]:
    """The optional ``fields`` in schema order; an unknown name is an error."""
    fields = set(fields)
    unknown = fields - set(OPTIONAL)
    if unknown:
        raise ValueError(f"unknown update-batch fields {sorted(unknown)}; optional fields: "
                         f"{list(OPTIONAL)}")
    return tuple(k for k in OPTIONAL if k in fields)


def abstract_batch(fields: Iterable[str], *, rows: int, prompt: int, response: int,
                   teacher_prompt: int | None = None, mesh: Mesh | None = None,
                   rules=DEFAULT_RULES) -> UpdateBatch:
    """An :class:`UpdateBatch` of ``ShapeDtypeStruct``s holding the required fields plus
    the optional ``fields`` (sharded over the batch axes when ``mesh`` is given)."""
    sizes = {"B": rows, "P": prompt, "N": response, "Pt": teacher_prompt or prompt}
    wanted = set(REQUIRED) | set(validate_fields(fields))
    values = {k: jax.ShapeDtypeStruct(tuple(sizes[d] for d in dims), dtype)
              for k, (dims, dtype) in FIELDS.items() if k in wanted}
    batch = UpdateBatch(**values)
    if mesh is None:
        return batch
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        batch, batch.shardings(mesh, rules))


def make_batch(**values) -> UpdateBatch:
    """An :class:`UpdateBatch`; host (numpy) values are cast to the schema's dtypes, device
    arrays and ``None`` are kept as they are."""
    return UpdateBatch(**{k: v if v is None or isinstance(v, jax.Array)
                          else np.asarray(v, FIELDS[k][1]) for k, v in values.items()})
