"""The main job, examples/finetune_gpt2.py, end to end with small settings."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finetune_gpt2.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("finetune_gpt2", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_example_adapts_and_reloads(example, tmp_path):
    result = example.main(
        [
            "--out",
            str(tmp_path),
            "--base-steps",
            "700",
            "--steps",
            "250",
            "--eval",
            "100",
            "--batch",
            "48",
        ]
    )
    assert result["task_a_accuracy"] > 0.5  # the base learned task A
    assert result["before"] < 0.2  # task B is new to it
    assert result["after"] > result["before"] + 0.3  # and LoRA adapted it
    assert result["reload_matches"]
    assert result["adapter_bytes"] * 5 < result["model_bytes"]
    # a second run reuses the cached base; QLoRA and --data paths run too
    text = tmp_path / "notes.txt"
    text.write_text("lorax fine-tunes flax models with low-rank adapters. " * 40)
    result = example.main(
        [
            "--out",
            str(tmp_path),
            "--base-steps",
            "700",
            "--steps",
            "30",
            "--qlora",
            "--data",
            str(text),
            "--seq",
            "32",
            "--batch",
            "8",
        ]
    )
    assert result["base_seconds"] is None
    assert result["after"] < result["before"]  # held-out loss went down
    assert result["reload_matches"]
    # a run that diverges stops with a message and keeps the adapter saved before it
    saved = {
        f.relative_to(tmp_path): f.read_bytes()
        for f in (tmp_path / "adapter").rglob("*")
        if f.is_file()
    }
    with pytest.raises(SystemExit, match="loss was not finite.*without saving"):
        example.main(
            [
                "--out",
                str(tmp_path),
                "--base-steps",
                "700",
                "--steps",
                "5",
                "--lr",
                "1e30",
                "--data",
                str(text),
                "--seq",
                "32",
                "--batch",
                "8",
            ]
        )
    assert saved == {
        f.relative_to(tmp_path): f.read_bytes()
        for f in (tmp_path / "adapter").rglob("*")
        if f.is_file()
    }


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "nan"], "--lr: must be a finite number"),
        (["--lr", "-1"], "--lr: must be a positive number"),
        (["--steps", "0"], "--steps: must be a positive integer"),
        (["--batch", "0"], "--batch: must be a positive integer"),
        (["--rank", "-2"], "--rank: must be a positive integer"),
        (["--alpha", "inf"], "--alpha: must be a finite number"),
    ],
)
def test_bad_arguments_stop_with_a_message(example, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bad_data_files_stop_with_a_message(example, tmp_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(SystemExit, match="not UTF-8 text"):
        example.read_text(str(binary))
    with pytest.raises(SystemExit, match="no file"):
        example.read_text(str(tmp_path / "missing.txt"))
    with pytest.raises(SystemExit, match="is a directory"):
        example.read_text(str(tmp_path))
