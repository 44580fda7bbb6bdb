"""The typed training config: one frozen dataclass per concern, built from YAML.

``python run.py train --config configs/quickstart.yaml key=value ...`` builds a
:class:`TrainConfig` with :func:`amrsd_jax.config.load_config`; an unknown or mistyped key
is an error naming the nearest valid key, and impossible combinations are rejected here,
before any model is loaded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..batch import UpdateBatch, abstract_batch
from ..config import ConfigError, load_config, to_dict
from ..losses.policy import PolicyLossConfig
from ..methods import Method, get_method, method_settings
from ..rewards import resolve_reward_name
from ..rollout.sampler import bucket_length
from ..update import OptimizerConfig, StepConfig

DATA_SOURCES = ("arithmetic", "local", "tfds")
ON_LONG_PROMPT = ("skip", "truncate")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to train and in which precision."""

    name: str = "smollm2-135m-instruct"  # bundled name or a local HF checkpoint directory
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str | None = None  # defaults to dtype
    remat: bool = False  # per-layer activation checkpointing
    system_prompt: str | None = None  # None keeps the chat template's default

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):
            v = getattr(self, name)
            if v is not None and v not in ("float32", "bfloat16"):
                raise ValueError(f"{name} must be 'float32' or 'bfloat16', got {v!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where prompts come from.

    ``source``: ``arithmetic`` (built-in, offline), ``local`` (JSONL/Parquet at ``path``) or
    ``tfds`` (TensorFlow Datasets ``tfds_name`` from ``tfds_data_dir``). ``question_field``
    / ``answer_field`` / ``solution_field`` name the row fields of local and TFDS data.
    """

    source: str = "arithmetic"
    level: tuple[int, ...] = (0,)  # arithmetic difficulty levels (0-4)
    seed: int = 0  # arithmetic task seed (which problems exist); shuffling uses the run seed
    train_size: int = 2000
    eval_size: int = 64
    path: str | None = None  # local: the training file
    eval_path: str | None = None  # local: the held-out file (None: no evaluation)
    tfds_name: str | None = None
    tfds_data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    question_field: str = "question"
    answer_field: str = "answer"
    solution_field: str | None = None
    answer_from_solution: bool = False  # GSM8K: final answer after '####' of the solution
    prompt_suffix: str | None = "Give the final answer after 'Answer:'."
    max_prompt_tokens: int = 192
    on_long_prompt: str = "skip"  # skip | truncate (keep the last tokens), counted either way

    def __post_init__(self):
        if self.source not in DATA_SOURCES:
            raise ValueError(f"data.source must be one of {DATA_SOURCES}, got {self.source!r}")
        if self.source == "local" and not self.path:
            raise ValueError("data.source=local needs data.path (a .jsonl or .parquet file)")
        if self.source == "tfds" and not self.tfds_name:
            raise ValueError("data.source=tfds needs data.tfds_name (e.g. gsm8k)")
        if self.on_long_prompt not in ON_LONG_PROMPT:
            raise ValueError(f"data.on_long_prompt must be one of {ON_LONG_PROMPT}, "
                             f"got {self.on_long_prompt!r}")
        if self.max_prompt_tokens < 8:
            raise ValueError(f"data.max_prompt_tokens={self.max_prompt_tokens} is too small")

    @property
    def has_reference_solutions(self) -> bool:
        """Whether examples carry a reference solution (RLSD and opt-in reflection need it)."""
        if self.source == "arithmetic":
            return True
        return bool(self.solution_field or self.answer_from_solution)


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Sampling of the G rollouts per prompt."""

    prompts_per_step: int = 4
    group_size: int = 8
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"rollout.group_size={self.group_size}: group-relative advantages "
                             "need at least 2 rollouts per prompt")
        if self.prompts_per_step < 1:
            raise ValueError(f"rollout.prompts_per_step must be >= 1, got {self.prompts_per_step}")
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.group_size


@dataclasses.dataclass(frozen=True)
class ReflectionConfig:
    """AMR-SD meta-reflection (SPEC.md step 2)."""

    max_tokens: int = 96  # reflection_max_tokens
    temperature: float = 0.7
    top_p: float = 1.0
    use_peer: bool = True  # a verifier-approved peer rollout, when one exists
    use_reference_solution: bool = False  # opt-in source (reflection_sources), off by default
    leak_guard: bool = True
    max_prompt_tokens: int = 640  # the reflection request (question, attempt, peer); truncated
    # a teacher prompt's budget: its privileged part (reflection, peer or reference
    # solution, feedback) is cut from its end to fit; the question is never cut
    max_teacher_prompt_tokens: int = 384
    # self: the policy writes the hint/critique (AMR-SD) | raw_peer: ablation, the teacher
    # sees a verifier-approved peer rollout verbatim instead (rows without one get no signal)
    source: str = "self"
    # Reflect on and teacher-score only the rows whose update the gate can change: groups
    # with unequal rewards (an all-equal group has A_i = 0, so Ahat = 0 whatever D is), and
    # nothing once the gate is annealed to 0. Exact: the loss is unchanged; skipped rows
    # carry CIG 0 in the logged quantiles.
    skip_uninformative: bool = True
    # standalone: a new conversation quoting the question and the attempt | follow_up: a
    # next user turn after the attempt, prefilled on top of the rollout's KV cache (only
    # the request's own tokens are computed; the cache is kept until the reflections exist)
    request: str = "standalone"

    def __post_init__(self):
        if self.source not in ("self", "raw_peer"):
            raise ValueError(f"reflection.source must be 'self' or 'raw_peer', got "
                             f"{self.source!r}")
        if self.request not in ("standalone", "follow_up"):
            raise ValueError(f"reflection.request must be 'standalone' or 'follow_up', got "
                             f"{self.request!r}")


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """The teacher's weights, for methods that have a teacher (SPEC.md); every value left
    ``None`` keeps the method's recipe (AMR-SD: live; RLSD: frozen, refreshed every 20
    steps; SDPO: EMA, rate 0.05). See ``amrsd_jax.methods.base.TeacherPolicy``."""

    weights: str | None = None  # live | ema | frozen
    ema_rate: float | None = None  # weights=ema: teacher <- (1 - rate) teacher + rate policy
    refresh_every: int | None = None  # weights=frozen: copy the policy every N steps (0: never)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """The verifier: a registered reward function by name (``math``, ``math_strict``,
    ``gsm8k``, ``math500``, ``format`` ...).

    ``strict`` (built-in math verifiers only): require a ``\\boxed{}`` / ``####`` /
    ``Answer:`` marker and reward 0 for truncated responses. ``None``: strict when
    ``data.prompt_suffix`` asks for a marked answer (the built-in suffix does), and always
    for ``gsm8k`` / ``math500`` / ``math_strict``; the name actually called is
    ``amrsd_jax.rewards.resolve_reward_name(name, strict, data.prompt_suffix)``.
    """

    name: str = "math"
    strict: bool | None = None  # None: strict iff the prompt asks for a marked answer
    format_weight: float = 0.0  # added format reward weight (0 = off)
    success_threshold: float = 1.0  # "correct" when reward >= this
    timeout_s: float = 1.0  # per call, cooperative (the built-in verifiers check it)
    wall_timeout_s: float | None = 10.0  # per call, enforced: a hanging reward gets 0
    on_error: str = "zero"  # zero: that row's reward is 0 | drop_group: its group leaves the step

    def __post_init__(self):
        if self.on_error not in ("zero", "drop_group"):
            raise ValueError(f"reward.on_error must be 'zero' or 'drop_group', got "
                             f"{self.on_error!r}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """``(data, fsdp, tensor)`` device mesh; ``data=-1`` takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Periodic held-out evaluation: pass@1 (greedy and sampled) and pass@k."""

    every: int = 10  # steps; 0 = never (except at the end if at_end)
    at_start: bool = True
    at_end: bool = True
    num_samples: int = 4  # k of pass@k (samples per question at `temperature`)
    temperature: float = 1.0
    max_new_tokens: int = 96
    batch_size: int = 64  # prompts per generate call


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under ``<output_dir>/checkpoints``."""

    every: int = 10  # steps; 0 = only at the end
    max_to_keep: int = 2
    async_save: bool = True
    save_at_end: bool = True


@dataclasses.dataclass(frozen=True)
class RunShapes:
    """The array shapes of one training iteration (as the trainer pads them)."""

    rows: int  # B = prompts_per_step * group_size
    micro_rows: int  # rows per micro-batch of the update step
    prompt: int  # P: student prompt width (bucketed data.max_prompt_tokens)
    response: int  # N: rollout.max_new_tokens (the sampler returns exactly N columns)
    teacher_prompt: int  # Pt: teacher prompt width (bucketed, at least P)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole training run."""

    method: str = "amr_sd"
    # per-method settings keyed by method name (method_config.amr_sd.tau=0.3); only the
    # selected method's section is used, every section is validated
    method_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    steps: int = 60
    seed: int = 0
    output_dir: str = "runs/{method}-seed{seed}"  # {method} and {seed} are filled in
    micro_batches: int = 1
    advantage_scale: str = "group"
    # A_i = (r_i - mean) / (std + eps): TRL's defaults (unbiased std, eps 1e-4); verl also
    # uses the unbiased std (eps 1e-6); 0 gives the population std
    advantage_std_ddof: int = 1
    advantage_eps: float = 1e-4
    max_consecutive_skips: int = 5  # non-finite steps in a row before the run stops
    vocab_chunk: int | None = None
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    reflection: ReflectionConfig = ReflectionConfig()
    teacher: TeacherConfig = TeacherConfig()
    reward: RewardConfig = RewardConfig()
    policy: PolicyLossConfig = PolicyLossConfig()
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-6)
    mesh: MeshConfig = MeshConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        method = get_method(self.method)  # unknown name -> error naming the nearest
        try:
            object.__setattr__(self, "output_dir",
                               self.output_dir.format(method=self.method, seed=self.seed))
        except (KeyError, IndexError) as e:
            raise ValueError(f"output_dir {self.output_dir!r}: only {{method}} and {{seed}} "
                             f"can be filled in ({e})") from None
        if not isinstance(self.method_config, dict):
            raise ValueError("method_config must map method names to their settings, e.g. "
                             "method_config: {amr_sd: {tau: 0.3}}")
        for name in self.method_config:
            self.method_settings(name)  # validates every section now, not at step 1
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.rollout.batch_size % self.micro_batches:
            raise ValueError(
                f"micro_batches={self.micro_batches} does not divide the step's "
                f"{self.rollout.batch_size} rollouts (prompts_per_step x group_size)")
        method.check_run(self)
        self.make_method()  # the method's settings and teacher overrides, checked now
        self.reward_name()  # e.g. reward.strict=true with a custom reward
        if self.reflection.use_reference_solution and not self.data.has_reference_solutions:
            raise ValueError("reflection.use_reference_solution=true needs reference solutions "
                             "in the data (set data.solution_field)")
        if self.advantage_std_ddof not in (0, 1):
            raise ValueError(f"advantage_std_ddof must be 0 or 1, got {self.advantage_std_ddof}")
        if self.advantage_eps < 0:
            raise ValueError(f"advantage_eps must be >= 0, got {self.advantage_eps}")
        if self.advantage_scale not in ("group", "batch", "none"):
            raise ValueError(f"advantage_scale must be group, batch or none, got "
                             f"{self.advantage_scale!r}")

    def method_settings(self, name: str | None = None):
        """Method ``name``'s (default: the selected method's) config dataclass built from
        ``method_config[name]``, or None for a method without settings."""
        name = name or self.method
        return method_settings(name, self.method_config.get(name))

    def reward_name(self) -> str:
        """The registered reward the verifier calls: ``reward.name`` resolved with
        ``reward.strict`` and whether ``data.prompt_suffix`` asks for a marked answer."""
        # the marker may be asked for in the prompt suffix or in the system prompt
        asks = " ".join(t for t in (self.data.prompt_suffix, self.model.system_prompt) if t)
        return resolve_reward_name(self.reward.name, self.reward.strict, asks or None)

    def make_method(self) -> Method:
        """The selected method, configured by this run."""
        return get_method(self.method).from_run(self)

    def step_config(self, method: Method | None = None) -> StepConfig:
        """What the update step computes for this run."""
        return StepConfig(method=method or self.make_method(),
                          group_size=self.rollout.group_size,
                          advantage_scale=self.advantage_scale,
                          advantage_std_ddof=self.advantage_std_ddof,
                          advantage_eps=self.advantage_eps, micro_batches=self.micro_batches,
                          policy=self.policy, vocab_chunk=self.vocab_chunk,
                          temperature=self.rollout.temperature)

    def shapes(self) -> "RunShapes":
        """The array shapes of one iteration, as the trainer pads them."""
        rows = self.rollout.batch_size
        prompt = bucket_length(self.data.max_prompt_tokens)
        return RunShapes(rows, rows // self.micro_batches, prompt, self.rollout.max_new_tokens,
                         max(bucket_length(self.reflection.max_teacher_prompt_tokens), prompt))

    def batch_fields(self, method: Method | None = None) -> tuple[str, ...]:
        """The optional update-batch fields this run fills: the method's, plus the
        reference log-probs when ``policy.kl_beta > 0``."""
        method = method or self.make_method()
        return tuple(method.fields) + (("ref_logprobs",) if self.policy.kl_beta > 0 else ())

    def abstract_batch(self, mesh=None, method: Method | None = None) -> UpdateBatch:
        """The update step's batch as ``ShapeDtypeStruct``s of this run's shapes."""
        s = self.shapes()
        return abstract_batch(self.batch_fields(method), rows=s.rows, prompt=s.prompt,
                              response=s.response, teacher_prompt=s.teacher_prompt, mesh=mesh)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def resolved_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` with every default a method brings filled in: the selected
        method's full settings and its teacher (``None``: the method has none)."""
        out, method = self.to_dict(), self.make_method()
        settings = {} if method.config is None else to_dict(method.config)
        out["method_config"] = {self.method: settings}
        policy = method.teacher_policy
        out["teacher"] = None if policy is None else dataclasses.asdict(policy)
        return out


def check_mesh(config: TrainConfig, device_count: int) -> tuple[int, int, int]:
    """The concrete mesh shape for ``device_count`` devices, or a ConfigError saying why not."""
    m = config.mesh
    if m.fsdp < 1 or m.tensor < 1 or (m.data < 1 and m.data != -1):
        raise ConfigError(f"mesh axes must be positive (data may be -1), got {m}")
    data = m.data
    if data == -1:
        if device_count % (m.fsdp * m.tensor):
            raise ConfigError(f"mesh fsdp={m.fsdp} x tensor={m.tensor} does not divide the "
                              f"{device_count} devices")
        data = device_count // (m.fsdp * m.tensor)
    if data * m.fsdp * m.tensor != device_count:
        raise ConfigError(f"mesh data={data} x fsdp={m.fsdp} x tensor={m.tensor} needs "
                          f"{data * m.fsdp * m.tensor} devices but {device_count} are available")
    rows = data * m.fsdp
    per_micro = config.rollout.batch_size // config.micro_batches
    if per_micro % rows:
        raise ConfigError(
            f"each micro-batch has {per_micro} rows, not divisible by the batch axes "
            f"data x fsdp = {rows}; change rollout.prompts_per_step, group_size or "
            "micro_batches")
    return data, m.fsdp, m.tensor


def load_train_config(path=None, overrides=()) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)
