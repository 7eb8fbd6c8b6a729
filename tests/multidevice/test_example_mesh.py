"""The main job sharded: examples/finetune_gpt2.py --mesh fsdp=4,tp=2 (QLoRA on a text)."""

import importlib.util
from pathlib import Path

import jax
import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finetune_gpt2.py"


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")
def test_finetune_example_on_a_mesh(tmp_path):
    spec = importlib.util.spec_from_file_location("finetune_gpt2_mesh", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    text = tmp_path / "notes.txt"
    text.write_text("lorax fine-tunes flax models with low-rank adapters. " * 40)
    result = example.main(
        [
            "--out",
            str(tmp_path),
            "--base-steps",
            "10",
            "--steps",
            "12",
            "--qlora",
            "--mesh",
            "fsdp=4,tp=2",
            "--data",
            str(text),
            "--seq",
            "32",
            "--batch",
            "8",
        ]
    )
    assert result["after"] < result["before"]  # held-out loss went down, sharded
    assert result["reload_matches"]
