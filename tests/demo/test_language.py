"""The language-model demo: the invented facts and their counterfactual pairs, the
word-level tokenizer, the tiny GPT-2's recall, the Table-8 measurement against an
independent computation, and the report's language-model section."""

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
scipy_stats = pytest.importorskip("scipy.stats")

from captum_faithful import AttributionPatching, activation_patching  # noqa: E402
from captum_faithful.demo import language, lm_data, report  # noqa: E402
from captum_faithful.demo._stopwatch import Stopwatch  # noqa: E402
from captum_faithful.demo.patching import (  # noqa: E402
    BASELINES,
    PatchingMeasurement,
    mean_sem,
    measure_patching,
)

TINY = language.LanguageRecipe(layers=2, width=16, heads=2, epochs=1, lr=1e-3)


@pytest.fixture(scope="module")
def data():
    return lm_data.make_facts(0)


@pytest.fixture(scope="module")
def tokenizer(data):
    return lm_data.fact_tokenizer(data)


@pytest.fixture(scope="module")
def untrained(tokenizer):
    return language.build_language_model(TINY, len(tokenizer), seed=0).eval()


def test_facts_are_deterministic_and_differ_between_seeds(data):
    again = lm_data.make_facts(0)
    assert again == data
    other = lm_data.make_facts(1)
    assert other.text != data.text
    names = [name.lower() for kind in data.names.values() for name in kind]
    assert len(names) == len(set(names)), "a name is used for two things"
    assert {kind: len(v) for kind, v in data.names.items()} == lm_data.KINDS
    # every person has one fact per person relation, every country one capital
    per_relation = {}
    for fact in data.facts:
        per_relation.setdefault(fact.relation, []).append(fact.subject)
    for relation, _, kind, _ in lm_data.RELATIONS:
        assert sorted(per_relation[relation]) == sorted(data.names[kind])
    # capitals are distinct: no two countries share one
    capitals = [f.attribute for f in data.facts if f.relation == "capital"]
    assert len(set(capitals)) == len(capitals)


def test_counterfactual_pairs(data, tokenizer):
    assert len(data.pairs) == lm_data.N_PAIRS == 100
    facts = set(data.facts)
    assert len({fact for fact, _ in data.pairs}) == 100, "a prompt is used twice"
    for fact, other in data.pairs:
        # both are facts of the training text: the model is meant to recall them
        assert fact in facts and other in facts
        assert fact.relation == other.relation
        assert fact.subject != other.subject and fact.attribute != other.attribute
        ids = tokenizer(fact.prompt)["input_ids"]
        other_ids = tokenizer(other.prompt)["input_ids"]
        # the same length, differing at the subject token only
        assert len(ids) == len(other_ids) == 6
        differ = [
            i for i, (a, b) in enumerate(zip(ids, other_ids, strict=True)) if a != b
        ]
        assert len(differ) == 1
        assert tokenizer.convert_ids_to_tokens(ids[differ[0]]) == fact.subject


def test_tokenizer_round_trip_and_determinism(data, tokenizer):
    assert tokenizer.get_vocab() == lm_data.fact_tokenizer(data).get_vocab()
    words = {word for sentence in data.text for word in sentence.split()}
    assert len(tokenizer) == len(words) + len(lm_data.SPECIAL_TOKENS)
    for sentence in data.text:
        ids = tokenizer(sentence)["input_ids"]
        assert len(ids) == len(sentence.split()), "one token per word"
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == sentence
    assert tokenizer.pad_token_id == 1


def test_encode_pads_on_the_right(tokenizer):
    ids = language.encode(tokenizer, ["the pet of", "the pet of Zapouk is a"])
    assert ids.shape == (2, 6)
    assert ids[0, 3:].tolist() == [tokenizer.pad_token_id] * 3
    assert ids[0, :3].tolist() == ids[1, :3].tolist()


def test_recall_accuracy_against_a_loop(data, tokenizer, untrained):
    prompts = [f.prompt for f in data.facts[:30]] + ["the pet of"]
    answers = [f.attribute for f in data.facts[:30]] + ["Zapouk"]
    # make some answers the model's own top token, so both outcomes are counted
    with torch.no_grad():
        for i in range(0, 30, 3):
            ids = torch.tensor([tokenizer(prompts[i])["input_ids"]])
            top = int(untrained(input_ids=ids).logits[0, -1].argmax())
            answers[i] = tokenizer.convert_ids_to_tokens(top)
    correct = 0
    with torch.no_grad():
        for prompt, answer in zip(prompts, answers, strict=True):
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            top = int(untrained(input_ids=ids).logits[0, -1].argmax())
            correct += tokenizer.convert_ids_to_tokens(top) == answer
    assert 10 <= correct < len(prompts)
    recall = language.recall_accuracy(untrained, tokenizer, prompts, answers)
    assert math.isclose(recall, correct / len(prompts), rel_tol=1e-6)
    with pytest.raises(ValueError, match="same length"):
        language.recall_accuracy(untrained, tokenizer, prompts, answers[:-1])


def test_recipe_key_depends_on_recipe_and_seed():
    quick, full = language.QUICK_LANGUAGE_RECIPE, language.FULL_LANGUAGE_RECIPE
    assert quick.key(0) == quick.key(0)
    assert len({quick.key(0), quick.key(1), full.key(0)}) == 3


@pytest.fixture(scope="module")
def small_measurement(data, tokenizer, untrained):
    pairs = data.pairs[:4]
    ids = language.encode(tokenizer, [f.prompt for f, _ in pairs])
    corrupted = language.encode(tokenizer, [o.prompt for _, o in pairs])
    measured = measure_patching(
        untrained, ids, corrupted, n_steps=(1, 3), seed=5, epsilon=0.5
    )
    return ids, corrupted, measured


def test_measurement_against_an_independent_computation(small_measurement, untrained):
    ids, corrupted, measured = small_measurement
    patching = AttributionPatching(untrained, epsilon=0.5)
    embedding = untrained.get_input_embeddings()
    specs = {
        "unlearned": "unlearned",
        "random": "random",
        "zero": "zero",
        "corrupted": corrupted,
    }
    assert measured.baselines == BASELINES and measured.n_steps == (1, 3)
    assert measured.site_names == patching.site_names
    for baseline, spec in specs.items():
        generator = torch.Generator().manual_seed(5)
        x_prime = patching.compute_baselines(ids, baselines=spec, generator=generator)
        exact = activation_patching(untrained, ids, x_prime)
        assert exact.shape == (4, TINY.layers + 1, 6)
        torch.testing.assert_close(measured.exact[baseline], exact)
        with torch.no_grad():
            shift = (x_prime - embedding(ids)).flatten(1).norm(dim=1)
        torch.testing.assert_close(
            measured.baseline_distance[baseline], shift.double(), rtol=1e-6, atol=1e-9
        )
        for n in (1, 3):
            approx = patching.attribute(ids, baselines=x_prime, n_steps=n)
            torch.testing.assert_close(measured.approx[baseline, n], approx)
            difference = (approx - exact).double().flatten(1)
            by_hand = difference.pow(2).sum(1).sqrt()
            torch.testing.assert_close(measured.distance[baseline, n], by_hand)
            torch.testing.assert_close(
                measured.relative_distance[baseline, n],
                by_hand / exact.double().flatten(1).pow(2).sum(1).sqrt(),
            )
            for i in range(4):
                rho = scipy_stats.spearmanr(
                    approx[i].flatten().numpy(), exact[i].flatten().numpy()
                ).statistic
                got = float(measured.rank_correlation[baseline, n][i])
                assert math.isclose(got, rho, abs_tol=1e-9) or (
                    math.isnan(got) and math.isnan(rho)
                )
    # the learned baseline sits on the sphere of radius epsilon, the counterfactual
    # one differs from the prompt at the subject token only
    torch.testing.assert_close(
        measured.baseline_distance["unlearned"],
        torch.full((4,), 0.5, dtype=torch.float64),
        rtol=1e-4,
        atol=0,
    )
    with torch.no_grad():
        subject = (embedding(ids) - embedding(corrupted)).norm(dim=-1)
    assert int((subject > 0).sum()) == 4


def test_measurement_summary_and_welch(small_measurement):
    _, _, measured = small_measurement
    rows = measured.summary()
    assert [(r["baseline"], r["n_steps"]) for r in rows] == [
        (b, n) for b in BASELINES for n in (1, 3)
    ]
    for row in rows:
        values = measured.distance[row["baseline"], row["n_steps"]]
        assert math.isclose(row["distance"], float(values.mean()), rel_tol=1e-12)
        assert math.isclose(row["distance_sem"], float(values.std() / 2), rel_tol=1e-9)
        if row["baseline"] == "random":
            assert math.isnan(row["p_vs_random"])
            continue
        expected = scipy_stats.ttest_ind(
            values.numpy(),
            measured.distance["random", row["n_steps"]].numpy(),
            equal_var=False,
        )
        assert math.isclose(row["p_vs_random"], float(expected.pvalue), rel_tol=1e-9)
        assert math.isclose(row["t_vs_random"], float(expected.statistic))
    for n in (1, 3):
        below = float(measured.distance["unlearned", n].mean()) < float(
            measured.distance["random", n].mean()
        )
        assert measured.unlearned_below_random(n) is below


def test_mean_sem_leaves_out_nan():
    mean, sem = mean_sem(torch.tensor([1.0, float("nan"), 3.0]))
    assert mean == 2.0 and math.isclose(sem, math.sqrt(2) / math.sqrt(2))
    assert all(math.isnan(v) for v in mean_sem(torch.tensor([float("nan")])))


def test_measurement_random_baseline_follows_the_seed(untrained, tokenizer, data):
    ids = language.encode(tokenizer, [data.pairs[0][0].prompt])
    first, again, other = (
        measure_patching(untrained, ids, baselines=("random",), n_steps=(1,), seed=s)
        for s in (1, 1, 2)
    )
    torch.testing.assert_close(first.exact["random"], again.exact["random"])
    assert not torch.equal(first.exact["random"], other.exact["random"])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"baselines": "random"}, ValueError, "baselines"),
        ({"baselines": ()}, ValueError, "baselines"),
        ({"baselines": ("learned",)}, ValueError, "baselines"),
        ({"n_steps": 4}, ValueError, "n_steps"),
        ({"n_steps": (0,)}, ValueError, "n_steps"),
        ({"baselines": ("corrupted",)}, TypeError, "corrupted_ids"),
        ({"corrupted_ids": torch.zeros(1, 5, dtype=torch.long)}, ValueError, "shape"),
        ({"baselines": ("random",), "seed": -1}, ValueError, "seed"),
        ({"baselines": ("random",), "epsilon": 0.0}, ValueError, "epsilon"),
    ],
)
def test_measurement_validates_arguments(untrained, kwargs, error, message):
    ids = torch.tensor([[4, 5, 6, 7, 8, 9]])
    with pytest.raises(error, match=message):
        measure_patching(untrained, ids, **kwargs)
    with pytest.raises(TypeError, match="input_ids"):
        measure_patching(untrained, [[4, 5]])


def _measurement(unlearned: float, random: float) -> PatchingMeasurement:
    """Two baselines, one path count, 4 prompts; distances chosen by hand."""
    spread = torch.tensor([-0.3, -0.1, 0.1, 0.3], dtype=torch.float64)
    distance = {
        ("unlearned", 1): unlearned + spread,
        ("random", 1): random + 2 * spread,
    }
    exact = torch.ones(4, 3, 6)
    return PatchingMeasurement(
        site_names=["blocks.0.hook_resid_pre", "x", "y"],
        n_steps=(1,),
        baselines=("unlearned", "random"),
        exact={"unlearned": exact, "random": exact},
        approx={},
        distance=distance,
        relative_distance={key: value / 10 for key, value in distance.items()},
        rank_correlation={
            ("unlearned", 1): torch.full((4,), 0.9, dtype=torch.float64),
            ("random", 1): torch.tensor([0.5, 0.6, float("nan"), 0.7]).double(),
        },
        baseline_distance={
            "unlearned": torch.full((4,), 0.25).double(),
            "random": torch.full((4,), 3.0).double(),
        },
        settings={
            "unlearning_step": 1.0,
            "pgd_steps": 10,
            "epsilon": 0.25,
            "pgd_step_size": 0.1,
            "seed": 0,
        },
    )


def _language(data):
    return SimpleNamespace(
        meta={
            "recipe": {"layers": 2, "width": 64, "heads": 4},
            "training_seconds": 7.4,
            "training_threads": 1,
        },
        recall=0.975,
        pair_recall=0.99,
        facts=data,
        prompts=[data.pairs[0][0].prompt],
        counterfactual_prompts=[data.pairs[0][1].prompt],
    )


def test_language_section_renders_the_table_and_a_computed_verdict(data):
    outcome = SimpleNamespace(language=_language(data), patching=_measurement(2, 6))
    text = "\n".join(report.language_section(outcome))
    assert "## Language model: attribution patching against activation patching" in text
    rows = [line for line in text.splitlines() if line.startswith("| UNI (learned)")]
    assert rows == [
        "| UNI (learned) | 1 | 2.000 ± 0.129 | 0.200 ± 0.013 | 0.900 ± 0.000 | 0.25 "
        f"| {report._number(outcome.patching.summary()[0]['t_vs_random'], 2)} "
        f"| {report._pvalue(outcome.patching.summary()[0]['p_vs_random'])} |"
    ]
    # the random row's correlation leaves the NaN out; its own test is blank
    assert (
        "| random | 1 | 6.000 ± 0.258 | 0.600 ± 0.026 | 0.600 ± 0.058 | 3.00 | – | – |"
        in text
    )
    assert "**held**" in text and "did not hold" not in text
    assert "0.975 of all 136 fact prompts" in text and "2 blocks, width 64" in text
    assert data.pairs[0][0].prompt in text and "ε = 0.25" in text
    assert f'("{data.facts[0].sentence}";' in text
    # the verdict follows the numbers
    reversed_outcome = SimpleNamespace(
        language=_language(data), patching=_measurement(6, 2)
    )
    text = "\n".join(report.language_section(reversed_outcome))
    assert "**did not hold**" in text and "**held**" not in text
    close = SimpleNamespace(language=_language(data), patching=_measurement(5.9, 6))
    assert "held, but not significantly" in "\n".join(report.language_section(close))
    # no section when the job did not measure it
    assert report.language_section(SimpleNamespace()) == []


def test_language_steps_have_labels():
    assert report._step_label("language model") == "load (or train) the language model"
    assert "patching" in report._step_label("language patching")


@pytest.mark.slow  # trains the quick language model (about 10 s)
@pytest.mark.trained  # asserts the trained model recalls the facts
def test_quick_language_demo_recalls_and_is_cached(demo_cache, monkeypatch):
    """Recall measured with the quick recipe, seeds 0-3 (one thread, whatever the
    process's count): 1.000 of all facts and of the pair prompts on every seed."""
    demo = language.load_language_demo(quick=True)
    assert demo.cache_dir.parent == demo_cache
    assert demo.input_ids.shape == demo.corrupted_ids.shape == (100, 6)
    assert demo.meta["training_threads"] == 1
    differ = demo.input_ids != demo.corrupted_ids
    assert differ.sum(1).tolist() == [1] * 100
    with torch.no_grad():
        top = demo.model(input_ids=demo.input_ids).logits[:, -1].argmax(-1)
    assert float((top == demo.answer_ids).float().mean()) > 0.9
    assert demo.recall > 0.9 and demo.pair_recall > 0.9
    assert [demo.tokenizer.decode(row) for row in demo.input_ids] == demo.prompts
    # loaded from the cache the second time: no training
    monkeypatch.setattr(language, "train_language_model", None)
    again = language.load_language_demo(quick=True)
    assert again.cache_dir == demo.cache_dir
    for a, b in zip(demo.model.parameters(), again.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_load_language_demo_validates_arguments():
    with pytest.raises(TypeError, match="quick"):
        language.load_language_demo(quick=1)
    with pytest.raises(ValueError, match="seed"):
        language.load_language_demo(seed=-1)


@pytest.mark.slow  # trains (or loads) the quick language model, measures 100 prompts
def test_job_language_step(demo_cache, tmp_path):
    from captum_faithful.demo import job
    from captum_faithful.demo.registry import Settings

    timings = {}
    settings = Settings(out=tmp_path, quick=True, show_progress=False)
    lm, measured = job.run_language_model(settings, timings, Stopwatch())
    assert list(timings) == ["language model", "language patching"]
    assert all(lap["wall_seconds"] > 0 for lap in timings.values())
    assert measured.n_prompts == 100 and measured.n_steps == job.LANGUAGE_N_STEPS
    assert measured.baselines == BASELINES
    torch.testing.assert_close(
        measured.exact["corrupted"],
        activation_patching(lm.model, lm.input_ids, lm.corrupted_ids),
    )
    header, rows = report.language_table(measured)
    assert len(rows) == len(BASELINES) * len(job.LANGUAGE_N_STEPS)
    assert [row[:2] for row in rows[:2]] == [
        ["UNI (learned)", "1"],
        ["UNI (learned)", "16"],
    ]


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "hooked_transformer"])
def test_measurement_on_other_families(family):
    """The measurement reads the embeddings through the family's adapter."""
    pytest.importorskip("transformer_lens")
    import tiny_lms

    model = tiny_lms.BUILDERS[family]()
    ids = torch.randint(
        3, tiny_lms.VOCAB, (2, 5), generator=torch.Generator().manual_seed(0)
    )
    corrupted = ids.clone()
    corrupted[:, 1] = (ids[:, 1] - 2) % (tiny_lms.VOCAB - 3) + 3
    measured = measure_patching(model, ids, corrupted, n_steps=(1,))
    patching = AttributionPatching(model)
    x_prime = patching.compute_baselines(ids, baselines=corrupted)
    exact = activation_patching(model, ids, x_prime)
    approx = patching.attribute(ids, baselines=x_prime)
    torch.testing.assert_close(
        measured.distance["corrupted", 1],
        (approx - exact).double().flatten(1).norm(dim=1),
    )
    torch.testing.assert_close(
        measured.baseline_distance["unlearned"],
        torch.full((2,), 0.25, dtype=torch.float64),
        rtol=1e-4,
        atol=0,
    )


def test_helpers_validate_arguments(data):
    with pytest.raises(TypeError, match="recipe"):
        language.build_language_model({"layers": 2}, 10)
    with pytest.raises(ValueError, match="vocab_size"):
        language.build_language_model(TINY, 0)
    with pytest.raises(ValueError, match="texts"):
        language.encode(None, [])
    with pytest.raises(TypeError, match="data"):
        lm_data.fact_tokenizer(data.text)
    with pytest.raises(ValueError, match="seed"):
        lm_data.make_facts(-1)
