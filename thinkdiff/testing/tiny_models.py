"""Small random models of every supported family, built offline.

Tests, demos and benchmarks run on these. Each keeps the real *interfaces* of its family (processor, chat
template, special tokens, conditioning widths such as FLUX's 4096 + 768 pooled) with a tiny backbone.
Attention heads are 32 wide so the same checkpoints also run in vLLM's CPU backend.

    >>> from thinkdiff.testing.tiny_models import make_tiny
    >>> make_tiny("/tmp/tiny-mllama", "mllama")   # save_pretrained layout, reloads with from_pretrained
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from ..atomic import atomic_dir
from ..chat_templates import llama32_vision_chat_template
from ..errors import ConfigError

VLM_KINDS = ("llama", "mllama", "qwen2-vl")
TEXT_ENCODER_KINDS = ("t5",)
DECODER_KINDS = ("flux", "sd3", "sd15", "sana", "qwenimage")
KINDS = VLM_KINDS + TEXT_ENCODER_KINDS + DECODER_KINDS

# Bumped whenever a builder changes, so cached tiny models are rebuilt.
TINY_VERSION = 6

_CORPUS = [
    "Create an image of a red apple on a wooden table in soft morning light.",
    "A photo of a cat sitting next to a blue car on a sunny street.",
    "Describe the image concisely. The picture shows a green tree under a cloudy sky.",
    "I give you several words and pictures. First, please analyse what the next picture is.",
    "Then give me a detailed diffusion prompt to describe the next picture.",
    "Word 1: red, Word 2: blue, Word 3: yellow, a dog, a ball, a house with a garden.",
    "The style is watercolor, the texture is wood, the background is a beach at sunset.",
    "one two three four five six seven eight nine ten plus minus equals answer is",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) . , : ; ! ?",
] * 4

_LLAMA_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|finetune_right_pad_id|>", "<|python_tag|>",
]
_QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
]

# Same structure as Llama-3 / Llama-3.2-Vision's template: images become <|image|> where they stand.
LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|image|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Same structure as Qwen2-VL's template.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Mllama tiles: Llama-3.2-Vision's 560 px, so the processor tiles images as the real model does; patches of 56 px
# (the real model: 14 px, 1601 tokens a tile) keep the vision tower at 101 tokens a tile, for CPU time.
MLLAMA_TILE = 560
MLLAMA_PATCH = 56

# Text backbone shared by the three VLM kinds: 4 layers, hidden 128, 4 heads of 32 (2 KV heads).
_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
             tie_word_embeddings=False)


def default_cache_dir() -> Path:
    """Where the embedded tiny models live: $THINKDIFF_HOME or ~/.cache/thinkdiff."""
    return Path(os.environ.get("THINKDIFF_HOME", Path.home() / ".cache" / "thinkdiff"))


def tiny_path(kind: str) -> Path:
    """Path of the cached tiny model of `kind`, built on first use. Processes that ask at once take turns on a file
    lock: the first builds, the others find it built."""
    from filelock import FileLock

    _check_kind(kind)
    path = default_cache_dir() / "tiny" / f"{kind}-v{TINY_VERSION}"
    if (path / ".complete").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not (path / ".complete").exists():
            if torch.distributed.is_initialized():
                # In a process group transformers writes files on rank 0 only: build in a process of its own.
                subprocess.run([sys.executable, "-c", f"from {__name__} import make_tiny; "
                                f"make_tiny({str(path)!r}, {kind!r})"], check=True)
            else:
                make_tiny(path, kind)
    return path


def make_tiny(out_dir: str | os.PathLike, kind: str, seed: int = 0, replace: bool = True, **options) -> Path:
    """Build a tiny random model of `kind` and save it to `out_dir` (written to a temp dir, then renamed; an
    existing `out_dir` is replaced unless `replace=False`). `options` go to the builder (mllama: `tile` and
    `patch`, in pixels, default MLLAMA_TILE and MLLAMA_PATCH)."""
    _check_kind(kind)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, replace=replace) as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # transformers and diffusers initialise from the global RNG; restored on exit
        _BUILDERS[kind](tmp, **options)
        (tmp / ".complete").write_text(f"thinkdiff tiny {kind} v{TINY_VERSION} seed {seed}\n")
    return out_dir


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"Unknown tiny model kind {kind!r}; choose one of {', '.join(KINDS)}.")


# ----------------------------------------------------------------------------------------------- tokenizers


def _bpe_tokenizer(specials: list[str], **named_tokens):
    """Byte-level BPE trained on a small fixed corpus (deterministic), wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=2048, **named_tokens)


def _llama_tokenizer(image_token: bool = False):
    tok = _bpe_tokenizer(_LLAMA_SPECIALS, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                         pad_token="<|finetune_right_pad_id|>")
    if image_token:  # last id, as in Llama-3.2-Vision: outside the LM head, so it is never generated
        tok.add_special_tokens({"additional_special_tokens": ["<|image|>"]})
    tok.chat_template = LLAMA_CHAT_TEMPLATE
    return tok


# Llama-3.2-11B-Vision-Instruct's special tokens at their real ids (128000..128255, then <|image|> = 128256).
LLAMA32_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                     "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                     "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                    + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])
LLAMA32_FIRST_SPECIAL = 128000
LLAMA32_EOS_IDS = [128001, 128008, 128009]  # generation_config.json's eos_token_id
LLAMA32_PAD_ID = 128004


def _llama32_vision_tokenizer():
    """Byte-level BPE on the small corpus, padded with never-produced filler entries to 128000 ids, then Llama-3's
    256 special tokens at their real ids and <|image|> at 128256, with the real chat template."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    base = json.loads(_bpe_tokenizer([]).backend_tokenizer.to_str())
    vocab = base["model"]["vocab"]
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), LLAMA32_FIRST_SPECIAL)})
    tok = Tokenizer.from_str(json.dumps(base))
    tok.add_special_tokens(LLAMA32_SPECIALS + ["<|image|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=131072, bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")
    fast.chat_template = llama32_vision_chat_template()
    assert fast.convert_tokens_to_ids("<|image|>") == 128256 and fast.pad_token_id == LLAMA32_PAD_ID
    return fast


def _qwen_tokenizer():
    tok = _bpe_tokenizer(_QWEN_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def _randomize(model: torch.nn.Module, std: float = 0.08) -> None:
    """Re-draw matrices with a larger std than HF's 0.02, so tiny models give varied tokens; open every gate."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name.split(".")[-1] and p.numel() <= 8:
                p.fill_(0.7)  # Mllama's tanh gates start at 0, which would switch cross-attention off
            elif p.dim() >= 2:
                p.normal_(0.0, std)


# ---------------------------------------------------------------------------------------------------- VLMs


def _build_llama(out: Path) -> None:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = _llama_tokenizer()
    config = LlamaConfig(**dict(_TEXT, vocab_size=len(tok)), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    _randomize(model)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _build_mllama(out: Path, tile: int = MLLAMA_TILE, patch: int = MLLAMA_PATCH) -> None:
    """Llama-3.2-11B-Vision-Instruct's interfaces (tokenizer ids, chat template, eos/pad ids, 4 tiles of `tile`
    px) on a 4-layer, 128-wide text model and a 64-wide vision tower with `patch`-px patches."""
    from transformers import GenerationConfig, MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tok = _llama32_vision_tokenizer()
    image_token_id = tok.convert_tokens_to_ids("<|image|>")
    # vocab_size excludes <|image|> (= vocab_size); transformers' embedding table has vocab_size + 8 rows.
    text = dict(_TEXT, vocab_size=image_token_id, cross_attention_layers=[1], bos_token_id=tok.bos_token_id,
                eos_token_id=LLAMA32_EOS_IDS, pad_token_id=LLAMA32_PAD_ID)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_global_layers=1,
                  attention_heads=2, vision_output_dim=192, intermediate_layers_indices=[0, 1],
                  image_size=tile, patch_size=patch, max_num_tiles=4, num_channels=3)
    config = MllamaConfig(text_config=text, vision_config=vision, image_token_index=image_token_id)
    model = MllamaForConditionalGeneration(config)
    _randomize(model)
    unused = [i for t, i in tok.get_vocab().items() if t.startswith(("<|filler_", "<|reserved_special_token_"))]
    with torch.no_grad():  # fillers and reserved tokens are never trained: zero logits, like a real model's
        model.lm_head.weight[unused] = 0.0
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=LLAMA32_EOS_IDS,
                                               pad_token_id=LLAMA32_PAD_ID)
    model.save_pretrained(out)
    image_processor = MllamaImageProcessorPil(size={"height": tile, "width": tile}, max_image_tiles=4)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tok,
                                chat_template=llama32_vision_chat_template())
    processor.save_pretrained(out)


def _build_qwen2_vl(out: Path) -> None:
    from transformers import GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = _qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
    text = dict(_TEXT, vocab_size=len(tok), rope_parameters=rope,
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=2, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    model = Qwen2VLForConditionalGeneration(config)
    _randomize(model)
    model.generation_config = GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # Small images: 56x56 .. 112x112 pixels -> 4 .. 16 visual tokens per image.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    image_processor.save_pretrained(out)


def _build_t5(out: Path) -> None:
    """A 1+1-layer T5 with d_model 4096 (T5-XXL's width, FLUX's T5 slot): ThinkDiff's proxy decoder in training."""
    from transformers import T5Config, T5ForConditionalGeneration

    tok = _bpe_tokenizer(["<pad>", "</s>", "<unk>"], pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.model_max_length = 512
    config = T5Config(vocab_size=len(tok), d_model=4096, d_kv=32, d_ff=256, num_layers=1, num_decoder_layers=1,
                      num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    model = T5ForConditionalGeneration(config)
    _randomize(model, std=0.02)
    model.save_pretrained(out)
    tok.save_pretrained(out)


# ------------------------------------------------------------------------------------------------ decoders


def _kl_vae(latent_channels: int, scaling_factor: float, shift_factor: float | None = None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=latent_channels,
                         norm_num_groups=4, use_quant_conv=shift_factor is None,
                         use_post_quant_conv=shift_factor is None, shift_factor=shift_factor,
                         scaling_factor=scaling_factor)


def _clip_text_encoder(hidden_size: int):
    """A 1-layer CLIP text encoder (real CLIPTextModel, pooled width `hidden_size`) and its tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = _bpe_tokenizer(["<|startoftext|>", "<|endoftext|>"], bos_token="<|startoftext|>",
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.model_max_length = 77
    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=hidden_size // 64, max_position_embeddings=77,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    encoder = CLIPTextModel(config)
    _randomize(encoder)
    return encoder, tok


def _build_flux(out: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=4096,
                                         pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    # FLUX's CLIP-L (for the pooled vector) is kept so `pooled: empty_prompt` runs; T5 is left out.
    clip, clip_tokenizer = _clip_text_encoder(768)
    pipe = FluxPipeline(scheduler=scheduler, vae=_kl_vae(16, 0.3611, 0.1159), text_encoder=clip,
                        tokenizer=clip_tokenizer, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.save_pretrained(out)


def _build_sd3(out: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=4096, pooled_projection_dim=2048, pos_embed_max_size=96)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_kl_vae(16, 1.5305, 0.0609), text_encoder=None, tokenizer=None,
                                    text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(out)


def _build_sd15(out: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
                                attention_head_dim=4, norm_num_groups=4)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=_kl_vae(4, 0.18215), text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out)


def _build_sana(out: Path) -> None:
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                         num_attention_heads=2, attention_head_dim=8, num_cross_attention_heads=2,
                                         cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=2304,
                                         sample_size=32)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=[1, 1], downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipe.save_pretrained(out)


def _build_qwenimage(out: Path) -> None:
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3584,
                                              guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 16,
                                 latents_std=[1.0] * 16)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192,
                                                shift_terminal=0.02, time_shift_type="exponential")
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                             transformer=transformer)
    pipe.save_pretrained(out)


_BUILDERS = {
    "llama": _build_llama,
    "mllama": _build_mllama,
    "qwen2-vl": _build_qwen2_vl,
    "t5": _build_t5,
    "flux": _build_flux,
    "sd3": _build_sd3,
    "sd15": _build_sd15,
    "sana": _build_sana,
    "qwenimage": _build_qwenimage,
}
