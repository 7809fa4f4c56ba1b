"""Every vLLM internal thinkdiff reads is listed in thinkdiff/vlm/vllm_compat.py and exists in the pinned vLLM; the
Mllama plugin refuses another vLLM version with a clear message."""

import logging

import pytest

vllm = pytest.importorskip("vllm")


def test_pinned_version_and_every_listed_class_attribute_exists():
    from thinkdiff.vlm import vllm_compat

    vllm_compat.check_version()
    assert vllm_compat.missing_class_attributes() == []
    assert vllm_compat.version_error("0.32.0") is None
    assert "needs vLLM 0.32.x" in vllm_compat.version_error("0.33.1")


def test_the_checks_can_fail(monkeypatch):
    from thinkdiff.errors import MissingDependencyError
    from thinkdiff.vlm import vllm_compat

    monkeypatch.setitem(vllm_compat.CLASS_ATTRIBUTES, "vllm.multimodal.processing:EncDecMultiModalProcessor",
                        ("create_encoder_prompt", "_renamed_in_a_later_vllm"))
    assert vllm_compat.missing_class_attributes() == [
        "vllm.multimodal.processing:EncDecMultiModalProcessor._renamed_in_a_later_vllm"]
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(MissingDependencyError, match="found 0.33.0"):
        vllm_compat.check_version()

    class Runner:  # a model runner of another version, without the batch layout the hooks read
        def get_model(self):
            pass

    assert "input_batch.req_ids" in vllm_compat.missing_runner_attributes(Runner())


def test_plugin_refuses_another_vllm_version(monkeypatch, caplog):
    from vllm import ModelRegistry

    from thinkdiff.vlm import vllm_plugin

    registered = []
    monkeypatch.setattr(ModelRegistry, "register_model", lambda *args: registered.append(args))
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with caplog.at_level(logging.WARNING):
        assert vllm_plugin.register() is False
    assert registered == [] and "Not registering thinkdiff's Mllama model" in caplog.text
    monkeypatch.setattr(vllm, "__version__", "0.32.0")
    assert vllm_plugin.register() is True
    assert registered == [("MllamaForConditionalGeneration",
                           "thinkdiff.vlm.vllm_mllama:MllamaForConditionalGeneration")]
