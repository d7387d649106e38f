"""What a benchmark run times: the workloads (`Case`), the variants of each mode and their
settings (`BenchConfig`), and the targets the results are held against.

The variants of each mode, exactly (VARIANT_HELP, TRAIN_VARIANT_HELP, LATENCY_VARIANT_HELP say
the same per variant): `reference` (the reference ops eager) and `fastlego` (the auto backend),
fp32 weights under autocast; `fastlego_graph` (CUDA only): fastlego replayed as a CUDA graph, in
training the whole step (`TrainStep(cuda_graph=True)`), in latency the backbone forward
(torch.cuda.graph after warm-up, static inputs). torch.compile of the reference model, one
variant per way to run it: `compile` (torch's default mode), `compile_max_autotune`
(mode="max-autotune-no-cudagraphs") and `compile_graph` (CUDA only: the default-mode compiled
model captured once as a CUDA graph with torch.cuda.graph and replayed: its forward, or in
training the whole step around it with the capturable fused AdamW). Every training variant steps a fused AdamW
on CUDA. Targets are held against the fastest compile variant that compiled within the budget.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from ..presets import get_preset
from .numerics import dtype_name

# The three inference workloads of the yardstick: (preset, batch, channels, resolution, label_dim).
DEFAULT_CASES = (
    ("lego_S_PG_64", 256, 3, 64, 0),
    ("lego_L_PG_64", 128, 3, 64, 1000),
    ("lego_XL_U_32", 128, 4, 32, 1000),
)
# Inference targets: fastlego at >= 80% of the floor; on an H200 also these speed-ups over the
# fastest torch.compile variant of the reference model (see `COMPILE_VARIANTS`).
FLOOR_TARGET = 0.8
COMPILE_TARGETS = {"lego_S_PG_64": 1.9, "lego_L_PG_64": 1.5, "lego_XL_U_32": 1.4}
# Training target: every fastlego training step >= this speed-up over the fastest torch.compile
# variant of the reference step at the same workload.
TRAIN_COMPILE_TARGET = 1.5
# Latency (small batches, one network call): the presets, each at these batches, with the
# channels, resolution and labels of DEFAULT_CASES; fastlego's forward replayed as a CUDA graph
# against torch.compile's forward captured as a CUDA graph at >= 1.5x from batch 16, >= 1.25x below, and
# fastlego eager never slower than the reference eager.
LATENCY_PRESETS = ("lego_S_PG_64", "lego_L_PG_64")
LATENCY_BATCHES = (1, 4, 16)
LATENCY_EAGER_TARGET = 1.0


def latency_target(batch: int) -> float:
    """The speed-up fastlego_graph must reach over compile_graph at `batch` (latency mode)."""
    return 1.5 if batch >= 16 else 1.25


# torch.compile of the reference model, one named variant per way a user could run it; the mode
# each passes to torch.compile (None: torch's default). compile_graph compiles in the default mode
# and captures the compiled forward (inference, latency) or the training step around it once as a
# CUDA graph with torch.cuda.graph (torch's own mode="reduce-overhead" re-recorded its graphs at
# every call of the bench's forward; bench/RESULTS.md). Ordered as a run compiles them: the slowest
# to compile last.
COMPILE_VARIANTS = ("compile", "compile_bf16", "compile_graph", "compile_max_autotune")
COMPILE_MODES = {"compile": None, "compile_bf16": None, "compile_graph": None,
                 "compile_max_autotune": "max-autotune-no-cudagraphs"}
# The default --compile-budget: a compile variant whose first call (the compilation) takes longer
# is marked "did not compile within the budget" and is not a candidate for the fastest compile.
COMPILE_BUDGET_S = 900.0

# Inference variants. The bf16-weight baselines are opt-in (--variants), so that fastlego_bf16 can
# stand beside baselines holding their weights the same way.
VARIANTS = ("reference", "fastlego", "fastlego_bf16", "fastlego_fp8", "compile", "compile_max_autotune",
            "compile_graph", "reference_bf16", "compile_bf16")
VARIANT_HELP = {
    "reference": "use_backend('reference') eager, fp32 weights + autocast",
    "fastlego": "use_backend('auto'), fp32 weights + autocast, each weight cast once (fastlego.frozen_weights, as "
                "fastlego sample runs)",
    "fastlego_bf16": "use_backend('auto'), weights and inputs in bf16, no autocast",
    "fastlego_fp8": "fastlego.quantize(model, 'fp8'): the DiT blocks' Linears in e4m3 on FP8 tensor cores (with "
                    "--fp8-fast-accumulation: fastlego.quantize(model, 'fp8', fast_accumulation=True)), the rest "
                    "fp32 weights + bf16 autocast cast once (compute capability 8.9+; refused elsewhere)",
    "compile": "torch.compile(model) (torch's default mode) under use_backend('reference'), fp32 weights + autocast",
    "compile_max_autotune": "torch.compile(model, mode='max-autotune-no-cudagraphs') under use_backend('reference'), "
                            "fp32 weights + autocast",
    "compile_graph": "torch.compile(model) (torch's default mode) under use_backend('reference'), its forward "
                     "captured once with torch.cuda.graph after 3 warm-up calls and replayed on static inputs "
                     "(CUDA only), fp32 weights + autocast",
    "reference_bf16": "use_backend('reference') eager, weights and inputs in bf16, no autocast (opt-in)",
    "compile_bf16": "torch.compile(model) (torch's default mode) under use_backend('reference'), weights and "
                    "inputs in bf16, no autocast (opt-in)",
}
TRAIN_VARIANT_HELP = {
    "reference": "use_backend('reference') eager training step, fp32 weights + autocast",
    "fastlego": "use_backend('auto') training step, fp32 weights + autocast",
    "fastlego_graph": "the fastlego step captured once as a CUDA graph and replayed (fastlego train's default "
                      "on one GPU; CUDA only), fp32 weights + autocast",
    "compile": "torch.compile(EDMPrecond) (torch's default mode) under use_backend('reference'), then eager "
               "loss, backward, fused AdamW; fp32 weights + autocast",
    "compile_max_autotune": "torch.compile(EDMPrecond, mode='max-autotune-no-cudagraphs') under "
                            "use_backend('reference'), then eager loss, backward, fused AdamW; fp32 weights + autocast",
    "compile_graph": "torch.compile(EDMPrecond) (torch's default mode) under use_backend('reference') inside the "
                     "training step captured once as a CUDA graph (forward, loss, backward and the capturable "
                     "fused AdamW) and replayed (CUDA only; a failed capture is an error row); fp32 weights + autocast",
    "fastlego_graph_ckpt": "fastlego_graph with the first N DiT blocks checkpointed (--checkpoint-blocks N, default "
                           "all): less memory for recompute; timed only when named in --variants",
}
LATENCY_VARIANT_HELP = {
    "reference": "use_backend('reference') eager forward, fp32 weights + autocast",
    "compile_graph": "torch.compile(model) (torch's default mode) under use_backend('reference'), its forward "
                     "captured once with torch.cuda.graph after 3 warm-up calls and replayed on static inputs "
                     "(CUDA only), fp32 weights + autocast",
    "fastlego": "use_backend('auto') eager forward, fp32 weights + autocast, each weight cast once "
                "(fastlego.frozen_weights, as fastlego sample runs)",
    "fastlego_graph": "the use_backend('auto') forward captured once with torch.cuda.graph after 3 warm-up calls "
                      "and replayed on static inputs (CUDA only), fp32 weights + autocast, each weight cast once "
                      "outside the graph (fastlego.frozen_weights, as fastlego sample runs)",
}
# Modes: `infer`, a torch.no_grad() forward at throughput batches; `train`, one training step
# (see steps.py); `latency`, the same forward as infer at small batches (LATENCY_BATCHES), ms per call.
MODES = ("infer", "train", "latency")
HELP_OF_MODE = {"infer": VARIANT_HELP, "train": TRAIN_VARIANT_HELP, "latency": LATENCY_VARIANT_HELP}
# Training: the batches to time, (preset, batch); channels, resolution and labels as in
# DEFAULT_CASES. The two the release cannot run on one GPU (S_PG_64 at 256: its attention
# backward crashes; L_PG_64 at 128: out of memory) come last, so a failure there cannot spoil the rest.
DEFAULT_TRAIN_CASES = (
    ("lego_S_PG_64", 32), ("lego_S_PG_64", 64), ("lego_L_PG_64", 64), ("lego_XL_U_32", 128),
    ("lego_S_PG_64", 256), ("lego_L_PG_64", 128),
)
# The variants a mode times: training keeps fp32 weights (AdamW on bf16 weights is not a recipe).
MODE_VARIANTS = {"infer": VARIANTS,
                 "train": ("reference", "fastlego", "fastlego_graph", "compile", "compile_max_autotune",
                           "compile_graph", "fastlego_graph_ckpt"),
                 "latency": ("reference", "compile_graph", "fastlego", "fastlego_graph")}
ALL_VARIANTS = tuple(dict.fromkeys(v for vs in MODE_VARIANTS.values() for v in vs))
# Variants timed only when asked for (--variants): a memory/speed trade-off, or extra baselines.
OPT_IN_VARIANTS = ("fastlego_graph_ckpt", "reference_bf16", "compile_bf16")
DEFAULT_VARIANTS = tuple(v for v in ALL_VARIANTS if v not in OPT_IN_VARIANTS)
# Variants replayed as CUDA graphs: CUDA only, refused elsewhere (a row that says why).
GRAPH_VARIANTS = ("fastlego_graph", "fastlego_graph_ckpt", "compile_graph")
# Variants that hold weights and inputs in bf16 without autocast; every other variant keeps fp32
# weights and runs under autocast (BenchConfig.autocast_dtype).
BF16_WEIGHT_VARIANTS = ("fastlego_bf16", "reference_bf16", "compile_bf16")
# FP8 inference (fastlego.fp8): its DiT blocks' Linears hold e4m3 weights, the rest fp32 under autocast.
FP8_VARIANT = "fastlego_fp8"
# A training step: EDM's loss (P_mean -1.2, P_std 1.2, sigma_data 0.5), AdamW at this rate, and
# weights from `randomize_` at this scale: small enough that the joint loss is finite at every
# depth, large enough that no gradient is zero.
TRAIN_LR = 1e-4
TRAIN_INIT_SCALE = 0.1
# The arguments the kernels are timed with: those the ops receive in the `fastlego` variant (fp32
# weights under autocast) and in the `fastlego_bf16` variant (everything in bf16).
KERNEL_INPUTS = {"autocast": "as in the fastlego variant: fp32 weights, activations under autocast",
                 "bf16": "as in the fastlego_bf16 variant: weights and activations in bf16"}

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def result_key(variant: str, mode: str = "infer") -> str:
    """Key of an end-to-end result in a report: the variant, suffixed by the mode unless infer."""
    return variant if mode == "infer" else f"{variant}@{mode}"


def compile_mode_of(variant: str, mode: str = "infer") -> Optional[str]:
    """The mode a compile variant passes to torch.compile (None: torch's default); compile_graph
    compiles in the default mode in every mode of the bench (the CUDA graph is captured around it)."""
    if variant not in COMPILE_MODES:
        raise ValueError(f"{variant!r} is not a torch.compile variant: expected one of {', '.join(COMPILE_VARIANTS)}")
    return COMPILE_MODES[variant]


def variant_backend(variant: str) -> str:
    """The dispatcher mode a variant runs under: the reference ops (eager or compiled) or auto."""
    return "reference" if variant.startswith(("reference", "compile")) else "auto"


@dataclass(frozen=True)
class Case:
    """One end-to-end workload: a preset at a batch size, input shape and label width."""

    preset: str
    batch: int
    in_channels: int = 3
    resolution: int = 64
    label_dim: int = 1000
    depths: Optional[Tuple[int, ...]] = None  # override of the preset's depths (smoke tests only)

    @property
    def name(self) -> str:
        return self.preset if self.depths is None else f"{self.preset}[depths={','.join(map(str, self.depths))}]"

    def model_kwargs(self) -> dict:
        kw = dict(in_channels=self.in_channels, label_dim=self.label_dim)
        if self.depths is not None:
            kw["depths"] = list(self.depths)
        return kw

    @property
    def input_shape(self) -> Tuple[int, int, int, int]:
        return (self.batch, self.in_channels, self.resolution, self.resolution)

    def describe(self) -> str:
        labels = "uncond" if self.label_dim == 0 else f"{self.label_dim} classes"
        return f"{self.name} B={self.batch} {self.in_channels}x{self.resolution}x{self.resolution} {labels}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_case(preset: str, batch: Optional[int] = None) -> Case:
    """The yardstick's workload of `preset`, or for other presets: 3 channels at the training
    resolution with 1000 classes (4 latent channels for `_U_32`), batch 128."""
    for name, b, c, res, labels in DEFAULT_CASES:
        if name == preset:
            return Case(name, batch or b, c, res, labels)
    p = get_preset(preset)
    channels = 4 if preset.endswith("_U_32") else 3
    return Case(preset, batch or 128, channels, p.training_resolution, 1000)


def parse_cases(spec: Optional[str], batch: Optional[int] = None) -> List[Case]:
    """`"lego_S_PG_64,lego_L_PG_64:64"` -> Cases (`name:batch` overrides that preset's batch)."""
    if not spec:
        return [default_case(name, batch) for name, *_ in DEFAULT_CASES]
    cases = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        name, _, b = item.partition(":")
        if b and not b.isdigit():
            raise ValueError(f"bad preset spec {item!r}: expected NAME or NAME:BATCH, e.g. lego_S_PG_64:64")
        cases.append(default_case(name, int(b) if b else batch))
    return cases


def default_train_cases() -> List[Case]:
    """The training workloads of `DEFAULT_TRAIN_CASES`."""
    return [default_case(name, batch) for name, batch in DEFAULT_TRAIN_CASES]


def default_latency_cases(spec: Optional[str] = None, batch: Optional[int] = None) -> List[Case]:
    """The latency workloads: `LATENCY_PRESETS` (or the presets of `spec`, "NAME[:BATCH],...") each
    at `LATENCY_BATCHES`, or at the one batch that `NAME:BATCH` or `batch` names."""
    items = [s.strip() for s in spec.split(",") if s.strip()] if spec else list(LATENCY_PRESETS)
    cases: List[Case] = []
    for item in items:
        name, _, b = item.partition(":")
        if b and not b.isdigit():
            raise ValueError(f"bad preset spec {item!r}: expected NAME or NAME:BATCH, e.g. lego_S_PG_64:4")
        for n in ([int(b)] if b else [batch] if batch else LATENCY_BATCHES):
            cases.append(default_case(name, n))
    return list(dict.fromkeys(cases))


def with_depths(case: Case, depths: Sequence[int]) -> Case:
    """`case` with every brick's depth replaced (one entry per brick)."""
    n = len(get_preset(case.preset).regions)
    depths = tuple(int(d) for d in depths)
    if len(depths) != n or min(depths) < 1:
        raise ValueError(f"--depths needs {n} positive integers for {case.preset} (one per brick), got {list(depths)}")
    return dataclasses.replace(case, depths=depths)


@dataclass
class BenchConfig:
    """Everything a run needs; `for_mode` fills the repeat counts of full / --quick / --tiny runs."""

    device: str = "cuda"
    cases: List[Case] = field(default_factory=lambda: parse_cases(None))
    # the workloads of the train mode; None: the same as `cases` (--presets, --tiny)
    train_cases: Optional[List[Case]] = field(default_factory=default_train_cases)
    # the workloads of the latency mode; None: the same as `cases` (--tiny)
    latency_cases: Optional[List[Case]] = field(default_factory=default_latency_cases)
    modes: Tuple[str, ...] = ("infer",)
    variants: Tuple[str, ...] = DEFAULT_VARIANTS
    checkpoint_blocks: Optional[int] = None   # fastlego_graph_ckpt: the first N DiT blocks (None: all)
    # a compile variant whose first call takes longer is marked as not compiled within the budget
    compile_budget_s: float = COMPILE_BUDGET_S
    # fastlego_fp8 with the tensor cores' fast accumulation (fastlego.quantize(..., fast_accumulation=True))
    fp8_fast_accumulation: bool = False
    autocast_dtype: Optional[torch.dtype] = torch.bfloat16
    tf32: bool = True
    kernels: bool = True
    floor: bool = True
    check: bool = True
    cuda_graphs: bool = False
    kernel_inputs: Tuple[str, ...] = ("autocast", "bf16")
    seed: int = 0
    # end to end: `repeats` timed rounds of `iters` forwards each, after `warmup` rounds
    warmup: int = 2
    repeats: int = 5
    iters: int = 10
    # latency: each timed round calls the network enough times to fill this (at least once)
    latency_round_ms: float = 50.0
    # kernels and floor matmuls: rounds of at least `op_min_round_ms` (calls repeated to fill it)
    op_warmup: int = 3
    op_repeats: int = 15
    op_min_round_ms: float = 2.0
    # device limits
    peak_size: int = 8192
    peak_repeats: int = 20
    copy_mib: int = 1024
    json_path: Optional[str] = None
    markdown_path: Optional[str] = None
    profile: str = "full"

    @classmethod
    def for_mode(cls, quick: bool = False, tiny: bool = False, **overrides) -> "BenchConfig":
        cfg = cls()
        if quick:
            cfg.profile = "quick"
            cfg.warmup, cfg.repeats, cfg.iters = 1, 3, 3
            cfg.latency_round_ms = 20.0
            cfg.op_warmup, cfg.op_repeats, cfg.op_min_round_ms = 1, 5, 1.0
            cfg.peak_repeats = 10
        if tiny:
            cfg.profile = "tiny"
            cfg.cases = [Case("lego_S_PG_64", 1, 3, 64, 0)]
            cfg.train_cases = cfg.latency_cases = None
            cfg.warmup, cfg.repeats, cfg.iters = 1, 2, 1
            cfg.latency_round_ms = 0.0
            cfg.op_warmup, cfg.op_repeats, cfg.op_min_round_ms = 1, 2, 0.0
            cfg.peak_size, cfg.peak_repeats, cfg.copy_mib = 256, 3, 4
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
        return cfg

    def cases_for(self, mode: str) -> List[Case]:
        """The workloads `mode` runs: `train_cases` / `latency_cases` for train / latency when set,
        else `cases`."""
        own = {"train": self.train_cases, "latency": self.latency_cases}.get(mode)
        return list(own) if own is not None else list(self.cases)

    def variants_for(self, mode: str) -> Tuple[str, ...]:
        """The asked-for variants that `mode` has (train: no bf16 weights; latency: see MODE_VARIANTS)."""
        return tuple(v for v in self.variants if v in MODE_VARIANTS.get(mode, VARIANTS))

    def validate(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"mode(s) {bad} are not implemented: expected a subset of {sorted(MODES)}")
        bad = [v for v in self.variants if v not in ALL_VARIANTS]
        if bad:
            raise ValueError(f"unknown variant(s) {bad}: expected a subset of {', '.join(ALL_VARIANTS)}")
        for mode in self.modes:
            if not self.variants_for(mode):
                raise ValueError(f"none of the variants {list(self.variants)} has a {mode} mode: pick from "
                                 f"{', '.join(MODE_VARIANTS[mode])} (e.g. --variants {','.join(MODE_VARIANTS[mode][:2])})")
        bad = [v for v in self.kernel_inputs if v not in KERNEL_INPUTS]
        if bad:
            raise ValueError(f"unknown kernel input kind(s) {bad}: expected a subset of {', '.join(KERNEL_INPUTS)}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but torch.cuda.is_available() is False; "
                               "run on a GPU, or pass --device cpu (with --tiny for a quick smoke run)")
        if not self.compile_budget_s > 0:
            raise ValueError(f"--compile-budget must be a positive number of seconds, got {self.compile_budget_s}")
        for name in ("warmup", "op_warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("repeats", "iters", "op_repeats", "peak_repeats", "peak_size", "copy_mib"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def weights_of(self, variant: str, mode: str = "infer") -> Tuple[torch.dtype, Optional[torch.dtype]]:
        """(weight dtype, autocast dtype or None) of a variant: bf16 weights without autocast for
        `BF16_WEIGHT_VARIANTS` (inference only), else fp32 weights under `autocast_dtype`."""
        if mode == "infer" and variant in BF16_WEIGHT_VARIANTS:
            return torch.bfloat16, None
        if variant == FP8_VARIANT:
            return getattr(torch, "float8_e4m3fn", torch.float32), self.autocast_dtype
        return torch.float32, self.autocast_dtype

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["cases"] = [c.to_dict() for c in self.cases]
        d.pop("train_cases")
        d.pop("latency_cases")
        for mode in ("train", "latency"):  # (an inference run's config reads as before)
            if mode in self.modes:
                d[f"{mode}_cases"] = [c.to_dict() for c in self.cases_for(mode)]
        d["autocast_dtype"] = dtype_name(self.autocast_dtype)
        return d
