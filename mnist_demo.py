"""LoRA on MNIST, end to end: `python mnist_demo.py`.

1. Pretrain an oversized MLP (784 -> 1000 -> 2000 -> 10) for one epoch on MNIST.
2. Evaluate it: the classic run finds it weak on 9 (--target-digit auto picks
   the digit with the most errors).
3. Attach rank-1 LoRA to its three linear layers and fine-tune ONLY LoRA on that
   digit for 100 batches.
4. Compare: before, LoRA enabled, LoRA disabled (must equal before), LoRA merged
   into W (a plain MLP); prove the base weights never changed.

QLoRA: `--quantize nf4` (or fp4) freezes the pretrained MLP in 4 bits (bitsandbytes,
double quantization) before step 3; the table adds that 4-bit base and the bytes of
each model, and the proofs hold for the 4-bit base.

Speed: the whole dataset is loaded once as normalised tensors on the device and
batches are sliced from it, instead of a per-sample PIL transform pipeline. The
batch order is drawn from the global RNG exactly as DataLoader(shuffle=True) draws it.
The pretrained base is cached (keyed by everything that determines it), so runs
that change only LoRA settings skip pretraining.
"""

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import lora_min

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
STATES = ["before fine-tuning", "LoRA enabled", "LoRA disabled", "LoRA merged into W"]


class RichBoyNet(nn.Module):
    """The oversized MLP of the classic experiment: 784 -> 1000 -> 2000 -> 10 (2,807,010 parameters)."""

    def __init__(self, hidden_size_1=1000, hidden_size_2=2000):
        super().__init__()
        self.linear1 = nn.Linear(28 * 28, hidden_size_1)
        self.linear2 = nn.Linear(hidden_size_1, hidden_size_2)
        self.linear3 = nn.Linear(hidden_size_2, 10)
        self.relu = nn.ReLU()

    def forward(self, img):
        x = img.view(-1, 28 * 28)
        x = self.relu(self.linear1(x))
        x = self.relu(self.linear2(x))
        return self.linear3(x)


# --- data -------------------------------------------------------------------------------


class DataError(Exception):
    """MNIST is missing and cannot be downloaded, or its files are unreadable."""


MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def load_mnist(data_dir, device):
    """MNIST as tensors on the device: images (N, 784) float32 normalised, labels (N,) int64.

    Returns (train_images, train_labels, test_images, test_labels), normalised exactly as
    ToTensor() + Normalize((0.1307,), (0.3081,)) would normalise each sample.
    """
    from torchvision import datasets  # only the data loading needs torchvision

    raw = Path(data_dir) / "MNIST" / "raw"
    if not all((raw / name).exists() for name in MNIST_FILES):
        try:
            with contextlib.redirect_stdout(sys.stderr):  # keep stdout for results
                datasets.MNIST(data_dir, download=True)
        except Exception as e:
            raise DataError(
                f"MNIST is not in {raw.resolve()} and could not be downloaded ({type(e).__name__}: {e}).\n"
                f"Run once with a network connection to download it, or copy the four MNIST files "
                f"({', '.join(MNIST_FILES)}) into a folder's MNIST/raw/ and point --data-dir (or MNIST_DATA_DIR) "
                f"at that folder."
            ) from None
    try:
        sets = [datasets.MNIST(data_dir, train=train, download=False) for train in (True, False)]
        for ds in sets:
            if ds.data.ndim != 3 or ds.data.shape[1:] != (28, 28) or len(ds.data) != len(ds.targets) or not len(ds.data):
                raise ValueError(f"images {tuple(ds.data.shape)} and labels {tuple(ds.targets.shape)} do not fit")
    except Exception as e:  # torchvision's parser fails in many ways on truncated files
        raise DataError(f"could not read MNIST from {raw.resolve()} ({type(e).__name__}: {e}). The files may be "
                        f"corrupt or truncated: delete them to download again, or point --data-dir at a good copy.") from None
    out = []
    for ds in sets:
        images = ds.data.to(device).reshape(len(ds.data), 784).float().div(255).sub(MNIST_MEAN).div(MNIST_STD)
        out += [images, ds.targets.to(device)]
    return tuple(out)


def shuffled_batches(n, batch_size):
    """One epoch of index batches, drawn from the global RNG exactly as DataLoader(shuffle=True) draws them."""
    torch.empty((), dtype=torch.int64).random_()  # the DataLoader iterator's base seed (for workers)
    seed = int(torch.empty((), dtype=torch.int64).random_().item())  # RandomSampler's own seed
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).split(batch_size)


# --- training and evaluation -------------------------------------------------------------


def progress(total, desc, quiet):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, file=sys.stderr, leave=False, mininterval=0.5)


def world():
    """(rank, number of processes): (0, 1) unless running under torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def count_allreduced(ddp_model):
    """Make DDP record how many numbers it all-reduces; returns the list it appends to."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    counts = []

    def hook(state, bucket):
        counts.append(bucket.buffer().numel())
        return default_hooks.allreduce_hook(state, bucket)

    ddp_model.register_comm_hook(None, hook)
    return counts


def train(model, images, labels, *, batch_size, lr, epochs=1, steps=None, desc="train", quiet=False):
    """Adam + cross-entropy on the parameters that require grad, for `epochs` passes
    or, if given, exactly `steps` batches (as many passes as that takes).

    Batches are shuffled from the global RNG (seed it with torch.manual_seed). Under
    torchrun every process draws the same batches and takes its shard of each one,
    and DDP averages the gradients: the same global batch as one process.
    Returns (steps run, numbers DDP all-reduced per step or None).
    """
    device = images.device
    rank, n_procs = world()
    counts = None
    if n_procs > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        counts = count_allreduced(model)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused Adam updates all tensors in one kernel: on a small MLP on CPU the
    # default per-op Adam costs more than the matrix products (see README).
    optimizer = torch.optim.Adam(params, lr=lr, fused=True)
    steps_per_epoch = -(-len(labels) // batch_size)
    total = steps if steps is not None else epochs * steps_per_epoch
    model.train()
    step = 0
    with progress(total, desc, quiet) as bar:
        while step < total:
            for idx in shuffled_batches(len(labels), batch_size)[:total - step]:
                mine = idx[rank::n_procs].to(device)
                # Sum over this shard / (global batch / processes): after DDP's average over
                # processes, exactly the global batch's mean (bit-for-bit the mean with one process).
                loss = F.cross_entropy(model(images[mine]), labels[mine], reduction="sum") / (len(idx) / n_procs)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                bar.update()
    return step, (sum(counts) / step if counts else None)


@torch.no_grad()
def evaluate(model, images, labels, desc="evaluate", quiet=True, batch_size=1000):
    """Logits for every test image, and the figures of the results table."""
    model.eval()
    chunks = []
    with progress(-(-len(labels) // batch_size), desc, quiet) as bar:
        for i in range(0, len(labels), batch_size):
            chunks.append(model(images[i:i + batch_size]))
            bar.update()
    logits = torch.cat(chunks)
    wrong = logits.argmax(1) != labels
    return {
        "logits": logits,
        "predictions": logits.argmax(1),
        "accuracy": 1.0 - wrong.float().mean().item(),
        "errors_per_digit": torch.bincount(labels[wrong], minlength=10).tolist(),
    }


# --- the pretrained base, cached ----------------------------------------------------------


def base_cache_path(cfg, images):
    """A file name keyed by everything that determines the pretrained weights."""
    key = dict(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, n=len(images),
               data=float(images.double().sum()), device=images.device.type, torch=torch.__version__)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.cache_dir) / f"mnist_base_{digest}.pt"


def pretrained_base(cfg, train_x, train_y, log):
    """The pretrained MLP: from the cache if there, else trained (and cached)."""
    torch.manual_seed(cfg.seed)
    model = RichBoyNet().to(train_x.device)
    path = base_cache_path(cfg, train_x) if cfg.cache_dir else None
    cached = path is not None and path.exists()
    rank, n_procs = world()
    if n_procs > 1:  # every process must take the same branch, or DDP waits forever
        flag = torch.tensor(int(cached), device=train_x.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        cached = bool(flag)
    if cached:
        model.load_state_dict(torch.load(path, map_location=train_x.device, weights_only=True))
        log(f"Loaded the pretrained base from the cache: {path}")
        return model, True, None
    _, allreduced = train(model, train_x, train_y, batch_size=cfg.batch_size, lr=cfg.lr, epochs=cfg.epochs,
                          desc="pretraining", quiet=cfg.quiet)
    if path is not None and rank == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), path)
        except OSError as e:
            log(f"(could not cache the base model in {path}: {e})")
    return model, False, allreduced


def quantized(model, quant_type):
    """model with each nn.Linear frozen in 4 bits (bitsandbytes' Linear4bit, double quantization, float32
    compute): QLoRA's base. bitsandbytes quantizes when the layer moves to its device."""
    import bitsandbytes as bnb

    for name, linear in [(n, m) for n, m in model.named_children() if isinstance(m, nn.Linear)]:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, quant_type=quant_type,
                                  compress_statistics=True, compute_dtype=torch.float32)
        layer.load_state_dict(linear.state_dict())
        layer.support_avx512bf16_for_cpu = False  # bitsandbytes 0.50's CPU eval kernel needs out % 32 == 0 (1000)
        setattr(model, name, layer.to(linear.weight.device))
    return model.requires_grad_(False)


def state_bytes(model):
    """The bytes of the model's tensors (its state_dict: a quantized weight with its statistics)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# --- the experiment ----------------------------------------------------------------------------


def run_experiment(cfg, data, log=print):
    """The whole experiment on data = (train_x, train_y, test_x, test_y); returns
    (the model with its LoRA layers, the report: every figure, JSON-ready)."""
    train_x, train_y, test_x, test_y = data
    timings = {}
    clock = time.perf_counter()

    def lap(name):
        nonlocal clock
        if train_x.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    model, cached, allreduced_pretraining = pretrained_base(cfg, train_x, train_y, log)
    lap("pretraining")
    before = evaluate(model, test_x, test_y, "evaluate: before", cfg.quiet)
    params_before, float_bytes = lora_min.count_parameters(model).total, state_bytes(model)
    states, base = {STATES[0]: before}, before  # base: what LoRA is added to (and disabled must give)
    if cfg.quantize:
        model = quantized(model, cfg.quantize)
        base = states[f"4-bit base ({cfg.quantize})"] = evaluate(model, test_x, test_y, "evaluate: 4-bit", cfg.quiet)
    base_bytes = state_bytes(model)
    base_copy = {k: v.detach().clone() for k, v in model.state_dict().items()}
    target = cfg.target_digit
    if target == "auto":
        target = max(range(10), key=lambda d: before["errors_per_digit"][d])
    target = int(target)
    lap("evaluation before")

    torch.manual_seed(cfg.seed)  # the same A and batches whether or not the base came from the cache
    lora_min.add_lora(model, r=cfg.rank, alpha=cfg.alpha, init_std=1.0)  # A ~ N(0, 1), B = 0
    lora_params = lora_min.count_parameters(model).trainable
    params_after, lora_bytes = params_before + lora_params, state_bytes(model) - base_bytes

    if cfg.load_adapter:
        lora_min.load_adapter(model, cfg.load_adapter)
        steps, allreduced_lora = 0, None
        log(f"Loaded the adapter {cfg.load_adapter}; fine-tuning skipped.")
    else:
        digit = train_y == target
        steps, allreduced_lora = train(model, train_x[digit], train_y[digit], batch_size=cfg.batch_size, lr=cfg.lr,
                                       steps=cfg.lora_steps, desc=f"LoRA on digit {target}", quiet=cfg.quiet)
    lap("fine-tuning")

    enabled = evaluate(model, test_x, test_y, "evaluate: LoRA enabled", cfg.quiet)
    with lora_min.lora_disabled(model):
        disabled = evaluate(model, test_x, test_y, "evaluate: LoRA disabled", cfg.quiet)
    merged_model = lora_min.merge_and_unload(model)
    merged = evaluate(merged_model, test_x, test_y, "evaluate: merged", cfg.quiet)
    lap("evaluation after")

    base_now = {k: v for k, v in model.state_dict().items() if k in base_copy}
    logit_diff = (merged["logits"] - enabled["logits"]).abs().max().item()
    base_name, before_name = ("4-bit base", "the 4-bit base") if cfg.quantize else ("base weights", "before")
    proofs = {
        f"{base_name} bit-for-bit unchanged": set(base_now) == set(base_copy)
        and all(torch.equal(base_now[k], base_copy[k]) for k in base_copy),
        f"LoRA-disabled predictions identical to {before_name}": torch.equal(disabled["predictions"],
                                                                            base["predictions"]),
        "merged predictions match LoRA-enabled": torch.equal(merged["predictions"], enabled["predictions"])
        and logit_diff < 1e-3,
        "merged model has no LoRA layers": not any(isinstance(m, lora_min.LoRALayer) for m in merged_model.modules()),
    }
    states |= dict(zip(STATES[1:], (enabled, disabled, merged)))
    sizes = dict(zip(states, [float_bytes] + [base_bytes] * bool(cfg.quantize) + [base_bytes + lora_bytes] * 2
                     + [state_bytes(merged_model)]))
    return model, {
        "config": {k: v for k, v in vars(cfg).items()},
        "device": str(train_x.device),
        "target_digit": target,
        "base_from_cache": cached,
        "lora_steps_run": steps,
        "processes": world()[1],
        "ddp_allreduced_numbers_per_step": {"pretraining": allreduced_pretraining, "fine-tuning": allreduced_lora},
        "parameters": {"base": params_before, "with_lora": params_after, "lora": lora_params,
                       "increment_percent": 100.0 * lora_params / params_before},
        "results": {name: {"accuracy": s["accuracy"], "errors_on_target": s["errors_per_digit"][target],
                           "errors_per_digit": s["errors_per_digit"]} for name, s in states.items()},
        "model_bytes": sizes,
        "max_logit_difference_merged_vs_enabled": logit_diff,
        "proofs": proofs,
        "timings_s": timings,
    }


# --- reporting -------------------------------------------------------------------------------------


def results_table(report):
    d, sizes = report["target_digit"], report["model_bytes"]
    lines = [f"| model state | overall accuracy | errors on digit {d} | model bytes (vs float32) |",
             "| --- | ---: | ---: | ---: |"]
    for name, r in report["results"].items():
        size = f"{sizes[name] / 2**20:.2f} MiB ({sizes[name] / sizes[STATES[0]]:.2f}x)"
        lines.append(f"| {name} | {100 * r['accuracy']:.2f}% | {r['errors_on_target']} | {size} |")
    lines += ["", "Errors per digit:", "", "| model state | " + " | ".join(map(str, range(10))) + " |",
              "| --- |" + " ---: |" * 10]
    for name, r in report["results"].items():
        lines.append(f"| {name} | " + " | ".join(map(str, r["errors_per_digit"])) + " |")
    return "\n".join(lines)


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    n = len(report["results"])
    width = 0.8 / n
    for i, (name, r) in enumerate(report["results"].items()):
        ax.bar([d + (i - (n - 1) / 2) * width for d in range(10)], r["errors_per_digit"], width, label=name)
    ax.set_xticks(range(10))
    ax.set_xlabel("digit")
    ax.set_ylabel("test errors")
    ax.set_title(f"MNIST test errors per digit; LoRA fine-tuned on digit {report['target_digit']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def model_file_bytes(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class UsageError(Exception):
    """A bad command-line argument: main() prints it on one line and exits with status 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage and exit; we raise, so main() decides
        raise UsageError(message)


def positive(kind):
    """An argparse type: a number of this kind that is > 0 (and finite)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR", "./data"),
                   help="folder holding MNIST/raw/ (downloaded there if absent); default $MNIST_DATA_DIR or ./data")
    p.add_argument("--target-digit", default="9", choices=[str(d) for d in range(10)] + ["auto"],
                   help="digit to fine-tune on; auto = the one with the most test errors")
    p.add_argument("--rank", type=positive(int), default=1, help="LoRA rank r")
    p.add_argument("--alpha", type=positive(float), default=1.0, help="LoRA alpha (scale = alpha / r)")
    p.add_argument("--lora-steps", type=positive(int), default=100, help="fine-tuning batches")
    p.add_argument("--epochs", type=positive(int), default=1, help="pretraining epochs")
    p.add_argument("--batch-size", type=positive(int), default=10)
    p.add_argument("--lr", type=positive(float), default=1e-3, help="Adam learning rate (both phases)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps, ...")
    p.add_argument("--cache-dir", default=os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "lora_min"),
                   help="where the pretrained base is cached")
    p.add_argument("--no-cache", action="store_true", help="always pretrain (and do not write the cache)")
    p.add_argument("--save-adapter", metavar="PATH", help="save only the LoRA adapter to PATH")
    p.add_argument("--load-adapter", metavar="PATH", help="evaluate a saved adapter instead of fine-tuning")
    p.add_argument("--json", metavar="PATH", help="write every figure of the run to PATH")
    p.add_argument("--plot", metavar="PATH", help="PNG bar chart of errors per digit (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--quantize", choices=["nf4", "fp4"], help="QLoRA: freeze the base in 4 bits (needs bitsandbytes)")
    cfg = p.parse_args(argv)
    cfg.cache_dir = None if cfg.no_cache else os.path.expanduser(cfg.cache_dir)
    return cfg


def check_output_path(flag, path):
    """An output file we can create: its folder exists and is writable, and it is not a folder."""
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"argument {flag}: {path} is a folder; give a file name")
    folder = target.resolve().parent
    if not folder.is_dir():
        raise UsageError(f"argument {flag}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"argument {flag}: the folder {folder} is not writable")


def validate(cfg):
    """Every check of the arguments that needs no data and no model; raises UsageError naming the argument."""
    for flag in ("--save-adapter", "--json", "--plot"):
        path = getattr(cfg, flag[2:].replace("-", "_"))
        if path:
            check_output_path(flag, path)
    if cfg.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("argument --plot: needs matplotlib (pip install matplotlib)") from None
    if cfg.quantize:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UsageError("argument --quantize: needs bitsandbytes (pip install bitsandbytes)") from None
    if cfg.load_adapter and not Path(cfg.load_adapter).is_file():
        raise UsageError(f"argument --load-adapter: no such file: {cfg.load_adapter}")


def check_adapter_fits(cfg):
    """--load-adapter is an adapter for the model that --rank and --alpha describe: load it into one."""
    try:
        lora_min.load_adapter(lora_min.add_lora(RichBoyNet(), r=cfg.rank, alpha=cfg.alpha), cfg.load_adapter)
    except (ValueError, OSError) as e:
        raise UsageError(f"argument --load-adapter: {e}") from None


def choose_device(name):
    """The torch.device that --device names, if it exists here."""
    try:
        device = pick_device(name)
    except RuntimeError:
        raise UsageError(f"argument --device: {name!r} is not a device name (auto, cpu, cuda, cuda:1, mps, ...)") from None
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if not available.get(device.type, lambda: True)():
        raise UsageError(f"argument --device: no {device.type} device is available here (try --device auto)")
    return device


def start_distributed(device):
    """Under torchrun (WORLD_SIZE > 1), join the process group; returns this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def print_report(cfg, report):
    p, ddp = report["parameters"], report["ddp_allreduced_numbers_per_step"]
    print(f"Device: {report['device']} x {report['processes']} process(es), torch {torch.__version__}")
    print(f"Parameters: {p['base']:,} before LoRA, {p['with_lora']:,} with LoRA "
          f"(+{p['lora']:,} = {p['increment_percent']:.3f}% increment)")
    print(f"Fine-tuned only LoRA (rank {cfg.rank}, alpha {cfg.alpha:g}) on digit {report['target_digit']} "
          f"for {report['lora_steps_run']} batches of {cfg.batch_size}"
          + (f", on the base frozen in 4 bits ({cfg.quantize}, QLoRA)." if cfg.quantize else "."))
    if report["processes"] > 1:
        fmt = lambda n: "n/a (base from the cache)" if n is None else f"{n:,.0f}"  # noqa: E731
        print(f"DDP all-reduced numbers per step: pretraining {fmt(ddp['pretraining'])}, "
              f"LoRA fine-tuning {fmt(ddp['fine-tuning'])}")
    print("\n" + results_table(report))
    print("\nProofs:")
    for claim, ok in report["proofs"].items():
        print(f"  [{'ok' if ok else 'FAILED'}] {claim}")
    print(f"  max |logit difference| merged vs LoRA enabled: {report['max_logit_difference_merged_vs_enabled']:.2e}")
    print("\nTimings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings_s"].items()))


def main(argv=None):
    try:
        cfg = parse_args(argv)
        validate(cfg)
        if cfg.load_adapter:
            check_adapter_fits(cfg)
        device = choose_device(cfg.device)
    except UsageError as e:
        print(f"mnist_demo.py: error: {e}", file=sys.stderr)
        return 2
    # Adam's running averages decay into denormal floats for weights that stop
    # getting gradient (dead ReLU units): ~1.4M of them by mid-epoch here, which
    # made the optimizer step 3x slower on x86. Flushing them to zero changes
    # nothing visible. Set before the first parallel op so worker threads inherit it.
    torch.set_flush_denormal(True)
    device = start_distributed(device)
    try:
        return run_and_report(cfg, device)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run_and_report(cfg, device):
    rank = world()[0]
    cfg.quiet = cfg.quiet or rank != 0  # one progress bar, one report: rank 0's
    log = print if rank == 0 else (lambda *args: None)
    start = time.perf_counter()
    try:
        data = load_mnist(cfg.data_dir, device)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - start
    try:
        model, report = run_experiment(cfg, data, log)
    except (ValueError, FileNotFoundError) as e:  # e.g. an adapter file that does not fit
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["timings_s"] = {"data loading": round(load_s, 3), **report["timings_s"],
                           "total": round(time.perf_counter() - start, 3)}
    status = 0 if all(report["proofs"].values()) else 1
    if rank != 0:
        return status
    print_report(cfg, report)
    # The figures are safe first (table above, JSON now); the extras after them may fail alone.
    if cfg.json and not write_json(cfg.json, report):
        status = 1
    if cfg.save_adapter:
        try:
            lora_min.save_adapter(model, cfg.save_adapter)
        except (OSError, RuntimeError) as e:
            print(f"error: --save-adapter {cfg.save_adapter}: {e}", file=sys.stderr)
            status = 1
        else:
            adapter_bytes = os.path.getsize(cfg.save_adapter)
            base_bytes = model_file_bytes(lora_min.merge_and_unload(model).state_dict())
            report["adapter_file_bytes"], report["base_model_file_bytes"] = adapter_bytes, base_bytes
            print(f"\nSaved the adapter to {cfg.save_adapter}: {adapter_bytes / 1024:.1f} KiB "
                  f"(the base model file is {base_bytes / 2**20:.1f} MiB)")
            if cfg.json:
                write_json(cfg.json, report)  # now with the file sizes
    if cfg.plot:
        try:
            plot(report, cfg.plot)
            print(f"Plot written to {cfg.plot}")
        except Exception as e:  # an optional picture: report it, keep everything computed
            print(f"error: --plot {cfg.plot}: {type(e).__name__}: {e}", file=sys.stderr)
            status = 1
    return status


def write_json(path, report):
    try:
        Path(path).write_text(json.dumps(report, indent=2))
        return True
    except OSError as e:
        print(f"error: --json {path}: {e}", file=sys.stderr)
        return False


if __name__ == "__main__":
    sys.exit(main())
