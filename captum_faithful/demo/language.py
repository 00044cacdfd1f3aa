"""The language-model demo: a tiny GPT-2 that recalls invented facts.

A Hugging Face ``GPT2LMHeadModel`` built from a config is trained on the CPU, from
random weights, on the training text of :mod:`captum_faithful.demo.lm_data` (every
fact once per line, next-token prediction on every token), until it completes each
prompt with its attribute. It is cached like the demo's image models, under the same
cache root, in a folder named by a hash of the recipe and the seed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from captum_faithful._utils import check_int, optional_import, progress
from captum_faithful.demo import models
from captum_faithful.demo._stopwatch import Stopwatch
from captum_faithful.demo.lm_data import FactData, fact_tokenizer, make_facts

#: Bump when the training code changes in a way the recipe fields do not capture.
LANGUAGE_RECIPE_VERSION = 1


@dataclass(frozen=True)
class LanguageRecipe:
    """Everything that decides the trained weights (hashed into the cache key).

    Each epoch is one pass over the facts in a new random order, in batches of
    ``batch_size`` sentences; AdamW with a one-cycle schedule peaking at ``lr``.
    """

    layers: int
    width: int
    heads: int
    epochs: int
    lr: float
    batch_size: int = 68

    def key(self, seed: int) -> str:
        blob = json.dumps(
            {"version": LANGUAGE_RECIPE_VERSION, "seed": seed, **asdict(self)},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


#: 4 blocks of width 128: measured (seed 0, one thread) it recalls every fact after
#: 200 epochs, in 24 s of training.
FULL_LANGUAGE_RECIPE = LanguageRecipe(layers=4, width=128, heads=4, epochs=200, lr=3e-3)
#: 2 blocks of width 64: recalls every fact (seed 0), in 7 s on one thread.
QUICK_LANGUAGE_RECIPE = LanguageRecipe(layers=2, width=64, heads=4, epochs=200, lr=3e-3)


@dataclass
class LanguageDemo:
    """The language-model demo's trained model and prompts (see
    :func:`load_language_demo`).

    Attributes:
        model (nn.Module): The trained tiny GPT-2, a Hugging Face
                    ``GPT2LMHeadModel`` in eval mode.
        tokenizer (PreTrainedTokenizerFast): Its word-level tokenizer.
        facts (FactData): The invented facts and the counterfactual pairs drawn
                    from them.
        prompts (list[str]): One fact's prompt per pair (100 strings).
        counterfactual_prompts (list[str]): The same prompt about another subject
                    with another attribute, one per pair.
        input_ids (Tensor): ``(100, 6)`` token ids of ``prompts``.
        corrupted_ids (Tensor): ``(100, 6)`` token ids of
                    ``counterfactual_prompts``: the same length as ``input_ids``,
                    differing only at the subject.
        answer_ids (Tensor): ``(100,)`` each prompt's attribute token.
        recall (float): The share of all facts whose prompt the model completes
                    with the attribute (greedy).
        pair_recall (float): The same share over the 200 prompts of the pairs.
        cache_dir (Path, optional): The folder the model was loaded from.
        meta (dict): The training record of that folder (``meta.json``): the
                    recipe, the seed, the training's seconds and thread count.
    """

    model: nn.Module
    tokenizer: Any
    facts: FactData
    prompts: list[str]
    counterfactual_prompts: list[str]
    input_ids: Tensor
    corrupted_ids: Tensor
    answer_ids: Tensor
    recall: float
    pair_recall: float
    cache_dir: Path | None = None
    meta: dict = field(default_factory=dict)


def build_language_model(recipe: LanguageRecipe, vocab_size: int, seed: int = 0):
    """A ``GPT2LMHeadModel`` from a config: ``recipe.layers`` blocks of width
    ``recipe.width``, no dropout, context of 16 tokens, random weights."""
    if not isinstance(recipe, LanguageRecipe):
        raise TypeError(
            f"`recipe` must be a LanguageRecipe, got {type(recipe).__name__}"
        )
    check_int("vocab_size", vocab_size, minimum=1)
    transformers = optional_import("transformers", "demo")
    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=16,
        n_embd=recipe.width,
        n_layer=recipe.layers,
        n_head=recipe.heads,
        n_inner=4 * recipe.width,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


def encode(tokenizer: Any, texts: list[str]) -> Tensor:
    """Token ids of ``texts``, ``(len(texts), longest)``, right-padded with
    ``[PAD]``."""
    if isinstance(texts, str) or not texts:
        raise ValueError(f"`texts` must be a non-empty list of strings, got {texts!r}")
    encoded = [tokenizer(text)["input_ids"] for text in texts]
    longest = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), longest), tokenizer.pad_token_id)
    for row, sequence in enumerate(encoded):
        ids[row, : len(sequence)] = torch.tensor(sequence)
    return ids


@torch.no_grad()
def recall_accuracy(
    model: nn.Module, tokenizer: Any, prompts: list[str], answers: list[str]
) -> float:
    """Share of ``prompts`` whose most likely next token (greedy, at the last
    position) is the word in ``answers``."""
    if len(prompts) != len(answers):
        raise ValueError(
            f"`prompts` and `answers` must have the same length, got {len(prompts)} "
            f"and {len(answers)}"
        )
    device = next(model.parameters()).device
    ids = encode(tokenizer, prompts).to(device)
    lengths = torch.tensor([len(tokenizer(p)["input_ids"]) for p in prompts])
    # right padding: the mask changes no logit before a prompt's end, it only
    # tells the model there is padding
    mask = (ids != tokenizer.pad_token_id).long()
    logits = model(input_ids=ids, attention_mask=mask).logits.cpu()
    predicted = logits[torch.arange(len(ids)), lengths - 1].argmax(-1)
    expected = torch.tensor(tokenizer.convert_tokens_to_ids(list(answers)))
    return float((predicted == expected).float().mean())


def train_language_model(
    recipe: LanguageRecipe,
    data: FactData,
    tokenizer: Any,
    seed: int,
    show_progress: bool = False,
) -> nn.Module:
    """Train :func:`build_language_model` on ``data``'s text; eval mode at the end.

    The loss is the cross-entropy of the next token at every position but the
    padding (the subject tokens cannot be predicted, the rest can).
    """
    model = build_language_model(recipe, len(tokenizer), seed)
    ids = encode(tokenizer, data.text)
    labels = ids.masked_fill(ids == tokenizer.pad_token_id, -100)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    batches = -(-len(ids) // recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, recipe.lr, total_steps=recipe.epochs * batches, pct_start=0.1
    )
    model.train()
    epochs = progress(
        range(recipe.epochs), show_progress, desc="train language model", leave=False
    )
    for _ in epochs:
        for rows in torch.randperm(len(ids), generator=generator).split(
            recipe.batch_size
        ):
            logits = model(input_ids=ids[rows]).logits
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels[rows][:, 1:].reshape(-1),
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def _train_into(
    recipe: LanguageRecipe, seed: int, folder: Path, show_progress: bool
) -> dict:
    data = make_facts(seed)
    tokenizer = fact_tokenizer(data)
    clock = Stopwatch()
    # a transformers model (build_language_model), with save_pretrained
    model: Any = train_language_model(recipe, data, tokenizer, seed, show_progress)
    training = clock.lap()
    with models.quiet_transformers():
        model.save_pretrained(str(folder / "model"))
        tokenizer.save_pretrained(str(folder / "tokenizer"))
    meta = {
        "recipe": asdict(recipe),
        "seed": seed,
        "recall": recall_accuracy(
            model,
            tokenizer,
            [f.prompt for f in data.facts],
            [f.attribute for f in data.facts],
        ),
        "training_threads": torch.get_num_threads(),
        "training_seconds": training["wall_seconds"],
        "training_cpu_seconds": training["cpu_seconds"],
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


@contextmanager
def one_thread() -> Iterator[None]:
    """One thread inside the block (restored afterwards), for training and
    measuring the language model: it is too small to gain from more. Measured on 2
    cores (seed 0): the full recipe trains in 24 s on one thread and 64 s on two,
    the quick one in 7 s and 11 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ensure_language_trained(
    recipe: LanguageRecipe, seed: int, show_progress: bool = False
) -> Path:
    """The cache folder of ``(recipe, seed)``, training into it first if needed
    (see :func:`captum_faithful.demo.models.cached_training`)."""

    def train(staging: Path) -> None:
        with one_thread():
            _train_into(recipe, seed, staging, show_progress)

    return models.cached_training(
        models.cache_root() / f"language-{recipe.key(seed)}", train
    )


def load_language_demo(
    quick: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
    show_progress: bool = False,
) -> LanguageDemo:
    """The demo's tiny GPT-2, trained to recall invented facts, with the
    counterfactual prompt pairs of the UNI paper's Table 8 in miniature.

    The model is trained on first use on the CPU (on one thread: about 25 s with the
    full recipe, under 10 s with ``quick=True``) and cached under
    ``~/.cache/captum_faithful`` (or ``$CAPTUM_FAITHFUL_CACHE``) in a folder keyed
    by the recipe and ``seed``; later calls load the cache.

    Args:
        quick (bool, optional): the small recipe (2 blocks of width 64 instead of 4
            of width 128). Default: False
        device (str or torch.device, optional): where the model and tensors go.
            Default: "cpu"
        seed (int, optional): seed of the invented facts, the pairs and the
            training. Default: 0
        show_progress (bool, optional): a progress bar while training.
            Default: False

    Returns:
        LanguageDemo: with ``model`` (a ``GPT2LMHeadModel`` in eval mode),
        ``tokenizer`` (word-level ``PreTrainedTokenizerFast``), ``facts`` (the
        :class:`~captum_faithful.demo.lm_data.FactData`), ``prompts`` and
        ``counterfactual_prompts`` (100 strings each: a fact's prompt and the same
        prompt about another subject with another attribute), ``input_ids`` and
        ``corrupted_ids`` (their token ids, ``(100, 6)``, the same length and
        differing only at the subject), ``answer_ids`` ``(100,)`` (each prompt's
        attribute token), ``recall`` (share of all facts whose prompt the model
        completes with the attribute, greedy) and ``pair_recall`` (the same share
        over the 200 prompts of the pairs), ``cache_dir`` and ``meta`` (recipe,
        training seconds and threads).

    Examples::

        >>> from captum_faithful.demo import load_language_demo
        >>> lm = load_language_demo(quick=True)
        >>> lm.model(lm.input_ids[:2]).logits[:, -1].argmax(-1), lm.answer_ids[:2]
    """
    if not isinstance(quick, bool):
        raise TypeError(f"`quick` must be a bool, got {quick!r}")
    check_int("seed", seed, minimum=0)
    device = torch.device(device)
    recipe = QUICK_LANGUAGE_RECIPE if quick else FULL_LANGUAGE_RECIPE
    folder = ensure_language_trained(recipe, seed, show_progress=show_progress)
    meta = json.loads((folder / "meta.json").read_text())
    transformers = optional_import("transformers", "demo")
    with models.quiet_transformers():
        model = transformers.GPT2LMHeadModel.from_pretrained(str(folder / "model"))
        tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(
            str(folder / "tokenizer")
        )
    model = model.to(device).eval()
    data = make_facts(seed)
    prompts = [fact.prompt for fact, _ in data.pairs]
    counterfactual = [other.prompt for _, other in data.pairs]
    answers = [fact.attribute for fact, _ in data.pairs]
    pair_recall = recall_accuracy(
        model,
        tokenizer,
        prompts + counterfactual,
        answers + [other.attribute for _, other in data.pairs],
    )
    return LanguageDemo(
        model=model,
        tokenizer=tokenizer,
        facts=data,
        prompts=prompts,
        counterfactual_prompts=counterfactual,
        input_ids=encode(tokenizer, prompts).to(device),
        corrupted_ids=encode(tokenizer, counterfactual).to(device),
        answer_ids=torch.tensor(tokenizer.convert_tokens_to_ids(answers)).to(device),
        recall=float(meta["recall"]),
        pair_recall=pair_recall,
        cache_dir=folder,
        meta=meta,
    )
