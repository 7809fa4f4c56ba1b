"""Chat templates shipped verbatim with the package (models built here, tiny or miniature, use the real ones)."""

from __future__ import annotations

from pathlib import Path


def llama32_vision_chat_template() -> str:
    """Llama-3.2-11B-Vision-Instruct's published chat template, verbatim (its system block with "Cutting Knowledge
    Date", its refusal of a system message next to images). Source: the chat_template of
    meta-llama/Llama-3.2-11B-Vision-Instruct on the Hugging Face Hub, as copied in the Jinja test suite of
    maiqingqiang/Jinja (Tests/JinjaTests/ChatTemplateTests.swift, `llama3_2visionChatTemplate`) and in NVIDIA
    NeMo's MLlamaTemplateConfig; sha256 e4073232...7d3c of the text."""
    return (Path(__file__).parent / "llama32_vision_instruct.jinja").read_text()
