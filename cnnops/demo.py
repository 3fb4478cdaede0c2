"""Train one small CNN twice from one initialization on scikit-learn's handwritten digits:
once with torch.nn modules, once after cnnops.convert; compare losses, accuracies, parameters
and times epoch by epoch, and plot both runs.

    python -m cnnops.demo [--epochs N] [--device cpu|cuda] [--out DIR] [--seed S]
                            [--batch-size B] [--threads T]

The digits are 1,797 real 8x8 scans that ship inside scikit-learn (no download). Both runs
start from the same weights and see the same batches in the same order, so they differ only by
floating-point rounding: cnnops' kernels sum in another order than torch's (oneDNN on CPU,
cuDNN on GPU), about 1e-7 relative per value. Training amplifies it, slowly for smooth layers
and in jumps at max pooling: where two values of a window are (nearly) tied, a rounding
difference can pick the other one as the maximum, and that batch's gradient then flows to a
neighbouring pixel. The losses and accuracies stay close (test accuracy above 99% for seeds
0-9 on CPU), while the weights drift apart by up to a few 1e-2 in some seeds.
"""
import argparse
import copy
import importlib.util
import os
import sys
import time
from collections import OrderedDict

import torch
from torch import nn

import cnnops

RUNS = ("torch", "cnnops")  # run names, in the order they train each epoch
# Plain SGD keeps the two runs close: Adam divides each step by the gradient's size, so a
# gradient near zero whose sign differs by rounding moves a weight by a full step either way.
LR, MOMENTUM = 0.05, 0.9


def make_model():
    """A small CNN for 1x8x8 images with convolution, batch norm, group norm, max pool and
    average pool among its layers (names show up in the complexity table)."""
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 16, 3, padding=1, bias=False)),  # 8x8: padding 1 keeps the size
        ("bn1", nn.BatchNorm2d(16)),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(16, 32, 3, padding=1)),
        ("gn2", nn.GroupNorm(4, 32)),
        ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),  # 8x8 -> 4x4
        ("conv3", nn.Conv2d(32, 64, 3, padding=1, bias=False)),
        ("bn3", nn.BatchNorm2d(64)),
        ("relu3", nn.ReLU()),
        ("pool3", nn.AvgPool2d(2)),  # 4x4 -> 2x2
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(64 * 2 * 2, 10)),
    ]))


def load_digits(device):
    """The digits as (N, 1, 8, 8) float32 in [0, 1], split 80/20 stratified by class with a
    fixed seed (the same test set whatever --seed is)."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels are 0..16
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2,
                                           stratify=digits.target, random_state=0)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return (x[train_idx].to(device), y[train_idx].to(device),
            x[test_idx].to(device), y[test_idx].to(device))


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_args(argv=None):
    cuda_ok = torch.cuda.is_available() and cnnops.has_cuda()
    parser = argparse.ArgumentParser(prog="python -m cnnops.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=positive_int, default=12, help="training epochs (default 12)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if cuda_ok else "cpu",
                        help="default: cuda when a GPU and the cnnops CUDA kernels are available")
    parser.add_argument("--out", default="demo-out", help="folder for the plot (default demo-out)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialization and batch order")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="default 64")
    # One thread by default: this model's ops are tiny (a batch of 64 8x8 images), so a second
    # thread gains ~1.4x on an idle machine, and loses up to 10x on a busy one, where threads
    # wait for each other at every op for a core to come free.
    parser.add_argument("--threads", type=positive_int, default=1,
                        help=f"CPU threads of torch and cnnops (default 1; this machine has {os.cpu_count()})")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda asked for, but torch.cuda.is_available() is False "
                     "(no GPU or a CPU-only torch); use --device cpu")
    if args.device == "cuda" and not cnnops.has_cuda():
        parser.error("argument --device: cuda asked for, but this cnnops build has no CUDA kernels "
                     "(rebuild with CNNOPS_CUDA=1); use --device cpu")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"argument --out: expected a folder, got the file {args.out!r}")
    return args


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA kernels run asynchronously: wait before timing


class Run:
    """One training run: a model, its optimizer, its own batch-order generator and history."""

    def __init__(self, name, model, seed):
        self.name = name
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        self.generator = torch.Generator().manual_seed(seed)  # same seed: same batch order
        self.batch_losses = []  # every batch's training loss
        self.epoch_losses = []  # mean training loss of each epoch
        self.accuracies = []  # test accuracy after each epoch
        self.times = []  # seconds of training in each epoch

    def train_epoch(self, x, y, batch_size, bar):
        self.model.train()
        order = torch.randperm(len(y), generator=self.generator).to(x.device)
        total, losses = 0.0, []
        _sync(x.device)
        start = time.perf_counter()
        for i in range(0, len(y), batch_size):
            idx = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(self.model(x[idx]), y[idx])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(loss.detach())
            total += loss.detach() * len(idx)
            bar.update(1)
        _sync(x.device)
        self.times.append(time.perf_counter() - start)
        self.batch_losses += [float(v) for v in losses]  # .item() after timing: no extra syncs
        self.epoch_losses.append(float(total) / len(y))

    @torch.no_grad()
    def evaluate(self, x, y):
        self.model.eval()  # batch norm uses its running statistics
        self.accuracies.append((self.model(x).argmax(1) == y).float().mean().item())


def max_param_difference(a, b):
    """Largest absolute difference over all parameters of two models of the same structure."""
    with torch.no_grad():
        return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def plot(runs, differences, path, title):
    """Both runs' loss curves, test accuracies and their parameter difference, to a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas for PNG

    fig = Figure(figsize=(13, 3.8), layout="constrained")
    ax_loss, ax_acc, ax_diff = fig.subplots(1, 3)
    epochs = range(1, len(differences) + 1)
    for run, style in zip(runs, ("-", "--")):
        steps = len(run.batch_losses) / len(differences)  # batches per epoch
        xs = [(i + 1) / steps for i in range(len(run.batch_losses))]
        ax_loss.plot(xs, run.batch_losses, style, lw=1, label=run.name)
        ax_acc.plot(epochs, [100 * a for a in run.accuracies], style, marker="o", ms=3, label=run.name)
    ax_loss.set(title="training loss (each batch)", xlabel="epoch", ylabel="cross-entropy", yscale="log")
    ax_acc.set(title="test accuracy", xlabel="epoch", ylabel="%")
    ax_diff.plot(epochs, differences, marker="o", ms=3, color="tab:red")
    ax_diff.set(title="largest |parameter difference|", xlabel="epoch", yscale="log")
    for ax in (ax_loss, ax_acc):
        ax.legend()
    for ax in (ax_loss, ax_acc, ax_diff):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)


def train(args, log=print):
    """The whole demo for parsed `args`; lines go to `log`. Returns the two Runs, the
    per-epoch parameter differences and the path of the plot."""
    from tqdm import tqdm

    device = torch.device(args.device)
    x_train, y_train, x_test, y_test = load_digits(device)
    batches = -(-len(y_train) // args.batch_size)  # ceil
    threads = torch.get_num_threads()
    log(f"cnnops {cnnops.__version__} demo on {device.type} ({threads} CPU thread{'s' * (threads > 1)}), "
        f"torch {torch.__version__}, seed {args.seed}")
    log(f"data: scikit-learn digits, 8x8 scans in [0, 1], {len(y_train):,} train / {len(y_test):,} test "
        f"(stratified), {batches} batches of {args.batch_size}, SGD lr {LR} momentum {MOMENTUM}, "
        f"{args.epochs} epoch{'s' * (args.epochs > 1)}\n")

    torch.manual_seed(args.seed)
    reference = make_model().to(device)
    ours = copy.deepcopy(reference)  # ONE initialization, two copies
    ours, report = cnnops.convert(ours, report=True)  # in place: same Parameters, now cnnops'
    replaced = ", ".join(f"{name} ({torch_type.split('.')[-1]})" for name, torch_type, _ in report.replaced)
    log(f"cnnops.convert replaced {len(report.replaced)} modules: {replaced}")
    left = ", ".join(f"{name} ({type_name})" for name, type_name, _ in report.left)
    log(f"left as they are: {left or 'none'}\n")

    # complexity() runs one forward pass in eval mode under no_grad: no running statistics move.
    log(f"{cnnops.complexity(reference, x_train[:1])}\n")

    runs = [Run(name, model, args.seed) for name, model in zip(RUNS, (reference, ours))]
    assert max_param_difference(reference, ours) == 0.0, "the two copies must start identical"
    differences = []  # after each epoch

    header = (f"{'epoch':>5}  {'loss torch':>10}  {'loss cnnops':>11}  {'acc torch':>9}  {'acc cnnops':>10}  "
              f"{'max|dparam|':>11}  {'time torch':>10}  {'time cnnops':>11}")
    log(header)
    # One bar over every batch of both runs, on stderr and only on a terminal, so a redirected
    # log stays clean; the epoch lines are written above it.
    no_bars = not sys.stderr.isatty()
    bar = tqdm(total=args.epochs * len(runs) * batches, unit="batch", leave=False, disable=no_bars)
    for epoch in range(1, args.epochs + 1):
        for run in runs:
            bar.set_description(f"epoch {epoch}/{args.epochs} {run.name}")
            run.train_epoch(x_train, y_train, args.batch_size, bar)
        for run in runs:
            run.evaluate(x_test, y_test)
        differences.append(max_param_difference(reference, ours))
        a, b = runs
        line = (f"{epoch:>5}  {a.epoch_losses[-1]:>10.4f}  {b.epoch_losses[-1]:>11.4f}  "
                f"{a.accuracies[-1]:>9.2%}  {b.accuracies[-1]:>10.2%}  {differences[-1]:>11.1e}  "
                f"{a.times[-1]:>8.2f} s  {b.times[-1]:>9.2f} s")
        if no_bars:
            log(line)
        else:
            tqdm.write(line, file=sys.stdout)
    bar.close()

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "demo.png")
    plot(runs, differences, path,
         f"small CNN on the scikit-learn digits, {device.type}: torch.nn vs cnnops.convert, one initialization")
    return runs, differences, path


EXTRAS = {"sklearn": "scikit-learn", "tqdm": "tqdm", "matplotlib": "matplotlib"}  # module: pip name


def main(argv=None):
    """Runs the demo; returns what train() returns (for tests)."""
    start = time.perf_counter()
    args = parse_args(argv)
    missing = [pip_name for module, pip_name in EXTRAS.items() if importlib.util.find_spec(module) is None]
    if missing:  # `make demo` installs them; a bare `python -m cnnops.demo` may not have them
        sys.exit(f"python -m cnnops.demo needs {' '.join(missing)}: run `make demo`, or "
                 f"`pip install {' '.join(missing)}`")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # cnnops' at::parallel_for loops follow it too
    try:
        runs, differences, path = train(args)
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process by the tests
    a, b = runs
    loss_gap = max(abs(p - q) for p, q in zip(a.batch_losses, b.batch_losses))
    print(f"\nplot: {os.path.abspath(path)}")
    print(f"summary: test accuracy torch {a.accuracies[-1]:.2%}, cnnops {b.accuracies[-1]:.2%} after "
          f"{args.epochs} epoch{'s' * (args.epochs > 1)}; largest batch-loss difference {loss_gap:.1e}, "
          f"parameter difference {differences[-1]:.1e}; training time torch {sum(a.times):.2f} s, "
          f"cnnops {sum(b.times):.2f} s "
          f"(cnnops/torch {sum(b.times) / sum(a.times):.2f}); whole demo {time.perf_counter() - start:.1f} s")
    return runs, differences, path


if __name__ == "__main__":
    main()
