"""The sweep file: its typed schema, safe loading, and error messages that name the field.

Imports neither torch nor ray, so `rayq plan` on a bad file answers in well under a second.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from rayq.catalog import engines, precisions
from rayq.catalog.bundled import BUNDLED
from rayq.catalog.vllm_support import option_refusal
from rayq.errors import RayqError

SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"

# Decoding parameters a grid may sweep, and the value used when the grid leaves one out.
# Every one is a column of the dataset whether swept or not, so the schema never depends
# on which parameters a particular sweep happened to vary.
GRID_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 64,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "do_sample": True,
    "repetition_penalty": 1.0,
}


_UNION_HELP = {
    "prompts": "give a list of prompts, or {file: PATH} with one prompt per line",
    "seeds": "give a count of samples (>= 1), or a list of seeds",
    "runtime.num_gpus": "give a number of GPUs (>= 0), or auto",
}


def _float_if_int(v: Any) -> Any:
    """YAML reads `1` as an int; a float field accepts it without loosening strict mode elsewhere."""
    return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


class SpecError(RayqError, ValueError):
    """A sweep file that cannot be run; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


PositiveInt = Annotated[int, Field(ge=1)]


class ModelSize(_Strict):
    """The shape of a model whose config rayq cannot read before it runs (a hub id, offline).

    Only `params` is required; the rest sharpen the KV-cache estimate and the split
    between quantized layers and the embeddings that stay in 16 bits.
    """

    params: PositiveInt | str = Field(description="parameter count: 6738415616, or '6.74B', '135M'")
    layers: PositiveInt | None = None
    hidden_size: PositiveInt | None = None
    heads: PositiveInt | None = None
    kv_heads: PositiveInt | None = Field(None, description="key/value heads (grouped-query attention); default heads")
    head_dim: PositiveInt | None = Field(None, description="default hidden_size / heads")
    vocab_size: PositiveInt | None = None
    tied_embeddings: bool = Field(False, description="the output layer shares the input embedding's weights")
    context: PositiveInt | None = Field(
        None, description="the context length in tokens, to check prompts + max_new_tokens against it"
    )

    @field_validator("params")
    @classmethod
    def _count(cls, v: int | str) -> int | str:
        from rayq.planning.estimate import parse_count

        parse_count(v)  # raises ValueError with the reason
        return v


class ModelSpec(_Strict):
    name: str = Field(pattern=SAFE_NAME, description="label used in results and partition paths")
    bundled: str | None = Field(None, description="a model shipped with rayq: 'smollm2-135m-instruct'")
    path: str | None = Field(None, description="a local directory holding a transformers checkpoint")
    hub: str | None = Field(None, description="a Hugging Face hub id (needs network access)")
    revision: str | None = None
    trust_remote_code: bool = False
    size: ModelSize | None = Field(
        None, description="the model's shape, for memory estimates when its config is not on this machine"
    )
    engine: str | None = Field(None, description="the decoding engine for this model; default: runtime.engine")

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, v: str | None) -> str | None:
        return v if v is None else _engine_name(v)

    @field_validator("name")
    @classmethod
    def _not_a_number(cls, v: str) -> str:
        try:
            float(v)
        except ValueError:
            return v
        raise ValueError(f"{v!r} looks like a number; readers of the hive partition model={v} would type it as one")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        given = [k for k in ("bundled", "path", "hub") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one source of 'bundled', 'path' or 'hub' (got {given or 'none'})")
        if self.bundled is not None:
            if self.bundled not in BUNDLED:
                raise ValueError(f"unknown bundled model {self.bundled!r}; bundled models: {', '.join(BUNDLED)}")
        return self

    @property
    def source(self) -> str:
        if self.bundled is not None:
            return f"bundled:{self.bundled}"
        if self.path is not None:
            return f"path:{self.path}"
        return f"hub:{self.hub}"


class GridSpec(_Strict):
    max_new_tokens: list[PositiveInt] = Field([GRID_DEFAULTS["max_new_tokens"]], min_length=1)
    temperature: list[Annotated[float, Field(ge=0.0)]] = Field([GRID_DEFAULTS["temperature"]], min_length=1)
    top_k: list[PositiveInt] = Field([GRID_DEFAULTS["top_k"]], min_length=1)
    top_p: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field([GRID_DEFAULTS["top_p"]], min_length=1)
    do_sample: list[bool] = Field([GRID_DEFAULTS["do_sample"]], min_length=1)
    repetition_penalty: list[Annotated[float, Field(gt=0.0)]] = Field(
        [GRID_DEFAULTS["repetition_penalty"]], min_length=1
    )

    @field_validator("temperature", "top_p", "repetition_penalty", mode="before")
    @classmethod
    def _ints_are_floats(cls, v: Any) -> Any:
        return [_float_if_int(x) for x in v] if isinstance(v, list) else v

    @field_validator(*GRID_DEFAULTS, mode="after")
    @classmethod
    def _no_repeats(cls, v: list[Any]) -> list[Any]:
        for i, x in enumerate(v):
            if x in v[:i]:
                raise ValueError(f"[{i}] {x!r} is listed twice; each value once")
        return v


def _engine_name(v: str) -> str:

    engines.get(v)  # raises ValueError naming the known engines
    return v


class RuntimeSpec(_Strict):
    engine: str = Field(
        "transformers",
        description="how hosts decode: transformers (rayq's loop, every precision) or vllm; "
        "a model's `engine` overrides it",
    )
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs held by each model host actor; torch threads follow it")
    num_gpus: Annotated[float, Field(ge=0.0)] | Literal["auto"] = Field(
        "auto",
        description="GPUs held by each model host actor; auto: sized from the memory estimate "
        "(a share of one GPU, one GPU, or several GPUs of one node), none on a cluster without GPUs",
    )
    gpu_memory: str | None = Field(
        None, description="memory of one GPU, e.g. '80GB' (GB means GiB); default: what the cluster's GPUs report"
    )
    gpu_sharing: bool = Field(
        True, description="let small hosts share a GPU (fractional requests sized by memory); false: one GPU each"
    )
    protocol: Literal["serial", "batched"] = Field(
        "batched",
        description="serial: one `generate` call per completion (the paper's timing); "
        "batched: many completions decode together, each with its own sampling parameters",
    )
    serial_sample: int = Field(
        0,
        ge=0,
        description="with protocol batched: this many completions of each grid cell (model, precision and "
        "every grid parameter: the first prompts and seeds) decode serially, one `generate` call each, timed "
        "the paper's way for Table 7; their rows say protocol serial",
    )
    serial_sample_by: list[str] | None = Field(
        None,
        description="the grid parameters that define a cell of the serial sample (default: all of them); "
        "e.g. [max_new_tokens]: serial_sample completions per max_new_tokens, at the first value of the others",
    )
    share_greedy: bool = Field(
        True,
        description="decode a greedy output once per host: rows differing only in what cannot change it "
        "(temperature, top_k, top_p, seed) copy it and name the source in shares_output_of",
    )
    batch_size: PositiveInt | Literal["auto"] = Field(
        "auto", description="rows per batch with protocol batched; auto: 8 on a CPU, 32 on a GPU, halved on OOM"
    )
    block_by: list[str] = Field(
        ["temperature", "top_k"],
        description="grid parameters that define one Tune trial (a block); the rest run inside it",
    )
    flush_every: PositiveInt = Field(32, description="completions per Parquet file written while a block runs")
    address: str | None = Field(None, description="Ray address to connect to; none starts a local Ray")
    max_trial_retries: int = Field(2, ge=0, description="times Tune retries a block whose trial failed")
    gpu_type: str | None = Field(
        None,
        description="the GPUs' type for speed predictions (a100-80gb, h100-80gb, ...); "
        "default: what the cluster's GPUs report, else a100-80gb (the paper's)",
    )
    stall_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="stop the run when, for this long, no completion was committed and no host got its "
        "resources or finished loading, while no host is loading; the error names the stuck hosts",
    )
    layer_sqnr: bool = Field(
        True, description="measure each layer's weight SQNR against the unquantized weights on disk (local models)"
    )
    allow_past_context: bool = Field(
        False,
        description="run prompts + max_new_tokens past a model's context length (a warning, not an error); "
        "the rows that ran past it have past_context true",
    )

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, v: str) -> str:
        return _engine_name(v)

    @field_validator("num_cpus", "num_gpus", "stall_timeout_s", mode="before")
    @classmethod
    def _int_to_float(cls, v: Any) -> Any:
        return _float_if_int(v)

    @field_validator("gpu_type")
    @classmethod
    def _gpu_type(cls, v: str | None) -> str | None:
        if v is not None:
            from rayq.planning.throughput import GPU_TYPES

            if v not in GPU_TYPES:
                raise ValueError(f"unknown GPU type {v!r}; known: {', '.join(GPU_TYPES)}")
        return v

    @field_validator("gpu_memory")
    @classmethod
    def _memory(cls, v: str | None) -> str | None:
        if v is not None:
            from rayq.planning.estimate import parse_bytes

            parse_bytes(v)  # raises ValueError with the reason
        return v

    @model_validator(mode="after")
    def _serial_is_batch_one(self) -> RuntimeSpec:
        if self.protocol == "serial" and self.batch_size not in (1, "auto"):
            raise ValueError(f"batch_size {self.batch_size} needs protocol: batched (serial decodes one at a time)")
        if self.protocol == "serial" and self.serial_sample:
            raise ValueError("serial_sample needs protocol: batched (with protocol serial every completion is serial)")
        return self

    @field_validator("serial_sample_by")
    @classmethod
    def _known_sample_params(cls, v: list[str] | None) -> list[str] | None:
        return v if v is None else cls._known_params(v)

    @field_validator("block_by")
    @classmethod
    def _known_params(cls, v: list[str]) -> list[str]:
        for i, key in enumerate(v):
            if key not in GRID_DEFAULTS:
                raise ValueError(f"[{i}] {key!r} is not a grid parameter; allowed: {', '.join(GRID_DEFAULTS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"block_by lists a parameter twice: {v}")
        return v


class PromptsFile(_Strict):
    file: str


class FidelitySpec(_Strict):
    """Fidelity measured once per host (rayq.host.fidelity): perplexity, and KL divergence and
    top-1 agreement against the baseline precision of the same model."""

    text: str | None = Field(None, description="evaluation text file (default: rayq/fidelity.txt, shipped)")
    baseline: str | None = Field(None, description="the precision compared against (default: the sweep's first)")
    window: int = Field(1024, ge=2, description="tokens per forward pass (at most the model's context)")
    stride: int = Field(512, ge=1, description="tokens between windows (the paper's perplexity stride)")
    max_tokens: PositiveInt | None = Field(None, description="cut the text to this many tokens")
    top_k: int = Field(64, ge=1, le=4096, description="the baseline's top tokens kept per position for the KL")

    @model_validator(mode="after")
    def _stride_fits(self) -> FidelitySpec:
        if self.stride >= self.window:
            raise ValueError(
                f"stride {self.stride} must be smaller than window {self.window}: "
                "the first token of every window would go unscored"
            )
        return self


class SweepSpec(_Strict):
    name: str = Field(pattern=SAFE_NAME)
    output: str | None = Field(None, description="results directory; `rayq run --output` overrides it")
    models: list[ModelSpec] = Field(min_length=1)
    precisions: list[str] = Field(min_length=1)
    prompts: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | PromptsFile
    grid: GridSpec = GridSpec()
    seeds: PositiveInt | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] = 1
    runtime: RuntimeSpec = RuntimeSpec()
    precision_options: dict[str, dict[str, Any]] = Field(
        {}, description="settings per precision, e.g. {bnb-int8: {llm_int8_threshold: 5.0}}; library defaults otherwise"
    )
    fidelity: FidelitySpec | None = Field(None, description="measure perplexity, KL and top-1 agreement per host")

    @model_validator(mode="after")
    def _baseline_is_a_precision(self) -> SweepSpec:
        if self.fidelity is not None and self.fidelity.baseline not in (None, *self.precisions):
            raise ValueError(
                f"fidelity.baseline: {self.fidelity.baseline!r} is not one of this sweep's precisions "
                f"({', '.join(self.precisions)})"
            )
        return self

    def engine_of(self, model: ModelSpec) -> str:
        return model.engine or self.runtime.engine

    @model_validator(mode="after")
    def _engines_serve_precisions(self) -> SweepSpec:
        """Pairs an engine serves on no device fail here; those it lacks only on a CPU fail in plan and run."""

        errors = []
        for i, m in enumerate(self.models):
            engine = self.engine_of(m)
            where = f"models[{i}].engine" if m.engine else "runtime.engine"
            for p in self.precisions:
                why = engines.refusal(engine, p, "cuda")
                if why is None and engine == "vllm":
                    why = option_refusal(p, self.precision_options.get(p, {}))
                if why is not None:
                    errors.append(f"{where}: engine {engine} cannot run precision {p} of model {m.name}: {why}")
            if self.fidelity is not None and engine != "transformers":
                errors.append(
                    f"{where}: fidelity (perplexity, KL) is measured by the transformers engine only; "
                    f"model {m.name} runs on {engine}"
                )
        if errors:
            raise ValueError("\n  ".join(errors))
        return self

    @property
    def fidelity_baseline(self) -> str | None:
        if self.fidelity is None:
            return None
        return self.fidelity.baseline or self.precisions[0]

    @model_validator(mode="after")
    def _options_fit_precisions(self) -> SweepSpec:
        errors = []
        for name, opts in self.precision_options.items():
            if name not in self.precisions:
                errors.append(
                    f"precision_options.{name}: not one of this sweep's precisions ({', '.join(self.precisions)})"
                )
                continue
            errors += [f"precision_options.{name}.{e}" for e in precisions.option_errors(name, opts)]
        if errors:
            raise ValueError("\n  ".join(errors))
        return self

    @field_validator("precisions")
    @classmethod
    def _known_precisions(cls, v: list[str]) -> list[str]:
        for i, name in enumerate(v):
            try:
                precisions.get(name)
            except precisions.UnknownPrecisionError as e:
                raise ValueError(f"[{i}] {e}") from None
        if len(set(v)) != len(v):
            raise ValueError(f"a precision is listed twice: {v}")
        return v

    @field_validator("models")
    @classmethod
    def _unique_models(cls, v: list[ModelSpec]) -> list[ModelSpec]:
        seen: set[str] = set()
        for i, m in enumerate(v):
            if m.name in seen:
                raise ValueError(f"[{i}] duplicate model name {m.name!r}; names must be unique")
            seen.add(m.name)
        return v

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, list) and len(set(v)) != len(v):
            raise ValueError(f"a seed is listed twice: {v}")
        return v

    @property
    def seed_values(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)


class Sweep(BaseModel):
    """A validated sweep: the spec plus what was resolved from the file system."""

    model_config = ConfigDict(frozen=True)

    spec: SweepSpec
    path: str
    text: str
    prompt_texts: tuple[str, ...]


_UNION_TAG = re.compile(r"^(list\[.*\]|literal\[.*\]|constrained-\w+|function-\w+\[.*\]|[A-Z]\w*|int|str|float|bool)$")


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _UNION_TAG.match(str(part)):
            continue  # pydantic's name for a union branch, not a field of the file
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _format_error(err: dict[str, Any]) -> str:
    msg = err["msg"].removeprefix("Value error, ")
    path = _field_path(err["loc"])
    m = re.match(r"^\[(\d+)\] (.*)$", msg)
    if m:  # a list validator pointing at one element
        path, msg = f"{path}[{m.group(1)}]", m.group(2)
    if err["type"] == "extra_forbidden":
        msg = "unknown key (extra keys are an error; check the spelling)"
    if (
        "input" in err
        and err["type"] not in ("extra_forbidden", "missing")
        and not isinstance(err["input"], dict | list)
    ):
        msg += f" (got {err['input']!r})"
    if path == "(top level)" and re.match(r"^[\w.\-\[\]]+: ", msg):
        return msg  # a whole-file check that names its own field paths
    return f"{path}: {msg}"


def parse(data: Any, file: str = "<sweep>", base_dir: Path | None = None, text: str = "") -> Sweep:
    """A validated sweep from `data` (a YAML file's mapping, or one built in Python).

    `text` is the file's text, kept in the manifest; a sweep built in Python gets its YAML
    form, so the results directory still records (and compares) what ran.
    """
    if not isinstance(data, dict):
        raise SpecError(f"{file}: the sweep file must be a YAML mapping of keys to values")
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        by_path: dict[str, list[dict[str, Any]]] = {}
        for err in errors:
            by_path.setdefault(_field_path(err["loc"]), []).append(err)
        # A union (prompts, seeds) reports a mismatch for each branch it tried; where a
        # branch gave a specific reason, the other branches' type mismatches are noise.
        branch_noise = {"model_type", "dict_type", "int_type", "list_type", "literal_error", "float_type"}
        lines = set()
        for path, errs in by_path.items():
            specific = [x for x in errs if x["type"] not in branch_noise]
            if specific or len(errs) == 1:
                lines.update(_format_error(x) for x in (specific or errs))
            else:
                got = errs[0].get("input")
                lines.add(f"{path}: {_UNION_HELP.get(path, 'wrong type')} (got {got!r})")
        lines = sorted(lines)
        if len(lines) == 1:  # one problem, one line
            raise SpecError(f"{file}: invalid sweep file: {lines[0]}") from None
        raise SpecError(f"{file}: invalid sweep file:\n  " + "\n  ".join(lines)) from None
    prompts = spec.prompts
    if isinstance(prompts, PromptsFile):
        p = Path(prompts.file)
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        if not p.is_file():
            raise SpecError(f"{file}: prompts.file: no such file {str(p)!r}")
        texts = tuple(line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
        if not texts:
            raise SpecError(f"{file}: prompts.file: {str(p)!r} holds no prompts (one per line)")
    else:
        texts = tuple(prompts)
    if len(set(texts)) != len(texts):
        raise SpecError(f"{file}: prompts: a prompt is listed twice")
    models = []
    for i, m in enumerate(spec.models):
        if m.path is not None:
            mp = Path(m.path).expanduser()
            if not mp.is_absolute() and base_dir is not None:
                mp = base_dir / mp
            if not (mp / "config.json").is_file():
                raise SpecError(f"{file}: models[{i}].path: {str(mp)!r} is not a model directory (no config.json)")
            m = m.model_copy(update={"path": str(mp.resolve())})
        models.append(m)
    update: dict[str, Any] = {"models": models}
    if spec.fidelity is not None and spec.fidelity.text is not None:
        fp = Path(spec.fidelity.text).expanduser()
        if not fp.is_absolute() and base_dir is not None:
            fp = base_dir / fp
        if not fp.is_file():
            raise SpecError(f"{file}: fidelity.text: no such file {str(fp)!r}")
        update["fidelity"] = spec.fidelity.model_copy(update={"text": str(fp.resolve())})
    spec = spec.model_copy(update=update)
    if not text:
        try:
            text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        except yaml.YAMLError:  # a value YAML cannot represent (a Path, say): its JSON form
            import json

            text = json.dumps(data, default=str, indent=2)
    return Sweep(spec=spec, path=file, text=text, prompt_texts=texts)


def load(path: str | Path) -> Sweep:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"{p}: cannot read the sweep file: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise SpecError(f"{p}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    return parse(data, str(p), p.parent, text)
