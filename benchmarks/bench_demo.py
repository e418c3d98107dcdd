"""mnist_demo.py against the classic notebook procedure, side by side in one run.

    python benchmarks/bench_demo.py --data-dir ../shared/data

The classic procedure (as in the widely copied LoRA-on-MNIST notebook): a DataLoader
with per-sample ToTensor + Normalize transforms, the default Adam, a Python loop
over every test prediction, and LoRA registered with torch.nn.utils.parametrize.
Both run in fresh processes with the same hyperparameters (seed 0, batch 10,
1 epoch, rank 1, alpha 1, 100 LoRA batches on digit 9), and the wall times of the
whole processes are compared, imports and data loading included.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def classic(data_dir, lora_steps=100, digit=9):
    """The notebook procedure, kept close to its original form; returns its results."""
    import torch
    import torch.nn as nn
    import torch.nn.utils.parametrize as parametrize
    from torchvision import datasets, transforms

    from mnist_demo import RichBoyNet  # the notebook's MLP, the same class as the demo's

    torch.manual_seed(0)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    trainset = datasets.MNIST(root=data_dir, train=True, download=False, transform=transform)
    train_loader = torch.utils.data.DataLoader(trainset, batch_size=10, shuffle=True)
    testset = datasets.MNIST(root=data_dir, train=False, download=False, transform=transform)
    test_loader = torch.utils.data.DataLoader(testset, batch_size=10, shuffle=True)

    net = RichBoyNet()

    def train(loader, epochs=1, total_iterations_limit=None):
        cross_el = nn.CrossEntropyLoss()
        optimizer = torch.optim.Adam(net.parameters(), lr=0.001)
        total_iterations = 0
        for _ in range(epochs):
            net.train()
            for x, y in loader:
                total_iterations += 1
                optimizer.zero_grad()
                loss = cross_el(net(x.view(-1, 28 * 28)), y)
                loss.backward()
                optimizer.step()
                if total_iterations_limit is not None and total_iterations >= total_iterations_limit:
                    return

    def test():
        correct, total, wrong_counts = 0, 0, [0] * 10
        with torch.no_grad():
            for x, y in test_loader:
                output = net(x.view(-1, 784))
                for idx, i in enumerate(output):
                    if torch.argmax(i) == y[idx]:
                        correct += 1
                    else:
                        wrong_counts[y[idx]] += 1
                    total += 1
        return {"accuracy": correct / total, "errors_on_target": wrong_counts[digit], "errors_per_digit": wrong_counts}

    class LoRAParametrization(nn.Module):
        def __init__(self, features_in, features_out, rank=1, alpha=1):
            super().__init__()
            self.lora_A = nn.Parameter(torch.zeros((rank, features_out)))
            self.lora_B = nn.Parameter(torch.zeros((features_in, rank)))
            nn.init.normal_(self.lora_A, mean=0, std=1)
            self.scale = alpha / rank
            self.enabled = True

        def forward(self, original_weights):
            if self.enabled:
                return original_weights + torch.matmul(self.lora_B, self.lora_A).view(original_weights.shape) * self.scale
            return original_weights

    train(train_loader, epochs=1)
    original_weights = {name: p.clone().detach() for name, p in net.named_parameters()}
    results = {"before fine-tuning": test()}

    for layer in (net.linear1, net.linear2, net.linear3):
        out_f, in_f = layer.weight.shape
        parametrize.register_parametrization(layer, "weight", LoRAParametrization(out_f, in_f, rank=1, alpha=1))

    def enable_disable_lora(enabled=True):
        for layer in (net.linear1, net.linear2, net.linear3):
            layer.parametrizations["weight"][0].enabled = enabled

    for name, param in net.named_parameters():
        if "lora" not in name:
            param.requires_grad = False
    exclude_indices = trainset.targets == digit
    trainset.data, trainset.targets = trainset.data[exclude_indices], trainset.targets[exclude_indices]
    train(torch.utils.data.DataLoader(trainset, batch_size=10, shuffle=True), epochs=1, total_iterations_limit=lora_steps)

    results["LoRA enabled"] = test()
    enable_disable_lora(False)
    results["LoRA disabled"] = test()
    unchanged = all(torch.equal(net.get_parameter(n.replace("weight", "parametrizations.weight.original")
                                                  if n.endswith("weight") else n), w) for n, w in original_weights.items())
    return {"results": results, "base weights unchanged": unchanged}


def timed(cmd):
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def table(results, digit=9):
    lines = [f"| model state | overall accuracy | errors on digit {digit} |", "| --- | ---: | ---: |"]
    lines += [f"| {k} | {100 * r['accuracy']:.2f}% | {r['errors_on_target']} |" for k, r in results.items()]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR", "./data"))
    p.add_argument("--lora-steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of both; the median is reported")
    p.add_argument("--classic-json", help=argparse.SUPPRESS)  # internal: run only the classic procedure
    args = p.parse_args()
    if args.classic_json:
        Path(args.classic_json).write_text(json.dumps(classic(args.data_dir, args.lora_steps)))
        return

    times = {"classic": [], "ours": [], "cached": []}
    with tempfile.TemporaryDirectory() as tmp:
        classic_json, ours_json = Path(tmp, "classic.json"), Path(tmp, "ours.json")
        for round_ in range(args.rounds):  # alternate the two, so a noisy spell hits both
            cache = Path(tmp, f"cache{round_}")  # empty: this round pretrains
            ours_cmd = [sys.executable, "mnist_demo.py", "--data-dir", args.data_dir, "--device", "cpu", "--quiet",
                        "--cache-dir", str(cache), "--lora-steps", str(args.lora_steps), "--json"]
            times["classic"].append(timed([sys.executable, __file__, "--data-dir", args.data_dir,
                                           "--lora-steps", str(args.lora_steps), "--classic-json", str(classic_json)]))
            times["ours"].append(timed(ours_cmd + [str(ours_json)]))  # pretrains and fills the cache
            times["cached"].append(timed(ours_cmd + [str(Path(tmp, "cached.json"))]))  # only the LoRA part
        ref, ours = json.loads(classic_json.read_text()), json.loads(ours_json.read_text())

    import torch

    t = {k: statistics.median(v) for k, v in times.items()}
    print(f"## mnist_demo.py vs the classic procedure (torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"median of {args.rounds} alternating round(s))\n")
    print("| procedure | wall time (s) | ratio |\n| --- | ---: | ---: |")
    print(f"| classic (DataLoader + transforms + parametrize) | {t['classic']:.1f} | 1.00 |")
    print(f"| mnist_demo.py | {t['ours']:.1f} | {t['ours'] / t['classic']:.2f} |")
    print(f"| mnist_demo.py, base from the cache | {t['cached']:.1f} | {t['cached'] / t['classic']:.2f} |")
    print(f"\nClassic procedure (base weights unchanged: {ref['base weights unchanged']}):\n")
    print(table(ref["results"]))
    print(f"\nmnist_demo.py (proofs: {'all ok' if all(ours['proofs'].values()) else ours['proofs']}; "
          f"phase timings {ours['timings_s']}):\n")
    print(table(ours["results"]))


if __name__ == "__main__":
    main()
