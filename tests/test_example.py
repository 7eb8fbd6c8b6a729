"""The main job, examples/finetune_gpt2.py, end to end with small settings."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_gpt2.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("finetune_gpt2", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_example_adapts_and_reloads(example, tmp_path):
    result = example.main(["--out", str(tmp_path), "--base-steps", "700", "--steps", "250",
                           "--eval", "100", "--batch", "48"])
    assert result["task_a_accuracy"] > 0.5          # the base learned task A
    assert result["before"] < 0.2                    # task B is new to it
    assert result["after"] > result["before"] + 0.3  # and LoRA adapted it
    assert result["reload_matches"]
    assert result["adapter_bytes"] * 5 < result["model_bytes"]
    # a second run reuses the cached base; QLoRA and --data paths run too
    text = tmp_path / "notes.txt"
    text.write_text("lorax fine-tunes flax models with low-rank adapters. " * 40)
    result = example.main(["--out", str(tmp_path), "--base-steps", "700", "--steps", "30",
                           "--qlora", "--data", str(text), "--seq", "32", "--batch", "8"])
    assert result["base_seconds"] is None
    assert result["after"] < result["before"]        # held-out loss went down
    assert result["reload_matches"]
