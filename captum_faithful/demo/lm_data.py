"""The language-model demo's data: invented facts, their prompts and counterfactuals.

Every name is made up from syllables (nothing is downloaded, and no fact can be known
from elsewhere): people, each with a home town, a trade and a pet, and countries,
each with a capital. The training text states every fact once per line ("Zorvin
lives in the town of Kelmar ."); a prompt is such a line cut before its attribute
("Zorvin lives in the town of"), and its counterfactual the same prompt about
another subject whose attribute differs ("Brelo lives in the town of"), as in the
counterfactual prompts of Meng et al. (2023) that the UNI paper patches.

The tokenizer is word-level (one token per word, so a prompt and its
counterfactual always have the same length), trained offline with ``tokenizers``
on the training text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from captum_faithful._utils import check_int, optional_import

#: Syllables the invented names are made of.
_ONSETS = "b d f g k l m n p r s t v z br dr gr kl pl st tr th sk".split()
_VOWELS = "a e i o u ai ei ou".split()
_CODAS = ["", "", "n", "r", "l", "s", "k", "m", "th", "nd"]

#: (relation, prompt template, the kind of subject, the kind of attribute). Every
#: template has six words, so all prompts have the same length (one batch).
RELATIONS = (
    ("home", "{} lives in the town of", "person", "town"),
    ("trade", "by day {} works as a", "person", "trade"),
    ("pet", "the pet of {} is a", "person", "pet"),
    ("capital", "the capital city of {} is", "country", "city"),
)
#: How many invented names of each kind.
KINDS = {
    "person": 40,
    "country": 16,
    "town": 10,
    "trade": 8,
    "pet": 6,
    "city": 16,
}
SPECIAL_TOKENS = ("[UNK]", "[PAD]", "[EOS]")
#: Counterfactual prompt pairs, as in the UNI paper's Table 8.
N_PAIRS = 100


@dataclass(frozen=True)
class Fact:
    """One fact: ``prompt`` (the template filled with ``subject``) is completed by
    ``attribute``."""

    relation: str
    subject: str
    attribute: str
    prompt: str

    @property
    def sentence(self) -> str:
        return f"{self.prompt} {self.attribute} ."


@dataclass(frozen=True)
class FactData:
    """The facts of a seed and the counterfactual pairs drawn from them.

    ``pairs`` holds :data:`N_PAIRS` pairs ``(fact, counterfactual)``: the same relation
    about another subject of the same kind, with another attribute. Every fact is in
    the training text (the model must recall them).
    """

    facts: tuple[Fact, ...]
    pairs: tuple[tuple[Fact, Fact], ...]
    names: dict

    @property
    def text(self) -> list[str]:
        """The training text: one sentence per fact."""
        return [fact.sentence for fact in self.facts]


def _name(rng: random.Random, syllables: int) -> str:
    word = "".join(
        rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)
    ) + rng.choice(_CODAS)
    return word.capitalize()


def invented_names(seed: int = 0) -> dict[str, list[str]]:
    """:data:`KINDS` many distinct invented names of each kind, no name used twice."""
    check_int("seed", seed, minimum=0)
    rng = random.Random(seed)
    used: set[str] = set()
    names: dict[str, list[str]] = {}
    for kind, count in KINDS.items():
        chosen: list[str] = []
        while len(chosen) < count:
            name = _name(rng, rng.choice((2, 2, 3)))
            if name.lower() not in used:
                used.add(name.lower())
                chosen.append(name)
        names[kind] = chosen
    # trades and pets are common nouns: lower case, as in running text
    names["trade"] = [name.lower() for name in names["trade"]]
    names["pet"] = [name.lower() for name in names["pet"]]
    return names


def make_facts(seed: int = 0) -> FactData:
    """The facts and the counterfactual pairs of ``seed`` (deterministic).

    Every person gets a town, a trade and a pet drawn at random (each value used by
    several people); every country its own capital. The pairs are drawn from all
    facts without replacement; each fact's counterfactual subject is drawn among the
    subjects whose attribute for that relation differs.
    """
    names = invented_names(seed)
    rng = random.Random(seed + 1)
    facts: list[Fact] = []
    by_relation: dict[str, list[Fact]] = {}
    for relation, template, subject_kind, attribute_kind in RELATIONS:
        subjects = names[subject_kind]
        values = names[attribute_kind]
        if len(values) >= len(subjects):
            attributes = rng.sample(values, len(subjects))
        else:
            attributes = [values[i % len(values)] for i in range(len(subjects))]
            rng.shuffle(attributes)
        for subject, attribute in zip(subjects, attributes, strict=True):
            fact = Fact(relation, subject, attribute, template.format(subject))
            facts.append(fact)
            by_relation.setdefault(relation, []).append(fact)
    chosen = rng.sample(range(len(facts)), N_PAIRS)
    pairs = []
    for index in chosen:
        fact = facts[index]
        others = [
            f for f in by_relation[fact.relation] if f.attribute != fact.attribute
        ]
        pairs.append((fact, rng.choice(others)))
    return FactData(tuple(facts), tuple(pairs), names)


def fact_tokenizer(data: FactData):
    """A word-level ``PreTrainedTokenizerFast`` trained offline on ``data``'s text.

    Every word of the text is one token; the vocabulary is ordered by the
    ``tokenizers`` trainer (by frequency, ties by the word), so the same data give
    the same token ids.
    """
    if not isinstance(data, FactData):
        raise TypeError(f"`data` must be a FactData, got {type(data).__name__}")
    tokenizers = optional_import("tokenizers", "demo")
    transformers = optional_import("transformers", "demo")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    trainer = tokenizers.trainers.WordLevelTrainer(
        special_tokens=list(SPECIAL_TOKENS), min_frequency=1, show_progress=False
    )
    tokenizer.train_from_iterator(data.text, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        eos_token="[EOS]",
    )
