"""The miniature's VLM: a small Mllama (Llama-3.2-Vision's architecture, chat template and special tokens, with a
word-level vocabulary over the world) trained from nothing to answer CoBSAT-format prompts (ThinkDiff's
instruction, `Word i: x, <image>` items, 1 to 5 shots) with the description of the next image, e.g.
"Create an image of a green car." (ThinkDiff's Qwen2-VL, in miniature).

Two stages, as real VLMs are built: the vision tower is first pretrained alone to name each drawing's detail and
object (real VLMs start from a CLIP-pretrained tower; trained only through the language loss, this one learnt the
colours but not the ten shapes; in a probe this pretraining named 29% of objects after 800 steps, 88% after
3,000), then the whole Mllama learns the answers. Prompts go through the processor's chat template exactly as the
engines render them; the loss covers the answer and its end token only. Training sequences come from
world.training_sequences (no CoBSAT evaluation sample).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..chat_templates import llama32_vision_chat_template
from ..config import THINKDIFF_PROMPTS
from ..eval.cobsat import ITEM_DICT, TASKS, THINKDIFF_INSTRUCTION, word
from ..vlm.engine import CHAT_TEMPLATE_KWARGS, VLMRequest
from .optim import OneCycleAdamW
from .tokenizer import word_level_tokenizer
from .world import (
    Captioning,
    captioning_examples,
    drawing_labels,
    drawings,
    jittered,
    training_sequences,
    world_vocabulary_texts,
)

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|reserved_special_token_0|>"]
END_IDS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
TILE, PATCH = 56, 14  # a 64-px drawing is one 56-px tile (of 4, as Mllama needs), 14-px patches: 16 + 1 tokens


def mini_tokenizer():
    """Word-level, lowercase; Llama-3.2's special tokens (names, not ids) and <|image|> last (= vocab_size)."""
    texts = [THINKDIFF_INSTRUCTION, *THINKDIFF_PROMPTS, "user assistant system Word : , . ' ? ! -",
             *[str(i) for i in range(10)], *world_vocabulary_texts(),
             *[word(x) for items in ITEM_DICT.values() for x in items]]
    fast = word_level_tokenizer(texts, ["<unk>"], SPECIALS + ["<|image|>"], model_max_length=2048,
                                bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                pad_token="<|finetune_right_pad_id|>")
    fast.chat_template = llama32_vision_chat_template()
    return fast


def build_mllama(out_dir: str | Path, seed: int = 0) -> Path:
    """A fresh miniature Mllama and its processor, saved to `out_dir`."""
    from transformers import GenerationConfig, MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tok = mini_tokenizer()
    image_id = tok.convert_tokens_to_ids("<|image|>")
    assert image_id == len(tok) - 1
    end_ids = tok.convert_tokens_to_ids(list(END_IDS))
    text = dict(vocab_size=image_id, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
                tie_word_embeddings=False, cross_attention_layers=[1, 3], bos_token_id=tok.bos_token_id,
                eos_token_id=end_ids, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_global_layers=1,
                  attention_heads=2, vision_output_dim=288, intermediate_layers_indices=[0, 1],
                  image_size=TILE, patch_size=PATCH, max_num_tiles=4, num_channels=3)
    config = MllamaConfig(text_config=text, vision_config=vision, image_token_index=image_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # transformers initialises from the global RNG; restored on exit
        model = MllamaForConditionalGeneration(config)
        with torch.no_grad():  # open the tanh gates a little, so cross-attention learns from step one
            for name, p in model.named_parameters():
                if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                    p.fill_(0.1)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=end_ids,
                                               pad_token_id=tok.pad_token_id)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor = MllamaProcessor(image_processor=MllamaImageProcessorPil(size={"height": TILE, "width": TILE},
                                                                        max_image_tiles=4),
                                tokenizer=tok, chat_template=llama32_vision_chat_template())
    processor.save_pretrained(out_dir)
    return out_dir


def training_batch(processor, sequences, rng: np.random.Generator):
    """Processor inputs for prompt + answer + <|eot_id|>, and labels on the answer and its end token only."""
    texts, images, prompt_lens = [], [], []
    for q in sequences:
        theme = q.task_type if isinstance(q, Captioning) else TASKS[q.task_id].task_type
        pics = [jittered(theme, d, o, rng) for d, o in q.image_pairs()]
        request = VLMRequest(q.prompt(), pics)
        prompt = processor.apply_chat_template(request.chat_messages(), tokenize=False, add_generation_prompt=True,
                                               **CHAT_TEMPLATE_KWARGS)
        texts.append(prompt + q.answer() + "<|eot_id|>")
        images.append(pics)
        prompt_lens.append(len(processor.tokenizer(prompt, add_special_tokens=False).input_ids))
    processor.tokenizer.padding_side = "right"
    enc = processor(text=texts, images=images, padding=True, return_tensors="pt", add_special_tokens=False)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    for row, n in enumerate(prompt_lens):
        labels[row, :n] = -100
    enc["labels"] = labels
    return enc


def pretrain_vision(model, processor, steps: int, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                    progress: bool = True) -> list[float]:
    """Train the vision tower and the multimodal projector to name every jittered drawing's detail (50 classes) and
    object (20) from its mean projected patch state (linear heads, discarded afterwards); returns the loss per
    step."""
    world = drawings()
    labels = torch.tensor([drawing_labels(*d) for d in world])  # [500, 2]: detail class, object class
    width = model.config.text_config.hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = torch.nn.ModuleList([torch.nn.Linear(width, int(labels[:, 0].max()) + 1),
                                     torch.nn.Linear(width, int(labels[:, 1].max()) + 1)])
    vision, projector = model.model.vision_model, model.model.multi_modal_projector
    optim = OneCycleAdamW([*vision.parameters(), *projector.parameters(), *heads.parameters()], lr, steps,
                          weight_decay=0.01)
    rng, order = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc="mini VLM vision", disable=not progress):
        picks = torch.randint(len(world), (batch_size,), generator=order)
        pixels = processor.image_processor([[jittered(*world[i], rng)] for i in picks.tolist()], return_tensors="pt")
        states = vision(pixel_values=pixels["pixel_values"], aspect_ratio_ids=pixels["aspect_ratio_ids"],
                        aspect_ratio_mask=pixels["aspect_ratio_mask"]).last_hidden_state
        pooled = projector(states)[:, 0, 0].mean(1)  # the drawing's one tile: [B, patches + 1, width] -> [B, width]
        loss = sum(torch.nn.functional.cross_entropy(head(pooled), labels[picks, i]) for i, head in enumerate(heads))
        losses.append(optim.step(loss))
    return losses


def train_vlm(out_dir: str | Path, steps: int = 3000, batch_size: int = 16, lr: float = 1e-3, captioning: float = 0.25,
              vision_steps: int = 3000, seed: int = 0, progress: bool = True) -> tuple[Path, list[float]]:
    """Build the miniature Mllama, pretrain its vision tower (`vision_steps`), then train it on CoBSAT-format
    sequences with a `captioning` share of single-drawing captioning examples (what the aligner's first stage feeds
    it); saves it (safetensors + processor) to `out_dir`. Returns the folder and the language loss per step."""
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    out_dir = build_mllama(out_dir, seed)
    processor = AutoProcessor.from_pretrained(str(out_dir))
    model = MllamaForConditionalGeneration.from_pretrained(str(out_dir)).train()
    if vision_steps:
        vision_losses = pretrain_vision(model, processor, vision_steps, seed=seed, progress=progress)
        (out_dir / "vision_losses.txt").write_text("".join(f"{x:.6f}\n" for x in vision_losses))
    optim = OneCycleAdamW(model.parameters(), lr, steps, weight_decay=0.01)
    total = steps * batch_size
    captions = round(captioning * total)
    mixed = random.Random(f"thinkdiff-mini-vlm/{seed}")
    sequences = training_sequences(total - captions, seed=seed) + captioning_examples(captions, seed=seed)
    mixed.shuffle(sequences)
    rng = np.random.default_rng(seed)
    losses = []
    for step in tqdm(range(steps), desc="mini VLM", disable=not progress):
        batch = training_batch(processor, sequences[step * batch_size:(step + 1) * batch_size], rng)
        loss = model(**batch).loss
        losses.append(optim.step(loss))
    model.eval().save_pretrained(out_dir)
    return out_dir, losses
