"""Benchmark scoring: accuracies, video-clustered standard errors, headline choice, results files.

Oracles: the clustered SE equals the sandwich estimator G/(G-1) (X'X)^-1 X' Omega X (X'X)^-1 of an intercept-only
regression, built here with dense matrices from a cluster-indicator matrix (a different computation from the
module's per-cluster residual sums); with one example per cluster it equals the binomial sqrt(p(1-p)/(n-1)); an
"always A" predictor scores, per task, the share of answers that are A.
"""

import json
import math

import numpy as np
import pytest

from stts_jax.eval import scoring


def sandwich_se(correct, cluster_keys):
    """Cluster-robust SE of the intercept of y = mu + e, with the G/(G-1) factor, from dense matrices."""
    y = np.asarray(correct, dtype=np.float64)
    n = y.size
    labels = sorted(set(cluster_keys), key=str)
    C = np.array([[k == lab for lab in labels] for k in cluster_keys], dtype=np.float64)  # n x G indicators
    G = C.shape[1]
    X = np.ones((n, 1))
    beta = np.linalg.solve(X.T @ X, X.T @ y)
    e = y - X @ beta
    omega = np.diag(e) @ C @ C.T @ np.diag(e)  # e_i e_j when i and j share a cluster, else 0
    bread = np.linalg.inv(X.T @ X)
    V = G / (G - 1) * bread @ X.T @ omega @ X @ bread
    return math.sqrt(V[0, 0])


def random_examples(rng, n_videos=40, tasks=("t0", "t1", "t2"), benchmark="", durations=None):
    """Questions on videos of 1..6 questions each; correctness shared within a video with some noise."""
    out = []
    for v in range(n_videos):
        skill = rng.uniform(0.1, 0.9)
        for q in range(int(rng.integers(1, 7))):
            answer = int(rng.integers(0, 4))
            right = rng.random() < skill
            pred = answer if right else int((answer + rng.integers(1, 4)) % 4)
            ex = {"id": f"v{v}_q{q}", "pred": pred, "answer": answer, "video_id": f"vid{v}",
                  "task": str(rng.choice(tasks)) if tasks else ""}
            if benchmark:
                ex["benchmark"] = benchmark
            if durations:
                ex["duration_group"] = durations[v % len(durations)]
            out.append(ex)
    return out


def test_clustered_se_equals_sandwich_estimator():
    rng = np.random.default_rng(0)
    examples = random_examples(rng)
    s = scoring.summarize(examples)
    y = [ex["pred"] == ex["answer"] for ex in examples]
    keys = [ex["video_id"] for ex in examples]
    assert s["overall"]["se"] == pytest.approx(sandwich_se(y, keys), rel=1e-10)
    assert s["overall"]["clusters"] == len(set(keys))
    assert s["overall"]["accuracy"] == pytest.approx(np.mean(y))
    # Per task: the same estimator on the task's questions only.
    for task, g in s["per_task"].items():
        sub = [ex for ex in examples if ex["task"] == task]
        ref = sandwich_se([ex["pred"] == ex["answer"] for ex in sub], [ex["video_id"] for ex in sub])
        assert g["se"] == pytest.approx(ref, rel=1e-10), task
    # Macro SE combines the per-task SEs as independent.
    ses = [g["se"] for g in s["per_task"].values()]
    assert s["macro"]["se"] == pytest.approx(math.sqrt(sum(x * x for x in ses)) / len(ses), rel=1e-12)


def test_clustered_se_hand_worked():
    # Two videos, both questions right on one and wrong on the other: ybar = 1/2, cluster residual sums +1 and -1,
    # SE^2 = 2/1 * (1 + 1) / 4^2 = 1/4.
    ex = [{"id": "a1", "pred": 0, "answer": 0, "video_id": "a"}, {"id": "a2", "pred": 1, "answer": 1, "video_id": "a"},
          {"id": "b1", "pred": 0, "answer": 2, "video_id": "b"}, {"id": "b2", "pred": 3, "answer": 1, "video_id": "b"}]
    assert scoring.summarize(ex)["overall"]["se"] == pytest.approx(0.5)
    # Ignoring the clustering would give the smaller sqrt(p(1-p)/(n-1)) = sqrt(1/12).
    for e in ex:
        e["video_id"] = ""
    assert scoring.summarize(ex)["overall"]["se"] == pytest.approx(math.sqrt(0.25 / 3))


def test_singleton_clusters_give_binomial_se():
    rng = np.random.default_rng(1)
    n = 257
    answers = rng.integers(0, 5, n)
    preds = np.where(rng.random(n) < 0.63, answers, (answers + 1) % 5)
    no_video = [{"id": i, "pred": int(p), "answer": int(a)} for i, (p, a) in enumerate(zip(preds, answers))]
    own_video = [dict(ex, video_id=f"vid{ex['id']}") for ex in no_video]
    p = float(np.mean(preds == answers))
    binomial = math.sqrt(p * (1 - p) / (n - 1))
    for ex in (no_video, own_video):
        s = scoring.summarize(ex)
        assert s["overall"]["clusters"] == n
        assert s["overall"]["se"] == pytest.approx(binomial, rel=1e-12)
    assert scoring.clustered_se(preds == answers, range(n)) == pytest.approx(binomial, rel=1e-12)


def test_fewer_than_two_clusters_has_no_se():
    ex = [{"id": i, "pred": i % 2, "answer": 0, "video_id": "same"} for i in range(6)]
    s = scoring.summarize(ex)
    assert s["overall"]["se"] is None and s["overall"]["clusters"] == 1
    assert s["overall"]["accuracy"] == pytest.approx(0.5)


def test_always_a_predictor_mvbench_macro_headline():
    rng = np.random.default_rng(2)
    sizes = {"Action Antonym": 30, "Object Shuffle": 11, "Moving Count": 53}  # unequal: macro != micro
    examples, shares = [], {}
    for task, size in sizes.items():
        answers = rng.integers(0, 4, size)
        shares[task] = float(np.mean(answers == 0))
        examples += [{"id": f"{task}/{i}", "pred": 0, "answer": int(a), "task": task, "video_id": f"{task}/{i // 2}"}
                     for i, a in enumerate(answers)]
    s = scoring.summarize(examples, benchmark="MVBench")
    assert s["headline"] == "macro"
    for task, share in shares.items():
        assert s["per_task"][task]["accuracy"] == pytest.approx(share)
        assert s["per_task"][task]["count"] == sizes[task]
        assert s["per_task"][task]["correct"] == round(share * sizes[task])
    macro = np.mean(list(shares.values()))
    micro = sum(shares[t] * sizes[t] for t in sizes) / sum(sizes.values())
    assert abs(macro - micro) > 1e-3
    assert s["macro"]["accuracy"] == pytest.approx(macro)
    assert s["macro"]["tasks"] == 3 and s["macro"]["count"] == sum(sizes.values())
    assert s["headline_accuracy"] == pytest.approx(macro)
    assert s["headline_se"] == s["macro"]["se"]
    assert s["overall"]["accuracy"] == pytest.approx(micro)
    # The benchmark may come from the examples themselves; MLVU is macro too, Video-MME and others micro.
    assert scoring.summarize([dict(e, benchmark="mvbench") for e in examples])["headline"] == "macro"
    assert scoring.headline_kind("MLVU-dev") == "macro"
    assert scoring.headline_kind("Video-MME") == "micro" and scoring.headline_kind("") == "micro"
    s = scoring.summarize(examples, benchmark="NExT-QA")
    assert s["headline"] == "micro" and s["headline_accuracy"] == pytest.approx(micro)


def test_video_mme_per_duration():
    rng = np.random.default_rng(3)
    examples = random_examples(rng, n_videos=30, tasks=("OCR Problems", "Counting Problem"), benchmark="Video-MME",
                               durations=("short", "medium", "long"))
    s = scoring.summarize(examples)
    assert s["benchmark"] == "Video-MME" and s["headline"] == "micro"
    assert list(s["per_duration"]) == ["short", "medium", "long"]
    for d, g in s["per_duration"].items():
        sub = [ex for ex in examples if ex["duration_group"] == d]
        y = [ex["pred"] == ex["answer"] for ex in sub]
        assert g["count"] == len(sub) and g["correct"] == sum(y)
        assert g["accuracy"] == pytest.approx(np.mean(y))
        assert g["se"] == pytest.approx(sandwich_se(y, [ex["video_id"] for ex in sub]), rel=1e-10)
    assert sum(g["count"] for g in s["per_duration"].values()) == s["overall"]["count"]
    assert s["headline_accuracy"] == s["overall"]["accuracy"]
    # Video-MME needs every question's duration group.
    bad = [dict(examples[0], duration_group="")] + examples[1:]
    with pytest.raises(ValueError, match="duration_group"):
        scoring.summarize(bad)


def test_unparsed_predictions_count_as_wrong():
    ex = [{"id": "1", "pred": 2, "answer": 2}, {"id": "2", "pred": -1, "answer": 0},
          {"id": "3", "pred": -1, "answer": 1}, {"id": "4", "pred": 1, "answer": 0}]
    s = scoring.summarize(ex)
    assert s["unparsed"] == 2
    assert s["overall"]["count"] == 4 and s["overall"]["correct"] == 1
    assert s["overall"]["accuracy"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="pred"):
        scoring.summarize([{"id": "1", "pred": -2, "answer": 0}])


def test_empty_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        scoring.summarize([])
    with pytest.raises(ValueError, match="empty task list"):
        scoring.macro_se([])
    no_tasks = [{"id": str(i), "pred": 0, "answer": i % 2} for i in range(4)]
    with pytest.raises(ValueError, match="no example has a task"):
        scoring.summarize(no_tasks, benchmark="MVBench")
    s = scoring.summarize(no_tasks, benchmark="Perception Test")  # micro headline: no tasks is fine
    assert s["per_task"] == {} and s["macro"] is None
    with pytest.raises(ValueError, match="no task"):
        scoring.summarize(no_tasks[:2] + [dict(e, task="x") for e in no_tasks[2:]])
    with pytest.raises(ValueError, match="duplicate"):
        scoring.summarize(no_tasks + no_tasks[:1])
    with pytest.raises(ValueError, match="one benchmark"):
        scoring.summarize([dict(no_tasks[0], benchmark="MVBench"), dict(no_tasks[1], benchmark="MLVU")])


def test_write_results_and_format_summary(tmp_path):
    rng = np.random.default_rng(4)
    examples = random_examples(rng, n_videos=12, tasks=("a", "b"), benchmark="MVBench")
    examples[0]["pred"] = -1
    s = scoring.summarize(examples)
    path = tmp_path / "results.json"
    scoring.write_results(str(path), s, extra={"model": "tiny", "frames": 8})
    text = path.read_text()
    loaded = json.loads(text)
    assert loaded["model"] == "tiny" and loaded["frames"] == 8
    assert loaded["macro"]["accuracy"] == pytest.approx(s["macro"]["accuracy"])
    assert text == json.dumps(loaded, sort_keys=True, indent=2) + "\n"  # sorted keys, indented
    with pytest.raises(ValueError, match="overwrite"):
        scoring.write_results(str(path), s, extra={"overall": 1})
    # A single-cluster task has no SE: written as null, shown as n/a.
    one = scoring.summarize([{"id": "x", "pred": 0, "answer": 0, "video_id": "v"}])
    scoring.write_results(str(tmp_path / "one.json"), one)
    assert json.loads((tmp_path / "one.json").read_text())["overall"]["se"] is None

    table = scoring.format_summary(s)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| | accuracy % | ± SE % | count |")
    labels = [r.split("|")[1].strip() for r in rows[1:]]
    assert labels == ["overall (micro)", "**macro (mean of 2 tasks)** (headline)", "task: a", "task: b"]
    overall = rows[1].split("|")
    assert overall[2].strip() == f"{100 * s['overall']['accuracy']:.2f}"
    assert overall[3].strip() == f"{100 * s['overall']['se']:.2f}"
    assert overall[4].strip() == str(s["overall"]["count"])
    assert "1 unparsed" in table
    assert "| n/a |" in scoring.format_summary(one)
    vmme = scoring.summarize(random_examples(rng, n_videos=6, tasks=(), benchmark="videomme",
                                             durations=("short", "medium", "long")))
    assert [r.split("|")[1].strip() for r in scoring.format_summary(vmme).splitlines()[4:]] == [
        "**overall (micro)** (headline)", "duration: short", "duration: medium", "duration: long"]


def test_parse_choice_reads_letters_then_option_texts():
    from stts_jax.eval.scoring import UNPARSED, parse_choice

    opts = ["red car", "red", "blue", "green"]
    assert [parse_choice(t, opts) for t in ("B", " C.", "(D) green", "A) red car", "The best answer is: C",
                                            "Answer: B", "blue", "Red car, clearly")] == [1, 2, 3, 0, 2, 1, 2, 0]
    # an out-of-range letter, a word starting with a letter, empty text, no option: unparsed (counts as wrong)
    assert [parse_choice(t, opts) for t in ("E", "Because", "", "purple")] == [UNPARSED] * 4
    # an option whose text starts like a letter or a prefix word: the exact text wins
    animals = ["a dog barks", "B cell", "Answering the phone", "A cat sleeps"]
    assert [parse_choice(t, animals) for t in ("A cat sleeps.", "Answering the phone", "B cell", "B.", "C")] == [
        3, 2, 1, 1, 2]
