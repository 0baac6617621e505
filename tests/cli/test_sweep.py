"""`visionflow sweep`: a bad space (unknown key, refused value, a range in a grid, a bad file) is
one line on stderr, exit 2, and no trial starts (nothing written, no Prefect server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.cli import main


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ("optim.lrr: [0.001]\n", "Invalid sweep key 'optim.lrr': no such config field. Choose from: optim.recipe,"),
        ("optim.lr: [0.001, 50]\n", "Sweep space: Invalid config field 'optim.lr': Input should be less than"),
        (
            "model.name: [tudui, vgg]\n",
            "Invalid model 'vgg' (did you mean vgg19, vgg16, vgg13?). Choose from: tudui, resnet18_cifar, ",
        ),
        ("output.run_name: [a, b]\n", "Invalid sweep key 'output.run_name': the sweep sets the output fields"),
        ("optim.lr: {low: 0.001, high: 0.1}\n", "Sweep key 'optim.lr' is a range: grid needs a list of values"),
        ("optim.lr: {low: 0.1, high: 0.001}\n", "Invalid sweep field 'space.optim.lr"),
        ("- optim.lr\n", "must map dotted config fields to lists or ranges"),
    ],
)
def test_bad_space_is_one_line_exit_2_and_starts_no_trial(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, space: str, expected: str
) -> None:
    (space_file := tmp_path / "space.yaml").write_text(space)
    code = main(["sweep", "--space", str(space_file), "--output", str(tmp_path / "out"), "--max-trials", "4"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.startswith("error: ") and expected in captured.err and captured.err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_bad_sweep_option_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (space_file := tmp_path / "space.yaml").write_text("optim.lr: [0.001]\n")
    code = main(["sweep", "--space", str(space_file), "--dask-address", "localhost 8786"])
    err = capsys.readouterr().err
    assert code == 2 and "Invalid sweep field 'dask_address'" in err and err.count("\n") == 1
