"""The collapse experiment's base policy: a small text Llama (transformers' LlamaForCausalLM, word-level vocabulary)
trained from nothing by supervised fine-tuning on a task's (prompt, solution) pairs, prompts rendered through its
chat template exactly as our engines render them, the loss on the solution and its end token only."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..mini.optim import OneCycleAdamW
from ..mini.tokenizer import word_level_tokenizer
from ..vlm import VLMRequest
from ..vlm.engine import CHAT_TEMPLATE_KWARGS

SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|pad|>"]
# role, then the text; the answer follows "assistant :" and ends with <|eot_id|>
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {% if m['content'] is string %}"
                 "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
                 "{% endif %}{% endfor %}{% endif %} <|eot_id|> {% endfor %}{% if add_generation_prompt %}assistant :"
                 "{% endif %}")


def build_text_llama(out_dir: str | Path, texts: list[str], seed: int = 0, hidden_size: int = 128,
                     layers: int = 2) -> Path:
    """A fresh LlamaForCausalLM whose vocabulary is the words of `texts`, with tokenizer and chat template, saved
    to `out_dir` (a folder our engines and `Policy` load)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = word_level_tokenizer(["system user assistant :", *texts], ["<unk>"], SPECIALS, model_max_length=256,
                               bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|pad|>")
    tok.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=3 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # transformers initialises from the global RNG; restored on exit
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def supervised_batch(tokenizer, pairs: list[tuple[str, str]]) -> dict:
    """Right-padded inputs for prompt + solution + <|eot_id|>; labels on the solution and its end token only."""
    texts, prompt_lens = [], []
    for question, solution in pairs:
        prompt = tokenizer.apply_chat_template(VLMRequest(question, []).chat_messages(), tokenize=False,
                                               add_generation_prompt=True, **CHAT_TEMPLATE_KWARGS)
        texts.append(f"{prompt} {solution} <|eot_id|>")
        prompt_lens.append(len(tokenizer(prompt, add_special_tokens=False).input_ids))
    tokenizer.padding_side = "right"
    enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    for row, n in enumerate(prompt_lens):
        labels[row, :n] = -100
    return {**enc, "labels": labels}


def supervised_finetune(model_dir: str | Path, pairs: list[tuple[str, str]], steps: int, batch_size: int = 64,
                        lr: float = 3e-3, progress: bool = True) -> list[float]:
    """Train the model in `model_dir` on `pairs` (cycled in order) and save it back; returns the losses."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = LlamaForCausalLM.from_pretrained(str(model_dir)).train()
    optim = OneCycleAdamW(model.parameters(), lr, steps, weight_decay=0.01)
    losses = []
    for step in tqdm(range(steps), desc="supervised", disable=not progress):
        start = step * batch_size % len(pairs)
        batch = (pairs + pairs)[start:start + batch_size]
        losses.append(optim.step(model(**supervised_batch(tokenizer, batch)).loss))
    model.eval().save_pretrained(str(model_dir))
    return losses
