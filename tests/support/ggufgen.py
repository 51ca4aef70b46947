"""Tiny random-weight GGUF models of the seed architectures, for tests.

The real Llama 3.1 8B and Mixtral weights are tens of GB; these files are a few MB
and exercise the same code in llama.cpp: Llama 3.1's dense GQA blocks with its
llama3 rope scaling, and Mixtral's 8-expert, 2-active MoE blocks. The tokenizer is
SmolLM2's real BPE vocabulary (read from the default model) extended with each seed
model's special tokens as control tokens, so the chat templates tokenize the way
they do on the real models: ``<|eot_id|>`` is one token, not eleven.

Random weights write nonsense: tests built on these check formatting, token
accounting, stops and limits, never wording.

A tiny multimodal projector (``mmproj``) makes any of them a vision model.

    python -m tests.support.ggufgen OUT_DIR   # writes all of them
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

# Bump when the output changes, so cached files from an older generator are rebuilt.
VERSION = 2

# Our rendering of Llama 3.1 Instruct's published chat format: the system block is
# always present (with the knowledge-cutoff and date lines), contents are trimmed,
# and with tools the functions go into the first user turn, as the official template
# does by default. Tool results use the ipython role.
LLAMA31_TEMPLATE = """\
{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools is not none %}
    {%- if messages | length == 0 %}
        {{- raise_exception("Tools need a first user message to go in.") }}
    {%- endif %}
    {%- set first_user_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
    {{- "<|start_header_id|>user<|end_header_id|>\\n\\n" }}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of '
        'argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>" }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] in ['tool', 'ipython'] %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" + message['content'] }}
        {{- "<|eot_id|>" }}
    {%- elif message.tool_calls %}
        {%- set call = message.tool_calls[0].function %}
        {{- "<|start_header_id|>assistant<|end_header_id|>\\n\\n" }}
        {{- '{"name": "' + call.name + '", "parameters": ' + call.arguments | tojson + '}' }}
        {{- "<|eot_id|>" }}
    {%- else %}
        {{- "<|start_header_id|>" + message['role'] + "<|end_header_id|>\\n\\n" }}
        {{- message['content'] | trim + "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- "<|start_header_id|>assistant<|end_header_id|>\\n\\n" }}
{%- endif %}
"""

# Mixtral 8x7B Instruct v0.1 (Mistral tokenizer v1): "[INST]" is plain text with
# spaces inside the brackets' turn; roles must alternate starting with user (servelm
# merges system and repeated turns before the template sees them).
MIXTRAL_V1_TEMPLATE = """\
{{- bos_token }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
    {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + message['content'] + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
"""

# Mixtral 8x22B Instruct v0.1 (Mistral tokenizer v3): [INST] and [/INST] are control
# tokens, no space before [/INST], and the assistant reply follows with one space.
MIXTRAL_V3_TEMPLATE = """\
{{- bos_token }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
    {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + message['content'] + '[/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
"""

LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
)


@dataclass(frozen=True)
class TinyArch:
    """One seed architecture, scaled down to a few layers and a narrow width."""

    name: str
    file_name: str
    context_length: int
    rope_freq_base: float
    template: str
    specials: tuple[str, ...]
    bos: str
    eos: str
    eot: str | None = None
    eom: str | None = None
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_expert: int = 0
    n_expert_used: int = 0
    # Llama 3.1's rope scaling (factor 8 over an 8192-token original window).
    llama3_rope: bool = False
    description: str = field(default="", compare=False)


LLAMA31 = TinyArch(
    name="tiny-llama-3.1",
    file_name=f"tiny-llama-3.1-v{VERSION}.gguf",
    context_length=131072,
    rope_freq_base=500000.0,
    template=LLAMA31_TEMPLATE,
    specials=LLAMA3_SPECIALS,
    bos="<|begin_of_text|>",
    eos="<|eot_id|>",
    eot="<|eot_id|>",
    eom="<|eom_id|>",
    llama3_rope=True,
    description="Llama 3.1 Instruct shape: dense, GQA 4/2, llama3 rope scaling",
)
MIXTRAL_8X7B = TinyArch(
    name="tiny-mixtral-8x7b",
    file_name=f"tiny-mixtral-8x7b-v{VERSION}.gguf",
    context_length=32768,
    rope_freq_base=1000000.0,
    template=MIXTRAL_V1_TEMPLATE,
    specials=("<s>", "</s>"),
    bos="<s>",
    eos="</s>",
    n_expert=8,
    n_expert_used=2,
    description="Mixtral 8x7B Instruct shape: 8 experts, 2 active, tokenizer v1 format",
)
MIXTRAL_8X22B = TinyArch(
    name="tiny-mixtral-8x22b",
    file_name=f"tiny-mixtral-8x22b-v{VERSION}.gguf",
    context_length=65536,
    rope_freq_base=1000000.0,
    template=MIXTRAL_V3_TEMPLATE,
    specials=("<s>", "</s>", "[INST]", "[/INST]"),
    bos="<s>",
    eos="</s>",
    n_expert=8,
    n_expert_used=2,
    description="Mixtral 8x22B Instruct shape: 8 experts, 2 active, tokenizer v3 format",
)
ARCHS = {"llama-v3p1-8b-instruct": LLAMA31, "mixtral-8x7b-instruct": MIXTRAL_8X7B,
         "mixtral-8x22b-instruct": MIXTRAL_8X22B}  # fmt: skip


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str


def read_vocab(gguf_path: Path) -> Vocab:
    """The BPE tokenizer of an existing GGUF (SmolLM2's, in practice)."""
    reader = gguf.GGUFReader(gguf_path)

    def field(name: str) -> object:
        f = reader.get_field(name)
        if f is None:
            raise ValueError(f"{gguf_path} has no {name}")
        return f.contents()

    if field("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{gguf_path}: expected a BPE (gpt2) tokenizer")
    return Vocab(
        tokens=list(field("tokenizer.ggml.tokens")),  # type: ignore[call-overload]
        types=[int(t) for t in field("tokenizer.ggml.token_type")],  # type: ignore[attr-defined]
        merges=list(field("tokenizer.ggml.merges")),  # type: ignore[call-overload]
        pre=str(field("tokenizer.ggml.pre")),
    )


def llama3_rope_factors(head_dim: int, base: float) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's rope scaling (factor 8, low/high frequency
    factors 1 and 4, original context 8192), as llama.cpp reads them from
    ``rope_freqs.weight``."""
    factor, low, high, original = 8.0, 1.0, 4.0, 8192
    low_wavelen, high_wavelen = original / low, original / high
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / (base ** (i / head_dim))
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_model(arch: TinyArch, vocab: Vocab, out: Path, seed: int = 0) -> Path:
    """Write one tiny model to ``out`` (atomically) and return its path."""
    tokens = list(vocab.tokens)
    types = list(vocab.types)
    ids: dict[str, int] = {}
    for special in arch.specials:
        ids[special] = len(tokens)
        tokens.append(special)
        types.append(gguf.TokenType.CONTROL)
    n_vocab = len(tokens)
    head_dim = arch.n_embd // arch.n_head
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float16)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    tmp = out.with_suffix(f".{os.getpid()}.tmp")  # several test workers may write it at once
    w = gguf.GGUFWriter(tmp, arch="llama")
    w.add_name(arch.name)
    w.add_description(arch.description)
    w.add_block_count(arch.n_layer)
    w.add_context_length(arch.context_length)
    w.add_embedding_length(arch.n_embd)
    w.add_feed_forward_length(arch.n_ff)
    w.add_head_count(arch.n_head)
    w.add_head_count_kv(arch.n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(arch.rope_freq_base)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    if arch.n_expert:
        w.add_expert_count(arch.n_expert)
        w.add_expert_used_count(arch.n_expert_used)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(vocab.merges)
    w.add_bos_token_id(ids[arch.bos])
    w.add_eos_token_id(ids[arch.eos])
    if arch.eot:
        w.add_eot_token_id(ids[arch.eot])
    if arch.eom:
        w.add_eom_token_id(ids[arch.eom])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(arch.template)

    # Output projection tied to the embeddings (llama.cpp falls back to token_embd).
    w.add_tensor("token_embd.weight", weight(n_vocab, arch.n_embd))
    w.add_tensor("output_norm.weight", ones(arch.n_embd))
    if arch.llama3_rope:
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(head_dim, arch.rope_freq_base))
    kv = arch.n_head_kv * head_dim
    for i in range(arch.n_layer):
        b = f"blk.{i}"
        w.add_tensor(f"{b}.attn_norm.weight", ones(arch.n_embd))
        w.add_tensor(f"{b}.attn_q.weight", weight(arch.n_embd, arch.n_embd))
        w.add_tensor(f"{b}.attn_k.weight", weight(kv, arch.n_embd))
        w.add_tensor(f"{b}.attn_v.weight", weight(kv, arch.n_embd))
        w.add_tensor(f"{b}.attn_output.weight", weight(arch.n_embd, arch.n_embd))
        w.add_tensor(f"{b}.ffn_norm.weight", ones(arch.n_embd))
        if arch.n_expert:
            # The router is kept in f32: it is tiny and picks the 2 active experts.
            router = (rng.standard_normal((arch.n_expert, arch.n_embd)) * 0.02).astype(np.float32)
            w.add_tensor(f"{b}.ffn_gate_inp.weight", router)
            w.add_tensor(f"{b}.ffn_gate_exps.weight", weight(arch.n_expert, arch.n_ff, arch.n_embd))
            w.add_tensor(f"{b}.ffn_up_exps.weight", weight(arch.n_expert, arch.n_ff, arch.n_embd))
            w.add_tensor(f"{b}.ffn_down_exps.weight", weight(arch.n_expert, arch.n_embd, arch.n_ff))
        else:
            w.add_tensor(f"{b}.ffn_gate.weight", weight(arch.n_ff, arch.n_embd))
            w.add_tensor(f"{b}.ffn_up.weight", weight(arch.n_ff, arch.n_embd))
            w.add_tensor(f"{b}.ffn_down.weight", weight(arch.n_embd, arch.n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return out


# A LLaVA-style vision tower: 32x32 pixels in 8x8 patches → 16 image tokens, one
# transformer block, and the two-layer MLP projector ("mlp") into the language
# model's embedding width. llama.cpp's multimodal loader takes it as it takes
# LLaVA 1.5's, so the real image path (decode, encode, embed) runs in tests.
MMPROJ_FILE = f"tiny-mmproj-v{VERSION}.gguf"
MMPROJ_IMAGE_SIZE = 32
MMPROJ_PATCH_SIZE = 8
MMPROJ_IMAGE_TOKENS = (MMPROJ_IMAGE_SIZE // MMPROJ_PATCH_SIZE) ** 2


def write_mmproj(out: Path, n_embd_out: int = 64, seed: int = 1) -> Path:
    """A tiny random-weight multimodal projector whose output width is ``n_embd_out``
    (the language model's ``n_embd``: 64 for every tiny model here)."""
    width, ff = 32, 64
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    def zeros(n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.float32)

    tmp = out.with_suffix(f".{os.getpid()}.tmp")  # several test workers may write it at once
    w = gguf.GGUFWriter(tmp, arch="clip")
    w.add_name("tiny-mmproj")
    w.add_bool(gguf.Keys.Clip.HAS_VISION_ENCODER, True)
    w.add_string(gguf.Keys.Clip.PROJECTOR_TYPE, "mlp")
    w.add_uint32(gguf.Keys.ClipVision.IMAGE_SIZE, MMPROJ_IMAGE_SIZE)
    w.add_uint32(gguf.Keys.ClipVision.PATCH_SIZE, MMPROJ_PATCH_SIZE)
    w.add_uint32(gguf.Keys.ClipVision.EMBEDDING_LENGTH, width)
    w.add_uint32(gguf.Keys.ClipVision.FEED_FORWARD_LENGTH, ff)
    w.add_uint32(gguf.Keys.ClipVision.PROJECTION_DIM, n_embd_out)
    w.add_uint32(gguf.Keys.ClipVision.BLOCK_COUNT, 1)
    w.add_uint32(gguf.Keys.ClipVision.Attention.HEAD_COUNT, 2)
    w.add_float32(gguf.Keys.ClipVision.Attention.LAYERNORM_EPS, 1e-5)
    w.add_array(gguf.Keys.ClipVision.IMAGE_MEAN, [0.5, 0.5, 0.5])
    w.add_array(gguf.Keys.ClipVision.IMAGE_STD, [0.5, 0.5, 0.5])
    w.add_bool(gguf.Keys.ClipVision.USE_GELU, True)
    patches = (MMPROJ_IMAGE_SIZE // MMPROJ_PATCH_SIZE) ** 2
    w.add_tensor("v.class_embd", weight(width))
    w.add_tensor(
        "v.patch_embd.weight",
        weight(width, 3, MMPROJ_PATCH_SIZE, MMPROJ_PATCH_SIZE).astype(np.float16),
    )
    w.add_tensor("v.position_embd.weight", weight(patches + 1, width))
    w.add_tensor("v.pre_ln.weight", ones(width))
    w.add_tensor("v.pre_ln.bias", zeros(width))
    for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
        w.add_tensor(f"v.blk.0.{name}.weight", weight(width, width))
        w.add_tensor(f"v.blk.0.{name}.bias", zeros(width))
    for name in ("ln1", "ln2"):
        w.add_tensor(f"v.blk.0.{name}.weight", ones(width))
        w.add_tensor(f"v.blk.0.{name}.bias", zeros(width))
    w.add_tensor("v.blk.0.ffn_up.weight", weight(ff, width))
    w.add_tensor("v.blk.0.ffn_up.bias", zeros(ff))
    w.add_tensor("v.blk.0.ffn_down.weight", weight(width, ff))
    w.add_tensor("v.blk.0.ffn_down.bias", zeros(width))
    w.add_tensor("mm.0.weight", weight(n_embd_out, width))
    w.add_tensor("mm.0.bias", zeros(n_embd_out))
    w.add_tensor("mm.2.weight", weight(n_embd_out, n_embd_out))
    w.add_tensor("mm.2.bias", zeros(n_embd_out))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return out


def ensure_mmproj(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MMPROJ_FILE
    return path if path.is_file() else write_mmproj(path)


def ensure_models(out_dir: Path, vocab_source: Path) -> dict[str, Path]:
    """Seed slug → tiny GGUF path; files already written by this VERSION are reused."""
    out_dir.mkdir(parents=True, exist_ok=True)
    current = {arch.file_name for arch in ARCHS.values()} | {MMPROJ_FILE}
    for old in out_dir.glob("tiny-*-v*.gguf"):
        if old.name not in current:
            old.unlink()  # written by an older generator
    vocab: Vocab | None = None
    paths: dict[str, Path] = {}
    for slug, arch in ARCHS.items():
        path = out_dir / arch.file_name
        if not path.is_file():
            vocab = vocab or read_vocab(vocab_source)
            write_model(arch, vocab, path)
        paths[slug] = path
    return paths


def main(argv: list[str]) -> int:
    import argparse

    from servelm.catalog.weights import default_model
    from servelm.config import default_data_dir

    # argparse, so that --help (or any other flag) is never taken for OUT_DIR.
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.ggufgen",
        description="Write the tiny random-weight GGUF models the tests use (one per seed "
        "architecture, about 25 MB in all, plus a vision projector) into OUT_DIR.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="where to write them")
    out_dir: Path = parser.parse_args(argv).out_dir
    source = default_model.ensure_default_model(default_data_dir() / "models")
    made = ensure_models(out_dir, source)
    made["mmproj (vision)"] = ensure_mmproj(out_dir)
    for slug, path in made.items():
        print(f"{slug}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
