"""Projected GPU-hours of training a VPG on a frozen LLM, from model configs (nothing is measured).

Per training sample, the matrix FLOPs of each component are counted from its config:
- the frozen vision tower: forward only (none at all when its features come from the cache);
- the Q-Former and the projector: forward, plus a backward of twice the forward (input and weight
  gradients) when they train; forward only when frozen (VPGTrans stage 1 trains the projector only);
- the frozen LLM over visual prompts + text: forward, plus a backward that computes input gradients
  only (frozen weights need none): as many FLOPs as the forward's products, twice for attention.
A sample's time is its FLOPs over the GPU's dense bf16 rate times a stated utilisation; a run's
GPU-hours are samples x that. Every sample is assumed padded to `text_tokens` caption tokens.

`python -m vlfast.costmodel` prints the table for a pair of LLMs (SPEC.md section 6 and 8).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from transformers import AutoConfig, Blip2Config, LlamaConfig, OPTConfig, PretrainedConfig

from vlfast.costmodel.kernels import (
    A100,
    AttentionShape,
    Hardware,
    MemVPShape,
    attention_config,
    chain_seconds,
    cross_attention_eager,
    cross_attention_triton,
    memvp_config,
    memvp_eager,
    memvp_triton,
)

# Model-FLOPs utilisation assumed for A100/H100 bf16 training of these shapes: an assumption, not a
# fit. What the paper's own hours imply is printed beside it (against_paper).
UTILISATION = 0.40

# The paper's figures (SPEC.md section 6): BLIP-2's VPG trained on OPT-6.7B from scratch, and
# transferred from OPT-2.7B with VPGTrans; image-text pairs seen and A100 GPU-hours.
PAPER = {"pair": ("opt-2.7b", "opt-6.7b"), "scratch_samples": 129.0e6, "scratch_hours": 631.5,
         "transfer_samples": 13.8e6, "transfer_hours": 59.0}

LLMS: dict[str, PretrainedConfig] = {
    "opt-125m": OPTConfig(hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12),
    "opt-1.3b": OPTConfig(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32),
    "opt-2.7b": OPTConfig(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32),
    "opt-6.7b": OPTConfig(hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32),
    "llama-7b": LlamaConfig(),  # transformers' defaults are LLaMA-7B's
    "llama-13b": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                             num_attention_heads=40),
}


@dataclass(frozen=True)
class Stack:
    """A transformer stack's shape: all its matrix FLOPs depend on."""

    layers: int
    hidden: int
    ffn: int
    ffn_matrices: int = 2  # 3 for a gated FFN (Llama's gate, up and down)
    vocab: int = 0  # rows of the LM head; 0 for none
    causal: bool = True

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> Stack:
        """An OPT, Llama-style (gated FFN) or vision-transformer config from transformers."""
        ffn = getattr(config, "ffn_dim", None) or config.intermediate_size
        gated = getattr(config, "hidden_act", "") == "silu" and not hasattr(config, "ffn_dim")
        is_lm = hasattr(config, "vocab_size")
        return cls(config.num_hidden_layers, config.hidden_size, ffn, 3 if gated else 2,
                   config.vocab_size if is_lm else 0, causal=is_lm)

    @property
    def parameters(self) -> int:
        """Parameters of the matrices (embeddings, norms and biases left out)."""
        per_layer = 4 * self.hidden**2 + self.ffn_matrices * self.hidden * self.ffn
        return self.layers * per_layer + self.vocab * self.hidden

    def forward_flops(self, tokens: int, memory_rows: int = 0) -> float:
        """Products of a forward over `tokens` tokens: projections and FFN, attention scores and
        mixing, the LM head on every position, and MemVP's products."""
        h = self.hidden
        projections = 2.0 * tokens * self.layers * (4 * h * h + self.ffn_matrices * h * self.ffn)
        return (projections + self._attention_flops(tokens) + self._memvp_flops(tokens, memory_rows)
                + 2.0 * tokens * h * self.vocab)

    def input_gradient_flops(self, tokens: int, memory_rows: int = 0) -> float:
        """The backward of a frozen stack: input gradients only. One product per forward product,
        two for attention (scores and mixing) and for MemVP (the memory's gradient as well)."""
        return (self.forward_flops(tokens, memory_rows) + self._attention_flops(tokens)
                + self._memvp_flops(tokens, memory_rows))

    def _attention_flops(self, tokens: int) -> float:
        """Scores and mixing, halved when causal (kernels skip the masked half)."""
        return 4.0 * tokens * tokens * self.hidden * self.layers * (0.5 if self.causal else 1.0)

    def _memvp_flops(self, tokens: int, memory_rows: int) -> float:
        """MemVP's two tokens x memory_rows x hidden products per layer."""
        return 4.0 * tokens * memory_rows * self.hidden * self.layers


@dataclass(frozen=True)
class QFormerStack:
    """BLIP-2's Q-Former over its queries: self-attention + FFN in every layer, cross-attention to
    the image features in every `cross_every`-th."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    cross_every: int
    queries: int
    image_width: int

    @classmethod
    def from_config(cls, config: Blip2Config) -> QFormerStack:
        q = config.qformer_config
        return cls(q.num_hidden_layers, q.hidden_size, q.num_attention_heads, q.intermediate_size,
                   q.cross_attention_frequency,
                   config.num_query_tokens, q.encoder_hidden_size)

    def forward_flops(self, image_tokens: int) -> float:
        q, h = self.queries, self.hidden
        per_layer = 2.0 * q * (4 * h * h + 2 * h * self.ffn) + 4.0 * q * q * h
        cross_layers = len(range(0, self.layers, self.cross_every))
        cross = (2.0 * q * 2 * h * h  # query and output projections
                 + 2.0 * image_tokens * 2 * self.image_width * h  # keys and values of the image features
                 + 4.0 * q * image_tokens * h)  # scores and mixing
        return self.layers * per_layer + cross_layers * cross


@dataclass(frozen=True)
class Setup:
    """One way of training a VPG on a frozen LLM; the defaults are BLIP-2's (EVA ViT-g/14 at 224
    pixels, a 12-layer Q-Former with 32 queries, soft prompts in the input sequence)."""

    llm: Stack
    vision: Stack = field(default_factory=lambda: Stack.from_config(Blip2Config().vision_config))
    qformer: QFormerStack = field(default_factory=lambda: QFormerStack.from_config(Blip2Config()))
    image_tokens: int = 257  # (224 / 14)^2 patches + CLS
    text_tokens: int = 32  # BLIP-2's max_txt_len; batches are padded to their longest caption
    feature_cache: bool = False  # image features read from the cache instead of the tower
    connector: str = "input"  # "input": prompts before the text; "memory": MemVP rows of each FFN
    train_qformer: bool = True  # False: VPGTrans stage 1, only the projector trains

    @property
    def llm_tokens(self) -> int:
        return self.text_tokens + (self.qformer.queries if self.connector == "input" else 0)

    @property
    def memory_rows(self) -> int:
        return self.qformer.queries if self.connector == "memory" else 0

    def flops_per_sample(self) -> dict[str, float]:
        """Matrix FLOPs of one training sample, per component."""
        projector = 2.0 * self.qformer.queries * self.qformer.hidden * self.llm.hidden
        qformer = self.qformer.forward_flops(self.image_tokens)
        return {
            "vision tower": 0.0 if self.feature_cache else self.vision.forward_flops(self.image_tokens),
            "Q-Former + projector": (3.0 if self.train_qformer else 1.0) * qformer + 3.0 * projector,
            "LLM": (self.llm.forward_flops(self.llm_tokens, self.memory_rows)
                    + self.llm.input_gradient_flops(self.llm_tokens, self.memory_rows)),
        }

    def seconds_per_sample(self, gpu: Hardware = A100, utilisation: float = UTILISATION) -> float:
        return sum(self.flops_per_sample().values()) / (gpu.matrix_flops * utilisation)

    def gpu_hours(self, samples: float, gpu: Hardware = A100, utilisation: float = UTILISATION) -> float:
        return samples * self.seconds_per_sample(gpu, utilisation) / 3600

    def feature_bytes(self) -> int:
        """Cached features of one image in bf16."""
        return 2 * self.image_tokens * self.vision.hidden


KERNEL_BATCH = 32  # samples per kernel call in the projections below (the benchmarks' training batch)


def fused_seconds_saved(setup: Setup, gpu: Hardware = A100) -> float:
    """Projected time per sample that vlfast's fused kernels, chosen by name, would remove from the
    eager PyTorch chains, forward + backward: the Q-Former's cross-attention and, with the memory
    connector, MemVP in every LLM layer, each at a batch of KERNEL_BATCH. Kernels as launched and
    eager chains are projected by vlfast.costmodel.kernels; an op whose kernels project slower than
    its eager chain saves nothing. (`auto` runs plain PyTorch on GPUs, SDPA for cross_attention,
    until the GPU check measures the kernels faster.)"""
    q = setup.qformer
    attention = AttentionShape(KERNEL_BATCH, q.heads, q.queries, setup.image_tokens, q.hidden // q.heads)
    blocks = attention_config(attention)
    cross_layers = len(range(0, q.layers, q.cross_every))
    eager = chain_seconds(cross_attention_eager(attention, backward=True), gpu)  # forward + backward
    fused = sum(chain_seconds(cross_attention_triton(attention, blocks, gpu, backward), gpu)
                for backward in (False, True))
    saved = cross_layers * max(eager - fused, 0.0)
    if setup.connector == "memory":
        memory = MemVPShape(KERNEL_BATCH, setup.text_tokens, setup.memory_rows, setup.llm.hidden)
        cfg = memvp_config(memory)
        eager = chain_seconds(memvp_eager(memory, backward=True), gpu)
        fused = sum(chain_seconds(memvp_triton(memory, cfg, gpu, backward), gpu) for backward in (False, True))
        saved += setup.llm.layers * max(eager - fused, 0.0)
    return saved / KERNEL_BATCH


@dataclass(frozen=True)
class Line:
    label: str
    kind: str  # "reported" (the paper), "projected" (this model)
    gflops_per_sample: float | None
    samples: float
    gpu_hours: float
    note: str = ""


def transfer_lines(source: str | PretrainedConfig, target: str | PretrainedConfig, *, gpu: Hardware = A100,
                   utilisation: float = UTILISATION, scratch_samples: float = PAPER["scratch_samples"],
                   transfer_samples: float = PAPER["transfer_samples"], text_tokens: int = 32) -> list[Line]:
    """The table of `python -m vlfast.costmodel`: the paper's figures where it has them, the
    model's projection of the same runs, then vlfast's changes to the VPGTrans run one at a time,
    each on top of the previous."""
    source_stack, target_stack = (Stack.from_config(llm_config(m)) for m in (source, target))
    base = Setup(target_stack, text_tokens=text_tokens)

    def line(label: str, setup: Setup, samples: float, note: str = "", extra_seconds: float = 0.0) -> Line:
        gflops = sum(setup.flops_per_sample().values()) / 1e9
        hours = setup.gpu_hours(samples, gpu, utilisation) - samples * extra_seconds / 3600
        return Line(label, "projected", gflops, samples, hours, note)

    lines = []
    if (source, target) == PAPER["pair"] and gpu == A100:
        lines += [Line("scratch (paper)", "reported", None, PAPER["scratch_samples"], PAPER["scratch_hours"]),
                  Line("VPGTrans (paper)", "reported", None, PAPER["transfer_samples"], PAPER["transfer_hours"])]
    cached = replace(base, feature_cache=True)
    memory = replace(cached, connector="memory")
    image_mb = base.feature_bytes() / 1e6
    lines += [
        line("scratch", base, scratch_samples),
        line("VPGTrans", base, transfer_samples, "stage 1 costed as stage 2 (its frozen Q-Former saves <2%)"),
        line("+ feature cache", cached, transfer_samples,
             f"features cached once (e.g. while training the source VPG: same frozen tower): "
             f"{image_mb:.2f} MB per image, {image_mb * transfer_samples / 1e6:.1f} TB for "
             f"{transfer_samples / 1e6:.1f}M images"),
        line("+ memory-space prompts (MemVP)", memory, transfer_samples,
             "prompts become FFN memory rows, not input tokens: a different connector, whose accuracy "
             "after VPGTrans is not projected"),
        line("+ fused cross_attention / memvp_memory", memory, transfer_samples,
             "the eager chains' projected time minus the fused kernels' as launched (vlfast.costmodel.kernels), "
             "were they chosen by name: auto runs plain PyTorch on GPUs until measured otherwise",
             fused_seconds_saved(memory, gpu)),
    ]
    lines.append(line(f"(source VPG from scratch on {_name(source)}, if none exists)",
                      replace(base, llm=source_stack), scratch_samples))
    return lines


def against_paper(lines: list[Line], gpu: Hardware = A100) -> dict[str, dict[str, float]]:
    """For each run the paper reports: the projection's relative error, and the utilisation at
    which the model would give the paper's hours exactly."""
    by_label = {ln.label: ln for ln in lines}
    out = {}
    for name in ("scratch", "VPGTrans"):
        reported, projected = by_label.get(f"{name} (paper)"), by_label[name]
        if reported is not None:
            flops = projected.gflops_per_sample * 1e9 * reported.samples
            out[name] = {"error": projected.gpu_hours / reported.gpu_hours - 1,
                         "implied_utilisation": flops / (gpu.matrix_flops * reported.gpu_hours * 3600)}
    return out


def llm_config(model: str | PretrainedConfig) -> PretrainedConfig:
    """A config from LLMS by name, a local directory or config.json, or a config object."""
    if isinstance(model, PretrainedConfig):
        return model
    if model in LLMS:
        return LLMS[model]
    path = Path(model)
    if not path.exists():
        raise ValueError(f"unknown LLM {model!r}: expected one of {sorted(LLMS)}, or a local directory or "
                         f"config.json of a Hugging Face model")
    return AutoConfig.from_pretrained(path.parent if path.is_file() else path)


def _name(model: str | PretrainedConfig) -> str:
    return model if isinstance(model, str) else model.model_type


def markdown(lines: list[Line], gpu: Hardware = A100, utilisation: float = UTILISATION) -> str:
    """The lines as a markdown table, each figure labelled reported or projected; "scratch / run" is
    the saving against the scratch run of the same kind."""
    unit = f"{gpu.name.split()[0]}-hours"
    scratch = {ln.kind: ln.gpu_hours for ln in lines if ln.label.startswith("scratch")}
    rows = [f"| run | figure | image-text pairs | GFLOPs / sample | {unit} | scratch / run | note |",
            "|---|---|---:|---:|---:|---:|---|"]
    for ln in lines:
        gflops = "" if ln.gflops_per_sample is None else f"{ln.gflops_per_sample:,.0f}"
        saving = "" if ln.label.startswith("(") else f"{scratch[ln.kind] / ln.gpu_hours:.1f}x"
        rows.append(f"| {ln.label} | {ln.kind} | {ln.samples / 1e6:.1f}M | {gflops} | {ln.gpu_hours:.1f} | {saving} "
                    f"| {ln.note} |")
    footer = [f"Projected at {utilisation:.0%} of the {gpu.name}'s dense bf16 rate "
              f"({gpu.matrix_flops / 1e12:.0f} TFLOP/s), an assumed utilisation."]
    for name, check in against_paper(lines, gpu).items():
        footer.append(f"{name}: the projection is {check['error']:+.0%} off the paper, whose hours imply "
                      f"{check['implied_utilisation']:.0%} utilisation.")
    return "\n".join(rows) + "\n\n" + " ".join(footer) + "\n"
