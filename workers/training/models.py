"""The models training runs on, and their data.

digits-mlp learns the real scikit-learn digits (shipped inside the package, no download) and reports
test accuracy. resnet50, bert-base and gpt2-small are the standard architectures with random weights,
built locally from their configurations, fed SYNTHETIC inputs for throughput: token ids are drawn from a
Zipf law (as words in text are, so an embedding gradient touches a realistic share of rows), and labels
are a learnable function of the inputs so that the loss really falls and runs can be compared by it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from workers.archs import ResNet50

from .catalog import DEFAULT_SEQ

POOL = 8  # distinct synthetic batches per rank, made once so input generation stays off the timed path
BERT_POOL = 32  # BERT-base could learn 8 batches' noisy labels by heart in a 100-step benchmark
HELD_OUT = 4  # batches of the same distribution that no rank trains on
LABEL_NOISE = 0.25  # share of BERT token labels drawn at random: the loss then has a floor (about 0.95 nats)


@dataclass
class Task:
    model: nn.Module
    synthetic: bool
    description: str
    batches: list = field(default_factory=list)
    evaluate: object = None  # () -> accuracy, for real data
    samples_per_batch: int = 0
    held_out: list = field(default_factory=list)  # batches no rank trains on, the same for every rank and run

    @torch.no_grad()
    def eval_loss(self, model: nn.Module, autocast) -> float | None:
        """Mean loss over the held-out batches: a quality measure that, unlike the last training losses, does not
        depend on which batches the final steps drew (None where the task has none)."""
        if not self.held_out:
            return None
        was_training = model.training
        model.eval()
        with autocast:
            total = sum(float(self.loss(model, b)) for b in self.held_out)
        model.train(was_training)
        return total / len(self.held_out)

    def batch(self, step: int, rank: int, world: int):
        if callable(self.batches):
            return self.batches(step, rank, world)
        return self.batches[step % len(self.batches)]

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """`model` is what runs the forward: the module itself, or its DDP wrapper (DDP must see the forward)."""
        inputs, labels = batch
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        logits = out.logits if hasattr(out, "logits") else out
        if logits.dim() == 3:
            if labels.shape[1] == logits.shape[1] - 1:  # causal LM: predict the next token
                logits = logits[:, :-1]
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        return F.cross_entropy(logits.float(), labels)


# -- digits: real data ------------------------------------------------------------------------------
def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 8x8 digits scikit-learn ships, read from its package file: the same bytes as
    sklearn.datasets.load_digits, without importing scikit-learn and SciPy into every rank."""
    import gzip
    from importlib.util import find_spec

    spec = find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("digits-mlp needs scikit-learn installed (it ships the digits data)")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as fh:
        rows = [[float(v) for v in line.split(",")] for line in fh if line.strip()]
    table = torch.tensor(rows, dtype=torch.float32)
    return table[:, :-1] / 16.0, table[:, -1].to(torch.int64)


def digits_task(per_proc_batch: int, device: torch.device, seed: int = 0) -> Task:
    x, y = load_digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test_n = len(x) // 5
    test_idx, train_idx = perm[:test_n], perm[test_n:]
    x_train, y_train = x[train_idx].to(device), y[train_idx].to(device)
    x_test, y_test = x[test_idx].to(device), y[test_idx].to(device)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)

    def batches(step: int, rank: int, world: int):
        # The global batch of a step is the same whatever the world size, so runs compare step for step.
        global_batch = per_proc_batch * world
        per_epoch = max(1, len(x_train) // global_batch)
        epoch, pos = divmod(step, per_epoch)
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        idx = order[pos * global_batch + rank * per_proc_batch: pos * global_batch + (rank + 1) * per_proc_batch]
        idx = idx.to(device)
        return x_train[idx], y_train[idx]

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        model.train()
        return acc

    return Task(model=model, synthetic=False, batches=batches, evaluate=evaluate, samples_per_batch=per_proc_batch,
                description=f"scikit-learn digits, {len(x_train)} train / {len(x_test)} test images, MLP 64-256-256-10")


# -- synthetic inputs for the standard architectures ---------------------------------------------------
def _zipf_tokens(n_batches: int, batch: int, seq: int, vocab: int, gen: torch.Generator) -> list[torch.Tensor]:
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.1
    return [torch.multinomial(weights, batch * seq, replacement=True, generator=gen).view(batch, seq)
            for _ in range(n_batches)]


def _noisy_mod8(ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """label = id mod 8, except a LABEL_NOISE share drawn uniformly: learnable, with an irreducible loss, so that
    runs compare by how close they get to the floor rather than by when a noiseless loss happens to collapse."""
    labels = ids % 8
    noisy = torch.rand(ids.shape, generator=gen) < LABEL_NOISE
    return torch.where(noisy, torch.randint(0, 8, ids.shape, generator=gen), labels)


def bert_task(batch: int, seq: int, device: torch.device, rank: int) -> Task:
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(num_labels=8)).to(device)  # bert-base-uncased shapes
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1000 + rank)
    pool = [({"input_ids": ids.to(device)}, _noisy_mod8(ids, gen).to(device))
            for ids in _zipf_tokens(BERT_POOL, batch, seq, vocab, gen)]
    held_gen = torch.Generator().manual_seed(999)  # rank-independent: every rank and run scores the same batches
    held_out = [({"input_ids": ids.to(device)}, _noisy_mod8(ids, held_gen).to(device))
                for ids in _zipf_tokens(HELD_OUT, batch, seq, vocab, held_gen)]
    return Task(model=model, synthetic=True, batches=pool, samples_per_batch=batch, held_out=held_out,
                description=f"BERT-base encoder + token classifier, SYNTHETIC Zipf tokens {batch}x{seq}, "
                            f"label = id mod 8 with {LABEL_NOISE:.0%} of labels random (loss floor about 0.95); "
                            f"eval_loss on {HELD_OUT} held-out batches")


def gpt2_task(batch: int, seq: int, device: torch.device, rank: int) -> Task:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_positions=max(1024, seq))).to(device)
    gen = torch.Generator().manual_seed(2000 + rank)
    pool = [({"input_ids": ids.to(device)}, ids[:, 1:].to(device))
            for ids in _zipf_tokens(POOL, batch, seq, model.config.vocab_size, gen)]
    return Task(model=model, synthetic=True, batches=pool, samples_per_batch=batch,
                description=f"GPT-2 small causal LM, SYNTHETIC Zipf tokens {batch}x{seq}")




def resnet_task(batch: int, image: int, device: torch.device, rank: int) -> Task:
    torch.manual_seed(0)
    model = ResNet50().to(device).to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(3000 + rank)
    pool = []
    for _ in range(POOL):
        x = torch.randn(batch, 3, image, image, generator=gen).to(device).to(memory_format=torch.channels_last)
        pool.append((x, torch.randint(0, 1000, (batch,), generator=gen).to(device)))
    return Task(model=model, synthetic=True, batches=pool, samples_per_batch=batch,
                description=f"ResNet-50, SYNTHETIC images {batch}x3x{image}x{image}, random labels")


def build_task(name: str, batch: int, seq: int | None, device: torch.device, rank: int) -> Task:
    if name == "digits-mlp":
        return digits_task(batch, device)
    if name == "bert-base":
        return bert_task(batch, seq or DEFAULT_SEQ[name], device, rank)
    if name == "gpt2-small":
        return gpt2_task(batch, seq or DEFAULT_SEQ[name], device, rank)
    if name == "resnet50":
        return resnet_task(batch, seq or DEFAULT_SEQ[name], device, rank)
    raise ValueError(f"unknown model {name!r}")
