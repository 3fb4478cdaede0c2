"""The demo (python -m cnnops.demo): the default run end to end (output lines, the plot, both
runs agreeing, test accuracy above 95%), and its option errors."""
import os
import subprocess
import sys

import pytest
import torch

import cnnops
from cnnops import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_run(tmp_path, capsys):
    """The run `make demo` does (12 epochs, one thread, ~8 s), with the plot in tmp_path."""
    threads = torch.get_num_threads()
    runs, differences, path = demo.main(["--device", "cpu", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # --threads (default 1) is undone on return
    out = capsys.readouterr().out
    torch_run, cnnops_run = runs

    # The two runs: torch.nn modules in one, cnnops' in the other, and nothing else different.
    assert type(torch_run.model.conv1) is torch.nn.Conv2d
    assert type(cnnops_run.model.conv1) is cnnops.nn.Conv2d
    assert type(cnnops_run.model.gn2) is cnnops.nn.GroupNorm
    assert len(torch_run.batch_losses) == len(cnnops_run.batch_losses) == 12 * 23
    # Same initialization and batches. The first batch sees identical weights, so its losses
    # differ by forward rounding only. Later the runs drift apart (rounding, amplified by
    # training and by max-pool near ties flipping, see cnnops/demo.py), but stay close.
    assert cnnops_run.batch_losses[0] == pytest.approx(torch_run.batch_losses[0], rel=1e-5)
    assert cnnops_run.epoch_losses[:3] == pytest.approx(torch_run.epoch_losses[:3], rel=5e-2)
    assert cnnops_run.accuracies == pytest.approx(torch_run.accuracies, abs=0.03)
    assert len(differences) == 12 and 0 <= max(differences) < 0.1
    # What the issue asks of the demo: test accuracy above 95% for both runs.
    assert torch_run.accuracies[-1] > 0.95 and cnnops_run.accuracies[-1] > 0.95

    # The printed log: header, convert report, complexity table, one line per epoch, summary.
    table = str(cnnops.complexity(demo.make_model().eval(), torch.zeros(1, 1, 8, 8)))
    assert table in out
    assert "cnnops.convert replaced" in out
    lines = out.splitlines()
    for epoch in (1, 2):
        row = next(line for line in lines if line.split()[:1] == [str(epoch)])
        assert f"{torch_run.accuracies[epoch - 1]:.2%}" in row and f"{differences[epoch - 1]:.1e}" in row
    assert any(line.startswith("summary: test accuracy torch") for line in lines)
    assert f"plot: {os.path.abspath(path)}" in out

    # The plot: a real PNG of a sensible size, in --out.
    assert os.path.dirname(path) == str(tmp_path)
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    import matplotlib.image
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 600


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "argument --epochs: expected a positive integer, got 0"),
    (["--epochs", "two"], "argument --epochs: expected a positive integer, got 'two'"),
    (["--batch-size", "-1"], "argument --batch-size: expected a positive integer, got -1"),
    (["--threads", "0"], "argument --threads: expected a positive integer, got 0"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
])
def test_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        demo.parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_cuda_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    defaults = demo.parse_args([])
    assert defaults.device == "cpu"  # the default follows what is available
    assert (defaults.epochs, defaults.out, defaults.threads) == (12, "demo-out", 1)
    with pytest.raises(SystemExit) as info:
        demo.parse_args(["--device", "cuda"])
    assert info.value.code == 2
    assert "argument --device: cuda asked for, but torch.cuda.is_available() is False" in capsys.readouterr().err


def test_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("")
    with pytest.raises(SystemExit):
        demo.parse_args(["--out", str(target)])
    assert "argument --out: expected a folder" in capsys.readouterr().err


def test_missing_extras(monkeypatch, tmp_path):
    real = demo.importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None if name == "sklearn" else real(name))
    with pytest.raises(SystemExit, match=r"needs scikit-learn: run `make demo`, or `pip install scikit-learn`"):
        demo.main(["--out", str(tmp_path)])


def test_runs_as_a_module():
    """`python -m cnnops.demo` is the entry point `make demo` uses; an error exits with 2."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "cnnops.demo", "--epochs", "0"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "usage: python -m cnnops.demo" in result.stderr and "--epochs" in result.stderr
